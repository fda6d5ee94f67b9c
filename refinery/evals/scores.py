"""lm-eval's HF backend on loaded models, and its raw output as our scores: per task, the macro
mean, and one row per item (the rows every paired comparison of ours reads)."""
from __future__ import annotations

import math

from refinery.evals.lmeval_tasks import TaskSpec


def task_scores(raw: dict, specs: list[TaskSpec]) -> dict[str, dict]:
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


def sample_rows(samples: dict, specs: list[TaskSpec]) -> list[dict]:
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
