"""Config loading: YAML + dotted overrides -> typed config; bad input names the field."""
from pathlib import Path

import pytest

from refinery.core.config import ConfigError, apply_overrides, config_hash
from refinery.pipeline.config import PipelineConfig, load

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_is_valid(path, monkeypatch):
    if path.name.startswith("sweep-"):  # a sweep YAML: its base and every searched key are checked
        from refinery.cluster.sweep_config import SweepConfig, load_sweep

        monkeypatch.chdir(ROOT)
        assert isinstance(load_sweep(str(path)), SweepConfig)
    else:
        assert isinstance(load(path), PipelineConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# refinery "), f"{path.name} must open with the command that runs it"


def test_overrides_reach_nested_fields_and_parse_types():
    cfg = load(ROOT / "configs/quickstart.yaml",
               ["distill.optim.lr=3e-4", "distill.steps=7", "tasks.names=[siqa]", "distill.optim.grad_clip=null"])
    assert cfg.distill.optim.lr == pytest.approx(3e-4)
    assert cfg.distill.steps == 7
    assert cfg.tasks.names == ["siqa"]
    assert cfg.distill.optim.grad_clip is None


@pytest.mark.parametrize("override, message", [
    ("distill.optim.lrx=1", "unknown config key 'distill.optim.lrx'"),
    ("distill.optim.lr=fast", "distill.optim.lr: got 'fast', expected a number"),
    ("distill.steps=2.5", "distill.steps: got 2.5, expected an integer"),
    ("distill.loss.divergence=kl", "distill.loss.divergence: got 'kl', expected one of 'forward_kl'"),
    ("distill.loss.alpha=1.5", "distill.loss.alpha: got 1.5, expected a number in [0, 1]"),
    ("quantize.bits=5", "quantize.bits: got 5, expected 3, 4 or 8"),
    ("evaluate.models=[teacher,gpt5]", "evaluate.models"),
    ("tasks.names=[]", "tasks.names: got [], expected at least one task name"),
    ("generate.engine=onnx", "generate.engine: got 'onnx'"),
    ("distill.lora.r=0", "distill.lora.r: got 0"),
    ("models.student.keep_layers=true", "models.student.keep_layers: got True, expected an integer"),
])
def test_bad_values_fail_naming_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load(None, [override])
    assert message in str(e.value)


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["distill.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load("no/such.yaml")


def test_config_hash_changes_with_any_value():
    a, b = load(None), load(None, ["distill.loss.temperature=3"])
    assert config_hash(a) == config_hash(load(None))
    assert config_hash(a) != config_hash(b)
