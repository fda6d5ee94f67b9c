"""The sweep YAML: bad keys and values are named before any work; the Pareto front."""
from __future__ import annotations

import math

import pytest
import yaml

from refinery.cluster.results import pareto
from refinery.cluster.sweep_config import load_sweep
from refinery.core.config import ConfigError


def _write(tmp_path, **over):
    data = {"base": "configs/quickstart.yaml", "sweep_dir": str(tmp_path / "s"),
            "space": {"distill.optim.lr": {"type": "loguniform", "low": 0.001, "high": 0.1}}, **over}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_shipped_sweep_config_loads():
    cfg = load_sweep("configs/sweep-quickstart.yaml")
    assert cfg.num_samples == 6 and "distill.optim.lr" in cfg.space


@pytest.mark.parametrize("space,match", [
    ({"generate.temperature": {"type": "uniform", "low": 0.1, "high": 1}}, r"space.generate.temperature.*runs once"),
    ({"distill.optim.lrr": {"type": "uniform", "low": 0.1, "high": 1}}, r"space.distill.optim.lrr: unknown config key"),
    ({"distill.optim.lr": {"type": "loguniform", "low": 0, "high": 1}}, r"low: got 0"),
    ({"distill.optim.name": {"type": "choice", "values": ["sgd"]}}, r"space.distill.optim.name.*'sgd'"),
    ({"distill.optim.lr": {"type": "normal", "low": 0, "high": 1}}, r"type: got 'normal'"),
])
def test_bad_space_is_named(tmp_path, space, match):
    with pytest.raises(ConfigError, match=match):
        load_sweep(_write(tmp_path, space=space))


def test_pareto_front():
    rows = [{"key": "a", "accuracy": 0.5, "bytes": 100, "decode_ms": 10},
            {"key": "b", "accuracy": 0.6, "bytes": 200, "decode_ms": 10},
            {"key": "c", "accuracy": 0.4, "bytes": 150, "decode_ms": 12},   # beaten by a on all three
            {"key": "d", "accuracy": 0.5, "bytes": 100, "decode_ms": 9}]    # beats a
    assert pareto(rows) == {"b", "d"}


def test_second_trial_of_a_configuration_waits_and_reuses_the_first(tmp_path):
    """Two trials with one configuration (a repeated proposal) must not share run dirs at once: the
    second blocks on the first's lock and returns the summary the first wrote, running nothing."""
    import fcntl
    import json
    import threading

    from refinery.cluster.trial import config_key, run_trial

    params = {"distill.optim.lr": 0.01}
    sweep = load_sweep(_write(tmp_path))
    sweep_dir = tmp_path / "s"
    (sweep_dir / "locks").mkdir(parents=True)
    got = []
    with (sweep_dir / "locks" / f"{config_key(params)}.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the first trial, running
        t = threading.Thread(target=lambda: got.append(run_trial(params, sweep, sweep_dir, base_seed=0)))
        t.start()
        t.join(timeout=1.0)
        assert t.is_alive() and not got  # waiting, not running a chain beside the first
        (sweep_dir / "results").mkdir()
        summary = {"key": config_key(params), "params": params, "objective": 0.42}
        (sweep_dir / "results" / f"{config_key(params)}.json").write_text(json.dumps(summary))
    t.join(timeout=10)
    assert got == [summary]
    assert not (sweep_dir / "runs").exists()  # no run dir of its own


@pytest.mark.parametrize("pareto_of,ok", [(["accuracy", "bytes"], True), (["accuracy", "bytes", "decode_ms"], True),
                                          (["bytes", "decode_ms"], False), (["accuracy"], False),
                                          (["accuracy", "accuracy"], False), (["accuracy", "speed"], False)])
def test_pareto_objectives_are_checked(tmp_path, pareto_of, ok):
    path = _write(tmp_path, objective={"metric": "pareto", "pareto_of": pareto_of})
    if ok:
        assert load_sweep(path).objective.modes() == ["max" if m == "accuracy" else "min" for m in pareto_of]
    else:
        with pytest.raises(ConfigError, match="pareto_of"):
            load_sweep(path)


def test_expected_range_of_normals():
    from refinery.cluster.results import expected_range

    assert expected_range(2) == pytest.approx(2 / math.sqrt(math.pi), abs=1e-3)  # 1.128
    assert expected_range(6) == pytest.approx(2.534, abs=2e-3)


def _row(key, scores, lr):
    import statistics

    return {"key": key, "params": {"distill.optim.lr": lr}, "objective": statistics.mean(scores),
            "objective_std": statistics.stdev(scores) if len(scores) > 1 else 0.0, "accuracy": statistics.mean(scores),
            "bytes": 80e6, "decode_ms": None, "finished": lr,
            "replicates": [{"objective": s, "accuracy": s, "per_task": {"siqa": s}, "wall_s": 1.0} for s in scores]}


@pytest.mark.parametrize("top, says", [
    (0.405, "NOT larger than the replicate spread"),          # gap 0.005 < spread 0.0071
    (0.41, "but within what 6 configurations of equal merit"),  # 0.0071 < gap 0.01 < 2.534 * 0.0071 / sqrt 2
    (0.50, "and than the gap seed noise alone"),
])
def test_verdict_compares_best_minus_worst_with_seed_spread(tmp_path, capsys, top, says):
    """The sweep's acceptance question, answered in REPORT.md and `sweep status`: does the best
    configuration beat the worst by more than one seed's spread (and than selection among equals)?"""
    import json

    from refinery.cluster.results import print_status, verdict, write_outputs

    means = [0.40, 0.401, 0.402, 0.403, 0.404, top]
    rows = [_row(k, [m - 0.005, m + 0.005], 0.01 * (i + 1)) for i, (k, m) in enumerate(zip("abcdef", means))]
    v = verdict(rows)
    assert says in v["text"] and (v["best"], v["worst"]) == ("f", "a")
    assert v["spread"] == pytest.approx(0.01 / math.sqrt(2), rel=1e-6)
    sweep = load_sweep(_write(tmp_path))
    sweep_dir = tmp_path / "s"
    (sweep_dir / "results").mkdir(parents=True)
    for r in rows:
        (sweep_dir / "results" / f"{r['key']}.json").write_text(json.dumps(r))
    (sweep_dir / "sweep.json").write_text(json.dumps({"num_samples": 6, "replicates": 2}))
    write_outputs(sweep, sweep_dir)
    report = (sweep_dir / "REPORT.md").read_text()
    assert says in report and "| siqa |" in report
    assert report.index("| f |") < report.index("| e |") < report.index("| a |")  # sorted by objective
    assert print_status(sweep_dir) == 0
    assert f"verdict: {v['text']}" in capsys.readouterr().out


def test_verdict_without_replicates_says_so():
    from refinery.cluster.results import verdict

    v = verdict([_row("a", [0.4], 0.01), _row("b", [0.5], 0.02)])
    assert v["spread"] is None and "no seed spread" in v["text"]
