"""The output folder: Parquet shards committed atomically, resume bookkeeping and run.json.

A shard is complete once it exists under ``pairs/`` with a ``.parquet`` name: it is written under
a temporary name first and renamed (a single PUT on object stores), so a killed driver leaves at
most an ignored ``.tmp`` file. A re-run reads the (image_id, variant) pairs of complete shards and
does only the rest, so the dataset never holds a duplicate pair.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fundus_batch import __version__, outpaths, shards
from fundus_batch.io import storage
from fundus_batch.lease import LeaseLostError
from fundus_batch.manifest_stream import KeySet, table_keys
from fundus_batch.schema import ROW_CHECKSUM, STATUS_OK, row_checksum, with_row_checksums
from fundus_batch.shards import PAIRS_DIR, CorruptShardError

RUN_JSON = "run.json"
# Which rows of a shard an operation may touch (a boolean per row).
RowSelection = Callable[[pa.Table], Sequence[bool] | np.ndarray]


@dataclass
class Redone:
    """What :meth:`OutputStore.settle_redone` did: pairs whose new row replaced the old one,
    pairs whose redo failed and kept their old row, and the first such failure's error."""

    replaced: int = 0
    kept: int = 0
    first_error: str | None = None


def _is_ok(table: pa.Table) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False))


def _lacking(table: pa.Table, columns: Sequence[str]) -> np.ndarray:
    """Which rows are ``ok`` but miss one of ``columns`` (a column the shard lacks counts)."""
    missing = np.zeros(table.num_rows, dtype=bool)
    for column in columns:
        if column not in table.column_names:
            missing[:] = True
        else:
            missing |= np.asarray(pc.is_null(table.column(column)))
    return missing & _is_ok(table)


class Lacking(NamedTuple):
    """The pairs a run redoes (:meth:`OutputStore.rows_lacking`), and how many lack each thing."""

    keys: KeySet
    counts: dict[str, int]


@dataclass
class Counts:
    """Row accounting for one run; ``rows_in == ok + failed`` once a run has finished."""

    rows_in: int = 0
    done_before: int = 0
    ok: int = 0
    failed: int = 0
    failed_by_stage: dict[str, int] = field(default_factory=dict)

    @property
    def written(self) -> int:
        return self.ok + self.failed

    def add(self, table: pa.Table) -> None:
        status = table.column("status").to_pylist()
        stages = table.column("failed_stage").to_pylist()
        for s, stage in zip(status, stages, strict=True):
            if s == STATUS_OK:
                self.ok += 1
            else:
                self.failed += 1
                key = stage or "unknown"
                self.failed_by_stage[key] = self.failed_by_stage.get(key, 0) + 1


class LateCommitError(LeaseLostError):
    """A shard whose write finished after the writer's deadline (its OUT lease's expiry)."""


