"""Quantize many checkpoints in one job: one Ray actor per device, calibration data tokenized once.
(The command, `refinery quantize CONFIG --checkpoints P ... | --sweep DIR --out DIR`: options of the quantize
subcommand, launch/cli.py and launch/many_cli.py.)

A checkpoint is a run dir (`<run>/distill/adapter/`), a distill stage dir (`adapter/`), an adapter
dir, or a float HF model dir (config.json + *.safetensors, e.g. `<run>/quantize/merged`); `--sweep`
takes every run under `<sweep>/runs/` whose distill stage is complete. Adapters are merged into
the config's student (`models`) first. Calibration and held-out rows come from `--data`, else
`<sweep>/shared/generate/data.jsonl`, else the first run dir's `generate/data.jsonl`, else the
config's run_dir; they are split as the quantize stage splits them, tokenized once in the driver
and put in Ray's object store. Each actor imports GPTQModel once and takes checkpoints from a queue.

Per checkpoint, `<out>/<name>/` (name = the run dir's name) appears atomically with `merged/`
(adapters only), `gptq/` (GPTQ format: transformers and vLLM load it), `logs/` and a
`manifest.json` (source, config, time_s, bytes_before, bytes_after, error: KL and perplexity
against the float model on held-out rows); `<out>/quantize.csv` sums them up. A checkpoint whose
manifest is complete for the same config, source and data is skipped, so after a kill the same
command redoes only the unfinished ones (their leftover temp dirs are removed). Bad input fails
before any work. One job per `--out` at a time (a lock file says so).

Python API (for the evaluation half and the combined command):

    quantize_many(cfg: PipelineConfig, sources: list[Path], out: Path, workers: int | None = None,
                  method: str | None = None, data: Path | None = None) -> list[dict]

    One record per source, in order: name, source, status (done | skipped | failed), quant_dir,
    merged_dir, time_s, bytes_before, bytes_after, ratio, error {kl_mean, ppl_merged, ppl_quant,
    ppl_delta, error_tokens}, quantize_s, method, bits, group_size (a failed one: name, source,
    status, message). `workers=None`: one actor per GPU, else 1 on CPU. `method=None`: the config's
    quantize.method. Raises ConfigError / FileNotFoundError on bad input before any work.

Memory: GPTQModel quantizes module by module. It loads the float model into host memory (disk
offload of finished modules is on by default), moves one decoder layer at a time to the quantize
device with the calibration activations of that layer, and packs it before the next; a device
needs room for one layer and its activations, not the model.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from refinery.core.config import (
    ConfigError,
    config_hash,
    to_dict,
)
from refinery.core.manifest import (
    atomic_path,
    file_hash,
    read_manifest,
    write_csv,
    write_manifest,
)
from refinery.core.proc import child_env
from refinery.core.rayctl import PrivateRay, default_workers
from refinery.core.weights import check_weights
from refinery.quantize.config import QuantizeConfig

log = logging.getLogger("refinery.quantize.batch")
METHODS = ("gptq", "rtn")
LOCK = ".quantize.lock"


@dataclass(frozen=True)
class Source:
    """One checkpoint to quantize: a LoRA adapter (merged into `base` first) or a float model dir."""

    name: str
    path: Path
    adapter: Path | None
    model: Path | None
    base: str | None = None


def resolve_source(path: str | Path) -> Source:
    """What kind of checkpoint `path` is; ConfigError naming the path and what to pass otherwise."""
    from refinery.quantize.merge import check_adapter

    p = Path(path).resolve()
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint {path}: no such directory; pass a run dir, its distill/ dir, "
                                "an adapter dir or a float HF model dir")
    for adapter in (p / "distill" / "adapter", p / "adapter", p):
        if (adapter / "adapter_config.json").is_file():
            check_adapter(adapter)  # names a half-written adapter
            return Source(_run_name(adapter), p, adapter, None)
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        if json.loads((p / "config.json").read_text()).get("quantization_config"):
            raise ConfigError(f"checkpoint {path} is already quantized (config.json has quantization_config); "
                              "pass the float model or the run dir")
        check_weights(p, f"checkpoint {path}")
        return Source(_run_name(p), p, None, p)
    raise ConfigError(f"checkpoint {path} has no LoRA adapter (distill/adapter/ or adapter/ with "
                      "adapter_config.json) and no float model (config.json + *.safetensors): pass a finished "
                      "run dir (run `refinery distill` first), its distill/ dir, or a merged model dir")


def _run_name(p: Path) -> str:
    """The run's name for `<run>/distill/adapter`, `<run>/quantize/merged` and the like, else the dir's."""
    parts = list(p.parts)
    while len(parts) > 1 and parts[-1] in ("adapter", "merged", "distill", "quantize"):
        parts.pop()
    return parts[-1]


def sweep_sources(sweep: str | Path) -> list[Path]:
    """The run dirs of a sweep whose distill stage is complete (the others are named in a warning)."""
    runs = Path(sweep) / "runs"
    if not runs.is_dir():
        raise ConfigError(f"--sweep {sweep}: no runs/ directory; pass the sweep dir of `refinery sweep` "
                          "(it holds runs/<config>-r<k>/)")
    done, waiting = [], []
    for run in sorted(p for p in runs.iterdir() if p.is_dir()):
        m = read_manifest(run / "distill")
        (done if m and m.get("status") == "complete" else waiting).append(run)
    if waiting:
        log.warning("sweep: %d run(s) without a finished distill stage are left out: %s", len(waiting),
                    ", ".join(p.name for p in waiting))
    if not done:
        raise ConfigError(f"--sweep {sweep}: no run under {runs} has a finished distill stage yet")
    return done


def find_data(sources: list[Source], cfg, data: Path | None, sweep: Path | None) -> Path:
    if data is not None:
        candidates = [Path(data)]
    else:
        candidates = [sweep / "shared" / "generate" / "data.jsonl"] if sweep else []
        candidates += [s.adapter.parent.parent / "generate" / "data.jsonl" for s in sources
                       if s.adapter and s.adapter.parent.name == "distill"]
        candidates.append(cfg.context().stage_dir("generate") / "data.jsonl")
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no calibration data (looked at {', '.join(map(str, candidates[:3]))}): pass "
                            "--data PATH/generate/data.jsonl (the generate stage's output)")


def _fingerprint(src: Source) -> dict:
    """Identity of a source's weights: the adapter's hash, or (big float models) sizes and mtimes."""
    if src.adapter:
        weights = next(p for p in (src.adapter / "adapter_model.safetensors", src.adapter / "adapter_model.bin")
                       if p.is_file())
        return {"adapter": str(src.adapter), "sha256": file_hash(weights), "base": src.base}
    return {"model": str(src.model), **{p.name: [p.stat().st_size, p.stat().st_mtime_ns]
                                        for p in sorted(src.model.glob("*.safetensors"))}}


def _check_shapes(sources: list[Source], qcfg: QuantizeConfig, trust: bool) -> str:
    """Group size against every model's widths, one tokenizer for all; returns the tokenizer's dir."""
    from refinery.quantize.shapes import check_group_size, quantizable_widths

    tok_dirs = {}
    for model in dict.fromkeys(s.base or str(s.model) for s in sources):
        try:
            check_group_size(quantizable_widths(model, trust), qcfg.group_size)
        except ConfigError as e:
            raise ConfigError(f"{e} (model {model})") from None
        tok = Path(model) / "tokenizer.json"
        tok_dirs[model] = file_hash(tok) if tok.is_file() else None
    if len(set(tok_dirs.values())) > 1:
        raise ConfigError("the checkpoints have different tokenizers (tokenizer.json differs between "
                          f"{', '.join(tok_dirs)}): quantize them in separate jobs")
    return next(iter(tok_dirs))


def plan(cfg, paths: list[str | Path], out: str | Path, method: str | None = None, data: Path | None = None,
         sweep: Path | None = None) -> dict:
    """Validate everything and build the jobs (no model is loaded); ConfigError/FileNotFoundError on bad input."""
    from refinery.core.models import resolve_models
    from refinery.quantize.calib import load_rows, split_texts

    method = method or cfg.quantize.method
    if method not in METHODS:
        raise ConfigError(f"--method: got {method!r}, expected one of {', '.join(METHODS)} "
                          "(qat_rtn runs per run: `refinery quantize CONFIG quantize.method=qat_rtn`)")
    qcfg = replace(cfg.quantize, method=method)
    if not paths:
        raise ConfigError("no checkpoints: pass --checkpoints P [P ...] or --sweep SWEEP_DIR")
    sources = [resolve_source(p) for p in paths]
    names = [s.name for s in sources]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        clash = [str(s.path) for s in sources if s.name == dups[0]]
        raise ConfigError(f"two checkpoints would write {Path(out) / dups[0]}: {', '.join(clash)}; "
                          "quantize them in separate jobs (different --out)")
    if any(s.adapter for s in sources):
        student = resolve_models(cfg.models)[1]
        sources = [replace(s, base=student) if s.adapter else s for s in sources]
    trust = cfg.models.trust_remote_code
    tokenizer_dir = _check_shapes(sources, qcfg, trust)
    data = find_data(sources, cfg, data, sweep)
    calib, held_out = split_texts(load_rows(data), qcfg.calibration_samples, qcfg.error_samples, cfg.seed)
    data_hash = file_hash(data)
    jobs = []
    for s in sources:
        identity = {"quantize": to_dict(qcfg), "seed": cfg.seed, "source": _fingerprint(s), "data": data_hash}
        jobs.append({"name": s.name, "source": str(s.path), "adapter": s.adapter and str(s.adapter),
                     "model": s.model and str(s.model), "base": s.base, "trust": trust, "config": to_dict(qcfg),
                     "identity": identity, "hash": config_hash(identity), "held_out": held_out,
                     "out": str(Path(out).resolve() / s.name)})
    return {"jobs": jobs, "calib_texts": calib, "tokenizer": tokenizer_dir, "data": str(data), "qcfg": qcfg}


def _leftovers(out: Path, name: str) -> list[Path]:
    """Temp dirs a killed job left for `name` (atomic_path's `.<name>.XXXXXXXX` and `.<name>.old.<pid>`)."""
    pat = re.compile(rf"^\.{re.escape(name)}\.(old\.\d+|[a-z0-9_]{{8}})$")
    return [p for p in out.iterdir() if pat.match(p.name)] if out.is_dir() else []


def _done_record(manifest: dict) -> dict:
    return {**manifest["metrics"], "status": "skipped"}


def quantize_one(job: dict, calib: list[dict]) -> dict:
    """Merge (adapters), quantize and measure one checkpoint into `job["out"]`, atomically with its manifest."""
    from transformers import AutoTokenizer

    from refinery.core.config import build
    from refinery.quantize.gptq import quantize_merged
    from refinery.quantize.merge import merge_lora

    cfg, final, trust = build(QuantizeConfig, job["config"]), Path(job["out"]), job["trust"]
    started = time.time()
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        if job["adapter"]:
            merged = merge_lora(job["base"], job["adapter"], tmp / "merged", cfg.merge_dtype, trust)
        else:
            merged = Path(job["model"])
        tokenizer = AutoTokenizer.from_pretrained(merged, trust_remote_code=trust)
        stats = quantize_merged(merged, tmp / "gptq", cfg, calib, tokenizer, job["held_out"], trust,
                                source=job["source"])
        error, before, after = stats["error"], stats["merged_bytes"], stats["gptq_bytes"]
        record = {"name": job["name"], "source": job["source"], "status": "done", "method": cfg.method,
                  "bits": cfg.bits, "group_size": cfg.group_size, "quant_dir": str(final / "gptq"),
                  "merged_dir": str(final / "merged") if job["adapter"] else str(merged),
                  "time_s": round(time.time() - started, 2), "quantize_s": stats["quantize_s"],
                  "bytes_before": before, "bytes_after": after, "ratio": round(before / after, 3),
                  "calibration_samples": stats["calibration_samples"], "error": error}
        outputs = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        write_manifest(tmp, stage="quantize-batch", config=job["identity"], cfg_hash=job["hash"],
                       inputs={"source": job["source"]}, metrics=record, started=started, outputs=outputs)
    return record


class QuantWorker:
    """A Ray actor: GPTQModel imported once, the tokenized calibration data held, checkpoints from a queue."""

    def __init__(self, calib: list[dict], threads: int):
        from refinery.quantize.gptq import _gptq_env

        _gptq_env()
        import gptqmodel  # noqa: F401  (seconds of import and kernel registration, once per actor)
        import torch

        torch.set_num_threads(threads)
        self.calib = calib

    def quantize(self, job: dict) -> dict:
        return quantize_one(job, self.calib)


def check_workers(workers: int | None) -> None:
    """More actors than a private Ray has devices would wait forever for a GPU or a core."""
    import torch

    if workers is None:
        return
    gpus, cpus = torch.cuda.device_count(), os.cpu_count() or 1
    limit = None if os.environ.get("RAY_ADDRESS") else (gpus or cpus)
    if workers < 1 or (limit and workers > limit):
        raise ConfigError(f"--workers: got {workers}, expected an integer from 1 to {limit or 'the cluster size'} "
                          f"(one actor per {'GPU' if gpus else 'core'} at most)")


def run_jobs(jobs: list[dict], calib: list[dict], workers: int, on_record=None, max_restarts: int = 2) -> list[dict]:
    """Run `jobs` on `workers` Ray actors, each taking the next job when it finishes one;
    `on_record(record)` is called in this thread as each job ends (done or failed). A worker that dies
    is restarted by Ray and its job run again (core/pool.py), up to `max_restarts` times per worker."""
    import torch

    from refinery.core.pool import ActorPool

    gpus = torch.cuda.device_count()
    threads = max((os.cpu_count() or 1) // workers, 1)  # torch threads per actor
    env = child_env()
    if "GPTQMODEL_CPU_WORKERS" in os.environ:
        env["GPTQMODEL_CPU_WORKERS"] = os.environ["GPTQMODEL_CPU_WORKERS"]
    opts = {"num_cpus": 0 if gpus else threads, "num_gpus": 1 if gpus else 0, "runtime_env": {"env_vars": env}}
    records = {}
    with PrivateRay(prefix="rayq-") as ray:
        pool = ActorPool(QuantWorker, workers, args=(ray.put(calib), threads), options=lambda slot: opts,
                         max_restarts=max_restarts)
        t0 = time.time()
        try:
            for i, ok, value in pool.map("quantize", jobs):
                job = jobs[i]
                if ok:
                    records[job["name"]] = value
                    log.info("quantize: %s done in %.0f s (%d/%d, %.0f s so far)", job["name"], value["time_s"],
                             len(records), len(jobs), time.time() - t0)
                else:  # the job raised, or its worker died more than max_restarts times
                    records[job["name"]] = _failed(job, str(getattr(value, "cause", None) or value))
                if on_record:
                    on_record(records[job["name"]])
        finally:
            pool.close()
    return [records[j["name"]] for j in jobs]


def _failed(job: dict, message: str) -> dict:
    log.error("quantize: %s failed: %s", job["name"], message.strip().splitlines()[-1] if message.strip() else "")
    return {"name": job["name"], "source": job["source"], "status": "failed", "message": message}


def quantize_many(cfg, sources: list[Path], out: Path, workers: int | None = None, method: str | None = None,
                  data: Path | None = None, sweep: Path | None = None, on_record=None) -> list[dict]:
    """Quantize `sources` into `out/<name>/`; see the module docstring for the records returned.
    `on_record(record)` is called for each checkpoint as soon as it is done or found complete."""
    from transformers import AutoTokenizer

    from refinery.quantize.gptq import tokenize_calibration

    check_workers(workers)
    p = plan(cfg, sources, out, method, data, sweep)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / LOCK).open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another `refinery quantize` job is writing to {out}; wait for it or use "
                              "another --out") from None
        records, todo = {}, []
        for job in p["jobs"]:
            m = read_manifest(job["out"])
            if m and m.get("status") == "complete" and m.get("config_hash") == job["hash"]:
                records[job["name"]] = _done_record(m)
                log.info("quantize: %s complete for this config, skipped (%s)", job["name"], job["out"])
                if on_record:
                    on_record(records[job["name"]])
                continue
            for left in _leftovers(out, job["name"]):
                log.info("quantize: removing %s left by an unfinished job", left)
                shutil.rmtree(left, ignore_errors=True)
            todo.append(job)
        if todo:
            tokenizer = AutoTokenizer.from_pretrained(p["tokenizer"], trust_remote_code=cfg.models.trust_remote_code)
            calib = tokenize_calibration(tokenizer, p["calib_texts"], p["qcfg"].calibration_max_len)
            n = min(workers or default_workers(), len(todo))
            log.info("quantize: %d checkpoint(s) to do, %d skipped; %d worker(s); calibration %d texts from %s",
                     len(todo), len(records), n, len(calib), p["data"])
            records.update((r["name"], r) for r in run_jobs(todo, calib, n, on_record))
        result = [records[j["name"]] for j in p["jobs"]]
        write_summary(out, result)
    return result


