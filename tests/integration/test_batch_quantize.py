"""Batched quantize (`refinery quantize CONFIG --checkpoints ... --out DIR`) on the tiny real student.

Two real LoRA adapters (different seeds) on the 2-layer SmolLM2 cut are quantized in one job; the
tests read what it wrote, rerun it after a simulated kill, and compare an RTN job with it. One
private Ray serves the module (each job still starts its own actors).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from refinery.core.config import ConfigError
from refinery.core.manifest import read_manifest
from refinery.pipeline.config import load

pytestmark = pytest.mark.integration

TEXT = "Question: Where would you put a plate after washing it?\nAnswer: In the cupboard."
SMALL = ["quantize.calibration_samples=8", "quantize.calibration_max_len=64", "quantize.error_samples=4"]


def _overrides(student: str, teacher: str, *extra: str) -> list[str]:
    return [f"models.teacher={teacher}", f"models.student.path={student}", *SMALL, *extra]


@pytest.fixture(scope="module")
def ray_local():
    """A private Ray for the module; quantize_many reuses a running Ray and leaves it running."""
    import ray

    tmp = tempfile.mkdtemp(prefix="rayqt-", dir="/tmp")
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, _temp_dir=tmp,
             log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_teacher, tiny_student, write_train_data, write_adapter):
    """Two run dirs with real adapters (seeds 0, 1); the first also holds generate/data.jsonl."""
    root = tmp_path_factory.mktemp("batchq")
    runs = [root / "runs" / "alpha", root / "runs" / "beta"]
    for seed, run in enumerate(runs):
        write_adapter(tiny_student, run, seed, std=0.01)
    write_train_data(runs[0])  # calibration rows: the first run dir's generate/data.jsonl
    cfg = load(None, _overrides(tiny_student, tiny_teacher))
    return SimpleNamespace(root=root, runs=runs, cfg=cfg, out=root / "out", student=tiny_student,
                           teacher=tiny_teacher)


@pytest.fixture(scope="module")
def batch(sources, ray_local):
    from refinery.quantize.batch import quantize_many

    sources.records = quantize_many(sources.cfg, sources.runs, sources.out, workers=1, method="gptq")
    return sources


def _logits(model, tokenizer, text=TEXT):
    import torch

    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits.float()[0]


def test_two_checkpoints_one_job_load_with_sane_manifests(batch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.quantize.load import load_quantized

    assert [r["name"] for r in batch.records] == ["alpha", "beta"]
    assert all(r["status"] == "done" for r in batch.records)
    logits = {}
    for r in batch.records:
        m = read_manifest(batch.out / r["name"])
        assert m["status"] == "complete" and m["metrics"]["quant_dir"] == str(batch.out / r["name"] / "gptq")
        assert m["config"]["quantize"]["bits"] == 4 and m["config"]["source"]["sha256"]
        assert r["source"] == str(batch.runs[["alpha", "beta"].index(r["name"])])
        # 2-layer student: the fp32 embedding (49k x 576) dominates and drops to bf16 -> < 0.5x.
        assert 0 < r["bytes_after"] < 0.5 * r["bytes_before"]
        assert r["bytes_before"] == sum(p.stat().st_size for p in Path(r["merged_dir"]).glob("*.safetensors"))
        e = r["error"]
        assert math.isfinite(e["kl_mean"]) and 0 < e["kl_mean"] < 1.0 and e["error_tokens"] > 10
        assert math.isfinite(e["ppl_quant"]) and r["time_s"] > r["quantize_s"] > 0
        assert r["calibration_samples"] == 8
        qcfg = json.loads((Path(r["quant_dir"]) / "config.json").read_text())["quantization_config"]
        assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"], qcfg["desc_act"]) == ("gptq", 4, 64, False)
        tok = AutoTokenizer.from_pretrained(r["quant_dir"])
        quant = load_quantized(r["quant_dir"])
        assert type(quant.model.layers[0].self_attn.q_proj).__name__ != "Linear"  # packed
        merged = AutoModelForCausalLM.from_pretrained(r["merged_dir"], dtype=torch.float32).eval()
        logits[r["name"]] = (_logits(quant, tok), _logits(merged, tok))
    # Two different adapters: two different quantized students.
    assert (logits["alpha"][0] - logits["beta"][0]).abs().max() > 0.1
    rows = (batch.out / "quantize.csv").read_text().splitlines()
    assert rows[0].startswith("name,status,method") and len(rows) == 3 and rows[1].startswith("alpha,done,gptq")


def test_rerun_skips_complete_and_redoes_killed_output(batch, tiny_teacher, tiny_student, capsys):
    from refinery.launch.cli import main

    alpha_manifest = batch.out / "alpha" / "manifest.json"
    alpha_mtime = alpha_manifest.stat().st_mtime_ns
    # What a job killed while writing beta leaves: no beta/, only atomic_path's temp dir.
    shutil.rmtree(batch.out / "beta")
    leftover = batch.out / ".beta.k1ll3d00"
    (leftover / "beta" / "gptq").mkdir(parents=True)
    (leftover / "beta" / "gptq" / "model.safetensors").write_bytes(b"partial")
    config = batch.root / "cfg.yaml"
    config.write_text(f"models:\n  teacher: {tiny_teacher}\n  student:\n    path: {tiny_student}\n")
    code = main(["quantize", str(config), "--checkpoints", *map(str, batch.runs), "--out", str(batch.out), "--workers", "1",
                 "calibration_samples=8", "quantize.calibration_max_len=64", "quantize.error_samples=4"])
    assert code == 0
    assert alpha_manifest.stat().st_mtime_ns == alpha_mtime  # not redone
    assert read_manifest(batch.out / "beta")["status"] == "complete" and not leftover.exists()
    table = capsys.readouterr().out
    assert "alpha" in table and "skipped" in table and "beta" in table and "done" in table


def test_rtn_loads_differs_from_gptq_both_close_to_float(batch):
    """Every quantized linear (run through its packed kernel) against the float one, on the same inputs."""
    import torch
    from transformers import AutoModelForCausalLM

    from refinery.quantize.batch import quantize_many
    from refinery.quantize.load import load_quantized

    [rtn] = quantize_many(batch.cfg, [batch.runs[0]], batch.root / "out-rtn", workers=1, method="rtn")
    gptq = read_manifest(batch.out / "alpha")["metrics"]
    assert rtn["status"] == "done" and rtn["method"] == "rtn" and rtn["calibration_samples"] == 0
    assert rtn["bytes_after"] == gptq["bytes_after"]  # same grid, same packed format
    assert 0 < rtn["error"]["kl_mean"] < 2.0 and math.isfinite(rtn["error"]["ppl_quant"])
    merged = AutoModelForCausalLM.from_pretrained(gptq["merged_dir"], dtype=torch.float32).eval()
    quant = {"rtn": load_quantized(rtn["quant_dir"]), "gptq": load_quantized(gptq["quant_dir"])}
    floats = {n: m for n, m in merged.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert len(floats) == 14
    torch.manual_seed(0)
    with torch.no_grad():
        for name, lin in floats.items():
            x = torch.randn(16, lin.in_features)
            ref = lin(x)
            out = {k: dict(q.named_modules())[name](x.to(torch.bfloat16)).float() for k, q in quant.items()}
            for k, y in out.items():
                rel = ((y - ref).norm() / ref.norm()).item()
                assert rel < 0.25, f"{k} {name}: relative error {rel:.3f} against the float layer"
            assert (out["rtn"] - out["gptq"]).abs().max() > 1e-3, f"{name}: RTN and GPTQ wrote the same weights"


def test_bad_inputs_fail_before_any_work(sources, tmp_path):
    from refinery.launch.cli import main
    from refinery.quantize.batch import quantize_many, sweep_sources

    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = sources.cfg
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope: no such directory"):
        quantize_many(cfg, [sources.runs[0], tmp_path / "nope"], out)
    with pytest.raises(ConfigError, match=r"checkpoint .*empty has no LoRA adapter .* and no float model"):
        quantize_many(cfg, [empty], out)
    with pytest.raises(ConfigError, match=r"--workers: got 99, expected an integer from 1 to \d+"):
        quantize_many(cfg, [sources.runs[0]], out, workers=99)
    with pytest.raises(ConfigError, match=r"bits: got 5, expected 3, 4 or 8"):
        load(None, _overrides(sources.student, sources.teacher, "quantize.bits=5"))
    bad_group = load(None, _overrides(sources.student, sources.teacher, "quantize.group_size=128"))
    with pytest.raises(ConfigError, match=r"group_size: 128 does not divide the input width 576 .*valid group "
                                          r"sizes for this model: -1, 16, 32, 64"):
        quantize_many(bad_group, [sources.runs[0]], out)
    clash = tmp_path / "other" / "alpha"
    shutil.copytree(sources.runs[0] / "distill", clash / "distill")
    with pytest.raises(ConfigError, match=r"two checkpoints would write .*alpha"):
        quantize_many(cfg, [sources.runs[0], clash], out)
    with pytest.raises(ConfigError, match=r"--sweep .*: no runs/ directory"):
        sweep_sources(tmp_path)
    config = tmp_path / "cfg.yaml"
    config.write_text(f"models:\n  student:\n    path: {sources.student}\n")
    assert main(["quantize", str(config), "--checkpoints", str(empty), "--out", str(out)]) == 2
    assert not out.exists()  # nothing was created for any of them


def test_sweep_dir_gives_finished_runs_and_shared_data(sources, tmp_path, write_train_data):
    """A sweep's layout: runs/<key>-r<k>/ (a trial still distilling is left out), data in shared/generate."""
    from refinery.quantize.batch import plan, sweep_sources

    sweep = tmp_path / "sweep"
    for k, run in enumerate(sources.runs):
        shutil.copytree(run / "distill", sweep / "runs" / f"abc123-r{k}" / "distill")
    (sweep / "runs" / "def456-r0" / "distill" / "checkpoints").mkdir(parents=True)  # no adapter, no manifest
    write_train_data(sweep / "shared", per_task=6)
    runs = sweep_sources(sweep)
    assert [r.name for r in runs] == ["abc123-r0", "abc123-r1"]
    p = plan(sources.cfg, runs, tmp_path / "out", method="rtn", sweep=sweep)
    assert p["data"] == str(sweep / "shared" / "generate" / "data.jsonl")
    assert [j["name"] for j in p["jobs"]] == ["abc123-r0", "abc123-r1"]
    assert {j["config"]["method"] for j in p["jobs"]} == {"rtn"} and len({j["hash"] for j in p["jobs"]}) == 2
    assert all(j["adapter"].endswith("distill/adapter") and j["base"] == sources.student for j in p["jobs"])
    held_out = p["jobs"][0]["held_out"]  # 12 rows: 3 held out (a quarter), 8 of the rest calibrate
    assert len(held_out) == 3 and len(p["calib_texts"]) == 8 and not set(held_out) & set(p["calib_texts"])
