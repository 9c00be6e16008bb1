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
from typing import Any

import pyarrow as pa

from fundus_batch import stages
from fundus_batch.config import RunConfig
from fundus_batch.manifest import Manifest, read_manifest
from fundus_batch.output import RUN_JSON, Counts, OutputStore, ShardWriter, environment_versions
from fundus_batch.schema import (
    STATUS_OK,
    output_schema,
    to_table,
    work_schema,
)

log = logging.getLogger(__name__)

Stage = Any  # a stages.* object: .name, .resources (a class attribute), __call__(rows) -> rows


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
        return to_table(self.stage(batch.to_pylist()), self.schema)


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


def plan_rows(
    manifest: Manifest, config: RunConfig, done: set[tuple[str, int]]
) -> tuple[list[dict], int, int]:
    """Per-image work rows with their pending variants; returns (rows, expected, done_before)."""
    per_image = config.variants if config.mode == "pairs" else 1
    rows: list[dict] = []
    expected = 0
    done_before = 0
    frame = manifest.frame
    passthrough = manifest.passthrough_columns
    for rec in frame.to_dict(orient="records"):
        image_id = rec["image_id"]
        expected += per_image
        if config.mode == "pairs":
            pending = [v for v in range(config.variants) if (image_id, v) not in done]
        else:
            pending = [] if (image_id, -1) in done else [-1]
        done_before += per_image - len(pending)
        if not pending:
            continue
        row = {
            "image_id": image_id,
            "status": STATUS_OK,
            "source_uri": rec["uri"],
            "split": rec.get("split"),
            "source_mask_uri": rec.get("mask_uri"),
            "vessel_gt_uri": rec.get("vessel_uri"),
            "pending_variants": pending,
        }
        for col in passthrough:
            row[col] = rec[col]
        rows.append(row)
    return rows, expected, done_before


def _passthrough_schema(manifest: Manifest) -> pa.Schema:
    cols = manifest.passthrough_columns
    if not cols:
        return pa.schema([])
    return pa.Schema.from_pandas(manifest.frame[cols], preserve_index=False)


def stage_factories(config: RunConfig) -> list[Callable[[], Stage]]:
    """Every stage of this run, in order, as factories (each builds its stage in a worker)."""
    from functools import partial

    factories: list[Callable[[], Stage]] = [
        partial(
            stages.Fetch,
            config.storage_options,
            config.ray.fetch_threads,
            config.storage_retries,
            vessels=config.enhance.enabled,
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
    if config.enhance.enabled:
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
            config.out,
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
    if not config.enhance.enabled:
        return [*ops, Operator(tuple(rest), cpu_res, cpu_actors)]
    split = next(i for i, f in enumerate(rest) if f.func.resources.num_gpus > 0)
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


def build_dataset(rows: list[dict], schema: pa.Schema, config: RunConfig, cluster: ClusterShape):
    """The lazy Ray Dataset of this run (nothing executes until it is iterated)."""
    from functools import partial

    import ray

    block = config.ray.rows_per_block
    tables = [to_table(rows[i : i + block], schema) for i in range(0, len(rows), block)]
    ds = ray.data.from_arrow(tables)
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
    manifest = read_manifest(config.manifest, storage_options=config.storage_options)
    if config.limit is not None:
        manifest = Manifest(
            manifest.frame.head(config.limit).reset_index(drop=True), manifest.source
        )
    store = OutputStore(config.out, config.out_storage_options, retries=config.storage_retries)
    store.clean_stale()
    for path in store.quarantine_corrupt():
        log.warning("set aside unreadable shard %s; its rows will be redone", path)
    if config.retry_failed:
        dropped = store.drop_failed()
        if dropped:
            log.warning("removed %d failed rows so that they are redone", dropped)
    done = store.done_pairs()
    rows, expected, done_before = plan_rows(manifest, config, done)
    passthrough = _passthrough_schema(manifest)
    out_schema = output_schema(passthrough)
    schema = work_schema(passthrough)
    run_info: dict[str, Any] = {
        "config": config.redacted(),
        "versions": environment_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "state": "running",
        "counts": {"rows_in": expected, "done_before": done_before},
        "manifest_rows": len(manifest),
    }
    store.write_json(RUN_JSON, run_info)
    counts = Counts(rows_in=expected, done_before=done_before)
    writer = ShardWriter(store, out_schema, shard_rows=config.shard_rows)
    todo = expected - done_before
    if rows:
        cluster = init_ray(config)
        _data_context(config)
        run_info["cluster"] = asdict(cluster)
        ds = build_dataset(rows, schema, config, cluster)
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
    run_info.update(
        {
            "state": "complete" if summary.complete else "incomplete",
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": summary.seconds,
            "counts": {
                "rows_in": expected,
                "ok": final.ok,
                "failed": final.failed,
                "done_before": done_before,
                "this_run": counts.written,
                "failed_by_stage": final.failed_by_stage,
            },
        }
    )
    store.write_json(RUN_JSON, run_info)
    return summary


def shutdown() -> None:
    """Stop the local Ray instance this process started (no-op when none)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
