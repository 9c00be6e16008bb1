"""A self-contained HTML report of one output folder: what ran, what it produced, what failed.

:func:`write_report` reads ``OUT/run.json`` and the Parquet shards under ``OUT/pairs/`` (local
path or any fsspec URL) and writes one HTML file that needs nothing else to display: thumbnails
are base64 PNG data URIs, plots are inline SVG, the styles are inline and a
Content-Security-Policy forbids any network load. The contact sheets are also written as PNG
files, and the plots as SVG files, under ``report_figures/`` beside the HTML.

Layers: :mod:`.data` loads and aggregates (plain dataclasses), :mod:`.sheets` reads the images
for the contact sheets, :mod:`.plots` draws SVG, :mod:`.render` fills
``templates/report.html.j2`` (Jinja2, autoescape on). Sections (each an element with a stable
id, see :data:`SECTION_IDS`): ``summary``, ``contact-sheets``, ``metrics``, ``downstream``,
``failures``, ``throughput``.
"""

from __future__ import annotations

import os
from pathlib import Path

from fundus_batch.io import storage
from fundus_batch.report.data import aggregate, load
from fundus_batch.report.formatting import TYPE_NAMES
from fundus_batch.report.plots import svg_boxplot
from fundus_batch.report.render import FIGURES_DIR, SECTION_IDS, render_page
from fundus_batch.report.sheets import ImageReader, contact_sheets

__all__ = [
    "FIGURES_DIR",
    "REPORT_NAME",
    "SECTION_IDS",
    "TYPE_NAMES",
    "svg_boxplot",
    "write_report",
]

REPORT_NAME = "report.html"


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."


def write_report(
    out: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    storage_options: dict | None = None,
    rows_per_type: int = 3,
    thumb: int = 176,
) -> Path | str:
    """Write the HTML report of output folder ``out``; return where it went.

    ``dest`` defaults to ``OUT/report.html``; the contact sheets (PNG) and plots (SVG) go to
    ``report_figures/`` beside it. ``storage_options`` are used to read ``out`` (and to write a
    remote ``dest``) and never appear in the report. Returns a :class:`~pathlib.Path` for a
    local destination and the URI string otherwise. Raises FileNotFoundError when ``out`` holds
    neither run.json nor any Parquet shard.
    """
    if not isinstance(out, str) or not out:
        raise ValueError(f"out must be a non-empty path or URI, got {out!r}")
    if rows_per_type < 1 or thumb < 16:
        raise ValueError(
            f"rows_per_type must be >= 1 and thumb >= 16, got {rows_per_type}, {thumb}"
        )
    target = str(dest) if dest is not None else storage.join(out, REPORT_NAME)
    remote = "://" in target
    if not remote and os.path.isdir(target):  # before any figure is written beside it
        raise IsADirectoryError(
            f"report destination {target} is a folder; give the HTML file's path, e.g. "
            f"{os.path.join(target, REPORT_NAME)}"
        )
    figures = storage.join(_parent(target), FIGURES_DIR)
    write_options = storage_options if remote else None
    if dest is None:  # inside OUT: neither the page nor the figures folder may be a link
        from fundus_batch.outpaths import check_local_target

        check_local_target(out, target)
        check_local_target(out, storage.join(figures, "figure.png"))

    def save(name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(figures, name), data, storage_options=write_options)

    loaded = load(out, storage_options)
    data = aggregate(loaded)
    reader = ImageReader(loaded.out, storage_options, _parent(figures))
    sheets = contact_sheets(loaded, reader, rows_per_type, thumb)
    for sheet in sheets.sheets:
        save(sheet.figure, sheet.png)
    svgs = []
    for plot in data.metrics.plots:
        svg = svg_boxplot(plot.title, plot.groups, plot.series, plot.values, note=plot.note)
        save(f"metric_{plot.key}.svg", svg.encode("utf-8"))
        svgs.append(svg)
    page = render_page(data, sheets, svgs)
    storage.write_bytes(target, page.encode("utf-8"), storage_options=write_options)
    return target if remote else Path(target)
