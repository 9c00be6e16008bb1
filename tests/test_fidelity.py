"""Fidelity warnings: which degradation types enhancement made worse, built from rows directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from fundus_batch.fidelity import (
    NO_TYPE,
    Unchanged,
    fidelity_losses,
    output_summary_lines,
    unchanged_counts,
    unchanged_lines,
    warning_lines,
)
from fundus_batch.output import OutputStore, ShardWriter
from fundus_batch.report.data import Loaded, metrics
from fundus_batch.schema import output_schema, to_table


def _rows(psnr_gain: dict[str, float], ssim_gain: dict[str, float] | None = None) -> list[dict]:
    """Two ok rows per type with the given mean enhanced-minus-degraded gains, plus a failed
    row per type whose (absent) metrics must never count."""
    ssim_gain = ssim_gain or {}
    rows = []
    for code, gain in psnr_gain.items():
        for i, deg in enumerate((24.0, 28.0)):
            rows.append(
                {
                    "image_id": f"img{i}",
                    "variant": int(code, 2),
                    "type_code": code,
                    "status": "ok",
                    "psnr_degraded": deg,
                    "psnr_enhanced": deg + gain,
                    "ssim_degraded": 0.8,
                    "ssim_enhanced": 0.8 + ssim_gain.get(code, 0.01),
                }
            )
        rows.append({"image_id": "bad", "variant": 0, "type_code": code, "status": "failed"})
    return rows


def test_types_where_enhanced_psnr_is_below_degraded_are_flagged_with_the_change():
    frame = pd.DataFrame(_rows({"001": 2.0, "010": -8.9, "100": -0.25}))
    losses = fidelity_losses(frame)
    assert [(x.type_code, x.metric) for x in losses] == [("010", "psnr"), ("100", "psnr")]
    assert losses[0].change == pytest.approx(-8.9) and losses[0].rows == 2
    assert warning_lines(losses) == [
        "WARNING enhancement lowered PSNR on 010 (-8.90 dB), 100 (-0.25 dB)"
    ]


def test_lower_ssim_gets_its_own_line():
    frame = pd.DataFrame(_rows({"001": 1.0, "011": 1.0}, ssim_gain={"011": -0.05}))
    assert warning_lines(fidelity_losses(frame)) == [
        "WARNING enhancement lowered SSIM on 011 (-0.05)"
    ]
    # A loss too small for four decimals still shows its size, not "-0.0000".
    tiny = pd.DataFrame(_rows({"001": 1.0}, ssim_gain={"001": -3e-5}))
    assert warning_lines(fidelity_losses(tiny)) == [
        "WARNING enhancement lowered SSIM on 001 (-3e-05)"
    ]


def test_no_warning_when_enhancement_helps_or_did_not_run():
    assert warning_lines(fidelity_losses(pd.DataFrame(_rows({"001": 0.5, "111": 3.0})))) == []
    no_enhance = pd.DataFrame(_rows({"001": -3.0})).drop(columns=["psnr_enhanced", "ssim_enhanced"])
    assert fidelity_losses(no_enhance) == []
    assert fidelity_losses(pd.DataFrame({"image_id": ["a"], "status": ["ok"]})) == []


def test_rows_missing_one_value_do_not_tilt_the_comparison():
    rows = _rows({"001": 1.0})
    # A row with a very high degraded PSNR but no enhanced value: pairs only.
    rows.append({"type_code": "001", "status": "ok", "psnr_degraded": 60.0, "image_id": "x"})
    rows.append({"type_code": "001", "status": "ok", "psnr_enhanced": np.inf, "image_id": "y"})
    assert fidelity_losses(pd.DataFrame(rows)) == []


def test_warnings_compare_the_rows_the_report_table_averages():
    """An enhanced image identical to the clean one (PSNR +inf) leaves its row out of the
    report's table; the SSIM warning must leave it out too, or the two disagree."""
    scores = [  # psnr degraded/enhanced, ssim degraded/enhanced, ms-ssim degraded/enhanced
        (24.0, np.inf, 0.50, 1.00, 0.60, 1.00),  # enhancement gave back the clean image
        (26.0, 27.0, 0.90, 0.85, 0.92, 0.90),
        (25.0, 26.0, 0.88, 0.84, 0.91, 0.89),
        (27.0, 28.0, 0.91, 0.90, np.nan, 0.93),  # no degraded MS-SSIM
    ]
    columns = [f"{m}_{r}" for m in ("psnr", "ssim", "ms_ssim") for r in ("degraded", "enhanced")]
    frame = pd.DataFrame([dict(zip(columns, row, strict=True)) for row in scores])
    frame = frame.assign(image_id=[f"img{i}" for i in range(4)], type_code="011", status="ok")
    losses = fidelity_losses(frame)
    assert [(x.metric, x.rows) for x in losses] == [("ssim", 2)]
    assert (losses[0].degraded, losses[0].enhanced) == pytest.approx((0.89, 0.845))
    assert warning_lines(losses) == ["WARNING enhancement lowered SSIM on 011 (-0.045)"]
    table = metrics(Loaded("out", None, frame), []).full_reference
    assert table is not None
    [typed, _] = table.rows
    means = dict(zip([f"{c.metric}_{c.sub}" for c in table.columns], typed.values, strict=True))
    assert typed.n == losses[0].rows
    assert (means["ssim_degraded"], means["ssim_enhanced"]) == pytest.approx(
        (losses[0].degraded, losses[0].enhanced)
    )
    assert means["psnr_enhanced"] > means["psnr_degraded"]  # and no PSNR warning


