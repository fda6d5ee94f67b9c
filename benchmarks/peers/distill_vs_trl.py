"""Our distill stage vs TRL's GKD trainer: same student, teacher, data, batches, steps and optimizer.

    python benchmarks/peers/distill_vs_trl.py --from runs/quickstart       # ~15 min on 2 cores
    python benchmarks/peers/distill_vs_trl.py --no-run                      # the table of runs already made

Takes generate/ of a finished quickstart run (--from) and trains the quickstart's student (LoRA r16 on
every projection, bf16 weights, fp32 LoRA, batch 8, max 192 tokens) for --steps steps, each side in its
own process so each peak RSS (os.wait4) is that side's alone:
- ours AdamW, teacher cache on (the quickstart's setting: the teacher body runs once over the data);
- ours AdamW, teacher cache off (the teacher runs every step, as in TRL);
- ours Muon (lr 0.02 on matrices, AdamW 3e-4 on the rest), teacher cache on;
- TRL 1.16 GKDTrainer (lmbda 0, beta 0: forward KL on the dataset's sequences), AdamW, in its own venv
  (peer_env.py), fed the exact batches ours draws (trl_distill_run.py).
AdamW on both sides: lr 3e-4, betas (0.9, 0.95), no weight decay, 10 warm-up steps then cosine, grad
clip 1.0. Loss: forward KL at temperature 1 on every real token (GKDTrainer ignores its temperature in
the loss, so ours runs at T=1 here too; the quickstart's T=2 is not used). Reported: training tokens/s
(real tokens over the training loop; steady: from step 2), process wall and peak RSS, the KL of the
last 10 steps, and held-out fidelity: KL(teacher || student) per token at T=1 on the quickstart tasks'
held-out items (context plus gold answer), never seen in training, same for every student.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_env import SHOWN, measured, peer_python, versions

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "peers" / "distill"
CONFIG = "configs/quickstart.yaml"
COMMON = ["distill.loss.temperature=1.0", "distill.loss.alpha=1.0", "distill.optim.warmup_steps=10",
          "distill.optim.schedule=cosine", "distill.optim.grad_clip=1.0", "distill.optim.weight_decay=0.0"]
ARMS = {"ours adamw": ["distill.optim.name=adamw"],
        "ours adamw, no teacher cache": ["distill.optim.name=adamw", "distill.teacher_cache=false"],
        "ours muon": ["distill.optim.name=muon"]}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="src", type=Path, help="a run dir whose generate/ stage is complete")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--held-out", type=int, default=40, help="held-out items per task for the fidelity KL")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "llm-refinery" / "runs" / "peers-distill")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--no-run", action="store_true", help="only print the table of runs already made")
    args = p.parse_args(argv)
    if not args.no_run and not (args.src and (args.src / "generate" / "manifest.json").is_file()):
        p.error("--from RUN_DIR is required and must hold a complete generate/ stage (run `refinery generate`)")
    return args


def ours(args, name: str, over: list[str]) -> dict:
    run_dir = args.work / name.replace(" ", "-").replace(",", "")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    shutil.copytree(args.src / "generate", run_dir / "generate")
    cmd = [sys.executable, "-m", "refinery.launch.cli", "distill", CONFIG, f"run_dir={run_dir}",
           f"distill.steps={args.steps}", f"distill.checkpoint_every={args.steps}", *COMMON, *over]
    res = measured(cmd, run_dir.with_suffix(".log"))
    rows = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").open()]
    tokens, secs = sum(r["tokens"] for r in rows), sum(r["step_s"] for r in rows)
    steady = sum(r["tokens"] for r in rows[1:]) / sum(r["step_s"] for r in rows[1:])
    return {**res, "tokens": tokens, "tokens_per_s": tokens / secs, "steady_tokens_per_s": steady,
            "train_s": secs, "losses": [r["kd"] for r in rows], "adapter": str(run_dir / "distill" / "adapter")}


def batches(args) -> tuple[Path, int, str, str]:
    """The token ids of every batch our distill draws (seed 0), for TRL; and the model paths."""
    from transformers import AutoTokenizer

    from refinery.core.models import resolve_models
    from refinery.pipeline.config import load
    from refinery.train.data import load_rows, sample_indices, tokenize_rows

    cfg = load(CONFIG)
    teacher, student = resolve_models(cfg.models)
    tok = AutoTokenizer.from_pretrained(student)
    seqs = tokenize_rows(load_rows(args.src / "generate" / "data.jsonl"), tok, cfg.distill.max_seq_len)
    b = cfg.distill.batch_size
    steps = [[seqs[i] for i in sample_indices(len(seqs), cfg.seed, (k - 1) * b, b)] for k in range(1, args.steps + 1)]
    path = args.work / "batches.json"
    path.write_text(json.dumps(steps))
    return path, tok.pad_token_id, teacher, student


def trl(args, path: Path, pad_id: int, teacher: str, student: str) -> dict:
    out = args.work / "trl"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    py = peer_python("trl")
    cmd = [py, Path(__file__).with_name("trl_distill_run.py"), "--teacher", teacher, "--student", student,
           "--batches", path, "--out", out, "--pad-id", pad_id]
    res = measured(cmd, args.work / "trl.log")
    m = json.loads((out / "metrics.json").read_text())
    return {**res, "tokens": m["tokens"], "tokens_per_s": m["tokens_per_s"], "train_s": m["train_s"],
            "steady_tokens_per_s": m["steady_tokens_per_s"], "losses": m["losses"], "adapter": str(out / "adapter"),
            "versions": versions(py, SHOWN["trl"])}


def fidelity(args, adapters: dict[str, str], teacher: str, student: str) -> tuple[dict[str, float], int, int]:
    """Mean per-token KL(teacher || student) at T=1 on held-out task texts, for each adapter; the
    number of texts and of scored tokens."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.core.tasks import load_task
    from refinery.pipeline.config import load

    cfg = load(CONFIG)
    texts = []
    for name in cfg.tasks.names:
        for it in load_task(cfg.tasks, name).held[:args.held_out]:
            texts.append(f"{it.context()} {it.choices[it.answer]}")
    tok = AutoTokenizer.from_pretrained(student)
    ids = [tok(t)["input_ids"][:192] for t in texts]
    t_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16).eval()

    @torch.no_grad()
    def logprobs(model):
        return [F.log_softmax(model(torch.tensor([x])).logits[0, :-1].float(), -1) for x in ids]

    t_lp = logprobs(t_model)
    del t_model
    out = {}
    for name, adapter in {"undistilled student": None, **adapters}.items():
        base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.bfloat16)
        model = (PeftModel.from_pretrained(base, adapter) if adapter else base).eval()
        kl = sum(F.kl_div(s, t, log_target=True, reduction="sum").item() for s, t in zip(logprobs(model), t_lp))
        out[name] = kl / sum(len(x) - 1 for x in ids)
    return out, len(ids), sum(len(x) - 1 for x in ids)


