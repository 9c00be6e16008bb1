"""What enhancement did, per degradation type: where it lowered fidelity (mean enhanced vs
degraded scores) and which images it left unchanged.

Used by the run summary, the demo's table and the HTML report, so that every one of them says
the same thing: a type whose mean enhanced PSNR (or SSIM) against the clean image is below the
degraded input's was made worse by enhancement, and an image whose ``enhance_change`` is 0 came
back exactly as it went in. Rows must be ``ok``; failed rows never count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "FIDELITY_COLUMNS",
    "NO_TYPE",
    "FidelityLoss",
    "Unchanged",
    "fidelity_losses",
    "output_summary_lines",
    "summary_lines",
    "unchanged_counts",
    "unchanged_lines",
    "warning_lines",
]

FIDELITY_COLUMNS = (
    "type_code",
    "status",
    "psnr_degraded",
    "psnr_enhanced",
    "ssim_degraded",
    "ssim_enhanced",
    "enhance_change",
)
"""The Parquet columns :func:`summary_lines` reads."""

NO_TYPE = "none"
"""The type code of rows without a degradation (enhance and score runs), missing or written so."""

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


def _finite_mean(values: pd.Series) -> tuple[float | None, int]:
    arr = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    arr = arr[np.isfinite(arr)]
    return (float(arr.mean()) if arr.size else None), int(arr.size)


def fidelity_losses(frame: pd.DataFrame) -> list[FidelityLoss]:
    """Every (type, metric) whose mean enhanced score is below the mean degraded score, over
    the ``ok`` rows that have both; sorted by type, PSNR before SSIM.

    Means are taken over rows holding both values, so a row missing one never tilts the
    comparison. PSNR is capped for identical images upstream; infinite values are skipped.
    """
    if "type_code" not in frame.columns:
        return []
    ok = frame[frame["status"] == "ok"] if "status" in frame.columns else frame
    losses: list[FidelityLoss] = []
    for code, sub in sorted(ok.groupby(ok["type_code"].fillna(NO_TYPE)), key=lambda kv: kv[0]):
        for key, *_ in _METRICS:
            deg_col, enh_col = f"{key}_degraded", f"{key}_enhanced"
            if deg_col not in sub.columns or enh_col not in sub.columns:
                continue
            deg = pd.to_numeric(sub[deg_col], errors="coerce")
            enh = pd.to_numeric(sub[enh_col], errors="coerce")
            both = np.isfinite(deg.to_numpy(np.float64, na_value=np.nan)) & np.isfinite(
                enh.to_numpy(np.float64, na_value=np.nan)
            )
            if not both.any():
                continue
            d_mean, n = _finite_mean(deg[both])
            e_mean, _ = _finite_mean(enh[both])
            if d_mean is not None and e_mean is not None and e_mean < d_mean:
                losses.append(FidelityLoss(str(code), key, d_mean, e_mean, n))
    return losses


def warning_lines(losses: list[FidelityLoss]) -> list[str]:
    """One line per metric, e.g. ``WARNING enhancement lowered PSNR on 010 (-8.90 dB), 100
    (-9.12 dB)``; empty when enhancement lowered nothing."""
    lines = []
    for key, label, unit, spec in _METRICS:
        hits = [loss for loss in losses if loss.metric == key]
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


def output_summary_lines(out: str, storage_options: dict | None = None) -> list[str]:
    """:func:`summary_lines` of the rows stored under output folder ``out`` (none yet: [])."""
    from fundus_batch.shards import read_frame

    frame = read_frame(out, list(FIDELITY_COLUMNS), storage_options)
    if frame is None:
        return []
    return summary_lines(frame)
