"""The one reader of the pipeline's Parquet shards, on any fsspec filesystem.

A shard is a committed ``OUT/pairs/*.parquet`` file; temporary (``*.tmp``), hidden (``.*``)
and quarantined (``.*.corrupt``, hidden so that pyarrow and pandas skip them when they read
the folder) files are never shards. Every function that takes ``out``
accepts the output root or its ``pairs/`` folder, as a local path or a URL (``s3://``,
``gs://``, ``az://``, ``memory://``), with fsspec ``storage_options``. Shard paths are
returned as URIs in the style of ``out`` (local paths stay paths), so they can be handed back
to :func:`read_shard` as they are.

Columns: ``columns`` names the columns wanted; each shard returns those of them it has, in the
order asked (older shards may lack newer columns). Concatenated tables fill a column that
some shards lack with nulls; a column that no shard has is absent from the result, so callers
test ``name in table.column_names``. ``exclude`` drops columns by name (bulky ones).
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Collection, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.parquet import open_parquet_file

from fundus_batch.io import storage

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "PAIRS_DIR",
    "CorruptShardError",
    "concat_tables",
    "iter_tables",
    "list_shards",
    "list_stale",
    "list_visible_set_aside",
    "output_root",
    "pairs_dir",
    "read_frame",
    "read_shard",
    "read_table",
    "set_aside_uri",
    "shard_paths",
    "shard_schema",
]

PAIRS_DIR = "pairs"
SHARD_SUFFIX = ".parquet"
STALE_SUFFIX = ".tmp"
QUARANTINE_SUFFIX = ".corrupt"
_TAIL_BYTES = 64 * 1024  # one read holds the footer of any shard the pipeline writes


class CorruptShardError(OSError):
    """A committed shard whose bytes do not parse as Parquet; the message names the shard."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"shard {storage.redact(path)} cannot be read: {reason}")
        self.path = path
        self.reason = reason


def _basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _parent(uri: str) -> str:
    uri = uri.rstrip("/")
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{rest.rsplit('/', 1)[0]}" if "/" in rest else uri
    return posixpath.dirname(uri) or "."


def pairs_dir(
    out: str,
    storage_options: dict[str, Any] | None = None,
    *,
    retries: int = storage.DEFAULT_RETRIES,
) -> str:
    """The folder holding the shards of ``out``: ``out/pairs``, or ``out`` itself when it is
    named ``pairs`` and has no ``pairs/`` folder of its own."""
    if not isinstance(out, str) or not out.strip("/"):
        raise ValueError(f"output folder must be a non-empty path or URL, got {out!r}")
    base = out.rstrip("/")
    nested = storage.join(base, PAIRS_DIR)
    if _basename(base) != PAIRS_DIR:
        return nested
    fs, path = storage.filesystem(nested, storage_options)
    is_dir = storage.with_retries("checking", nested, lambda: fs.isdir(path), retries=retries)
    return nested if is_dir else base


def output_root(
    out: str,
    storage_options: dict[str, Any] | None = None,
    *,
    retries: int = storage.DEFAULT_RETRIES,
) -> str:
    """The output root (the folder holding ``pairs/``) that row URIs are relative to."""
    return _parent(pairs_dir(out, storage_options, retries=retries))


def _files(folder: str, storage_options: dict[str, Any] | None, retries: int) -> list[str]:
    """Names of the plain files directly in ``folder`` (none when it does not exist)."""
    fs, path = storage.filesystem(folder, storage_options)

    def ls() -> list[dict[str, Any]]:
        fs.invalidate_cache(path)  # object-store listings are cached by fsspec
        try:
            return list(fs.ls(path, detail=True))
        except FileNotFoundError:
            return []

    entries = storage.with_retries("listing", folder, ls, retries=retries)
    return [_basename(e["name"]) for e in entries if e.get("type") == "file"]


def list_shards(
    folder: str,
    storage_options: dict[str, Any] | None = None,
    *,
    retries: int = storage.DEFAULT_RETRIES,
) -> list[str]:
    """URIs of the committed shards directly in ``folder`` (a ``pairs/`` folder), sorted."""
    names = _files(folder, storage_options, retries)
    shards = (n for n in names if n.endswith(SHARD_SUFFIX) and not n.startswith("."))
    return [storage.join(folder, n) for n in sorted(shards)]


def list_stale(
    folder: str,
    storage_options: dict[str, Any] | None = None,
    *,
    retries: int = storage.DEFAULT_RETRIES,
) -> list[str]:
    """URIs of temporary files a killed writer left in ``folder``, sorted."""
    names = _files(folder, storage_options, retries)
    return [storage.join(folder, n) for n in sorted(names) if n.endswith(STALE_SUFFIX)]


def set_aside_uri(uri: str) -> str:
    """Where an unreadable shard ``uri`` is set aside: a hidden ``.<name>.corrupt`` beside it
    (readers of the folder skip hidden files, and its rows are redone)."""
    folder, _, name = uri.rpartition("/")
    return f"{folder}/.{name}{QUARANTINE_SUFFIX}"


def list_visible_set_aside(
    folder: str,
    storage_options: dict[str, Any] | None = None,
    *,
    retries: int = storage.DEFAULT_RETRIES,
) -> list[str]:
    """URIs of shards set aside by an earlier version as ``<name>.corrupt``, not hidden: pyarrow
    and pandas fail on them when they read the folder."""
    names = _files(folder, storage_options, retries)
    return [
        storage.join(folder, n)
        for n in sorted(names)
        if n.endswith(SHARD_SUFFIX + QUARANTINE_SUFFIX) and not n.startswith(".")
    ]


