"""Builds and runs the Ray Data pipeline. The only module in fundus_batch that imports Ray.

manifest -> Fetch -> Preprocess -> Score(clean) -> Degrade -> [Enhance] -> Score -> Write ->
Parquet shards committed by the driver (see output.py). Consecutive CPU stages share one actor
pool, so the images they pass each other never cross the object store; a stage that declares a
GPU (Enhance) gets its own pool, on GPUs when the cluster has them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from fundus_batch import run_settings, stages
from fundus_batch.config import RunConfig
from fundus_batch.io import storage
from fundus_batch.lease import OutLease
from fundus_batch.manifest_stream import (
    KeySet,
    ManifestScan,
    csv_convert_options,
    done_keys,
    plan_batch,
    scan_manifest,
)
from fundus_batch.outpaths import absolute_out, check_out_root
from fundus_batch.output import RUN_JSON, Counts, OutputStore, ShardWriter, environment_versions
from fundus_batch.schema import (
    output_schema,
    to_table,
    work_schema,
)

log = logging.getLogger(__name__)

Stage = Any  # a stages.* object: .name, .resources (a class attribute), __call__(rows) -> rows


class StageFactory(Protocol):
    """Builds a stage in a worker (a ``functools.partial`` of the stage class)."""

    @property
    def func(self) -> Any:
        """The stage class, whose ``resources`` planning reads before any stage is built."""

    def __call__(self) -> Stage: ...


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

    @property
    def complete(self) -> bool:
        return self.rows_in == self.ok + self.failed


class _StageUDF:
    """Adapts a stage to Ray Data: Arrow batch in, Arrow batch (fixed schema) out.

    The stage is built from its factory inside the worker, so models load in workers only.
    """

    def __init__(self, factory: Callable[[], Stage], schema: pa.Schema) -> None:
        self.stage = factory()
        self.schema = schema

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        if batch.num_columns < len(self.schema):  # planned rows carry only the manifest's columns
            blank = dict.fromkeys(self.schema.names)
            rows = [{**blank, **row} for row in rows]
        return to_table(self.stage(rows), self.schema)


def _task_udf(factory: Callable[[], Stage], schema: pa.Schema) -> Callable[[pa.Table], pa.Table]:
    udf: list[_StageUDF] = []

    def apply(batch: pa.Table) -> pa.Table:
        if not udf:
            udf.append(_StageUDF(factory, schema))
        return udf[0](batch)

    return apply


@dataclass(frozen=True)
class ClusterShape:
    cpus: float
    gpus: float


def init_ray(config: RunConfig) -> ClusterShape:
    """Connect to (or start) Ray and report the cluster's CPUs and GPUs."""
    import ray

    if not ray.is_initialized():
        address = config.ray.address or os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
        if address:
            kwargs["address"] = address
        else:
            # "local" starts a private instance; None would join any cluster on this machine.
            kwargs["address"] = "local"
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            kwargs["include_dashboard"] = False
            if config.ray.num_cpus is not None:
                kwargs["num_cpus"] = config.ray.num_cpus
            if config.ray.num_gpus is not None:
                kwargs["num_gpus"] = config.ray.num_gpus
        ray.init(**kwargs)
    res = ray.cluster_resources()
    return ClusterShape(cpus=float(res.get("CPU", 1.0)), gpus=float(res.get("GPU", 0.0)))


def _data_context(config: RunConfig) -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_stats_logs = False
    ctx.execution_options.preserve_order = False


# Manifest rows per planning batch (the workers' done-pair filter), before rows are cut into
# blocks of ``ray.rows_per_block`` for the image stages.
PLAN_ROWS = 2048
# Reading and planning ask for no CPU: their tasks are light, and a planning task waits (holding
# what it asked for) until the stages take its blocks, so any CPU it held could be the share
# the fetch tasks need on a small node, and the run would wait forever.
PLAN_CPUS = 0.0
PLANNED_COLUMNS = (
    "image_id",
    "status",
    "source_uri",
    "split",
    "source_mask_uri",
    "vessel_gt_uri",
    "pending_variants",
)


def run_variants(config: RunConfig) -> list[int]:
    """The variants every image of this run needs ([-1]: one clean-only row per image)."""
    return list(range(config.variants)) if config.mode == "pairs" else [-1]


