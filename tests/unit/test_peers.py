"""benchmarks/peers/: the comparison scripts parse their arguments and refuse a missing input by name.
(The comparisons themselves run for minutes in their own virtualenvs: BENCHMARKS.md, not the suite.)"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / "peers"


def _load(name: str):
    sys.path.insert(0, str(PEERS))
    try:
        spec = importlib.util.spec_from_file_location(f"peers_{name}", PEERS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(PEERS))


@pytest.mark.parametrize("name,option", [("distill_vs_peers", "--from"), ("quantize_vs_llmcompressor", "--from"),
                                         ("eval_vs_lmeval", "--run")])
def test_the_run_is_required_and_checked(name, option, tmp_path, capsys):
    mod = _load(name)
    assert mod.parse(["--no-run"]).no_run
    with pytest.raises(SystemExit) as e:
        mod.parse([])
    assert e.value.code == 2 and f"{option} RUN_DIR is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a dir without the stage it needs
        mod.parse([option, str(tmp_path)])
    assert "must hold" in capsys.readouterr().err


def test_eval_and_runner_arguments(tmp_path):
    (tmp_path / "quantize" / "gptq").mkdir(parents=True)
    (tmp_path / "quantize" / "gptq" / "config.json").write_text("{}")
    ev = _load("eval_vs_lmeval").parse(["--run", str(tmp_path), "--batch-size", "4"])
    assert ev.run == tmp_path and ev.batch_size == 4 and not ev.no_run
    q = _load("quant_run").parse(["quantize", "--tool", "llmcompressor", "--model", "m", "--texts", "t", "--out", "o"])
    assert (q.cmd, q.tool) == ("quantize", "llmcompressor")
    with pytest.raises(SystemExit):
        _load("quant_run").parse(["quantize", "--tool", "awq", "--model", "m", "--texts", "t", "--out", "o"])
    t = _load("trl_distill_run").parse(["--teacher", "a", "--student", "b", "--batches", "c", "--out", "d",
                                         "--pad-id", "2"])
    assert t.pad_id == 2 and t.lr == 3e-4


def test_peer_venvs_pin_torch():
    env = _load("peer_env")
    assert all(env.TORCH in pkgs for pkgs in env.PEERS.values())
    with pytest.raises(SystemExit, match="unknown peer"):
        env.peer_python("nope")


def test_distill_only_takes_arm_names_and_unique_prefixes():
    mod = _load("distill_vs_peers")
    assert mod.parse(["--no-run", "--only", "torchtune,ours adamw"]).only == ["torchtune kd lora adamw", "ours adamw"]
    with pytest.raises(SystemExit):  # "ours" is the start of three arms
        mod.parse(["--no-run", "--only", "ours"])


def test_agreement_pairs_items_and_refuses_different_gold_answers():
    ev = _load("eval_vs_lmeval")
    ours = {("siqa", 0): (1, 1), ("siqa", 1): (0, 2), ("mmlu", 0): (3, 3)}
    lm = {("siqa", 0): (1, 1), ("siqa", 1): (0, 0), ("winowhy", 0): (1, 1)}
    assert ev.agreement(ours, lm) == (0.5, 2)  # two items scored by both, one same answer
    with pytest.raises(SystemExit, match="different gold answers"):
        ev.agreement({("siqa", 0): (2, 1)}, lm)


def test_quantize_table_ratios_and_an_arm_that_did_not_run():
    q = _load("quantize_vs_llmcompressor")
    row = {"quantize_s": 30.0, "peak_rss_gb": 1.2, "kl_mean": 0.011, "ppl_fp": 95.0, "ppl_quant": 97.0,
           "bytes": 83e6, "vllm": "yes", "tokens": 1032}
    text = q.table({"calibration": 128, "held_out": 32, "merged_bytes": 287e6,
                    "arms": {"ours gptq": row, "ours awq (gptqmodel)": {"error": "ValueError: AWQ: CUDA is not available."},
                             "llm-compressor gptq": {**row, "quantize_s": 15.0}}})
    assert "| ours gptq | 30.0 | 2.00x |" in text and "| llm-compressor gptq | 15.0 | 1.00x |" in text
    assert "did not run: ValueError: AWQ: CUDA is not available." in text
