"""The runner's preflight over a stage table, and a stage's own checks reached from its subcommand."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from refinery.core import runner
from refinery.core.config import ConfigError
from refinery.core.stage import Stage


def _table(seen: list[str]) -> tuple[Stage, ...]:
    def check(name):
        def f(cfg):
            seen.append(name)
            if cfg.bad == name:
                raise ConfigError(f"{name}: bad")
        return f

    def never(ctx, section):
        raise AssertionError("preflight must not run a stage")

    return (Stage("a", "a", never, preflight=check("a")),
            Stage("b", "b", never, needs=("a",), preflight=check("b"), wanted=lambda cfg: cfg.want_b),
            Stage("c", "c", never, needs=("a",), preflight=check("c")))


def test_preflight_checks_each_wanted_stage_in_table_order():
    seen = []
    runner.preflight(SimpleNamespace(bad=None, want_b=True), _table(seen))
    assert seen == ["a", "b", "c"]
    seen.clear()
    runner.preflight(SimpleNamespace(bad=None, want_b=False), _table(seen))
    assert seen == ["a", "c"]  # a stage `run` would not run is not checked


def test_preflight_of_named_stages_only_and_the_first_failure_stops_it():
    seen = []
    runner.preflight(SimpleNamespace(bad="a", want_b=True), _table(seen), ["c"])
    assert seen == ["c"]  # `refinery c` checks c, not a's (bad) settings
    seen.clear()
    with pytest.raises(ConfigError, match="b: bad"):
        runner.preflight(SimpleNamespace(bad="b", want_b=True), _table(seen))
    assert seen == ["a", "b"]


def test_evaluate_alone_refuses_3_bit_for_vllm_here_before_any_work(tmp_path, capsys):
    import torch

    from refinery.distill.engines import vllm_refusal
    from refinery.launch.cli import main

    if vllm_refusal(3, torch.cuda.is_available()) is None:
        pytest.skip("vLLM here serves 3-bit GPTQ (CUDA): nothing to refuse")
    run = tmp_path / "run"
    code = main(["evaluate", "configs/quickstart.yaml", f"run_dir={run}", "quantize.bits=3",
                 "evaluate.backend=vllm"])
    err = capsys.readouterr().err
    assert code == 2 and "quantize.bits: got 3; evaluate.backend=vllm scores student_quant" in err
    assert "evaluate.backend=hf" in err  # the fix is named
    assert not run.exists()  # nothing started
    # without the 4-bit student in the list there is nothing for vLLM to refuse
    assert main(["check", "configs/quickstart.yaml", f"run_dir={run}", "quantize.bits=3", "evaluate.backend=vllm",
                 "evaluate.models=[teacher,student]"]) == 0
