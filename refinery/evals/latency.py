"""Per-token latency of one loaded model at batch size 1: prefill tokens/s and decode ms/token.

What CPU numbers can and cannot show: they compare models on *this* machine under the same
threads and prompt, and show how decode cost scales with model size. They do not reproduce the
method's ~50% lower per-token latency of 4-bit models, which is measured on GPU under vLLM with
fused W4A16 kernels. On CPU the GPTQ layers run a generic torch path that unpacks int4 weights,
so a 4-bit model can be *slower* per token than the same model in fp32 even though it is ~4x
smaller on disk and in memory.
"""
from __future__ import annotations

import statistics
import time

_FILLER = ("Question: A person walks into a room and sees that the window is open and the floor is "
           "wet. What most likely happened before they arrived? Answer: It rained. ")


class _TokenClock:
    """A generate() streamer that timestamps each new token (the first put() is the prompt)."""

    def __init__(self):
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def fixed_prompt(tokenizer, prompt_tokens: int) -> list[int]:
    """Exactly `prompt_tokens` token ids of ordinary English text (same for every model)."""
    ids: list[int] = []
    while len(ids) < prompt_tokens:
        ids += tokenizer(_FILLER, add_special_tokens=False)["input_ids"]
    return ids[:prompt_tokens]


def model_memory_bytes(model) -> int:
    """Bytes of the model's parameters and buffers as loaded (packed int4 weights are buffers)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:  # tied weights (embedding = lm_head) count once
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _one_run(model, input_ids, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) for one greedy generate of exactly new_tokens."""
    import torch

    clock = _TokenClock()
    attention = torch.ones_like(input_ids)
    start = time.perf_counter()
    # min_new_tokens = max_new_tokens: EOS cannot end a run early, every run decodes the same count.
    model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, use_cache=True, streamer=clock,
                   pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None
                   else model.config.pad_token_id)
    if len(clock.stamps) != new_tokens:
        raise RuntimeError(f"latency: generate produced {len(clock.stamps)} tokens, expected {new_tokens}")
    # The first token's stamp closes the prefill (one forward over the prompt plus its argmax);
    # each later stamp is one decode step reading the KV cache.
    prefill = clock.stamps[0] - start
    decode = (clock.stamps[-1] - clock.stamps[0]) / max(new_tokens - 1, 1)
    return prefill, decode


def measure_latency(model, tokenizer, prompt_tokens: int = 128, new_tokens: int = 32,
                    repeats: int = 3, threads: int | None = None) -> dict:
    """Median decode ms/token and prefill tokens/s at batch size 1, after one warm-up run.

    `threads` fixes torch's intra-op threads for the measurement (default: the current
    setting); the value used is recorded. `memory_bytes` is the model's parameter + buffer
    bytes, not process RSS (RSS on CPU mixes in the allocator, lm-eval and Python).
    """
    import torch

    if new_tokens < 2:
        raise ValueError(f"latency.new_tokens: got {new_tokens}, expected >= 2 (decode needs two tokens)")
    if prompt_tokens < 1 or repeats < 1:
        raise ValueError(f"latency: prompt_tokens ({prompt_tokens}) and repeats ({repeats}) must be >= 1")
    old_threads = torch.get_num_threads()
    threads = threads or old_threads
    torch.set_num_threads(threads)
    device = next(model.parameters()).device
    input_ids = torch.tensor([fixed_prompt(tokenizer, prompt_tokens)], device=device)
    try:
        with torch.inference_mode():
            _one_run(model, input_ids, new_tokens)  # warm-up: kernel selection, allocator, caches
            runs = [_one_run(model, input_ids, new_tokens) for _ in range(repeats)]
    finally:
        torch.set_num_threads(old_threads)
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {
        "decode_ms_per_token": round(decode * 1000, 3),
        "prefill_tokens_per_s": round(prompt_tokens / prefill, 1),
        "prefill_ms": round(prefill * 1000, 2),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "batch_size": 1,
        "threads": threads,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "memory_bytes": model_memory_bytes(model),
        "memory_kind": "parameters+buffers",
    }
