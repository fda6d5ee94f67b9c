"""`refinery check` (and every stage command) refuses a config that cannot work, in one line, rc 2,
before any model is loaded or any file of the run is written."""
from __future__ import annotations

import pytest


@pytest.fixture
def check(tmp_path, capsys, tiny_student):
    from refinery.launch.cli import main

    conf = tmp_path / "run.yaml"
    conf.write_text(f"run_dir: {tmp_path / 'run'}\nmodels:\n  teacher: {tiny_student}\n  student:\n"
                    f"    path: {tiny_student}\n")

    def run(*overrides, cmd="check", config=conf):
        rc = main([cmd, str(config), *overrides])
        err = capsys.readouterr().err.strip()
        return rc, err

    return run


def test_a_good_config_passes(check):
    assert check()[0] == 0


@pytest.mark.parametrize("override, message", [
    ("quantize.group_size=128", "quantize.group_size: 128 does not divide the input width 576"),
    ("models.teacher=/nonexistent/teacher", "models.teacher: path '/nonexistent/teacher' not found"),
    ("models.student.path=/tmp", "models.student.path: '/tmp' holds no model (no config.json)"),
    ("models.teacher=/nowhere/model.gguf", "models.teacher: GGUF file '/nowhere/model.gguf' not found"),
    ("tasks.names=[nonexistent_task]", "tasks.names: 'nonexistent_task' is neither a bundled task"),
])
def test_each_bad_value_is_one_line_naming_the_key(check, tmp_path, override, message):
    rc, err = check(override)
    assert rc == 2 and message in err and "\n" not in err and "Traceback" not in err
    # the stage commands check the same before any work, and write nothing
    if not override.startswith("tasks"):
        assert check(override, cmd="run")[0] == 2
        assert not (tmp_path / "run").exists()


def test_run_dir_that_is_a_file_and_an_empty_config(check, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, err = check(f"run_dir={afile}")
    assert rc == 2 and "run_dir: " in err and "is a file, not a directory" in err
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    rc, err = check(config=empty)
    assert rc == 2 and "is empty" in err


def test_an_unknown_bare_model_name_offline(check, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, err = check("models.teacher=someorg/not-a-model")
    assert rc == 2 and "is not a registry name" in err and "refinery models import" in err


def test_a_model_that_needs_its_own_code_names_trust_remote_code(check, tmp_path, tiny_student):
    import json
    from pathlib import Path

    custom = tmp_path / "custom"
    custom.mkdir()
    for f in Path(tiny_student).iterdir():
        (custom / f.name).symlink_to(f)
    conf = json.loads((Path(tiny_student) / "config.json").read_text())
    (custom / "config.json").unlink()
    (custom / "config.json").write_text(json.dumps({**conf, "auto_map": {"AutoModelForCausalLM": "m.Model"}}))
    rc, err = check(f"models.teacher={custom}")
    assert rc == 2 and "models.teacher: " in err and "models.trust_remote_code=true" in err and "\n" not in err
    assert check(f"models.teacher={custom}", "models.trust_remote_code=true")[0] == 0


def test_a_truncated_weight_file_is_named_before_any_work(check, tmp_path, tiny_student):
    import shutil
    from pathlib import Path

    broken = tmp_path / "broken"
    shutil.copytree(tiny_student, broken)
    weights = broken / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size - 4096)
    for cmd in ("check", "run"):
        rc, err = check(f"models.student.path={broken}", cmd=cmd)
        assert rc == 2 and "models.student.path: " in err and str(weights) in err and "truncated" in err
        assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    Path(weights).write_bytes(b"not a safetensors file at all")  # garbage header, same message shape
    rc, err = check(f"models.student.path={broken}")
    assert rc == 2 and str(weights) in err and "\n" not in err


def test_a_bad_data_row_is_one_line_naming_file_and_line(check, tmp_path, write_train_data):
    import json
    import time

    from refinery.core.manifest import write_manifest

    rows = write_train_data(tmp_path / "run")
    data = tmp_path / "run" / "generate" / "data.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[3] = json.dumps({**rows[3], "output": ""})
    data.write_text("\n".join(lines) + "\n")  # a user's own rows, taken as they are (external)
    write_manifest(data.parent, stage="generate", config={}, cfg_hash="user", inputs={}, external=True,
                   metrics={}, started=time.time(), outputs=["data.jsonl"])
    rc, err = check("distill.steps=1", cmd="distill")
    assert rc == 2 and f"{data}:4 lacks non-empty output" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "distill" / "adapter").exists()
    data.write_text("\n".join(lines[:2] + ["{not json"]) + "\n")
    write_manifest(data.parent, stage="generate", config={}, cfg_hash="user", inputs={}, external=True,
                   metrics={}, started=time.time(), outputs=["data.jsonl"])
    rc, err = check("distill.steps=1", cmd="distill")
    assert rc == 2 and f"{data}:3 is not valid JSON" in err
    data.write_text("\n")  # emptied: not blamed on generate's score threshold (generate never writes this)
    write_manifest(data.parent, stage="generate", config={}, cfg_hash="user", inputs={}, external=True,
                   metrics={}, started=time.time(), outputs=["data.jsonl"])
    rc, err = check("distill.steps=1", cmd="distill")
    assert rc == 2 and f"{data} holds no rows" in err and "score_threshold" not in err