def table(summary: dict) -> str:
    ref = summary["arms"]["trl gkd adamw"]
    lines = [(f"{summary['steps']} steps, batch {summary['batch_size']}, {summary['tokens']} training tokens; "
             f"held-out fidelity on {summary['held_out_items']} items ({summary['held_out_tokens']} tokens)"),
             ("| arm | tokens/s | steady tokens/s | vs TRL | process wall s | peak RSS GB | vs TRL | "
             "train KL (last 10 steps) | held-out KL(teacher‖student) |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["arms"].items():
        last = sum(r["losses"][-10:]) / len(r["losses"][-10:])
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['steady_tokens_per_s']:.0f} "
                     f"| {r['steady_tokens_per_s'] / ref['steady_tokens_per_s']:.2f}x | {r['wall_s']:.0f} "
                     f"| {r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x | {last:.4f} "
                     f"| {summary['fidelity'][name]:.4f} |")
    lines.append(f"| undistilled student | | | | | | | | {summary['fidelity']['undistilled student']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse(argv)
    summary_path = args.out / "summary.json"
    if not args.no_run:
        args.work.mkdir(parents=True, exist_ok=True)
        path, pad_id, teacher, student = batches(args)
        arms = {name: ours(args, name, over) for name, over in ARMS.items()}
        arms["trl gkd adamw"] = trl(args, path, pad_id, teacher, student)
        for name, r in arms.items():  # the same batches on every side: same token count
            assert r["tokens"] == arms["trl gkd adamw"]["tokens"], (name, r["tokens"])
        fid, n_items, n_tokens = fidelity(args, {n: r["adapter"] for n, r in arms.items()}, teacher, student)
        summary = {"steps": args.steps, "batch_size": len(json.loads(path.read_text())[0]),
                   "tokens": arms["trl gkd adamw"]["tokens"],
                   "ours_versions": versions(sys.executable, ["torch", "transformers", "peft"]),
                   "arms": arms, "fidelity": fid, "held_out_items": n_items, "held_out_tokens": n_tokens}
        args.out.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    summary = json.loads(summary_path.read_text())
    print(table(summary))


if __name__ == "__main__":
    main()
