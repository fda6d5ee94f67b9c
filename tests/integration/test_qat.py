"""KD-QAT end to end on the tiny real models: distill with ov-freeze, export on the training grid,
load the export through the real loaders (GPTQModel via transformers, and vLLM), and train under
2 ddp ranks like one process.

Round-trip tolerances: the exported integer grid equals the fake-quant weights exactly (GPTQModel's
own dequantizer, float16 like the stored scales). Logits through the loader differ from the float32
fake-quant model only by the CPU kernel's bfloat16 arithmetic (TorchAtenLinear casts activations
and scales to bf16): mean KL < 2e-3 nats/token, and < 1/10 of the KL between the fake-quant
model and the float (unquantized) student, so the export is the QAT model, not merely a model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from refinery.core.config import ConfigError
from refinery.core.manifest import read_jsonl
from refinery.pipeline.config import load
from refinery.pipeline.stages import run_stage

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
FREEZE = ["o_proj", "v_proj"]
DISTILL = {"steps": STEPS, "batch_size": 4, "max_seq_len": 48, "checkpoint_every": 3, "dtype": "float32",
           "lora": {"r": 4, "alpha": 8}, "optim": {"warmup_steps": 2, "grad_clip": None},
           "qat": {"enabled": True, "bits": 4, "group_size": 64, "freeze": FREEZE, "diag_every": 2}}
QUANT = {"method": "qat_rtn", "bits": 4, "group_size": 64, "dtype": "float32", "error_samples": 4}
TEXTS = ["Question: Where would you put a plate after washing it?\nAnswer: In the cupboard.",
         "Question: Can a penguin fly to the moon?\nAnswer: no"]


def _yaml(tmp: Path, name: str, teacher: str, student: str, write_data) -> Path:
    run = tmp / name
    write_data(run)
    cfg = {"run_dir": str(run), "seed": 0, "models": {"teacher": teacher, "student": {"path": student}},
           "tasks": {"names": ["siqa", "strategyqa"], "eval_limit": 20}, "distill": DISTILL, "quantize": QUANT}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, tiny_teacher, tiny_student, write_train_data):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on shared cores (NOTES.md)
    path = _yaml(tmp_path_factory.mktemp("qat"), "single", tiny_teacher, tiny_student, write_train_data)
    cfg = load(path)
    run_stage(cfg, "distill")
    run_stage(cfg, "quantize")
    torch.set_num_threads(threads)
    run = Path(cfg.run_dir)
    return SimpleNamespace(cfg=cfg, path=path, run=run, distill=run / "distill", out=run / "quantize",
                           student=tiny_student, teacher=tiny_teacher)


def _fake_quant_model(student: str, adapter: Path):
    """The model distill trained: base (float32, as trained here) + adapter, decoder linears fake-quantized."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from refinery.train import qat
    from refinery.train.config import QatConfig

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32), str(adapter))
    state = qat.attach(model.eval(), QatConfig(**{k: v for k, v in DISTILL["qat"].items()}))
    return model, state


