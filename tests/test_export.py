"""Export writes complete trainer layouts only inside --dest, from the rows that make pairs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from fundus_batch import pipeline
from fundus_batch.cli import main
from fundus_batch.config import build_config
from fundus_batch.export import ExportError, export_pairs
from fundus_batch.io.codecs import decode_image, encode_png
from tests.pipeline_inputs import write_inputs

GATE = "psnr_degraded >= 25"  # fails type 001 (~16 dB at 128 px), passes 010 (~36 dB)


def _write_output(out: Path, rows: list[tuple[str, str | None]], **columns: list[Any]) -> None:
    """An output folder with one ok pair per (image_id, split), as a run records it;
    ``columns`` replace or add columns of the rows."""
    (out / "pairs").mkdir(parents=True)
    (out / "img").mkdir()
    for n in range(len(rows)):
        png = encode_png(np.full((16, 16, 3), 10 * n, np.uint8))
        (out / "img" / f"c{n}.png").write_bytes(png)
        (out / "img" / f"d{n}.png").write_bytes(png)
    data: dict[str, Any] = {
        "image_id": [image_id for image_id, _ in rows],
        "variant": pa.array([0] * len(rows), pa.int32()),
        "type_code": ["001"] * len(rows),
        "status": ["ok"] * len(rows),
        "clean_uri": [f"img/c{n}.png" for n in range(len(rows))],
        "degraded_uri": [f"img/d{n}.png" for n in range(len(rows))],
        "split": pa.array([split for _, split in rows], pa.string()),
    }
    data.update(columns)
    pq.write_table(pa.table(data), out / "pairs" / "part-0.parquet")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, ["export", *args])


# ------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory) -> dict[str, Path]:
    """Two real runs over 3 photographs (img_0001 in split val) plus a corrupt and a missing
    one: 'pairs' (2 variants, types 001 and 010, quality gate GATE) and 'score' (no pairs)."""
    root = tmp_path_factory.mktemp("export_runs")
    manifest = write_inputs(root / "in", n_good=3, size=256)
    frame = pd.read_csv(manifest)
    frame["split"] = ["val" if i == "img_0001" else "train" for i in frame.image_id]
    frame.to_csv(manifest, index=False)
    common = {"manifest": str(manifest), "size": 128, "progress": False}
    settings = {
        "pairs": {"variants": 2, "types": ["001", "010"], "min_quality": GATE},
        "score": {"mode": "score"},
    }
    for name, extra in settings.items():
        summary = pipeline.run(build_config({**common, **extra, "out": str(root / name)}, "test"))
        assert summary.complete and summary.failed > 0
    return {name: root / name for name in settings}


def _rows(out: Path) -> pd.DataFrame:
    return pq.read_table(str(out / "pairs")).to_pandas()


def _p2p_names(frame: pd.DataFrame) -> list[str]:
    return sorted(
        f"{r.split}/{r.image_id}_v{r.variant:03d}_{r.type_code}.png" for r in frame.itertuples()
    )


def test_export_leaves_out_pairs_that_failed_the_quality_gate(runs, tmp_path: Path) -> None:
    rows = _rows(runs["pairs"])
    ok = rows[rows.status == "ok"]
    passed, gated = ok[ok.quality_ok == True], ok[ok.quality_ok == False]  # noqa: E712
    assert len(passed) == 3 and len(gated) == 3 and set(gated.type_code) == {"001"}
    summary = export_pairs(str(runs["pairs"]), "pix2pix", tmp_path / "d")
    assert _files(tmp_path / "d") == _p2p_names(passed)
    assert (summary.pairs, summary.quality_failed, summary.failed_rows) == (3, 3, 4)
    kept = export_pairs(
        str(runs["pairs"]), "pix2pix", tmp_path / "all", include_quality_failed=True
    )
    assert kept.pairs == 6 and _files(tmp_path / "all") == _p2p_names(ok)


def test_cli_export_says_how_many_quality_failed_pairs_it_left_out_and_why(
    runs, tmp_path: Path
) -> None:
    result = _cli(str(runs["pairs"]), "--format", "pix2pix", "--dest", str(tmp_path / "d"))
    assert result.exit_code == 0, result.output
    assert "exported 3 pairs" in result.output
    assert f"left out 3 pairs that failed the run's quality gate (min_quality: broke {GATE}" in (
        result.output
    )
    assert "--include-quality-failed exports them" in result.output
    args = ["--format", "pix2pix", "--dest", str(tmp_path / "all"), "--include-quality-failed"]
    result = _cli(str(runs["pairs"]), *args)
    assert result.exit_code == 0, result.output
    assert "exported 6 pairs" in result.output and "including 3 that failed" in result.output


def test_export_accepts_the_pairs_folder_of_a_run_as_every_reader_does(
    runs, tmp_path: Path
) -> None:
    export_pairs(str(runs["pairs"]), "pix2pix", tmp_path / "root")
    export_pairs(str(runs["pairs"] / "pairs"), "pix2pix", tmp_path / "pairs")
    names = _files(tmp_path / "root")
    assert names and _files(tmp_path / "pairs") == names
    for name in names:
        assert (tmp_path / "pairs" / name).read_bytes() == (tmp_path / "root" / name).read_bytes()


def test_basicsr_writes_one_tree_per_split_when_the_rows_have_several(runs, tmp_path: Path) -> None:
    summary = export_pairs(str(runs["pairs"]), "basicsr", tmp_path / "d")
    assert _files(tmp_path / "d") == [
        "train/GT/img_0000_v001_010.png",
        "train/GT/img_0002_v001_010.png",
        "train/LQ/img_0000_v001_010.png",
        "train/LQ/img_0002_v001_010.png",
        "train/meta_info.txt",
        "val/GT/img_0001_v001_010.png",
        "val/LQ/img_0001_v001_010.png",
        "val/meta_info.txt",
    ]
    assert summary.splits == ("train", "val") and "one tree per split" in summary.message()
    assert (tmp_path / "d" / "val" / "meta_info.txt").read_text() == (
        "img_0001_v001_010.png (128,128,3)\n"
    )
    for split in ("train", "val"):  # as BasicSR reads meta_info.txt
        for line in (tmp_path / "d" / split / "meta_info.txt").read_text().splitlines():
            assert (tmp_path / "d" / split / "GT" / line.strip().split(" ")[0]).is_file()


def test_export_of_a_run_without_pairs_is_an_error_that_says_so(runs, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"no pair in .*an enhance or score run makes no pairs"):
        export_pairs(str(runs["score"]), "basicsr", tmp_path / "d")
    assert list(tmp_path.iterdir()) == []
    result = _cli(str(runs["score"]), "--format", "basicsr", "--dest", str(tmp_path / "d"))
    assert result.exit_code == 1 and "nothing to export" in result.output
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- written outputs


def test_pix2pix_puts_each_split_in_its_folder_under_dest(tmp_path: Path) -> None:
    _write_output(tmp_path / "out", [("a", "val"), ("b", None)])
    dest = tmp_path / "exports" / "dest"
    assert export_pairs(str(tmp_path / "out"), "pix2pix", dest).pairs == 2
    assert _files(tmp_path / "exports") == [
        "dest/train/b_v000_001.png",
        "dest/val/a_v000_001.png",
    ]
    assert decode_image((dest / "val" / "a_v000_001.png").read_bytes()).shape == (16, 32, 3)


def test_basicsr_keeps_the_flat_layout_when_the_rows_have_one_split(tmp_path: Path) -> None:
    _write_output(tmp_path / "out", [("a", "train"), ("b", None)])
    summary = export_pairs(str(tmp_path / "out"), "basicsr", tmp_path / "d")
    assert summary.splits == () and "flat" in summary.message()
    assert _files(tmp_path / "d") == [
        "GT/a_v000_001.png",
        "GT/b_v000_001.png",
        "LQ/a_v000_001.png",
        "LQ/b_v000_001.png",
        "meta_info.txt",
    ]


@pytest.mark.parametrize("split", ["../../escaped_split", "..", "<abs>", "a/b", "-x", " v"])
def test_pix2pix_refuses_an_unsafe_split_in_old_shards_and_writes_nothing(
    tmp_path: Path, split: str
) -> None:
    split = split.replace("<abs>", str(tmp_path / "abs"))
    _write_output(tmp_path / "out", [("a", "train"), ("b", split)])
    exports = tmp_path / "exports"
    with pytest.raises(ValueError, match=r"cannot export image_id 'b': unsafe split"):
        export_pairs(str(tmp_path / "out"), "pix2pix", exports / "sub" / "dest")
    assert not exports.exists() or _files(exports) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("fmt", ["basicsr", "pix2pix"])
def test_export_refuses_an_unsafe_image_id_in_old_shards(tmp_path: Path, fmt: str) -> None:
    _write_output(tmp_path / "out", [("../../up", "train")])
    with pytest.raises(ValueError, match=r"unsafe image_id '../../up'"):
        export_pairs(str(tmp_path / "out"), fmt, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_export_reads_an_output_folder_in_object_storage_with_its_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fsspec

    from fundus_batch.io import storage

    local = tmp_path / "out"
    _write_output(local, [("a", None)])
    remote = f"memory://export-{tmp_path.name}"
    fs = fsspec.filesystem("memory")
    fs.put(str(local), remote.removeprefix("memory://"), recursive=True)
    seen: list[object] = []
    plain = storage.filesystem

    def recording(uri: str, storage_options: dict | None = None):  # type: ignore[no-untyped-def]
        seen.append(storage_options)
        return plain(uri, storage_options)

    monkeypatch.setattr(storage, "filesystem", recording)
    options = {"skip_instance_cache": False}
    summary = export_pairs(remote, "basicsr", tmp_path / "dest", storage_options=options)
    assert summary.pairs == 1
    assert seen and all(o == options for o in seen)  # the listing, the shard and both images
    assert _files(tmp_path / "dest") == ["GT/a_v000_001.png", "LQ/a_v000_001.png", "meta_info.txt"]
    assert export_pairs(f"{remote}/pairs", "pix2pix", tmp_path / "p2p").pairs == 1
    fs.rm(remote.removeprefix("memory://"), recursive=True)


def test_export_refuses_a_non_empty_dest_and_leaves_it_as_it_was(tmp_path: Path) -> None:
    _write_output(tmp_path / "out", [("a", "train")])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("kept")
    with pytest.raises(ExportError, match=r"is not empty; .* or --overwrite to replace it"):
        export_pairs(str(tmp_path / "out"), "basicsr", dest)
    assert _files(dest) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "out"]


def test_export_into_an_existing_empty_dest_fills_it(tmp_path: Path) -> None:
    _write_output(tmp_path / "out", [("a", "train")])
    (tmp_path / "dest").mkdir()
    assert export_pairs(str(tmp_path / "out"), "pix2pix", tmp_path / "dest").pairs == 1
    assert _files(tmp_path / "dest") == ["train/a_v000_001.png"]


def test_overwrite_replaces_the_old_export_with_the_new_one_alone(tmp_path: Path) -> None:
    _write_output(tmp_path / "out", [("a", "train"), ("b", "val")])
    dest = tmp_path / "dest"
    export_pairs(str(tmp_path / "out"), "pix2pix", dest)
    (dest / "stray.txt").write_text("from before")
    export_pairs(str(tmp_path / "out"), "basicsr", dest, overwrite=True)
    assert _files(dest) == [
        "train/GT/a_v000_001.png",
        "train/LQ/a_v000_001.png",
        "train/meta_info.txt",
        "val/GT/b_v000_001.png",
        "val/LQ/b_v000_001.png",
        "val/meta_info.txt",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "out"]  # nothing left beside


def test_a_failed_export_into_a_new_dest_leaves_nothing_behind(tmp_path: Path) -> None:
    _write_output(tmp_path / "out", [("a", "train"), ("b", "train")])
    (tmp_path / "out" / "img" / "d1.png").unlink()  # the second pair's image is lost
    with pytest.raises(FileNotFoundError):
        export_pairs(str(tmp_path / "out"), "basicsr", tmp_path / "exports" / "new" / "dest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_deletes_an_old_export_that_an_interrupted_overwrite_left_behind(
    tmp_path: Path,
) -> None:
    _write_output(tmp_path / "out", [("a", "train"), ("b", "train")])
    dest = tmp_path / "exp"
    export_pairs(str(tmp_path / "out"), "basicsr", dest)
    left = tmp_path / ".exp.old-0badc0de"  # Ctrl-C while the last overwrite deleted it
    shutil.copytree(dest, left)
    other = tmp_path / ".exp2.old-0badc0de"  # another export's: not ours to delete
    other.mkdir()
    export_pairs(str(tmp_path / "out"), "basicsr", dest, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".exp2.old-0badc0de", "exp", "out"]


def test_a_failed_overwrite_leaves_the_old_export_intact(tmp_path: Path) -> None:
    _write_output(tmp_path / "out", [("a", "train"), ("b", "train")])
    dest = tmp_path / "dest"
    export_pairs(str(tmp_path / "out"), "basicsr", dest)
    before = {name: (dest / name).read_bytes() for name in _files(dest)}
    (tmp_path / "out" / "img" / "d1.png").unlink()
    with pytest.raises(FileNotFoundError):
        export_pairs(str(tmp_path / "out"), "pix2pix", dest, overwrite=True)
    assert {name: (dest / name).read_bytes() for name in _files(dest)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "out"]


@pytest.mark.parametrize("dest", [".", "..", "../out", "pairs/x", "images/x/y"])
def test_overwrite_refuses_a_dest_that_holds_the_output_folder_or_lies_in_its_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dest: str
) -> None:
    _write_output(tmp_path / "work" / "out", [("a", "train")])
    monkeypatch.chdir(tmp_path / "work" / "out")
    with pytest.raises(ExportError, match=r"holds the output folder|lies in (pairs|images)/"):
        export_pairs(str(tmp_path / "work" / "out"), "basicsr", dest, overwrite=True)
    assert _files(tmp_path / "work" / "out") == ["img/c0.png", "img/d0.png", "pairs/part-0.parquet"]


def test_cli_export_refuses_a_second_export_into_the_same_dest_unless_overwrite(
    tmp_path: Path,
) -> None:
    _write_output(tmp_path / "out", [("a", "train")])
    args = [str(tmp_path / "out"), "--format", "pix2pix", "--dest", str(tmp_path / "d")]
    assert _cli(*args).exit_code == 0
    again = _cli(*args)
    assert again.exit_code == 1 and "is not empty" in again.output and "--overwrite" in again.output
    replaced = _cli(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert _files(tmp_path / "d") == ["train/a_v000_001.png"]


@pytest.mark.parametrize("stored", ["<abs>", "../foreign/c.png"])
def test_export_refuses_an_image_uri_outside_the_output_folder_and_reads_nothing(
    tmp_path: Path, stored: str
) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "c.png").write_bytes(encode_png(np.zeros((16, 16, 3), np.uint8)))
    stored = stored.replace("<abs>", str(foreign / "c.png"))
    _write_output(
        tmp_path / "out", [("a", "train"), ("b", "train")], clean_uri=["img/c0.png", stored]
    )
    with pytest.raises(
        ExportError, match=r"image_id 'b' variant 0: clean_uri .*(outside|climbs out)"
    ):
        export_pairs(str(tmp_path / "out"), "pix2pix", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_export_refuses_an_image_reached_through_a_symbolic_link_out_of_the_folder(
    tmp_path: Path,
) -> None:
    _write_output(tmp_path / "out", [("a", "train")])
    (tmp_path / "elsewhere").mkdir()
    shutil.move(tmp_path / "out" / "img", tmp_path / "elsewhere" / "img")
    (tmp_path / "out" / "img").symlink_to(tmp_path / "elsewhere" / "img")
    with pytest.raises(ExportError, match=r"through a symbolic link"):
        export_pairs(str(tmp_path / "out"), "pix2pix", tmp_path / "d")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("dest", ["s3://bucket/x", "memory://x", "gs://b/p"])
def test_cli_export_refuses_an_object_store_dest_and_creates_no_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dest: str
) -> None:
    _write_output(tmp_path / "out", [("a", "train")])
    monkeypatch.chdir(tmp_path)
    result = _cli(str(tmp_path / "out"), "--format", "basicsr", "--dest", dest)
    assert result.exit_code == 1 and "--dest must be a local folder" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_basicsr_refuses_image_ids_with_whitespace_naming_them(tmp_path: Path) -> None:
    ids = [("patient 7_left", "train"), ("nb\u00a0space", "train"), ("plain", "train")]
    _write_output(tmp_path / "out", ids)
    with pytest.raises(ExportError, match=r"2 image ids hold whitespace.*'patient 7_left'"):
        export_pairs(str(tmp_path / "out"), "basicsr", tmp_path / "d")
    assert not (tmp_path / "d").exists()
    assert export_pairs(str(tmp_path / "out"), "pix2pix", tmp_path / "p").pairs == 3


@pytest.mark.parametrize("fmt", ["basicsr", "pix2pix"])
def test_export_refuses_a_photograph_under_two_splits_naming_it(tmp_path: Path, fmt: str) -> None:
    rows = [("a", "train"), ("a", "val"), ("b", "val"), ("c", None), ("c", "train")]
    _write_output(tmp_path / "out", rows, variant=pa.array([0, 1, 0, 0, 1], pa.int32()))
    with pytest.raises(
        ExportError, match=r"1 photograph has rows under more than one split"
    ) as caught:
        export_pairs(str(tmp_path / "out"), fmt, tmp_path / "d")
    assert "'a' (train, val)" in str(caught.value) and "'b'" not in str(caught.value)
    assert not (tmp_path / "d").exists()


def test_export_of_failed_rows_only_is_an_error_naming_them(tmp_path: Path) -> None:
    _write_output(tmp_path / "out", [("a", "train"), ("b", "train")], status=["failed"] * 2)
    result = _cli(str(tmp_path / "out"), "--format", "basicsr", "--dest", str(tmp_path / "d"))
    assert result.exit_code == 1
    assert "nothing to export: no pair in" in result.output and "2 rows 2 failed" in result.output
    assert not (tmp_path / "d").exists()


SIGTERM_EXPORT = """
import os, signal, sys
from fundus_batch.io import storage
from fundus_batch.cli import main

