"""The user's own tasks (issue 13): a multiple-choice JSONL, a generative JSONL and an lm-eval YAML task
with local train/test files, each through the whole chain on the tiny models; bad task files refused
before anything is written."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration


def _norm(q: str) -> str:
    return " ".join(q.lower().split())


def write_tasks(d: Path) -> dict[str, Path]:
    """Three small tasks of three kinds, in the layouts a user would write."""
    rng = random.Random(0)
    mc = d / "sums.jsonl"
    with mc.open("w") as f:
        for i in range(30):
            a, b = rng.randint(2, 40), rng.randint(2, 40)
            ch = [str(a + b), str(a + b + 3), str(abs(a - b))]
            rng.shuffle(ch)
            row = {"id": f"s{i}", "question": f"What is {a} plus {b}?", "choices": ch,
                   "answer": ch.index(str(a + b)) if i % 2 else str(a + b)}
            if i < 4:
                row["split"] = "test"
            f.write(json.dumps(row) + "\n")
    gen = d / "capitals.jsonl"
    places = ["France", "Spain", "Italy", "Germany", "Japan", "Egypt", "Peru", "Chile", "Kenya", "India",
              "Norway", "Sweden", "Poland", "Greece", "Cuba", "Iran", "Iraq", "Mali", "Chad", "Laos"]
    with gen.open("w") as f:
        for i, p in enumerate(places):
            f.write(json.dumps({"question": f"Name the capital city of {p}.", "answers": [f"capital{i}", f"c{i}"]}) + "\n")
    lm = d / "lmtasks"
    lm.mkdir()
    for split, n in (("train", 16), ("test", 10)):
        with (lm / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                f.write(json.dumps({"q": f"Is {i + (100 if split == 'test' else 0)} an even number?",
                                    "opts": ["yes", "no"], "label": i % 2}) + "\n")
    (lm / "parity.yaml").write_text(yaml.safe_dump({
        "task": "parity", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(lm / "train.jsonl"), "test": str(lm / "test.jsonl")}},
        "training_split": "train", "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "Q: {{q}}\nA:", "doc_to_choice": "{{opts}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    return {"mc": mc, "gen": gen, "lm": lm}


def _overrides(run_dir, teacher, student, files):
    return [f"run_dir={run_dir}", f"models.teacher={teacher}", f"models.student.path={student}",
            "tasks.names=[sums,capitals,parity]", "tasks.eval_limit=8",
            f"tasks.custom.sums.file={files['mc']}", "tasks.custom.sums.description=adding two numbers",
            f"tasks.custom.capitals.file={files['gen']}", "tasks.custom.capitals.description=capital cities",
            "tasks.custom.capitals.max_new_tokens=8", r"tasks.custom.capitals.answer_regex=^\s*(\w+)",
            "tasks.custom.parity.description=whether a number is even", f"tasks.include_path={files['lm']}",
            "generate.engine=hf", "generate.seeds_per_task=2", "generate.subtopics_per_seed=1",
            "generate.pairs_per_subtopic=2", "generate.max_new_tokens=24", "generate.score_threshold=0",
            "distill.steps=2", "distill.batch_size=2", "distill.max_seq_len=64", "distill.checkpoint_every=2",
            "quantize.calibration_samples=8", "quantize.calibration_max_len=64",
            "evaluate.latency.enabled=false", "evaluate.models=[teacher,student,student_quant]"]


def _refinery(*args, timeout=900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "refinery.launch.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_three_kinds_of_own_task_end_to_end(tmp_path, tiny_teacher, tiny_student):
    from refinery.core.tasks import CustomTask, TasksConfig, load_task

    files = write_tasks(tmp_path)
    run_dir = tmp_path / "run"
    args = _overrides(run_dir, tiny_teacher, tiny_student, files)
    res = _refinery("run", "configs/quickstart.yaml", *args)
    assert res.returncode == 0, res.stderr[-3000:]

    cfg = TasksConfig(names=["sums", "capitals", "parity"], include_path=str(files["lm"]),
                      custom={"sums": CustomTask(str(files["mc"]), "x"), "capitals": CustomTask(str(files["gen"]), "x")})
    tasks = {n: load_task(cfg, n) for n in cfg.names}
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    assert results["tasks"] == ["sums", "capitals", "parity"]
    for entry in results["models"].values():
        t = entry["tasks"]
        assert {k: (v["metric"], v["n"]) for k, v in t.items()} == {
            "sums": ("acc", 8), "capitals": ("exact_match", min(8, len(tasks["capitals"].held))), "parity": ("acc", 8)}
        assert all(0.0 <= t[k]["acc"] <= 1.0 for k in t)
    report = (run_dir / "report" / "REPORT.md").read_text()
    assert all(f"| {k} |" in report for k in ("sums", "capitals", "parity"))
    assert "Generative tasks (capitals): acc is exact match" in report

    # Held-out items: the file's own `split: test` rows are held out; none reaches generate's output.
    held = {_norm(it.question) for task in tasks.values() for it in task.held}
    assert {"s0", "s1", "s2", "s3"} <= {it.id for it in load_task(cfg, "sums").held}
    rows = [json.loads(x) for x in (run_dir / "generate" / "data.jsonl").read_text().splitlines()]
    assert rows and not [r for r in rows if _norm(r["instruction"]) in held]
    # The lm-eval task's seed answers keep its own layout, as evaluate scores it.
    parity = [r for r in rows if r["task"] == "parity" and "prompt" in r]
    assert parity and all(r["prompt"].startswith("Q: Is ") and r["prompt"].endswith("\nA:") for r in parity)
    assert all(r["output"] in ("yes", "no") for r in parity)
    docs = [json.loads(x) for x in (run_dir / "evaluate" / "tasks" / "refinery_capitals.jsonl").read_text().splitlines()]
    assert all(d["prompt"] == f"Question: {d['question']}\nAnswer:" for d in docs)

    # Editing a task file makes generate stale: distill refuses to build on it, naming the file's hash.
    with files["mc"].open("a") as f:
        f.write(json.dumps({"question": "What is 1 plus 1?", "choices": ["2", "3"], "answer": 0}) + "\n")
    stale = _refinery("distill", "configs/quickstart.yaml", *args)
    assert stale.returncode != 0 and "generate is stale for this config (tasks.data.sums" in stale.stderr, stale.stderr[-2000:]


BAD = {
    "missing answer": ('{"question": "q1", "choices": ["a", "b"]}', ":1: field `answer`: missing"),
    "answer out of range": ('{"question": "q1", "choices": ["a", "b"], "answer": 2}', ":1: field `answer`: index 2 is out of range"),
    "answer not a choice": ('{"question": "q1", "choices": ["a", "b"], "answer": "c"}', "'c' is none of the choices"),
    "one choice": ('{"question": "q1", "choices": ["a"], "answer": 0}', ":1: field `choices`: needs at least 2"),
    "no question": ('{"choices": ["a", "b"], "answer": 0}', ":1: field `question`: missing"),
    "bad json": ('{"question": "q1", "choices": ["a", "b"], "answer": 0}\n{"question": ', ":2: not valid JSON"),
    "duplicate ids": (('{"id": 7, "question": "q1", "choices": ["a", "b"], "answer": 0}\n'
                       '{"id": 7, "question": "q2", "choices": ["a", "b"], "answer": 0}'), "line 2 repeats the id '7' of line 1"),
    "repeated item": (('{"question": "q1", "choices": ["a", "b"], "answer": 0}\n'
                       '{"question": "q1", "choices": ["a", "b"], "answer": 1}'), "line 2 is the same item as line 1"),
    "mixed kinds": ('{"question": "q1", "choices": ["a", "b"], "answer": 0}\n{"question": "q2", "answers": ["x"]}',
                    ":2: a generate item in a file whose first item (line 1) is multiple_choice"),
    "bad split": ('{"question": "q1", "choices": ["a", "b"], "answer": 0, "split": "dev"}', "field `split`: 'dev' is not one of"),
    "empty file": ("\n\n", "is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_task_file_is_refused_before_anything_is_written(tmp_path, case, capsys):
    from refinery.launch.cli import main

    text, msg = BAD[case]
    f = tmp_path / "mine.jsonl"
    f.write_text(text)
    run_dir = tmp_path / "run"
    rc = main(["run", "configs/quickstart.yaml", f"run_dir={run_dir}", "tasks.names=[mine]",
               f"tasks.custom.mine.file={f}", "tasks.custom.mine.description=d"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and str(f) in err, err
    assert not run_dir.exists()


@pytest.mark.parametrize("overrides,msg", [
    (["tasks.custom.mine.description=d", "generate.seeds_per_task=9"],
     "its seed split has 3 items, fewer than generate.seeds_per_task=9"),
    ([], "tasks.custom.mine.description: got '', expected one line on what the task is about"),
    (["tasks.custom.mine.description=d", "tasks.names=[siqa]"], "a task listed in tasks.names (add 'mine' there)"),
    (["tasks.custom.mine.description=d", "tasks.names=[mine,no_such_task_anywhere]"],
     "'no_such_task_anywhere' is neither a bundled task"),
])
def test_task_config_errors_name_the_fix(tmp_path, overrides, msg, capsys):
    from refinery.launch.cli import main

    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"id": i, "question": f"q{i}", "choices": ["a", "b"], "answer": 0,
                                     "split": "train" if i < 3 else "test"}) + "\n" for i in range(6)))
    run_dir = tmp_path / "run"
    rc = main(["run", "configs/quickstart.yaml", f"run_dir={run_dir}", "tasks.names=[mine]",
               f"tasks.custom.mine.file={f}", "generate.seeds_per_task=2", *overrides])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err
    assert not run_dir.exists()


def test_lm_eval_task_with_one_split_is_refused_by_name(tmp_path, capsys):
    from refinery.launch.cli import main

    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"q": f"q{i}", "opts": ["a", "b"], "label": 0}) + "\n"
                                                 for i in range(4)))
    (tmp_path / "one.yaml").write_text(yaml.safe_dump({
        "task": "one_split", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "test.jsonl")}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "{{opts}}", "doc_to_target": "label"}))
    run_dir = tmp_path / "run"
    rc = main(["run", "configs/quickstart.yaml", f"run_dir={run_dir}", "tasks.names=[one_split]",
               f"tasks.include_path={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "task 'one_split': lm-eval gives it only one split" in err, err
    assert not run_dir.exists()
