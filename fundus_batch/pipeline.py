"""Runs the pipeline: lease, settings, output store, and the output blocks Ray yields.

manifest -> Fetch -> Preprocess -> Score(clean) -> Degrade -> [Enhance] -> Score -> Write ->
Parquet shards committed by the driver (see output.py). The stages are
:func:`fundus_batch.stages.stage_specs`; :mod:`fundus_batch.ray_adapter` (the only module that
imports Ray) turns them into Ray Data operators. This module does not import Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from fundus_batch import ray_adapter, run_settings
from fundus_batch.config import ConfigError, RunConfig
from fundus_batch.console import Progress
from fundus_batch.io import storage
from fundus_batch.lease import OutLease
from fundus_batch.manifest_stream import (
    KeySet,
    ManifestScan,
    check_splits,
    done_keys,
    in_run,
    scan_manifest,
    stored_splits,
    table_keys,
)
from fundus_batch.outpaths import check_out_root
from fundus_batch.output import RUN_JSON, Counts, OutputStore, ShardWriter, environment_versions
from fundus_batch.quality import GateCounts, parse_rule
from fundus_batch.ray_adapter import ClusterShape, init_ray, shutdown
from fundus_batch.schema import STATUS_OK, output_schema, work_schema

if TYPE_CHECKING:
    from fundus_batch.fidelity import RowFilter

__all__ = ["ClusterShape", "RunSummary", "init_ray", "run", "run_variants", "shutdown"]

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a run did, as printed at the end and stored in run.json."""

    out: str
    rows_in: int
    done_before: int
    ok: int
    failed: int
    failed_by_stage: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    shards: list[str] = field(default_factory=list)
    # Which output rows are this run's (image, variant) pairs, the rows its counts cover.
    pairs: RowFilter | None = field(default=None, repr=False, compare=False)
    # With a quality rule: how those pairs' ok rows fared at the gate (None: no rule).
    quality: GateCounts | None = None
    # Ok rows this run had to redo with enhancement or metrics added, whose redo failed: they
    # keep their earlier rows (counted in ``ok``), without what was added.
    not_redone: int = 0
    not_redone_error: str | None = None

    @property
    def complete(self) -> bool:
        return self.rows_in == self.ok + self.failed and not self.not_redone


def run_variants(config: RunConfig) -> list[int]:
    """The variants every image of this run needs ([-1]: one clean-only row per image)."""
    return list(range(config.variants)) if config.mode == "pairs" else [-1]


def run(config: RunConfig, *, progress: Progress | None = None) -> RunSummary:
    """Run the pipeline described by ``config``; resumes whatever ``config.out`` already holds."""
    started = time.time()
    # One streaming pass: a bad row is rejected here, before any work, naming line and field.
    scan = scan_manifest(
        config.manifest, storage_options=config.storage_options, limit=config.limit
    )
    check_rule_against_manifest(config, scan)
    check_out_root(config.out)  # OUT/images or OUT/pairs linked elsewhere: refuse before work
    for field_name, uri, options in (
        ("manifest", config.manifest, config.storage_options),
        ("out", config.out, config.out_storage_options),
    ):
        if storage.process_local(uri, options):
            raise ConfigError(
                f"{field_name}: {storage.redact(uri)} lives in this process's memory, and Ray's "
                "workers run in processes of their own (they would write their own copies, lost "
                "at exit): use a local folder or object storage"
            )
    settings = run_settings.resolve(config)
    store = OutputStore(config.out, config.out_storage_options, retries=config.storage_retries)
    lease = OutLease(
        config.out,
        config.out_storage_options,
        ttl=config.lease.ttl,
        renew_every=config.lease.renew_every,
        retries=config.storage_retries,
    )
    lease.acquire(wait=config.lease.wait)  # one writer per OUT, before anything is touched
    try:
        return _run_leased(config, scan, store, lease, settings, started, progress)
    finally:
        lease.release()


def check_rule_against_manifest(config: RunConfig, scan: ManifestScan) -> None:
    """Refuse a quality rule on vessel metrics when no row of the run has a ``vessel_uri``:
    every row's ``vessel_auc_*``/``vessel_f1_*`` would be empty, so every row would fail."""
    if config.min_quality is None or scan.vessel_rows:
        return
    vessel = sorted(c for c in parse_rule(config.min_quality).columns if c.startswith("vessel_"))
    if vessel:
        why = (
            "has a vessel_uri column, empty in every row of this run"
            if "vessel_uri" in scan.columns
            else "has no vessel_uri column"
        )
        raise ConfigError(
            f"min_quality: column {vessel[0]!r} is empty for every row: the manifest "
            f"{scan.source} {why} (vessel metrics need vessel ground truth); "
            "add vessel_uri to the manifest or drop the term"
        )


