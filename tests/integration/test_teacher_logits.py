"""The teacher-logits stage and distill from its cache, on the tiny real models.

The cache is made with a copy of the tiny teacher whose weights are then deleted: distill with
teacher_source=topk still trains, so it never loads the teacher.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from refinery.core.config import ConfigError
from refinery.core.manifest import read_jsonl, write_jsonl, write_manifest
from refinery.core.tasks import split
from refinery.pipeline.config import load
from refinery.pipeline.stages import run_stage

pytestmark = pytest.mark.integration

K, ROWS, PER_SHARD, SEQ = 16, 12, 5, 48
STEPS = 8


def _write_data(run_dir: Path, rows_per_task: int = ROWS // 2) -> None:
    rows = []
    for task in ("siqa", "strategyqa"):
        for it in split(task, 0.5)[0][:rows_per_task]:
            rows.append({"instruction": it.question, "input": "", "output": it.choices[it.answer],
                         "task": task, "score": 8.0})
    write_jsonl(run_dir / "generate" / "data.jsonl", rows)
    write_manifest(run_dir / "generate", stage="generate", config={}, cfg_hash="fixture", inputs={}, external=True,
                   metrics={"rows": len(rows)}, started=time.time(), outputs=["data.jsonl"])


def _cfg(run_dir: Path, teacher: str, student: str, *extra: str):
    return load(None, [f"run_dir={run_dir}", f"models.teacher={teacher}", f"models.student.path={student}",
                       "tasks.names=[siqa, strategyqa]", "tasks.eval_limit=20",
                       f"teacher_logits.k={K}", f"teacher_logits.rows_per_shard={PER_SHARD}",
                       f"teacher_logits.max_seq_len={SEQ}", "teacher_logits.batch_size=4",
                       "teacher_logits.engine=hf", "teacher_logits.temperature=2.0",
                       "distill.teacher_source=topk", f"distill.steps={STEPS}", "distill.batch_size=2",
                       f"distill.max_seq_len={SEQ}", "distill.checkpoint_every=100", "distill.lora.r=4",
                       "distill.lora.alpha=8", "distill.optim.warmup_steps=2", "distill.loss.temperature=2.0",
                       *extra])


def _seqs(cfg):
    from transformers import AutoTokenizer

    from refinery.train.data import load_rows, tokenize_rows

    tok = AutoTokenizer.from_pretrained(cfg.models.student.path)
    rows = load_rows(cfg.context().stage_dir("generate") / "data.jsonl")
    return tokenize_rows(rows, tok, cfg.distill.max_seq_len)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: several times faster for tiny models on shared cores (see test_distill.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_teacher, tiny_student):
    """A run whose teacher-logits stage is done, made with a teacher copy: (cfg, teacher copy, shards)."""
    tmp = tmp_path_factory.mktemp("topk")
    teacher = tmp / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    cfg = _cfg(tmp / "run", str(teacher), tiny_student)
    _write_data(tmp / "run")
    assert run_stage(cfg, "teacher-logits")["skipped"] is False
    return cfg, teacher


def test_stage_writes_shards_and_index(cached):
    from safetensors.torch import load_file

    cfg, _ = cached
    out = cfg.context().stage_dir("teacher-logits")
    index = json.loads((out / "index.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    names = [f"shard-{s:05d}.safetensors" for s in range(3)]  # 12 examples, 5 per shard
    assert sorted(p.name for p in out.iterdir()) == sorted(["index.json", "manifest.json", *names])
    assert [s["rows"] for s in index["shards"]] == [[0, 5], [5, 10], [10, 12]]
    assert (index["k"], index["temperature"], index["tail"], index["max_seq_len"]) == (K, 2.0, "exact", SEQ)
    seqs = _seqs(cfg)
    assert [e["positions"] for e in index["examples"]] == [len(s) - 1 for s in seqs]
    m = manifest["metrics"]
    assert m["rows"] == ROWS and m["tokens"] == sum(map(len, seqs)) and m["positions"] == m["tokens"] - ROWS
    assert m["engine"] == "hf" and m["reused_shards"] == 0
    shard_bytes = sum(s["bytes"] for s in index["shards"])
    assert m["bytes"] == shard_bytes + (out / "index.json").stat().st_size
    # Per position k * (2 + 4) + 4 bytes of tensors; safetensors headers add a few hundred per shard.
    assert m["positions"] * (K * 6 + 4) < shard_bytes < m["positions"] * (K * 6 + 4) + 3 * 1000
    t = load_file(out / names[0])
    assert t["values"].dtype == torch.float16 and t["indices"].dtype == torch.int32
    assert (t["values"][:, 0] == 0).all() and (t["values"][:, 1:] <= t["values"][:, :-1]).all()
    assert t["offsets"].tolist()[-1] == t["values"].shape[0] == index["shards"][0]["positions"]
    # the mean tail mass reported is the mean of the stored tails (over all shards)
    tails = torch.cat([load_file(out / n)["log_tail"] for n in names]).double().exp()
    assert 0 < m["mean_tail_mass"] < 1 and m["mean_tail_mass"] == pytest.approx(tails.mean().item(), abs=1e-4)


def test_cache_matches_the_live_teacher(cached, tiny_teacher):
    """Stored top-k, tail and the KD loss from the cache equal those from the teacher's own logits."""
    from transformers import AutoModelForCausalLM

    from refinery.train.data import collate
    from refinery.train.teacher_logits import topk_of_logits
    from refinery.train.topk import TopkTeacher, topk_kd_loss

    cfg, _ = cached
    seqs = _seqs(cfg)
    rows = [7, 2]
    ids, attn = collate([seqs[i] for i in rows], 0)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    with torch.no_grad():
        live = teacher(input_ids=ids, attention_mask=attn).logits
    cache = TopkTeacher(cfg.context().stage_dir("teacher-logits"), seqs, cfg.distill, torch.device("cpu"))
    for j, i in enumerate(rows):
        v, ix, lt = topk_of_logits(live[j, :len(seqs[i]) - 1], K, 2.0)
        cv, cix, clt = cache._example(i)
        assert torch.equal(cix.long(), ix)
        torch.testing.assert_close(cv.float(), v, rtol=1e-3, atol=2e-3)  # float16 storage
        torch.testing.assert_close(clt, lt, rtol=0, atol=1e-4)
    labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
    mask = torch.cat([attn[:, 1:], torch.zeros_like(attn[:, :1])], 1).bool()
    student = torch.randn(*ids.shape, live.shape[-1])
    got = cache.kd_loss(student, rows, ids, attn, labels, mask, cfg.distill.loss)
    flat = [topk_of_logits(live[j], K, 2.0) for j in range(len(rows))]
    want = topk_kd_loss(student, *(torch.stack(t) for t in zip(*flat)), labels, mask, temperature=2.0)
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-3)


