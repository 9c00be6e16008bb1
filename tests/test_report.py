"""The HTML run report, built from a small pipeline output made by calling the stages directly."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from fundus_batch import stages
from fundus_batch.io.codecs import encode_jpeg
from fundus_batch.output import OutputStore, ShardWriter, environment_versions
from fundus_batch.report import write_report
from fundus_batch.schema import output_schema, to_table
from fundus_batch.synth import synth_fundus

SECTIONS = ["summary", "contact-sheets", "metrics", "downstream", "failures", "throughput"]
TYPES = ["001", "010", "111"]
VARIANTS = 3
SIZE = 128
N_GOOD = 2
SECRET = "hunter2-do-not-print"
RUN_SECONDS = 2.5
HOSTILE_ID = "<img src=x onerror=alert(1)>"
VOID = {"br", "img", "meta", "hr", "input", "link", "wbr"}


class _Page(HTMLParser):
    """Collects ids, references, per-section text and tables; checks tags nest properly."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.refs: list[tuple[str, str]] = []
        self.imgs: list[tuple[str | None, str]] = []
        self.svgs: dict[str, int] = {}
        self.section: str | None = None
        self.text: dict[str, str] = {}
        self.tables: dict[str, list[list[list[str]]]] = {}
        self._cell: list[str] | None = None

    def _attrs(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "id" and value:
                self.ids.append(value)
            if name in ("src", "href", "xlink:href", "action"):
                self.refs.append((tag, value or ""))
        if tag == "img":
            self.imgs.append((self.section, dict(attrs).get("src") or ""))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._attrs(tag, attrs)
        if tag == "section":
            self.section = dict(attrs).get("id")
            self.text[self.section or ""] = ""
            self.tables[self.section or ""] = []
        if tag == "svg" and self.section:
            self.svgs[self.section] = self.svgs.get(self.section, 0) + 1
        if tag == "table" and self.section:
            self.tables[self.section].append([])
        if tag == "tr" and self.section and self.tables[self.section]:
            self.tables[self.section][-1].append([])
        if tag in ("td", "th"):
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._attrs(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]} ")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None and self.section:
            self.tables[self.section][-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        if tag == "section":
            self.section = None

    def handle_data(self, data: str) -> None:
        if self.section:
            self.text[self.section] += data
        if self._cell is not None:
            self._cell.append(data)


def _parse(html_text: str) -> _Page:
    page = _Page()
    page.feed(html_text)
    page.close()
    assert not page.errors, page.errors[:5]
    assert page.stack == [], f"unclosed tags: {page.stack}"
    return page


def _write_inputs(folder: Path, n_good: int, n_missing: int, corrupt: bool) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_good):
        s = synth_fundus(300, seed=40 + i, canvas=(380, 320))
        path = folder / f"good_{i}.jpg"
        path.write_bytes(encode_jpeg(s.image, quality=92))
        rows.append({"image_id": f"good_{i}", "source_uri": str(path), "status": "ok"})
    for i in range(n_missing):
        rows.append(
            {"image_id": f"gone_{i}", "source_uri": str(folder / f"gone_{i}.jpg"), "status": "ok"}
        )
    if corrupt:
        data = (folder / "good_0.jpg").read_bytes()
        (folder / "broken.jpg").write_bytes(data[: len(data) // 3])
        rows.append(
            {"image_id": "broken", "source_uri": str(folder / "broken.jpg"), "status": "ok"}
        )
    return rows


def _build_output(
    out: str,
    inputs: Path,
    *,
    n_good: int = N_GOOD,
    n_missing: int = 2,
    corrupt: bool = True,
    storage_options: dict | None = None,
    extra_rows: list[dict] | None = None,
    run_json: bool = True,
) -> list[dict]:
    """Run the stages without Ray, commit one Parquet shard and a run.json; return the rows."""
    rows = _write_inputs(inputs, n_good, n_missing, corrupt)
    rows = stages.Fetch(threads=1)(rows)
    rows = stages.Preprocess(size=SIZE)(rows)
    rows = stages.Score(roles=("clean",))(rows)
    rows = stages.Degrade(seed=3, variants=VARIANTS, types=TYPES)(rows)
    rows = stages.Score(roles=("degraded", "enhanced"))(rows)
    rows = stages.Write(out=out, storage_options=storage_options)(rows)
    rows += extra_rows or []
    store = OutputStore(out, storage_options)
    writer = ShardWriter(store, output_schema())
    writer.add(to_table(rows, output_schema()))
    writer.close()
    if run_json:
        n_ok = sum(r["status"] == "ok" for r in rows)
        store.write_json(
            "run.json",
            {
                "config": {
                    "mode": "pairs",
                    "manifest": str(inputs / "manifest.csv"),
                    "out": out,
                    "size": SIZE,
                    "variants": VARIANTS,
                    "types": TYPES,
                    "seed": 3,
                    # Never expected in a real run.json (it is redacted), never to be shown.
                    "storage_options": {"key": "AKIAABCDEFGHIJKLMNOP", "secret": SECRET},
                },
                "versions": environment_versions(),
                "started": "2026-01-01T00:00:00Z",
                "finished": "2026-01-01T00:00:02Z",
                "state": "complete",
                "seconds": RUN_SECONDS,
                "counts": {
                    "rows_in": len(rows),
                    "ok": n_ok,
                    "failed": len(rows) - n_ok,
                    "done_before": 0,
                    "this_run": len(rows),
                },
            },
        )
    return rows


def _hostile_failure() -> dict:
    return {
        "image_id": HOSTILE_ID,
        "variant": 0,
        "status": "failed",
        "failed_stage": "enhance",
        "error": f"RuntimeError: <script>alert(1)</script> s3://AKIAABCDEFGHIJKLMNOP:{SECRET}@b/x",
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("report")
    out = str(root / "out")
    rows = _build_output(out, root / "inputs", extra_rows=[_hostile_failure()])
    path = write_report(out)
    html_text = path.read_text(encoding="utf-8")
    frame = OutputStore(out).read_table().to_pandas()
    return {"out": out, "rows": rows, "path": path, "html": html_text, "frame": frame}


def _expected_plots(frame: pd.DataFrame) -> int:
    """One plot per full-reference metric with values (MS-SSIM is NaN on FOVs this small),
    plus five no-reference plots."""
    fr = sum(frame[f"{m}_degraded"].notna().any() for m in ("psnr", "ssim", "ms_ssim"))
    return int(fr) + 5


def _table_rows(page: _Page, section: str) -> list[list[str]]:
    return [row for table in page.tables[section] for row in table]


def test_report_is_written_next_to_the_output_with_figures(built):
    path = built["path"]
    assert path == Path(built["out"]) / "report.html"
    figures = Path(built["out"]) / "report_figures"
    for code in TYPES:
        png = cv2.imread(str(figures / f"contact_{code}.png"))
        assert png is not None and png.std() > 10, code
    assert (figures / "metric_psnr.svg").read_text().startswith("<svg")


def test_html_parses_and_has_every_section_once(built):
    page = _parse(built["html"])
    for sid in SECTIONS:
        assert page.ids.count(sid) == 1, sid
    assert list(page.text) == SECTIONS


def test_images_are_embedded_and_nothing_external_is_referenced(built):
    html_text = built["html"]
    page = _parse(html_text)
    assert "http://" not in html_text and "https://" not in html_text
    for tag, ref in page.refs:
        if tag == "a" and not ref.startswith("#"):  # thumbnail links: files inside OUT
            assert ":" not in ref and not ref.startswith("/"), ref
            assert (Path(built["out"]) / ref).resolve().is_relative_to(Path(built["out"]))
            continue
        assert ref.startswith(("data:image/", "#")), (tag, ref[:60])
    sheet = [src for section, src in page.imgs if section == "contact-sheets"]
    # Each type shows both good images, clean and degraded side by side.
    assert len(sheet) == len(TYPES) * N_GOOD * 2
    for src in sheet:
        head, data = src.split(",", 1)
        assert head == "data:image/png;base64"
        img = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (176, 176, 3) and img.max() > 50


def test_summary_shows_state_counts_and_config_but_no_credentials(built):
    page = _parse(built["html"])
    text = " ".join(page.text["summary"].split())
    n_rows = len(built["rows"])
    n_ok = sum(r["status"] == "ok" for r in built["rows"])
    assert "complete" in text
    assert f"rows_in = ok + failed ({n_rows} = {n_ok} + {n_rows - n_ok})" in text
    assert "001, 010, 111" in text and "numpy" in text
    assert SECRET not in built["html"] and "AKIAABCDEFGHIJKLMNOP" not in built["html"]
    assert "storage_options" not in built["html"]


def test_hostile_text_is_escaped(built):
    html_text = built["html"]
    assert "<script>" not in html_text and HOSTILE_ID not in html_text
    assert html_text.count("<img ") == len(TYPES) * N_GOOD * 2
    page = _parse(html_text)
    assert HOSTILE_ID in page.text["failures"]
    assert "<script>alert(1)</script>" in page.text["failures"]


def test_failures_are_grouped_by_stage_and_error_kind_with_counts(built):
    page = _parse(built["html"])
    rows = _table_rows(page, "failures")
    head, body = rows[0], rows[1:]
    assert head[:4] == ["stage", "error kind", "rows", "images"]
    groups = {(r[0], r[1].split("(")[0]): (int(r[2]), int(r[3]), r[4]) for r in body}
    assert set(groups) == {
        ("fetch", "FileNotFoundError"),
        ("preprocess", "DecodeError"),
        ("enhance", "RuntimeError"),
    }
    # Two missing images, each expanded into one failed row per variant.
    assert groups[("fetch", "FileNotFoundError")][:2] == (2 * VARIANTS, 2)
    assert "gone_0" in groups[("fetch", "FileNotFoundError")][2]
    assert groups[("preprocess", "DecodeError")][:2] == (VARIANTS, 1)
    assert groups[("enhance", "RuntimeError")][:2] == (1, 1)
    assert SECRET not in " ".join(" ".join(r) for r in body)


def test_downstream_says_not_available_when_no_row_has_vessel_scores(built):
    assert not any(
        built["frame"][c].notna().any() for c in built["frame"] if c.startswith("vessel_auc")
    )
    page = _parse(built["html"])
    text = " ".join(page.text["downstream"].split())
    assert "Not available" in text and "no row was scored" in text
    assert page.tables["downstream"] == []


def test_downstream_says_not_available_without_vessel_columns(built, tmp_path: Path):
    out = str(tmp_path / "old")
    schema = pa.schema([f for f in output_schema() if not f.name.startswith("vessel_")])
    writer = ShardWriter(OutputStore(out), schema)
    writer.add(pa.Table.from_pandas(built["frame"][schema.names], preserve_index=False))
    writer.close()
    page = _parse(write_report(out).read_text(encoding="utf-8"))
    text = " ".join(page.text["downstream"].split())
    assert "Not available" in text and "has no vessel_auc_* / vessel_f1_* columns" in text
    assert page.tables["downstream"] == []


def test_metric_tables_match_the_parquet(built):
    page = _parse(built["html"])
    frame = built["frame"]
    ok = frame[frame["status"] == "ok"]
    assert page.svgs["metrics"] == _expected_plots(frame)
    table = page.tables["metrics"][0]
    head = table[0]
    psnr_col = next(i for i, h in enumerate(head) if h.startswith("PSNR") and "degraded" in h)
    by_type = {r[0][:3]: r for r in table[1:]}
    for code in TYPES:
        expected = ok.loc[ok["type_code"] == code, "psnr_degraded"].mean()
        assert float(by_type[code][psnr_col]) == pytest.approx(expected, abs=0.006)
        assert int(by_type[code][1]) == N_GOOD


def test_throughput_reports_stage_shares_and_run_rate(built):
    page = _parse(built["html"])
    rows = _table_rows(page, "throughput")
    facts = {r[0]: r[1] for r in rows if len(r) == 2}
    n_rows = len(built["rows"])
    assert float(facts["rows / s"]) == pytest.approx(n_rows / RUN_SECONDS, abs=0.01)
    images = len({r["image_id"] for r in built["rows"]})  # a failed image has one row, not K
    assert float(facts["source images / s"]) == pytest.approx(images / RUN_SECONDS, abs=0.01)
    stage_rows = {r[0]: r for r in rows if len(r) == 6 and r[0] != "stage"}
    assert {"fetch", "preprocess", "degrade", "score", "write"} <= set(stage_rows)
    shares = [float(r[4].rstrip("%")) for r in stage_rows.values()]
    assert sum(shares) == pytest.approx(100.0, abs=0.5)


def test_downstream_table_shows_vessel_means_when_columns_exist(built, tmp_path: Path):
    frame = built["frame"]
    ok = frame["status"] == "ok"
    auc_by_type = {"001": 0.9, "010": 0.8, "111": 0.7}
    frame = frame.assign(
        vessel_auc_clean=np.where(ok, 0.95, np.nan),
        vessel_auc_degraded=[
            auc_by_type[t] + (0.02 if i == "good_1" else -0.02) if s == "ok" else np.nan
            for t, i, s in zip(frame["type_code"], frame["image_id"], frame["status"], strict=True)
        ],
        vessel_f1_degraded=np.where(ok, 0.6, np.nan),
        vessel_auc_enhanced=np.where(ok, 0.85, np.nan),
        vessel_segmenter=np.where(ok, "sato-v1", None),
    )
    out = str(tmp_path / "vessels")
    schema = output_schema()
    writer = ShardWriter(OutputStore(out), schema)
    writer.add(pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False))
    writer.close()
    page = _parse(write_report(out).read_text(encoding="utf-8"))
    table = page.tables["downstream"][0]
    head = table[0]
    col = {h: i for i, h in enumerate(head)}
    by_type = {r[0][:3]: r for r in table[1:]}
    for code, auc in auc_by_type.items():
        deg = frame[(frame["type_code"] == code) & ok]["vessel_auc_degraded"].mean()
        assert deg == pytest.approx(auc)
        assert float(by_type[code][col["AUC degraded"]]) == pytest.approx(auc)
        assert float(by_type[code][col["AUC clean"]]) == pytest.approx(0.95)
        assert float(by_type[code][col["F1 degraded"]]) == pytest.approx(0.6)
        gain = float(by_type[code][col["Δ AUC enhanced − degraded"]])
        assert gain == pytest.approx(0.85 - auc, abs=1e-4)
    text = " ".join(page.text["downstream"].split())
    assert "Not available" not in text
    assert "Segmenter: sato-v1" in text and "own vessel branch is not used" in text
    # Enhanced (0.85) below degraded only on 001 (0.9).
    assert "Enhancement lowered vessel AUC on 001." in text


def test_summary_counts_rows_that_passed_the_quality_gate(built, tmp_path: Path):
    frame = built["frame"].copy()
    ok = frame["status"] == "ok"
    low = ok & (frame["image_id"] == "good_1")
    frame["quality_ok"] = np.where(ok, ~low, None)
    frame["quality_failed"] = np.where(low, "nr_luminance_clean >= 200", None)
    out = str(tmp_path / "gated")
    schema = output_schema()
    for name, kind in (("quality_ok", pa.bool_()), ("quality_failed", pa.string())):
        if name not in schema.names:
            schema = schema.append(pa.field(name, kind))
    writer = ShardWriter(OutputStore(out), schema)
    writer.add(pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False))
    writer.close()
    page = _parse(write_report(out).read_text(encoding="utf-8"))
    text = " ".join(page.text["summary"].split())
    n_ok, n_low = int(ok.sum()), int(low.sum())
    assert f"Quality gate: {n_ok - n_low} of {n_ok} rows passed" in text
    assert f"nr_luminance_clean >= 200 ({n_low})" in text


def test_moved_output_still_finds_its_images_and_missing_ones_are_marked(tmp_path: Path):
    first = tmp_path / "first"
    _build_output(str(first), tmp_path / "in", n_good=1, n_missing=0, corrupt=False)
    moved = tmp_path / "moved"
    shutil.move(str(first), str(moved))
    page = _parse(write_report(str(moved)).read_text(encoding="utf-8"))
    assert len(page.imgs) == len(TYPES) * 2
    assert "file missing" not in page.text["contact-sheets"]
    next((moved / "images" / "good_0").glob("v001_*.png")).unlink()
    page = _parse(write_report(str(moved)).read_text(encoding="utf-8"))
    assert len(page.imgs) == len(TYPES) * 2 - 1
    assert page.text["contact-sheets"].count("file missing") == 1


def test_dest_elsewhere_puts_figures_beside_it(built, tmp_path: Path):
    dest = tmp_path / "sub" / "r.html"
    dest.parent.mkdir()
    assert write_report(built["out"], str(dest)) == dest
    assert (dest.parent / "report_figures" / "contact_111.png").is_file()


def test_a_dest_that_is_a_folder_is_refused_before_any_figure_is_written(built, tmp_path: Path):
    folder = tmp_path / "reports"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"reports is a folder; give the HTML file's"):
        write_report(built["out"], str(folder))
    assert list(tmp_path.iterdir()) == [folder] and not any(folder.iterdir())


