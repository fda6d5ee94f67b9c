"""refinery.core.pool.ActorPool on a private Ray: Ray restarts an actor whose process was killed and
runs its task again; a task that raises is not retried; an actor that keeps dying is given up."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


class Toy:
    """Each call appends its pid to `<marks>/<item>`; `kind` says what the call does."""

    def __init__(self, marks: str, payload: str = ""):
        self.marks, self.payload = Path(marks), payload

    def data(self) -> str:
        return self.payload

    def pid(self) -> int:
        return os.getpid()

    def work(self, item: tuple[str, int]) -> tuple[int, int]:
        kind, x = item
        attempts = self.marks / str(x)
        with attempts.open("a") as f:
            f.write(f"{os.getpid()}\n")
        if kind == "die" or (kind == "die_once" and len(attempts.read_text().split()) == 1):
            os.kill(os.getpid(), signal.SIGKILL)  # the actor's process dies in the middle of the task
        if kind == "raise":
            raise ValueError(f"item {x} is bad")
        return x, os.getpid()


@pytest.fixture(scope="module")
def ray_local():
    from ray import cloudpickle

    from refinery.core.rayctl import PrivateRay

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test file
    with PrivateRay(num_cpus=2, prefix="raypool-") as ray:
        yield ray


def _attempts(marks: Path, x: int) -> list[int]:
    return [int(p) for p in (marks / str(x)).read_text().split()]


def test_a_killed_actor_is_restarted_and_its_task_rerun(ray_local, tmp_path):
    from refinery.core.pool import ActorPool

    # a constructor argument from the object store (as the GPTQ workers' calibration data): only the
    # pool holds its reference, and the restarted actor is built from it again
    pool = ActorPool(Toy, 1, args=(str(tmp_path), ray_local.put("from the store")), max_restarts=2, inflight=2)
    try:
        first = pool.call("pid")[0]
        items = [("ok", 0), ("die_once", 1), ("ok", 2), ("ok", 3)]
        out = list(pool.map("work", items))
        assert sorted(i for i, _, _ in out) == [0, 1, 2, 3]  # each item once
        assert all(ok for _, ok, _ in out), out
        assert {i: v[0] for i, _, v in out} == {0: 0, 1: 1, 2: 2, 3: 3}
        one = _attempts(tmp_path, 1)
        assert len(one) == 2 and one[0] == first and one[1] != first  # run again in the new process
        assert {v[1] for i, _, v in out if i != 0} == {one[1]}  # the rest ran in the restarted actor
        assert pool.call("pid") == [one[1]] and pool.call("data") == ["from the store"]
    finally:
        pool.close()


def test_a_task_that_raises_is_not_retried(ray_local, tmp_path):
    from refinery.core.pool import ActorPool

    pool = ActorPool(Toy, 2, args=(str(tmp_path),))
    try:
        out = {i: (ok, v) for i, ok, v in pool.map("work", [("raise", 0), ("ok", 1)])}
        assert out[1] == (True, (1, out[1][1][1]))
        ok, err = out[0]
        assert not ok and "item 0 is bad" in str(err) and isinstance(err.cause, ValueError)
        assert len(_attempts(tmp_path, 0)) == 1
    finally:
        pool.close()


def test_an_actor_that_keeps_dying_is_given_up(ray_local, tmp_path):
    from ray.exceptions import RayActorError

    from refinery.core.pool import ActorPool, NoWorkerLeft

    pool = ActorPool(Toy, 1, args=(str(tmp_path),), max_restarts=1)
    try:
        out = {i: (ok, v) for i, ok, v in pool.map("work", [("die", 0), ("ok", 1)])}
        assert not out[0][0] and isinstance(out[0][1], RayActorError)
        assert len(_attempts(tmp_path, 0)) == 2  # the first run and one retry after the one restart
        assert not out[1][0] and isinstance(out[1][1], NoWorkerLeft) and "no worker left" in str(out[1][1])
        assert pool.actors == [] and not (tmp_path / "1").exists()  # item 1 never ran
    finally:
        pool.close()
