"""The evaluate/report config sections: the shipped YAML loads, bad values name the field."""
from __future__ import annotations

from pathlib import Path

import pytest

from refinery.core.config import ConfigError
from refinery.pipeline.config import load

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def test_quickstart_evaluate_and_report_sections_load():
    cfg = load(QUICKSTART)
    assert cfg.evaluate.models == ["teacher", "student_base", "student", "student_quant"]
    assert cfg.evaluate.batch_size >= 1 and cfg.evaluate.latency.new_tokens >= 2
    assert cfg.report.title


@pytest.mark.parametrize("override, field", [
    ("evaluate.models=[teacher, student_fp]", "models"),
    ("evaluate.threads=0", "evaluate.threads"),
    ("evaluate.dtype=int8", "evaluate.dtype"),
    ("evaluate.batch_size=0", "evaluate.batch_size"),
    ("evaluate.latency.repeats=0", "evaluate.latency.repeats"),
    ("evaluate.latency.new_tokens=1", "evaluate.latency.new_tokens"),
    ("evaluate.backend=vllm-cpu", "evaluate.backend"),
    ("evaluate.workers=0", "evaluate.workers"),
    ("evaluate.task_set=all", "evaluate.task_set"),
    ("evaluate.latency.batch_sizes=[]", "evaluate.latency.batch_sizes"),
    ("evaluate.latency.batch_sizes=[1, 0]", "evaluate.latency.batch_sizes"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load(QUICKSTART, [override])
