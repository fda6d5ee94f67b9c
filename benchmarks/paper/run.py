"""Reproduce the method's claims at quickstart scale (issue 7). Each step skips what is already done.

    python benchmarks/paper/run.py all --from runs/quickstart   # everything below, in order (~3 h, 2 cores)
    python benchmarks/paper/run.py pilot         # AdamW learning rate for LoRA, by training loss (seed 0)
    python benchmarks/paper/run.py pilot --optim muon   # Muon's too (used by the muon arm once piloted)
    python benchmarks/paper/run.py train --arms muon adamw --seeds 0 1 2
    python benchmarks/paper/run.py gptq-only     # GPTQ of the undistilled student, per seed
    python benchmarks/paper/run.py evaluate      # every model under runs/paper, one pool of vLLM workers
    python benchmarks/paper/run.py latency       # teacher / fp student / 4-bit student (muon-s0)
    python benchmarks/paper/run.py outliers      # activation outliers of base, Muon and AdamW students
    python benchmarks/paper/report.py            # benchmarks/paper/REPORT.md and its plots

Runs `refinery` stages as separate processes on configs/quickstart.yaml (SmolLM2-135M-Instruct
teacher, 12-layer student; REFINERY_PAPER=qwen: configs/qwen.yaml, see common.py) with the data of one generate run shared by every arm and seed; see
common.py for the layout under runs/paper/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import ARMS, ROOT, SEEDS

PILOT_LRS = {"adamw": (3e-4, 1e-3, 3e-3, 1e-2), "muon": (1e-3, 3e-3, 1e-2)}
MAIN_ARMS = ("muon", "adamw")  # experiments 1, 2, 5: float and 4-bit scored
ABLATION = ("fkl-a0.5", "rkl", "rkl-a0.5", "jsd", "jsd-a0.5")  # experiment 4 (with muon = fkl, alpha 1)


def final_loss(run: Path, last: int = 10) -> float:
    losses = [json.loads(line)["loss"] for line in (run / "distill" / "metrics.jsonl").read_text().splitlines()]
    return sum(losses[-last:]) / len(losses[-last:])


def pilot(optim: str = "adamw") -> None:
    """`optim` at each of PILOT_LRS[optim], seed 0, distill only; the lowest mean loss of the last 10
    steps wins (ROOT/pilot.json for adamw, ROOT/pilot-muon.json). Chosen on the training objective,
    never on the evaluation items."""
    rows = []
    for lr in PILOT_LRS[optim]:
        d = common.run_in(ROOT / f"pilot-{optim}-{lr:g}", 0,
                          [*common.BASE, f"distill.optim.name={optim}", f"distill.optim.lr={lr}"], "distill",
                          f"pilot {optim} lr={lr:g}")
        rows.append({"lr": lr, "final_loss": final_loss(d)})
    if optim == "adamw":
        rows.append({"lr": "muon 0.02 (muon-s0)", "final_loss": final_loss(common.run_dir("muon", 0))
                     if (common.run_dir("muon", 0) / "distill" / "metrics.jsonl").is_file() else None})
    (ROOT / common.PILOT_FILE[optim]).write_text(json.dumps(rows, indent=1))
    for r in rows:
        print(r)


def models_to_score() -> dict[str, str]:
    """{name: model dir} of everything trained so far, plus the teacher and the undistilled student."""
    from refinery.core.models import resolve_models
    from refinery.pipeline.config import load

    teacher, base = resolve_models(load(common.CONFIG, common.BASE).models)
    out = {"teacher": teacher, "student_base": base}
    fp, w4 = {}, {}  # grouped by architecture, so the workers swap weights into one engine (refinery.evals.pool)
    for seed in SEEDS:
        for arm in MAIN_ARMS + ABLATION:
            q = common.run_dir(arm, seed) / "quantize"
            if not (q / "manifest.json").is_file():
                continue
            fp[f"{arm}-s{seed}-fp"] = str(q / "merged")
            if arm in MAIN_ARMS:
                w4[f"{arm}-s{seed}-w4"] = str(q / "gptq")
        if (ROOT / "gptq-only" / f"s{seed}" / "quantize.csv").is_file():
            w4[f"gptq-only-s{seed}"] = str(common.gptq_only(seed))
    return {**out, **fp, **w4}


def evaluate() -> None:
    from refinery.evals.batch import evaluate_many, table
    from refinery.pipeline.config import load

    cfg = load(common.CONFIG, common.BASE)
    t0 = time.time()
    res = evaluate_many(cfg, models_to_score(), ROOT / "eval", workers=None, latency=False)
    print(table(res))
    with (ROOT / "walls.jsonl").open("a") as f:
        f.write(json.dumps({"what": "evaluate", "models": len(res), "wall_s": round(time.time() - t0, 1)}) + "\n")


def latency() -> None:
    here = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(here / "benchmarks" / "eval_latency.py"), "--run", str(common.run_dir("muon", 0)),
           "--out", str(ROOT / "latency")]
    env = {**os.environ, "PYTHONPATH": str(here)}
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env)
    with (ROOT / "walls.jsonl").open("a") as f:
        f.write(json.dumps({"what": "latency", "cmd": " ".join(cmd), "wall_s": round(time.time() - t0, 1)}) + "\n")


def outlier_texts(per_task: int = 20) -> list[str]:
    """Held-out items (prompt + gold answer) of the quickstart tasks: text no student trained on."""
    from refinery.core.tasks import load_task
    from refinery.evals.lmeval_tasks import held_out_docs
    from refinery.pipeline.config import load

    cfg = load(common.CONFIG, common.BASE)
    texts = []
    for name in cfg.tasks.names:
        for d in held_out_docs(load_task(cfg.tasks, name), per_task):
            texts.append(f"{d['prompt']} {d['choices'][d['answer']]}")
    return texts


def outliers() -> None:
    """Activation statistics (refinery.evals.outliers) of each float model, float32, on held-out text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.evals.outliers import activation_stats

    texts = outlier_texts()
    models = {n: p for n, p in models_to_score().items() if n == "student_base" or
              (n.endswith("-fp") and n.split("-s")[0] in MAIN_ARMS)}
    out = ROOT / "outliers"
    out.mkdir(parents=True, exist_ok=True)
    for name, path in models.items():
        dst = out / f"{name}.json"
        if dst.is_file():
            continue
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
        stats = activation_stats(model, tok, texts, max_len=256)
        tmp = dst.with_suffix(".tmp")
        tmp.write_text(json.dumps({"texts": len(texts), "stats": stats}))
        tmp.rename(dst)
        print(f"outliers {name}: {len(stats)} sites", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["all", "pilot", "train", "gptq-only", "evaluate", "latency", "outliers"])
    p.add_argument("--from", dest="src", type=Path, default=None,
                   help="a finished run (or its generate/ dir) of configs/quickstart.yaml to take the data from")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--optim", choices=list(PILOT_LRS), default="adamw", help="pilot: which optimizer's lr")
    a = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4" if common.SETTING == "qwen" else "1")
    common.make_shared(a.src)
    steps = ["pilot", "train", "gptq-only", "evaluate", "latency", "outliers"] if a.step == "all" else [a.step]
    for step in steps:
        if step == "pilot":
            pilot(a.optim)
        elif step == "train":
            for seed in a.seeds:  # seed-major: every arm has seed 0 before any has seed 1
                for arm in a.arms:
                    common.train(arm, seed)
        elif step == "gptq-only":
            for seed in a.seeds:
                common.gptq_only(seed)
        else:
            {"evaluate": evaluate, "latency": latency, "outliers": outliers}[step]()


if __name__ == "__main__":
    main()
