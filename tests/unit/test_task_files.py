"""The user's task files: layouts, splits, identity, and generative scoring through lm-eval."""
from __future__ import annotations

import json

import pytest

from refinery.core.tasks import CustomTask, TasksConfig, load_task


def _cfg(path, **kw):
    return TasksConfig(names=["mine"], custom={"mine": CustomTask(str(path), "my task", **kw)})


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bigbench_json_multiple_choice_and_generative(tmp_path):
    mc = tmp_path / "mc.json"
    mc.write_text(json.dumps({"examples": [{"input": f"q{i}", "target_scores": {"yes": i % 2, "no": 1 - i % 2}}
                                           for i in range(10)]}))
    t = load_task(_cfg(mc), "mine")
    items = t.seed + t.held
    assert t.kind == "multiple_choice" and len(items) == 10
    assert all(it.choices == ("yes", "no") and it.gold == ("yes" if int(it.question[1:]) % 2 else "no") for it in items)
    gen = tmp_path / "gen.json"
    gen.write_text(json.dumps({"examples": [{"input": f"q{i}", "target": [f"a{i}", f"b{i}"]} for i in range(10)]}))
    t = load_task(_cfg(gen), "mine")
    assert t.kind == "generate" and all(it.answers == (f"a{it.question[1:]}", f"b{it.question[1:]}") for it in t.seed + t.held)


def test_split_is_by_id_hash_and_explicit_splits_win(tmp_path):
    rows = [{"id": f"x{i}", "question": f"question {i}", "choices": ["a", "b"], "answer": 0} for i in range(200)]
    rows[0]["split"], rows[1]["split"] = "test", "train"
    a = load_task(_cfg(_write(tmp_path / "a.jsonl", rows)), "mine")
    b = load_task(_cfg(_write(tmp_path / "b.jsonl", rows[::-1])), "mine")  # file order does not matter
    assert {it.id for it in a.held} == {it.id for it in b.held} and {it.id for it in a.seed} == {it.id for it in b.seed}
    assert "x0" in {it.id for it in a.held} and "x1" in {it.id for it in a.seed}
    assert not {it.id for it in a.held} & {it.id for it in a.seed}
    assert 60 < len(a.held) < 140 and len(a.held) + len(a.seed) == 200


def test_a_seed_item_repeating_a_held_out_question_is_dropped(tmp_path):
    rows = [{"question": "Same Question?", "choices": ["a", "b"], "answer": 0, "split": "test"},
            {"question": "same  question?", "choices": ["c", "d"], "answer": 1, "split": "train"},
            {"question": "other", "choices": ["a", "b"], "answer": 0, "split": "train"}]
    t = load_task(_cfg(_write(tmp_path / "t.jsonl", rows)), "mine")
    assert [it.question for it in t.seed] == ["other"] and len(t.held) == 1


def test_task_data_enters_the_identity_of_generate_and_evaluate_only(tmp_path):
    from refinery.core.runner import identity as stage_identity
    from refinery.pipeline.config import load
    from refinery.pipeline.stages import BY_NAME

    f = _write(tmp_path / "t.jsonl", [{"question": f"q{i}", "choices": ["a", "b"], "answer": 0} for i in range(8)])
    over = [f"run_dir={tmp_path / 'run'}", "tasks.names=[mine]", f"tasks.custom.mine.file={f}",
            "tasks.custom.mine.description=d"]
    before = {s: stage_identity(load(None, over), BY_NAME[s])[1] for s in ("generate", "distill", "evaluate")}
    _write(f, [{"question": f"q{i}", "choices": ["a", "b"], "answer": 1} for i in range(8)])
    after = {s: stage_identity(load(None, over), BY_NAME[s])[1] for s in ("generate", "distill", "evaluate")}
    assert before["generate"] != after["generate"] and before["evaluate"] != after["evaluate"]
    assert before["distill"] == after["distill"]  # distill sees the task through generate's data
    # A run of bundled tasks keeps the identity it had before user tasks existed.
    resolved, _ = stage_identity(load(None, [f"run_dir={tmp_path / 'r2'}"]), BY_NAME["generate"])
    assert resolved["tasks"] == {"names": load(None, []).tasks.names, "eval_fraction": 0.5}


def test_generative_task_scores_exact_match_after_normalization(tmp_path):
    """A generative file task through lm-eval's own pipeline, with a model whose replies are given."""
    import lm_eval
    from lm_eval.api.model import LM

    from refinery.evals.lmeval_tasks import build_tasks, task_manager

    rows = [{"id": f"g{i}", "question": f"code {i}?", "answers": [f"Alpha {i}", f"b{i}"], "split": "test"} for i in range(4)]
    rows += [{"id": f"g{i}", "question": f"code {i}?", "answers": ["A"], "split": "test"} for i in (4, 5)]
    cfg = TasksConfig(names=["mine"], custom={"mine": CustomTask(str(_write(tmp_path / "g.jsonl", rows)), "codes",
                                                                 answer_regex=r"answer: (.+)")})
    replies = {"code 0?": " answer: alpha 0.", "code 1?": " answer: B1", "code 2?": " answer: b 2 !",
               "code 3?": " b3",  # no "answer:" for the regex: no answer
               "code 4?": " no idea",  # no answer must not match a one-letter reference
               "code 5?": " answer: (a)"}

    class Given(LM):
        def loglikelihood(self, requests):
            raise AssertionError("a generative task asks for generations only")

        loglikelihood_rolling = loglikelihood

        def generate_until(self, requests):
            assert all(r.args[1]["until"] == ["\n"] and r.args[1]["do_sample"] is False for r in requests)
            return [replies[r.args[0].split("Question: ")[1].split("\n")[0]] for r in requests]

    specs = build_tasks(cfg, tmp_path / "tasks")
    out = lm_eval.simple_evaluate(model=Given(), tasks=[specs[0].lm_eval_name], task_manager=task_manager(specs, tmp_path / "tasks"),
                                  log_samples=True)
    got = {s["doc"]["id"]: s["exact_match"] for s in out["samples"][specs[0].lm_eval_name]}
    assert got == {"g0": 1.0, "g1": 1.0, "g2": 1.0, "g3": 0.0, "g4": 0.0, "g5": 1.0}


@pytest.mark.parametrize("field,value,msg", [
    ("answer_regex", "(unclosed", "a valid regular expression"),
    ("max_new_tokens", 0, "a positive integer"),
])
def test_custom_task_fields_are_checked(field, value, msg):
    from refinery.core.config import ConfigError

    with pytest.raises(ConfigError, match=msg):
        CustomTask("f.jsonl", "d", **{field: value})


def test_the_readme_example_task_file_loads_with_its_splits():
    t = load_task(_cfg("examples/support_tickets.jsonl"), "mine")
    assert t.kind == "multiple_choice" and len(t.seed) == 16 and len(t.held) == 8
    assert all(len(it.choices) == 4 for it in t.seed + t.held)


def test_a_pretty_printed_json_file_with_a_syntax_error_names_its_line(tmp_path):
    from refinery.core.config import ConfigError

    f = tmp_path / "bb.json"
    f.write_text('{\n  "examples": [\n    {"input": "q", "target_scores": {"a": 1, "b": 0},}\n  ]\n}\n')
    with pytest.raises(ConfigError, match=r"bb.json:3: not valid JSON"):
        load_task(_cfg(f), "mine")
