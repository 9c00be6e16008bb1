"""The Jinja2 template: every value escaped and redacted, every section present, links kept."""

from __future__ import annotations

import fnmatch
import importlib.resources
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fundus_batch.io import codecs
from fundus_batch.report.data import aggregate
from fundus_batch.report.plots import svg_boxplot
from fundus_batch.report.render import SECTION_IDS, TEMPLATE, render_page
from fundus_batch.report.sheets import (
    Caption,
    ContactSheets,
    Entry,
    ImageReader,
    Thumb,
    TypeSheet,
    caption,
    contact_sheets,
)
from tests.report.report_rows import enhance_rows, failed_row, loaded, ok_rows, run_json

HOSTILE = "<script>alert(1)</script>"
SECRET = "hunter2-do-not-print"


class _Page(HTMLParser):
    """Text per section, tags seen, and attributes of links and images."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.section: str | None = None
        self.text: dict[str, str] = {}
        self.tags: list[str] = []
        self.links: list[dict[str, str | None]] = []
        self.nav: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id")
            self.text[self.section or ""] = ""
        if tag == "a":
            (self.links if self.section else self.nav).append(a)  # type: ignore[arg-type]

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.section = None

    def handle_data(self, data: str) -> None:
        if self.section:
            self.text[self.section] += data

    def words(self, section: str) -> str:
        return " ".join(self.text[section].split())


def _sheets(caption: str = "img_0", missing: str = "file missing") -> ContactSheets:
    thumbs = [
        Thumb("clean", "data:image/png;base64,AAAA", None, 'images/a b/"clean".png'),
        Thumb("degraded", None, missing, None),
    ]
    entry = Entry(thumbs, Caption(caption, ["blur σ 1.5", f"model {HOSTILE}"]))
    sheet = TypeSheet("001", "001 · illumination", 5, [entry], "contact_001.png", b"")
    return ContactSheets(True, ["clean", "degraded"], 32, [sheet])


def _render(rows: list[dict], run: dict | None = None, **sheet_args: str) -> tuple[str, _Page]:
    data = aggregate(loaded(rows, run))
    svgs = [svg_boxplot(p.title, p.groups, p.series, p.values) for p in data.metrics.plots]
    html_text = render_page(data, _sheets(**sheet_args), svgs, generated=0.0)
    page = _Page()
    page.feed(html_text)
    page.close()
    return html_text, page


def _hostile_rows() -> tuple[list[dict], dict]:
    rows = ok_rows()
    for row in rows:
        row["model_name"] = HOSTILE
        row["quality_ok"] = False
        row["quality_failed"] = f"nr_luminance_clean >= {HOSTILE}"
    rows.append(failed_row(HOSTILE, "enhance", f"RuntimeError: {HOSTILE}"))
    run = run_json(6, 1, state=HOSTILE, versions={"numpy": HOSTILE})
    run["config"]["manifest"] = HOSTILE
    return rows, run


def test_hostile_values_in_every_section_are_escaped_and_shown_as_text():
    rows, run = _hostile_rows()
    html_text, page = _render(rows, run, caption=HOSTILE)
    assert "<script" not in html_text and "script" not in page.tags
    assert html_text.count("&lt;script&gt;") >= 8
    assert HOSTILE in page.words("summary")  # state, model, config, versions, quality term
    assert HOSTILE in page.words("contact-sheets")  # caption
    assert f"RuntimeError: {HOSTILE}" in page.words("failures")


def test_credentials_are_removed_from_every_value_the_template_writes():
    _, page = _render(ok_rows(), missing=f"s3://AKIAABCDEFGHIJKLMNOP:{SECRET}@bucket/x.png")
    text = page.words("contact-sheets")
    assert SECRET not in text and "AKIAABCDEFGHIJKLMNOP" not in text
    assert "@bucket/x.png" in text


def test_every_section_appears_once_in_order_with_a_nav_link():
    html_text, page = _render(ok_rows(), run_json(6, 0))
    assert list(page.text) == list(SECTION_IDS)
    assert [a["href"] for a in page.nav] == [f"#{sid}" for sid in SECTION_IDS]
    assert html_text.startswith("<!DOCTYPE html>")
    assert "default-src 'none'" in html_text


def test_summary_and_metrics_flag_lowered_fidelity_and_the_device():
    _, page = _render(ok_rows(), run_json(6, 0))
    warning = "WARNING enhancement lowered PSNR on 010 (-1.00 dB)"
    assert "Enhancement: tiny-model ran on cuda (6 rows)." in page.words("summary")
    assert warning in page.words("summary")
    assert f"{warning} (mean enhanced below mean degraded" in page.words("metrics")
    assert "rows_in = ok + failed (6 = 6 + 0)" in page.words("summary")


def test_thumbnails_link_to_the_full_size_image_and_missing_ones_say_why():
    html_text, page = _render(ok_rows())
    (link,) = page.links
    assert link["href"] == 'images/a b/"clean".png'  # escaped in the page, intact once parsed
    assert link["target"] == "_blank" and "full-size clean image" in (link["title"] or "")
    assert '<img alt="clean" width="32" height="32" src="data:image/png;base64,AAAA">' in (
        html_text
    )
    assert "file missing" in page.words("contact-sheets")
    assert "5 rows, 1 shown" in page.words("contact-sheets")


def test_enhance_run_page_speaks_of_input_photographs_not_clean_images():
    run = run_json(2, 0)
    run["config"] = {"mode": "enhance", "seed": 0}
    data = aggregate(loaded(enhance_rows(), run))
    page = _Page()
    page.feed(render_page(data, _sheets(), [], generated=0.0))
    assert "the input photograph as the run read it" in page.words("contact-sheets")
    assert "the clean working image" not in page.words("contact-sheets")
    metrics = page.words("metrics")
    assert "the input group holds one value per source image" in metrics
    assert "Full-reference" not in metrics
    assert "NOTE enhancement left 1 of 2 images unchanged" in page.words("summary")


def test_plots_are_inlined_as_svg_without_namespace():
    html_text, page = _render(ok_rows())
    n_plots = len(aggregate(loaded(ok_rows())).metrics.plots)
    assert n_plots >= 2 and page.tags.count("svg") == n_plots
    assert "xmlns=" not in html_text


def test_template_ships_as_package_data():
    template = importlib.resources.files("fundus_batch.report") / "templates" / TEMPLATE
    assert template.is_file()
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    package_data = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data.get("fundus_batch.report", [])
    assert any(fnmatch.fnmatch(f"templates/{TEMPLATE}", p) for p in patterns)


KEY_LIKE_ID = "ASIA2019RETINA000123"  # an ordinary site code that looks like an AWS key id


def test_an_id_that_looks_like_an_access_key_reaches_captions_links_and_failures_intact(
    tmp_path: Path,
):
    image = tmp_path / "images" / KEY_LIKE_ID / "clean.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(codecs.encode_png(np.full((64, 64, 3), 90, np.uint8)))
    row = {**ok_rows()[0], "image_id": KEY_LIKE_ID, "degraded_uri": None, "enhanced_uri": None}
    row["clean_uri"] = f"images/{KEY_LIKE_ID}/clean.png"
    error = f"DecodeError: s3://AKIAABCDEFGHIJKLMNOP:{SECRET}@b/{KEY_LIKE_ID}.png"
    rows = [row, failed_row(KEY_LIKE_ID, "fetch", error, variant=1)]
    result = loaded(rows, run_json(1, 1))
    result.out = str(tmp_path)
    reader = ImageReader(str(tmp_path), None, str(tmp_path))
    html_text = render_page(aggregate(result), contact_sheets(result, reader, 1, 32), [], 0.0)
    page = _Page()
    page.feed(html_text)
    (link,) = page.links
    assert link["href"] == f"images/{KEY_LIKE_ID}/clean.png"
    assert f"{KEY_LIKE_ID} · v0" in page.words("contact-sheets")
    assert f"<td>{KEY_LIKE_ID}</td>" in html_text  # the failures' example ids
    # The error message may carry credentials: it is still redacted, id and all.
    assert SECRET not in html_text and "AKIAABCDEFGHIJKLMNOP" not in html_text


def test_tick_is_never_shown_when_run_json_counts_another_scope_than_the_parquet():
    rows = [*ok_rows(), failed_row("gone", "fetch", "FileNotFoundError: gone.jpg")]
    run = run_json(6, 0, manifest_rows=2)
    run["config"]["limit"] = 2
    _, page = _render(rows, run)
    summary = page.words("summary")
    assert "✔" not in summary and "every planned row is accounted for" not in summary
    assert "The Parquet holds 6 ok and 1 failed rows; run.json counts 6 and 0" in summary
    assert "the last run (limit 2, 2 manifest rows)" in summary
    assert "1 rows of the Parquet lie outside what the last run counted" in summary


def test_rows_lost_after_the_run_are_flagged_not_ticked():
    _, page = _render(ok_rows()[:4], run_json(6, 0))
    summary = page.words("summary")
    assert "✔" not in summary
    assert "✘ 2 rows run.json counts are not in the Parquet" in summary


def test_mean_tables_count_identical_rows_and_the_rows_averaged():
    rows = ok_rows()
    rows[0]["psnr_degraded"] = float("inf")
    rows[1]["psnr_enhanced"] = None
    html_text, _ = _render(rows, run_json(6, 0))
    assert '<th class="num">in means</th>' in html_text
    assert "PSNR ∞ <br><small>identical, not averaged</small>" in html_text


def test_caption_of_a_row_identical_to_clean_says_so_instead_of_a_dash():
    row = pd.Series({"image_id": "a", "variant": 0, "psnr_degraded": float("inf")})
    row["ssim_degraded"] = 1.0
    assert caption(row).lines == ["degraded: identical to clean (PSNR ∞), SSIM 1.0000"]
