"""An lm-eval model that sends its requests to an `EvalPool` of vLLM workers.

    from refinery.evals.pool import EvalPool
    from refinery.evals.vllm_lm import PoolLM
    lm = PoolLM(pool, "runs/x/quantize/gptq")
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])     # standard tasks and metrics, unchanged

or by name: `simple_evaluate(model="refinery-vllm-pool", model_args="pretrained=PATH,workers=1")`
(the LM then owns a pool and `close()` stops it).

Tokenization follows lm-eval's HF backend (`HFLM`) exactly, so both backends score the same
token ids: the tokenizer's default special tokens (none added when the text already starts
with BOS), trailing context spaces moved into the continuation, the continuation's tokens
taken from the encoding of context + continuation, BOS (else EOS) as the context of an empty
one. A continuation's log-likelihood is the sum of vLLM's full-vocabulary prompt log-probs
of its tokens; `is_greedy` holds when each is the argmax at its position.
"""
from __future__ import annotations

from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from refinery.distill.engines import model_max_len

NAME = "refinery-vllm-pool"


@register_model(NAME)
class PoolLM(TemplateLM):
    """lm-eval `LM` over an `EvalPool`: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(self, pool=None, pretrained: str | None = None, model_path: str | None = None,
                 chunk_size: int = 64, max_gen_toks: int = 256, workers: int | None = None,
                 dtype: str = "bfloat16", trust_remote_code: bool = False, **_ignored):
        super().__init__()
        from transformers import AutoTokenizer

        path = model_path or pretrained
        if not path or not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{NAME}: model {path!r} is not an HF model dir with config.json: "
                                    "pass pretrained=<model dir>")
        self.model_path = str(Path(path).resolve())
        self._owns_pool = pool is None
        if pool is None:
            from refinery.evals.pool import EvalPool

            pool = EvalPool(workers=int(workers) if workers else None, dtype=dtype,
                            trust_remote_code=trust_remote_code)
        self.pool = pool
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
        self.chunk_size, self._max_gen_toks = int(chunk_size), int(max_gen_toks)
        self._max_length = model_max_len(self.model_path, trust_remote_code)
        self.requests_sent = 0

    # -- what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """HFLM.tok_encode with add_bos_token unset: tokenizer defaults, no BOS on a BOS-led text."""
        from lm_eval.models.utils import has_bos_prefix

        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- scoring
    def _send(self, kind: str, items: list[tuple]) -> dict:
        from refinery.evals.pool import Chunk

        chunks = [Chunk(kind, items[i:i + self.chunk_size]) for i in range(0, len(items), self.chunk_size)]
        self.requests_sent += len(items)
        return self.pool.run(self.model_path, chunks, desc=f"{kind} ({Path(self.model_path).name})")

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """[(logprob, is_greedy)] for [(cache key, context ids, continuation ids)], in order."""
        items = []
        limit = self.max_length - 1  # vLLM needs room for one generated token
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"{NAME}: request {i} has an empty continuation")
            toks = (ctx + cont)[-limit:]  # left-truncate long contexts, as lm-eval's backends do
            items.append((i, toks, len(toks) - len(cont)))
        # similar lengths in one chunk: fewer padded steps, and the same order on every run
        items.sort(key=lambda it: (-len(it[1]), it[0]))
        res = self._send("loglikelihood", items)
        out = [res[i] for i in range(len(requests))]
        for (key, _, _), ans in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of max_length - 1 tokens (lm-eval's scheme)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            for w in get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length - 1, context_len=1):
                ctx, cont = make_disjoint_window(w)
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Text up to the first `until` string (EOS included), sampling params from gen_kwargs."""
        from lm_eval.models.utils import (
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )

        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        items, stops = [], []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_toks = int(kw.pop("max_gen_toks"))
            kw.pop("do_sample", None)
            if max_toks >= self.max_length:
                raise ValueError(f"{NAME}: max_gen_toks={max_toks} leaves no room for the context in the "
                                 f"model's {self.max_length} tokens: lower max_gen_toks")
            toks = self.tok_encode(context)[-(self.max_length - max_toks):]
            params = {"max_tokens": max_toks, "stop": until, "skip_special_tokens": False,
                      "spaces_between_special_tokens": False, **_vllm_kwargs(kw, seed=i)}
            items.append((i, toks, params))
            stops.append(until)
        res = self._send("generate", items)
        out = []
        for i, req in enumerate(requests):
            text = postprocess_generated_text(res[i], stops[i], None)  # vLLM drops the stop string; be sure
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def close(self) -> None:
        """Stop the pool if this LM made it."""
        if self._owns_pool:
            self.pool.close()


_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "presence_penalty",
             "frequency_penalty")


def _vllm_kwargs(kw: dict, seed: int) -> dict:
    """The gen_kwargs vLLM's SamplingParams understands; an unknown key fails by name."""
    unknown = sorted(set(kw) - set(_SAMPLING))
    if unknown:
        raise ValueError(f"{NAME}: generation kwargs {unknown} are not supported; supported: {', '.join(_SAMPLING)}")
    out = dict(kw)
    out["temperature"] = float(out.get("temperature", 0.0))
    if out["temperature"] > 0:
        out.setdefault("seed", seed)  # sampled text independent of how the pool batches requests
    return out
