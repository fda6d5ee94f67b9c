"""The whole pipeline through the real CLI on tiny real models: outputs, skip on re-run, kill and resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

STAGES = ["generate", "distill", "quantize", "evaluate", "report"]


def _overrides(run_dir, teacher, student, steps=4):
    return [f"run_dir={run_dir}", f"models.teacher={teacher}", f"models.student.path={student}",
            "tasks.names=[siqa,strategyqa]", "tasks.eval_limit=12",
            "generate.engine=hf", "generate.seeds_per_task=2", "generate.subtopics_per_seed=1",
            "generate.pairs_per_subtopic=2", "generate.max_new_tokens=32", "generate.score_threshold=0",
            f"distill.steps={steps}", "distill.batch_size=2", "distill.max_seq_len=64",
            "distill.checkpoint_every=2", "quantize.calibration_samples=8", "quantize.calibration_max_len=64",
            "evaluate.latency.new_tokens=4", "evaluate.latency.repeats=1", "evaluate.latency.prompt_tokens=16"]


def _refinery(*args, timeout=900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "refinery.launch.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_teacher, tiny_student):
    """A run dir where every stage of the tiny pipeline is complete, made through the CLI."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    res = _refinery("run", "configs/quickstart.yaml", *_overrides(run_dir, tiny_teacher, tiny_student))
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def test_run_end_to_end_then_skip(finished_run, tiny_teacher, tiny_student):
    run_dir = finished_run
    for stage in STAGES:
        m = json.loads((run_dir / stage / "manifest.json").read_text())
        assert m["status"] == "complete" and m["stage"] == stage
    assert (run_dir / "generate" / "data.jsonl").stat().st_size > 0
    assert (run_dir / "distill" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "quantize" / "gptq" / "config.json").is_file()
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    assert set(results["models"]) == {"teacher", "student_base", "student", "student_quant"}
    for entry in results["models"].values():
        for task in ("siqa", "strategyqa"):
            assert 0.0 <= entry["tasks"][task]["acc"] <= 1.0
    report = (run_dir / "report" / "REPORT.md").read_text()
    assert "student_quant" in report and "Fidelity:" in report
    assert list((run_dir / "report").glob("*.png"))

    again = _refinery("run", "configs/quickstart.yaml", *_overrides(run_dir, tiny_teacher, tiny_student))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") == len(STAGES), again.stdout


def test_kill_during_distill_then_resume(tmp_path, tiny_teacher, tiny_student):
    run_dir = tmp_path / "run"
    args = _overrides(run_dir, tiny_teacher, tiny_student, steps=40)
    assert _refinery("generate", "configs/quickstart.yaml", *args).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "refinery.launch.cli", "distill", "configs/quickstart.yaml",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run_dir / "distill" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts.is_dir() and any(ckpts.glob("step-*"))):
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(ckpts.glob("step-*")), "no checkpoint before the kill"
    assert not (run_dir / "distill" / "manifest.json").exists()

    res = _refinery("run", "configs/quickstart.yaml", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "generate: complete for this config, skipped" in res.stderr + res.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and len(steps) == 40  # resumed: no step lost, none repeated
    assert (run_dir / "report" / "REPORT.md").is_file()


class WouldRun(Exception):
    pass


def _would_run(ctx, cfg):
    raise WouldRun(next(iter(ctx.dirs)))


def test_every_broken_artifact_is_rerun_or_refused_never_taken_as_complete(finished_run, tiny_teacher,
                                                                          tiny_student, monkeypatch, capsys):
    """Fuzz: truncate or overwrite each output file of each finished stage in turn. `refinery run`
    then runs that stage again (the earlier ones are skipped), and a later stage run alone refuses
    with one line naming the file. Each file is restored before the next (stage work stubbed out)."""
    import dataclasses
    import shutil

    from refinery.launch.cli import main
    from refinery.pipeline import stages
    from refinery.pipeline.config import load

    args = _overrides(finished_run, tiny_teacher, tiny_student)
    cfg = load("configs/quickstart.yaml", args)
    stubbed = tuple(dataclasses.replace(s, run=_would_run) for s in stages.STAGES)
    monkeypatch.setattr(stages, "STAGES", stubbed)
    later = {"generate": "distill", "distill": "quantize", "quantize": "evaluate", "evaluate": "report"}
    checked = 0
    for stage in STAGES:
        out = finished_run / stage
        files = json.loads((out / "manifest.json").read_text())["files"]
        assert files, stage
        for n, rel in enumerate(sorted(files)):
            f = out / rel
            data, st = f.read_bytes(), f.stat()
            if n % 2 and data:  # same size, other bytes: only the hash can tell
                f.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
            else:
                f.write_bytes(data[: len(data) // 2])
            try:
                with pytest.raises(WouldRun) as ran:
                    stages.run_pipeline(cfg)
                assert ran.value.args[0] == stage, f"{rel}: {ran.value.args[0]} ran first"
                if stage in later:
                    capsys.readouterr()
                    assert main(["run", "configs/quickstart.yaml", *args, "--stages", later[stage]]) == 2, rel
                    err = capsys.readouterr().err
                    ours = [line for line in err.splitlines() if line.startswith("refinery:")]  # not torch's warnings
                    assert len(ours) == 1 and rel in ours[0] and "--force" in ours[0], err
                    assert "Traceback" not in err, err
            finally:
                f.write_bytes(data)
                os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
                shutil.rmtree(finished_run / f"{stage}.new", ignore_errors=True)
            checked += 1
    assert checked >= 10
    assert [r["skipped"] for r in stages.run_pipeline(cfg)] == [True] * len(STAGES)  # all restored, intact