def test_output_summary_lines_reads_a_written_output(tmp_path: Path):
    out = str(tmp_path / "out")
    assert output_summary_lines(out) == []  # nothing written yet
    rows = _rows({"010": -9.0, "111": 2.0})
    for row in rows:
        if row["status"] == "ok":
            row["enhance_change"] = 0.0 if row["image_id"] == "img0" else 3.5
    writer = ShardWriter(OutputStore(out), output_schema())
    writer.add(to_table(rows, output_schema()))
    writer.close()
    assert output_summary_lines(out) == [
        "WARNING enhancement lowered PSNR on 010 (-9.00 dB)",
        "NOTE enhancement left images unchanged: 010 (1 of 2), 111 (1 of 2)",
    ]


def test_images_left_unchanged_are_counted_per_type_and_failed_rows_never():
    rows = [
        {"type_code": "010", "status": "ok", "enhance_change": 0.0},
        {"type_code": "010", "status": "ok", "enhance_change": 0.0},
        {"type_code": "001", "status": "ok", "enhance_change": 4.2},
        {"type_code": "001", "status": "ok", "enhance_change": 0.0},
        {"type_code": "001", "status": "ok", "enhance_change": None},  # written before the column
        {"type_code": "111", "status": "ok", "enhance_change": 1e-3},  # changed, if barely
        {"type_code": "111", "status": "failed", "enhance_change": 0.0},
    ]
    counts = unchanged_counts(pd.DataFrame(rows))
    assert counts == [Unchanged("001", 1, 2), Unchanged("010", 2, 2), Unchanged("111", 0, 1)]
    assert unchanged_lines(counts) == [
        "NOTE enhancement left images unchanged: 001 (1 of 2), 010 (2 of 2)"
    ]
    assert unchanged_lines([Unchanged("111", 0, 3)]) == []


def test_enhance_mode_rows_without_a_type_are_counted_together():
    frame = pd.DataFrame({"status": ["ok"] * 3, "enhance_change": [0.0, 0.0, 2.0]})
    assert unchanged_counts(frame) == [Unchanged(None, 2, 3)]
    assert unchanged_lines(unchanged_counts(frame)) == [
        "NOTE enhancement left 2 of 3 images unchanged"
    ]
    assert unchanged_counts(frame.drop(columns=["enhance_change"])) == []
    # The report fills a missing type code with NO_TYPE; the rows are the same untyped rows.
    written = frame.assign(type_code=[None, NO_TYPE, NO_TYPE])
    assert unchanged_counts(written) == [Unchanged(None, 2, 3)]


def test_a_loss_that_rounds_to_zero_at_the_printed_precision_is_no_warning():
    frame = pd.DataFrame(_rows({"001": -0.004, "010": -0.006}))
    assert len(fidelity_losses(frame)) == 2
    assert warning_lines(fidelity_losses(frame)) == [
        "WARNING enhancement lowered PSNR on 010 (-0.01 dB)"
    ]


def test_output_summary_lines_within_count_only_the_rows_it_keeps(tmp_path: Path):
    out = str(tmp_path / "out")
    rows = [
        {"image_id": f"img{i}", "variant": -1, "status": "ok", "enhance_change": 0.0}
        for i in range(6)
    ]
    writer = ShardWriter(OutputStore(out), output_schema())
    writer.add(to_table(rows, output_schema()))
    writer.close()
    assert output_summary_lines(out) == ["NOTE enhancement left 6 of 6 images unchanged"]

    def first_two(table: pa.Table) -> np.ndarray:
        return np.isin(table.column("image_id").to_numpy(zero_copy_only=False), ["img0", "img1"])

    assert output_summary_lines(out, within=first_two) == [
        "NOTE enhancement left 2 of 2 images unchanged"
    ]
    assert output_summary_lines(out, within=lambda t: np.zeros(t.num_rows, bool)) == []
