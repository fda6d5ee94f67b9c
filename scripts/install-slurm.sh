#!/usr/bin/env bash
# Install Slurm (slurmctld, slurmd, client commands) and munge from Debian's packages, for the
# one-node test cluster in tests/cluster/ (`refinery cluster slurm` itself needs only sbatch).
#
#   sudo scripts/install-slurm.sh      # or as root; does nothing when both are already installed
#
# The packages' own services are not used: the tests start slurmctld/slurmd with their own
# slurm.conf in a temp dir (see tests/cluster/slurm_fixture.py).
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
  echo "[install-slurm] already installed: $(slurmctld -V 2>/dev/null || echo slurmctld)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "[install-slurm] needs root (apt-get): run it with sudo" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
# The packages may start their services with the default config; stop them so only the tests'
# daemons run (no-op without systemd or when they failed to start).
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now slurmctld slurmd >/dev/null 2>&1 || true
fi
echo "[install-slurm] installed: $(slurmctld -V)"
