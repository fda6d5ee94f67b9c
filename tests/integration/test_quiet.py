"""Third-party output is off by default and shown with -v (REFINERY_VERBOSE=1): the libraries a
stage imports print their banners and import warnings only when asked."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

IMPORTS = """
import logging
from refinery.core.proc import setup_logging
setup_logging()
import peft, transformers  # torchao and torch warnings at import
import gptqmodel  # its banner (peft brings it in when it makes LoRA layers, before our quantize code runs)
logging.getLogger("refinery").info("ours")
from transformers.utils import logging as hf_logging
print("weight bars", hf_logging.is_progress_bar_enabled())  # "Loading weights" per model load
"""
pytestmark = pytest.mark.integration
TORCH_LOG_LINE = re.compile(r"^[WI]\d{4} ", re.M)  # torch's own log format: W1204 19:00:45.06 ...


def _stderr(verbose: bool) -> str:
    from refinery.core.proc import QUIET_ENV

    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    env["REFINERY_VERBOSE"] = "1" if verbose else "0"
    out = subprocess.run([sys.executable, "-c", IMPORTS], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout + out.stderr


def test_library_noise_is_off_by_default_and_on_with_verbose():
    quiet, loud = _stderr(False), _stderr(True)
    assert "refinery ours" in quiet and "refinery ours" in loud  # our own log lines always show
    assert "GPT-QModel" in loud and "GIL is enabled" in loud
    assert "GPT-QModel" not in quiet and "GIL" not in quiet, quiet
    assert "torchao" not in quiet and not TORCH_LOG_LINE.search(quiet), quiet
    assert "weight bars False" in quiet and "weight bars True" in loud


def test_ray_actors_get_the_quiet_setting(monkeypatch):
    """Ray actors are not our subprocesses: they get the setting through the runtime env (core.proc.child_env)."""
    from refinery.core import proc
    from refinery.core.rayctl import PrivateRay

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("REFINERY_VERBOSE", "0")
    monkeypatch.setenv("TORCH_LOGS", "-all")
    with PrivateRay(num_cpus=1, prefix="rayquiet-") as ray:
        @ray.remote(num_cpus=0)
        def env():
            import os

            return {k: os.environ.get(k) for k in ("REFINERY_VERBOSE", "TORCH_LOGS", "PYTHONPATH")}

        got = ray.get(env.remote(), timeout=120)
    assert got["REFINERY_VERBOSE"] == "0" and got["TORCH_LOGS"] == "-all"
    assert got["PYTHONPATH"].split(os.pathsep)[0] == proc.ROOT


QUANTIZE = """
import sys
from refinery.core.proc import setup_logging
setup_logging()
from transformers import AutoTokenizer
from refinery.quantize.config import QuantizeConfig
from refinery.quantize.gptq import quantize_tokenized, tokenize_calibration
tok = AutoTokenizer.from_pretrained(sys.argv[1])
calib = tokenize_calibration(tok, [f"Question {i}: is the sky blue? Answer: yes, mostly." for i in range(4)], 32)
stats = quantize_tokenized(sys.argv[1], sys.argv[2], QuantizeConfig(group_size=32, calibration_samples=4), calib, tok)
print("gptq_bytes", stats["gptq_bytes"])
from logbar.terminal import render_backend_state
print("bars drawn:", not render_backend_state(stream=sys.stdout).headless)  # LogBar's per-layer bars
"""


def test_gptqmodel_dump_and_bars_only_with_verbose(tiny_student, tmp_path):
    """Into a file or pipe, GPTQModel's save prints the saved dir's files and configs, and its LogBar draws
    per-layer bars (thousands of carriage-return lines in a sweep trial's log): both only with -v."""
    out = {}
    for verbose in (False, True):
        env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TRANSFORMERS_VERBOSITY")}
        env["REFINERY_VERBOSE"] = "1" if verbose else "0"
        r = subprocess.run([sys.executable, "-c", QUANTIZE, tiny_student, str(tmp_path / f"gptq-{verbose}")], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "gptq_bytes" in r.stdout, r.stderr[-2000:]
        out[verbose] = r.stdout
    assert "Files in directory" in out[True] and "Files in directory" not in out[False], out[False][-2000:]
    # (on the 12-layer quickstart student the bars were 4240 of the 4260 lines quantize wrote to a file)
    assert "bars drawn: True" in out[True] and "bars drawn: False" in out[False], out[False][-2000:]
