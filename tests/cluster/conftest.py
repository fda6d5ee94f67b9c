"""`slurm_cluster`: a real one-node Slurm on localhost for the session (skips when not installed).

Install it with `scripts/install-slurm.sh` (root). The cluster's client commands find it through
$SLURM_CONF, set for the session and restored afterwards; teardown cancels its jobs and stops only
the daemons it started.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import slurm_fixture


@pytest.fixture(scope="session")
def slurm_cluster():
    why = slurm_fixture.missing()
    if why:
        pytest.skip(why)
    cluster = slurm_fixture.start(Path(tempfile.mkdtemp(prefix="refinery-slurm-")))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture
def two_node_slurm(two_hosts):
    """A real Slurm over two simulated hosts: slurmctld + slurmd node-0 on one, slurmd node-1 on the other."""
    why = slurm_fixture.missing()
    if why:
        pytest.skip(why)
    # a short root: slurmstepd's socket path (spool dir + node + job) must stay under 108 characters,
    # which a tmp_path under xdist (/tmp/pytest-of-root/pytest-N/popen-gwN/...) does not
    cluster = slurm_fixture.start_on_hosts(Path(tempfile.mkdtemp(prefix="rfs-")), two_hosts)
    yield cluster
    cluster.stop()
