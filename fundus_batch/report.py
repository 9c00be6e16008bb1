"""A self-contained HTML report of one output folder: what ran, what it produced, what failed.

:func:`write_report` reads ``OUT/run.json`` and the Parquet shards under ``OUT/pairs/`` (local
path or any fsspec URL) and writes one HTML file that needs nothing else to display: thumbnails
are base64 PNG data URIs, plots are inline SVG drawn here (no plotting library), the styles are
inline and a Content-Security-Policy forbids any network load. The contact sheets are also
written as PNG files, and the plots as SVG files, under ``report_figures/`` beside the HTML.

Sections (each an element with a stable id, see :data:`SECTION_IDS`): ``summary``,
``contact-sheets``, ``metrics``, ``downstream``, ``failures``, ``throughput``.
"""

from __future__ import annotations

import base64
import html
import math
import os
import posixpath
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, SupportsFloat, cast
from urllib.parse import quote

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fundus_batch import __version__
from fundus_batch.fidelity import fidelity_losses, warning_lines
from fundus_batch.io import codecs, storage
from fundus_batch.output import RUN_JSON, OutputStore
from fundus_batch.schema import IMAGE_ROLES, STAGES, STATUS_OK

__all__ = [
    "FIGURES_DIR",
    "REPORT_NAME",
    "SECTION_IDS",
    "TYPE_NAMES",
    "svg_boxplot",
    "write_report",
]

REPORT_NAME = "report.html"
FIGURES_DIR = "report_figures"
SECTION_IDS = ("summary", "contact-sheets", "metrics", "downstream", "failures", "throughput")
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

FULL_REFERENCE = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("ms_ssim", "MS-SSIM"))
NOREF_PLOTTED = (
    ("nr_luminance", "mean luma (0-255)"),
    ("nr_uniformity", "illumination non-uniformity"),
    ("nr_rms_contrast", "RMS contrast"),
    ("nr_laplacian_var", "Laplacian variance (sharpness)"),
    ("nr_blur_effect", "blur effect (0 sharp - 1 blurred)"),
)
NOREF_TABLE_ONLY = (
    ("nr_overexposed", "over-exposed pixels"),
    ("nr_underexposed", "under-exposed pixels"),
)
SHARE_METRICS = ("nr_overexposed", "nr_underexposed")
UNIT_METRICS = ("ssim", "ms_ssim", "vessel_")  # scores on a 0-1 scale, shown to 4 decimals
PARAM_COLUMNS = (
    ("blur_sigma", "blur σ"),
    ("n_spots", "spots"),
    ("hole_strength", "hole"),
    ("brightness", "bright."),
    ("contrast", "contr."),
    ("saturation", "sat."),
)
# Stages that run once per source image: their seconds are copied onto every variant row.
PER_IMAGE_STAGES = ("fetch", "preprocess")
ROLE_COLORS = {"clean": "#6b7280", "degraded": "#c2410c", "enhanced": "#0f766e"}
NO_TYPE = "none"
_SVG_NS = "http://www.w3.org/2000/svg"

_SKIP_COLUMNS = {"params_json", "id_hash", "model_sha256"} | {
    f"{role}_sha256" for role in (*IMAGE_ROLES, "mask")
}
_VESSEL_COLUMN = re.compile(r"^vessel_([a-z0-9]+)_(clean|degraded|enhanced)$")
# Config keys shown in the summary; anything else (storage options above all) is never shown.
_CONFIG_KEYS = (
    "mode",
    "manifest",
    "out",
    "size",
    "preset",
    "variants",
    "types",
    "type_mode",
    "seed",
    "image_format",
    "compute_metrics",
    "min_quality",
    "limit",
    "shard_rows",
)
_ENHANCE_KEYS = ("enabled", "weights", "variant", "width", "device")

_CSS = """
:root{--fg:#1f2937;--muted:#6b7280;--line:#e5e7eb;--bg:#f9fafb;--ok:#15803d;--bad:#b91c1c;
--warn:#b45309}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
color:var(--fg);background:#fff}
header{background:#111827;color:#f9fafb;padding:18px 32px}
header h1{margin:0 0 4px;font-size:22px}
header .sub{color:#d1d5db;font-size:13px;word-break:break-all}
nav{position:sticky;top:0;z-index:2;background:#f3f4f6;border-bottom:1px solid var(--line);
padding:8px 32px}
nav a{color:#1d4ed8;text-decoration:none;margin-right:18px;font-weight:600;font-size:14px}
main{max-width:1240px;margin:0 auto;padding:8px 32px 48px}
section{padding-top:12px;border-bottom:1px solid var(--line);padding-bottom:18px}
h2{font-size:19px;margin:18px 0 6px}
h3{font-size:16px;margin:18px 0 6px}
p.note{color:var(--muted);font-size:13px;margin:4px 0 10px;max-width:900px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:4px 10px;text-align:left;vertical-align:top}
th{background:var(--bg);font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fcfcfd}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{border:1px solid var(--line);border-radius:8px;padding:8px 14px;min-width:120px;
background:var(--bg)}
.card .v{font-size:22px;font-weight:700;font-variant-numeric:tabular-nums}
.card .k{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:700;color:#fff;
font-size:13px}
.good{color:var(--ok)} .bad{color:var(--bad)} .warn{color:var(--warn)}
.cols{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}
.count{font-weight:400;color:var(--muted);font-size:13px}
.sheet{display:flex;flex-wrap:wrap;gap:14px 26px}
.entry{margin:0}
.thumbs{display:flex;gap:4px}
.role{font-size:11px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.thumbs img{display:block;border-radius:4px;background:#000}
figcaption{font-size:12px;line-height:1.4;margin-top:4px}
.missing{display:flex;align-items:center;justify-content:center;
background:#f3f4f6;color:var(--muted);font-size:12px;text-align:center;border-radius:4px}
.plots{display:flex;flex-wrap:wrap;gap:18px}
.plots svg{border:1px solid var(--line);border-radius:6px;background:#fff}
.bar{background:#dbeafe;height:12px;border-radius:2px}
.bar>div{background:#2563eb;height:12px;border-radius:2px}
code{font-size:12px;background:var(--bg);padding:1px 4px;border-radius:3px;word-break:break-all}
code.kind{white-space:nowrap;word-break:normal}
footer{color:var(--muted);font-size:12px;text-align:center;padding:16px}
"""


