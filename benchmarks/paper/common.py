"""Shared pieces of the paper reproduction (issue 7): arms, run helpers, per-item statistics.

Two settings, chosen by the environment variable REFINERY_PAPER (default `quickstart`):
`quickstart` (configs/quickstart.yaml, SmolLM2-135M teacher, under runs/paper/) and `qwen`
(configs/qwen.yaml, Qwen2.5-Coder 1.5B -> 0.5B, under runs/paper-qwen/; issue 12).
REFINERY_PAPER_ROOT moves the root (e.g. into the cache, to keep runs across checkouts).

Every run lives under ROOT: `shared/generate` (the teacher's data, made once),
`<arm>-s<seed>/` (distill + quantize of one arm and seed, a normal run dir), `gptq-only/<seed>/`
(GPTQ of the undistilled student), `eval/<model>/` (scores from the vLLM evaluation workers),
`walls.jsonl` (every command with its wall time).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from functools import cache
from pathlib import Path


def _bf16_cpu() -> bool:
    """Native bf16 (AVX512-BF16 or AMX) on this CPU: bf16 is then ~2.6x faster than fp32 for the 0.5B;
    on AVX2-only CPUs it is emulated and 6-7x slower (NOTES.md, "Qwen setting")."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


SETTING = os.environ.get("REFINERY_PAPER", "quickstart")
if SETTING not in ("quickstart", "qwen"):
    raise SystemExit(f"REFINERY_PAPER={SETTING!r}: use quickstart or qwen")
CONFIG = {"quickstart": "configs/quickstart.yaml", "qwen": "configs/qwen.yaml"}[SETTING]
ROOT = Path(os.environ.get("REFINERY_PAPER_ROOT") or {"quickstart": "runs/paper", "qwen": "runs/paper-qwen"}[SETTING])
SEEDS = (0, 1, 2)
# overrides on CONFIG for every command of the setting (the machine's fast dtype for the Qwen models)
BASE = ([f"{s}.dtype=bfloat16" for s in ("generate", "teacher_logits", "distill")]
        if SETTING == "qwen" and _bf16_cpu() else [])

# arm -> dotted overrides on configs/quickstart.yaml (Muon lr 0.02, forward KL, alpha 1, T 2);
# adamw's learning rate comes from `run.py pilot` (see adamw_lr)
ARMS = {
    "muon": [],
    "adamw": ["distill.optim.name=adamw"],
    "fkl-a0.5": ["distill.loss.alpha=0.5"],
    "rkl": ["distill.loss.divergence=reverse_kl"],
    "rkl-a0.5": ["distill.loss.divergence=reverse_kl", "distill.loss.alpha=0.5"],
    "jsd": ["distill.loss.divergence=jsd"],
    "jsd-a0.5": ["distill.loss.divergence=jsd", "distill.loss.alpha=0.5"],
}


