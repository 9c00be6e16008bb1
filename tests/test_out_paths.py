"""Nothing is written outside OUT, and rows record paths relative to OUT (fundus_batch.outpaths)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fundus_batch import outpaths, pipeline, stages
from fundus_batch.config import build_config
from fundus_batch.output import OutputStore, ShardWriter
from fundus_batch.schema import output_schema
from fundus_batch.verify import verify
from tests.pipeline_inputs import working_row, write_inputs


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _working_row(image_id: str) -> dict:
    return working_row(image_id, seed=3)


def test_write_records_paths_relative_to_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    [row] = stages.Write(out=str(out))([_working_row("a")])
    assert row["status"] == "ok", row.get("error")
    assert row["clean_uri"] == "images/a/clean.png"
    assert row["degraded_uri"] == "images/a/v000_001.png"
    assert (out / row["degraded_uri"]).is_file()


def test_a_symlinked_image_folder_fails_the_row_and_writes_nothing_outside(tmp_path: Path) -> None:
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    (out / "images").mkdir(parents=True)
    (out / "images" / "a").symlink_to(victim, target_is_directory=True)
    rows = stages.Write(out=str(out))([_working_row("a"), _working_row("b")])
    assert rows[0]["status"] == "failed" and rows[0]["failed_stage"] == "write"
    assert "symbolic link" in rows[0]["error"] and rows[0].get("clean_uri") is None
    assert rows[1]["status"] == "ok"
    assert _files_under(victim) == set()


def test_a_symlinked_images_folder_and_a_symlinked_file_are_refused(tmp_path: Path) -> None:
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    out.mkdir()
    (out / "images").symlink_to(victim, target_is_directory=True)
    [row] = stages.Write(out=str(out))([_working_row("a")])
    assert row["status"] == "failed" and "symbolic link" in row["error"]
    (out / "images").unlink()
    (out / "images" / "b").mkdir(parents=True)
    (out / "images" / "b" / "clean.png").symlink_to(victim / "clean.png")
    [row] = stages.Write(out=str(out))([_working_row("b")])
    assert row["status"] == "failed" and "symbolic link" in row["error"]
    assert _files_under(victim) == set()


def test_a_symlinked_pairs_folder_refuses_the_shard(tmp_path: Path) -> None:
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    out.mkdir()
    (out / "pairs").symlink_to(victim, target_is_directory=True)
    schema = output_schema()
    writer = ShardWriter(OutputStore(str(out)), schema, shard_rows=1)
    table = pa.Table.from_pylist([{"image_id": "a", "status": "ok"}], schema=schema)
    with pytest.raises(outpaths.OutsideOutError, match="symbolic link"):
        writer.add(table)
    assert _files_under(victim) == set()


def _config(manifest: Path, out: str | Path, **extra):
    data = {
        "manifest": str(manifest),
        "out": str(out),
        "variants": 1,
        "size": 128,
        "progress": False,
        "ray": {"rows_per_block": 2},
    }
    data.update(extra)
    return build_config(data, "test")


@pytest.mark.parametrize("name", ["pairs", "images", "run.json", "logs"])
def test_a_run_on_an_out_with_a_symlinked_top_level_entry_refuses_before_work(
    tmp_path: Path, name: str
) -> None:
    manifest = write_inputs(tmp_path / "in", n_good=1, broken=False, size=256)
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    out.mkdir()
    (out / name).symlink_to(victim, target_is_directory=name != "run.json")
    with pytest.raises(outpaths.OutsideOutError, match=name):
        pipeline.run(_config(manifest, out))
    assert _files_under(victim) == set()


def test_stored_uri_problems() -> None:
    out = "/data/out"
    assert outpaths.stored_uri_problem(out, "images/a/clean.png") is None
    assert "'..'" in outpaths.stored_uri_problem(out, "images/../../x.png")
    assert outpaths.stored_uri_problem(out, "/data/out/images/a/clean.png") is None
    assert "outside" in outpaths.stored_uri_problem(out, "/data/other/images/a/clean.png")
    assert "outside" in outpaths.stored_uri_problem("s3://b/out", "s3://b/other/x.png")
    assert outpaths.stored_uri_problem("s3://b/out", "s3://b/out/images/x.png") is None
    assert outpaths.resolve("s3://b/out", "images/x.png") == "s3://b/out/images/x.png"
    assert outpaths.resolve(out, "/old/absolute.png") == "/old/absolute.png"


def test_a_relative_out_run_moved_elsewhere_verifies_and_a_symlinked_id_fails_alone(
    ray_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_inputs(tmp_path / "in", n_good=3, broken=False, size=256)
    work, victim = tmp_path / "work", tmp_path / "victim"
    work.mkdir()
    victim.mkdir()
    (work / "out" / "images").mkdir(parents=True)
    (work / "out" / "images" / "img_0001").symlink_to(victim, target_is_directory=True)
    monkeypatch.chdir(work)
    summary = pipeline.run(_config(manifest, "out"))  # relative --out
    assert (summary.ok, summary.failed) == (2, 1)
    df = pq.read_table(str(work / "out" / "pairs")).to_pandas().set_index("image_id")
    assert df.loc["img_0001", "failed_stage"] == "write"
    assert "symbolic link" in df.loc["img_0001", "error"]
    assert _files_under(victim) == set()
    assert set(df.loc[["img_0000", "img_0002"], "clean_uri"]) == {
        "images/img_0000/clean.png",
        "images/img_0002/clean.png",
    }
    os.unlink(work / "out" / "images" / "img_0001")
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(str(work / "out"), str(moved))
    monkeypatch.chdir(tmp_path)
    report = verify(str(moved), str(manifest))
    assert report.ok, report.summary()
    assert report.files_checked == 2 * 3  # clean, mask and one variant of the two ok images


def test_the_report_refuses_a_symlinked_figures_folder_inside_out(tmp_path: Path) -> None:
    from fundus_batch.report import write_report

    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    out.mkdir()
    (out / "report_figures").symlink_to(victim, target_is_directory=True)
    with pytest.raises(outpaths.OutsideOutError, match="report_figures"):
        write_report(str(out))
    assert _files_under(victim) == set()