def _gate_counts(gate: GateCounts, table: pa.Table) -> None:
    """Add the quality verdicts of ``table``'s ok rows to ``gate``."""

    def column(name: str) -> list[Any]:
        present = name in table.column_names
        return table.column(name).to_pylist() if present else [None] * table.num_rows

    ok = [status == STATUS_OK for status in column("status")]
    gate.add(
        (v for v, keep in zip(column("quality_ok"), ok, strict=True) if keep),
        (f for f, keep in zip(column("quality_failed"), ok, strict=True) if keep),
    )


def _history(previous: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The runs ``run.json`` records; a run.json written before histories holds one."""
    if not previous:
        return []
    if isinstance(previous.get("history"), list):
        return list(previous["history"])
    keys = ("started", "finished", "state", "counts")
    entry = {k: previous.get(k) for k in keys}
    entry["settings"] = run_settings.recorded(previous)
    return [entry]


def _run_leased(
    config: RunConfig,
    scan: ManifestScan,
    store: OutputStore,
    lease: OutLease,
    settings: dict[str, Any],
    started: float,
    progress: Progress | None,
) -> RunSummary:
    """The run itself, once this process holds the OUT lease."""
    previous = store.read_json(RUN_JSON)
    # A run killed before its first shard left images made with its settings all the same.
    made = bool(store.shard_paths()) or store.has_images()
    recorded = run_settings.recorded(previous) if made else None
    change = run_settings.compare(recorded, settings, storage.redact(config.out))
    for note in change.notes:
        log.warning("%s", note)
    passthrough = run_settings.check_column_types(
        store.column_types(scan.passthrough.names), scan.passthrough, storage.redact(config.out)
    )
    # This run's rows must keep each stored image's split: checked before anything is rewritten.
    stored = stored_splits(store.readable_tables(["image_id", "split"]))
    check_splits(scan, stored, config.storage_options)
    lease.ensure()  # the shard rewrites below replace committed files
    store.clean_stale()
    quarantined = store.quarantine_corrupt()
    for path in quarantined:
        log.warning("set aside unreadable shard %s; its rows will be redone", path)
    removed = store.drop_duplicates()  # left by two writers before leases existed
    if removed:
        log.warning("removed %d duplicate rows (one row kept per image and variant)", removed)
    variants = run_variants(config)

    def this_run(table: pa.Table) -> np.ndarray:
        return in_run(table, scan, variants)  # rows of other images or variants stay as they are

    if config.retry_failed:
        dropped = store.drop_failed(within=this_run)
        removed += dropped
        if dropped:
            log.warning("removed %d failed rows so that they are redone", dropped)
    # Rows made before enhancement or metrics were added (or by a run that added them and was
    # stopped: run.json records the settings already) are redone; each keeps its place until
    # its new row is ok (settle_redone, after the run). Every ok row scored carries its
    # metric_version.
    needed = {"enhanced_uri": "enhancement"} if config.enhance.enabled else {}
    if config.compute_metrics:
        needed["metric_version"] = "metrics"
    redo, lacked = KeySet.of([]), dict[str, int]()
    if needed:
        redo, lacked = store.rows_lacking(needed, within=this_run)
        if len(redo):
            counted = " and ".join(f"{n} {thing}" for thing, n in lacked.items())
            log.warning("%d rows lack %s; they are redone with it", len(redo), counted)

    def not_redone(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
        for table in tables:
            yield table.filter(pa.array(~redo.contains(table_keys(table)), pa.bool_()))

    # Keys of the done pairs only (16 bytes each); the workers filter the manifest with them.
    tables = store.iter_tables(["image_id", "variant"])
    done, done_before = done_keys(not_redone(tables) if len(redo) else tables, scan, variants)
    expected = scan.selected * len(variants)
    todo = expected - done_before
    out_schema = output_schema(passthrough)
    schema = work_schema(scan.passthrough)
    entry: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "state": "running",
        "settings": change.settings,
        "counts": {"rows_in": expected, "done_before": done_before},
    }
    run_info: dict[str, Any] = {
        "config": config.redacted(),
        "versions": environment_versions(),
        "started": entry["started"],
        "state": "running",
        "counts": entry["counts"],
        "manifest_rows": scan.selected,
        "settings": change.settings,
        "history": [*_history(previous), entry],
    }
    touched = bool(todo or removed or quarantined or len(redo))
    if touched:  # a run that does nothing leaves run.json as it was
        store.write_json(RUN_JSON, run_info)
    counts = Counts(rows_in=expected, done_before=done_before)
    writer = ShardWriter(store, out_schema, shard_rows=config.shard_rows)
    writer.before_commit = lease.ensure
    writer.time_left = lease.remaining
    if todo:
        if progress is not None:
            progress(0, todo)  # the bar appears before Ray starts, not with the first block
        try:
            with ray_adapter.connected(config) as cluster:
                ray_adapter.configure_data_context()
                run_info["cluster"] = asdict(cluster)
                ds = ray_adapter.build_dataset(scan, done, schema, config, cluster, variants)
                seen = 0
                for batch in ray_adapter.iter_tables(ds):
                    writer.add(batch)
                    counts.add(batch)
                    seen += batch.num_rows
                    if progress is not None:
                        progress(seen, todo)
            writer.close()
        except BaseException as exc:
            _salvage(writer)
            _record_stop(store, lease, run_info, entry, exc)
            raise
    redone = store.settle_redone(redo, list(needed))
    if redone.kept:
        log.warning(
            "%d rows could not be redone with %s and keep their earlier rows without it "
            "(first error: %s)",
            redone.kept,
            " and ".join(lacked),
            redone.first_error,
        )
    # Counts cover this run's (image, variant) pairs, including rows earlier runs committed.
    final = Counts(rows_in=expected)
    gate = GateCounts() if config.min_quality else None
    columns = ["image_id", "variant", "status", "failed_stage"]
    if gate is not None:
        columns += ["quality_ok", "quality_failed"]
    for table in store.iter_tables(columns):
        mine = table.filter(pa.array(this_run(table), pa.bool_()))
        final.add(mine)
        if gate is not None:
            _gate_counts(gate, mine)
    summary = RunSummary(
        out=config.out,
        rows_in=expected,
        done_before=done_before,
        ok=final.ok,
        failed=final.failed,
        failed_by_stage=final.failed_by_stage,
        seconds=time.time() - started,
        shards=writer.shards,
        pairs=this_run,
        quality=gate,
        not_redone=redone.kept,
        not_redone_error=redone.first_error,
    )
    state = "complete" if summary.complete else "incomplete"
    final_counts = {
        "rows_in": expected,
        "ok": final.ok,
        "failed": final.failed,
        "done_before": done_before,
        "this_run": counts.written,
        "failed_by_stage": final.failed_by_stage,
        "not_redone": redone.kept,
    }
    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    entry.update({"state": state, "finished": finished, "counts": final_counts})
    run_info.update(
        {"state": state, "finished": finished, "seconds": summary.seconds, "counts": final_counts}
    )
    if touched or (not _narrower(previous, expected) and _record_differs(previous, run_info)):
        lease.ensure()
        store.write_json(RUN_JSON, run_info)
    return summary


def _salvage(writer: ShardWriter) -> None:
    """Commit the finished rows a stopped run still buffers (up to ``shard_rows`` - 1 of
    them), so that a resume does not redo them (best effort: the stop is what the caller must
    see)."""
    try:
        saved = writer.salvage()
    except BaseException as problem:  # a second Ctrl-C, or the store failing too
        log.warning("could not keep the rows finished since the last shard: %r", problem)
        return
    if saved:
        log.info("kept %d rows finished since the last shard", saved)


def _record_stop(
    store: OutputStore,
    lease: OutLease,
    run_info: dict[str, Any],
    entry: dict[str, Any],
    exc: BaseException,
) -> None:
    """Make run.json say that the run stopped, and why, instead of that it is still running
    (best effort: nothing is written once the lease is another run's)."""
    interrupted = isinstance(exc, KeyboardInterrupt | SystemExit)
    stop = {
        "state": "interrupted" if interrupted else "failed",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "error": storage.redact(f"{type(exc).__name__}: {exc}")[:1000],
    }
    entry.update(stop)
    run_info.update(stop)
    try:
        lease.ensure()
        store.write_json(RUN_JSON, run_info)
    except Exception as problem:  # the original error is what the caller must see
        log.warning("could not record the stop in %s: %s", RUN_JSON, problem)


def _narrower(previous: dict[str, Any] | None, rows_in: int) -> bool:
    """Whether a run that changed nothing covered fewer pairs than the recorded run (a
    ``--limit`` or a shorter manifest): its record would misdescribe the folder."""
    recorded = ((previous or {}).get("counts") or {}).get("rows_in")
    return isinstance(recorded, int) and rows_in < recorded


def _record_differs(previous: dict[str, Any] | None, now: dict[str, Any]) -> bool:
    """Whether run.json would say something else than it does (settings, state or counts)."""
    if not previous:
        return True
    before = previous.get("counts") or {}
    after = now["counts"]
    return (
        previous.get("settings") != now["settings"]
        or previous.get("state") != now["state"]
        or any(before.get(k) != after.get(k) for k in ("rows_in", "ok", "failed"))
    )
