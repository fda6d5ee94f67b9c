"""Local lm-eval task files: held-out items only, limit respected, training prompt layout."""
from __future__ import annotations

import json

import pytest
import yaml

from refinery.core.prompts import example_text, prompt_text
from refinery.core.tasks import TasksConfig, load_task, split
from refinery.evals.lmeval_tasks import build_tasks, check_loadable, held_out_docs, task_manager


def _task(name):
    return load_task(TasksConfig(names=[name], eval_fraction=0.5), name)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_docs_are_held_out_only_and_limited(tmp_path):
    specs = build_tasks(TasksConfig(names=["siqa", "physical_intuition"], eval_fraction=0.5, eval_limit=30),
                        tmp_path)
    assert [(s.name, s.lm_eval_name, s.offline) for s in specs] == [
        ("siqa", "refinery_siqa", True), ("physical_intuition", "refinery_physical_intuition", True)]
    for spec in specs:
        seed, held = split(spec.name, 0.5)
        rows = _rows(tmp_path / f"{spec.lm_eval_name}.jsonl")
        assert spec.n == len(rows) == min(30, len(held))
        ids = [r["id"] for r in rows]
        assert ids == [it.id for it in held[:len(rows)]]  # the first held-out items, in order
        assert not set(ids) & {it.id for it in seed}  # never a seed (training) item
    # physical_intuition has only 36 held-out items at 0.5: the limit of 30 applies; siqa has ~957.
    assert specs[0].n == 30 and specs[1].n == 30


def test_no_limit_takes_every_held_out_item(tmp_path):
    (spec,) = build_tasks(TasksConfig(names=["physical_intuition"], eval_limit=None), tmp_path)
    assert spec.n == len(split("physical_intuition", 0.5)[1]) == 36


def test_doc_layout_matches_training_prompt(tmp_path):
    docs = held_out_docs(_task("mmlu_dev"), 5)
    _, held = split("mmlu_dev", 0.5)
    for doc, item in zip(docs, held):
        assert doc["prompt"] == prompt_text(item.question)
        assert doc["prompt"].startswith("Question: ") and doc["prompt"].endswith("\nAnswer:")
        assert doc["choices"] == list(item.choices) and len(doc["choices"]) == 4
        assert doc["answer"] == item.answer and 0 <= doc["answer"] < 4


def test_build_is_deterministic(tmp_path):
    cfg = TasksConfig(names=["strategyqa"], eval_limit=50)
    build_tasks(cfg, tmp_path / "a")
    build_tasks(cfg, tmp_path / "b")
    for name in ("refinery_strategyqa.jsonl", "refinery_strategyqa.yaml"):
        a, b = (tmp_path / "a" / name).read_text(), (tmp_path / "b" / name).read_text()
        assert a.replace(str(tmp_path / "a"), "") == b.replace(str(tmp_path / "b"), "")


def test_yaml_is_offline_json_multiple_choice(tmp_path):
    build_tasks(TasksConfig(names=["winowhy"], eval_limit=4), tmp_path)
    cfg = yaml.safe_load((tmp_path / "refinery_winowhy.yaml").read_text())
    assert cfg["dataset_path"] == "json" and cfg["output_type"] == "multiple_choice"
    data = cfg["dataset_kwargs"]["data_files"]["test"]
    assert data == str((tmp_path / "refinery_winowhy.jsonl").resolve())
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc", "acc_norm"]


def test_lm_eval_builds_the_training_layout_requests(tmp_path):
    specs = build_tasks(TasksConfig(names=["siqa"], eval_limit=3), tmp_path)
    tm = task_manager(specs, tmp_path)
    task = tm.load(["refinery_siqa"])["tasks"]["refinery_siqa"]
    task.build_all_requests(rank=0, world_size=1)
    docs = held_out_docs(_task("siqa"), 3)
    # One loglikelihood request per choice: context = prompt, continuation = " " + choice,
    # which is exactly how training rows are laid out (prompt + " " + output).
    expected = [(d["prompt"], f" {c}") for d in docs for c in d["choices"]]
    assert sorted(i.arguments for i in task.instances) == sorted(expected)
    prompt, full = example_text({"instruction": docs[0]["question"], "output": docs[0]["choices"][0]})
    assert full == prompt + f" {docs[0]['choices'][0]}"


def test_standard_names_pass_through_without_files(tmp_path):
    specs = build_tasks(TasksConfig(names=["siqa", "arc_easy"], eval_limit=2), tmp_path)
    assert specs[1].name == specs[1].lm_eval_name == "arc_easy" and not specs[1].offline
    assert specs[1].n is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refinery_siqa.jsonl", "refinery_siqa.yaml"]


def test_unloadable_task_data_names_the_task(tmp_path):
    specs = build_tasks(TasksConfig(names=["strategyqa"], eval_limit=2), tmp_path)
    tm = task_manager(specs, tmp_path)
    (tmp_path / "refinery_strategyqa.jsonl").unlink()  # the data a user deleted or never built
    with pytest.raises(RuntimeError, match="task 'strategyqa': lm-eval could not load its data"):
        check_loadable(specs, tm)
