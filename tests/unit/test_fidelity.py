"""Fidelity to the teacher from per-item predictions: agreement, gold log-likelihood, paired delta."""
import json

import pytest

from refinery.evals.fidelity import fidelity, fidelity_line, paired_agreement_delta


def _write(run_dir, model, rows):
    d = run_dir / "evaluate" / "lmeval"
    d.mkdir(parents=True, exist_ok=True)
    with (d / f"{model}_samples.jsonl").open("w") as f:
        for i, (target, ll) in enumerate(rows):
            f.write(json.dumps({"task": "siqa", "item_id": f"i{i}", "target": target, "loglikelihoods": ll}) + "\n")


@pytest.fixture
def run_dir(tmp_path):
    # teacher picks choice 0 on every item; base picks 1 always; student picks 0 on 3 of 4 items.
    _write(tmp_path, "teacher", [(0, [-1.0, -2.0]), (1, [-1.0, -3.0]), (0, [-0.5, -2.0]), (1, [-1.0, -1.5])])
    _write(tmp_path, "student_base", [(0, [-9.0, -2.0]), (1, [-9.0, -3.0]), (0, [-8.0, -2.0]), (1, [-9.0, -1.5])])
    _write(tmp_path, "student", [(0, [-1.0, -2.0]), (1, [-1.0, -3.0]), (0, [-0.5, -2.0]), (1, [-4.0, -1.5])])
    return tmp_path


def test_agreement_and_gold_loglik_by_hand(run_dir):
    fid = fidelity(run_dir, ["teacher", "student_base", "student"])
    assert fid["teacher"]["agreement"] == 1.0
    assert fid["student_base"]["agreement"] == 0.0
    assert fid["student"]["agreement"] == 0.75
    assert fid["student"]["agreement_stderr"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)
    # gold log-likelihoods: student -1.0, -3.0, -0.5, -1.5 -> mean -1.5
    assert fid["student"]["gold_loglik"] == pytest.approx(-1.5)
    assert fid["student_base"]["gold_loglik"] == pytest.approx((-9.0 - 3.0 - 8.0 - 1.5) / 4)


def test_paired_delta_and_line_follow_the_numbers(run_dir):
    delta, se, n = paired_agreement_delta(run_dir, "student", "student_base")
    assert (delta, n) == (0.75, 4)
    assert se == pytest.approx((sum((x - 0.75) ** 2 for x in [1, 1, 1, 0]) / 3 / 4) ** 0.5)
    assert "MORE" in fidelity_line(run_dir)
    # swap the roles: the line must say LESS
    for name, new in (("student", "tmp"), ("student_base", "student"), ("tmp", "student_base")):
        (run_dir / "evaluate/lmeval" / f"{name}_samples.jsonl").rename(run_dir / "evaluate/lmeval" / f"{new}_samples.jsonl")
    assert "LESS" in fidelity_line(run_dir)


def test_missing_predictions_give_no_line(tmp_path):
    assert fidelity_line(tmp_path) is None
    assert fidelity(tmp_path, ["student"]) == {}