def _plan_udf(
    done_ref: Any, selected_ref: Any, variants: list[int], passthrough: list[str], schema: pa.Schema
) -> Callable[[pa.Table], pa.Table]:
    """Planning on the workers: manifest batch in, pending work rows out (the done set and the
    ``--limit`` selection arrive through the object store, fetched once per task)."""
    narrow = pa.schema([schema.field(n) for n in (*PLANNED_COLUMNS, *passthrough)])
    sets: list[tuple[KeySet, KeySet | None]] = []

    def apply(batch: pa.Table) -> pa.Table:
        import ray

        if not sets:
            sets.append((ray.get(done_ref), ray.get(selected_ref)))
        done, selected = sets[0]
        return to_table(plan_batch(batch, done, selected, variants, passthrough), narrow)

    return apply


def stage_factories(config: RunConfig) -> list[StageFactory]:
    """Every stage of this run, in order, as factories (each builds its stage in a worker)."""
    from functools import partial

    factories: list[StageFactory] = [
        partial(
            stages.Fetch,
            config.storage_options,
            config.ray.fetch_threads,
            config.storage_retries,
            vessels=config.compute_metrics,
        ),
        partial(stages.Preprocess, config.size, config.image_format, config.jpeg_quality),
    ]
    if config.compute_metrics:
        factories.append(partial(stages.Score, ("clean",)))
    if config.mode == "pairs":
        factories.append(
            partial(
                stages.Degrade,
                config.seed,
                config.variants,
                config.types,
                config.type_mode,
                config.preset,
                config.image_format,
                config.jpeg_quality,
            )
        )
    if config.enhance.enabled and config.enhance.enhancer == "classical":
        from fundus_batch.enhance import ClassicalEnhance

        source_role = "degraded" if config.mode == "pairs" else "clean"
        factories.append(
            partial(ClassicalEnhance, source_role, config.image_format, config.jpeg_quality)
        )
    elif config.enhance.enabled:
        from fundus_batch.enhance import Enhance

        enh = config.enhance
        source_role = "degraded" if config.mode == "pairs" else "clean"
        factories.append(
            partial(
                Enhance,
                enh.weights,
                enh.variant,
                enh.width,
                enh.batch_size,
                enh.device,
                source_role,
                config.image_format,
                config.jpeg_quality,
                enh.cpus_per_actor,
            )
        )
    if config.compute_metrics:
        factories.append(partial(stages.Score, ("degraded", "enhanced"), config.mode == "pairs"))
    if config.min_quality:
        from fundus_batch.quality import QualityGate

        factories.append(partial(QualityGate, config.min_quality))
    factories.append(
        partial(
            stages.Write,
            absolute_out(config.out),  # workers do not share the driver's working directory
            config.image_format,
            config.out_storage_options,
            config.storage_retries,
        )
    )
    return factories


@dataclass(frozen=True)
class Operator:
    """One Ray Data operator: consecutive stages run in one worker, so the images they share
    never cross the object store."""

    factories: tuple[Callable[[], Stage], ...]
    resources: stages.Resources
    actors: int = 0


def plan_operators(config: RunConfig, cluster: ClusterShape) -> list[Operator]:
    """Group the stages into operators and size them from the cluster's resources.

    Fetch is I/O bound and runs as light threaded tasks. The CPU stages run in an actor pool
    that leaves CPU headroom for those tasks (on a 2-CPU node, whole-CPU actors would starve
    them). Enhancement gets one GPU per actor when the cluster has GPUs, else CPU actors.
    """
    factories = stage_factories(config)
    fetch, rest = factories[0], factories[1:]
    ops = [Operator((fetch,), fetch.func.resources)]
    per_actor = config.ray.degrade_cpus_per_actor or (1.0 if cluster.cpus >= 8 else 0.75)
    headroom = 0.5 if cluster.cpus < 8 else 1.0
    cpu_actors = config.ray.degrade_actors or max(1, int((cluster.cpus - headroom) / per_actor))
    cpu_res = stages.Resources(num_cpus=per_actor, actor=True)
    # Without a stage that wants a GPU (no enhancement, or the classical enhancer) every
    # stage after Fetch runs in the one CPU actor pool.
    split = next((i for i, f in enumerate(rest) if f.func.resources.num_gpus > 0), None)
    if split is None:
        return [*ops, Operator(tuple(rest), cpu_res, cpu_actors)]
    enh = config.enhance
    budget = max(cluster.cpus - headroom, per_actor)
    if cluster.gpus >= 1 and enh.device != "cpu":
        enh_actors = enh.actors or int(cluster.gpus)
        enh_cpus = 1.0 if cluster.cpus >= 8 else 0.25
        enh_res = stages.Resources(num_cpus=enh_cpus, num_gpus=1.0, actor=True)
        left = budget - enh_actors * enh_cpus
    else:
        enh_res = stages.Resources(num_cpus=enh.cpus_per_actor, actor=True)
        enh_actors = enh.actors or max(1, int(budget / 2 / enh.cpus_per_actor))
        left = budget - enh_actors * enh.cpus_per_actor
    if not config.ray.degrade_actors:
        cpu_actors = max(1, int(left / per_actor))
    return [
        *ops,
        Operator(tuple(rest[:split]), cpu_res, cpu_actors),
        Operator((rest[split],), enh_res, enh_actors),
        Operator(tuple(rest[split + 1 :]), stages.Resources(num_cpus=0.25)),
    ]


