"""What enhancement did, per degradation type: where it lowered fidelity (mean enhanced vs
degraded scores) and which images it left unchanged.

Used by the run summary, the demo's table and the HTML report, so that every one of them says
the same thing: a type whose mean enhanced PSNR (or SSIM) against the clean image is below the
degraded input's was made worse by enhancement, and an image whose ``enhance_change`` is 0 came
back exactly as it went in. Rows must be ``ok``; failed rows never count. The means are over
the rows the report's full-reference table averages (:func:`common_rows`). A run's own lines
cover the rows of its (image, variant) pairs only (``within``), as its summary does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

__all__ = [
    "FIDELITY_COLUMNS",
    "NO_TYPE",
    "FidelityLoss",
    "RowFilter",
    "Unchanged",
    "common_rows",
    "fidelity_losses",
    "output_summary_lines",
    "read_output",
    "summary_lines",
    "unchanged_counts",
    "unchanged_lines",
    "warning_lines",
]

_SCORED = tuple(
    f"{key}_{role}" for key in ("psnr", "ssim", "ms_ssim") for role in ("degraded", "enhanced")
)
"""The full-reference score columns: a row is compared only where all of them are (see
:func:`common_rows`)."""

FIDELITY_COLUMNS = ("type_code", "status", *_SCORED, "enhance_change")
"""The Parquet columns :func:`summary_lines` reads."""

NO_TYPE = "none"
"""The type code of rows without a degradation (enhance and score runs), missing or written so."""

RowFilter = Callable[[pa.Table], np.ndarray]
"""Which rows of an output table (``image_id`` and ``variant`` columns) to keep, e.g. a run's
pairs (:func:`fundus_batch.manifest_stream.in_run`)."""

_METRICS = (("psnr", "PSNR", " dB", ".2f"), ("ssim", "SSIM", "", ".2g"))


@dataclass(frozen=True)
class FidelityLoss:
    """One degradation type on which the mean enhanced score fell below the degraded one."""

    type_code: str
    metric: str  # "psnr" or "ssim"
    degraded: float
    enhanced: float
    rows: int

    @property
    def change(self) -> float:
        return self.enhanced - self.degraded


def common_rows(arrays: Sequence[np.ndarray], size: int) -> np.ndarray:
    """The one set of ``size`` rows whose scores are averaged together (here and in the
    report's tables): those finite in every array that holds any value (±inf included) among
    these rows. An array with no value at all does not narrow it."""
    mask = np.ones(size, dtype=bool)
    for arr in arrays:
        if not np.isnan(arr).all():
            mask &= np.isfinite(arr)
    return mask


def _numbers(frame: pd.DataFrame, column: str) -> np.ndarray:
    values = pd.to_numeric(frame[column], errors="coerce")
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def fidelity_losses(frame: pd.DataFrame) -> list[FidelityLoss]:
    """Every (type, metric) whose mean enhanced score is below the mean degraded score, over
    the ``ok`` rows of that type that the report's full-reference table averages
    (:func:`common_rows` of the PSNR, SSIM and MS-SSIM columns); sorted by type, PSNR before
    SSIM.

    A row missing a score, or with PSNR +inf (an image identical to the clean one), counts in
    neither metric, so the warnings and the report's table always compare the same rows.
    """
    if "type_code" not in frame.columns:
        return []
    ok = frame[frame["status"] == "ok"] if "status" in frame.columns else frame
    losses: list[FidelityLoss] = []
    for code, sub in sorted(ok.groupby(ok["type_code"].fillna(NO_TYPE)), key=lambda kv: kv[0]):
        scores = {c: _numbers(sub, c) for c in _SCORED if c in sub.columns}
        rows = common_rows(list(scores.values()), len(sub))
        if not rows.any():
            continue
        for key, *_ in _METRICS:
            deg, enh = scores.get(f"{key}_degraded"), scores.get(f"{key}_enhanced")
            if deg is None or enh is None or np.isnan(enh).all() or np.isnan(deg).all():
                continue
            d_mean, e_mean = float(deg[rows].mean()), float(enh[rows].mean())
            if e_mean < d_mean:
                losses.append(FidelityLoss(str(code), key, d_mean, e_mean, int(rows.sum())))
    return losses


def warning_lines(losses: list[FidelityLoss]) -> list[str]:
    """One line per metric, e.g. ``WARNING enhancement lowered PSNR on 010 (-8.90 dB), 100
    (-9.12 dB)``; empty when enhancement lowered nothing. A loss that rounds to zero at the
    printed precision is no warning."""
    lines = []
    for key, label, unit, spec in _METRICS:
        hits = [h for h in losses if h.metric == key and float(f"{h.change:{spec}}") != 0]
        if hits:
            parts = ", ".join(f"{h.type_code} ({h.change:+{spec}}{unit})" for h in hits)
            lines.append(f"WARNING enhancement lowered {label} on {parts}")
    return lines


@dataclass(frozen=True)
class Unchanged:
    """The enhanced rows of one degradation type (``None``: rows without one, as in enhance
    mode) and how many of them the enhancer returned unchanged inside the FOV."""

    type_code: str | None
    unchanged: int
    rows: int


def unchanged_counts(frame: pd.DataFrame) -> list[Unchanged]:
    """Per degradation type, the ``ok`` rows that recorded ``enhance_change`` and how many of
    them have 0 (every FOV pixel as it went in: a gated model that judged the image to need no
    correction does this); sorted by type. Rows written before the column existed do not count.
    """
    if "enhance_change" not in frame.columns:
        return []
    ok = frame[frame["status"] == "ok"] if "status" in frame.columns else frame
    change = pd.to_numeric(ok["enhance_change"], errors="coerce").dropna()
    no_type = pd.Series(None, index=ok.index, dtype=object)
    types = ok["type_code"] if "type_code" in ok.columns else no_type
    groups = change.groupby(types[change.index].astype(object).fillna(NO_TYPE))
    return [
        Unchanged(None if code == NO_TYPE else str(code), int((sub == 0).sum()), len(sub))
        for code, sub in groups
    ]


def unchanged_lines(counts: list[Unchanged]) -> list[str]:
    """``NOTE enhancement left images unchanged: 010 (7 of 7), 100 (5 of 7)``, or for rows
    without a type ``NOTE enhancement left 100 of 100 images unchanged``; empty when it changed
    every image."""
    hits = [c for c in counts if c.unchanged]
    typed = [c for c in hits if c.type_code is not None]
    lines = []
    if typed:
        parts = ", ".join(f"{c.type_code} ({c.unchanged} of {c.rows})" for c in typed)
        lines.append(f"NOTE enhancement left images unchanged: {parts}")
    for c in hits:
        if c.type_code is None:
            lines.append(f"NOTE enhancement left {c.unchanged} of {c.rows} images unchanged")
    return lines


def summary_lines(frame: pd.DataFrame) -> list[str]:
    """The WARNING lines (:func:`warning_lines`), then the NOTE lines (:func:`unchanged_lines`)."""
    return warning_lines(fidelity_losses(frame)) + unchanged_lines(unchanged_counts(frame))


def read_output(
    out: str,
    columns: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    *,
    within: RowFilter | None = None,
) -> pd.DataFrame | None:
    """The rows stored under output folder ``out`` (the ``columns`` asked, all when None),
    only those ``within`` keeps when given; None when there is no shard."""
    from fundus_batch.shards import concat_tables, iter_tables, read_frame

    if within is None:
        return read_frame(out, columns, storage_options)
    wanted = None if columns is None else [*columns, "image_id", "variant"]
    tables = (
        table.filter(pa.array(within(table), pa.bool_()))
        for table in iter_tables(out, wanted, storage_options)
    )
    table = concat_tables(tables)
    return None if table is None else table.to_pandas()


def output_summary_lines(
    out: str, storage_options: dict[str, Any] | None = None, *, within: RowFilter | None = None
) -> list[str]:
    """:func:`summary_lines` of the rows stored under output folder ``out``, only those
    ``within`` keeps when given (none: [])."""
    frame = read_output(out, list(FIDELITY_COLUMNS), storage_options, within=within)
    if frame is None or frame.empty:
        return []
    return summary_lines(frame)
