"""Manifests and the runner: atomic writes, skip when complete, re-run when config or inputs change."""
import json

import pytest

from refinery.core import manifest
from refinery.core.stage import Result
from refinery.launch import stages
from refinery.launch.config import load


def test_atomic_path_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with manifest.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # temp dir cleaned up
    manifest.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}


def test_atomic_path_replaces_a_directory(tmp_path):
    d = tmp_path / "model"
    for content in ("v1", "v2"):
        with manifest.atomic_path(d) as tmp:
            tmp.mkdir()
            (tmp / "w.txt").write_text(content)
    assert (d / "w.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


CALLS = []


def toy_generate(ctx, cfg):
    CALLS.append("generate")
    (ctx.stage_dir("generate") / "data.jsonl").write_text('{"x": 1}\n')
    return Result({"rows": 1}, ["data.jsonl"])


def toy_distill(ctx, cfg):
    CALLS.append("distill")
    return Result({"steps": cfg.steps}, [])


@pytest.fixture
def toy_stages(monkeypatch):
    CALLS.clear()
    toy = (stages.Stage("generate", "generate", f"{__name__}:toy_generate", ()),
           stages.Stage("distill", "distill", f"{__name__}:toy_distill", ("generate",)))
    monkeypatch.setattr(stages, "STAGES", toy)
    monkeypatch.setattr(stages, "BY_NAME", {s.name: s for s in toy})


def test_runner_skips_complete_stages_and_reruns_on_change(tmp_path, toy_stages):
    cfg = load(None, [f"run_dir={tmp_path}"])
    stages.run_pipeline(cfg)
    assert CALLS == ["generate", "distill"]
    m = manifest.read_manifest(tmp_path / "distill")
    assert m["status"] == "complete" and m["metrics"] == {"steps": cfg.distill.steps}
    assert m["inputs"]["generate"] == manifest.manifest_hash(tmp_path / "generate")
    assert "torch" in m["versions"]

    stages.run_pipeline(cfg)  # same config: nothing runs
    assert CALLS == ["generate", "distill"]

    stages.run_pipeline(load(None, [f"run_dir={tmp_path}", "distill.steps=3"]))  # only distill changed
    assert CALLS == ["generate", "distill", "distill"]

    stages.run_pipeline(load(None, [f"run_dir={tmp_path}", "distill.steps=3", "generate.temperature=0.5"]))
    assert CALLS[-2:] == ["generate", "distill"]  # new data -> distill input hash changed


def test_stage_without_its_input_fails_clearly(tmp_path, toy_stages):
    cfg = load(None, [f"run_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="run the stage that produces it first"):
        stages.run_stage(cfg, "distill")
    (tmp_path / "generate").mkdir()
    (tmp_path / "generate" / "manifest.json").write_text("{truncated")  # a crash mid-write elsewhere
    with pytest.raises(FileNotFoundError):
        stages.run_stage(cfg, "distill")