class _Chain:
    """Runs several stages one after the other on the same rows."""

    def __init__(self, factories: tuple[Callable[[], Stage], ...]) -> None:
        self.stages = [f() for f in factories]
        self.name = "+".join(getattr(s, "name", "stage") for s in self.stages)

    def __call__(self, rows: list[dict]) -> list[dict]:
        for stage in self.stages:
            try:
                rows = stage(rows)
            except Exception as exc:  # a stage bug fails its rows, never the dataset
                from fundus_batch.schema import failed

                rows = [failed(r, getattr(stage, "name", "stage"), exc) for r in rows]
        return rows


def _read_manifest(scan: ManifestScan, config: RunConfig) -> Any:
    """The manifest as a Ray Dataset, read by Ray Data (a local file is read on this node)."""
    import pyarrow.csv as pacsv
    import pyarrow.fs as pafs
    import ray
    from fsspec.implementations.local import LocalFileSystem

    fs, path = storage.filesystem(scan.uri, config.storage_options)
    kwargs: dict[str, Any] = {"partitioning": None, "file_extensions": None, "num_cpus": PLAN_CPUS}
    if isinstance(fs, LocalFileSystem):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        path = os.path.abspath(path)
        node = ray.get_runtime_context().get_node_id()
        strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        kwargs["ray_remote_args"] = {"scheduling_strategy": strategy}
    else:
        kwargs["filesystem"] = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    if scan.kind == "parquet":
        # Ray 2.60's V2 Parquet reader lists files in a one-CPU task that no argument lightens,
        # which waits forever when the actor pools hold all but a fraction of a small node.
        ctx = ray.data.DataContext.get_current()
        v2 = getattr(ctx, "use_datasource_v2", False)
        ctx.use_datasource_v2 = False
        try:
            return ray.data.read_parquet(path, **kwargs)
        finally:
            ctx.use_datasource_v2 = v2
    return ray.data.read_csv(
        path,
        convert_options=csv_convert_options(scan.columns),
        read_options=pacsv.ReadOptions(block_size=4 << 20),
        **kwargs,
    )


def _with_cpus(ds: Any, num_cpus: float) -> Any:
    """``ds`` with its last operator asking for ``num_cpus``. Ray 2.60's ``repartition`` takes
    no resource arguments and its tasks default to one CPU, which the actor pools may hold all
    of on a small node (the run would wait forever); with the CPUs of the map before it, Ray
    fuses the two into one task."""
    args = getattr(ds._logical_plan.dag, "ray_remote_args", None)
    if isinstance(args, dict):
        args["num_cpus"] = num_cpus
    return ds


def build_dataset(
    scan: ManifestScan, done: KeySet, schema: pa.Schema, config: RunConfig, cluster: ClusterShape
) -> Any:
    """The lazy Ray Dataset of this run (nothing executes until it is iterated): the manifest
    read by Ray Data, planned on the workers, then the stages."""
    from functools import partial

    import ray

    block = config.ray.rows_per_block
    plan = _plan_udf(
        ray.put(done),
        ray.put(scan.selected_ids if scan.limited else None),
        run_variants(config),
        list(scan.passthrough.names),
        schema,
    )
    # Planning and the cut into blocks of ``block`` rows fuse into one light task that streams
    # its blocks, so the first reach the image stages while the manifest is still being planned.
    ds = _read_manifest(scan, config)
    ds = ds.map_batches(plan, batch_size=PLAN_ROWS, batch_format="pyarrow", num_cpus=PLAN_CPUS)
    ds = _with_cpus(ds.repartition(target_num_rows_per_block=block), PLAN_CPUS)
    for op in plan_operators(config, cluster):
        factory = partial(_Chain, op.factories)
        res = op.resources
        remote: dict[str, Any] = {
            "num_cpus": res.num_cpus,
            "batch_format": "pyarrow",
            "zero_copy_batch": True,
        }
        if res.num_gpus:
            remote["num_gpus"] = res.num_gpus
        if res.actor:
            ds = ds.map_batches(
                _StageUDF,
                fn_constructor_args=(factory, schema),
                compute=ray.data.ActorPoolStrategy(size=max(1, op.actors)),
                batch_size=block,
                **remote,
            )
        else:
            # Ray retries tasks and restarts actors lost to worker failures by default.
            ds = ds.map_batches(_task_udf(factory, schema), batch_size=block, **remote)
    return ds


