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


@pytest.mark.parametrize("verbose", [False, True])
def test_gptqmodel_save_dump_only_with_verbose(verbose, tiny_student, tmp_path, monkeypatch, capfd):
    """GPTQModel's save prints the saved dir's files and configs to stdout."""
    from transformers import AutoTokenizer

    from refinery.quantize.config import QuantizeConfig
    from refinery.quantize.gptq import quantize_tokenized

    monkeypatch.setenv("REFINERY_VERBOSE", "1" if verbose else "0")
    cfg = QuantizeConfig(method="rtn", group_size=32)
    stats = quantize_tokenized(tiny_student, tmp_path / "rtn", cfg, [], AutoTokenizer.from_pretrained(tiny_student))
    assert stats["gptq_bytes"] > 0 and (tmp_path / "rtn" / "config.json").is_file()
    out = capfd.readouterr().out
    assert ("Files in directory" in out) == verbose, out[-2000:]
