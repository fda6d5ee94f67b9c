"""Manifests and the runner: atomic writes, skip when complete, re-run when config or inputs change."""
import json

import pytest

from refinery.core import manifest
from refinery.core.stage import Result, Stage
from refinery.pipeline import stages
from refinery.pipeline.config import load


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
    toy = (Stage("generate", "generate", toy_generate), Stage("distill", "distill", toy_distill, ("generate",)))
    monkeypatch.setattr(stages, "STAGES", toy)


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
    with pytest.raises(FileNotFoundError, match="distill needs the outputs of generate.*run `refinery generate CONFIG`"):
        stages.run_stage(cfg, "distill")
    (tmp_path / "generate").mkdir()
    (tmp_path / "generate" / "manifest.json").write_text("{truncated")  # a crash mid-write elsewhere
    with pytest.raises(FileNotFoundError):
        stages.run_stage(cfg, "distill")


def test_verify_outputs_names_each_missing_truncated_or_edited_file(tmp_path):
    import os
    import time

    from refinery.core.manifest import verify_outputs, write_manifest

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "data.jsonl").write_text('{"a": 1}\n')
    (tmp_path / "gone.txt").write_text("bye")
    write_manifest(tmp_path, stage="s", config={}, cfg_hash="h", inputs={}, metrics={}, started=time.time(),
                   outputs=["model", "data.jsonl", "gone.txt", "never-written.txt"])
    assert verify_outputs(tmp_path) == []
    os.utime(tmp_path / "data.jsonl", ns=(1, 1))  # new mtime, same bytes: the hash says intact
    assert verify_outputs(tmp_path) == []
    (tmp_path / "model" / "w.safetensors").write_bytes(b"x" * 60)
    (tmp_path / "data.jsonl").write_text('{"a": 2}\n')
    (tmp_path / "gone.txt").unlink()
    assert verify_outputs(tmp_path) == ["data.jsonl has other content than when written", "gone.txt is missing",
                                        "model/w.safetensors has 60 bytes, 100 when written"]


def test_a_manifest_without_file_records_or_unreadable_is_not_verified(tmp_path):
    from refinery.core.manifest import verify_outputs

    (tmp_path / "manifest.json").write_text('{"status": "complete"}')
    assert "records no output files" in verify_outputs(tmp_path)[0]
    (tmp_path / "manifest.json").write_text('{"status": "compl')
    assert "missing or unreadable" in verify_outputs(tmp_path)[0]


def test_stale_keys_lists_what_changed_and_ignores_the_process_layout():
    from refinery.core.runner import stale_keys

    made = {"seed": 0, "generate": {"temperature": 0.8, "top_p": 0.95}, "distill": {"parallel": {"nproc": 1}}}
    now = {"seed": 1, "generate": {"temperature": 0.8}, "distill": {"parallel": {"nproc": 2}}}
    assert stale_keys(made, now) == ["generate.top_p: 0.95 when made, '(unset)' now", "seed: 0 when made, 1 now"]


def test_a_failed_rerun_leaves_the_last_complete_outputs_untouched(tmp_path, monkeypatch):
    from refinery.core.manifest import read_manifest, verify_outputs
    from refinery.core.stage import Result
    from refinery.distill import generate
    from refinery.pipeline.config import load
    from refinery.pipeline.stages import run_stage

    cfg = load(None, [f"run_dir={tmp_path / 'run'}"])
    out = tmp_path / "run" / "generate"

    def good(text):
        def run(ctx, _):
            (ctx.stage_dir("generate") / "data.jsonl").write_text(text)
            return Result(metrics={"text": text}, outputs=["data.jsonl"])
        return run

    def bad(ctx, _):
        (ctx.stage_dir("generate") / "data.jsonl").write_text('{"instruction": "half')  # killed mid-write, say
        raise RuntimeError("teacher crashed")

    first = '{"instruction": "q", "output": "a"}\n'
    monkeypatch.setattr(generate, "run", good(first))
    assert run_stage(cfg, "generate")["skipped"] is False and (out / "manifest.json").is_file()
    assert run_stage(cfg, "generate")["skipped"] is True
    monkeypatch.setattr(generate, "run", bad)
    with pytest.raises(RuntimeError, match="teacher crashed"):
        run_stage(cfg, "generate", force=True)
    # the last good state: its manifest, its files as written; the failed attempt stays aside
    assert (out / "data.jsonl").read_text() == first and verify_outputs(out) == []
    assert read_manifest(out)["metrics"] == {"text": first}
    assert (tmp_path / "run" / "generate.new" / "data.jsonl").is_file()
    assert run_stage(cfg, "generate")["skipped"] is True  # same config: still complete
    second = '{"instruction": "q2", "output": "a2"}\n'
    monkeypatch.setattr(generate, "run", good(second))
    assert run_stage(cfg, "generate", force=True)["skipped"] is False
    assert (out / "data.jsonl").read_text() == second and read_manifest(out)["metrics"] == {"text": second}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["generate"]  # staging swapped in, old gone


def test_staging_carries_resume_files_and_completes_an_interrupted_swap(tmp_path):
    import os

    from refinery.core import staging
    from refinery.core.manifest import write_json

    out = tmp_path / "distill"
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "checkpoints" / "step-000002" / "adapter.safetensors").write_bytes(b"w" * 10)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "adapter").mkdir()
    write_json(out / "manifest.json", {"status": "complete"})
    assert staging.begin(tmp_path / "fresh", ("checkpoints",)) == tmp_path / "fresh"  # a first run: in place
    new = staging.begin(out, ("checkpoints", "metrics.jsonl", "qat_diagnostics.jsonl"))
    assert new == tmp_path / "distill.new" and sorted(p.name for p in new.iterdir()) == ["checkpoints", "metrics.jsonl"]
    ck_old, ck_new = (d / "checkpoints" / "step-000002" / "adapter.safetensors" for d in (out, new))
    assert os.stat(ck_old).st_ino == os.stat(ck_new).st_ino  # replaced, never rewritten: linked
    with (new / "metrics.jsonl").open("a") as f:  # appended to: a copy, the original is untouched
        f.write('{"step": 2}\n')
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    # killed between the two renames of the swap: the next run finds the complete staging dir and moves it in
    write_json(new / "manifest.json", {"status": "complete", "run": 2})
    out.rename(tmp_path / ".distill.old.123")
    staging.recover(out)
    assert json.loads((out / "manifest.json").read_text())["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distill", "fresh"]


def test_read_jsonl_prefix_stops_at_a_torn_last_line(tmp_path):
    from refinery.core.manifest import read_jsonl_prefix

    log = tmp_path / "metrics.jsonl"
    assert read_jsonl_prefix(log) == []
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl_prefix(log)] == [1, 2]