class OutputStore:
    """Reads and writes the pieces of one output root (local path or fsspec URL); shards are
    listed and read through :mod:`fundus_batch.shards`."""

    def __init__(
        self,
        root: str,
        storage_options: dict | None = None,
        retries: int = storage.DEFAULT_RETRIES,
    ) -> None:
        self.root = root.rstrip("/")
        self.storage_options = storage_options or {}
        self.retries = retries
        self.fs, self.path = storage.filesystem(self.root, self.storage_options)

    @property
    def pairs_uri(self) -> str:
        return storage.join(self.root, PAIRS_DIR)

    def shard_paths(self) -> list[str]:
        """URIs of complete shards, sorted."""
        return shards.list_shards(self.pairs_uri, self.storage_options, retries=self.retries)

    def _read_shard(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return shards.read_shard(path, columns, self.storage_options, retries=self.retries)

    def readable_tables(self, columns: list[str]) -> Iterator[pa.Table]:
        """Each shard's ``columns``, one at a time, leaving out shards that cannot be read (a
        run sets those aside later): for checks made before anything is rewritten."""
        for path in self.shard_paths():
            try:
                yield self._read_shard(path, columns)
            except CorruptShardError:
                continue

    def has_images(self) -> bool:
        """Whether ``OUT/images`` exists: a run wrote images there, with or without shards."""
        return bool(self.fs.exists(storage.join(self.path, outpaths.IMAGES_DIR)))

    def read_table(self, columns: list[str] | None = None) -> pa.Table | None:
        """All complete shards as one table, or None when there are none."""
        return shards.concat_tables(self.iter_tables(columns))

    def quarantine_corrupt(self) -> list[str]:
        """Set unreadable shards (e.g. truncated by a crash of another writer) aside as hidden
        ``.*.corrupt`` files so that their rows are redone; returns their paths. Shards an
        earlier version set aside unhidden are hidden too."""
        bad = []
        for path in self.shard_paths():
            try:
                self._read_shard(path, ["image_id", "variant"])
            except CorruptShardError:
                self.fs.mv(path, shards.set_aside_uri(path))
                bad.append(path)
        visible = shards.list_visible_set_aside(
            self.pairs_uri, self.storage_options, retries=self.retries
        )
        for path in visible:
            self.fs.mv(path, shards.set_aside_uri(path.removesuffix(shards.QUARANTINE_SUFFIX)))
        return bad

    def drop_failed(self, within: RowSelection | None = None) -> int:
        """Rewrite every shard that holds failed rows (of those ``within`` selects, when given)
        without them, so that a re-run redoes them; each shard is replaced in one atomic write.
        Returns the number of rows dropped."""
        dropped = 0
        for path in self.shard_paths():
            table = self._read_shard(path)
            failed = pc.invert(pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False))
            dropped += self._drop(path, table, failed, within)
        return dropped

    def _drop(self, path: str, table: pa.Table, rows: pa.Array, within: RowSelection | None) -> int:
        """Replace the shard at ``path`` by ``table`` without ``rows`` (a boolean mask), limited
        to those ``within`` selects; returns how many rows went."""
        if within is not None:
            rows = pc.and_(rows, pa.array(within(table), pa.bool_()))
        n = pc.sum(rows).as_py() or 0
        if n:
            self._replace_shard(path, table.filter(pc.invert(rows)))
        return int(n)

    def _replace_shard(self, path: str, kept: pa.Table) -> None:
        """Replace one shard by ``kept`` in one atomic write (removed when ``kept`` is empty)."""
        if kept.num_rows:
            buf = io.BytesIO()
            pq.write_table(kept, buf, compression="zstd")
            storage.write_bytes(
                path, buf.getvalue(), storage_options=self.storage_options, retries=self.retries
            )
        else:
            self.fs.rm(path)

    def drop_duplicates(self) -> int:
        """Keep one row per (image_id, variant) across all shards, preferring a row whose
        ``row_sha256`` matches its values, then an ``ok`` row over a failed one, then the row
        with more values (a redo that added enhancement or metrics, interrupted before
        :meth:`settle_redone`), then the first in shard order; rewrite each shard that holds a
        dropped row atomically. A crash
        part-way leaves every pair with at least one row (a kept row is never dropped), so
        running it again finishes the job. Returns rows dropped."""
        paths = self.shard_paths()
        keys: list[list[tuple[str, int]]] = []
        status: list[list[bool]] = []
        for path in paths:
            t = self._read_shard(path, ["image_id", "variant", "status"])
            ids = t.column("image_id").to_pylist()
            variants = t.column("variant").to_pylist()
            keys.append(
                [(i, -1 if v is None else int(v)) for i, v in zip(ids, variants, strict=True)]
            )
            status.append([s == STATUS_OK for s in t.column("status").to_pylist()])
        seen: dict[tuple[str, int], int] = {}
        for shard_keys in keys:
            for key in shard_keys:
                seen[key] = seen.get(key, 0) + 1
        # Rows of repeated pairs only: is each one's checksum right? (Shards without them are
        # not read again.)
        intact: dict[tuple[int, int], tuple[bool, int]] = {}  # checksum holds, values
        for si, path in enumerate(paths):
            rows = [ri for ri, key in enumerate(keys[si]) if seen[key] > 1]
            if rows:
                table = self._read_shard(path)
                for ri in rows:
                    row = table.slice(ri, 1).to_pylist()[0]
                    filled = sum(v is not None for v in row.values())
                    intact[(si, ri)] = (row.get(ROW_CHECKSUM) == row_checksum(row), filled)
        keep: dict[tuple[str, int], tuple[int, int, tuple[bool, bool, int]]] = {}
        for si, shard_keys in enumerate(keys):
            for ri, key in enumerate(shard_keys):
                holds, filled = intact.get((si, ri), (True, 0))
                rank = (holds, status[si][ri], filled)
                best = keep.get(key)
                if best is None or rank > best[2]:
                    keep[key] = (si, ri, rank)
        dropped = 0
        for si, path in enumerate(paths):
            mask = [keep[key][:2] == (si, ri) for ri, key in enumerate(keys[si])]
            if all(mask):
                continue
            table = self._read_shard(path)
            self._replace_shard(path, table.filter(pa.array(mask, pa.bool_())))
            dropped += mask.count(False)
        return dropped

    def rows_lacking(self, columns: Mapping[str, str], within: RowSelection) -> Lacking:
        """The ``ok`` rows (of those ``within`` selects) that miss any of ``columns`` (name ->
        what it stands for: ``enhanced_uri`` while a run enhances, ``metric_version`` while it
        scores): the pairs a run redoes, made before that was added to the folder or by a run
        that added it and was stopped. The rows stay until :meth:`settle_redone` finds their
        new rows ok."""
        parts: list[np.ndarray] = []
        lacked = dict.fromkeys(columns.values(), 0)
        for path in self.shard_paths():
            table = self._read_shard(path, ["image_id", "variant", "status", *columns])
            selected = np.asarray(within(table), dtype=bool)
            each = {what: _lacking(table, [column]) & selected for column, what in columns.items()}
            lacking = np.logical_or.reduce(list(each.values()))
            if lacking.any():
                parts.append(table_keys(table)[lacking])
                for what, rows in each.items():
                    lacked[what] += int(rows.sum())
        return Lacking(KeySet.of(parts), {k: n for k, n in lacked.items() if n})

    def settle_redone(self, redo: KeySet, columns: Sequence[str]) -> Redone:
        """After a run redid the pairs ``redo`` (:meth:`rows_lacking`), keep one row per pair:
        the new row when it is ok, else the old one (a redo that failed, e.g. because this
        version preprocesses the photograph otherwise, loses nothing); shards rewritten
        atomically. A pair the run did not reach keeps its old row."""
        settled = Redone()
        if not len(redo):
            return settled
        wanted = ["image_id", "variant", "status", "error", *columns]
        found: dict[bytes, list[tuple[int, int, str]]] = {}  # key -> (shard, row, kind)
        errors: dict[bytes, str] = {}
        paths = self.shard_paths()
        for si, path in enumerate(paths):
            table = self._read_shard(path, wanted)
            keys = table_keys(table)
            hit = np.flatnonzero(redo.contains(keys))
            if not len(hit):
                continue
            lacking = _lacking(table, columns)
            ok = _is_ok(table)
            error = table.column("error").to_pylist() if "error" in table.column_names else None
            for ri in hit.tolist():
                kind = "old" if lacking[ri] else ("new" if ok[ri] else "failed")
                found.setdefault(bytes(keys[ri]), []).append((si, ri, kind))
                if kind == "failed" and error is not None and error[ri]:
                    errors.setdefault(bytes(keys[ri]), str(error[ri]))
        drop: dict[int, set[int]] = {}
        for key, rows in found.items():
            kinds = {kind for _, _, kind in rows}
            if "old" not in kinds or len(rows) < 2:
                continue
            gone = "old" if "new" in kinds else "failed"
            for si, ri, kind in rows:
                if kind == gone:
                    drop.setdefault(si, set()).add(ri)
            if gone == "old":
                settled.replaced += 1
            else:
                settled.kept += 1
                settled.first_error = settled.first_error or errors.get(key)
        for si, dropped in drop.items():
            table = self._read_shard(paths[si])
            keep = np.ones(table.num_rows, dtype=bool)
            keep[sorted(dropped)] = False
            self._replace_shard(paths[si], table.filter(pa.array(keep)))
        return settled

    def column_types(self, names: Iterable[str]) -> dict[str, list[pa.DataType]] | None:
        """The Arrow types the committed shards hold for each of ``names`` that they have, in
        shard order, from their footers (``null`` for a column empty in every row of a shard);
        None when no shard could be read (none yet, or all set aside by a run)."""
        wanted = set(names)
        found: dict[str, list[pa.DataType]] = {}
        if not wanted:  # nothing to check: no footer need be read
            return found
        read = False
        for path in self.shard_paths():
            try:
                schema = shards.shard_schema(path, self.storage_options, retries=self.retries)
            except CorruptShardError:
                continue
            read = True
            for column in schema:
                if column.name in wanted:
                    seen = found.setdefault(column.name, [])
                    if column.type not in seen:
                        seen.append(column.type)
        return found if read else None

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Each complete shard as a table, one at a time (never all of them at once)."""
        for path in self.shard_paths():
            yield self._read_shard(path, columns)

    def done_pairs(self) -> set[tuple[str, int]]:
        """(image_id, variant) pairs already committed by earlier runs."""
        table = self.read_table(columns=["image_id", "variant"])
        if table is None:
            return set()
        ids = table.column("image_id").to_pylist()
        variants = table.column("variant").to_pylist()
        return {(i, -1 if v is None else int(v)) for i, v in zip(ids, variants, strict=True)}

    def clean_stale(self) -> int:
        """Remove temporary shard files left by a killed run; returns how many."""
        stale = shards.list_stale(self.pairs_uri, self.storage_options, retries=self.retries)
        for path in stale:
            self.fs.rm(path)
        return len(stale)

    def write_file(self, name: str, data: bytes) -> str:
        """Store ``data`` at ``name`` under the root (never through a link out of a local root);
        returns its URI."""
        uri = storage.join(self.root, name)
        outpaths.check_local_target(self.root, uri)
        storage.write_bytes(uri, data, storage_options=self.storage_options, retries=self.retries)
        return uri

    def write_json(self, name: str, data: dict) -> None:
        payload = json.dumps(data, indent=2, sort_keys=True, default=str).encode("utf-8")
        self.write_file(name, payload)

    def read_json(self, name: str) -> dict | None:
        try:
            return json.loads(
                storage.read_bytes(
                    storage.join(self.root, name), storage_options=self.storage_options
                )
            )
        except FileNotFoundError:
            return None


class ShardWriter:
    """Buffers output rows and commits them as Parquet shards of at most ``shard_rows`` rows."""

    def __init__(
        self,
        store: OutputStore,
        schema: pa.Schema,
        shard_rows: int = 1000,
        flush_seconds: float = 60.0,
    ) -> None:
        self.store = store
        self.schema = schema
        self.shard_rows = shard_rows
        self.flush_seconds = flush_seconds
        self.attempt = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._seq = 0
        self._last_flush = time.monotonic()
        self.shards: list[str] = []
        self._commit_failed = False
        # Called before each commit; raises to stop a writer that lost the OUT lease.
        self.before_commit: Callable[[], None] | None = None
        # Seconds until a commit must have landed (the lease's expiry); None: no deadline.
        self.time_left: Callable[[], float] | None = None

    def add(self, table: pa.Table) -> None:
        table = with_row_checksums(table.select(self.schema.names).cast(self.schema))
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)
        if self._pending_rows and time.monotonic() - self._last_flush > self.flush_seconds:
            self._flush(self._pending_rows)

    def close(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)

    def salvage(self) -> int:
        """Commit the rows still buffered when the run stops early (Ctrl-C, SIGTERM, a failed
        stage): they are finished rows whose images are written. Nothing is tried after a
        commit of this writer failed (the store or the lease is what stopped the run). Returns
        how many rows were committed."""
        if self._commit_failed or not self._pending_rows:
            return 0
        rows = self._pending_rows
        self.close()
        return rows

    def _flush(self, n: int) -> None:
        merged = pa.concat_tables(self._pending)
        head, rest = merged.slice(0, n), merged.slice(n)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        self._commit(head)
        self._last_flush = time.monotonic()

    def _commit(self, table: pa.Table) -> None:
        try:
            self._write_shard(table)
        except Exception:
            self._commit_failed = True
            raise

    def _write_shard(self, table: pa.Table) -> None:
        if self.before_commit is not None:
            self.before_commit()
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        name = f"part-{self.attempt}-{self._seq:05d}.parquet"
        self._seq += 1
        uri = storage.join(self.store.pairs_uri, name)
        outpaths.check_local_target(self.store.root, uri)  # OUT/pairs must not be a link
        storage.write_bytes(
            uri,
            buf.getvalue(),
            storage_options=self.store.storage_options,
            retries=self.store.retries,
            time_left=self.time_left,
        )
        if self.time_left is not None and self.time_left() <= 0:
            # It may have landed after another run took OUT over and listed what was done.
            with contextlib.suppress(Exception):
                self.store.fs.rm(storage.filesystem(uri, self.store.storage_options)[1])
            raise LateCommitError(
                f"shard {storage.redact(uri)} landed after this run's lease ended, so it was "
                "removed; rerun to finish (its rows are redone)"
            )
        self.shards.append(uri)


# Libraries whose package metadata holds their ``__version__``: read there unless already
# imported (importing torch and scikit-image just for their versions costs the driver ~1.5 s).
_VERSION_DISTRIBUTIONS = {"torch": "torch", "skimage": "scikit-image"}


def environment_versions() -> dict[str, str]:
    """Versions of the libraries that shape the outputs."""
    versions = {"fundus_batch": __version__, "python": platform.python_version()}
    for mod in ("numpy", "cv2", "PIL", "pyarrow", "ray", "torch", "skimage"):
        try:
            if mod in _VERSION_DISTRIBUTIONS and mod not in sys.modules:
                versions[mod] = metadata.version(_VERSION_DISTRIBUTIONS[mod])
                continue
            versions[mod] = __import__(mod).__version__
        except Exception:  # a missing optional library is simply not listed
            continue
    versions["host"] = socket.gethostname()
    return versions
