"""Streaming manifest validation, id keys and worker-side planning (no Ray needed)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fundus_batch import manifest_stream as ms
from fundus_batch.manifest import ManifestError

BIG = ms.STREAM_ROWS + 5_000  # spans two streamed batches


def _parquet(path, ids, **extra) -> str:
    cols = {"image_id": ids, "uri": [f"/img/{i}.png" for i in range(len(ids))], **extra}
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_csv_with_bom_and_crlf_scans_with_string_passthrough(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("\ufeffimage_id,uri,grade\r\na,x.png,1\r\nb,y.png,\r\n".encode())
    scan = ms.scan_manifest(str(path))
    assert (scan.rows, scan.selected, scan.kind, scan.limited) == (2, 2, "csv", False)
    assert scan.passthrough == pa.schema([("grade", pa.string())])


def test_bad_row_in_a_later_batch_is_named_by_its_line_and_field(tmp_path):
    ids = [f"id{i}" for i in range(BIG)]
    ids[BIG - 3] = "../escape"
    path = _parquet(tmp_path / "m.parquet", ids)
    with pytest.raises(ManifestError, match=rf"row {BIG - 2}, field 'image_id'.*'\.\./escape'"):
        ms.scan_manifest(path)


def test_blank_uri_is_rejected_with_its_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("image_id,uri\na,x.png\nb,\n")
    with pytest.raises(ManifestError, match=r"row 2 \(line 3\), field 'uri'"):
        ms.scan_manifest(str(path))


@pytest.mark.parametrize(
    ("field", "second_row"), [("uri", "b, y.png,n.png"), ("mask_uri", "b,y.png,n.png ")]
)
def test_a_uri_with_surrounding_whitespace_is_refused_before_any_work(tmp_path, field, second_row):
    """A CSV written with ", " between fields: " y.png" names no file; every row would fail."""
    path = tmp_path / "m.csv"
    path.write_text(f"image_id,uri,mask_uri\na,x.png,m.png\n{second_row}\n")
    with pytest.raises(ManifestError, match=rf"row 2 \(line 3\), field '{field}'.*whitespace"):
        ms.scan_manifest(str(path))


def test_a_bad_csv_row_is_named_by_the_file_line_it_starts_on_past_blank_and_quoted_lines(
    tmp_path,
):
    path = tmp_path / "m.csv"
    path.write_text('image_id,uri,note\na,x.png,"two\nlines"\n\n\n-b,y.png,\n')
    with pytest.raises(ManifestError, match=r"row 2 \(line 6\), field 'image_id'.*'-b'"):
        ms.scan_manifest(str(path))


def test_a_csv_row_with_the_wrong_number_of_fields_is_named_by_its_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("image_id,uri\na,x.png\n\nb,y.png,extra\nc,z.png\n")
    with pytest.raises(ManifestError, match=r"line 4: expected 2 fields as in the header, found 3"):
        ms.scan_manifest(str(path))


def test_binary_text_columns_of_a_parquet_manifest_are_read_as_utf8_text(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({"image_id": [b"10_left", "\u00e9".encode()], "uri": [b"/i/a.png", b"/i/b.png"]}),
        path,
    )
    scan = ms.scan_manifest(str(path))
    assert ms.manifest_ids(str(path)) == ["10_left", "\u00e9"]
    [first, _] = ms.plan_batch(pq.read_table(path), ms.KeySet.of([]), scan.selected_ids, [0], [])
    assert (first["image_id"], first["source_uri"]) == ("10_left", "/i/a.png")


def test_binary_ids_that_are_not_utf8_are_refused_before_any_work(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image_id": [b"\xff\xfe"], "uri": [b"/i/a.png"]}), path)
    with pytest.raises(ManifestError, match="cannot parse"):
        ms.scan_manifest(str(path))


def test_duplicate_across_batches_names_both_lines(tmp_path):
    ids = [f"id{i}" for i in range(BIG)]
    ids[BIG - 1] = "id2"
    path = _parquet(tmp_path / "m.parquet", ids)
    with pytest.raises(ManifestError, match=rf"row {BIG}, field 'image_id'.*'id2'.*row 3\)"):
        ms.scan_manifest(path)


def test_the_duplicate_id_error_names_the_first_repeated_row_in_file_order(tmp_path):
    """Every id repeats; the first row that repeats an earlier one is row 5 ('q', first seen
    in row 2), whatever order the ids' keys sort in."""
    path = _parquet(tmp_path / "m.parquet", ["p", "q", "r", "s", "q", "p", "r", "s"])
    with pytest.raises(ManifestError, match=r"row 5, field 'image_id'.*'q'.*row 2\)"):
        ms.scan_manifest(path)


