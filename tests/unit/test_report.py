"""The report stage on a run dir built by hand: numbers in tables, valid PNGs, honest verdict."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from refinery.core.manifest import write_json, write_jsonl
from refinery.core.models import ModelsConfig
from refinery.core.stage import Context
from refinery.core.tasks import TasksConfig
from refinery.evals.config import ReportConfig
from refinery.evals.report import compare, run, verdict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ["siqa", "strategyqa"]


def _model(accs, ses, nbytes, params=35_000_000, decode=12.5):
    tasks = {t: {"acc": a, "acc_stderr": s, "acc_norm": a - 0.01, "acc_norm_stderr": s, "n": 200}
             for t, a, s in zip(TASKS, accs, ses)}
    mean = sum(accs) / len(accs)
    mean_se = (sum(s * s for s in ses)) ** 0.5 / len(ses)
    return {"path": "/x", "bytes": nbytes, "params": params, "tasks": tasks, "mean_acc": mean,
            "mean_acc_stderr": mean_se, "latency": {"decode_ms_per_token": decode, "prefill_tokens_per_s": 900.0,
                                                    "memory_bytes": nbytes, "dtype": "float32", "threads": 2}}


def _results(student_accs):
    return {"tasks": TASKS, "models": {
        "teacher": _model([0.55, 0.60], [0.035, 0.034], 538_000_000, 134_500_000, 40.0),
        "student_base": _model([0.40, 0.50], [0.0346, 0.0354], 240_000_000),
        "student": _model(student_accs, [0.0347, 0.0350], 240_000_000),
        "student_quant": _model([x - 0.02 for x in student_accs], [0.0345, 0.0351], 60_000_000, decode=30.0)}}


def _run_dir(tmp_path: Path, student_accs=(0.612, 0.588)) -> Context:
    run_dir = tmp_path / "run"
    write_json(run_dir / "evaluate" / "results.json", _results(list(student_accs)))
    for stage, wall, metrics in [("generate", 321.5, {"kept": 3}), ("distill", 654.25, {"final_loss": 0.8}),
                                 ("quantize", 65.0, {}), ("evaluate", 280.75, {})]:
        write_json(run_dir / stage / "manifest.json", {
            "stage": stage, "status": "complete", "wall_s": wall, "metrics": metrics,
            "config": {"seed": 0, stage: {"steps": 150, "optim": {"name": "muon"}} if stage == "distill" else {}}})
    write_jsonl(run_dir / "generate" / "data.jsonl", [
        {"instruction": "q", "input": "", "output": "a", "task": t, "score": s}
        for t, s in [("siqa", 8), ("siqa", 6), ("strategyqa", 7)]])
    write_jsonl(run_dir / "distill" / "metrics.jsonl",
                [{"step": i + 1, "loss": 2.5 / (1 + 0.1 * i), "lr": 0.02} for i in range(30)])
    return Context(run_dir, 0, ModelsConfig(), TasksConfig(names=TASKS))


def test_report_tables_hold_the_numbers(tmp_path, capsys):
    ctx = _run_dir(tmp_path)
    result = run(ctx, ReportConfig(title="Unit run"))
    md = (ctx.run_dir / "report" / "REPORT.md").read_text()
    assert md.startswith("# Unit run\n")
    assert "| siqa | 200 | 0.550 ± 0.035 | 0.400 ± 0.035 | 0.612 ± 0.035 | 0.592 ± 0.035 |" in md
    assert "| strategyqa | 200 | 0.600 ± 0.034 | 0.500 ± 0.035 | 0.588 ± 0.035 | 0.568 ± 0.035 |" in md
    assert "**0.600 ± 0.025**" in md  # student mean (0.612 + 0.588) / 2
    # size: MB, compression vs teacher (538/60 = 8.97x) and vs the fp student (240/60 = 4.00x)
    assert "| student_quant | 35.0 | 60.0 | 8.97x | 4.00x | 0.580 |" in md
    assert "| teacher | 134.5 | 538.0 | 1.00x | – | 0.575 |" in md
    assert "| student_quant | 30.0 | 900.0 | 60.0 | float32 | 2 |" in md  # latency table
    for stage_row in ("| generate | complete | 321.5 |", "| distill | complete | 654.2 |",
                      "| evaluate | complete | 280.8 |"):
        assert stage_row in md
    assert "generated pairs kept: 3 (siqa: 2, strategyqa: 1), mean teacher score 7.00" in md
    assert "distill loss: first 2.5000 (step 1), last 0.6410 (step 30), min 0.6410 over 30 steps" in md
    assert "- distill: optim.name=muon, steps=150" in md and "- generate:" not in md
    assert "4-bit cost: student_quant 0.580 vs student 0.600 (Δ = -0.020" in md
    assert "240.0 MB -> 60.0 MB (4.00x smaller)" in md
    assert result.outputs == ["REPORT.md", "accuracy.png", "size_vs_accuracy.png", "distill_loss.png"]
    for png in result.outputs[1:]:
        data = (ctx.run_dir / "report" / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, png
        assert f"![{png}]({png})" in md
    out = capsys.readouterr().out
    assert "| siqa | 200 | 0.550 ± 0.035 | 0.400 ± 0.035 | 0.612 ± 0.035" in out and "Verdict:" in out


def test_verdict_says_beat_when_the_student_is_clearly_better(tmp_path):
    ctx = _run_dir(tmp_path, (0.612, 0.588))
    line, c = verdict(json.loads((ctx.run_dir / "evaluate" / "results.json").read_text()))
    # Δ = 0.600 - 0.450 = 0.150; stderr = hypot(0.024750, 0.024644) = 0.03493 -> 4.3 stderr
    assert c["delta"] == pytest.approx(0.15) and c["stderr"] == pytest.approx(0.03493, abs=1e-4)
    assert "BEAT the undistilled student (4.3 stderr)" in line and "Δ = +0.150" in line
    assert run(ctx, ReportConfig()).metrics["student_minus_base"] == pytest.approx(0.15, abs=1e-4)


def test_verdict_says_worse_when_the_student_is_clearly_worse(tmp_path):
    ctx = _run_dir(tmp_path, (0.30, 0.40))
    run(ctx, ReportConfig())
    md = (ctx.run_dir / "report" / "REPORT.md").read_text()
    assert "did WORSE than the undistilled student (2.9 stderr)" in md and "Δ = -0.100" in md
    assert "BEAT" not in md


def test_verdict_calls_a_small_gap_noise(tmp_path):
    ctx = _run_dir(tmp_path, (0.43, 0.50))
    line, c = verdict(json.loads((ctx.run_dir / "evaluate" / "results.json").read_text()))
    assert c["delta"] == pytest.approx(0.015)
    assert "no clear difference: higher by 0.4 stderr, within noise" in line


def test_paired_stderr_from_per_item_predictions(tmp_path):
    ctx = _run_dir(tmp_path)
    results = json.loads((ctx.run_dir / "evaluate" / "results.json").read_text())
    # 4 items per task; the student flips items 0 and 1 of siqa to right, nothing else changes.
    base = [1, 0, 0, 1]
    student = {"siqa": [1, 1, 1, 1], "strategyqa": base}
    for name, accs in (("student_base", {"siqa": base, "strategyqa": base}), ("student", student)):
        write_jsonl(ctx.run_dir / "evaluate" / "lmeval" / f"{name}_samples.jsonl",
                    [{"task": t, "item_id": f"{t}{i}", "acc": float(a)} for t in TASKS for i, a in enumerate(accs[t])])
    c = compare(results, "student", "student_base", ctx.run_dir)
    # siqa diffs [0, 1, 1, 0]: mean 0.5, sample var 1/3, var of mean 1/12; strategyqa: 0, 0.
    assert c["paired"] and c["delta"] == pytest.approx(0.25)
    assert c["stderr"] == pytest.approx((1 / 12) ** 0.5 / 2)


def test_missing_results_name_the_evaluate_stage(tmp_path):
    ctx = Context(tmp_path / "empty", 0, ModelsConfig(), TasksConfig())
    with pytest.raises(FileNotFoundError, match="run the evaluate stage first"):
        run(ctx, ReportConfig())


def test_report_without_student_gives_no_verdict(tmp_path):
    ctx = _run_dir(tmp_path)
    path = ctx.run_dir / "evaluate" / "results.json"
    results = json.loads(path.read_text())
    results["models"] = {"teacher": results["models"]["teacher"]}
    write_json(path, results)
    run(ctx, ReportConfig())
    md = (ctx.run_dir / "report" / "REPORT.md").read_text()
    assert "No verdict: the results lack `student` or `student_base`." in md
    assert "| teacher | 134.5 | 538.0 | 1.00x | – | 0.575 |" in md
