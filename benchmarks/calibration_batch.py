"""GPTQ's calibration batch size: time and quantization error of the same merged student at each size.

    python benchmarks/calibration_batch.py --runs sweep-quickstart/runs/10d482846d1a-r0 ... --sizes 1 8

Each run's `quantize/merged/` (the float student with its LoRA merged) is quantized once per size,
in this one process, with the run's own calibration data (`generate/data.jsonl`, 128 texts; the same
8 held-out rows for the error check at every size), quickstart settings otherwise (W4 g64). The
sizes alternate per run, so a drift in the machine's load hits them alike. Prints one row per
(run, size): GPTQ wall time (load, quantize, pack, save) and KL / perplexity against the float model.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from refinery.quantize import gptq
from refinery.quantize.config import QuantizeConfig

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="run dirs under runs/ with quantize/merged/")
    p.add_argument("--sizes", nargs="+", type=int, default=[1, 8])
    args = p.parse_args()
    rows = []
    for name in args.runs:
        run = ROOT / "runs" / name
        merged = run / "quantize" / "merged"
        if not (merged / "config.json").is_file():
            raise SystemExit(f"{merged} has no merged model: run the quantize stage of {run} first")
        calib, held_out = gptq.split_texts(gptq.load_rows(run / "generate" / "data.jsonl"), 128, 8, 0)
        for size in args.sizes:
            cfg = QuantizeConfig(calibration_batch_size=size)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.time()
                gptq.quantize_model(merged, Path(tmp) / "gptq", cfg, calib)
                wall = time.time() - t0
                err = gptq.measure_error(merged, Path(tmp) / "gptq", held_out, cfg.calibration_max_len)
            rows.append((name, size, wall, err["kl_mean"], err["ppl_merged"], err["ppl_quant"]))
            print(f"[bench] {name} batch {size}: {wall:.1f} s, KL {err['kl_mean']:.5f}", flush=True)
    base = {r[0]: r[2] for r in rows if r[1] == args.sizes[0]}
    print(f"\n| run | batch | GPTQ s | time vs batch {args.sizes[0]} | KL | ppl float -> 4-bit |")
    print("|---|---:|---:|---:|---:|---|")
    for name, size, wall, kl, ppl_f, ppl_q in rows:
        print(f"| {Path(name).name} | {size} | {wall:.1f} | {wall / base[name]:.2f} | {kl:.5f} | {ppl_f:.1f} -> {ppl_q:.1f} |")


if __name__ == "__main__":
    main()
