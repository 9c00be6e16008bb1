"""Manifests of any size: a streaming validation pass and compact id keys.

The driver never holds a whole manifest. :func:`scan_manifest` streams the file in Arrow record
batches (pyarrow's CSV and Parquet streaming readers), validates every row with
:func:`fundus_batch.manifest.check_row` and keeps only a 16-byte key per image id (for the
duplicate check and for ``--limit``). Ray Data then reads the same file on the workers
(see ``pipeline.build_manifest_dataset``), where done (image, variant) pairs are filtered with a
:class:`KeySet` broadcast through the object store.
"""

from __future__ import annotations

import csv
import io
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from fundus_batch.io import storage
from fundus_batch.manifest import (
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    ManifestError,
    check_columns,
    check_row,
)
from fundus_batch.schema import STATUS_OK

# Two independent 64-bit SipHash keys (pandas.util.hash_array wants 16 characters each).
_KEY_A = "fundus-batch-id1"
_KEY_B = "fundus-batch-id2"
_KEY_DTYPE = "S16"
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
STREAM_ROWS = 65_536


def _hashes(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    arr = np.asarray(ids, dtype=object)
    out = np.empty((len(arr), 2), dtype=">u8")
    if len(arr):
        out[:, 0] = pd.util.hash_array(arr, hash_key=_KEY_A, categorize=False)
        out[:, 1] = pd.util.hash_array(arr, hash_key=_KEY_B, categorize=False)
    return out


def _as_keys(halves: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(halves).view(_KEY_DTYPE).ravel()


def id_keys(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """128-bit keys (``S16``) of image ids; equal ids give equal keys in every process."""
    return _as_keys(_hashes(ids))


def pair_keys(ids: Sequence[str] | np.ndarray, variants: Sequence[int] | np.ndarray) -> np.ndarray:
    """128-bit keys of (image_id, variant) pairs (variant -1 for a clean-only row)."""
    halves = _hashes(ids)
    v = np.asarray(variants, dtype=np.int64).astype(np.uint64) + np.uint64(2)
    with np.errstate(over="ignore"):
        mixed = v * _GOLDEN
        mixed ^= mixed >> np.uint64(29)
    halves[:, 1] ^= mixed.astype(">u8")
    return _as_keys(halves)


@dataclass(frozen=True)
class KeySet:
    """A sorted array of 16-byte keys: compact to ship to workers, fast to test against."""

    keys: np.ndarray

    @classmethod
    def of(cls, parts: Sequence[np.ndarray]) -> KeySet:
        if not parts:
            return cls(np.empty(0, dtype=_KEY_DTYPE))
        return cls(np.unique(np.concatenate(parts).astype(_KEY_DTYPE)))

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, queries: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``queries`` are in the set."""
        if len(self.keys) == 0 or len(queries) == 0:
            return np.zeros(len(queries), dtype=bool)
        idx = np.searchsorted(self.keys, queries)
        hit = idx < len(self.keys)
        idx[~hit] = 0
        return hit & (self.keys[idx] == queries)


@dataclass(frozen=True)
class ManifestScan:
    """What the driver keeps of a validated manifest: its shape, not its rows."""

    uri: str
    source: str  # the URI, redacted, for messages
    kind: str  # "csv" or "parquet"
    columns: tuple[str, ...]
    passthrough: pa.Schema
    rows: int  # data rows in the file
    selected: int  # rows this run covers (the first ``limit``, or all)
    selected_ids: KeySet  # keys of the selected rows' image ids
    vessel_rows: int = 0  # selected rows with a vessel_uri

    @property
    def limited(self) -> bool:
        """Whether ``--limit`` leaves rows of the file out of this run."""
        return self.selected < self.rows


def manifest_kind(uri: str) -> str:
    """ "parquet" or "csv", by the extension of the path (a URL's query string aside)."""
    path = uri.split("?", 1)[0] if "://" in uri else uri
    return "parquet" if path.lower().endswith((".parquet", ".pq")) else "csv"


def csv_convert_options(columns: Sequence[str]) -> pacsv.ConvertOptions:
    """Every CSV column as a string; an empty field is null (as the pandas reader did)."""
    return pacsv.ConvertOptions(
        column_types={c: pa.string() for c in columns},
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=True,
    )


# The manifest's own columns, read as text whatever type the file stores them as.
TEXT_COLUMNS = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)


def text_columns(table: Any) -> Any:
    """``table`` (a Table or RecordBatch) with its :data:`TEXT_COLUMNS` stored as binary (some
    Parquet writers store strings so) cast to strings; invalid UTF-8 raises ``ArrowInvalid``."""
    for name in TEXT_COLUMNS:
        if name not in table.schema.names:
            continue
        i = table.schema.get_field_index(name)
        kind = table.schema.field(i).type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            column = table.column(i).cast(pa.string())
            table = table.set_column(i, pa.field(name, pa.string()), column)
    return table


def _open(uri: str, storage_options: dict | None) -> Any:
    fs, path = storage.filesystem(uri, storage_options)
    if isinstance(fs, LocalFileSystem) and os.path.exists(path):
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"{storage.redact(uri)} is a folder, not a file")
        if not stat.S_ISREG(mode):  # a FIFO would block the driver
            raise OSError(f"{storage.redact(uri)} is not a regular file")
    return fs.open(path, "rb")


CSV_READ_OPTIONS = pacsv.ReadOptions(block_size=4 << 20)
"""How every reader of a CSV manifest reads it: blocks of 4 MiB (a row may be that long)."""
CSV_PARSE_OPTIONS = pacsv.ParseOptions(newlines_in_values=True)
"""A quoted value may hold line breaks (a note, a JSON column): without this, a value that
crosses a block boundary is cut there and its rest read as a row of its own."""


def csv_columns(uri: str, storage_options: dict | None = None) -> list[str]:
    """The header of a CSV manifest."""
    with _open(uri, storage_options) as f:
        reader = pacsv.open_csv(
            f,
            convert_options=pacsv.ConvertOptions(column_types={}, strings_can_be_null=True),
            read_options=CSV_READ_OPTIONS,
            parse_options=CSV_PARSE_OPTIONS,
        )
        return list(reader.schema.names)


def iter_batches(
    uri: str, storage_options: dict | None = None, columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream a manifest as record batches (CSV columns all strings), never all of it at once."""
    if manifest_kind(uri) == "parquet":
        with _open(uri, storage_options) as f:
            pf = pq.ParquetFile(f)
            for parquet_batch in pf.iter_batches(batch_size=STREAM_ROWS, columns=columns):
                yield text_columns(parquet_batch)
        return
    names = csv_columns(uri, storage_options)
    with _open(uri, storage_options) as f:
        reader = pacsv.open_csv(
            f,
            convert_options=csv_convert_options(names),
            read_options=CSV_READ_OPTIONS,
            parse_options=CSV_PARSE_OPTIONS,
        )
        for batch in reader:
            yield batch.select(list(columns)) if columns is not None else batch


def _schema(uri: str, storage_options: dict | None) -> pa.Schema:
    if manifest_kind(uri) == "parquet":
        with _open(uri, storage_options) as f:
            return pq.ParquetFile(f).schema_arrow
    return pa.schema([(c, pa.string()) for c in csv_columns(uri, storage_options)])


def _column(batch: pa.RecordBatch, name: str) -> list[Any]:
    if name not in batch.schema.names:
        return [None] * batch.num_rows
    return batch.column(name).to_pylist()


def scan_manifest(
    uri: str, *, storage_options: dict | None = None, limit: int | None = None
) -> ManifestScan:
    """Validate a CSV or Parquet manifest in one streaming pass; the first bad row raises a
    :class:`ManifestError` naming its line and field, before any work starts."""
    source = storage.redact(uri)
    try:
        schema = _schema(uri, storage_options)
    except FileNotFoundError as exc:
        raise ManifestError(f"cannot read {source}: file not found") from exc
    except OSError as exc:
        raise ManifestError(f"cannot read {source}: {storage.redact(str(exc))}") from exc
    except Exception as exc:
        raise _parse_error(uri, storage_options, source, exc) from exc
    try:
        return _scan(uri, source, schema, storage_options, limit)
    except ManifestError as exc:
        if exc.row is None or exc.line is not None or manifest_kind(uri) != "csv":
            raise
        raise exc.at_line(_csv_line_of_row(uri, storage_options, exc.row)) from None


_TEXT_TYPES = ("string", "large_string", "string_view", "binary", "large_binary")


def _is_text(kind: pa.DataType) -> bool:
    """Whether a column of ``kind`` holds strings (or bytes read as UTF-8)."""
    return any(getattr(pa.types, f"is_{name}", lambda _: False)(kind) for name in _TEXT_TYPES)


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)


def _check_column_types(schema: pa.Schema, source: str) -> None:
    """Refuse a Parquet manifest column whose type cannot hold what it names: ``image_id`` as
    text or integers, the URIs as text, ``split`` as text or numbers (a list, a timestamp or a
    bool would pass as its printed form)."""
    allowed: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
        "image_id": (lambda t: _is_text(t) or pa.types.is_integer(t), "text or integers"),
        "uri": (_is_text, "text"),
        "mask_uri": (_is_text, "text"),
        "vessel_uri": (_is_text, "text"),
        "split": (lambda t: _is_text(t) or _is_number(t), "text or numbers"),
    }
    for name, (ok, what) in allowed.items():
        if name in schema.names:
            kind = schema.field(name).type
            if pa.types.is_dictionary(kind):  # pandas' Categorical: judged by its values
                kind = kind.value_type
            if not ok(kind) and not pa.types.is_null(kind):
                raise ManifestError(
                    f"column '{name}' of {source} has type {kind}: it must hold {what}",
                    field=name,
                )


def _scan(
    uri: str, source: str, schema: pa.Schema, storage_options: dict | None, limit: int | None
) -> ManifestScan:
    columns = list(schema.names)
    if len(set(columns)) != len(columns):
        dup = next(c for c in columns if columns.count(c) > 1)
        raise ManifestError(f"column '{dup}' appears more than once in {source}", field=dup)
    check_columns(list(columns), source)
    _check_column_types(schema, source)
    wanted = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in columns]
    keys: list[np.ndarray] = []
    rows = vessel_rows = 0
    try:
        for batch in iter_batches(uri, storage_options, wanted):
            ids = _column(batch, "image_id")
            vessels = _column(batch, "vessel_uri")
            in_limit = (
                batch.num_rows if limit is None else max(0, min(batch.num_rows, limit - rows))
            )
            vessel_rows += sum(1 for v in vessels[:in_limit] if v)
            checked = [
                check_row(rows + i + 1, image_id, u, m, v, s)
                for i, (image_id, u, m, v, s) in enumerate(
                    zip(
                        ids,
                        _column(batch, "uri"),
                        _column(batch, "mask_uri"),
                        vessels,
                        _column(batch, "split"),
                        strict=True,
                    )
                )
            ]
            keys.append(id_keys(checked))
            rows += batch.num_rows
    except ManifestError:
        raise
    except Exception as exc:
        raise _parse_error(uri, storage_options, source, exc) from exc
    if rows == 0:
        raise ManifestError(f"{source} has no rows")
    all_keys = np.concatenate(keys)
    del keys
    _check_duplicates(uri, storage_options, all_keys)
    selected = rows if limit is None else min(limit, rows)
    selected_ids = KeySet.of([all_keys[:selected]])
    del all_keys
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    passthrough = pa.schema([schema.field(c) for c in columns if c not in known])
    return ManifestScan(
        uri=uri,
        source=source,
        kind=manifest_kind(uri),
        columns=tuple(columns),
        passthrough=passthrough,
        rows=rows,
        selected=selected,
        selected_ids=selected_ids,
        vessel_rows=vessel_rows,
    )


def _check_duplicates(uri: str, storage_options: dict | None, keys: np.ndarray) -> None:
    """Raise for the first row (in file order) whose image_id an earlier row already has."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    repeats = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1
    if len(repeats) == 0:
        return
    # The stable sort keeps equal keys in file order, so order[r] is a later occurrence.
    later = order[repeats]
    pick = int(np.argmin(later))
    row_index = int(later[pick])
    start = int(repeats[pick])
    while start > 0 and ordered[start - 1] == ordered[repeats[pick]]:
        start -= 1
    first_index = int(order[start])
    image_id = _id_at(uri, storage_options, row_index)
    raise ManifestError(
        f"duplicate image_id {image_id!r} (first seen in row {first_index + 1})",
        row=row_index + 1,
        field="image_id",
    )


def _parse_error(
    uri: str, storage_options: dict | None, source: str, exc: Exception
) -> ManifestError:
    """A file the reader cannot parse; for a CSV file whose rows do not all have the header's
    number of fields, the line of the first such row."""
    if isinstance(exc, pa.ArrowInvalid) and manifest_kind(uri) == "csv":
        bad = _csv_bad_record(uri, storage_options)
        if bad is not None:
            line, expected, got = bad
            return ManifestError(
                f"expected {expected} fields as in the header, found {got}", line=line
            )
    if isinstance(exc, storage.MissingBackendError):
        return ManifestError(f"cannot read {source}: {exc}")
    return ManifestError(f"cannot parse {source}: {storage.redact(str(exc))}")


def _csv_records(uri: str, storage_options: dict | None) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each non-blank record of a CSV file, the header included; a
    quoted field may span lines. Only for error messages: it reads the file once more."""
    with _open(uri, storage_options) as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")
        reader = csv.reader(text)
        line = 1
        for fields in reader:
            if fields:  # the CSV readers skip blank lines
                yield line, fields
            line = reader.line_num + 1


def _csv_line_of_row(uri: str, storage_options: dict | None, row: int) -> int | None:
    """The file line where data row ``row`` (1-based) of a CSV manifest starts."""
    try:
        for index, (line, _) in enumerate(_csv_records(uri, storage_options)):
            if index == row:  # record 0 is the header
                return line
    except (OSError, csv.Error):
        pass
    return None


def _csv_bad_record(uri: str, storage_options: dict | None) -> tuple[int, int, int] | None:
    """(line, fields expected, fields found) of the first record whose field count differs
    from the header's, or None."""
    expected = None
    try:
        for line, fields in _csv_records(uri, storage_options):
            if expected is None:
                expected = len(fields)
            elif len(fields) != expected:
                return line, expected, len(fields)
    except (OSError, csv.Error):
        pass
    return None


def manifest_ids(
    uri: str, storage_options: dict | None = None, limit: int | None = None
) -> list[str]:
    """The image ids of a manifest in file order (the first ``limit``), read as the run reads
    them; validate it with :func:`scan_manifest` first."""
    ids: list[str] = []
    for batch in iter_batches(uri, storage_options, ["image_id"]):
        ids.extend(str(x) for x in batch.column(0).to_pylist())
        if limit is not None and len(ids) >= limit:
            return ids[:limit]
    return ids


def _id_at(uri: str, storage_options: dict | None, index: int) -> str:
    seen = 0
    for batch in iter_batches(uri, storage_options, ["image_id"]):
        if index < seen + batch.num_rows:
            return str(batch.column(0)[index - seen].as_py())
        seen += batch.num_rows
    raise IndexError(index)


def done_keys(
    tables: Iterator[pa.Table], scan: ManifestScan, variants: list[int]
) -> tuple[KeySet, int]:
    """Keys of the committed (image_id, variant) pairs that this run would otherwise redo, and
    their number; ``tables`` are the output shards (``image_id`` and ``variant`` columns), read
    one at a time. ``variants`` are this run's variants ([-1] for clean-only rows)."""
    parts: list[np.ndarray] = []
    for table in tables:
        if table.num_rows == 0:
            continue
        keep = in_run(table, scan, variants)
        if keep.any():
            ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
            parts.append(pair_keys(ids[keep], _variants(table)[keep]))
    done = KeySet.of(parts)
    return done, len(done)


def split_keys(ids: Sequence[str] | np.ndarray, splits: Sequence[Any]) -> np.ndarray:
    """128-bit keys of (image_id, split) pairs; a missing split counts as the empty one."""
    return id_keys([f"{i}\0{'' if s is None else s}" for i, s in zip(ids, splits, strict=True)])


@dataclass(frozen=True)
class StoredSplits:
    """The images OUT holds rows of, and each with the split its rows carry (as keys)."""

    ids: KeySet
    pairs: KeySet


def stored_splits(tables: Iterable[pa.Table]) -> StoredSplits:
    """The images that output tables (``image_id`` and ``split`` columns) hold rows of, and
    each one's split; each table's distinct pairs only (the variants of an image repeat it)."""
    ids: list[np.ndarray] = []
    pairs: list[np.ndarray] = []
    for table in tables:
        distinct = table.select(["image_id", "split"]).group_by(["image_id", "split"]).aggregate([])
        names = distinct.column("image_id").to_pylist()
        ids.append(id_keys(names))
        pairs.append(split_keys(names, distinct.column("split").to_pylist()))
    return StoredSplits(KeySet.of(ids), KeySet.of(pairs))


def check_splits(scan: ManifestScan, stored: StoredSplits, storage_options: dict | None) -> None:
    """Raise :class:`ManifestError` for the first row of this run whose image OUT already holds
    under another split: its new rows would put one photograph in two splits (a validation
    image trained on). One pass over the manifest's ``image_id`` and ``split`` columns."""
    if len(stored.ids) == 0:
        return
    wanted = ["image_id", *(["split"] if "split" in scan.columns else [])]
    row = 0
    for batch in iter_batches(scan.uri, storage_options, wanted):
        ids = [str(x) for x in batch.column("image_id").to_pylist()]
        splits = [_text(s) for s in _column(batch, "split")]  # as plan_batch stores them
        keys = id_keys(ids)
        clash = (
            scan.selected_ids.contains(keys)
            & stored.ids.contains(keys)
            & ~stored.pairs.contains(split_keys(ids, splits))
        )
        if clash.any():
            i = int(np.flatnonzero(clash)[0])
            new = "no split" if splits[i] is None else f"split {splits[i]!r}"
            error = ManifestError(
                f"image {ids[i]!r} has rows in OUT under another split, and this manifest gives "
                f"it {new}: one photograph in two splits would leak between them (give it its "
                "recorded split, or write to another OUT)",
                row=row + i + 1,
                field="split",
            )
            if scan.kind == "csv":
                error = error.at_line(_csv_line_of_row(scan.uri, storage_options, row + i + 1))
            raise error
        row += batch.num_rows


def _variants(table: pa.Table) -> np.ndarray:
    raw = table.column("variant").to_pylist()
    return np.asarray([-1 if x is None else int(x) for x in raw], dtype=np.int64)


def table_keys(table: pa.Table) -> np.ndarray:
    """Pair keys of the rows of an output table (``image_id`` and ``variant`` columns)."""
    return pair_keys(table.column("image_id").to_pylist(), _variants(table))


def in_run(table: pa.Table, scan: ManifestScan, variants: list[int]) -> np.ndarray:
    """Which rows of an output table (``image_id`` and ``variant`` columns) are (image,
    variant) pairs this run covers: an image it selected, one of its variants."""
    if table.num_rows == 0:
        return np.zeros(0, dtype=bool)
    wanted = np.asarray(variants, dtype=np.int64)
    ids = table.column("image_id").to_pylist()
    return np.isin(_variants(table), wanted) & scan.selected_ids.contains(id_keys(ids))


def plan_batch(
    batch: pa.Table,
    done: KeySet,
    selected: KeySet | None,
    variants: list[int],
    passthrough: Sequence[str],
) -> list[dict[str, Any]]:
    """Work rows for one batch of manifest rows: each image with its variants still to do;
    images outside ``selected`` (``--limit``) or with nothing left are dropped."""
    n = batch.num_rows
    if n == 0:
        return []
    batch = text_columns(batch)
    ids = [str(x) for x in batch.column("image_id").to_pylist()]
    id_arr = np.asarray(ids, dtype=object)
    keep = np.ones(n, dtype=bool)
    if selected is not None:
        keep &= selected.contains(id_keys(ids))
    pending = np.ones((n, len(variants)), dtype=bool)
    for j, v in enumerate(variants):
        pending[:, j] = ~done.contains(pair_keys(id_arr, np.full(n, v, dtype=np.int64)))
    keep &= pending.any(axis=1)
    if not keep.any():
        return []
    names = batch.column_names

    def col(name: str) -> list[Any]:
        return batch.column(name).to_pylist() if name in names else [None] * n

    uris, splits, masks, vessels = col("uri"), col("split"), col("mask_uri"), col("vessel_uri")
    extra = {c: col(c) for c in passthrough}
    rows: list[dict[str, Any]] = []
    for i in np.flatnonzero(keep):
        row: dict[str, Any] = {
            "image_id": ids[i],
            "status": STATUS_OK,
            "source_uri": str(uris[i]),
            "split": _text(splits[i]),
            "source_mask_uri": _text(masks[i]),
            "vessel_gt_uri": _text(vessels[i]),
            "pending_variants": [v for j, v in enumerate(variants) if pending[i, j]],
        }
        for c, values in extra.items():
            row[c] = values[i]
        rows.append(row)
    return rows


def _text(value: object) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return str(value)
