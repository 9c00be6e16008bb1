"""Quality rules parse strictly, name unknown columns, and flag rows without dropping them."""

from __future__ import annotations

import math
import time

import pytest

from fundus_batch.config import ConfigError, build_config
from fundus_batch.fov import preprocess
from fundus_batch.io.codecs import encode_png
from fundus_batch.metrics.reference import reference_context
from fundus_batch.quality import (
    MS_SSIM_MIN_SIZE,
    NEUTRAL_PARAMETERS,
    GateCounts,
    QualityRuleError,
    canonical_rule,
    parse_rule,
)
from fundus_batch.stages import Degrade, QualityGate
from fundus_batch.synth import synth_fundus


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


def test_a_parameter_of_an_operator_that_did_not_run_counts_as_its_neutral_value():
    rule = parse_rule(
        "blur_sigma == 0 and n_spots == 0 and hole_strength == 0 and brightness == 1 "
        "and contrast == 1 and saturation == 1"
    )
    assert rule.evaluate({name: None for name in NEUTRAL_PARAMETERS}) == (True, [])
    assert rule.evaluate({}) == (True, [])  # null columns are absent from a row dict too


def test_a_missing_metric_still_breaks_its_term_where_a_missing_parameter_does_not():
    rule = parse_rule("blur_sigma < 100 and nr_luminance_clean > 1 and psnr_degraded > 1")
    ok, broken = rule.evaluate({"blur_sigma": None, "nr_luminance_clean": None})
    assert not ok and broken == ["nr_luminance_clean > 1", "psnr_degraded > 1"]
    ok, broken = rule.evaluate({"nr_luminance_clean": math.nan, "psnr_degraded": 30.0})
    assert not ok and broken == ["nr_luminance_clean > 1"]


def test_the_gate_passes_variants_whose_type_has_no_blur_on_a_blur_rule():
    """Real stages: type 001 (illumination only) has a null blur_sigma; type 100 blurs."""
    fundus = synth_fundus(256, seed=2)
    rows = [
        {
            "image_id": "s",
            "status": "ok",
            "clean_png": encode_png(fundus.image),
            "mask_png": encode_png(fundus.mask),
        }
    ]
    degraded = Degrade(seed=0, variants=2, types=["001", "100"])(rows)
    gated = QualityGate(rule="blur_sigma < 100")(degraded)
    assert [(r["type_code"], r["blur_sigma"] is None) for r in gated] == [
        ("001", True),
        ("100", False),
    ]
    assert [r["quality_ok"] for r in gated] == [True, True]


@pytest.mark.parametrize(
    "spelled",
    [
        "nr_luminance_clean >0.5 and fov_r > 10",
        "nr_luminance_clean\u00a0>\u00a00.5 AND fov_r>10",
        "  nr_luminance_clean   >   0.5\tand\n fov_r > 10 ",
        "nr_luminance_clean > 0.5 and\u2003fov_r > 10",
    ],
)
def test_the_same_rule_spelled_with_other_spacing_has_one_canonical_form(spelled: str):
    assert canonical_rule(spelled) == "fov_r > 10 and nr_luminance_clean > 0.5"
    assert parse_rule(spelled).canonical == canonical_rule(canonical_rule(spelled))


@pytest.mark.parametrize(
    "spelled",
    [
        "nr_luminance_clean > 0.50 and fov_r > 10",
        "nr_luminance_clean > .5 and fov_r > 10.0",
        "fov_r > 1e1 and nr_luminance_clean > 5e-1",
        "fov_r > 10 and nr_luminance_clean > 0.5 and fov_r > 10",
    ],
)
def test_the_same_rule_with_numbers_spelled_or_terms_ordered_otherwise_has_one_canonical_form(
    spelled: str,
):
    assert canonical_rule(spelled) == "fov_r > 10 and nr_luminance_clean > 0.5"


