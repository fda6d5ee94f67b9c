"""Score many checkpoints with one pool of vLLM evaluation workers.

    refinery evaluate configs/quickstart.yaml --models runs/a/quantize/gptq runs/b/quantize/merged teacher \\
        --out runs/eval-many [--workers N] [--latency | --no-latency] [dotted.key=value ...]

Each model (an HF float dir, a GPTQ dir, or `teacher` / `student_base` / `student` /
`student_quant` of the config's run) is scored by lm-eval on the config's task set
(`evaluate.task_set`: the run's offline tasks, or the method's eight standard lm-eval tasks)
through the `refinery-vllm-pool` model, then timed by the same workers (decode ms/token median
and p90, prefill tokens/s at `evaluate.latency.batch_sizes`, peak RSS, weight bytes).

Writes `<out>/<name>/results.json` (last, atomically; a model whose results.json matches the
same inputs and settings is skipped on rerun), lm-eval's raw output and per-item predictions
beside it, `<out>/evaluate.csv` and a printed table. Python: `evaluate_many(cfg, {name: path},
out, workers, latency)`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from refinery.core.manifest import dir_bytes, write_json, write_jsonl
from refinery.core.manifest import write_csv as write_csv_rows
from refinery.evals.lmeval_tasks import (
    TaskSpec,
    build_tasks,
    check_loadable,
    task_manager,
)
from refinery.evals.loading import is_quantized, model_paths, resolve_dtype
from refinery.evals.scores import mean_accuracy, sample_rows, task_scores

log = logging.getLogger("refinery.evals.batch")

RUN_MODELS = ("teacher", "student_base", "student", "student_quant")


def resolve_models(cfg, specs: list[str]) -> dict[str, str]:
    """{name: path} for model args: run model names via the config, else HF dirs (name = the dir
    name, parent names prepended until unique). A missing or non-model path fails naming it."""
    named = [s for s in specs if s in RUN_MODELS]
    run_paths = model_paths(cfg.context(), named) if named else {}
    dirs = [Path(s) for s in specs if s not in RUN_MODELS]
    for d in dirs:
        if not (d / "config.json").is_file():
            what = "does not exist" if not d.exists() else "has no config.json"
            raise FileNotFoundError(f"evaluate --models: {str(d)!r} {what}; pass an HF model dir (float or GPTQ, "
                                    f"with config.json) or one of {', '.join(RUN_MODELS)}")
    for depth in range(1, 9):  # shortest unique names from the paths' last components
        names = ["-".join(d.resolve().parts[-depth:]) for d in dirs]
        if len(set(names) | set(named)) == len(names) + len(named):
            break
    by_dir = dict(zip(map(str, dirs), names))
    return {(s if s in RUN_MODELS else by_dir[s]): (run_paths[s] if s in RUN_MODELS else str(Path(s).resolve()))
            for s in specs}


def task_specs(cfg, tasks_dir: Path) -> tuple[list[TaskSpec], object]:
    """The task set (offline run tasks or the standard eight) and an lm-eval TaskManager; loads each once."""
    from refinery.core.tasks import STANDARD

    if cfg.evaluate.task_set == "standard":
        specs = [TaskSpec(n, n, offline=False, n=None) for n in STANDARD]
    else:
        specs = build_tasks(cfg.tasks, tasks_dir)
    tm = task_manager(specs, tasks_dir, cfg.tasks.include_path)
    check_loadable(specs, tm)
    return specs, tm


def _key(cfg, path: str, specs: list[TaskSpec], latency: bool) -> str:
    """What a stored result depends on: the model, the tasks and items, and the measuring settings."""
    from refinery.core.config import to_dict
    from refinery.core.tasks import task_digests

    data = task_digests(cfg.tasks) if cfg.evaluate.task_set != "standard" else {}
    parts = {"path": path, "model_bytes": dir_bytes(path), "tasks": [s.lm_eval_name for s in specs],
             **({"data": data, "custom": to_dict(cfg.tasks.custom)} if data else {}),
             "eval_limit": cfg.tasks.eval_limit, "eval_fraction": cfg.tasks.eval_fraction, "seed": cfg.seed,
             "dtype": cfg.evaluate.dtype, "latency": to_dict(cfg.evaluate.latency) if latency else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def score_with_pool(pool, path: str, specs: list[TaskSpec], tm, seed: int, limit: int | None,
                    chunk_size: int = 64) -> dict:
    """lm-eval's raw results (with samples) for the model at `path`, scored by the pool's workers."""
    import lm_eval

    from refinery.evals.vllm_lm import PoolLM

    lm = PoolLM(pool, model_path=path, chunk_size=chunk_size)
    # offline tasks are already cut to eval_limit items; the limit matters for standard tasks
    return lm_eval.simple_evaluate(model=lm, tasks=[s.lm_eval_name for s in specs], task_manager=tm,
                                   num_fewshot=0, log_samples=True, limit=limit, random_seed=seed,
                                   numpy_random_seed=seed, torch_random_seed=seed)


def score_and_time(pool, path: str, specs, tm, seed: int, limit: int | None, lat) -> tuple[dict, dict, dict]:
    """One model scored on the tasks by the pool's workers, then timed (when `lat`, a latency config, is
    given): the one way a model is evaluated with vLLM, for the stage (`backend: vllm`) and for many
    checkpoints. Returns (entry fields, lm-eval's raw results, its samples); `latency` holds the
    workers' measurement with its `memory` and `load_s`, `pool` the pool's stats of the scoring."""
    t0 = time.time()
    raw = score_with_pool(pool, path, specs, tm, seed, limit)
    eval_s = time.time() - t0
    samples = raw.pop("samples", {})
    tasks = task_scores(raw, specs)
    mean, mean_se = mean_accuracy(tasks)
    entry = {"path": path, "bytes": dir_bytes(path) if Path(path).exists() else None, "quantized": is_quantized(path),
             "backend": "vllm", "tasks": tasks, "mean_acc": mean, "mean_acc_stderr": mean_se,
             "eval_s": round(eval_s, 2), "pool": dict(pool.stats), "latency": None}  # the scoring's pool stats
    if lat is not None:
        entry["latency"] = pool.measure(path, prompt_tokens=lat.prompt_tokens, new_tokens=lat.new_tokens,
                                        repeats=lat.repeats, batch_sizes=list(lat.batch_sizes))
    return entry, raw, samples


def evaluate_one(pool, name: str, path: str, cfg, specs, tm, out: Path, latency: bool) -> dict:
    """Score and time one model; write `<out>/<name>/` (results.json last). Returns the entry."""
    core, raw, samples = score_and_time(pool, path, specs, tm, cfg.seed, cfg.tasks.eval_limit,
                                        cfg.evaluate.latency if latency else None)
    m, stats = core.pop("latency"), core.pop("pool")
    entry = {"name": name, **core, "workers": pool.workers, "pool": stats,
             "latency": None, "memory": None, "key": _key(cfg, path, specs, latency)}
    if m:
        entry["memory"] = m.pop("memory")
        entry["latency"] = m
    info = pool.info()  # the pool's engines so far: new engines started vs checkpoints swapped into one
    entry["engine_loads"], entry["engine_swaps"] = sum(w["loads"] for w in info), sum(w["swaps"] for w in info)
    d = out / name
    write_json(d / "lmeval.json", raw)
    write_jsonl(d / "samples.jsonl", sample_rows(samples, specs))
    write_json(d / "results.json", entry)  # last: its presence means the model is done
    return entry


def evaluate_run_models(paths: dict[str, str], ctx, cfg, specs, tm, out: Path) -> dict:
    """The evaluate stage's `backend: vllm` path: each run model scored and timed by one pool.

    Entries have the HF path's fields (`latency.memory_bytes` = the engine's weight bytes) plus
    the workers' `memory` and per-batch latency; lm-eval's output goes to `out/lmeval/` as before.
    """
    import torch

    from refinery.evals.pool import EvalPool

    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {}
    with EvalPool(workers=cfg.workers, dtype=resolve_dtype(cfg.dtype, device),
                  trust_remote_code=ctx.models.trust_remote_code,
                  max_num_seqs=max([32, *cfg.latency.batch_sizes])) as pool:
        for name, path in paths.items():
            core, raw, samples = score_and_time(pool, path, specs, tm, ctx.seed, ctx.tasks.eval_limit,
                                                cfg.latency if cfg.latency.enabled else None)
            write_json(out / "lmeval" / f"{name}.json", raw)
            write_jsonl(out / "lmeval" / f"{name}_samples.jsonl", sample_rows(samples, specs))
            m, _ = core.pop("latency"), core.pop("pool")
            entry = {**core, "params": None, "load_s": None, "latency": None, "memory": None}
            if m:
                entry["memory"] = m.pop("memory")
                entry["load_s"] = m.pop("load_s", None)
                entry["latency"] = {**m, "memory_bytes": entry["memory"]["weight_bytes"] or 0, "threads": None}
            models[name] = entry
            log.info("evaluate (vllm) %s: mean acc %.4f +- %.4f", name, entry["mean_acc"], entry["mean_acc_stderr"])
    return models


def _done(out: Path, name: str, key: str) -> dict | None:
    f = out / name / "results.json"
    if f.is_file():
        entry = json.loads(f.read_text())
        if entry.get("key") == key:
            return entry
    return None


def scored(cfg, out: Path, name: str, path: str, specs, latency: bool) -> dict | None:
    """The stored entry of `name` if it was scored with the same model, tasks and settings."""
    prev = _done(out, name, _key(cfg, path, specs, latency))
    if prev:
        log.info("evaluate: %s already scored (%s), skipped", name, out / name / "results.json")
    return prev


def evaluate_many(cfg, models: dict[str, str], out: Path, workers: int | None, latency: bool,
                  pool=None) -> dict:
    """Score every {name: path} in `models` with one pool; {name: entry}. Finished models are skipped.

    `cfg` is a full PipelineConfig (tasks, seed, evaluate). Writes `<out>/<name>/results.json`
    per model and `<out>/evaluate.csv`. `pool`: an `EvalPool` to use (and leave running);
    by default one is started for the models still to score and stopped at the end.
    """
    out = Path(out)
    for name, path in models.items():  # every input checked before any slow work
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"evaluate: model {name!r} at {path!r} is not an HF model dir (no config.json): "
                                    "quantize or train it first, or fix the path")
    specs, tm = task_specs(cfg, out / "tasks")
    results, todo = {}, {}
    for name, path in models.items():
        prev = scored(cfg, out, name, path, specs, latency)
        if prev:
            results[name] = prev
        else:
            todo[name] = path
    if todo:
        own = pool is None
        pool = pool or make_pool(cfg, workers)
        try:
            for i, (name, path) in enumerate(todo.items(), 1):
                log.info("evaluate [%d/%d] %s: %s on %d tasks (%d workers)", i, len(todo), name, path, len(specs),
                         pool.workers)
                results[name] = evaluate_one(pool, name, path, cfg, specs, tm, out, latency)
        finally:
            if own:
                pool.close()
    results = {name: results[name] for name in models}
    write_csv(out / "evaluate.csv", results)
    return results


def make_pool(cfg, workers: int | None = None):
    """An EvalPool set up from the config: evaluate.workers/dtype, batch room for the latency sizes."""
    import torch

    from refinery.evals.pool import EvalPool

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return EvalPool(workers=workers or cfg.evaluate.workers, dtype=resolve_dtype(cfg.evaluate.dtype, device),
                    trust_remote_code=cfg.models.trust_remote_code,
                    max_num_seqs=max([32, *cfg.evaluate.latency.batch_sizes]))


def _row(name: str, e: dict) -> dict:
    lat, mem = e.get("latency") or {}, e.get("memory") or {}
    row = {"model": name, "path": e["path"], "quantized": e["quantized"], "bytes": e["bytes"],
           "mean_acc": round(e["mean_acc"], 4), "mean_acc_stderr": round(e["mean_acc_stderr"], 4)}
    for task, t in e["tasks"].items():
        row[f"{task}.acc"] = None if t.get("acc") is None else round(t["acc"], 4)
        row[f"{task}.acc_stderr"] = None if t.get("acc_stderr") is None else round(t["acc_stderr"], 4)
    row["decode_ms_median"] = lat.get("decode_ms_per_token")
    row["decode_ms_p90"] = lat.get("decode_ms_per_token_p90")
    for b, v in (lat.get("batch") or {}).items():
        row[f"prefill_tok_s.b{b}"] = v["prefill_tokens_per_s"]
    row["peak_rss_bytes"] = mem.get("peak_rss_bytes")
    row["weight_bytes"] = mem.get("weight_bytes")
    return row


def write_csv(path: Path, results: dict) -> None:
    """One row per model: accuracy, per task, latency, memory (atomically)."""
    write_csv_rows(path, [_row(n, e) for n, e in results.items()])


def table(results: dict) -> str:
    """A markdown table: accuracy mean ± stderr and per task, decode, prefill, memory."""
    tasks = list(dict.fromkeys(t for e in results.values() for t in e["tasks"]))
    sizes = list(dict.fromkeys(b for e in results.values() for b in ((e.get("latency") or {}).get("batch") or {})))
    head = ["model", "mean acc"] + tasks + ["decode ms/tok (p50/p90)"] \
        + [f"prefill tok/s b{b}" for b in sizes] + ["peak RSS MB", "weights MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in results.items():
        lat, mem = e.get("latency") or {}, e.get("memory") or {}
        cells = [name, f"{e['mean_acc']:.3f} ± {e['mean_acc_stderr']:.3f}"]
        cells += [f"{e['tasks'][t]['acc']:.3f}" if t in e["tasks"] else "-" for t in tasks]
        cells.append(f"{lat['decode_ms_per_token']:.1f} / {lat['decode_ms_per_token_p90']:.1f}" if lat else "-")
        cells += [f"{lat['batch'][b]['prefill_tokens_per_s']:.0f}" if b in lat.get("batch", {}) else "-"
                  for b in sizes]
        cells += [f"{mem['peak_rss_bytes'] / 1e6:.0f}" if mem.get("peak_rss_bytes") else "-",
                  f"{mem['weight_bytes'] / 1e6:.1f}" if mem.get("weight_bytes") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