def test_internal_column_name_is_rejected_before_rows_are_read(tmp_path):
    path = _parquet(tmp_path / "m.parquet", ["a"], raw_bytes=[b"x"])
    with pytest.raises(ManifestError, match="raw_bytes"):
        ms.scan_manifest(path)


def test_empty_manifest_is_rejected(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("image_id,uri\n")
    with pytest.raises(ManifestError, match="no rows"):
        ms.scan_manifest(str(path))


def test_limit_selects_exactly_the_first_rows(tmp_path):
    ids = [f"id{i}" for i in range(10)]
    scan = ms.scan_manifest(_parquet(tmp_path / "m.parquet", ids, grade=list(range(10))), limit=3)
    assert (scan.rows, scan.selected, scan.limited) == (10, 3, True)
    assert scan.selected_ids.contains(ms.id_keys(ids)).tolist() == [True] * 3 + [False] * 7
    assert scan.passthrough == pa.schema([("grade", pa.int64())])


def test_pair_keys_differ_by_variant_and_match_across_calls():
    a = ms.pair_keys(["x", "x", "y"], [0, 1, -1])
    assert len(set(a.tolist())) == 3
    assert ms.pair_keys(["x"], [1])[0] == a[1]
    assert ms.KeySet.of([a]).contains(ms.pair_keys(["y", "y"], [-1, 0])).tolist() == [True, False]


def test_empty_keyset_contains_nothing():
    assert ms.KeySet.of([]).contains(ms.id_keys(["a"])).tolist() == [False]


def test_done_keys_count_only_selected_images_and_this_runs_variants(tmp_path):
    scan = ms.scan_manifest(_parquet(tmp_path / "m.parquet", ["a", "b", "c"]), limit=2)
    shard = pa.table(
        {
            "image_id": ["a", "a", "b", "c", "a"],
            "variant": pa.array([0, 1, 5, 0, None], pa.int32()),
        }
    )
    done, count = ms.done_keys(iter([shard]), scan, [0, 1])
    # a/0 and a/1 count; b/5 is not a variant of this run, c is outside the limit, a/-1 too.
    assert count == 2
    assert done.contains(ms.pair_keys(["a", "a", "c"], [0, 1, 0])).tolist() == [True, True, False]


def test_plan_batch_keeps_only_pending_variants_of_selected_images():
    batch = pa.table(
        {
            "image_id": ["a", "b", "c"],
            "uri": ["ua", "ub", "uc"],
            "split": ["train", None, None],
            "grade": [1, 2, 3],
        }
    )
    done = ms.KeySet.of([ms.pair_keys(["a", "b", "b"], [0, 0, 1])])
    selected = ms.KeySet.of([ms.id_keys(["a", "b"])])
    rows = ms.plan_batch(batch, done, selected, [0, 1], ["grade"])
    assert rows == [
        {
            "image_id": "a",
            "status": "ok",
            "source_uri": "ua",
            "split": "train",
            "source_mask_uri": None,
            "vessel_gt_uri": None,
            "pending_variants": [1],
            "grade": 1,
        }
    ]
    everything = ms.plan_batch(batch, ms.KeySet.of([]), None, [-1], [])
    assert [r["image_id"] for r in everything] == ["a", "b", "c"]
    assert all(r["pending_variants"] == [-1] for r in everything)


def test_id_keys_are_16_bytes_and_distinct_for_a_million_ids():
    keys = ms.id_keys([f"img{i:08d}" for i in range(1_000_000)])
    assert keys.dtype == np.dtype("S16")
    assert len(np.unique(keys)) == 1_000_000


@pytest.mark.parametrize("split", ["../../escaped_split", "/abs/dir", "a/b", "..", "-x"])
def test_unsafe_split_in_a_csv_manifest_is_named_by_row_line_and_field(tmp_path, split):
    path = tmp_path / "m.csv"
    path.write_text(f"image_id,uri,split\na,x.png,train\nb,y.png,{split}\n")
    with pytest.raises(ManifestError, match=r"row 2 \(line 3\), field 'split'.*unsafe split"):
        ms.scan_manifest(str(path))


def test_unsafe_split_in_a_later_parquet_batch_is_named_by_its_row(tmp_path):
    ids = [f"id{i}" for i in range(BIG)]
    splits = ["train"] * BIG
    splits[BIG - 1] = "../up"
    path = _parquet(tmp_path / "m.parquet", ids, split=splits)
    with pytest.raises(ManifestError, match=rf"row {BIG}, field 'split'.*'\.\./up'"):
        ms.scan_manifest(path)


def test_empty_and_plain_splits_pass_the_streaming_scan(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("image_id,uri,split\na,x.png,train\nb,y.png,\nc,z.png,val 2\n")
    assert ms.scan_manifest(str(path)).rows == 3


def _csv_with_a_line_break_across_the_block_boundary(path) -> int:
    """A CSV manifest whose quoted ``note`` value holds a line break just past pyarrow's 4 MiB
    block boundary, the text after it shaped like a row; returns its number of rows."""
    block = 4 << 20
    header, rows = "image_id,uri,note\n", []
    size = len(header)
    while size < block - 200:
        rows.append(f"id{len(rows):07d},/x/{len(rows):07d}.png,plain\n")
        size += len(rows[-1])
    start = f'id{len(rows):07d},/x/{len(rows):07d}.png,"'
    pad = "p" * (block - size - len(start) + 10)
    rows.append(f'{start}{pad}\nid9999999,/x/smuggled.png,x"\n')
    rows += [f"id{len(rows) + j:07d},/x/{len(rows) + j:07d}.png,plain\n" for j in range(5)]
    path.write_text(header + "".join(rows))
    return len(rows)


def test_a_line_break_in_a_quoted_value_across_a_block_boundary_stays_in_its_value(tmp_path):
    manifest = tmp_path / "m.csv"
    rows = _csv_with_a_line_break_across_the_block_boundary(manifest)
    assert ms.scan_manifest(str(manifest)).rows == rows
    ids = [i for b in ms.iter_batches(str(manifest)) for i in b.column("image_id").to_pylist()]
    assert len(ids) == rows and "id9999999" not in ids
    notes = [n for b in ms.iter_batches(str(manifest)) for n in b.column("note").to_pylist()]
    assert notes[rows - 6].endswith("\nid9999999,/x/smuggled.png,x")


def test_a_csv_whose_first_row_is_longer_than_128_kib_is_read(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image_id,uri,note\na,/x/a.png,{'j' * 140_000}\nb,/x/b.png,short\n")
    assert ms.csv_columns(str(manifest)) == ["image_id", "uri", "note"]
    assert ms.scan_manifest(str(manifest)).rows == 2


def test_a_numeric_split_with_a_missing_value_matches_the_splits_a_run_stored(tmp_path):
    manifest = tmp_path / "m.parquet"
    splits = pa.array([1.0, float("nan"), None], pa.float64())
    table = pa.table({"image_id": ["a", "b", "c"], "uri": ["a.png", "b.png", "c.png"]})
    pq.write_table(table.append_column("split", splits), manifest)
    scan = ms.scan_manifest(str(manifest))
    rows = ms.plan_batch(pq.read_table(manifest), ms.KeySet.of([]), None, [0], [])
    stored = pa.table(
        {"image_id": [r["image_id"] for r in rows], "split": [r["split"] for r in rows]}
    )
    ms.check_splits(scan, ms.stored_splits([stored]), None)  # the same splits: no clash
    moved = pa.table({"image_id": ["a", "b", "c"], "split": ["1.0", "val", None]})
    with pytest.raises(ManifestError, match="row 2, field 'split'"):
        ms.check_splits(scan, ms.stored_splits([moved]), None)


@pytest.mark.parametrize(
    ("column", "values", "kind"),
    [
        ("image_id", [True, False], "bool"),
        ("image_id", [["a"], ["b"]], "list<element: string>"),
        ("image_id", [1.0, 2.0], "double"),
        ("uri", [1, 2], "int64"),
        ("split", [["t"], ["v"]], "list<element: string>"),
    ],
)
def test_a_parquet_column_of_a_type_that_cannot_hold_it_is_refused(tmp_path, column, values, kind):
    data = {"image_id": ["a", "b"], "uri": ["a.png", "b.png"], column: values}
    pq.write_table(pa.table(data), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=f"column '{column}' of .* has type {kind}"):
        ms.scan_manifest(str(tmp_path / "m.parquet"))


def test_integer_ids_and_numeric_splits_of_a_parquet_manifest_are_accepted(tmp_path):
    import decimal

    splits = pa.array([decimal.Decimal("0.0"), decimal.Decimal("1.0")])
    data = {"image_id": [1, 2], "uri": ["a.png", "b.png"], "split": splits}
    pq.write_table(pa.table(data), tmp_path / "m.parquet")
    assert ms.scan_manifest(str(tmp_path / "m.parquet")).rows == 2


def test_categorical_columns_of_a_pandas_written_manifest_are_read_as_their_values(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({c: pd.Categorical(v) for c, v in CATEGORIES.items()})
    frame.to_parquet(tmp_path / "m.parquet")
    assert ms.scan_manifest(str(tmp_path / "m.parquet")).rows == 2
    rows = ms.plan_batch(pq.read_table(tmp_path / "m.parquet"), ms.KeySet.of([]), None, [0], [])
    assert [(r["image_id"], r["source_uri"], r["split"]) for r in rows] == [
        ("a", "a.png", "train"),
        ("b", "b.png", "val"),
    ]


CATEGORIES = {"image_id": ["a", "b"], "uri": ["a.png", "b.png"], "split": ["train", "val"]}
