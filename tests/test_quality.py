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


@pytest.mark.parametrize(
    ("extra", "rule"),
    [
        ({}, "image_id > 1"),  # text
        ({}, "quality_ok == 1"),  # the gate's own verdict
        ({}, "seconds_write < 10"),  # Write runs after the gate
        ({"mode": "score"}, "nr_luminance_enhanced > 0"),
        ({"mode": "score"}, "psnr_degraded > 20"),
        ({"mode": "enhance"}, "psnr_enhanced > 20"),  # no reference to compare with
        ({}, "ssim_enhanced > 0.5"),  # pairs without enhancement
        ({"compute_metrics": False}, "nr_luminance_clean > 1"),
    ],
)
def test_a_rule_on_a_column_without_a_number_at_the_gate_is_refused_before_any_work(extra, rule):
    with pytest.raises(ConfigError, match=r"min_quality: column .* has no number"):
        build_config({"manifest": "m", "out": "o", "min_quality": rule, **extra})


@pytest.mark.parametrize(
    ("extra", "rule"),
    [
        ({}, "psnr_degraded > 20 and brightness < 1.2 and fov_r > 100"),
        ({"enhance": {"enabled": True}}, "ms_ssim_enhanced > 0.9 and enhance_change > 0"),
        ({"mode": "enhance"}, "nr_uniformity_enhanced < 0.5 and nr_luminance_clean > 10"),
        ({"mode": "score"}, "nr_luminance_clean >= 40 and vessel_auc_clean > 0.8"),
    ],
)
def test_rules_on_what_the_run_computes_before_the_gate_are_accepted(extra, rule):
    assert build_config({"manifest": "m", "out": "o", "min_quality": rule, **extra}).min_quality


def test_a_broken_term_is_named_with_its_threshold_as_written():
    rule = parse_rule("nr_uniformity_clean < 0.1234567 and nr_laplacian_var_clean >= 1234567")
    ok, broken = rule.evaluate({"nr_uniformity_clean": 0.2, "nr_laplacian_var_clean": 1234566.0})
    assert not ok
    assert broken == ["nr_uniformity_clean < 0.1234567", "nr_laplacian_var_clean >= 1234567"]


def test_a_value_that_is_not_a_number_breaks_the_term_instead_of_failing_the_row():
    [row] = QualityGate(rule="nr_luminance_clean > 1")(
        [{"status": "ok", "nr_luminance_clean": "x"}]
    )
    assert row["status"] == "ok" and row["quality_ok"] is False