def run(config: RunConfig, *, progress: Callable[[int, int], None] | None = None) -> RunSummary:
    """Run the pipeline described by ``config``; resumes whatever ``config.out`` already holds."""
    started = time.time()
    # One streaming pass: a bad row is rejected here, before any work, naming line and field.
    scan = scan_manifest(
        config.manifest, storage_options=config.storage_options, limit=config.limit
    )
    check_out_root(config.out)  # OUT/images or OUT/pairs linked elsewhere: refuse before work
    settings = run_settings.resolve(config)
    store = OutputStore(config.out, config.out_storage_options, retries=config.storage_retries)
    lease = OutLease(
        config.out,
        config.out_storage_options,
        ttl=config.lease.ttl,
        renew_every=config.lease.renew_every,
    )
    lease.acquire(wait=config.lease.wait)  # one writer per OUT, before anything is touched
    try:
        return _run_leased(config, scan, store, lease, settings, started, progress)
    finally:
        lease.release()


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
    progress: Callable[[int, int], None] | None,
) -> RunSummary:
    """The run itself, once this process holds the OUT lease."""
    previous = store.read_json(RUN_JSON)
    recorded = run_settings.recorded(previous) if store.shard_paths() else None
    change = run_settings.compare(recorded, settings, storage.redact(config.out))
    for note in change.notes:
        log.warning("%s", note)
    store.clean_stale()
    quarantined = store.quarantine_corrupt()
    for path in quarantined:
        log.warning("set aside unreadable shard %s; its rows will be redone", path)
    removed = store.drop_duplicates()  # left by two writers before leases existed
    if removed:
        log.warning("removed %d duplicate rows (one row kept per image and variant)", removed)
    if config.retry_failed:
        dropped = store.drop_failed()
        removed += dropped
        if dropped:
            log.warning("removed %d failed rows so that they are redone", dropped)
    if config.enhance.enabled:
        dropped = store.drop_ok_rows_without("enhanced_uri")
        removed += dropped
        if dropped:
            log.warning("%d rows lack enhancement; they are redone with it", dropped)
    variants = run_variants(config)
    # Keys of the done pairs only (16 bytes each); the workers filter the manifest with them.
    done, done_before = done_keys(store.iter_tables(["image_id", "variant"]), scan, variants)
    expected = scan.selected * len(variants)
    todo = expected - done_before
    passthrough = scan.passthrough
    out_schema = output_schema(passthrough)
    schema = work_schema(passthrough)
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
    touched = bool(todo or removed or quarantined)
    if touched:  # a run that does nothing leaves run.json as it was
        store.write_json(RUN_JSON, run_info)
    counts = Counts(rows_in=expected, done_before=done_before)
    writer = ShardWriter(store, out_schema, shard_rows=config.shard_rows)
    writer.before_commit = lease.ensure
    if todo:
        cluster = init_ray(config)
        _data_context(config)
        run_info["cluster"] = asdict(cluster)
        ds = build_dataset(scan, done, schema, config, cluster)
        seen = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if batch.num_rows == 0:
                continue
            writer.add(batch)
            counts.add(batch)
            seen += batch.num_rows
            if progress is not None:
                progress(seen, todo)
        writer.close()
    # Counts cover the whole output, including rows that earlier runs committed.
    final = Counts(rows_in=expected)
    table = store.read_table(columns=["status", "failed_stage"])
    if table is not None:
        final.add(table)
    summary = RunSummary(
        out=config.out,
        rows_in=expected,
        done_before=done_before,
        ok=final.ok,
        failed=final.failed,
        failed_by_stage=final.failed_by_stage,
        seconds=time.time() - started,
        shards=writer.shards,
    )
    state = "complete" if summary.complete else "incomplete"
    final_counts = {
        "rows_in": expected,
        "ok": final.ok,
        "failed": final.failed,
        "done_before": done_before,
        "this_run": counts.written,
        "failed_by_stage": final.failed_by_stage,
    }
    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    entry.update({"state": state, "finished": finished, "counts": final_counts})
    run_info.update(
        {"state": state, "finished": finished, "seconds": summary.seconds, "counts": final_counts}
    )
    if touched or _record_differs(previous, run_info):
        store.write_json(RUN_JSON, run_info)
    return summary


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


def shutdown() -> None:
    """Stop the local Ray instance this process started (no-op when none)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
