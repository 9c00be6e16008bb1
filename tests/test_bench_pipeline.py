"""The pipeline bench's steady-rate and first-row helpers (the bench itself needs Ray)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_bench_pipeline", REPO / "bench" / "pipeline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


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
