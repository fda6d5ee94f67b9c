"""`refinery batch`: quantize many checkpoints and score them, in one job on one Ray.

    refinery batch CONFIG --checkpoints P [P ...] --out DIR [--workers N] [--method gptq|rtn] [overrides]
    refinery batch CONFIG --sweep SWEEP_DIR --out DIR [--no-latency] [--no-overlap] [quantize.bits=3 ...]

Quantization is `refinery quantize --checkpoints` (refinery.quantize.batch: calibration tokenized
once, GPTQModel actors) into `<out>/quantize/`; the quantized models are scored by one pool of vLLM
evaluation workers (refinery.evals.batch) into `<out>/evaluate/`, each as soon as it is quantized
while the next ones quantize (`--no-overlap`: one half after the other). Checkpoints of one
architecture share one engine (weights swapped in, see refinery.evals.pool). `<out>/batch.csv`
joins both: bytes before/after, quantization error, accuracy, latency per checkpoint. Both halves
skip what is already complete, so after a kill the same command does only what is left.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from refinery.core.config import ConfigError
from refinery.core.manifest import fmt_cell, write_csv

COLUMNS = ("name", "bits", "group_size", "bytes_before", "bytes_after", "kl_mean", "quantize_s", "mean_acc",
           "mean_acc_stderr", "decode_ms", "status")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline YAML, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. quantize.bits=3")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", nargs="+", metavar="P", help="run dirs, distill dirs, adapter or float model dirs")
    src.add_argument("--sweep", type=Path, help="a sweep dir: every run with a finished distill stage")
    p.add_argument("--out", type=Path, required=True, help="output dir: quantize/, evaluate/, batch.csv")
    p.add_argument("--workers", type=int, default=None, help="Ray actors per half (default: one per GPU; 1 on CPU)")
    p.add_argument("--method", choices=("gptq", "rtn"), default=None, help="quantization method (default: the config's)")
    p.add_argument("--data", type=Path, default=None, help="generate/data.jsonl for calibration and error rows")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=None,
                   help="measure latency and memory (default: evaluate.latency.enabled)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="score each checkpoint while the next ones quantize (default: on)")


def _rows(records: list[dict], results: dict) -> list[dict]:
    rows = []
    for r in records:
        e, err = results.get(r["name"]) or {}, r.get("error") or {}
        lat = e.get("latency") or {}
        rows.append({"name": r["name"], "bits": r.get("bits", ""), "group_size": r.get("group_size", ""),
                     "bytes_before": r.get("bytes_before", ""), "bytes_after": r.get("bytes_after", ""),
                     "kl_mean": err.get("kl_mean", ""), "quantize_s": r.get("time_s", ""),
                     "mean_acc": e.get("mean_acc", ""), "mean_acc_stderr": e.get("mean_acc_stderr", ""),
                     "decode_ms": lat.get("decode_ms_per_token", ""),
                     "status": r["status"] if r["status"] == "failed" else "done"})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def run_batch(cfg, sources: list, out: Path, workers: int | None = None, method: str | None = None,
              data: Path | None = None, sweep: Path | None = None, latency: bool | None = None,
              overlap: bool = True) -> list[dict]:
    """Quantize `sources` and score every quantized model; returns the rows of `<out>/batch.csv`.

    overlap: each checkpoint is scored (on a driver thread, by the pool's workers) while the next
    ones quantize; else the halves run one after the other. See `plan_devices` for who gets what.
    """
    from refinery.core.rayctl import PrivateRay
    from refinery.distill.engines import refuse_unservable_bits
    from refinery.evals.batch import evaluate_many
    from refinery.quantize.batch import quantize_many

    # the vLLM workers would refuse every model, after the quantize half's work
    refuse_unservable_bits(cfg.quantize.bits, "`refinery batch` scores with vLLM workers")
    latency = cfg.evaluate.latency.enabled if latency is None else latency
    log = logging.getLogger("refinery.batch")
    overlap, q_workers, e_workers, extra_cpus = plan_devices(workers, overlap)
    t0 = time.time()
    with PrivateRay(num_cpus=(os.cpu_count() or 1) + extra_cpus, prefix="rayb-"):  # one Ray for both halves
        if overlap:
            records, results = _overlapped(cfg, sources, out, q_workers, e_workers, method, data, sweep, latency)
            log.info("batch: quantize and evaluate overlapped, %.0f s, %d checkpoint(s)", time.time() - t0,
                     len(records))
        else:
            records = quantize_many(cfg, sources, out / "quantize", q_workers, method, data, sweep)
            t1 = time.time()
            models = {r["name"]: r["quant_dir"] for r in records if r["status"] != "failed"}
            results = evaluate_many(cfg, models, out / "evaluate", e_workers, latency) if models else {}
            log.info("batch: quantize %.0f s, evaluate %.0f s, %d checkpoint(s)", t1 - t0, time.time() - t1,
                     len(records))
    rows = _rows(records, results)
    write_csv(out / "batch.csv", rows, COLUMNS)
    return rows


def plan_devices(workers: int | None, overlap: bool) -> tuple[bool, int | None, int | None, int]:
    """(overlap, quantize actors, evaluation actors, extra logical CPUs for the private Ray).

    CPU: both halves use all cores (torch threads / vLLM's OpenMP threads); the evaluation actors
    get logical CPUs of their own so Ray places them beside the quantize actors. GPU (the only
    GPU-specific branch; not run here): overlapping halves take disjoint devices, half each (the
    evaluation half gets `workers` if given); with one GPU the halves run one after the other.
    """
    import torch

    gpus = torch.cuda.device_count()
    if not overlap:
        return False, workers, workers, 0
    if gpus:
        if gpus < 2:
            return False, workers, workers, 0
        e = min(workers or gpus // 2, gpus - 1)
        return True, gpus - e, e, 0
    e = workers or 1
    return True, workers, e, e


def _overlapped(cfg, sources, out: Path, q_workers, e_workers, method, data, sweep, latency):
    """Quantize on the Ray actors; a driver thread scores each finished checkpoint with the pool."""
    import queue
    import threading

    from refinery.evals.batch import evaluate_one, make_pool, scored, task_specs
    from refinery.evals.batch import write_csv as write_eval_csv
    from refinery.quantize.batch import quantize_many

    log = logging.getLogger("refinery.batch")
    ev_out = out / "evaluate"
    specs, tm = task_specs(cfg, ev_out / "tasks")
    pool = make_pool(cfg, e_workers)  # engines start while the first checkpoint quantizes
    todo: queue.Queue = queue.Queue()
    results: dict = {}
    errors: list[BaseException] = []

    def score():
        while (item := todo.get()) is not None:
            if errors:
                continue
            name, path = item
            try:
                prev = scored(cfg, ev_out, name, path, specs, latency)
                if not prev:
                    log.info("evaluate %s: %s on %d tasks (%d workers)", name, path, len(specs), pool.workers)
                results[name] = prev or evaluate_one(pool, name, path, cfg, specs, tm, ev_out, latency)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)

    thread = threading.Thread(target=score, name="batch-evaluate", daemon=True)
    thread.start()
    try:
        records = quantize_many(cfg, sources, out / "quantize", q_workers, method, data, sweep,
                                on_record=lambda r: r["status"] != "failed" and todo.put((r["name"], r["quant_dir"])))
    finally:
        todo.put(None)
        thread.join()
        pool.close()
    if errors:
        raise errors[0]
    results = {r["name"]: results[r["name"]] for r in records if r["name"] in results}
    if results:
        write_eval_csv(ev_out / "evaluate.csv", results)
    return records, results


def run(args) -> int:
    from refinery.launch.many_cli import split_overrides
    from refinery.pipeline.config import load
    from refinery.quantize.batch import sweep_sources

    try:
        cfg = load(args.config, split_overrides(args))
        sources = sweep_sources(args.sweep) if args.sweep else args.checkpoints
        rows = run_batch(cfg, sources, args.out, args.workers, args.method, args.data, args.sweep, args.latency,
                         args.overlap)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"refinery batch: {e}", file=sys.stderr)
        return 2
    print("\n" + table(rows))
    print(f"\noutputs: {args.out}/quantize/<name>/gptq, {args.out}/evaluate/<name>/results.json, {args.out}/batch.csv")
    return 1 if any(r["status"] == "failed" for r in rows) else 0

