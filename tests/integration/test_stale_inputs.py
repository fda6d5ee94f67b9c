"""A stage never builds on a stale or broken artifact (issue 15's reproductions, on the tiny models).

Each test starts from a finished generate (the fixture's rows, with the manifest generate itself
would write for this config) and distill, then does what a user did to a copy of a real run.
"""
from __future__ import annotations

import logging

import pytest
import yaml

pytestmark = pytest.mark.integration


@pytest.fixture
def finished(tmp_path, tiny_teacher, tiny_student, write_train_data):
    """(config path, run dir) of a run whose generate and distill are complete for that config."""
    import time

    from refinery.core.manifest import write_manifest
    from refinery.core.runner import identity as stage_identity
    from refinery.pipeline.config import load
    from refinery.pipeline.stages import BY_NAME, run_stage

    run = tmp_path / "run"
    conf = {"run_dir": str(run), "models": {"teacher": tiny_teacher, "student": {"path": tiny_student}},
            "tasks": {"names": ["siqa", "strategyqa"], "eval_limit": 8},
            "distill": {"steps": 2, "batch_size": 2, "max_seq_len": 48, "checkpoint_every": 1,
                        "lora": {"r": 4, "alpha": 8}, "optim": {"warmup_steps": 1}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(conf))
    cfg = load(path)
    rows = write_train_data(run)
    resolved, h = stage_identity(cfg, BY_NAME["generate"])  # as if generate had made these rows
    write_manifest(run / "generate", stage="generate", config=resolved, cfg_hash=h, inputs={},
                   metrics={"rows": len(rows)}, started=time.time(), outputs=["data.jsonl"])
    assert not run_stage(cfg, "distill")["skipped"]
    return path, run


def test_a_changed_earlier_setting_refuses_by_name_instead_of_skipping(finished, capsys):
    from refinery.launch.cli import main

    path, _ = finished
    rc = main(["run", str(path), "generate.temperature=0.5", "--stages", "distill"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "generate is stale for this config" in err and "generate.temperature: 0.8 when made, 0.5 now" in err
    assert "\n" not in err.strip() and "Traceback" not in err
    # the named way out: take generate's outputs as they are (distill is then complete: skipped)
    assert main(["run", str(path), "generate.temperature=0.5", "--stages", "distill", "--reuse", "generate"]) == 0
    assert "distill    skipped" in capsys.readouterr().out


def test_truncated_training_data_is_refused_not_trained_on(finished, capsys):
    from refinery.launch.cli import main

    path, run = finished
    data = run / "generate" / "data.jsonl"
    full = data.stat().st_size
    data.write_bytes(data.read_bytes()[:2000])
    assert main(["distill", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"data.jsonl has 2000 bytes, {full} when written" in err and "refinery generate CONFIG --force" in err


def test_same_size_edit_of_the_data_is_caught_by_its_hash(finished, capsys):
    from refinery.launch.cli import main

    path, run = finished
    data = run / "generate" / "data.jsonl"
    text = data.read_text()
    data.write_text(text.replace("a", "b", 1))  # same bytes count, new mtime, other content
    assert main(["distill", str(path)]) == 2
    assert "data.jsonl has other content than when written" in capsys.readouterr().err


def test_a_deleted_adapter_reruns_distill_instead_of_reporting_it_complete(finished, caplog):
    from refinery.pipeline.config import load
    from refinery.pipeline.stages import run_stage

    path, run = finished
    adapter = run / "distill" / "adapter" / "adapter_model.safetensors"
    adapter.unlink()
    with caplog.at_level(logging.WARNING, logger="refinery"):
        assert not run_stage(load(path), "distill")["skipped"]
    assert "adapter/adapter_model.safetensors is missing: running it again" in caplog.text
    assert adapter.is_file()
    assert run_stage(load(path), "distill")["skipped"]  # intact again: skipped


def test_a_copied_run_dir_is_still_complete(finished, tmp_path):
    import shutil

    from refinery.core.manifest import verify_outputs

    _, run = finished
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, copy_function=shutil.copy)  # new mtimes, same bytes: hashes decide
    assert verify_outputs(copy / "generate") == [] and verify_outputs(copy / "distill") == []


def test_more_steps_extends_a_finished_run_from_its_last_checkpoint(finished, caplog):
    from refinery.core.manifest import read_jsonl, read_manifest
    from refinery.pipeline.config import load
    from refinery.pipeline.stages import run_stage

    path, run = finished
    before = read_jsonl(run / "distill" / "metrics.jsonl")
    with caplog.at_level(logging.INFO, logger="refinery"):
        assert not run_stage(load(path, ["distill.steps=3"]), "distill")["skipped"]
    assert "resumed from" in caplog.text and "(step 2 of 3)" in caplog.text
    assert "extending a run made for 2 steps to 3" in caplog.text
    rows = read_jsonl(run / "distill" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[:2] == before  # steps 1-2 not redone
    m = read_manifest(run / "distill")
    assert m["config"]["distill"]["steps"] == 3 and m["metrics"]["steps"] == 3
    assert not (run / "distill.new").exists()


def test_a_killed_rerun_keeps_the_finished_run_and_resumes_its_own_progress(finished, monkeypatch, caplog):
    """`distill.steps=4` killed after step 3: the 2-step run stays complete and skippable (its manifest,
    adapter, metrics and checkpoints untouched); the next 4-step run resumes at step 3 from distill.new/."""
    from refinery.core.manifest import read_jsonl, read_manifest, verify_outputs
    from refinery.pipeline.config import load
    from refinery.pipeline.stages import run_stage
    from refinery.train import trainer

    path, run = finished
    out = run / "distill"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = trainer.train_step

    def killed_at_4(s, cfg, step, seed):
        if step == 4:
            raise KeyboardInterrupt  # as a kill would: no clean-up of ours runs after it
        return real(s, cfg, step, seed)

    monkeypatch.setattr(trainer, "train_step", killed_at_4)
    with pytest.raises(KeyboardInterrupt):
        run_stage(load(path, ["distill.steps=4"]), "distill")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert verify_outputs(out) == [] and run_stage(load(path), "distill")["skipped"]
    assert [r["step"] for r in read_jsonl(run / "distill.new" / "metrics.jsonl")] == [1, 2, 3]
    monkeypatch.setattr(trainer, "train_step", real)
    with caplog.at_level(logging.INFO, logger="refinery"):
        assert not run_stage(load(path, ["distill.steps=4"]), "distill")["skipped"]
    assert "(step 3 of 4)" in caplog.text
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert read_manifest(out)["metrics"]["steps"] == 4 and not (run / "distill.new").exists()
