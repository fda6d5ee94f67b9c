"""One pool of Ray actors, for the GPTQ workers (quantize/batch.py) and the vLLM evaluation workers
(evals/pool.py).

    pool = ActorPool(Worker, n=2, args=(...), options=lambda slot: {"num_cpus": 1}, max_restarts=3)
    for i, ok, value in pool.map("method", items):   # as each finishes; value is the error if not ok
        ...
    pool.close()

Fault tolerance is Ray's own: every actor is created with `max_restarts` (Ray starts a dead actor's
process again and re-runs its constructor) and `max_task_retries=-1` (the tasks it was running or
had queued are sent again to the restarted actor, each returns once). A task that raises is not
retried: `map` yields it with ok False (a `RayTaskError`, the cause attached). An actor that died
more often than Ray restarts it is dropped from the pool, its tasks yielded with ok False (a
`RayActorError`); with no actor left, the items not yet run are yielded as failed too. So a task
that always kills its worker (out of memory, say) runs `max_restarts + 1` times and takes that worker
with it; with `inflight > 1` the other items queued on that worker fail with it.

The pool keeps `inflight` tasks queued per actor (more than one hides the driver's round trip) and
gives each item to the actor with the fewest queued.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


class NoWorkerLeft(RuntimeError):
    """Every actor of the pool died more often than Ray restarts it."""


class ActorPool:
    def __init__(self, cls: type, n: int, args: tuple = (), kwargs: dict | None = None,
                 options: Callable[[int], dict] = lambda slot: {}, max_restarts: int = 3, inflight: int = 1):
        import ray

        if n < 1:
            raise ValueError(f"workers: got {n}, expected an integer >= 1")
        self.n, self.max_restarts, self.inflight = n, max_restarts, inflight
        # held for the pool's life: a restart re-runs the constructor with these (object refs among them)
        self.args, self.kwargs = args, kwargs or {}
        remote = ray.remote(cls)
        self.actors = [remote.options(max_restarts=max_restarts, max_task_retries=-1, **options(slot))
                       .remote(*self.args, **self.kwargs) for slot in range(n)]

    def map(self, method: str, items: list, *args: Any) -> Iterator[tuple[int, bool, Any]]:
        """`actor.<method>(*args, item)` for every item; yields (index, ok, result or error) as each ends."""
        import ray
        from ray.exceptions import RayActorError, RayError, RayTaskError

        pending = list(range(len(items)))[::-1]  # pop() takes them in order
        running: dict = {}  # object ref -> (actor, item index)
        while pending or running:
            for actor in sorted(self.actors, key=lambda a: sum(1 for b, _ in running.values() if b is a)):
                while pending and sum(1 for b, _ in running.values() if b is actor) < self.inflight:
                    i = pending.pop()
                    running[getattr(actor, method).remote(*args, items[i])] = (actor, i)
            if not running:  # no actor left to run the rest
                while pending:
                    yield pending.pop(), False, NoWorkerLeft(f"no worker left: all {self.n} died more than "
                                                             f"{self.max_restarts} time(s)")
                return
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, i = running.pop(ref)
            try:
                ok, value = True, ray.get(ref)
            except RayTaskError as e:
                ok, value = False, e
            except RayActorError as e:  # Ray gave up on this actor: it takes no more work
                ok, value = False, e
                if actor in self.actors:
                    self.actors.remove(actor)
                    self._kill(actor)
            except RayError as e:  # e.g. the result was lost: this item failed, the actor may go on
                ok, value = False, e
            yield i, ok, value

    def call(self, method: str, *args: Any) -> list:
        """`<method>(*args)` on every actor, their results in order."""
        import ray

        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            self._kill(a)
        self.actors = []

    @staticmethod
    def _kill(actor) -> None:
        import ray

        try:
            ray.kill(actor, no_restart=True)
        except ValueError:  # not an actor handle any more
            pass
