"""Plain-text formatting of report values (numbers, durations, type names); no HTML."""

from __future__ import annotations

import math
from typing import SupportsFloat, cast

from fundus_batch.fidelity import NO_TYPE

__all__ = ["NO_TYPE", "TYPE_NAMES", "Verbatim", "decimals", "duration", "fmt", "num", "type_label"]

TYPE_NAMES = {
    "001": "illumination",
    "010": "spots",
    "011": "spots + illumination",
    "100": "blur",
    "101": "blur + illumination",
    "110": "blur + spots",
    "111": "blur + spots + illumination",
}
"""Plain names of the released 3-bit degradation codes (bits: blur, spots, illumination)."""

SHARE_METRICS = ("nr_overexposed", "nr_underexposed")
UNIT_METRICS = ("ssim", "ms_ssim", "vessel_")  # scores on a 0-1 scale, shown to 4 decimals
# Small-valued no-reference metrics, shown to 4 decimals; every other value gets 2.
FINE_METRICS = ("nr_uniformity", "nr_rms_contrast", "nr_blur_effect")
DASH = "–"


class Verbatim(str):
    """Text shown as it is (still HTML-escaped), never redacted: image ids and the links built
    from them, which name files under OUT. An id that happens to look like an access key id
    (``ASIA2019RETINA000123``) must reach the page intact."""

    __slots__ = ()


def decimals(metric: str) -> int:
    """Decimals shown for ``metric``: fixed per column, so that values line up."""
    return 4 if metric.startswith(UNIT_METRICS + FINE_METRICS) else 2


def num(value: object) -> float | None:
    """A finite float, or None for null/NaN/inf/non-numbers."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(cast(SupportsFloat, value))  # anything else raises TypeError, caught here
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt(value: object, metric: str = "") -> str:
    """``value`` shown the way ``metric`` is read: dB to 2 decimals, shares as %, 0-1 scores to
    4 decimals; every metric with a fixed number of decimals (see :func:`decimals`)."""
    f = num(value)
    if f is None:
        return DASH
    if metric.startswith("psnr") or metric.startswith("seconds"):
        return f"{f:.2f}"
    if metric in ("n", "count"):
        return f"{int(f)}"
    if metric in SHARE_METRICS:
        return f"{f * 100:.2f}%"
    return f"{f:.{decimals(metric)}f}"


def duration(seconds: float | None) -> str:
    """``12.3 s``, ``4 min 05 s`` or ``2 h 03 min``."""
    if seconds is None:
        return DASH
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 120:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def type_label(code: str) -> str:
    """``001 · illumination``; ``no degradation`` for rows without a type."""
    if code == NO_TYPE:
        return "no degradation"
    name = TYPE_NAMES.get(code)
    return f"{code} · {name}" if name else code
