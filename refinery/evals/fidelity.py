"""Distillation fidelity from per-item predictions: does the student answer like its teacher?

On tasks where the teacher itself is near chance (the 135M quickstart teacher), accuracy cannot
show what distillation transferred; agreement with the teacher's choice and the log-likelihood the
model gives the gold answer can. Both are computed on the same held-out items for every model.
"""
from __future__ import annotations

import math
import string
from pathlib import Path

from refinery.core.manifest import read_jsonl


def _samples(run_dir: Path, model: str) -> dict | None:
    path = run_dir / "evaluate" / "lmeval" / f"{model}_samples.jsonl"
    if not path.is_file():
        return None
    return {(r["task"], r["item_id"]): r for r in read_jsonl(path)}


def _choice(row: dict) -> int | str:
    """The model's answer: its most likely choice, or (generative tasks) its reply, normalized."""
    if "loglikelihoods" not in row:  # as exact match compares: case, punctuation and spacing ignored
        text = str(row.get("response", "")).lower()
        return "".join(c for c in text if c not in string.punctuation and not c.isspace())
    ll = row["loglikelihoods"]
    return max(range(len(ll)), key=ll.__getitem__)


def fidelity(run_dir: Path, models: list[str], reference: str = "teacher") -> dict[str, dict]:
    """{model: {agreement, agreement_stderr, gold_loglik, n}} against `reference`'s choices.

    agreement: share of items where the model's most likely choice is the reference's;
    gold_loglik: mean log-likelihood (nats) of the correct answer's continuation.
    """
    ref = _samples(run_dir, reference)
    out = {}
    for model in models:
        rows = _samples(run_dir, model)
        if rows is None:
            continue
        keys = [k for k in rows if ref is None or k in ref]
        if not keys:
            continue
        scored = [k for k in keys if "loglikelihoods" in rows[k]]  # generative items have no choice log-liks
        gold = sum(rows[k]["loglikelihoods"][rows[k]["target"]] for k in scored) / len(scored) if scored else None
        entry = {"gold_loglik": gold, "n": len(keys)}
        if ref is not None:
            p = sum(_choice(rows[k]) == _choice(ref[k]) for k in keys) / len(keys)
            entry.update(agreement=p, agreement_stderr=math.sqrt(p * (1 - p) / len(keys)))
        out[model] = entry
    return out


def paired_agreement_delta(run_dir: Path, a: str, b: str, reference: str = "teacher") -> tuple[float, float, int] | None:
    """(agreement[a] - agreement[b], paired stderr, n) over the items all three models answered."""
    ref, ra, rb = (_samples(run_dir, m) for m in (reference, a, b))
    if ref is None or ra is None or rb is None:
        return None
    keys = [k for k in ref if k in ra and k in rb]
    if len(keys) < 2:
        return None
    d = [float(_choice(ra[k]) == _choice(ref[k])) - float(_choice(rb[k]) == _choice(ref[k])) for k in keys]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d)), len(d)


def fidelity_table(fid: dict[str, dict], reference: str = "teacher") -> str:
    if not fid:
        return "_no per-item predictions found_"
    lines = [f"| model | agreement with {reference} | gold-answer log-likelihood (nats) | n |",
             "|---|---:|---:|---:|"]
    for model, f in fid.items():
        agree = (f"{f['agreement']:.3f} ± {f['agreement_stderr']:.3f}" if "agreement" in f else "–")
        gold = "–" if f["gold_loglik"] is None else f"{f['gold_loglik']:.2f}"
        lines.append(f"| {model} | {agree} | {gold} | {f['n']} |")
    return "\n".join(lines)


def fidelity_line(run_dir: Path) -> str | None:
    """One line: did distillation move the student's answers toward the teacher's?"""
    d = paired_agreement_delta(run_dir, "student", "student_base")
    if d is None:
        return None
    delta, se, n = d
    z = delta / se if se > 0 else 0.0
    call = ("the distilled student agrees with the teacher MORE than the undistilled one" if z >= 2 else
            "the distilled student agrees with the teacher LESS than the undistilled one" if z <= -2 else
            "no clear change in agreement with the teacher")
    return f"Fidelity: {call} (Δ agreement {delta:+.3f}, paired stderr {se:.3f}, {n} held-out items)."
