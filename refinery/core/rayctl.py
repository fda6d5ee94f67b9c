"""This process's Ray, started the one way every command of ours starts it.

    with PrivateRay(num_cpus=4, prefix="rayq-") as ray:   # or: r = PrivateRay(...); r.start(); ...; r.stop()
        ...

- A Ray already initialized in this process is used as it is (and left running).
- Else `address` (or RAY_ADDRESS, unless `join_env=False`) names a cluster to join.
- Else a new local instance of our own (`address="local"`): never a Ray that happens to run on
  the machine. Its temp dir is short (Ray's socket paths must stay < 107 characters): `temp_dir`
  if given (kept), else a fresh `/tmp/<prefix>XXXX` (removed at stop).

`stop()` shuts down only a Ray that `start()` started.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from refinery.core.proc import child_env


class PrivateRay:
    def __init__(self, num_cpus: int | None = None, prefix: str = "rayr-", temp_dir: str | None = None,
                 address: str | None = None, log_to_driver: bool = False, join_env: bool = True):
        self.num_cpus, self.prefix, self.temp_dir = num_cpus, prefix, temp_dir
        self.address, self.log_to_driver, self.join_env = address, log_to_driver, join_env
        self.started = False
        self._made_tmp: str | None = None

    def start(self):
        import ray

        if ray.is_initialized():
            return ray
        address = self.address or (os.environ.get("RAY_ADDRESS") if self.join_env else None)
        if address:
            ray.init(address=address, log_to_driver=self.log_to_driver, runtime_env={"env_vars": child_env()})
        else:
            tmp = self.temp_dir
            if tmp is None:
                tmp = self._made_tmp = tempfile.mkdtemp(prefix=self.prefix, dir="/tmp")
            ray.init(address="local", num_cpus=self.num_cpus or os.cpu_count() or 1, include_dashboard=False,
                     _temp_dir=tmp, log_to_driver=self.log_to_driver, runtime_env={"env_vars": child_env()})
        self.started = True
        return ray

    def stop(self) -> None:
        import ray

        if self.started:
            ray.shutdown()
            self.started = False
        if self._made_tmp:
            shutil.rmtree(self._made_tmp, ignore_errors=True)
            self._made_tmp = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def default_workers() -> int:
    """Ray actors for a worker pool (GPTQ, vLLM evaluation): one per GPU; one on CPU (a second CPU
    worker only splits the same cores)."""
    import torch

    return max(torch.cuda.device_count(), 1)