def test_distill_records_diagnostics_and_spec(qat_run):
    rows = read_jsonl(qat_run.distill / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"]  # KD through the fake-quant forward learns
    diag = read_jsonl(qat_run.distill / "qat_diagnostics.jsonl")
    assert sorted({r["step"] for r in diag}) == [1, 2, 4, 6]
    assert len(diag) == 4 * 2 * 7  # steps x layers x projections
    for r in diag:
        assert 0 < r["quant_err"] < 0.3
        assert (r["grad_norm"] is None) == (r["proj"] in FREEZE)
        assert r["grad_norm"] is None or r["grad_norm"] > 0
    for png in ("qat_quant_error.png", "qat_grad_norm.png"):
        assert (qat_run.distill / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    spec = json.loads((qat_run.distill / "qat.json").read_text())
    assert spec == {"bits": 4, "group_size": 64, "symmetric": True, "freeze": FREEZE, "dtype": "float32"}


def test_frozen_projections_unchanged(qat_run):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from refinery.train import qat

    keys = load_file(qat_run.distill / "adapter" / "adapter_model.safetensors").keys()
    assert not [k for k in keys if any(p in k for p in FREEZE)]
    _, state = _fake_quant_model(qat_run.student, qat_run.distill / "adapter")
    base = dict(AutoModelForCausalLM.from_pretrained(qat_run.student, dtype=torch.float32).named_modules())
    for name, m in state.modules.items():
        before = base[name.removeprefix("base_model.model.")].weight
        same = torch.equal(qat.effective_weight(m), before)
        assert same == (name.rsplit(".", 1)[-1] in FREEZE), name


def test_export_grid_is_exact(qat_run):
    import torch

    from refinery.quantize.load import load_quantized
    from refinery.train import qat

    _, state = _fake_quant_model(qat_run.student, qat_run.distill / "adapter")
    loaded = dict(load_quantized(qat_run.out / "gptq", dtype="float32").named_modules())
    assert len(state.modules) == 14
    for name, m in state.modules.items():
        w = qat.fake_quant(qat.effective_weight(m), 4, 64).detach()
        dq = loaded[name.removeprefix("base_model.model.")].dequantize_weight()  # GPTQModel's unpacking
        assert torch.equal(dq.T.float(), w.half().float()), name


def test_export_logits_match_fake_quant(qat_run):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.quantize.load import load_quantized

    tok = AutoTokenizer.from_pretrained(qat_run.student)
    fq, _ = _fake_quant_model(qat_run.student, qat_run.distill / "adapter")
    exported = load_quantized(qat_run.out / "gptq", dtype="float32")
    flt = AutoModelForCausalLM.from_pretrained(qat_run.out / "merged", dtype=torch.float32).eval()

    def kl(p_logits, q_logits):
        p = F.log_softmax(p_logits.float(), -1)
        return float((p.exp() * (p - F.log_softmax(q_logits.float(), -1))).sum(-1).mean())

    with torch.no_grad():
        for text in TEXTS:
            ids = tok(text, return_tensors="pt")["input_ids"]
            a, b, c = (m(input_ids=ids).logits[0] for m in (fq, exported, flt))
            kl_export, kl_float = kl(a, b), kl(a, c)
            assert kl_export < 2e-3 and kl_export < kl_float / 10, (kl_export, kl_float)
            assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_quantize_manifest_and_vllm(qat_run, request):
    from refinery.quantize.serve_check import vllm_generate

    m = json.loads((qat_run.out / "manifest.json").read_text())["metrics"]
    # KL of the export against the float QAT student: real quantization error (RTN 4-bit on this
    # 2-layer cut is ~1 nat/token; the exactness of the export is checked above, not here)
    assert m["method"] == "qat_rtn" and m["bits"] == 4 and 0 < m["kl_mean"] < 10
    assert m["quantized_layers_ratio"] > 6  # fp32 layers -> 4-bit packed + fp16 scales
    request.getfixturevalue("vllm_serves_gptq")  # skips the vLLM half where vLLM cannot run GPTQ
    out = vllm_generate(qat_run.out / "gptq", ["Question: Why do birds fly south?\nAnswer:"], max_tokens=4,
                        dtype="bfloat16")
    assert len(out[0]) == 4


def test_grid_mismatch_and_missing_spec_are_refused(qat_run, tmp_path):
    from refinery.quantize.qat_export import check_grid, read_spec

    spec = read_spec(qat_run.distill)
    cfg = load(qat_run.path, ["quantize.group_size=32"])
    with pytest.raises(ConfigError, match=r"quantize\.group_size"):
        check_grid(cfg.quantize, spec)
    with pytest.raises(ConfigError, match=r"quantize\.method"):
        read_spec(tmp_path)


# later-step tolerance per strategy: ddp/fsdp2 run our DistMuon, zero2 DeepSpeed's Muon (its own bf16 kernel)
LATER_TOL = {"ddp": 1e-2, "fsdp2": 1e-2, "zero2": 5e-2}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero2"])
def test_two_ranks_train_like_one(qat_run, tmp_path, write_train_data, strategy):
    """2 gloo ranks (ddp, or fsdp2 with sharded weights; DistMuon; or DeepSpeed ZeRO-2 with its Muon) train
    like one process. Step 1 (same weights, so the same grid) within 1e-5; later steps within 1% for ours
    (measured 0.41% at most): the reduction-order differences that stay under 0.1% without QAT
    (tests/distributed/test_distill_parallel.py) move a few weights across a rounding boundary of the
    4-bit grid, which changes the forward by a whole grid step. DeepSpeed's Muon rounds differently
    (its whole runs are held to 1% without QAT there), so ZeRO-2 gets 5% (measured 1.4%)."""
    path = _yaml(tmp_path, strategy, qat_run.teacher, qat_run.student, write_train_data)
    flags = (["distill.parallel.strategy=deepspeed", "distill.parallel.zero_stage=2"] if strategy == "zero2"
             else [f"distill.parallel.strategy={strategy}"])
    cmd = [sys.executable, "-m", "refinery.launch.cli", "distill", str(path), "--nproc", "2", *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    one = read_jsonl(qat_run.distill / "metrics.jsonl")
    two = read_jsonl(tmp_path / strategy / "distill" / "metrics.jsonl")
    rel = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, two, strict=True)]
    assert rel[0] <= 1e-5 and max(rel) <= LATER_TOL[strategy], rel
    assert two[-1]["loss"] < 0.6 * two[0]["loss"]  # and it trains (measured 39.9 -> 14.9)
    # diagnostics gather sharded (fsdp2) weights on every rank; rank 0 writes them
    assert len(read_jsonl(tmp_path / strategy / "distill" / "qat_diagnostics.jsonl")) == 4 * 2 * 7


def test_full_finetune_with_freeze_and_export(tmp_path, tiny_teacher, tiny_student, write_train_data):
    """distill.qat.full_finetune: the linear weights themselves train (float32), frozen ones stay
    bit-identical, distill writes model/ (no adapter), and qat_rtn exports its grid exactly."""
    import torch
    from safetensors.torch import load_file

    from refinery.quantize.load import load_quantized
    from refinery.train import qat

    run = tmp_path / "full"
    write_train_data(run, per_task=6)
    over = [f"run_dir={run}", f"models.teacher={tiny_teacher}", f"models.student.path={tiny_student}",
            "tasks.names=[siqa, strategyqa]", "distill.steps=3", "distill.batch_size=2", "distill.max_seq_len=32",
            "distill.dtype=float32", "distill.optim.lr=0.01", "distill.qat.enabled=true",
            "distill.qat.full_finetune=true", "distill.qat.freeze=[o_proj,v_proj]", "distill.qat.diag_every=0",
            *[f"quantize.{k}={v}" for k, v in QUANT.items()]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = load(None, over)
    run_stage(cfg, "distill")
    run_stage(cfg, "quantize")
    torch.set_num_threads(threads)
    assert (run / "distill" / "model").is_dir() and not (run / "distill" / "adapter").exists()
    base = load_file(next(Path(tiny_student).glob("*.safetensors")))
    trained = load_file(run / "distill" / "model" / "model.safetensors")
    linears = [k for k in base if k.endswith("proj.weight")]
    assert len(linears) == 14
    for k in linears:
        frozen = any(p in k for p in FREEZE)
        assert torch.equal(trained[k].float(), base[k].float()) == frozen, k
        assert trained[k].dtype == (torch.float32 if not frozen else base[k].dtype)
    assert torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    loaded = dict(load_quantized(run / "quantize" / "gptq", dtype="float32").named_modules())
    for k in linears:
        w = qat.fake_quant(trained[k].float(), 4, 64)
        assert torch.equal(loaded[k.removesuffix(".weight")].dequantize_weight().T.float(), w.half().float()), k
