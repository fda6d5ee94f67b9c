"""The `evaluate` stage: accuracy (lm-eval), size and latency of every model of the run.

    refinery evaluate configs/quickstart.yaml

Models: `teacher`, `student_base` (the undistilled student), `student` (LoRA merged into fp
weights, `<run_dir>/quantize/merged/`) and `student_quant` (GPTQ, `<run_dir>/quantize/gptq/`).
Each is loaded once, scored by lm-eval's HF backend on every task in one call, timed, then freed.
Writes `<run_dir>/evaluate/results.json`, lm-eval's raw results per model under `lmeval/`, and
the local task files under `tasks/`.
"""
from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

from refinery.core.manifest import dir_bytes, write_json, write_jsonl
from refinery.core.stage import Context, Result
from refinery.evals.config import EvaluateConfig
from refinery.evals.lmeval_tasks import build_tasks, check_loadable, task_manager
from refinery.evals.loading import load_model, model_paths, param_count
from refinery.evals.scores import mean_accuracy, sample_rows, score_model, task_scores

log = logging.getLogger("refinery.evaluate")


def _evaluate_one(name: str, path: str, ctx: Context, cfg: EvaluateConfig, specs, tm, out: Path) -> dict:
    from refinery.evals.latency import measure_latency

    t0 = time.time()
    model, tok = load_model(path, dtype=cfg.dtype, trust_remote_code=ctx.models.trust_remote_code)
    load_s = time.time() - t0
    # local tasks are already cut to eval_limit items; the limit matters for lm-eval's own tasks
    raw = score_model(model, tok, specs, tm, cfg.batch_size, ctx.seed, cfg.shared_context, ctx.tasks.eval_limit)
    eval_s = time.time() - t0 - load_s
    samples = raw.pop("samples", {})
    write_json(out / "lmeval" / f"{name}.json", raw)
    write_jsonl(out / "lmeval" / f"{name}_samples.jsonl", sample_rows(samples, specs))
    tasks = task_scores(raw, specs)
    mean, mean_se = mean_accuracy(tasks)
    entry = {"path": str(Path(path).resolve()) if Path(path).exists() else path,
             "bytes": dir_bytes(path) if Path(path).exists() else None,
             "params": param_count(model), "quantized": bool(getattr(model.config, "quantization_config", None)),
             "tasks": tasks, "mean_acc": mean, "mean_acc_stderr": mean_se,
             "load_s": round(load_s, 2), "eval_s": round(eval_s, 2), "latency": None}
    if cfg.latency.enabled:
        lat = cfg.latency
        entry["latency"] = measure_latency(model, tok, lat.prompt_tokens, lat.new_tokens, lat.repeats,
                                           threads=cfg.threads)
    del model, tok
    gc.collect()
    return entry


def run(ctx: Context, cfg: EvaluateConfig) -> Result:
    """Score every model in `cfg.models` on the run's tasks; write results.json."""
    out = ctx.stage_dir("evaluate")
    paths = model_paths(ctx, cfg.models)  # fail on missing inputs before any slow work
    specs = build_tasks(ctx.tasks, out / "tasks")
    tm = task_manager(specs, out / "tasks", ctx.tasks.include_path)
    check_loadable(specs, tm)
    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or old_threads)  # fixed for scoring and latency alike
    try:
        if cfg.backend == "vllm":  # the evaluation workers (Ray actors, one vLLM engine each)
            from refinery.evals.batch import evaluate_run_models

            models = evaluate_run_models(paths, ctx, cfg, specs, tm, out)
        else:
            models = _evaluate_all(paths, ctx, cfg, specs, tm, out)
    finally:
        torch.set_num_threads(old_threads)
    results = {"models": models, "tasks": [s.name for s in specs], "eval_limit": ctx.tasks.eval_limit,
               "eval_fraction": ctx.tasks.eval_fraction, "threads": cfg.threads or old_threads}
    write_json(out / "results.json", results)
    log.info("evaluate: wrote %s", out / "results.json")
    metrics = {f"{name}.mean_acc": round(m["mean_acc"], 4) for name, m in models.items()}
    outputs = ["results.json", "tasks/"] + [f"lmeval/{n}.json" for n in models] \
        + [f"lmeval/{n}_samples.jsonl" for n in models]
    return Result(metrics=metrics, outputs=outputs)


def _evaluate_all(paths: dict[str, str], ctx: Context, cfg: EvaluateConfig, specs, tm, out: Path) -> dict:
    models = {}
    for i, (name, path) in enumerate(paths.items(), 1):
        log.info("evaluate [%d/%d] %s: %s on %d tasks", i, len(paths), name, path, len(specs))
        t = time.time()
        models[name] = _evaluate_one(name, path, ctx, cfg, specs, tm, out)
        lat = models[name]["latency"] or {}
        log.info("evaluate [%d/%d] %s: mean acc %.4f +- %.4f, %.1f s%s", i, len(paths), name,
                 models[name]["mean_acc"], models[name]["mean_acc_stderr"], time.time() - t,
                 f", decode {lat['decode_ms_per_token']:.1f} ms/token" if lat else "")
    return models