def test_output_without_run_json_still_reports_from_parquet(tmp_path: Path):
    out = tmp_path / "out"
    _build_output(str(out), tmp_path / "in", n_good=1, n_missing=1, corrupt=False, run_json=False)
    page = _parse(write_report(str(out)).read_text(encoding="utf-8"))
    assert "run.json is missing" in " ".join(page.text["summary"].split())
    assert [r[0] for r in _table_rows(page, "failures")[1:]] == ["fetch"]


def test_run_without_any_shard_yet_reports_its_state(tmp_path: Path):
    OutputStore(str(tmp_path)).write_json(
        "run.json", {"state": "running", "counts": {"rows_in": 40, "done_before": 0}}
    )
    page = _parse(write_report(str(tmp_path)).read_text(encoding="utf-8"))
    assert [s for s in SECTIONS if s in page.ids] == SECTIONS
    assert "running" in page.text["summary"] and "40" in page.text["summary"]
    assert "No successful rows" in page.text["contact-sheets"]
    assert "No failed rows" in page.text["failures"]


def test_empty_output_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        write_report(str(tmp_path))


def test_report_reads_an_s3_output_and_never_prints_storage_options(
    s3_server: dict[str, Any], s3_bucket: str, tmp_path: Path
):
    opts = s3_server["storage_options"]
    out = f"s3://{s3_bucket}/run"
    _build_output(out, tmp_path / "in", n_good=1, n_missing=1, corrupt=False, storage_options=opts)
    dest = tmp_path / "report.html"
    html_text = write_report(out, str(dest), storage_options=opts).read_text(encoding="utf-8")
    page = _parse(html_text)
    assert len(page.imgs) == len(TYPES) * 2
    assert s3_server["endpoint_url"] not in html_text and "http://" not in html_text
    remote = write_report(out, storage_options=opts)
    assert remote == f"{out}/report.html"
    assert OutputStore(out, opts).fs.exists(f"{s3_bucket}/run/report_figures/contact_001.png")


