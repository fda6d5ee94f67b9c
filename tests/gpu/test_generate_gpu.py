"""The teacher engines on CUDA: HF on the GPU, and the official vLLM with its worker process."""
from __future__ import annotations

import importlib.util
import os

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_hf_engine_runs_on_cuda(tiny_teacher):
    from refinery.distill.engines import HFEngine

    eng = HFEngine(tiny_teacher, dtype="bfloat16", batch_size=4)
    try:
        assert next(eng.model.parameters()).device.type == "cuda"
        out = eng.generate(["Question: Where do fish live?\nAnswer:"] * 3, 8, 0.0, 1.0, 0)
        assert len(out) == 3 and len(set(out)) == 1 and eng.tokens_generated > 0
        lps = eng.score_choices(["Rating: "], [str(k) for k in range(1, 11)])
        assert len(lps[0]) == 10
    finally:
        eng.close()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
def test_vllm_engine_on_cuda_keeps_worker_process(tiny_teacher, monkeypatch):
    from refinery.distill.engines import VLLMEngine

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    eng = VLLMEngine(tiny_teacher, dtype="bfloat16", batch_size=4)
    try:
        # the CPU-only in-process default must not leak onto GPU machines
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
        a = eng.generate(["Question: Where do fish live?\nAnswer:"] * 2, 8, 1.0, 1.0, seed=3)
        assert a == eng.generate(["Question: Where do fish live?\nAnswer:"] * 2, 8, 1.0, 1.0, seed=3)
        assert len(eng.score_choices(["Rating: "], [str(k) for k in range(1, 11)])[0]) == 10
    finally:
        eng.close()
