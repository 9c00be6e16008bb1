"""The demo's printed summary: per-type means of ok rows, failures counted apart, warnings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fundus_batch.demo import print_demo_table, summary_table
from fundus_batch.output import OutputStore, ShardWriter
from fundus_batch.schema import output_schema, to_table


def _write(out: Path, enhanced_gain: float) -> None:
    rows = [
        {
            "image_id": f"img{i}",
            "variant": v,
            "type_code": code,
            "status": "ok",
            "psnr_degraded": 25.0 + i,
            "psnr_enhanced": 25.0 + i + (enhanced_gain if code == "010" else 1.0),
            "ssim_degraded": 0.8,
            "ssim_enhanced": 0.85,
        }
        for i in range(2)
        for v, code in enumerate(("001", "010"))
    ]
    rows += [
        {"image_id": "gone", "variant": 0, "status": "failed", "failed_stage": "fetch"},
        {"image_id": "gone", "variant": 1, "status": "failed", "failed_stage": "fetch"},
    ]
    writer = ShardWriter(OutputStore(str(out)), output_schema())
    writer.add(to_table(rows, output_schema()))
    writer.close()


def test_summary_table_has_one_row_per_type_and_no_failed_row(tmp_path: Path):
    _write(tmp_path, enhanced_gain=-9.0)
    frame = OutputStore(str(tmp_path)).read_table().to_pandas()
    table = summary_table(frame)
    assert list(table.index) == ["001", "010"]
    assert table["rows"].tolist() == [2, 2]
    assert not table.isna().any().any()
    assert table.loc["010", "psnr_enhanced"] == pytest.approx(25.5 - 9.0)


def test_printed_summary_counts_failures_and_warns_on_lowered_psnr(tmp_path: Path, capsys):
    _write(tmp_path, enhanced_gain=-9.0)
    print_demo_table(str(tmp_path))
    text = capsys.readouterr().out
    assert "failed rows: 2 of 6" in text
    assert "NaN" not in text and "failed " not in text.replace("failed rows:", "")
    assert "WARNING enhancement lowered PSNR on 010 (-9.00 dB)" in text


def test_printed_summary_has_no_warning_when_enhancement_helped(tmp_path: Path, capsys):
    _write(tmp_path, enhanced_gain=0.5)
    print_demo_table(str(tmp_path))
    assert "WARNING" not in capsys.readouterr().out


def test_printed_summary_covers_only_the_rows_within_keeps(tmp_path: Path, capsys):
    _write(tmp_path, enhanced_gain=-9.0)

    def img0(table: pa.Table) -> np.ndarray:
        return np.asarray(table.column("image_id").to_pylist()) == "img0"

    print_demo_table(str(tmp_path), within=img0)
    text = capsys.readouterr().out
    assert "failed rows: 0 of 2" in text
    assert summary_table_rows(text) == {"001": 1, "010": 1}


def summary_table_rows(text: str) -> dict[str, int]:
    """The ``rows`` column of the printed table, per type code."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("type_code")) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip() or line.startswith("failed"):
            break
        code, count = line.split()[:2]
        rows[code] = int(count)
    return rows


def test_printed_summary_says_so_when_no_row_is_ok(tmp_path: Path, capsys):
    rows = [{"image_id": "gone", "variant": 0, "status": "failed", "failed_stage": "fetch"}]
    writer = ShardWriter(OutputStore(str(tmp_path)), output_schema())
    writer.add(to_table(rows, output_schema()))
    writer.close()
    print_demo_table(str(tmp_path))
    text = capsys.readouterr().out
    assert "Empty DataFrame" not in text
    assert "no ok rows: no metrics to show" in text and "failed rows: 1 of 1" in text
