"""Activation outlier statistics (issue 7, experiment 5) on the tiny real student."""
from __future__ import annotations

import math

import pytest

from refinery.evals.outliers import _Acc, activation_stats, plot_outliers

pytestmark = pytest.mark.integration
TEXTS = ["Question: Where would you put a plate after washing it?\nAnswer: In the cupboard.",
         "Question: Can a penguin fly to the moon?\nAnswer: no",
         "The capital of France is Paris, and the capital of Italy is Rome."]


def test_kurtosis_and_median_of_known_distributions():
    import torch

    g = torch.Generator().manual_seed(0)
    normal, laplace = _Acc(), _Acc()
    normal.add(torch.randn(400_000, generator=g))
    laplace.add(torch.distributions.Laplace(0.0, 1.0).sample((400_000,)))
    n, lp = normal.result(), laplace.result()
    assert abs(n["kurtosis"]) < 0.05 and abs(lp["kurtosis"] - 3.0) < 0.2  # excess kurtosis: 0 and 3
    assert n["median_abs"] == pytest.approx(0.6745, rel=0.02)  # median |N(0,1)|
    assert n["values"] == 400_000 and n["ratio"] == pytest.approx(n["max_abs"] / n["median_abs"])


def test_a_planted_outlier_channel_shows_in_its_layer_only(tiny_student, tmp_path):
    import torch

    from refinery.evals.loading import load_model

    model, tok = load_model(tiny_student, dtype="float32")
    base = activation_stats(model, tok, TEXTS, batch_size=2)
    assert {(r["layer"], r["site"]) for r in base} == {(i, s) for i in range(2) for s in
                                                      ("residual", "q_proj_in", "o_proj_in", "gate_proj_in",
                                                       "down_proj_in")}
    assert all(r["ratio"] >= 1 and math.isfinite(r["kurtosis"]) for r in base)
    with torch.no_grad():  # one residual channel of layer 1 made 200x larger
        model.model.layers[1].mlp.down_proj.weight[7] *= 200
    planted = {(r["layer"], r["site"]): r for r in activation_stats(model, tok, TEXTS, batch_size=2)}
    before = {(r["layer"], r["site"]): r for r in base}
    assert planted[(1, "residual")]["ratio"] > 10 * before[(1, "residual")]["ratio"]
    assert planted[(1, "residual")]["kurtosis"] > before[(1, "residual")]["kurtosis"]
    for key in [(0, "residual"), (0, "down_proj_in"), (1, "q_proj_in"), (1, "down_proj_in")]:
        assert planted[key]["max_abs"] == pytest.approx(before[key]["max_abs"], rel=1e-5), key  # upstream
    plot_outliers({"base": base, "planted": list(planted.values())}, tmp_path / "outliers.png")
    assert (tmp_path / "outliers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_texts_is_refused(tiny_student):
    from refinery.evals.loading import load_model

    model, tok = load_model(tiny_student, dtype="float32")
    with pytest.raises(ValueError, match="no texts given"):
        activation_stats(model, tok, [])