def _chromium() -> str:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium not installed")


def _chromium_args(profile: Path) -> list[str]:
    return [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]


def test_headless_chromium_renders_every_section_and_a_nonblank_page(built, tmp_path: Path):
    args = _chromium_args(tmp_path / "profile")
    url = built["path"].resolve().as_uri()
    dom = subprocess.run(
        [*args, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    for sid in SECTIONS:
        assert re.search(rf'<section id="{sid}"', dom), sid
    assert dom.count("<svg") == _expected_plots(built["frame"])
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*args, f"--screenshot={shot}", "--window-size=1280,2000", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imread(str(shot))
    assert img.shape == (2000, 1280, 3)
    # Not a blank page: dark header, text and fundus thumbnails (reddish, many distinct colours).
    assert (img.reshape(-1, 3) < 60).all(axis=1).mean() > 0.03
    reddish = (img[..., 2].astype(int) - img[..., 0].astype(int)) > 60
    assert reddish.mean() > 0.01
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 500


_THUMB_LINK = re.compile(r'<a href="([^"]+)"[^>]*><img alt="([a-z]+)"')


def _thumb_links(html_text: str, report: Path) -> list[tuple[str, Path]]:
    """(role, linked file) of every contact-sheet thumbnail that is a link."""
    from urllib.parse import unquote

    return [
        (role, (report.parent / unquote(href)).resolve())
        for href, role in _THUMB_LINK.findall(html_text)
    ]


def test_contact_sheet_thumbnails_link_to_the_full_size_images(built, tmp_path: Path):
    page = _parse(built["html"])
    sheet = [src for section, src in page.imgs if section == "contact-sheets"]
    links = _thumb_links(built["html"], built["path"])
    assert len(links) == len(sheet) == len(TYPES) * N_GOOD * 2
    for role, target in links:
        assert target.is_file(), target
        assert cv2.imread(str(target)).shape == (SIZE, SIZE, 3), role
    assert {t.name for r, t in links if r == "clean"} == {"clean.png"}
    # A report written elsewhere links back into OUT.
    dest = tmp_path / "elsewhere" / "r.html"
    dest.parent.mkdir()
    text = write_report(built["out"], str(dest)).read_text(encoding="utf-8")
    moved_links = _thumb_links(text, dest)
    assert sorted(t for _, t in moved_links) == sorted(t for _, t in links)


def test_rows_per_type_option_shows_more_contact_sheet_rows(built, tmp_path: Path):
    from click.testing import CliRunner

    from fundus_batch.cli import main

    counts = {}
    for n in (1, 3):
        dest = tmp_path / f"r{n}.html"
        result = CliRunner().invoke(
            main, ["report", built["out"], "--dest", str(dest), "--rows-per-type", str(n)]
        )
        assert result.exit_code == 0, result.output
        text = dest.read_text(encoding="utf-8")
        counts[n] = len(_parse(text).imgs)
        assert f"{min(n, N_GOOD)} shown" in " ".join(_parse(text).text["contact-sheets"].split())
    assert counts == {1: len(TYPES) * 2, 3: len(TYPES) * N_GOOD * 2}
    bad = CliRunner().invoke(main, ["report", built["out"], "--rows-per-type", "0"])
    assert bad.exit_code != 0 and "rows-per-type" in bad.output


def _with_enhancement(built, out: str, gain: dict[str, float]) -> Path:
    """The built output with enhanced columns: the degraded images stand in for the enhanced
    ones, and PSNR moves by ``gain[type]`` dB."""
    frame = built["frame"].copy()
    ok = frame["status"] == "ok"
    frame["enhanced_uri"] = frame["degraded_uri"].map(
        lambda u: str(Path(built["out"]) / u) if isinstance(u, str) else None
    )
    frame["psnr_enhanced"] = frame["psnr_degraded"] + frame["type_code"].map(gain)
    frame["ssim_enhanced"] = frame["ssim_degraded"] + 0.01
    frame["model_name"] = np.where(ok, "tiny-model", None)
    frame["enhance_device"] = np.where(ok, "cuda", None)
    frame["enhance_change"] = np.where(ok, np.where(frame["type_code"] == "010", 0.0, 2.5), None)
    writer = ShardWriter(OutputStore(out), output_schema())
    writer.add(pa.Table.from_pandas(frame[output_schema().names], preserve_index=False))
    writer.close()
    return write_report(out)


def test_report_states_the_device_and_flags_types_where_enhancement_lowered_psnr(
    built, tmp_path: Path
):
    path = _with_enhancement(built, str(tmp_path / "worse"), {"001": 1.0, "010": -5.0, "111": -2.0})
    page = _parse(path.read_text(encoding="utf-8"))
    summary = " ".join(page.text["summary"].split())
    n_ok = int((built["frame"]["status"] == "ok").sum())
    assert f"Enhancement: tiny-model ran on cuda ({n_ok} rows)." in summary
    warning = "WARNING enhancement lowered PSNR on 010 (-5.00 dB), 111 (-2.00 dB)"
    assert warning in summary
    assert warning in " ".join(page.text["metrics"].split())
    assert "SSIM on" not in summary
    n_010 = int(((built["frame"]["status"] == "ok") & (built["frame"]["type_code"] == "010")).sum())
    assert f"NOTE enhancement left images unchanged: 010 ({n_010} of {n_010})" in summary


def test_report_has_no_fidelity_warning_when_enhancement_helped(built, tmp_path: Path):
    path = _with_enhancement(built, str(tmp_path / "better"), {"001": 1.0, "010": 0.5, "111": 2.0})
    text = path.read_text(encoding="utf-8")
    assert "WARNING" not in text
    assert "ran on cuda" in " ".join(_parse(text).text["summary"].split())