def shard_paths(
    out: str,
    storage_options: dict[str, Any] | None = None,
    *,
    retries: int = storage.DEFAULT_RETRIES,
) -> list[str]:
    """URIs of the committed shards of ``out`` (output root or its ``pairs/``), sorted."""
    folder = pairs_dir(out, storage_options, retries=retries)
    return list_shards(folder, storage_options, retries=retries)


def _wanted(
    names: list[str], columns: Iterable[str] | None, exclude: Collection[str]
) -> list[str] | None:
    """The columns to read from a shard holding ``names``; None means all of them."""
    if columns is None:
        return [n for n in names if n not in exclude] if exclude else None
    present = set(names)
    return [c for c in dict.fromkeys(columns) if c in present and c not in exclude]


def _check_columns(columns: object) -> None:
    """TypeError for one column name given as a string (read as one-letter names: no column)."""
    if isinstance(columns, str | bytes):
        raise TypeError(f"columns must be a list of column names, got the string {columns!r}")


def read_shard(
    path: str,
    columns: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    *,
    exclude: Collection[str] = (),
    retries: int = storage.DEFAULT_RETRIES,
) -> pa.Table:
    """One shard as a table: the requested ``columns`` that it has (all when None), minus
    ``exclude``. Transient storage errors are retried (StorageError when they persist); bytes
    that do not parse raise :class:`CorruptShardError`."""
    _check_columns(columns)
    fs, fs_path = storage.filesystem(path, storage_options)
    # fsspec reads a path holding '*' as a pattern: such a shard is fetched whole.
    if columns and not isinstance(fs, LocalFileSystem) and "*" not in fs_path:
        # Fetch the footer and the byte ranges of the columns asked for, not the whole shard.
        def fetch() -> Any:
            return open_parquet_file(
                fs_path,
                fs=fs,
                columns=list(columns),
                engine="pyarrow",
                footer_sample_size=_TAIL_BYTES,
            )

        try:
            source: Any = storage.with_retries("reading", path, fetch, retries=retries)
        except (pa.ArrowException, ValueError) as exc:  # the footer does not parse
            raise CorruptShardError(path, f"{type(exc).__name__}: {exc}") from exc
    else:
        source = io.BytesIO(
            storage.read_bytes(path, storage_options=storage_options, retries=retries)
        )
    try:
        parquet = pq.ParquetFile(source)
        return parquet.read(columns=_wanted(parquet.schema_arrow.names, columns, exclude))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorruptShardError(path, f"{type(exc).__name__}: {exc}") from exc


def shard_schema(
    path: str,
    storage_options: dict[str, Any] | None = None,
    *,
    retries: int = storage.DEFAULT_RETRIES,
) -> pa.Schema:
    """The Arrow schema of one shard, from its footer only (the rows are not read)."""
    fs, fs_path = storage.filesystem(path, storage_options)

    def tail() -> bytes:
        size = int(fs.size(fs_path))
        data = bytes(fs.cat_file(fs_path, start=max(0, size - _TAIL_BYTES)))
        if len(data) >= 8 and data[-4:] == b"PAR1":
            need = int.from_bytes(data[-8:-4], "little") + 8
            if len(data) < need <= size:
                data = bytes(fs.cat_file(fs_path, start=size - need))
        return data

    # Only the fetch is retried: a footer that does not parse is not worth a second try.
    data = storage.with_retries("reading", path, tail, retries=retries)
    try:
        return pq.read_schema(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise CorruptShardError(path, f"{type(exc).__name__}: {exc}") from exc


def iter_tables(
    out: str,
    columns: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    *,
    exclude: Collection[str] = (),
    retries: int = storage.DEFAULT_RETRIES,
) -> Iterator[pa.Table]:
    """Each shard of ``out`` as a table, one at a time (never all of them at once)."""
    for path in shard_paths(out, storage_options, retries=retries):
        yield read_shard(path, columns, storage_options, exclude=exclude, retries=retries)


def concat_tables(tables: Iterable[pa.Table]) -> pa.Table | None:
    """Shard tables as one, types promoted and missing columns null-filled; None for none."""
    listed = list(tables)
    if not listed:
        return None
    return pa.concat_tables(listed, promote_options="permissive")


def read_table(
    out: str,
    columns: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    *,
    exclude: Collection[str] = (),
    retries: int = storage.DEFAULT_RETRIES,
) -> pa.Table | None:
    """All shards of ``out`` as one table, or None when there is no shard."""
    _check_columns(columns)
    table = concat_tables(
        iter_tables(out, columns, storage_options, exclude=exclude, retries=retries)
    )
    if table is None or columns is None:
        return table
    # Concatenation appends columns the first shard lacks: restore the order asked.
    return table.select([c for c in dict.fromkeys(columns) if c in table.column_names])


def read_frame(
    out: str,
    columns: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    *,
    exclude: Collection[str] = (),
    retries: int = storage.DEFAULT_RETRIES,
) -> pd.DataFrame | None:
    """:func:`read_table` as a pandas DataFrame, or None when there is no shard."""
    table = read_table(out, columns, storage_options, exclude=exclude, retries=retries)
    return None if table is None else table.to_pandas()
