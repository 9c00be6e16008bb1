"""SVG plots for the report, built as XML elements (so every text and attribute is escaped).

Pure functions: numbers in, a standalone SVG document (a string starting with ``<svg``) out.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ROLE_COLORS",
    "SVG_NS",
    "BoxStats",
    "box_stats",
    "inline",
    "nice_ticks",
    "svg_boxplot",
]

SVG_NS = "http://www.w3.org/2000/svg"
ROLE_COLORS = {
    "clean": "#6b7280",
    "input": "#6b7280",
    "degraded": "#c2410c",
    "enhanced": "#0f766e",
}
_DEFAULT_COLOR = "#2563eb"
_BOX_W, _GAP = 18, 8
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 16, 50, 30
_HEIGHT = 270
_POINTS_MAX = 60  # draw every point up to this many values, else only the outliers
OUTLIERS_DRAWN = 25
"""Outliers drawn per side of a box at most (the most extreme); the rest are only counted."""
_NOTE_H = 16  # height of one note line under the plot


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v < hi + step * 0.999:
        ticks.append(round(v, 12))
        v += step
    return ticks if len(ticks) >= 2 else [start, start + step]


@dataclass(frozen=True)
class BoxStats:
    """Quartiles, whisker ends (furthest values within 1.5 IQR) and the values beyond them."""

    q1: float
    median: float
    q3: float
    lo: float
    hi: float
    outliers: tuple[float, ...]


def box_stats(values: Sequence[float] | np.ndarray) -> BoxStats:
    """Box-plot statistics of a non-empty set of finite values."""
    arr = np.asarray(values, dtype=np.float64)
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    iqr = q3 - q1
    inside = arr[(arr >= q1 - 1.5 * iqr) & (arr <= q3 + 1.5 * iqr)]
    outliers = arr[(arr < q1 - 1.5 * iqr) | (arr > q3 + 1.5 * iqr)]
    return BoxStats(
        float(q1),
        float(med),
        float(q3),
        float(inside.min()),
        float(inside.max()),
        tuple(float(v) for v in outliers),
    )


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: object) -> ET.Element:
    """Append a child element; attribute values are written with str() (floats to 1 decimal)."""
    el = ET.SubElement(parent, tag, {k.replace("_", "-"): _attr(v) for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def _attr(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def svg_boxplot(
    title: str,
    groups: Sequence[str],
    series: Sequence[str],
    data: Mapping[tuple[str, str], Sequence[float] | np.ndarray],
    colors: Mapping[str, str] | None = None,
    *,
    note: str = "",
) -> str:
    """Grouped box plot as a standalone SVG: one slot per group, one box per series present.

    ``data[(group, series)]`` holds finite values. Whiskers reach the furthest points within
    1.5 IQR; the points themselves are drawn when there are few of them, else the outliers, at
    most :data:`OUTLIERS_DRAWN` per side of a box (the plot then says so under it, and the
    box's tooltip gives the count). ``note`` is a line of text under the plot.
    """
    colors = colors or ROLE_COLORS
    values = {k: np.asarray(v, dtype=np.float64) for k, v in data.items()}
    empty = np.empty(0)
    per_group = max(
        (sum(1 for s in series if values.get((g, s), empty).size) for g in groups), default=1
    )
    slot = max(per_group * (_BOX_W + _GAP) + 20, 56)
    plot_w = max(len(groups) * slot, 300)
    width = _LEFT + plot_w + _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM
    stats = {k: box_stats(v) for k, v in values.items() if v.size}
    capped = any(
        values[k].size > _POINTS_MAX and max(map(len, _sides(b))) > OUTLIERS_DRAWN
        for k, b in stats.items()
    )
    notes = [note] if note else []
    if capped:
        notes.append(f"outliers: at most the {OUTLIERS_DRAWN} most extreme per side of a box drawn")
    height = _HEIGHT + _NOTE_H * len(notes)
    svg = ET.Element(
        "svg",
        {
            "xmlns": SVG_NS,
            "width": str(width),
            "height": str(height),
            "viewBox": f"0 0 {width} {height}",
            "role": "img",
            "aria-label": title,
            "font-family": "system-ui,sans-serif",
        },
    )
    _sub(svg, "text", title, x=12, y=20, font_size=14, font_weight=600, fill="#111827")
    for i, line in enumerate(notes):
        _sub(svg, "text", line, x=12, y=_HEIGHT + _NOTE_H * i + 4, font_size=11, fill="#6b7280")
    lx = _LEFT
    for name in series:  # legend under the title
        _sub(
            svg,
            "rect",
            x=lx,
            y=29,
            width=11,
            height=11,
            fill=colors.get(name, _DEFAULT_COLOR),
            fill_opacity="0.75",
        )
        _sub(svg, "text", name, x=lx + 15, y=39, font_size=11, fill="#374151")
        lx += 7 * len(name) + 30
    present = [v for v in values.values() if v.size]
    if not present:
        _sub(svg, "text", "no values", x=_LEFT, y=_TOP + 40, font_size=12, fill="#6b7280")
        return ET.tostring(svg, encoding="unicode")
    allv = np.concatenate(present)
    ticks = nice_ticks(float(allv.min()), float(allv.max()))
    y0, y1 = ticks[0], ticks[-1]

    def y(v: float) -> float:
        return _TOP + plot_h * (1.0 - (v - y0) / (y1 - y0))

    for t in ticks:
        yy = y(t)
        _sub(svg, "line", x1=_LEFT, x2=_LEFT + plot_w, y1=yy, y2=yy, stroke="#e5e7eb")
        _sub(
            svg,
            "text",
            f"{t:.6g}",
            x=_LEFT - 6,
            y=yy + 4,
            font_size=11,
            text_anchor="end",
            fill="#4b5563",
        )
    _sub(svg, "line", x1=_LEFT, x2=_LEFT, y1=_TOP, y2=_TOP + plot_h, stroke="#9ca3af")
    for gi, group in enumerate(groups):
        members = [s for s in series if values.get((group, s), empty).size]
        cx = _LEFT + gi * slot + slot / 2
        _sub(
            svg,
            "text",
            group,
            x=cx,
            y=_TOP + plot_h + 16,
            font_size=11,
            text_anchor="middle",
            fill="#374151",
        )
        span = len(members) * (_BOX_W + _GAP) - _GAP
        for si, name in enumerate(members):
            bx = cx - span / 2 + si * (_BOX_W + _GAP)
            color = colors.get(name, _DEFAULT_COLOR)
            key = (group, name)
            _box(svg, values[key], stats[key], bx, y, color, f"{group} {name}")
    return ET.tostring(svg, encoding="unicode")


def _sides(b: BoxStats) -> tuple[np.ndarray, np.ndarray]:
    """The outliers below the box, most extreme first, and those above it, most extreme last."""
    out = np.sort(np.asarray(b.outliers, dtype=np.float64))
    return out[out < b.q1], out[out > b.q3]


def _box(
    svg: ET.Element,
    vals: np.ndarray,
    b: BoxStats,
    bx: float,
    y: Callable[[float], float],
    color: str,
    label: str,
) -> None:
    """One box with its whiskers, median line, points (or capped outliers) and a tooltip."""
    bw = float(_BOX_W)
    mid = bx + bw / 2
    g = _sub(svg, "g")
    tip = (
        f"{label}: n={vals.size}, median={b.median:.4g}, mean={float(vals.mean()):.4g}, "
        f"range={float(vals.min()):.4g}–{float(vals.max()):.4g}"
    )
    low, high = _sides(b)
    drawn = np.concatenate([low[:OUTLIERS_DRAWN], high[-OUTLIERS_DRAWN:] if high.size else high])
    if vals.size > _POINTS_MAX and drawn.size < low.size + high.size:
        tip += (
            f"; {low.size} outliers below and {high.size} above, "
            f"the {OUTLIERS_DRAWN} most extreme of each side drawn"
        )
    _sub(g, "title", tip)
    _sub(g, "line", x1=mid, x2=mid, y1=y(b.lo), y2=y(b.hi), stroke=color)
    for w in (b.lo, b.hi):
        _sub(g, "line", x1=bx + 4, x2=bx + bw - 4, y1=y(w), y2=y(w), stroke=color)
    top_y, bot_y = y(b.q3), y(b.q1)
    _sub(
        g,
        "rect",
        x=bx,
        y=top_y,
        width=_BOX_W,
        height=max(bot_y - top_y, 1.0),
        fill=color,
        fill_opacity="0.25",
        stroke=color,
    )
    _sub(
        g,
        "line",
        x1=bx,
        x2=bx + bw,
        y1=y(b.median),
        y2=y(b.median),
        stroke=color,
        stroke_width=2.5,
        **{"class": "median"},
    )
    if vals.size <= _POINTS_MAX:
        for i, v in enumerate(vals):
            jitter = ((i * 0.618034) % 1.0 - 0.5) * bw * 0.7
            _sub(
                g,
                "circle",
                cx=mid + jitter,
                cy=y(float(v)),
                r=2,
                fill=color,
                fill_opacity="0.55",
            )
    else:
        for v in drawn:
            _sub(g, "circle", cx=mid, cy=y(float(v)), r=2.2, fill="none", stroke=color)


def inline(svg: str) -> str:
    """An SVG for embedding in HTML, which needs no namespace declaration."""
    return svg.replace(f' xmlns="{SVG_NS}"', "", 1)