real = storage.read_bytes
def read_bytes(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler stops the export mid-way
    return real(*args, **kwargs)

storage.read_bytes = read_bytes
main(["export", sys.argv[1], "--format", "basicsr", "--dest", sys.argv[2]])
"""


def test_an_export_stopped_by_sigterm_removes_its_staging_folder_and_exits_143(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    _write_output(tmp_path / "out", [("a", "train"), ("b", "train")])
    args = [str(tmp_path / "out"), str(tmp_path / "dest")]
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_EXPORT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "interrupted (SIGTERM)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_basicsr_keeps_a_run_s_pngs_byte_for_byte_and_converts_its_jpegs(tmp_path: Path) -> None:
    from fundus_batch.io.codecs import encode_jpeg

    out = tmp_path / "out"
    _write_output(out, [("a", "train"), ("b", "train")], degraded_uri=["img/d0.png", "img/d1.jpg"])
    jpeg = encode_jpeg(np.full((16, 16, 3), 90, np.uint8), 95)
    (out / "img" / "d1.jpg").write_bytes(jpeg)
    export_pairs(str(out), "basicsr", tmp_path / "dest")
    gt, lq = tmp_path / "dest" / "GT", tmp_path / "dest" / "LQ"
    assert (gt / "a_v000_001.png").read_bytes() == (out / "img" / "c0.png").read_bytes()
    assert (lq / "a_v000_001.png").read_bytes() == (out / "img" / "d0.png").read_bytes()
    converted = (lq / "b_v000_001.png").read_bytes()
    assert converted.startswith(b"\x89PNG") and np.array_equal(
        decode_image(converted), decode_image(jpeg)
    )
    meta = (tmp_path / "dest" / "meta_info.txt").read_text().splitlines()
    assert meta == ["a_v000_001.png (16,16,3)", "b_v000_001.png (16,16,3)"]
