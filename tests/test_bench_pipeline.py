"""The pipeline bench's steady-rate and first-row helpers (the bench itself needs Ray)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.bench_scripts import load_bench

bench = load_bench("pipeline")
synthetic_manifest = sys.modules["inputs"].synthetic_manifest


def _importable() -> ModuleType:
    """The bench under the name its spawned Pool workers import it by (``pipeline``, from
    bench/, which the bench puts on sys.path): their work functions are pickled by name."""
    return importlib.import_module("pipeline")


def test_steady_rate_ignores_the_slow_start_and_the_tail() -> None:
    # 10 rows in the first 5 s (start-up), then 1 row per 0.5 s, then a slow last row.
    marks = [(5.0, 10)] + [(5.0 + 0.5 * k, 10 + k) for k in range(1, 90)] + [(60.0, 100)]
    assert bench.steady_rate(marks, 100) == 2.0


def test_steady_rate_is_nan_without_a_middle() -> None:
    assert math.isnan(bench.steady_rate([(1.0, 100)], 100))
    assert math.isnan(bench.steady_rate([], 100))


def test_first_row_skips_the_progress_mark_of_zero_rows() -> None:
    # The CLI's progress callback reports 0 rows before Ray starts.
    assert bench.first_row([(10.2, 0), (16.5, 8), (17.0, 16)], 10.0) == 6.5
    assert math.isnan(bench.first_row([(10.2, 0)], 10.0))


def test_working_sizes_below_128_or_off_the_32_grid_are_refused() -> None:
    assert bench.working_size("128") == 128 and bench.working_size("256") == 256
    for text in ("64", "96", "150", "abc"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.working_size(text)


def test_size_64_on_the_command_line_is_an_argparse_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["pipeline.py", "--memory-size", "64"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    assert "at least 128 px" in capsys.readouterr().err


def test_failure_report_counts_rows_per_stage_and_shows_the_first_error() -> None:
    failed = [("preprocess", "no FOV circle"), ("preprocess", "x"), ("fetch", "missing")]
    text = bench.failure_report("the Pool run", failed, 4)
    assert "3 of 4 rows failed" in text
    assert "{'preprocess': 2, 'fetch': 1}" in text
    assert "first error (preprocess): no FOV circle" in text


def test_pool_run_reports_total_cpu_seconds_apart_from_the_per_row_stage_seconds(
    tmp_path: Path,
) -> None:
    """With 2 variants the Pool's CPU total is not divided into rows: the bench divides it by
    images, and the per-row table holds stage seconds only."""
    manifest = synthetic_manifest(tmp_path / "in", 2, 128)
    args = argparse.Namespace(variants=2, cpus=1, rows_per_block=None)
    run = _importable().run_pool(manifest, tmp_path / "out", args, 128)
    assert set(run.per_row) >= {"fetch", "preprocess"}
    assert not any("CPU" in key for key in run.per_row)
    # Every row's in-stage time is a part of the CPU the pool spent (1 process, idle aside).
    assert run.cpu_seconds > 0.5 * 4 * run.per_row["preprocess"]


def test_pool_run_with_a_failing_row_names_the_stage_and_the_error(tmp_path: Path) -> None:
    manifest = synthetic_manifest(tmp_path / "in", 1, 128)
    with manifest.open("a") as f:
        f.write(f"gone,{tmp_path / 'gone.jpg'}\n")
    args = argparse.Namespace(variants=1, cpus=1, rows_per_block=None)
    with pytest.raises(SystemExit, match=r"1 of 2 rows failed, failed_by_stage \{'fetch': 1\}"):
        _importable().run_pool(manifest, tmp_path / "out", args, 128)


def test_cluster_cpus_come_from_run_json(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"cluster": {"cpus": 2.0, "gpus": 0.0}}))
    assert bench.run_cluster_cpus(tmp_path) == 2.0
    assert bench.run_cluster_cpus(tmp_path / "absent") is None


def test_ray_log_tail_names_the_log_and_shows_its_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "ray.log"
    log.write_text("\n".join(f"line {i}" for i in range(100)))
    note = tmp_path / "out.log-path"
    note.write_text(str(log))
    text = bench.ray_log_tail(note, lines=3)
    assert str(log) in text and text.endswith("line 97\nline 98\nline 99")
    assert "unknown" in bench.ray_log_tail(tmp_path / "no-note")
