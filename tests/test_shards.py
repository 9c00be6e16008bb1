"""fundus_batch.shards: listing and reading the Parquet shards of an output folder, on local
disk and on S3 (moto)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fundus_batch import shards
from fundus_batch.output import OutputStore, ShardWriter
from fundus_batch.schema import output_schema, to_table


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _old_shard() -> pa.Table:
    """A shard from before the ``split`` column existed; its metric column is all null."""
    return pa.table(
        {
            "image_id": ["a", "b"],
            "variant": pa.array([0, 1], pa.int32()),
            "psnr_degraded": pa.nulls(2, pa.null()),
        }
    )


def _new_shard() -> pa.Table:
    return pa.table(
        {
            "image_id": ["c"],
            "variant": pa.array([0], pa.int64()),
            "psnr_degraded": pa.array([21.5], pa.float64()),
            "split": ["val"],
        }
    )


@pytest.fixture
def out(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    _write(root / "pairs" / "part-b.parquet", _new_shard())
    _write(root / "pairs" / "part-a.parquet", _old_shard())
    return root


def test_only_committed_shards_are_listed_in_name_order(out: Path) -> None:
    pairs = out / "pairs"
    (pairs / ".part-c.parquet.0123abcd.tmp").write_bytes(b"half a shard")
    (pairs / ".part-d.parquet.corrupt").write_bytes(b"quarantined")
    (pairs / "part-e.parquet.corrupt").write_bytes(b"quarantined by 0.1")
    (pairs / ".hidden.parquet").write_bytes(b"not a shard")
    (pairs / "notes.txt").write_text("not a shard")
    (pairs / "folder.parquet").mkdir()
    assert shards.shard_paths(str(out)) == [
        str(pairs / "part-a.parquet"),
        str(pairs / "part-b.parquet"),
    ]
    assert shards.list_stale(str(pairs)) == [str(pairs / ".part-c.parquet.0123abcd.tmp")]


def test_the_output_root_and_its_pairs_folder_read_the_same(out: Path) -> None:
    pairs = str(out / "pairs")
    assert shards.shard_paths(pairs) == shards.shard_paths(str(out))
    assert shards.shard_paths(pairs + "/") == shards.shard_paths(str(out))
    assert shards.output_root(pairs) == str(out)
    assert shards.output_root(str(out)) == str(out)
    by_root = shards.read_table(str(out))
    by_pairs = shards.read_table(pairs)
    assert by_root is not None and by_pairs is not None and by_root.equals(by_pairs)


def test_an_output_root_named_pairs_uses_its_own_pairs_folder(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    _write(root / "pairs" / "part-0.parquet", _new_shard())
    assert shards.shard_paths(str(root)) == [str(root / "pairs" / "part-0.parquet")]
    assert shards.output_root(str(root)) == str(root)


def test_a_folder_without_shards_reads_as_none(tmp_path: Path) -> None:
    assert shards.shard_paths(str(tmp_path / "missing")) == []
    assert shards.read_table(str(tmp_path / "missing")) is None
    assert shards.read_frame(str(tmp_path)) is None
    assert list(shards.iter_tables(str(tmp_path))) == []


def test_requested_columns_are_read_where_present_in_the_order_asked(out: Path) -> None:
    old = out / "pairs" / "part-a.parquet"
    assert shards.read_shard(str(old), ["split", "image_id"]).column_names == ["image_id"]
    table = shards.read_table(str(out), ["split", "image_id", "never_written"])
    assert table is not None
    assert table.column_names == ["split", "image_id"]
    assert table.column("split").to_pylist() == [None, None, "val"]
    assert table.column("image_id").to_pylist() == ["a", "b", "c"]


def test_exclude_drops_columns_from_every_shard(out: Path) -> None:
    table = shards.read_table(str(out), exclude={"psnr_degraded", "split"})
    assert table is not None and table.column_names == ["image_id", "variant"]


def test_shards_concatenate_with_promoted_types(out: Path) -> None:
    frame = shards.read_frame(str(out))
    assert frame is not None and len(frame) == 3
    table = shards.read_table(str(out))
    assert table is not None
    assert table.schema.field("variant").type == pa.int64()
    assert table.schema.field("psnr_degraded").type == pa.float64()
    assert table.column("psnr_degraded").to_pylist() == [None, None, 21.5]
    assert [t.num_rows for t in shards.iter_tables(str(out))] == [2, 1]


def test_shard_schema_matches_the_written_schema(out: Path, monkeypatch: Any) -> None:
    path = str(out / "pairs" / "part-b.parquet")
    assert shards.shard_schema(path).names == _new_shard().schema.names
    monkeypatch.setattr(shards, "_TAIL_BYTES", 16)  # the footer no longer fits the first read
    assert shards.shard_schema(path).names == _new_shard().schema.names


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_an_unparsable_shard_raises_corrupt_shard_error_naming_it(out: Path, damage: str) -> None:
    path = out / "pairs" / "part-b.parquet"
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"x" * 64, "empty": b""}[damage]
    )
    for read in (shards.read_shard, shards.shard_schema):
        with pytest.raises(shards.CorruptShardError, match=re.escape(str(path))) as caught:
            read(str(path))
        assert isinstance(caught.value, OSError) and caught.value.path == str(path)
    with pytest.raises(shards.CorruptShardError, match=re.escape(str(path))):
        shards.read_table(str(out))


def test_a_shard_removed_after_listing_is_not_called_corrupt(out: Path) -> None:
    path = out / "pairs" / "part-a.parquet"
    path.unlink()
    with pytest.raises(FileNotFoundError):
        shards.read_shard(str(path))


def test_output_store_reads_through_the_shard_reader(out: Path) -> None:
    store = OutputStore(str(out))
    assert store.shard_paths() == shards.shard_paths(str(out))
    expected = shards.read_table(str(out), ["image_id"])
    got = store.read_table(["image_id"])
    assert expected is not None and got is not None and got.equals(expected)


# ------------------------------------------------------------------------------ S3 (moto)


def _s3_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "image_id": f"img{i}",
            "variant": 0,
            "status": "ok" if i % 2 == 0 else "failed",
            "failed_stage": None if i % 2 == 0 else "fetch",
            "split": "train",
        }
        for i in range(n)
    ]


def test_s3_round_trip_through_the_shard_writer(s3_server: dict[str, Any], s3_bucket: str) -> None:
    options = s3_server["storage_options"]
    out = f"s3://{s3_bucket}/run/out"
    store = OutputStore(out, options, retries=0)
    writer = ShardWriter(store, output_schema(), shard_rows=3)
    rows = _s3_rows(5)
    writer.add(to_table(rows, output_schema()))
    writer.close()
    paths = shards.shard_paths(out, options, retries=0)
    assert len(paths) == 2 and all(p.startswith(f"{out}/pairs/part-") for p in paths)
    assert paths == shards.shard_paths(out + "/pairs", options, retries=0) == writer.shards
    assert shards.output_root(out + "/pairs", options) == out
    table = shards.read_table(out, ["image_id", "status", "no_such_column"], options)
    assert table is not None and table.column_names == ["image_id", "status"]
    assert table.column("image_id").to_pylist() == [r["image_id"] for r in rows]
    frame = shards.read_frame(out + "/pairs", ["status"], options)
    assert frame is not None and list(frame["status"]) == [r["status"] for r in rows]
    assert shards.shard_schema(paths[0], options).names == output_schema().names


def test_s3_corrupt_shard_is_named_and_quarantined(
    s3_server: dict[str, Any], s3_bucket: str
) -> None:
    import fsspec

    options = s3_server["storage_options"]
    out = f"s3://{s3_bucket}/out"
    fs = fsspec.filesystem("s3", **options)
    good = io.BytesIO()
    pq.write_table(to_table(_s3_rows(2), output_schema()), good)
    fs.pipe(f"{s3_bucket}/out/pairs/part-0.parquet", good.getvalue())
    fs.pipe(f"{s3_bucket}/out/pairs/part-1.parquet", good.getvalue()[:100])
    bad = f"{out}/pairs/part-1.parquet"
    with pytest.raises(shards.CorruptShardError, match=re.escape(bad)):
        shards.read_table(out, storage_options=options, retries=0)
    with pytest.raises(shards.CorruptShardError, match=re.escape(bad)):  # footer only
        shards.read_table(out, ["image_id"], storage_options=options, retries=0)
    store = OutputStore(out, options, retries=0)
    assert store.quarantine_corrupt() == [bad]
    assert shards.shard_paths(out, options) == [f"{out}/pairs/part-0.parquet"]
    assert fs.exists(f"{s3_bucket}/out/pairs/.part-1.parquet.corrupt")


# ------------------------------------------------------------------------------ object stores


def test_columns_asked_of_a_remote_shard_fetch_only_their_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume or a report on an object store reads a few columns of every shard: the bulky
    ``params_json`` must not cross the network."""
    import os

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    n = 2000
    bulky = [os.urandom(400).hex() for _ in range(n)]  # incompressible, as records nearly are
    table = pa.table({"image_id": [f"img{i}" for i in range(n)], "params_json": bulky})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    root = f"memory://shards-{tmp_path.name}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{root.removeprefix('memory://')}/pairs/part-0.parquet", buf.getvalue())
    fetched: list[int] = []
    real = MemoryFileSystem.cat_file

    def counted(self: Any, path: str, start: Any = None, end: Any = None, **kw: Any) -> bytes:
        data = real(self, path, start, end, **kw)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(MemoryFileSystem, "cat_file", counted)
    [path] = shards.shard_paths(root)
    ids = shards.read_shard(path, ["image_id", "no_such_column"])
    assert (
        ids.column_names == ["image_id"]
        and ids.column(0).to_pylist() == table["image_id"].to_pylist()
    )
    assert 0 < sum(fetched) < len(buf.getvalue()) / 10, (sum(fetched), len(buf.getvalue()))
    assert shards.read_shard(path).equals(table)  # all columns: the whole shard
    fs.rm(root.removeprefix("memory://"), recursive=True)


def test_one_column_name_given_as_a_string_is_refused(tmp_path: Path) -> None:
    """A string is a sequence of one-letter names: the result was an empty table that reads
    as an empty folder."""
    _write(tmp_path / "out" / "pairs" / "part-0.parquet", _new_shard())
    with pytest.raises(TypeError, match="got the string 'image_id'"):
        shards.read_frame(str(tmp_path / "out"), "image_id")  # type: ignore[arg-type]
    frame = shards.read_frame(str(tmp_path / "out"), ["image_id"])
    assert frame is not None and frame["image_id"].tolist() == ["c"]
