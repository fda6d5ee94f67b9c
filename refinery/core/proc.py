"""What every process of ours shares: the import path of child processes and the log format."""
from __future__ import annotations

import logging
import os
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
"""This checkout: child processes (torchrun ranks, Ray actors, sweep trials) import it first,
whatever else is installed."""


def pythonpath() -> str:
    """PYTHONPATH for a child process: this checkout, then the caller's PYTHONPATH."""
    return os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH", "")] if p)


def setup_logging(level: int = logging.INFO) -> None:
    """The one log format of our command-line entry points."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