COLUMNS = ("name", "status", "method", "bits", "group_size", "time_s", "bytes_before", "bytes_after", "ratio",
           "kl_mean", "ppl_merged", "ppl_quant", "quant_dir", "source")


def _row(r: dict) -> dict:
    return {c: (r.get("error") or {}).get(c, r.get(c, "")) for c in COLUMNS}


def write_summary(out: Path, records: list[dict]) -> None:
    """`<out>/quantize.csv` (atomic)."""
    write_csv(out / "quantize.csv", [_row(r) for r in records], COLUMNS)


def format_table(records: list[dict]) -> str:
    lines = [f"{'checkpoint':<28} {'status':<8} {'method':<6} {'time s':>7} {'MB before':>10} {'MB after':>9} "
             f"{'ratio':>6} {'KL':>8} {'ppl float':>10} {'ppl quant':>10}"]
    for r in records:
        if r["status"] == "failed":
            lines.append(f"{r['name']:<28} failed   {r['message'].strip().splitlines()[-1][:90]}")
            continue
        e = r["error"]
        lines.append(f"{r['name']:<28} {r['status']:<8} {r['method']:<6} {r['time_s']:>7.1f} "
                     f"{r['bytes_before'] / 1e6:>10.1f} {r['bytes_after'] / 1e6:>9.1f} {r['ratio']:>6.2f} "
                     f"{e['kl_mean']:>8.4f} {e['ppl_merged']:>10.2f} {e['ppl_quant']:>10.2f}")
    return "\n".join(lines)