def cli(args: list[str], log_name: str) -> float:
    """Run `refinery ARGS` as its own process (fresh interpreter per stage chain); return wall s."""
    cmd = [sys.executable, "-m", "refinery.launch.cli", *args]
    print("+ refinery", " ".join(args), flush=True)
    t0 = time.time()
    code = subprocess.run(cmd, check=False).returncode
    wall = round(time.time() - t0, 1)
    ROOT.mkdir(parents=True, exist_ok=True)
    with (ROOT / "walls.jsonl").open("a") as f:
        f.write(json.dumps({"what": log_name, "cmd": "refinery " + " ".join(args), "wall_s": wall,
                            "exit": code, "at": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    if code:
        raise SystemExit(f"failed ({code}): refinery {' '.join(args)}")
    return wall


# stages made once under ROOT/shared and linked into every arm's run dir: the teacher's data, and
# for a top-k setting the teacher's logits over it (same data and teacher for every arm and seed)
SHARED = {"quickstart": ("generate",), "qwen": ("generate", "teacher-logits")}[SETTING]


def make_shared(src: Path | None) -> Path:
    """`ROOT/shared/generate`: copied from a finished run's generate/ (same config and seed 0), or made;
    then the other SHARED stages over it."""
    gen = ROOT / "shared" / "generate"
    if not (gen / "manifest.json").is_file():
        if src is not None:
            shutil.copytree(Path(src) / "generate" if (Path(src) / "generate").is_dir() else Path(src), gen,
                            dirs_exist_ok=True)
        else:
            cli(["generate", CONFIG, f"run_dir={ROOT / 'shared'}", "seed=0", *BASE], "generate")
    for stage in SHARED[1:]:
        if not (ROOT / "shared" / stage / "manifest.json").is_file():
            cli([stage, CONFIG, f"run_dir={ROOT / 'shared'}", "seed=0", *BASE], stage)
    return gen


def link_shared(d: Path) -> None:
    """Point run dir `d`'s SHARED stage dirs at ROOT/shared's."""
    d.mkdir(parents=True, exist_ok=True)
    for stage in SHARED:  # a stage's dir is named as the stage
        if not (d / stage).exists():
            (d / stage).symlink_to((ROOT / "shared" / stage).resolve(), target_is_directory=True)


PILOT_FILE = {"adamw": "pilot.json", "muon": "pilot-muon.json"}


def piloted_lr(optim: str) -> float | None:
    """The optimizer's LoRA learning rate from `run.py pilot`: the lowest final training loss (never
    the eval items); None when not piloted."""
    pilot = ROOT / PILOT_FILE[optim]
    if not pilot.is_file():
        return None
    rows = [r for r in json.loads(pilot.read_text()) if isinstance(r["lr"], float)]
    return min(rows, key=lambda r: r["final_loss"])["lr"]


def adamw_lr() -> float:
    lr = piloted_lr("adamw")
    if lr is None:
        raise SystemExit("the adamw arm needs AdamW's learning rate: run `python benchmarks/paper/run.py pilot` first")
    return lr


def arm_overrides(arm: str) -> list[str]:
    """Every arm but adamw is Muon: at its piloted lr when `run.py pilot --optim muon` ran, else the config's."""
    lr = adamw_lr() if arm == "adamw" else piloted_lr("muon")
    return BASE + ARMS[arm] + ([f"distill.optim.lr={lr}"] if lr is not None else [])


def run_dir(arm: str, seed: int) -> Path:
    return ROOT / f"{arm}-s{seed}"


def run_in(d: Path, seed: int, overrides: list[str], stages: str, what: str) -> Path:
    """`refinery run` of `stages` in run dir `d` over the SHARED stages' outputs (finished stages skipped)."""
    link_shared(d)
    cli(["run", CONFIG, f"run_dir={d}", f"seed={seed}", *overrides, "--stages", stages, "--reuse", ",".join(SHARED)],
        what)
    return d


def train(arm: str, seed: int, stages: str = "distill,quantize", extra: list[str] = ()) -> Path:
    """Distill and quantize one arm and seed on the shared data (finished stages are skipped)."""
    return run_in(run_dir(arm, seed), seed, [*arm_overrides(arm), *extra], stages, f"{arm}-s{seed} {stages}")


def base_student() -> str:
    """The undistilled 12-layer student of the quickstart config (derived once, cached)."""
    from refinery.core.models import resolve_models
    from refinery.pipeline.config import load

    return resolve_models(load(CONFIG, BASE).models)[1]


def gptq_only(seed: int) -> Path:
    """GPTQ of the undistilled student with the pipeline's quantize settings and calibration data."""
    out = ROOT / "gptq-only" / f"s{seed}"
    if not (out / "quantize.csv").is_file():
        cli(["quantize", CONFIG, f"seed={seed}", *BASE, "--checkpoints", base_student(), "--out", str(out),
             "--data", str(ROOT / "shared" / "generate" / "data.jsonl")], f"gptq-only-s{seed}")
    (name,) = [p for p in out.iterdir() if (p / "gptq" / "config.json").is_file()]
    return name / "gptq"


# ---- statistics on per-item predictions -------------------------------------------------------

@cache
def samples(name: str) -> dict:
    """{(task, item_id): row} of a model scored under ROOT/eval (lm-eval's per-item predictions)."""
    path = ROOT / "eval" / name / "samples.jsonl"
    return {(r["task"], r["item_id"]): r for r in map(json.loads, path.read_text().splitlines())}


def choice(row: dict) -> int:
    ll = row["loglikelihoods"]
    return max(range(len(ll)), key=ll.__getitem__)


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error (n-1 in the variance); se 0 for one value."""
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else 0.0)


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and standard deviation over seeds."""
    m, se = mean_se(xs)
    return m, se * math.sqrt(len(xs))


def per_task(rows: dict, value) -> dict[str, float]:
    """{task: mean of value(row)} plus 'mean' = the mean over all items."""
    tasks = sorted({t for t, _ in rows})
    out = {t: sum(value(r) for (tt, _), r in rows.items() if tt == t) / sum(1 for tt, _ in rows if tt == t)
           for t in tasks}
    out["mean"] = sum(value(r) for r in rows.values()) / len(rows)
    return out


def acc(row: dict) -> float:
    return float(row["acc"])


# ---- tests of a difference ----------------------------------------------------------------------

def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b), its standard error from the seed spreads, and Welch's degrees of freedom."""
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    va, vb = sa ** 2 / len(a), sb ** 2 / len(b)
    parts = [v ** 2 / (n - 1) for v, n in ((va, len(a)), (vb, len(b))) if n > 1 and v > 0]
    df = (va + vb) ** 2 / sum(parts) if parts else float("nan")
    return ma - mb, math.sqrt(va + vb), df


def significant(diff: float, se: float, df: float) -> bool:
    """Two-sided Welch t-test at 5%: with 3 seeds the critical value is ~2.8-4.3 standard errors, not 2."""
    from scipy.stats import t

    return se > 0 and not math.isnan(df) and abs(diff) > t.ppf(0.975, df) * se


def item_contrast(terms: list[tuple[float, list[str]]], task: str | None = None) -> tuple[float, float]:
    """Mean and se over items of sum(sign * accuracy averaged over the models' seeds), paired per item:
    what the seed spread leaves out (every model is scored on the same items)."""
    groups = [(sign, [samples(n) for n in names]) for sign, names in terms]
    keys = [k for k in groups[0][1][0] if task is None or k[0] == task]
    return mean_se([sum(sign * sum(acc(s[k]) for s in ss) / len(ss) for sign, ss in groups) for k in keys])


def decide(seed: tuple[float, float, float], item: tuple[float, float] | None, good: str, bad: str) -> str:
    """good/bad when the difference passes the seed t-test and (if given) 2 item-paired standard errors."""
    d, se, df = seed
    ok = significant(d, se, df)
    if item is not None:
        ok = ok and item[1] > 0 and abs(item[0]) > 2 * item[1] and (item[0] > 0) == (d > 0)
    return (good if d > 0 else bad) if ok else "inconclusive"
