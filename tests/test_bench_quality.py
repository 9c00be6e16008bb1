"""The quality bench's verdict (bench/enhance_quality.py check_targets), on made-up per-type
statistics: scoring the folds needs ../shared, the verdict does not."""

from __future__ import annotations

import numpy as np

from tests.bench_scripts import load_bench

NAN = float("nan")


bench = load_bench("enhance_quality")


def _passing() -> dict[str, dict[str, float]]:
    """Per-type statistics on which every line holds: the illumination types gain +6 dB, the
    others come back unchanged (+0.00) while the classical baseline loses on them."""
    out = {}
    for t in bench.TYPE_CODES:
        illumination = t in bench.ILLUMINATION
        out[t] = {
            "gain_cofenet": 6.0 if illumination else 0.0,
            "gain_classical": 1.0 if illumination else -0.5,
            "ssim_cofenet": 0.9,
            "ssim_degraded": 0.8,
            "new_error_p95_cofenet": 0.0,
            "vessel_auc_cofenet": NAN,
            "vessel_auc_degraded": NAN,
        }
    return out


def test_every_line_holding_gives_no_miss() -> None:
    assert bench.check_targets(_passing()) == []


def test_one_type_over_the_new_error_limit_is_a_miss_though_the_pooled_p95_is_under_it() -> None:
    # 8 photographs a type; one photograph of 111 has 4 % new error: 111's own 95th percentile
    # is 2.6 %, that of all 56 pairs pooled 0 % (the untouched types add zeros).
    rows = [
        {"type_code": t, "new_error_cofenet": 0.04 if (t, k) == ("111", 0) else 0.0}
        for t in bench.TYPE_CODES
        for k in range(8)
    ]
    per_type = _passing()
    shares = [r["new_error_cofenet"] for r in rows if r["type_code"] == "111"]
    per_type["111"]["new_error_p95_cofenet"] = float(np.percentile(shares, 95))
    assert bench.new_error_p95(rows) < bench.TARGET_NEW_ERROR_P95
    assert bench.check_targets(per_type) == ["111: new-error share p95 2.60 % > 0.5 %"]


def test_a_type_without_an_illumination_defect_that_loses_to_the_classical_baseline_is_a_miss() -> (
    None
):
    per_type = _passing()
    per_type["010"].update(gain_cofenet=-0.4, gain_classical=0.5)
    misses = bench.check_targets(per_type)
    assert misses == ["010: does not beat the classical baseline (-0.40 dB against +0.50)"]


def test_vessel_auc_not_above_the_degraded_is_a_miss_only_where_it_was_measured() -> None:
    per_type = _passing()
    per_type["001"].update(vessel_auc_cofenet=0.957, vessel_auc_degraded=0.957)
    per_type["011"].update(vessel_auc_cofenet=0.958, vessel_auc_degraded=0.956)
    assert bench.check_targets(per_type) == ["001: vessel AUC 0.957 not above the degraded 0.957"]