def test_distill_from_cache_trains_without_the_teacher(cached):
    cfg, teacher = cached
    for f in teacher.glob("*.safetensors"):  # any load of the teacher's weights would now fail
        f.unlink()
    assert run_stage(cfg, "distill")["skipped"] is False
    out = cfg.context().stage_dir("distill")
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.7 * first, (first, last)  # measured: 4.13 -> 1.94
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert "teacher-logits" in manifest["inputs"]


@pytest.mark.parametrize("change,match", [
    ("distill.loss.temperature=1.0", r"teacher_logits.temperature=2.0 but distill.loss.temperature=1.0"),
    ("distill.max_seq_len=32", r"teacher_logits.max_seq_len=48 but distill.max_seq_len=32"),
    ("data", r"holds 12 examples, the training data has 11"),
    ("tokens", r"other tokens than training example 3"),
    ("k", r"has k=16.*teacher_logits.k=8"),
])
def test_a_cache_for_other_settings_is_refused(cached, tiny_student, change, match):
    from refinery.train.topk import TopkTeacher

    cfg, _ = cached
    seqs = _seqs(cfg)
    expect = None
    if change == "data":
        seqs = seqs[:-1]
    elif change == "tokens":
        seqs[3] = seqs[3][:-1]
    elif change == "k":
        expect = _cfg(Path("x"), "t", tiny_student, "teacher_logits.k=8").teacher_logits
    distill = cfg.distill
    if change.startswith("distill."):
        # the whole config is refused at load, naming both settings ...
        with pytest.raises(ConfigError, match=change.split("=")[0].replace("distill.", "")):
            _cfg(cfg.context().run_dir, cfg.models.teacher, tiny_student, change)
        # ... and the cache itself refuses a distill config that differs from it
        key, value = change.removeprefix("distill.").split("=")
        if key == "loss.temperature":
            distill = replace(distill, loss=replace(distill.loss, temperature=float(value)))
        else:
            distill = replace(distill, max_seq_len=int(value))
    with pytest.raises(ValueError, match=match) as e:
        TopkTeacher(cfg.context().stage_dir("teacher-logits"), seqs, distill, torch.device("cpu"), expect=expect)
    assert "refinery teacher-logits CONFIG" in str(e.value)
    # renorm uses no tail, so any temperature is served by the same cache
    if change.startswith("distill.loss.temperature"):
        renorm = _cfg(cfg.context().run_dir, cfg.models.teacher, tiny_student, change, "distill.topk_tail=renorm")
        TopkTeacher(cfg.context().stage_dir("teacher-logits"), seqs, renorm.distill, torch.device("cpu"))


