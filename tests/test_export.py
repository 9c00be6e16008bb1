"""Export writes trainer layouts only inside --dest, whatever the output rows say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fundus_batch.export import export_pairs
from fundus_batch.io.codecs import decode_image, encode_png


def _write_output(out: Path, rows: list[tuple[str, str | None]]) -> None:
    """An output folder with one ok pair per (image_id, split), as a run records it."""
    (out / "pairs").mkdir(parents=True)
    (out / "img").mkdir()
    png = encode_png(np.full((16, 16, 3), 128, np.uint8))
    for n in range(len(rows)):
        (out / "img" / f"c{n}.png").write_bytes(png)
        (out / "img" / f"d{n}.png").write_bytes(png)
    table = pa.table(
        {
            "image_id": [image_id for image_id, _ in rows],
            "variant": pa.array([0] * len(rows), pa.int32()),
            "type_code": ["001"] * len(rows),
            "status": ["ok"] * len(rows),
            "clean_uri": [f"img/c{n}.png" for n in range(len(rows))],
            "degraded_uri": [f"img/d{n}.png" for n in range(len(rows))],
            "split": pa.array([split for _, split in rows], pa.string()),
        }
    )
    pq.write_table(table, out / "pairs" / "part-0.parquet")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_pix2pix_puts_each_split_in_its_folder_under_dest(tmp_path: Path) -> None:
    _write_output(tmp_path / "out", [("a", "val"), ("b", None)])
    dest = tmp_path / "exports" / "dest"
    assert export_pairs(str(tmp_path / "out"), "pix2pix", dest) == 2
    assert _files(tmp_path / "exports") == [
        "dest/train/b_v000_001.png",
        "dest/val/a_v000_001.png",
    ]
    assert decode_image((dest / "val" / "a_v000_001.png").read_bytes()).shape == (16, 32, 3)


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
    assert export_pairs(remote, "basicsr", tmp_path / "dest", storage_options=options) == 1
    assert seen and all(o == options for o in seen)  # the listing, the shard and both images
    assert _files(tmp_path / "dest") == ["GT/a_v000_001.png", "LQ/a_v000_001.png", "meta_info.txt"]
    fs.rm(remote.removeprefix("memory://"), recursive=True)