def _e(value: object) -> str:
    """Escaped text (credentials removed first)."""
    return html.escape(storage.redact(str(value)), quote=True)


def _num(value: object) -> float | None:
    """A finite float, or None for null/NaN/inf/non-numbers."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(cast(SupportsFloat, value))  # anything else raises TypeError, caught here
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(value: object, metric: str = "") -> str:
    f = _num(value)
    if f is None:
        return "–"
    if metric.startswith("psnr") or metric.startswith("seconds"):
        return f"{f:.2f}"
    if metric in ("n", "count"):
        return f"{int(f)}"
    if metric in SHARE_METRICS:
        return f"{f * 100:.2f}%"
    if metric.startswith(UNIT_METRICS):
        return f"{f:.4f}"
    return f"{f:.4g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 120:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _type_label(code: str) -> str:
    if code == NO_TYPE:
        return "no degradation"
    name = TYPE_NAMES.get(code)
    return f"{code} · {name}" if name else code


def _values(frame: pd.DataFrame, column: str) -> np.ndarray:
    """Finite float values of ``column`` (empty when absent)."""
    if column not in frame.columns:
        return np.empty(0)
    arr = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return arr[np.isfinite(arr)]


def _has(frame: pd.DataFrame, column: str) -> bool:
    return _values(frame, column).size > 0


def _table(
    head: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] | None = None
) -> str:
    """An HTML table from already-escaped cell strings."""
    numeric = numeric or [False] * len(head)
    th = "".join(
        f'<th class="num">{h}</th>' if n else f"<th>{h}</th>"
        for h, n in zip(head, numeric, strict=True)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if n else f"<td>{c}</td>"
            for c, n in zip(row, numeric, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------------------- SVG plotting


def _nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
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


def _tick_label(v: float) -> str:
    return f"{v:.6g}"


@dataclass(frozen=True)
class _Box:
    q1: float
    median: float
    q3: float
    lo: float
    hi: float
    outliers: np.ndarray


def _box_stats(values: np.ndarray) -> _Box:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    iqr = q3 - q1
    inside = values[(values >= q1 - 1.5 * iqr) & (values <= q3 + 1.5 * iqr)]
    outliers = values[(values < q1 - 1.5 * iqr) | (values > q3 + 1.5 * iqr)]
    return _Box(
        float(q1), float(med), float(q3), float(inside.min()), float(inside.max()), outliers
    )


def svg_boxplot(
    title: str,
    groups: Sequence[str],
    series: Sequence[str],
    data: Mapping[tuple[str, str], np.ndarray],
    colors: Mapping[str, str] | None = None,
) -> str:
    """Grouped box plot as a standalone SVG: one slot per group, one box per series present.

    Whiskers reach the furthest points within 1.5 IQR; the points themselves are drawn when
    there are few of them.
    """
    colors = colors or ROLE_COLORS
    box_w, gap = 18, 8
    per_group = max(
        (sum(1 for s in series if data.get((g, s), np.empty(0)).size) for g in groups), default=1
    )
    slot = max(per_group * (box_w + gap) + 20, 56)
    left, right, top, bottom = 60, 16, 50, 30
    plot_w = max(len(groups) * slot, 300)
    width, height = left + plot_w + right, 270
    plot_h = height - top - bottom
    present = [v for v in data.values() if v.size]
    parts = [
        f'<svg xmlns="{_SVG_NS}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}" '
        'font-family="system-ui,sans-serif">',
        f'<text x="12" y="20" font-size="14" font-weight="600" fill="#111827">{_e(title)}</text>',
    ]
    # Legend under the title.
    lx = float(left)
    for name in series:
        parts.append(
            f'<rect x="{lx:.0f}" y="29" width="11" height="11" '
            f'fill="{colors.get(name, "#2563eb")}" fill-opacity="0.75"/>'
            f'<text x="{lx + 15:.0f}" y="39" font-size="11" fill="#374151">{_e(name)}</text>'
        )
        lx += 7 * len(name) + 30
    if not present:
        parts.append(
            f'<text x="{left}" y="{top + 40}" font-size="12" fill="#6b7280">no values</text></svg>'
        )
        return "".join(parts)
    allv = np.concatenate(present)
    ticks = _nice_ticks(float(allv.min()), float(allv.max()))
    y0, y1 = ticks[0], ticks[-1]

    def y(v: float) -> float:
        return top + plot_h * (1.0 - (v - y0) / (y1 - y0))

    for t in ticks:
        yy = y(t)
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e5e7eb"/>'
            f'<text x="{left - 6}" y="{yy + 4:.1f}" font-size="11" text-anchor="end" '
            f'fill="#4b5563">{_e(_tick_label(t))}</text>'
        )
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#9ca3af"/>')
    for gi, group in enumerate(groups):
        members = [s for s in series if data.get((group, s), np.empty(0)).size]
        cx = left + gi * slot + slot / 2
        parts.append(
            f'<text x="{cx:.1f}" y="{top + plot_h + 16}" font-size="11" text-anchor="middle" '
            f'fill="#374151">{_e(group)}</text>'
        )
        span = len(members) * (box_w + gap) - gap
        for si, name in enumerate(members):
            vals = data[(group, name)]
            bx = cx - span / 2 + si * (box_w + gap)
            color = colors.get(name, "#2563eb")
            parts.append(_svg_box(vals, bx, box_w, y, color, f"{group} {name}"))
    parts.append("</svg>")
    return "".join(parts)


def _svg_box(vals: np.ndarray, bx: float, bw: float, y: Any, color: str, label: str) -> str:
    b = _box_stats(vals)
    mid = bx + bw / 2
    tip = (
        f"{label}: n={vals.size}, median={b.median:.4g}, mean={float(vals.mean()):.4g}, "
        f"range={float(vals.min()):.4g}–{float(vals.max()):.4g}"
    )
    out = [f"<g><title>{_e(tip)}</title>"]
    out.append(
        f'<line x1="{mid:.1f}" x2="{mid:.1f}" y1="{y(b.lo):.1f}" y2="{y(b.hi):.1f}" '
        f'stroke="{color}"/>'
    )
    for w in (b.lo, b.hi):
        out.append(
            f'<line x1="{bx + 4:.1f}" x2="{bx + bw - 4:.1f}" y1="{y(w):.1f}" y2="{y(w):.1f}" '
            f'stroke="{color}"/>'
        )
    top_y, bot_y = y(b.q3), y(b.q1)
    out.append(
        f'<rect x="{bx:.1f}" y="{top_y:.1f}" width="{bw}" height="{max(bot_y - top_y, 1.0):.1f}" '
        f'fill="{color}" fill-opacity="0.25" stroke="{color}"/>'
    )
    out.append(
        f'<line x1="{bx:.1f}" x2="{bx + bw:.1f}" y1="{y(b.median):.1f}" y2="{y(b.median):.1f}" '
        f'stroke="{color}" stroke-width="2.5"/>'
    )
    if vals.size <= 60:
        for i, v in enumerate(vals):
            jitter = ((i * 0.618034) % 1.0 - 0.5) * bw * 0.7
            out.append(
                f'<circle cx="{mid + jitter:.1f}" cy="{y(float(v)):.1f}" r="2" fill="{color}" '
                'fill-opacity="0.55"/>'
            )
    else:
        for v in b.outliers:
            out.append(
                f'<circle cx="{mid:.1f}" cy="{y(float(v)):.1f}" r="2.2" fill="none" '
                f'stroke="{color}"/>'
            )
    out.append("</g>")
    return "".join(out)


# ---------------------------------------------------------------------------- loading


def _read_frame(store: OutputStore) -> pd.DataFrame | None:
    """All Parquet rows (minus bulky provenance columns), or None when there is no shard."""
    tables = []
    for path in store.shard_paths():
        with store.fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = [n for n in pf.schema_arrow.names if n not in _SKIP_COLUMNS]
            tables.append(pf.read(columns=names))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def _encode_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _thumbnail(rgb: np.ndarray, side: int) -> np.ndarray:
    """Fit ``rgb`` into a ``side`` x ``side`` black square (area resampling)."""
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    y0, x0 = (side - nh) // 2, (side - nw) // 2
    canvas[y0 : y0 + nh, x0 : x0 + nw] = small
    return canvas


# ---------------------------------------------------------------------------- the report


class _Report:
    def __init__(
        self,
        out: str,
        storage_options: dict | None,
        figures: str,
        figure_options: dict | None,
        rows_per_type: int,
        thumb: int,
    ) -> None:
        self.out = out.rstrip("/")
        self.storage_options = storage_options or {}
        self.store = OutputStore(self.out, self.storage_options)
        self.run: dict[str, Any] | None = self.store.read_json(RUN_JSON)
        frame = _read_frame(self.store)
        if self.run is None and frame is None:
            raise FileNotFoundError(
                f"nothing to report under {storage.redact(self.out)}: "
                f"no {RUN_JSON} and no Parquet shards in {storage.redact(self.store.pairs_uri)}"
            )
        if frame is None:
            frame = pd.DataFrame({"image_id": [], "status": []})
        self.frame: pd.DataFrame = frame
        if "type_code" in self.frame.columns:
            self.frame["type_code"] = self.frame["type_code"].fillna(NO_TYPE)
        else:
            self.frame["type_code"] = NO_TYPE
        self.ok = self.frame[self.frame["status"] == STATUS_OK]
        self.figures = figures
        self.figure_options = figure_options
        self.rows_per_type = rows_per_type
        self.thumb = thumb
        self._images: dict[str, np.ndarray | str] = {}
        self._located: dict[str, str] = {}  # recorded image URI -> where it was read
        self.report_dir = _parent(figures)

    # -- helpers

    @property
    def types(self) -> list[str]:
        return sorted(self.ok["type_code"].unique().tolist(), key=lambda c: (c == NO_TYPE, c))

    def roles_with(self, prefix: str, roles: Sequence[str] = ("degraded", "enhanced")) -> list[str]:
        return [r for r in roles if _has(self.ok, f"{prefix}_{r}")]

    def _save_figure(self, name: str, data: bytes) -> None:
        storage.write_bytes(
            storage.join(self.figures, name), data, storage_options=self.figure_options
        )

    def _image(self, uri: object) -> np.ndarray | str:
        """Decoded image, or a short reason why it could not be read."""
        if not isinstance(uri, str) or not uri:
            return "no image"
        if uri in self._images:
            return self._images[uri]
        result: np.ndarray | str
        try:
            data = self._read(uri)
            result = codecs.decode_image(data)
        except FileNotFoundError:
            result = "file missing"
        except Exception as exc:
            result = f"unreadable ({type(exc).__name__})"
        self._images[uri] = result
        return result

    def _read(self, uri: str) -> bytes:
        from fundus_batch.outpaths import resolve

        recorded = uri
        uri = resolve(self.out, uri)  # rows record paths relative to OUT
        try:
            data = storage.read_bytes(uri, storage_options=self.storage_options, retries=1)
        except FileNotFoundError:
            # An output folder that was moved still holds images/<id>/... relative to it.
            if "/images/" not in uri:
                raise
            rel = uri.rsplit("/images/", 1)[1]
            uri = storage.join(self.out, "images", rel)
            data = storage.read_bytes(uri, storage_options=self.storage_options, retries=1)
        self._located[recorded] = uri
        return data

    def _link(self, recorded: object) -> str | None:
        """A URL-quoted path from the report's folder to an image that was read, or None when
        the two do not share a filesystem (a local report of a bucket, say)."""
        where = self._located.get(recorded) if isinstance(recorded, str) else None
        if where is None:
            return None
        report_dir = self.report_dir
        if "://" in where or "://" in report_dir:
            image_root, _, image_path = where.partition("://")
            report_root, _, report_path = report_dir.partition("://")
            same_bucket = image_path.split("/", 1)[0] == report_path.split("/", 1)[0]
            if image_root != report_root or not same_bucket or not report_path:
                return None
            rel = posixpath.relpath(image_path, report_path)
        else:
            rel = os.path.relpath(os.path.abspath(where), os.path.abspath(report_dir))
            rel = rel.replace(os.sep, "/")
        return quote(rel, safe="/")

    # -- sections

    def summary(self) -> str:
        run = self.run or {}
        counts = run.get("counts") or {}
        state = str(run.get("state", "unknown (no run.json)"))
        color = {"complete": "#15803d", "incomplete": "#b45309", "running": "#1d4ed8"}.get(
            state, "#6b7280"
        )
        frame = self.frame
        n_rows = len(frame)
        n_ok = int((frame["status"] == STATUS_OK).sum())
        n_failed = n_rows - n_ok
        n_images = int(frame["image_id"].nunique()) if n_rows else 0
        rows_in = counts.get("rows_in")
        ok = counts.get("ok", n_ok if self.run is None else None)
        failed = counts.get("failed", n_failed if self.run is None else None)
        seconds = _num(run.get("seconds"))
        cards = [
            ("rows planned", rows_in),
            ("ok", ok),
            ("failed", failed),
            ("source images", n_images),
            ("done before", counts.get("done_before")),
            ("written this run", counts.get("this_run")),
            ("wall time", _duration(seconds) if seconds is not None else None),
        ]
        card_html = "".join(
            f'<div class="card"><div class="v">{_e("–" if v is None else v)}</div>'
            f'<div class="k">{_e(k)}</div></div>'
            for k, v in cards
        )
        checks = []
        if isinstance(rows_in, int) and isinstance(ok, int) and isinstance(failed, int):
            if rows_in == ok + failed:
                checks.append(
                    f'<span class="good">✔ rows_in = ok + failed ({rows_in} = {ok} + {failed}):'
                    " every planned row is accounted for.</span>"
                )
            else:
                checks.append(
                    f'<span class="bad">✘ rows_in ≠ ok + failed ({rows_in} ≠ {ok} + {failed}):'
                    f" {rows_in - ok - failed} planned rows are not in the output.</span>"
                )
        if (
            self.run is not None
            and isinstance(ok, int)
            and isinstance(failed, int)
            and (n_ok, n_failed) != (ok, failed)
        ):
            checks.append(
                f'<span class="warn">The Parquet holds {n_ok} ok and {n_failed} failed rows, '
                f"run.json says {_e(ok)} and {_e(failed)}.</span>"
            )
        checks.extend(self._quality_gate())
        checks.extend(self._enhancement_lines())
        if self.run is None:
            checks.append(
                f'<span class="warn">{RUN_JSON} is missing: counts come from the Parquet only.'
                "</span>"
            )
        when = " → ".join(_e(run[k]) for k in ("started", "finished") if run.get(k))
        config = run.get("config") or {}
        cfg_rows = []
        for key in _CONFIG_KEYS:
            if key in config:
                value = config[key]
                if isinstance(value, list):
                    value = ", ".join(str(v) for v in value)
                cfg_rows.append((f"<code>{_e(key)}</code>", _e(value)))
        enhance = config.get("enhance")
        if isinstance(enhance, Mapping):
            shown = ", ".join(
                f"{k}={enhance[k]}"
                for k in _ENHANCE_KEYS
                if k in enhance and enhance[k] is not None
            )
            cfg_rows.append(("<code>enhance</code>", _e(shown)))
        if self.run and "manifest_rows" in run:
            cfg_rows.append(("manifest rows", _e(run["manifest_rows"])))
        cluster = run.get("cluster")
        if isinstance(cluster, Mapping):
            cfg_rows.append(("cluster", _e(", ".join(f"{k}={v}" for k, v in cluster.items()))))
        versions = run.get("versions") or {}
        ver_rows = [(f"<code>{_e(k)}</code>", _e(v)) for k, v in versions.items()]
        cfg_html = _table(["setting", "value"], cfg_rows) if cfg_rows else "<p>No config.</p>"
        ver_html = _table(["library", "version"], ver_rows) if ver_rows else "<p>No versions.</p>"
        return (
            f'<section id="summary"><h2>Summary</h2>'
            f'<p>Run state <span class="badge" style="background:{color}">{_e(state)}</span>'
            f"{'&nbsp; ' + when if when else ''}</p>"
            f'<div class="cards">{card_html}</div>'
            + "".join(f"<p>{c}</p>" for c in checks)
            + f'<div class="cols"><div><h3>Configuration</h3>{cfg_html}</div>'
            f"<div><h3>Versions</h3>{ver_html}</div></div></section>"
        )

    def _quality_gate(self) -> list[str]:
        """A line on the rows that passed the run's quality rule (when it had one)."""
        frame = self.frame
        if "quality_ok" not in frame.columns or not frame["quality_ok"].notna().any():
            return []
        judged = frame["quality_ok"].dropna().astype(bool)
        line = f"Quality gate: <b>{int(judged.sum())}</b> of {len(judged)} rows passed."
        if "quality_failed" in frame.columns:
            terms = frame["quality_failed"].dropna().astype(str).str.split("; ").explode()
            top = terms[terms != ""].value_counts().head(3)
            if len(top):
                line += " Most often broken: " + ", ".join(
                    f"<code>{_e(term)}</code> ({n})" for term, n in top.items()
                )
        return [line]

    def _enhancement_lines(self) -> list[str]:
        """Which device(s) the enhancer ran on, and a warning per metric on the degradation
        types where enhancement lowered fidelity (mean enhanced below mean degraded)."""
        ok = self.ok
        if "enhanced_uri" not in ok.columns or not ok["enhanced_uri"].notna().any():
            return []
        enhanced = ok[ok["enhanced_uri"].notna()]
        models: list[str] = []
        if "model_name" in enhanced.columns:
            models = sorted(enhanced["model_name"].dropna().astype(str).unique().tolist())
        model_text = ", ".join(f"<code>{_e(m)}</code>" for m in models) or "the enhancer"
        if "enhance_device" in enhanced.columns and enhanced["enhance_device"].notna().any():
            counts = enhanced["enhance_device"].fillna("not recorded").astype(str).value_counts()
            where = ", ".join(f"<b>{_e(d)}</b> ({n} rows)" for d, n in counts.items())
        else:
            where = "a device this output did not record (written before enhance_device existed)"
        lines = [f"Enhancement: {model_text} ran on {where}."]
        lines += [f'<span class="bad"><b>{_e(w)}</b></span>' for w in self._fidelity_warnings()]
        return lines

    def _fidelity_warnings(self) -> list[str]:
        return warning_lines(fidelity_losses(self.ok))

    def contact_sheets(self) -> str:
        head = (
            '<section id="contact-sheets"><h2>Contact sheets</h2>'
            '<p class="note">A few rows of each degradation type: the clean working image, its '
            "degraded version and, when the run enhanced, the enhanced image; click a thumbnail "
            "to open the full-size image (<code>fundus-batch report --rows-per-type N</code> "
            "shows more rows). Captions give the sampled parameters and the fidelity to the "
            "clean image inside the field of view (higher PSNR/SSIM = closer to clean).</p>"
        )
        ok = self.ok
        if ok.empty:
            return head + "<p>No successful rows to show.</p></section>"
        has_enhanced = "enhanced_uri" in ok.columns and ok["enhanced_uri"].notna().any()
        has_degraded = "degraded_uri" in ok.columns and ok["degraded_uri"].notna().any()
        roles = (
            ["clean"]
            + (["degraded"] if has_degraded else [])
            + (["enhanced"] if has_enhanced else [])
        )
        size_attr = f'width="{self.thumb}" height="{self.thumb}"'
        size_css = f"width:{self.thumb}px;height:{self.thumb}px"
        entry_w = len(roles) * (self.thumb + 4)
        blocks = []
        for code in self.types:
            rows = self._pick_rows(ok[ok["type_code"] == code])
            total = int((ok["type_code"] == code).sum())
            grid: list[list[np.ndarray]] = []
            entries = []
            for _, row in rows.iterrows():
                cells = []
                thumbs = []
                for role in roles:
                    img = self._image(row.get(f"{role}_uri"))
                    if isinstance(img, str):
                        pic = f'<div class="missing" style="{size_css}">{_e(img)}</div>'
                        thumbs.append(np.full((self.thumb, self.thumb, 3), 235, np.uint8))
                    else:
                        t = _thumbnail(img, self.thumb)
                        thumbs.append(t)
                        uri = _encode_data_uri(codecs.encode_png(t))
                        pic = f'<img alt="{_e(role)}" {size_attr} src="{uri}">'
                        link = self._link(row.get(f"{role}_uri"))
                        if link is not None:
                            pic = (
                                f'<a href="{html.escape(link, quote=True)}" target="_blank" '
                                f'rel="noopener" title="open the full-size {_e(role)} image">'
                                f"{pic}</a>"
                            )
                    cells.append(f'<div><div class="role">{_e(role)}</div>{pic}</div>')
                grid.append(thumbs)
                entries.append(
                    f'<figure class="entry" style="width:{entry_w}px">'
                    f'<div class="thumbs">{"".join(cells)}</div>'
                    f"<figcaption>{self._caption(row)}</figcaption></figure>"
                )
            fig_name = f"contact_{re.sub(r'[^A-Za-z0-9_-]', '_', code)}.png"
            self._save_figure(fig_name, codecs.encode_png(self._sheet_png(grid)))
            blocks.append(
                f'<h3>{_e(_type_label(code))} <span class="count">· {total} rows, '
                f"{len(entries)} shown</span></h3>"
                f'<div class="sheet">{"".join(entries)}</div>'
            )
        return head + "".join(blocks) + "</section>"

    def _pick_rows(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Up to ``rows_per_type`` rows, from as many different images as possible."""
        rows = rows.sort_values(["image_id", "variant"] if "variant" in rows else ["image_id"])
        first = rows.drop_duplicates("image_id")
        picked = first.head(self.rows_per_type)
        if len(picked) < self.rows_per_type:
            rest = rows.drop(index=picked.index).head(self.rows_per_type - len(picked))
            picked = pd.concat([picked, rest])
        return picked

    def _caption(self, row: pd.Series) -> str:
        variant = _num(row.get("variant"))
        name = _e(row["image_id"]) + (f" · v{int(variant)}" if variant is not None else "")
        params = [
            f"{label} {_fmt(row.get(col), 'n' if col == 'n_spots' else col)}"
            for col, label in PARAM_COLUMNS
            if _num(row.get(col)) is not None
        ]
        lines = [f"<b>{name}</b>"]
        if params:
            lines.append(_e(", ".join(params)))
        for role in ("degraded", "enhanced"):
            psnr, ssim = _num(row.get(f"psnr_{role}")), _num(row.get(f"ssim_{role}"))
            if psnr is not None or ssim is not None:
                lines.append(f"{role}: PSNR {_fmt(psnr, 'psnr')} dB, SSIM {_fmt(ssim, 'ssim')}")
        model = row.get("model_name")
        if isinstance(model, str) and model:
            device = row.get("enhance_device")
            on = f" on {_e(device)}" if isinstance(device, str) and device else ""
            lines.append(f"model {_e(model)}{on}")
        return "<br>".join(lines)

    def _sheet_png(self, grid: list[list[np.ndarray]]) -> np.ndarray:
        gap = 4
        n_rows = max(len(grid), 1)
        n_cols = max((len(r) for r in grid), default=1)
        side = self.thumb
        sheet = np.full(
            (n_rows * (side + gap) + gap, n_cols * (side + gap) + gap, 3), 255, np.uint8
        )
        for i, row in enumerate(grid):
            for j, thumb in enumerate(row):
                y, x = gap + i * (side + gap), gap + j * (side + gap)
                sheet[y : y + side, x : x + side] = thumb
        return sheet

    def metrics(self) -> str:
        ok = self.ok
        parts = [
            '<section id="metrics"><h2>Quality metrics</h2>'
            '<p class="note">Full-reference metrics compare each degraded (and enhanced) image '
            "with its clean image inside the field of view; higher means closer to clean. "
            "No-reference metrics describe each image alone; the <i>clean</i> group holds one "
            "value per source image. Boxes span the quartiles, the thick line is the median, "
            "whiskers reach 1.5 IQR; hover a box for n, median and mean.</p>"
        ]
        if ok.empty:
            parts.append("<p>No successful rows.</p></section>")
            return "".join(parts)
        types = self.types
        plots = []
        for key, label in FULL_REFERENCE:
            roles = self.roles_with(key)
            if not roles:
                continue
            data = {
                (t, r): _values(ok[ok["type_code"] == t], f"{key}_{r}")
                for t in types
                for r in roles
            }
            svg = svg_boxplot(f"{label} vs clean, by degradation type", types, roles, data)
            self._save_figure(f"metric_{key}.svg", svg.encode("utf-8"))
            plots.append(_inline(svg))
        clean_rows = ok.drop_duplicates("image_id")
        for key, label in NOREF_PLOTTED:
            roles = self.roles_with(key)
            has_clean = _has(clean_rows, f"{key}_clean")
            if not roles and not has_clean:
                continue
            groups = (["clean"] if has_clean else []) + types
            data = {("clean", "clean"): _values(clean_rows, f"{key}_clean")}
            data.update(
                {
                    (t, r): _values(ok[ok["type_code"] == t], f"{key}_{r}")
                    for t in types
                    for r in roles
                }
            )
            series = (["clean"] if has_clean else []) + roles
            svg = svg_boxplot(label, groups, series, data)
            self._save_figure(f"metric_{key}.svg", svg.encode("utf-8"))
            plots.append(_inline(svg))
        if plots:
            parts.append(f'<div class="plots">{"".join(plots)}</div>')
        parts.append(self._fr_table(types))
        parts.extend(
            f'<p class="bad"><b>{_e(w)}</b> (mean enhanced below mean degraded, against the '
            "clean image).</p>"
            for w in self._fidelity_warnings()
        )
        parts.append(self._nr_tables(types, clean_rows))
        parts.append("</section>")
        return "".join(parts)

    def _fr_table(self, types: list[str]) -> str:
        ok = self.ok
        cols = [(k, lab, r) for k, lab in FULL_REFERENCE for r in self.roles_with(k)]
        if not cols:
            return "<p>No full-reference metrics in this output.</p>"
        head = ["type", "rows"] + [f"{_e(lab)} <br><small>{_e(r)}</small>" for _, lab, r in cols]
        rows = []
        for group, sub in [*[(t, ok[ok["type_code"] == t]) for t in types], ("all", ok)]:
            label = "<b>all types</b>" if group == "all" else _e(_type_label(group))
            rows.append(
                [label, str(len(sub))]
                + [_fmt(_mean(_values(sub, f"{k}_{r}")), k) for k, _, r in cols]
            )
        return "<h3>Mean full-reference metrics per type</h3>" + _table(
            head, rows, [False] + [True] * (len(head) - 1)
        )

    def _nr_tables(self, types: list[str], clean_rows: pd.DataFrame) -> str:
        ok = self.ok
        metrics = [
            (k, lab)
            for k, lab in (*NOREF_PLOTTED, *NOREF_TABLE_ONLY)
            if any(_has(ok, f"{k}_{r}") for r in IMAGE_ROLES)
        ]
        if not metrics:
            return "<p>No no-reference metrics in this output.</p>"
        head = ["images", "n"] + [_e(lab) for _, lab in metrics]
        rows = []
        if any(_has(clean_rows, f"{k}_clean") for k, _ in metrics):
            rows.append(
                ["<b>clean</b> (per source image)", str(len(clean_rows))]
                + [_fmt(_mean(_values(clean_rows, f"{k}_clean")), k) for k, _ in metrics]
            )
        for role in ("degraded", "enhanced"):
            if not any(_has(ok, f"{k}_{role}") for k, _ in metrics):
                continue
            for t in types:
                sub = ok[ok["type_code"] == t]
                rows.append(
                    [f"{_e(role)} · {_e(_type_label(t))}", str(len(sub))]
                    + [_fmt(_mean(_values(sub, f"{k}_{role}")), k) for k, _ in metrics]
                )
        return "<h3>Mean no-reference metrics</h3>" + _table(
            head, rows, [False] + [True] * (len(head) - 1)
        )

    def downstream(self) -> str:
        head = (
            '<section id="downstream"><h2>Downstream: vessel segmentation</h2>'
            '<p class="note">Vessels segmented by a filter that shares nothing with the '
            "enhancer, scored against the ground-truth vessel maps inside the field of view: "
            "ROC AUC and F1 of the clean, degraded and enhanced images. A good enhancement "
            "brings the degraded scores back towards the clean ones. The enhancement network's "
            "own vessel branch is not used: it never reached AUC 0.85 on clean images, and an "
            "enhancer judged by its own branch proves nothing.</p>"
        )
        columns = {c: _VESSEL_COLUMN.match(c) for c in self.frame.columns}
        found = {c: m.groups() for c, m in columns.items() if m}
        with_gt = 0
        if "vessel_gt_uri" in self.frame.columns:
            with_gt = int(self.frame["vessel_gt_uri"].notna().sum())
        gt_note = (
            f" {with_gt} of {len(self.frame)} rows name a ground-truth vessel map "
            "(<code>vessel_gt_uri</code>)."
        )
        if not found:
            return (
                head + '<p class="warn"><b>Not available:</b> the Parquet has no '
                "<code>vessel_auc_*</code> / <code>vessel_f1_*</code> columns, so this run did "
                f"not score vessel segmentation.{gt_note}</p></section>"
            )
        ok = self.ok
        if not any(_has(ok, c) for c in found):
            return (
                head + '<p class="warn"><b>Not available:</b> the <code>vessel_auc_*</code> / '
                "<code>vessel_f1_*</code> columns are empty, so no row was scored. Vessel scores "
                "need a ground-truth vessel map per image (the manifest's "
                f"<code>vessel_uri</code>) and a run with metrics on.{gt_note}</p></section>"
            )
        metrics = sorted({m for m, _ in found.values()}, key=lambda m: (m != "auc", m))
        cols = [
            (m, r)
            for m in metrics
            for r in IMAGE_ROLES
            if f"vessel_{m}_{r}" in found and _has(ok, f"vessel_{m}_{r}")
        ]
        delta = _has(ok, "vessel_auc_degraded") and _has(ok, "vessel_auc_enhanced")
        table_head = (
            ["type", "rows"]
            + [f"{_e(m.upper())} <br><small>{_e(r)}</small>" for m, r in cols]
            + (["Δ AUC <br><small>enhanced − degraded</small>"] if delta else [])
        )
        rows = []
        worse = []
        for group, sub in [*[(t, ok[ok["type_code"] == t]) for t in self.types], ("all", ok)]:
            label = "<b>all types</b>" if group == "all" else _e(_type_label(group))
            cells = [label, str(len(sub))] + [
                _fmt(_mean(_values(sub, f"vessel_{m}_{r}")), "vessel_") for m, r in cols
            ]
            if delta:
                gain = pd.to_numeric(sub["vessel_auc_enhanced"], errors="coerce") - pd.to_numeric(
                    sub["vessel_auc_degraded"], errors="coerce"
                )
                diff = _mean(_values(pd.DataFrame({"gain": gain}), "gain"))
                text = "–" if diff is None else f"{diff:+.4f}"
                if diff is not None and diff < 0:
                    text = f'<span class="bad">{text}</span>'
                    if group != "all":
                        worse.append(group)
                cells.append(text)
            rows.append(cells)
        segmenters = []
        if "vessel_segmenter" in ok.columns:
            segmenters = sorted(ok["vessel_segmenter"].dropna().astype(str).unique().tolist())
        if segmenters:
            names = ", ".join(f"<code>{_e(n)}</code>" for n in segmenters)
            seg_note = (
                f"Segmenter: {names} (Sato tubeness of the green channel at 1-3 px scales per "
                "512 px, FOV rim filled before filtering; F1 counts the top 12 % of FOV pixels "
                "as vessel)."
            )
        else:
            seg_note = (
                "Segmenter not recorded: outputs written before <code>vessel_segmenter</code> "
                "existed scored the enhancement network's own vessel branch, which is circular."
            )
        warn = ""
        if worse:
            warn = (
                '<p class="bad"><b>Enhancement lowered vessel AUC on '
                + ", ".join(_e(t) for t in worse)
                + ".</b></p>"
            )
        return (
            head
            + f'<p class="note">{seg_note}</p>'
            + "<h3>Mean vessel scores per degradation type</h3>"
            + _table(table_head, rows, [False] + [True] * (len(table_head) - 1))
            + warn
            + f'<p class="note">{gt_note.strip()}</p></section>'
        )

    def failures(self) -> str:
        head = '<section id="failures"><h2>Failures</h2>'
        frame = self.frame
        bad = frame[frame["status"] != STATUS_OK]
        if bad.empty:
            return head + '<p class="good">No failed rows.</p></section>'
        stage = bad["failed_stage"] if "failed_stage" in bad else pd.Series(index=bad.index)
        error = bad["error"] if "error" in bad else pd.Series(index=bad.index)
        groups = pd.DataFrame(
            {
                "stage": stage.fillna("unknown").astype(str),
                "kind": error.fillna("").astype(str).map(_error_kind),
                "error": error.fillna("").astype(str),
                "image_id": bad["image_id"].astype(str),
            }
        )
        order = {s: i for i, s in enumerate(STAGES)}
        summary = []
        for (stg, kind), sub in groups.groupby(["stage", "kind"], sort=False):
            ids = list(dict.fromkeys(sub["image_id"]))
            summary.append((stg, kind, len(sub), ids, sub["error"].iloc[0]))
        summary.sort(key=lambda s: (order.get(s[0], len(order)), -s[2], s[1]))
        rows = []
        for stg, kind, n, ids, example in summary:
            shown = ", ".join(ids[:5]) + (f" … (+{len(ids) - 5})" if len(ids) > 5 else "")
            msg = example if len(example) <= 300 else example[:300] + "…"
            rows.append(
                [
                    f"<b>{_e(stg)}</b>",
                    f'<code class="kind">{_e(kind)}</code>',
                    str(n),
                    str(len(ids)),
                    _e(shown),
                    f'<span class="note">{_e(msg)}</span>',
                ]
            )
        per_stage = bad.groupby(stage.fillna("unknown")).size().to_dict()
        stage_text = ", ".join(
            f"{k}: {v}" for k, v in sorted(per_stage.items(), key=lambda kv: order.get(kv[0], 99))
        )
        return (
            head + f'<p><span class="bad"><b>{len(bad)}</b> failed rows</span> from '
            f"<b>{bad['image_id'].nunique()}</b> source images (by stage: {_e(stage_text)}). "
            "Grouped by the stage that failed and the kind of error:</p>"
            + _table(
                ["stage", "error kind", "rows", "images", "example image ids", "example message"],
                rows,
                [False, False, True, True, False, False],
            )
            + "</section>"
        )

    def throughput(self) -> str:
        run = self.run or {}
        counts = run.get("counts") or {}
        config = run.get("config") or {}
        seconds = _num(run.get("seconds"))
        this_run = counts.get("this_run")
        parts = ['<section id="throughput"><h2>Throughput</h2>']
        facts = []
        if seconds and isinstance(this_run, int):
            facts.append(("rows written this run", str(this_run)))
            facts.append(("wall time", _duration(seconds)))
            facts.append(("rows / s", f"{this_run / seconds:.2f}"))
            per_image = int(config.get("variants") or 1) if config.get("mode") == "pairs" else 1
            facts.append(("source images / s", f"{this_run / per_image / seconds:.2f}"))
            if per_image > 1:
                facts.append(("variants per image", str(per_image)))
        cluster = run.get("cluster")
        if isinstance(cluster, Mapping):
            facts.append(("cluster", ", ".join(f"{k}={v}" for k, v in cluster.items())))
        if facts:
            parts.append(_table(["", "value"], [(_e(k), _e(v)) for k, v in facts], [False, True]))
        else:
            parts.append("<p>run.json has no wall time for this run.</p>")
        frame = self.frame
        totals = {}
        for stage_name in STAGES:
            col = f"seconds_{stage_name}"
            if col not in frame.columns:
                continue
            src = frame.drop_duplicates("image_id") if stage_name in PER_IMAGE_STAGES else frame
            vals = _values(src, col)
            if vals.size:
                totals[stage_name] = (float(vals.sum()), vals.size)
        if not totals:
            parts.append("<p>No per-stage timings in the Parquet.</p></section>")
            return "".join(parts)
        grand = sum(t for t, _ in totals.values()) or 1.0
        n_rows = max(len(frame), 1)
        rows = []
        for stage_name, (total, n) in totals.items():
            share = total / grand
            rows.append(
                [
                    f"<b>{_e(stage_name)}</b>",
                    str(n),
                    f"{total:.2f}",
                    f"{total / n_rows * 1000:.1f}",
                    f"{share * 100:.1f}%",
                    f'<div class="bar" style="width:220px"><div style="width:{share * 100:.1f}%">'
                    "</div></div>",
                ]
            )
        parts.append(
            "<h3>Time per stage</h3>"
            + _table(
                ["stage", "timed", "worker s", "ms per output row", "share", ""],
                rows,
                [False, True, True, True, True, False],
            )
            + f'<p class="note">Worker seconds summed over all {len(frame)} rows in the output '
            "(earlier runs included); they add up across parallel workers, so their total "
            f"({grand:.1f} s) can exceed the wall time. {', '.join(PER_IMAGE_STAGES)} run once "
            "per source image and are counted once per image; score includes the clean "
            "image's scoring, which every variant row of that image carries.</p></section>"
        )
        return "".join(parts)

    def page(self) -> str:
        sections = [
            self.summary(),
            self.contact_sheets(),
            self.metrics(),
            self.downstream(),
            self.failures(),
            self.throughput(),
        ]
        titles = ("Summary", "Contact sheets", "Metrics", "Downstream", "Failures", "Throughput")
        nav = "".join(
            f'<a href="#{sid}">{t}</a>' for sid, t in zip(SECTION_IDS, titles, strict=True)
        )
        generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>fundus_batch report · {_e(self.out)}</title><style>{_CSS}</style></head>"
            f"<body><header><h1>fundus_batch run report</h1>"
            f'<div class="sub">{_e(self.out)}</div></header><nav>{nav}</nav><main>'
            + "".join(sections)
            + f"</main><footer>generated by fundus_batch {_e(__version__)} at "
            f"{_e(generated)}; figures in {_e(FIGURES_DIR)}/</footer></body></html>\n"
        )


def _inline(svg: str) -> str:
    """An SVG for embedding in HTML, which needs no namespace declaration."""
    return svg.replace(f' xmlns="{_SVG_NS}"', "", 1)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def _error_kind(error: str) -> str:
    """The stable head of an error message: ``DecodeError(truncated)``, ``FileNotFoundError``."""
    text = error.strip()
    if not text:
        return "(no message)"
    head = text.split(":", 1)[0].strip()
    return head if len(head) <= 80 else head[:80] + "…"


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
    figures = storage.join(_parent(target), FIGURES_DIR)
    write_options = storage_options if remote else None
    if dest is None:  # inside OUT: neither the page nor the figures folder may be a link
        from fundus_batch.outpaths import check_local_target

        check_local_target(out, target)
        check_local_target(out, storage.join(figures, "figure.png"))
    report = _Report(out, storage_options, figures, write_options, rows_per_type, thumb)
    page = report.page()
    storage.write_bytes(target, page.encode("utf-8"), storage_options=write_options)
    return target if remote else Path(target)
