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


FIDELITY = [c for c in CONTRASTS if "teacher" not in c[0] and "GPTQ-only 4-bit vs fp" not in c[0]]
"""The same contrasts on agreement with the teacher's choice (fidelity), where the teacher is not a side."""


def _rows(d: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (d / name / "samples.jsonl").read_text().splitlines()]


def _choice(r: dict) -> int:
    ll = r["loglikelihoods"]
    return max(range(len(ll)), key=ll.__getitem__)


def load(d: Path, name: str, what: str = "acc") -> dict:
    """{(task, item_id): value}: `acc`, or `agree` (1 when the model picks the teacher's choice)."""
    if what == "acc":
        return {(r["task"], r["item_id"]): float(r["acc"]) for r in _rows(d, name)}
    teacher = {(r["task"], r["item_id"]): _choice(r) for r in _rows(d, "teacher")}
    return {(r["task"], r["item_id"]): float(_choice(r) == teacher[(r["task"], r["item_id"])])
            for r in _rows(d, name) if "loglikelihoods" in r}


def contrast(d: Path, a: list[str], b: list[str], what: str = "acc") -> dict:
    sa, sb = [load(d, n, what) for n in a], [load(d, n, what) for n in b]
    keys = sorted(set.intersection(*(set(s) for s in sa + sb)))
    diff = {k: sum(s[k] for s in sa) / len(sa) - sum(s[k] for s in sb) / len(sb) for k in keys}
    tasks = sorted({t for t, _ in keys})
    out = {t: mean_se([v for (tt, _), v in diff.items() if tt == t]) for t in tasks}
    out["task mean"] = (sum(out[t][0] for t in tasks) / len(tasks),
                        math.sqrt(sum(out[t][1] ** 2 for t in tasks)) / len(tasks))
    out["items"] = mean_se(list(diff.values()))
    out["n"] = len(keys)
    return out


def print_table(d: Path, contrasts: list, what: str, have: set[str]) -> None:
    rows = [(label, contrast(d, a, b, what)) for label, a, b in contrasts if set(a + b) <= have]
    if not rows:
        print(f"(no contrast has all its models under {d})")
        return
    tasks = [k for k in rows[0][1] if k not in ("task mean", "items", "n")]
    print("| A - B | " + " | ".join(tasks) + " | **task mean** (z) | items (n) |")
    print("|---" * (len(tasks) + 3) + "|")
    for label, r in rows:
        cells = [f"{r[t][0]:+.3f} ({r[t][1]:.3f})" for t in tasks]
        m, se = r["task mean"]
        z = m / se if se else float("nan")
        cells += [f"**{m:+.3f} ({se:.3f})** z {z:+.1f}", f"{r['items'][0]:+.3f} ({r['items'][1]:.3f}) n={r['n']}"]
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("benchmarks/results/qwen-chain"))
    d = p.parse_args().dir
    have = {p.name for p in d.iterdir() if (p / "samples.jsonl").is_file()}
    print("Accuracy, paired per held-out item:\n")
    print_table(d, CONTRASTS, "acc", have)
    print("\nAgreement with the teacher's choice (fidelity), paired per held-out item:\n")
    print_table(d, FIDELITY, "agree", have)


if __name__ == "__main__":
    main()
