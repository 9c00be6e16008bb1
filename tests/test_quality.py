"""Quality rules parse strictly, name unknown columns, and flag rows without dropping them."""

from __future__ import annotations

import math

import pytest

from fundus_batch.config import ConfigError, build_config
from fundus_batch.quality import QualityRuleError, parse_rule
from fundus_batch.stages import QualityGate


def test_rule_evaluates_every_term_and_names_the_broken_ones():
    rule = parse_rule("nr_luminance_clean >= 40 and nr_laplacian_var_clean > 2.5e1")
    assert rule.evaluate({"nr_luminance_clean": 50, "nr_laplacian_var_clean": 30}) == (True, [])
    ok, broken = rule.evaluate({"nr_luminance_clean": 10, "nr_laplacian_var_clean": 30})
    assert not ok and broken == ["nr_luminance_clean >= 40"]
    ok, broken = rule.evaluate({"nr_luminance_clean": math.nan})
    assert not ok and len(broken) == 2  # missing or NaN metrics never pass


@pytest.mark.parametrize("text", ["luminance >> 3", "a >= b", "a >= 1 or b < 2", ""])
def test_malformed_rules_are_rejected(text):
    with pytest.raises(QualityRuleError):
        parse_rule(text)


def test_config_rejects_a_rule_on_an_unknown_column_before_any_work():
    with pytest.raises(ConfigError, match="min_quality"):
        build_config({"manifest": "m", "out": "o", "min_quality": "brightness_typo > 1"})
    assert build_config(
        {"manifest": "m", "out": "o", "min_quality": "nr_luminance_clean > 1"}
    ).min_quality


def test_gate_flags_ok_rows_and_leaves_failed_rows_alone():
    gate = QualityGate(rule="psnr_degraded >= 20")
    rows = gate(
        [
            {"status": "ok", "psnr_degraded": 25.0},
            {"status": "ok", "psnr_degraded": 5.0},
            {"status": "failed"},
        ]
    )
    assert [r.get("quality_ok") for r in rows] == [True, False, None]
    assert rows[1]["quality_failed"] == "psnr_degraded >= 20"
