"""Paired per-item comparisons of the Qwen2.5-Coder 1.5B -> 0.5B chain (issue 12), from the per-item
predictions committed under benchmarks/results/qwen-chain/ (copied from the vLLM evaluation workers'
eval/<model>/samples.jsonl of `REFINERY_PAPER=qwen python benchmarks/paper/run.py ...`).

    python benchmarks/qwen_pairs.py [--dir benchmarks/results/qwen-chain]

Each contrast is A - B on the same held-out items; a name list is averaged per item (e.g. the three
GPTQ-only calibration seeds). "task mean" is the mean of the per-task differences (every task counts
once, as the report's mean accuracy), its se sqrt(sum se_t^2) / T; "items" pools all items.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "paper"))
from common import mean_se  # noqa: E402  (benchmarks/paper/common.py)

SEEDS = (0, 1, 2)
GPTQ_ONLY = [f"gptq-only-s{s}" for s in SEEDS]  # calibration draws


def arm(name: str, kind: str) -> list[str]:
    """The arm's models over the training seeds, e.g. arm("muon", "w4") -> muon-s0-w4, muon-s1-w4, ..."""
    return [f"{name}-s{s}-{kind}" for s in SEEDS]


CONTRASTS = [
    ("pipeline 4-bit (muon) vs GPTQ-only 4-bit", arm("muon", "w4"), GPTQ_ONLY),
    ("pipeline 4-bit (adamw) vs GPTQ-only 4-bit", arm("adamw", "w4"), GPTQ_ONLY),
    ("pipeline 4-bit (muon) vs fp student (undistilled)", arm("muon", "w4"), ["student_base"]),
    ("pipeline fp (muon, merged) vs fp student", arm("muon", "fp"), ["student_base"]),
    ("pipeline fp (adamw, merged) vs fp student", arm("adamw", "fp"), ["student_base"]),
    ("muon: 4-bit vs its fp (loss to 4-bit)", arm("muon", "w4"), arm("muon", "fp")),
    ("adamw: 4-bit vs its fp (loss to 4-bit)", arm("adamw", "w4"), arm("adamw", "fp")),
    ("muon 4-bit vs adamw 4-bit", arm("muon", "w4"), arm("adamw", "w4")),
    ("GPTQ-only 4-bit vs fp student", GPTQ_ONLY, ["student_base"]),
    ("teacher vs pipeline 4-bit (muon)", ["teacher"], arm("muon", "w4")),
]
"""Each side is averaged per item over its list (seeds); the se is over items, so it leaves out
the seed-to-seed spread, which `seeds` prints per model."""


def load(d: Path, name: str) -> dict:
    rows = map(json.loads, (d / name / "samples.jsonl").read_text().splitlines())
    return {(r["task"], r["item_id"]): float(r["acc"]) for r in rows}


def contrast(d: Path, a: list[str], b: list[str]) -> dict:
    sa, sb = [load(d, n) for n in a], [load(d, n) for n in b]
    keys = sorted(set.intersection(*(set(s) for s in sa + sb)))
    diff = {k: sum(s[k] for s in sa) / len(sa) - sum(s[k] for s in sb) / len(sb) for k in keys}
    tasks = sorted({t for t, _ in keys})
    out = {t: mean_se([v for (tt, _), v in diff.items() if tt == t]) for t in tasks}
    out["task mean"] = (sum(out[t][0] for t in tasks) / len(tasks),
                        math.sqrt(sum(out[t][1] ** 2 for t in tasks)) / len(tasks))
    out["items"] = mean_se(list(diff.values()))
    out["n"] = len(keys)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("benchmarks/results/qwen-chain"))
    d = p.parse_args().dir
    have = {p.name for p in d.iterdir() if (p / "samples.jsonl").is_file()}
    rows = [(label, contrast(d, a, b)) for label, a, b in CONTRASTS if set(a + b) <= have]
    tasks = [k for k in rows[0][1] if k not in ("task mean", "items", "n")]
    print("| A - B | " + " | ".join(tasks) + " | **task mean** (z) | items (n) |")
    print("|---" * (len(tasks) + 3) + "|")
    for label, r in rows:
        cells = [f"{r[t][0]:+.3f} ({r[t][1]:.3f})" for t in tasks]
        m, se = r["task mean"]
        z = m / se if se else float("nan")
        cells += [f"**{m:+.3f} ({se:.3f})** z {z:+.1f}", f"{r['items'][0]:+.3f} ({r['items'][1]:.3f}) n={r['n']}"]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
