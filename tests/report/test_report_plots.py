"""SVG box plots: geometry from known values, and text that cannot break out of the SVG."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import pytest

from fundus_batch.report.plots import (
    OUTLIERS_DRAWN,
    SVG_NS,
    box_stats,
    inline,
    nice_ticks,
    svg_boxplot,
)

NS = {"s": SVG_NS}
TOP, PLOT_H = 50, 190  # the plot area of svg_boxplot: y = TOP + PLOT_H * (1 - (v - lo) / span)


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def test_median_line_sits_at_the_median_on_the_tick_scale():
    # Ticks 0..4 in steps of 1, so the value v sits at y = 50 + 190 * (1 - v / 4).
    svg = _parse(svg_boxplot("t", ["g"], ["degraded"], {("g", "degraded"): [0, 1, 3, 4, 4]}))
    ticks = [float(t.text or "") for t in svg.iterfind("s:text[@text-anchor='end']", NS)]
    assert ticks == [0, 1, 2, 3, 4]
    (median,) = svg.iterfind(".//s:line[@class='median']", NS)
    assert float(median.get("y1", "")) == pytest.approx(TOP + PLOT_H * (1 - 3 / 4), abs=0.05)
    assert median.get("stroke") == "#c2410c"  # the degraded colour


def test_one_box_per_group_and_series_present_with_a_tooltip_giving_n_and_median():
    data = {("001", "degraded"): [20, 22, 24], ("001", "enhanced"): [25], ("010", "degraded"): []}
    svg = _parse(svg_boxplot("PSNR", ["001", "010"], ["degraded", "enhanced"], data))
    titles = [t.text for t in svg.iterfind("s:g/s:title", NS)]
    assert titles == [
        "001 degraded: n=3, median=22, mean=22, range=20–24",
        "001 enhanced: n=1, median=25, mean=25, range=25–25",
    ]
    assert len(list(svg.iterfind("s:g/s:circle", NS))) == 4  # few values: every point drawn


def test_box_stats_puts_values_beyond_one_and_a_half_iqr_outside_the_whiskers():
    stats = box_stats([1, 2, 3, 4, 5, 100])
    assert (stats.q1, stats.median, stats.q3) == (2.25, 3.5, 4.75)
    assert (stats.lo, stats.hi) == (1, 5) and stats.outliers == (100,)


def test_many_values_draw_only_the_outliers():
    values = [float(v % 10) for v in range(100)] + [1000.0]
    svg = _parse(svg_boxplot("t", ["g"], ["s"], {("g", "s"): values}))
    assert len(list(svg.iterfind("s:g/s:circle", NS))) == 1


def test_hostile_labels_stay_text():
    hostile = '</text><script>alert(1)</script>"'
    svg = svg_boxplot(hostile, [hostile], [hostile], {(hostile, hostile): [1.0, 2.0]})
    assert "<script>" not in svg
    root = _parse(svg)
    assert root.get("aria-label") == hostile
    assert not list(root.iter(f"{{{SVG_NS}}}script"))
    assert hostile in [t.text for t in root.iter(f"{{{SVG_NS}}}text")]


def test_a_plot_without_values_says_so():
    svg = _parse(svg_boxplot("empty", ["a"], ["s"], {("a", "s"): []}))
    assert [t.text for t in svg.iterfind("s:text", NS)][-1] == "no values"


@pytest.mark.parametrize(("lo", "hi"), [(0.0, 1.0), (17.3, 41.9), (0.91, 0.93), (5.0, 5.0)])
def test_ticks_are_evenly_spaced_and_cover_the_range(lo: float, hi: float):
    ticks = nice_ticks(lo, hi)
    assert len(ticks) >= 2 and ticks[0] <= lo and ticks[-1] >= hi
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1


def test_inline_svg_drops_only_the_namespace_declaration():
    svg = svg_boxplot("t", ["g"], ["s"], {("g", "s"): [1.0]})
    assert svg.startswith(f'<svg xmlns="{SVG_NS}"')
    assert inline(svg) == svg.replace(f' xmlns="{SVG_NS}"', "")


def test_outliers_are_capped_at_the_most_extreme_per_side_and_the_plot_says_so():
    body = [float(v % 10) for v in range(1000)]
    low = [-100.0 - v for v in range(300)]
    high = [100.0 + v for v in range(200)]
    svg = _parse(svg_boxplot("t", ["g"], ["s"], {("g", "s"): body + low + high}, note="n.b."))
    assert len(list(svg.iterfind("s:g/s:circle", NS))) == 2 * OUTLIERS_DRAWN
    (tip,) = [t.text or "" for t in svg.iterfind("s:g/s:title", NS)]
    assert f"300 outliers below and 200 above, the {OUTLIERS_DRAWN} most extreme" in tip
    notes = [t.text for t in svg.iterfind("s:text", NS)]
    assert "n.b." in notes
    assert f"outliers: at most the {OUTLIERS_DRAWN} most extreme per side of a box drawn" in notes


def test_capped_outliers_are_the_most_extreme_values():
    values = [float(v % 10) for v in range(1000)] + [100.0 + v for v in range(100)]
    svg = svg_boxplot("t", ["g"], ["s"], {("g", "s"): values})
    root = _parse(svg)
    ys = sorted(float(c.get("cy", "")) for c in root.iterfind("s:g/s:circle", NS))
    ticks = [float(t.text or "") for t in root.iterfind("s:text[@text-anchor='end']", NS)]
    lo, hi = ticks[0], ticks[-1]

    def value(yy: float) -> float:
        return lo + (hi - lo) * (1 - (yy - TOP) / PLOT_H)

    shown = sorted(round(value(yy)) for yy in ys)
    assert shown == list(range(175, 200))