def test_killed_run_leaves_nothing_that_loads_and_resumes(tmp_path, tiny_teacher, tiny_student, monkeypatch):
    """Kill after shard 1: no index (distill refuses); temp dirs are cleaned; finished shards reused."""
    from safetensors.torch import load_file

    from refinery.train import teacher_logits as tl
    from refinery.train.topk import TopkTeacher

    cfg = _cfg(tmp_path / "run", tiny_teacher, tiny_student)
    _write_data(tmp_path / "run")
    out = cfg.context().stage_dir("teacher-logits")
    real, written = tl._write_shard, []

    def dying(path, *args):
        if written:
            raise KeyboardInterrupt("killed")
        real(path, *args)
        written.append(path.name)

    monkeypatch.setattr(tl, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "teacher-logits")
    monkeypatch.setattr(tl, "_write_shard", real)
    assert written == ["shard-00000.safetensors"] and not (out / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="run `refinery teacher-logits CONFIG` first"):
        TopkTeacher(out, _seqs(cfg), cfg.distill, torch.device("cpu"))
    # What a SIGKILL mid-write leaves: a temp dir with a partial file; and a damaged shard-00001.
    partial = out / ".shard-00001.safetensors.abc123"
    partial.mkdir()
    (partial / "shard-00001.safetensors").write_bytes(b"\x00" * 100)
    (out / "shard-00001.safetensors").write_bytes(b"not a shard")
    before = load_file(out / "shard-00000.safetensors")

    assert run_stage(cfg, "teacher-logits")["skipped"] is False
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["reused_shards"] == 1 and metrics["shards"] == 3
    assert not partial.exists() and not list(out.glob(".*"))
    assert load_file(out / "shard-00000.safetensors")["values"].equal(before["values"])
    TopkTeacher(out, _seqs(cfg), cfg.distill, torch.device("cpu"))  # loads


def test_a_cache_without_tail_serves_renorm_only(cached, tmp_path):
    """What vLLM writes at T != 1 (no tail mass): bucket refused with the fix named, renorm trains."""
    from refinery.train.topk import TopkTeacher

    cfg, _ = cached
    cache = tmp_path / "teacher-logits"
    shutil.copytree(cfg.context().stage_dir("teacher-logits"), cache)
    index = json.loads((cache / "index.json").read_text())
    (cache / "index.json").write_text(json.dumps({**index, "engine": "vllm", "tail": "none"}))
    with pytest.raises(ValueError, match="has no tail mass.*distill.topk_tail=renorm"):
        TopkTeacher(cache, _seqs(cfg), cfg.distill, torch.device("cpu"))
    renorm = _cfg(cfg.context().run_dir, cfg.models.teacher, cfg.models.student.path, "distill.topk_tail=renorm")
    TopkTeacher(cache, _seqs(cfg), renorm.distill, torch.device("cpu"))


def test_vllm_cache_equals_hf_at_temperature_1(tmp_path, tiny_teacher, tiny_student):
    """vLLM prompt log-probs give the same top-k and tail as transformers at T = 1 (~20 s: engine start)."""
    from safetensors.torch import load_file

    from refinery.distill.engines import vllm_available

    if not vllm_available():
        pytest.skip("vLLM not installed")
    caches = {}
    for engine in ("hf", "vllm"):
        cfg = _cfg(tmp_path / engine, tiny_teacher, tiny_student, f"teacher_logits.engine={engine}",
                   "teacher_logits.temperature=1.0", "distill.loss.temperature=1.0",
                   "teacher_logits.rows_per_shard=100")
        _write_data(tmp_path / engine, rows_per_task=3)
        run_stage(cfg, "teacher-logits")
        out = cfg.context().stage_dir("teacher-logits")
        assert json.loads((out / "index.json").read_text())["engine"] == engine
        caches[engine] = load_file(out / "shard-00000.safetensors")
    hf, vl = caches["hf"], caches["vllm"]
    assert (hf["indices"] == vl["indices"]).float().mean() > 0.99  # near-ties may swap places
    torch.testing.assert_close(vl["values"].float(), hf["values"].float(), rtol=0, atol=1e-2)
    torch.testing.assert_close(vl["log_tail"], hf["log_tail"], rtol=0, atol=2e-3)


def test_distill_refuses_a_cache_made_for_another_k(cached, tiny_student):
    """teacher_logits.k changed since the cache was made: distill says which stage to re-run."""
    cfg, _ = cached
    other = _cfg(cfg.context().run_dir, cfg.models.teacher, tiny_student, "teacher_logits.k=8")
    with pytest.raises(ConfigError, match=r"teacher-logits is stale for this config \(teacher_logits.k: 16 when made, 8 now\)"):
        run_stage(other, "distill", force=True)
