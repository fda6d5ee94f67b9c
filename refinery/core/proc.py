"""What every process of ours shares: the import path of child processes, the log format and how
much third-party output is shown."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
"""This checkout: child processes (torchrun ranks, Ray actors, sweep trials) import it first,
whatever else is installed."""


def pythonpath() -> str:
    """PYTHONPATH for a child process: this checkout, then the caller's PYTHONPATH."""
    return os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH", "")] if p)


QUIET_ENV = {"TORCH_LOGS": "-all", "VLLM_LOGGING_LEVEL": "WARNING", "TRANSFORMERS_VERBOSITY": "error",
             "GPTQMODEL_DISABLE_GIL_WARNING": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
"""Read by the libraries at import (and inherited by every child process): their warnings, banners
and per-file bars (transformers' "Loading weights" / "Writing model shards", datasets' "Map") off;
errors still print, and each long step keeps its own bar (distill's steps, evaluate's requests)."""
QUIET_LOGGERS = ("torch", "torchao", "transformers", "vllm", "DeepSpeed", "deepspeed", "ray", "datasets", "lm_eval", "lm-eval",
                 "peft", "accelerate", "urllib3", "filelock", "httpx", "huggingface_hub", "tokenicer")


def child_env() -> dict[str, str]:
    """What a child process we do not start by `subprocess` (a Ray actor, a Ray Train worker, a Tune
    trial) must be given to act like this one: our import path and how much third-party output to show."""
    keys = ("REFINERY_VERBOSE", *QUIET_ENV)
    return {"PYTHONPATH": pythonpath(), **{k: os.environ[k] for k in keys if k in os.environ}}


def quiet_logbar() -> None:
    """GPTQModel's logger (LogBar) sets itself to INFO and prints a banner when first made; unless
    -v, make it first, at WARNING. Call before anything imports gptqmodel."""
    if verbose():
        return
    try:
        from logbar import LogBar, terminal
    except ImportError:  # a GPTQModel release without logbar: its banner prints
        return
    LogBar.shared().setLevel(logging.WARNING)
    if not sys.stdout.isatty():
        # Written to a file (a sweep trial's log, a Slurm job's output), LogBar's per-layer and per-module
        # bars become thousands of carriage-return lines; it has no switch for that, only its headless
        # detection (CI variables), so say headless here. In a terminal the bars stay.
        terminal._is_headless_environment = lambda notebook=False: True


def verbose() -> bool:
    """Whether third-party output is wanted (`refinery ... -v`, inherited by child processes)."""
    return os.environ.get("REFINERY_VERBOSE") == "1"


def setup_logging(level: int = logging.INFO, loud: bool = False,
                  fmt: str = "%(asctime)s %(name)s %(message)s") -> None:
    """The one log format of our command-line entry points. Unless `loud` (-v): third-party
    libraries print errors only (their config dumps, banners and import warnings are off)."""
    if loud:
        os.environ["REFINERY_VERBOSE"] = "1"
    if not verbose():
        for k, v in QUIET_ENV.items():
            os.environ.setdefault(k, v)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        quiet_logbar()  # whichever import brings GPTQModel in first (peft does, in distill)
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S")
