"""Preemption: SIGTERM / SIGUSR1 make training checkpoint at the end of the current step and stop.

Slurm sends SIGTERM on `scontrol requeue` and before a time limit (and SIGUSR1 with
`--signal=USR1@secs`); torchrun forwards SIGTERM to its workers. The handler only sets a flag;
the training loop checks it after every step (all ranks agree through one tiny all-reduce),
writes a checkpoint and raises `Preempted`, so the stage is left incomplete and the same
command resumes from that step.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(RuntimeError):
    """Training stopped on a signal after checkpointing `step`; rerun the same command to resume."""

    def __init__(self, step: int, signum: int):
        at = f"after checkpointing step {step}" if step >= 0 else "after the workers checkpointed"
        super().__init__(f"stopped by {signal.Signals(signum).name} {at}; rerun the same command to resume")
        self.step, self.signum = step, signum


class StopFlag:
    """Context manager: while inside, SIGTERM/SIGUSR1 set `.signum` instead of killing the process."""

    def __init__(self):
        self.signum: int | None = None

    def _handle(self, signum, frame):
        self.signum = signum

    def __enter__(self) -> StopFlag:
        self._ctx = on_signals(self._handle) if threading.current_thread() is threading.main_thread() else None
        if self._ctx is not None:  # signal handlers live in the main thread
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


@contextmanager
def on_signals(handler):
    """While inside: SIGTERM and SIGUSR1 call `handler(signum, frame)` (main thread only); restored after."""
    old = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
