"""One distill process of a torchrun job: `python -m refinery.train.worker distill/launch.json`.

Started by `refinery.train.dist.launch`; rank 0 writes `distill/result.json` for the parent.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path

from refinery.core.config import build
from refinery.core.manifest import write_json
from refinery.core.models import ModelsConfig
from refinery.core.proc import setup_logging
from refinery.core.stage import Context
from refinery.core.tasks import TasksConfig
from refinery.train.config import DistillConfig


def main(spec_path: str) -> int:
    rank = int(os.environ.get("RANK", "0"))
    # (also makes GPTQModel's logger quiet before the trainer's imports bring it in: its banner)
    setup_logging(logging.INFO if rank == 0 else logging.WARNING, fmt=f"%(asctime)s [rank {rank}] %(name)s %(message)s")
    from refinery.train.trainer import train

    if not Path(spec_path).is_file():  # written by node 0 before any worker starts
        raise SystemExit(f"distill rank {rank} on {socket.gethostname()}: cannot see {spec_path}, which node 0 wrote: "
                         "every node must see run_dir at the same path (a shared filesystem: NFS, Lustre, ...)")
    spec = json.loads(Path(spec_path).read_text())
    ctx = Context(Path(spec["run_dir"]), spec["seed"], build(ModelsConfig, spec["models"]),
                  build(TasksConfig, spec["tasks"]), {k: Path(v) for k, v in spec.get("dirs", {}).items()})
    cfg = build(DistillConfig, spec["distill"])
    result = train(ctx, cfg, stop_after=spec.get("stop_after"))
    if rank == 0:
        write_json(ctx.stage_dir("distill") / "result.json", {"metrics": result.metrics, "outputs": result.outputs})
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    from refinery.train.dist import exit_worker

    exit_worker(code)
