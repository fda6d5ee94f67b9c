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
import math
import time
from pathlib import Path

from refinery.core.manifest import dir_bytes, write_json, write_jsonl
from refinery.core.models import resolve_models
from refinery.core.stage import Context, Result
from refinery.evals.config import EvaluateConfig
from refinery.evals.lmeval_tasks import TaskSpec, build_tasks, check_loadable, task_manager
from refinery.evals.loading import load_model, param_count

log = logging.getLogger("refinery.evaluate")


def model_paths(ctx: Context, names: list[str]) -> dict[str, str]:
    """Where each requested model lives; a missing input names the stage that makes it."""
    quant_dir = ctx.stage_dir("quantize")
    paths = {"student": str(quant_dir / "merged"), "student_quant": str(quant_dir / "gptq")}
    for name in ("student", "student_quant"):
        if name in names and not (Path(paths[name]) / "config.json").is_file():
            raise FileNotFoundError(
                f"evaluate: model {name!r} needs {paths[name]}/ (an HF model dir with config.json), "
                "which is missing: run the quantize stage first (`refinery quantize CONFIG`), or drop "
                f"{name!r} from evaluate.models")
    if "teacher" in names or "student_base" in names:
        paths["teacher"], paths["student_base"] = resolve_models(ctx.models)
    return {name: paths[name] for name in names}


def _task_scores(raw: dict, specs: list[TaskSpec]) -> dict[str, dict]:
    """{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n, metric}} from lm-eval's results dict;
    `acc` is the task's accuracy metric (exact match for generative tasks, `metric` says which)."""
    out = {}
    for spec in specs:
        res = raw["results"][spec.lm_eval_name]
        n = raw.get("n-samples", {}).get(spec.lm_eval_name, {}).get("effective", spec.n)

        def num(key):  # "acc,none"; a generative task's filter names its results ("exact_match,extract")
            v = next((v for k, v in res.items() if k.split(",")[0] == key), None)
            return float(v) if isinstance(v, (int, float)) else None  # lm-eval writes "N/A" sometimes

        metric = spec.metric or ("acc" if num("acc") is not None else "exact_match")
        out[spec.name] = {"acc": num(metric), "acc_stderr": num(f"{metric}_stderr"),
                          "acc_norm": num("acc_norm"), "acc_norm_stderr": num("acc_norm_stderr"), "n": n,
                          "metric": metric}
    return out


def mean_accuracy(tasks: dict[str, dict]) -> tuple[float, float]:
    """Macro mean of per-task acc, and its stderr (per-task stderrs combined as independent)."""
    accs = [t["acc"] for t in tasks.values()]
    ses = [t["acc_stderr"] or 0.0 for t in tasks.values()]
    k = len(accs)
    return sum(accs) / k, math.sqrt(sum(s * s for s in ses)) / k


def _sample_rows(samples: dict, specs: list[TaskSpec]) -> list[dict]:
    """Per-item predictions, compact: which choice won and whether it was right."""
    rows = []
    by_lm = {s.lm_eval_name: s for s in specs}
    for lm_name, items in (samples or {}).items():
        spec = by_lm.get(lm_name)
        for s in items:
            row = {"task": spec.name if spec else lm_name, "doc_id": s.get("doc_id"),
                   # lm-eval's own tasks may have no `id`: the doc's index identifies it (same order every run)
                   "item_id": (s.get("doc") or {}).get("id") or f"doc-{s.get('doc_id')}", "target": s.get("target")}
            if "exact_match" in s:  # generative: the extracted answer
                resp = s.get("filtered_resps") or [""]
                row.update(acc=s["exact_match"], response=resp[0] if isinstance(resp, list) else resp)
            else:
                lls = [float(r[0]) for r in s.get("filtered_resps", [])]
                row.update(acc=s.get("acc"), acc_norm=s.get("acc_norm"), loglikelihoods=lls)
            rows.append(row)
    return rows


def score_model(model, tokenizer, specs: list[TaskSpec], tm, batch_size: int, seed: int,
                shared_context: bool = True, limit: int | None = None) -> dict:
    """Run lm-eval (HF backend) on all tasks with an already loaded model; lm-eval's raw output."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from refinery.evals.shared_lm import SharedContextLM

    lm = (SharedContextLM if shared_context else HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=[s.lm_eval_name for s in specs], task_manager=tm,
                                   num_fewshot=0, log_samples=True, limit=limit, random_seed=seed,
                                   numpy_random_seed=seed, torch_random_seed=seed)


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
    write_jsonl(out / "lmeval" / f"{name}_samples.jsonl", _sample_rows(samples, specs))
    tasks = _task_scores(raw, specs)
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
