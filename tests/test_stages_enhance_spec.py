"""A run's enhancement settings reach the Enhance stage its workers build."""

from __future__ import annotations

import pytest

from fundus_batch.config import build_config
from fundus_batch.enhance import Enhance
from fundus_batch.stages import stage_specs


def test_a_run_s_max_change_bounds_the_enhance_stage_its_workers_build() -> None:
    enhance = {"enabled": True, "max_change": 8, "device": "cpu"}
    config = build_config(
        {"manifest": "m.csv", "out": "o", "size": 256, "progress": False, "enhance": enhance},
        "test",
    )
    [spec] = [s for s in stage_specs(config) if s.cls is Enhance]
    stage = spec.build()
    assert isinstance(stage, Enhance)
    assert stage.model.max_change == pytest.approx(8 / 255)
