"""`refinery`'s one parser: a subcommand per stage of the stage table, the many-checkpoint forms as
options of quantize and evaluate, overrides wherever they are typed, clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from refinery.launch import cli, many_cli
from refinery.pipeline.stages import STAGES


def parse(argv):
    from refinery.core.config import parse_with_overrides

    return parse_with_overrides(cli._parser(), argv)


def test_every_stage_is_a_subcommand():
    for stage in STAGES:
        args = parse([stage.name, "configs/quickstart.yaml", "seed=3"])
        assert (args.cmd, args.overrides, args.handler) == (stage.name, ["seed=3"], None)


def test_many_checkpoint_forms_are_options_of_the_stage_commands(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    args = parse(["quantize", "c.yaml", "--checkpoints", str(ck), "bits=3", "--out", "o", "seed=2"])
    assert many_cli.is_many(args) and args.out.name == "o"
    # `bits=3` typed inside --checkpoints is an override (short for quantize.bits), `seed=2` after --out too
    assert many_cli.split_overrides(args) == ["seed=2", "quantize.bits=3"] and args.checkpoints == [str(ck)]
    args = parse(["evaluate", "c.yaml", "--models", "student_quant", "tasks.eval_limit=5", "--out", "o"])
    assert many_cli.split_overrides(args) == ["tasks.eval_limit=5"] and args.models == ["student_quant"]
    assert not many_cli.is_many(parse(["quantize", "c.yaml"])) and not many_cli.is_many(parse(["evaluate", "c.yaml"]))


def test_tools_parse_their_own_options():
    assert parse(["models", "pull", "qwen2.5-coder-0.5b"]).names == ["qwen2.5-coder-0.5b"]
    args = parse(["cluster", "slurm", "s.yaml", "--nodes", "2", "num_samples=4"])
    assert (args.nodes, args.overrides) == (2, ["num_samples=4"])
    args = parse(["sweep", "s.yaml", "--address", "auto", "num_samples=2"])
    assert (args.address, args.overrides) == ("auto", ["num_samples=2"])
    assert parse(["batch", "c.yaml", "--sweep", "d", "--out", "o", "--no-overlap"]).overlap is False


@pytest.mark.parametrize("argv, says", [
    (["quantize", "configs/quickstart.yaml", "--out", "o"], "--checkpoints"),  # --out alone: no many form
    (["evaluate", "configs/quickstart.yaml", "--out", "o"], "evaluate --out: give --models"),  # not ignored
    (["evaluate", "configs/quickstart.yaml", "--no-latency"], "evaluate --latency: give --models"),
    (["quantize", "configs/quickstart.yaml", "--workers", "2"], "quantize --workers: give --checkpoints"),
    (["quantize", "configs/quickstart.yaml", "--checkpoints", "a", "--sweep", "d", "--out", "o"], "not allowed"),
    (["models", "list", "extra=1"], "unrecognized"),  # a tool without overrides
])
def test_bad_command_lines_name_the_problem(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_many_forms_need_out(capsys, tmp_path):
    assert cli.main(["evaluate", "configs/quickstart.yaml", "--models", "student", f"run_dir={tmp_path}"]) == 2
    assert "--out DIR" in capsys.readouterr().err
    assert cli.main(["sweep", "status"]) == 2 and "refinery sweep status SWEEP_DIR" in capsys.readouterr().err


def test_exit_program_after_ray_keeps_the_code_and_the_output():
    """After Ray was imported the program ends through os._exit (Ray's C++ exit can deadlock): the exit
    code and everything printed or logged must still come out, and Python's exit handlers still run."""
    import os
    import subprocess
    import sys

    code = ("import atexit, logging, ray\n"
            "from refinery.launch.cli import exit_program\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "atexit.register(lambda: print('exit handler ran'))\n"
            "print('printed')\n"
            "logging.getLogger('x').info('logged')\n"
            "exit_program(3)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert out.returncode == 3, out.stderr[-2000:]
    assert out.stdout.split() == ["printed", "exit", "handler", "ran"] and "logged" in out.stderr
