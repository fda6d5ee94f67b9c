"""Our distill stage vs TRL's GKD trainer and torchtune's KD recipe: same student, teacher, data,
batches, steps and optimizer.

    python benchmarks/peers/distill_vs_peers.py --from runs/quickstart     # ~12 min on 2 cores
    python benchmarks/peers/distill_vs_peers.py --from runs/quickstart --only torchtune   # one arm, merged in
    python benchmarks/peers/distill_vs_peers.py --no-run                    # the table of runs already made

Takes generate/ of a finished quickstart run (--from) and trains the quickstart's student (LoRA r16 on
every projection, bf16 weights, fp32 LoRA, batch 8, max 192 tokens) for --steps steps, each side in its
own process so each peak RSS (os.wait4) is that side's alone:
- ours AdamW (lr 3e-4), the teacher run every step (teacher_cache off, as the peers do);
- ours Muon (lr 0.02 on matrices, AdamW 3e-4 on the rest), the same;
- TRL 1.16 GKDTrainer (lmbda 0, beta 0: forward KL on the dataset's sequences), AdamW, in its own venv
  (peer_env.py), fed the exact batches ours draws (trl_distill_run.py);
- torchtune 0.6.1 `knowledge_distillation_single_device` (kd_ratio 1: forward KL), AdamW, its own venv,
  the same batches through tt_data.py, the models through its Llama-3.2 builder (scale_factor 1 = plain
  RoPE) and HF checkpointer; torchtune keeps LoRA weights in bf16 (dtype: bf16), ours and TRL in fp32.
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
from peer_env import SHOWN, measured, peer_python, read_summary, versions, write_summary

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "peers" / "distill"
CONFIG = "configs/quickstart.yaml"
# teacher_cache off: the peers run the teacher every step (and on this CPU the quickstart's bf16 cache
# check falls back to the live teacher anyway, NOTES.md "Peer comparisons")
COMMON = ["distill.loss.temperature=1.0", "distill.loss.alpha=1.0", "distill.optim.warmup_steps=10",
          "distill.optim.schedule=cosine", "distill.optim.grad_clip=1.0", "distill.optim.weight_decay=0.0",
          "distill.teacher_cache=false"]
ADAMW_LR, MUON_LR = 3e-4, 0.02
ARMS = {"ours adamw": ["distill.optim.name=adamw", f"distill.optim.lr={ADAMW_LR}"],
        "ours muon": ["distill.optim.name=muon", f"distill.optim.lr={MUON_LR}", f"distill.optim.adamw_lr={ADAMW_LR}"]}
"""Our arms: AdamW takes `optim.lr` (the quickstart's 0.02 is Muon's), Muon takes lr for matrices and
adamw_lr for the rest."""


def parse(argv=None) -> argparse.Namespace:
    names = [*ARMS, *PEER_ARMS]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="src", type=Path, help="a run dir whose generate/ stage is complete")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--held-out", type=int, default=40, help="held-out items per task for the fidelity KL")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "llm-refinery" / "runs" / "peers-distill")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--no-run", action="store_true", help="only print the table of runs already made")
    p.add_argument("--only", type=lambda v: [_arm(n, names) for n in v.split(",")], default=None,
                   help=f"comma-separated arms to (re)run, merged into the summary: {', '.join(names)} "
                        "(or a unique prefix, e.g. trl, torchtune)")
    args = p.parse_args(argv)
    if not args.no_run and not (args.src and (args.src / "generate" / "manifest.json").is_file()):
        p.error("--from RUN_DIR is required and must hold a complete generate/ stage (run `refinery generate`)")
    return args


def _arm(name: str, names: list[str]) -> str:
    hits = [name] if name in names else [n for n in names if n.startswith(name)]
    if len(hits) != 1:
        raise argparse.ArgumentTypeError(f"{name!r} names {len(hits)} arms; one of: {', '.join(names)}")
    return hits[0]


def ours(args, name: str, over: list[str]) -> dict:
    run_dir = args.work / name.replace(" ", "-").replace(",", "")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    shutil.copytree(args.src / "generate", run_dir / "generate")
    cmd = [sys.executable, "-m", "refinery.launch.cli", "distill", CONFIG, f"run_dir={run_dir}",
           f"distill.steps={args.steps}", f"distill.checkpoint_every={args.steps}", *COMMON, *over]
    res = measured(cmd, run_dir.with_suffix(".log"))
    rows = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").open()]
    peak = max(r["lr"] for r in rows)  # the arm ran at the learning rate it says
    want = ADAMW_LR if "adamw" in name else MUON_LR
    if abs(peak - want) > 1e-3 * want:
        raise SystemExit(f"{name}: peak lr {peak} in {run_dir}/distill/metrics.jsonl, expected {want}")
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


def torchtune(args, path: Path, pad_id: int, teacher: str, student: str) -> dict:
    """torchtune 0.6.1's `knowledge_distillation_single_device` recipe on the same batches (tt_data.py):
    LoRA on the same 7 projections, kd_ratio 1 (forward KL, T=1), AdamW, cosine with 10 warm-up steps."""
    import yaml

    out = args.work / "torchtune"
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    batches = json.loads(path.read_text())
    cfg = {"output_dir": str(out), "model": _tt_model(student, lora=True), "teacher_model": _tt_model(teacher),
           "tokenizer": {"_component_": "tt_data.IdsOnly", "pad_id": pad_id},
           "checkpointer": _tt_ckpt(student, out), "teacher_checkpointer": _tt_ckpt(teacher, out),
           "resume_from_checkpoint": False, "save_adapter_weights_only": True,
           "dataset": {"_component_": "tt_data.fixed_batches", "path": str(path)},
           "seed": 0, "shuffle": False, "batch_size": len(batches[0]),
           "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.0},
           "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                            "num_warmup_steps": 10},
           "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
           "kd_loss": {"_component_": "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss"}, "kd_ratio": 1.0,
           "epochs": 1, "max_steps_per_epoch": len(batches), "gradient_accumulation_steps": 1, "clip_grad_norm": 1.0,
           "compile": False, "device": "cpu", "dtype": "bf16", "enable_activation_checkpointing": False,
           "enable_activation_offloading": False, "log_every_n_steps": 1, "log_peak_memory_stats": False,
           "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out / "logs")}}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    py = peer_python("torchtune")
    res = measured([py.parent / "tune", "run", "knowledge_distillation_single_device", "--config", out / "config.yaml"],
                   args.work / "torchtune.log", {"PYTHONPATH": str(Path(__file__).parent)})
    steps = {}
    for line in next((out / "logs").glob("log_*.txt")).read_text().splitlines():
        head, _, rest = line.partition(" | ")
        steps[int(head.split()[1])] = {k: float(v) for k, v in (kv.split(":") for kv in rest.split())}
    rows = [steps[k] for k in sorted(steps)]
    tokens = [sum(len(x) for x in b) for b in batches]
    secs = [n / r["tokens_per_second_per_gpu"] for n, r in zip(tokens, rows)]
    adapter = next(out.rglob("adapter_config.json")).parent
    return {**res, "tokens": sum(tokens), "tokens_per_s": sum(tokens) / sum(secs), "train_s": sum(secs),
            "steady_tokens_per_s": sum(tokens[1:]) / sum(secs[1:]), "losses": [r["kd_loss"] for r in rows],
            # its ForwardKLLoss is -sum p_teacher log q_student: KL plus the teacher's entropy (same gradient)
            "loss_is": "cross-entropy to the teacher",
            "adapter": str(adapter), "versions": versions(py, SHOWN["torchtune"])}


def _tt_model(path: str, lora: bool = False) -> dict:
    """torchtune's Llama-3.2 builder with a Llama checkpoint's own shape (scale_factor 1: plain RoPE)."""
    c = json.loads((Path(path) / "config.json").read_text())
    rope = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    m = {"_component_": f"torchtune.models.llama3_2.{'lora_llama3_2' if lora else 'llama3_2'}",
         "vocab_size": c["vocab_size"], "num_layers": c["num_hidden_layers"], "num_heads": c["num_attention_heads"],
         "num_kv_heads": c["num_key_value_heads"], "embed_dim": c["hidden_size"],
         "max_seq_len": c["max_position_embeddings"], "intermediate_dim": c["intermediate_size"],
         "norm_eps": c["rms_norm_eps"], "rope_base": int(rope), "scale_factor": 1,
         "tie_word_embeddings": c.get("tie_word_embeddings", False)}
    if lora:
        m.update(lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
                 lora_rank=16, lora_alpha=32, lora_dropout=0.0)
    return m


def _tt_ckpt(path: str, out: Path) -> dict:
    return {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": path,
            "checkpoint_files": ["model.safetensors"], "output_dir": str(out), "model_type": "LLAMA3_2",
            "recipe_checkpoint": None}


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
        if "error" in r:
            lines.append(f"| {name} | did not run: {r['error']} | | | | | | | |")
            continue
        last = f"{sum(r['losses'][-10:]) / len(r['losses'][-10:]):.4f}" + (f" ({r['loss_is']})" if "loss_is" in r else "")
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['steady_tokens_per_s']:.0f} "
                     f"| {r['steady_tokens_per_s'] / ref['steady_tokens_per_s']:.2f}x | {r['wall_s']:.0f} "
                     f"| {r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x | {last} "
                     f"| {summary['fidelity'][name]:.4f} |")
    lines.append(f"| undistilled student | | | | | | | | {summary['fidelity']['undistilled student']:.4f} |")
    return "\n".join(lines)


PEER_ARMS = {"trl gkd adamw": trl, "torchtune kd lora adamw": torchtune}


def run_arms(args) -> dict:
    """Run the chosen arms (all by default) and merge them into the summary at args.out."""
    path, pad_id, teacher, student = batches(args)
    old = read_summary(args.out) if args.only else None
    arms = {}
    for name in args.only or [*ARMS, *PEER_ARMS]:
        try:
            arms[name] = (ours(args, name, ARMS[name]) if name in ARMS
                          else PEER_ARMS[name](args, path, pad_id, teacher, student))
        except SystemExit as e:  # a peer that cannot run here is reported with its reason
            arms[name] = {"error": str(e).splitlines()[-1][:300]}
    drawn = json.loads(path.read_text())
    tokens = sum(len(x) for b in drawn for x in b)
    for name, r in arms.items():  # the same batches on every side: the same token count
        assert "error" in r or r["tokens"] == tokens, (name, r["tokens"], tokens)
    done = {n: r["adapter"] for n, r in arms.items() if "error" not in r}
    fid, n_items, n_tokens = fidelity(args, done, teacher, student)
    return {"steps": args.steps, "batch_size": len(drawn[0]), "tokens": tokens,
            "ours_versions": versions(sys.executable, ["torch", "transformers", "peft"]),
            "arms": {**(old or {}).get("arms", {}), **arms}, "fidelity": {**(old or {}).get("fidelity", {}), **fid},
            "held_out_items": n_items, "held_out_tokens": n_tokens}


def main(argv=None) -> None:
    args = parse(argv)
    if not args.no_run:
        args.work.mkdir(parents=True, exist_ok=True)
        write_summary(args.out, run_arms(args))
    print(table(read_summary(args.out)))


if __name__ == "__main__":
    main()