def _rules(run: int) -> list[tuple[str, int]]:
    """Rules with whitespace runs of ``run`` characters, and their term counts (0: refused)."""
    gap = " " * run
    return [
        ("fov_r >" + gap + "1", 1),
        ("fov_r > 1" + gap + "and" + gap + "fov_r < 2", 2),
        ("fov_r > 1" + gap + "andx", 0),
    ]


def _fastest_parse(rule: str, terms: int) -> float:
    """The shortest of five parses of ``rule``, checking each result."""
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        if terms:
            assert len(parse_rule(rule).terms) == terms
        else:
            with pytest.raises(QualityRuleError):
                parse_rule(rule)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("case", range(3))
def test_a_rule_with_long_whitespace_runs_is_parsed_in_linear_time(case: int):
    # Ten times the whitespace costs about ten times as long when parsing is linear, and a
    # hundred times when a pattern backtracks over the runs; both timed in the same moment.
    short = _fastest_parse(*_rules(2_000)[case])
    long = _fastest_parse(*_rules(20_000)[case])
    assert long < 40 * short + 0.002, f"{long:.4f} s against {short:.4f} s"


@pytest.mark.parametrize("size", [64, 128, 256])
def test_a_rule_on_ms_ssim_is_refused_at_sizes_where_every_row_has_none(size: int):
    with pytest.raises(ConfigError, match=r"min_quality: column 'ms_ssim_degraded' is NaN"):
        build_config(
            {"manifest": "m", "out": "o", "size": size, "min_quality": "ms_ssim_degraded > 0.5"}
        )
    rule = "ssim_degraded > 0.5"  # SSIM has a value at these sizes
    assert build_config({"manifest": "m", "out": "o", "size": size, "min_quality": rule})


def test_a_rule_on_ms_ssim_is_accepted_from_the_first_size_where_it_has_a_value():
    rule = "ms_ssim_degraded > 0.5 and ms_ssim_enhanced > 0.5"
    data = {"manifest": "m", "out": "o", "size": MS_SSIM_MIN_SIZE, "min_quality": rule}
    assert build_config({**data, "enhance": {"enabled": True}}).min_quality == rule


def test_the_ms_ssim_size_limit_is_where_the_metric_first_has_a_value():
    """The working image of a whole field (the circle inscribed in the square, as Preprocess
    makes it): MS-SSIM is NaN one size step below MS_SSIM_MIN_SIZE and a number at it."""
    photo = synth_fundus(600, seed=4, canvas=(760, 640)).image
    values = {}
    for size in (MS_SSIM_MIN_SIZE - 32, MS_SSIM_MIN_SIZE):
        pre = preprocess(photo, size)
        values[size] = reference_context(pre.image, pre.mask).metrics(pre.image)["ms_ssim"]
    assert math.isnan(values[MS_SSIM_MIN_SIZE - 32])
    assert values[MS_SSIM_MIN_SIZE] == pytest.approx(1.0)


def test_gate_counts_say_how_many_judged_rows_passed_and_which_term_most_broke():
    gate = GateCounts()
    gate.add(
        [True, False, False, None, False],
        [None, "a > 1; b < 2", "b < 2", None, "a > 1; b < 2"],
    )
    assert (gate.passed, gate.judged, gate.most_broken) == (1, 4, ("b < 2", 3))
    assert gate.line() == "quality gate: 1 of 4 ok rows passed (most broken: b < 2, 3 rows)"
    assert GateCounts(2, 2).line() == "quality gate: 2 of 2 ok rows passed"


def test_a_nan_value_breaks_a_not_equal_term_too():
    """NaN compares unequal to everything, so a bare ``!=`` would pass it: an unmeasured
    value breaks every term, ``!=`` included."""
    rule = parse_rule("nr_luminance_clean != 0")
    assert rule.evaluate({"nr_luminance_clean": math.nan}) == (False, ["nr_luminance_clean != 0"])
    assert rule.evaluate({"nr_luminance_clean": 5.0}) == (True, [])
