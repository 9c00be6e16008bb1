"""Ray Data for the pipeline: the ONLY module in fundus_batch that imports Ray.

It connects to Ray, reads and plans the manifest on the workers, and turns the run's
:class:`~fundus_batch.stages.StageSpec` list into ``map_batches`` operators. Planning is a pure
value: :func:`map_batches_calls` returns the exact arguments of every ``map_batches`` call
(:class:`MapBatchesCall`) from a config and a :class:`ClusterShape`, without Ray;
:func:`apply_calls` applies them to a Dataset. Consecutive CPU stages share one actor pool, so
the decoded images they pass each other never leave the worker; a stage that declares a GPU
(Enhance) gets its own pool, on GPUs when the cluster has them. Ray is imported inside the
functions that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import cv2
import pyarrow as pa
import pyarrow.fs as pafs

from fundus_batch.config import ConfigError
from fundus_batch.io import storage
from fundus_batch.manifest_stream import (
    CSV_PARSE_OPTIONS,
    CSV_READ_OPTIONS,
    KeySet,
    ManifestScan,
    csv_convert_options,
    plan_batch,
)
from fundus_batch.schema import to_table
from fundus_batch.stages import Chain, Resources, StageSpec, items_of, rows_of, stage_specs

if TYPE_CHECKING:
    from fundus_batch.config import RunConfig

# Manifest rows planned at a time (the workers' done-pair filter), before rows are cut into
# blocks of ``block_rows`` for the image stages.
PLAN_ROWS = 2048
# Reading and planning ask for no CPU: their tasks are light, and a planning task waits (holding
# what it asked for) until the stages take its blocks, so any CPU it held could be the share
# an actor of the stages needs on a small node, and the run would wait forever.
PLAN_CPUS = 0.0
# The label of every Ray node that carries its node id (what ``label_selector`` matches).
NODE_ID_LABEL = "ray.io/node-id"
PLANNED_COLUMNS = (
    "image_id",
    "status",
    "source_uri",
    "split",
    "source_mask_uri",
    "vessel_gt_uri",
    "pending_variants",
)


@dataclass(frozen=True)
class ClusterShape:
    """The CPUs and GPUs of the cluster a run plans for; ``fixed``: no node can join it (a
    private local instance), so its actor pools need not grow; ``cpus_per_gpu``: the fewest
    CPUs per GPU on any of its GPU nodes (None: unknown, read from the totals)."""

    cpus: float
    gpus: float
    fixed: bool = False
    cpus_per_gpu: float | None = None

    def gpu_node_cpus_per_gpu(self) -> float | None:
        """CPUs per GPU on the GPU nodes (None while the cluster has no GPU node)."""
        if self.cpus_per_gpu is not None:
            return self.cpus_per_gpu
        return self.cpus / self.gpus if self.gpus >= 1 else None


class RayStartError(RuntimeError):
    """Ray could not be started, or the cluster at the run's address could not be reached."""


class StageStartError(RayStartError):
    """A stage could not be built in a Ray worker: the root cause's one line (from the
    worker's :class:`~fundus_batch.stages.StageBuildError`), not Ray's traceback."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STAGE_BUILD = re.compile(r"^fundus_batch\.stages\.StageBuildError: (.+)$", re.MULTILINE)


def init_ray(config: RunConfig) -> ClusterShape:
    """Connect to (or start) Ray and report the cluster's CPUs and GPUs (RayStartError when
    neither works)."""
    import ray

    private = False
    if not ray.is_initialized():
        address = config.ray.address or os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
        if address:
            kwargs["address"] = address
        else:
            # "local" starts a private instance; None would join any cluster on this machine.
            kwargs["address"] = "local"
            private = True
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            kwargs["include_dashboard"] = False
            if config.ray.num_cpus is not None:
                kwargs["num_cpus"] = config.ray.num_cpus
            if config.ray.num_gpus is not None:
                kwargs["num_gpus"] = config.ray.num_gpus
        try:
            ray.init(**kwargs)
        except Exception as exc:
            where = "a local Ray instance" if private else f"the Ray cluster at {address}"
            raise RayStartError(
                f"could not start or reach {storage.redact(where)}: {type(exc).__name__}: {exc}"
            ) from exc
    res = ray.cluster_resources()
    # A head started with --num-cpus=0 and no worker yet has no "CPU" key at all.
    cpus, gpus = float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))
    return ClusterShape(
        cpus=cpus, gpus=gpus, fixed=private, cpus_per_gpu=_cpus_per_gpu(ray.nodes())
    )


def _cpus_per_gpu(nodes: Sequence[dict[str, Any]]) -> float | None:
    """The fewest CPUs per GPU among the live GPU nodes of ``ray.nodes()`` (None: none)."""
    ratios = [
        float(n["Resources"].get("CPU", 0.0)) / float(n["Resources"]["GPU"])
        for n in nodes
        if n.get("Alive") and float(n.get("Resources", {}).get("GPU", 0.0)) > 0
    ]
    return min(ratios) if ratios else None


def configure_data_context() -> None:
    """Ray Data settings of a run: no Ray progress bars or verbose stats, no ordering."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_stats_logs = False
    ctx.execution_options.preserve_order = False


@contextlib.contextmanager
def connected(config: RunConfig) -> Iterator[ClusterShape]:
    """Ray for one run: :func:`init_ray` unless this process is connected already, and on exit
    a disconnect (a local instance stops) only if the connection was made here, so that Ray's
    last messages come out while the caller's console settings still hold."""
    import ray

    here = not ray.is_initialized()
    cluster = init_ray(config)
    try:
        yield cluster
    finally:
        if here:
            ray.shutdown()


def shutdown() -> None:
    """Stop the local Ray instance this process started (no-op when none)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


# --- the stages as Ray Data UDFs -----------------------------------------------------------


class StageUDF:
    """Stages as a Ray Data UDF: Arrow batch in, Arrow batch (fixed schema) out.

    The stages are built from their specs inside the worker, so models load in workers only.
    Rows become items once per batch and back once: between the chained stages the images stay
    decoded.
    """

    def __init__(self, specs: Sequence[StageSpec], schema: pa.Schema, cpus: float = 1.0) -> None:
        # OpenCV would run a thread per core in every worker; each has its own CPU share.
        cv2.setNumThreads(max(1, round(cpus)))
        self.chain = Chain(specs)
        self.schema = schema

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        if batch.num_columns < len(self.schema):  # planned rows carry only the manifest's columns
            blank = dict.fromkeys(self.schema.names)
            rows = [{**blank, **row} for row in rows]
        return to_table(rows_of(self.chain.process(items_of(rows))), self.schema)


class TaskUDF:
    """A :class:`StageUDF` for task operators: a picklable callable that builds its stages on
    its first batch in each worker process."""

    def __init__(self, specs: Sequence[StageSpec], schema: pa.Schema, cpus: float = 1.0) -> None:
        self.specs = tuple(specs)
        self.schema = schema
        self.cpus = cpus
        self._udf: StageUDF | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"specs": self.specs, "schema": self.schema, "cpus": self.cpus, "_udf": None}

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self._udf is None:
            self._udf = StageUDF(self.specs, self.schema, self.cpus)
        return self._udf(batch)


# --- planning: pure values ------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """Consecutive stages that run in one worker, with what each worker gets, how many actors
    it starts with (0: tasks) and how many it may grow to as nodes join (None: no limit)."""

    specs: tuple[StageSpec, ...]
    resources: Resources
    actors: int = 0
    max_actors: int | None = 0


def _bounds(
    planned: int, start: int | None, most: int | None, cluster: ClusterShape
) -> tuple[int, int | None]:
    """(start, most) actors of a pool: what the cluster has room for now (``planned``) unless
    the user set a start, within the user's bound; a start without a bound, or a cluster no
    node can join, fixes the pool."""
    if start is None:
        start = planned if most is None else min(planned, most)
    elif most is None:
        most = start
    return start, start if cluster.fixed else most


def gpu_actors_per_gpu(cluster: ClusterShape) -> int:
    """Enhancement actors that share one GPU: one per 3 CPUs a GPU node has per GPU, 1 to 6;
    one while no GPU node has joined (its CPUs are not known yet).

    Each actor decodes its inputs and encodes its outputs on its own CPU (about 27 ms an image
    at 512 px, on the lent H200 machine), which caps one actor near 37 images/s while the
    shipped model runs at over 3,000 on the GPU; actors side by side lift that cap. The CPUs
    are the GPU node's own: a cluster's total would plan more actors than a node can hold."""
    per_gpu = cluster.gpu_node_cpus_per_gpu()
    if per_gpu is None:
        return 1
    return max(1, min(6, int(per_gpu) // 3))


def plan_pools(config: RunConfig, cluster: ClusterShape) -> list[Pool]:
    """Group the run's stages into pools and size them from the cluster's resources.

    Fetch runs in the first CPU actor pool, ahead of the stages that decode what it read (its
    threads still overlap the downloads), so raw source bytes never cross the object store.
    Without a GPU stage every stage runs in that one pool, of whole-CPU actors that may take
    every CPU (reading and planning ask for none). A stage that declares a GPU (Enhance) gets
    its own pool, several actors to a GPU when the cluster has GPUs (:func:`gpu_actors_per_gpu`),
    else CPU actors; the stages after it run as light tasks, so the actor pools then leave CPU
    headroom for them.

    Each actor pool starts with what the cluster has room for when the run starts and grows
    (Ray Data's actor autoscaling, which asks an autoscaling cluster for nodes) as nodes join,
    up to ``ray.max_degrade_actors`` / ``enhance.max_actors``; ``ray.degrade_actors`` /
    ``enhance.actors`` set the start, and fix the pool when no bound is given.
    """
    specs = stage_specs(config)
    ray_opts = config.ray
    split = next((i for i, s in enumerate(specs) if s.resources.num_gpus > 0), None)
    if split is None:
        per_actor = ray_opts.degrade_cpus_per_actor or 1.0
        cpu = _bounds(
            max(1, int(cluster.cpus / per_actor)),
            ray_opts.degrade_actors,
            ray_opts.max_degrade_actors,
            cluster,
        )
        return [Pool(tuple(specs), Resources(num_cpus=per_actor, actor=True), *cpu)]
    # Fractional actors leave room for the tail's tasks on a small machine; a cluster that
    # nodes can join says nothing of their size at the start: whole CPUs.
    small = cluster.fixed and cluster.cpus < 8
    per_actor = ray_opts.degrade_cpus_per_actor or (0.75 if small else 1.0)
    headroom = 0.5 if cluster.cpus < 8 else 1.0
    budget = max(cluster.cpus - headroom, per_actor)
    enh = config.enhance
    if enh.device == "cuda" and cluster.gpus < 1 and cluster.fixed:
        raise ConfigError(
            "enhance.device is 'cuda' but the local Ray instance has no GPU (ray.num_gpus, or "
            "run on a cluster with GPU nodes)"
        )
    # Asked for CUDA, GPU actors wait for a GPU node that an autoscaling cluster adds.
    if (cluster.gpus >= 1 and enh.device != "cpu") or enh.device == "cuda":
        gpus = max(1, int(cluster.gpus))
        enh_bounds = _bounds(
            gpus * gpu_actors_per_gpu(cluster), enh.actors, enh.max_actors, cluster
        )
        per_gpu = cluster.gpu_node_cpus_per_gpu()
        enh_cpus = 1.0 if per_gpu is None or per_gpu >= 8 else 0.25
        share = 1.0 / math.ceil(enh_bounds[0] / gpus)  # actors sharing a GPU must fit on it
        enh_res = Resources(num_cpus=enh_cpus, num_gpus=share, actor=True)
    else:
        enh_res = Resources(num_cpus=enh.cpus_per_actor, actor=True)
        planned = max(1, int(budget / 2 / enh.cpus_per_actor))
        enh_bounds = _bounds(planned, enh.actors, enh.max_actors, cluster)
    left = budget - enh_bounds[0] * enh_res.num_cpus
    cpu = _bounds(
        max(1, int(left / per_actor)),
        ray_opts.degrade_actors,
        ray_opts.max_degrade_actors,
        cluster,
    )
    return [
        Pool(tuple(specs[:split]), Resources(num_cpus=per_actor, actor=True), *cpu),
        Pool((specs[split],), enh_res, *enh_bounds),
        Pool(tuple(specs[split + 1 :]), Resources(num_cpus=0.25)),
    ]


def block_rows(config: RunConfig, cluster: ClusterShape, images: int) -> int:
    """Planned rows (images) per block: ``ray.rows_per_block``, or fewer when the run has too
    few images to give each actor of the first pool two blocks. Seven images in blocks of
    eight would be one block: one busy actor, and a progress bar that moves once, at the end."""
    actors = max(1, plan_pools(config, cluster)[0].actors)
    return max(1, min(config.ray.rows_per_block, math.ceil(images / (2 * actors))))


@dataclass(frozen=True)
class MapBatchesCall:
    """The arguments of one ``Dataset.map_batches`` call. ``compute`` ``actors`` means an
    actor pool of ``pool_size`` actors that may grow to ``max_pool_size`` (None: no limit;
    equal: a fixed pool), see :meth:`strategy_kwargs`; ``tasks`` means Ray's default task
    pool."""

    specs: tuple[StageSpec, ...]
    fn: Callable[[pa.Table], pa.Table] | type[StageUDF]
    fn_constructor_args: tuple[Any, ...] | None
    compute: Literal["tasks", "actors"]
    pool_size: int | None
    max_pool_size: int | None
    num_cpus: float
    num_gpus: float
    batch_size: int
    batch_format: str = "pyarrow"
    zero_copy_batch: bool = True

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``map_batches`` besides ``fn`` and ``compute``."""
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size,
            "batch_format": self.batch_format,
            "zero_copy_batch": self.zero_copy_batch,
            "num_cpus": self.num_cpus,
        }
        if self.num_gpus:
            kwargs["num_gpus"] = self.num_gpus
        if self.fn_constructor_args is not None:
            kwargs["fn_constructor_args"] = self.fn_constructor_args
        return kwargs

    def strategy_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``ActorPoolStrategy`` for an actor pool."""
        if self.max_pool_size == self.pool_size:
            return {"size": self.pool_size}
        return {"min_size": self.pool_size, "max_size": self.max_pool_size}


def map_batches_calls(
    config: RunConfig, cluster: ClusterShape, schema: pa.Schema, rows_per_block: int | None = None
) -> list[MapBatchesCall]:
    """Every ``map_batches`` call of the run's stages, in order (no Ray needed); batches of
    ``rows_per_block`` rows (default ``ray.rows_per_block``, see :func:`block_rows`)."""
    calls = []
    for pool in plan_pools(config, cluster):
        res = pool.resources
        common: dict[str, Any] = {
            "specs": pool.specs,
            "num_cpus": res.num_cpus,
            "num_gpus": res.num_gpus,
            "batch_size": rows_per_block or config.ray.rows_per_block,
        }
        if res.actor:
            call = MapBatchesCall(
                fn=StageUDF,
                fn_constructor_args=(pool.specs, schema, res.num_cpus),
                compute="actors",
                pool_size=max(1, pool.actors),
                max_pool_size=pool.max_actors,
                **common,
            )
        else:
            # Ray retries tasks and restarts actors lost to worker failures by default.
            call = MapBatchesCall(
                fn=TaskUDF(pool.specs, schema, res.num_cpus),
                fn_constructor_args=None,
                compute="tasks",
                pool_size=None,
                max_pool_size=None,
                **common,
            )
        calls.append(call)
    return calls


def apply_calls(ds: Any, calls: Sequence[MapBatchesCall]) -> Any:
    """``ds`` with each call's ``map_batches`` applied in order."""
    import ray

    for call in calls:
        kwargs = call.kwargs()
        if call.compute == "actors":
            kwargs["compute"] = ray.data.ActorPoolStrategy(**call.strategy_kwargs())
        ds = ds.map_batches(call.fn, **kwargs)
    return ds


# --- the manifest --------------------------------------------------------------------------


def _plan_udf(
    done_ref: Any, selected_ref: Any, variants: list[int], passthrough: list[str], schema: pa.Schema
) -> Callable[[pa.Table], Iterator[pa.Table]]:
    """Planning on the workers: a read block of the manifest in, its pending work rows out,
    ``PLAN_ROWS`` manifest rows at a time (the done set and the ``--limit`` selection arrive
    through the object store, fetched once per task)."""
    narrow = pa.schema([schema.field(n) for n in (*PLANNED_COLUMNS, *passthrough)])
    sets: list[tuple[KeySet, KeySet | None]] = []

    def apply(block: pa.Table) -> Iterator[pa.Table]:
        import ray

        if not sets:
            sets.append((ray.get(done_ref), ray.get(selected_ref)))
        done, selected = sets[0]
        for start in range(0, block.num_rows, PLAN_ROWS):
            batch = block.slice(start, PLAN_ROWS)
            yield to_table(plan_batch(batch, done, selected, variants, passthrough), narrow)

    return apply


def read_manifest(scan: ManifestScan, config: RunConfig) -> Any:
    """The manifest as a Ray Dataset, read by Ray Data (a local file is read on this node)."""
    import ray
    from fsspec.implementations.local import LocalFileSystem

    fs, path = storage.filesystem(scan.uri, config.storage_options)
    kwargs: dict[str, Any] = {
        "partitioning": None,
        "file_extensions": None,
        "num_cpus": PLAN_CPUS,
        # One read block, planned by one streaming task: every planning task (it asks for no
        # CPU) holds a worker process of its own, so more blocks meant more processes, and more
        # memory, the longer the manifest.
        "override_num_blocks": 1,
    }
    if isinstance(fs, LocalFileSystem):
        # Read on this (the driver's) node: other nodes may not have the file.
        path = os.path.abspath(path)
        kwargs["label_selector"] = {NODE_ID_LABEL: ray.get_runtime_context().get_node_id()}
    else:
        handler = _RetryingHandler(fs, scan.source, config.storage_retries)
        kwargs["filesystem"] = pafs.PyFileSystem(handler)
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
        read_options=CSV_READ_OPTIONS,
        parse_options=CSV_PARSE_OPTIONS,
        **kwargs,
    )


class _RetryingHandler(pafs.FSSpecHandler):
    """pyarrow's fsspec handler with the project's retries on the calls that read a manifest.

    The plain handler asks ``isfile`` before opening, which answers False during an endpoint
    outage, so a short outage became "FileNotFoundError" and stopped the run."""

    def __init__(self, fs: Any, source: str, retries: int) -> None:
        super().__init__(fs)
        self.source, self.retries = source, retries

    def __reduce__(self) -> tuple[Any, ...]:
        return _RetryingHandler, (self.fs, self.source, self.retries)

    def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        return storage.with_retries(what, self.source, fn, retries=self.retries)

    def get_file_info(self, paths: list[str]) -> Any:
        return self._retry("checking", lambda: super(_RetryingHandler, self).get_file_info(paths))

    def open_input_stream(self, path: str) -> Any:
        opened = self._retry("reading", lambda: self.fs.open(path, mode="rb"))
        return pa.PythonFile(opened, mode="r")

    def open_input_file(self, path: str) -> Any:
        return self.open_input_stream(path)


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
    scan: ManifestScan,
    done: KeySet,
    schema: pa.Schema,
    config: RunConfig,
    cluster: ClusterShape,
    variants: list[int],
) -> Any:
    """The lazy Ray Dataset of a run (nothing executes until it is iterated): the manifest read
    by Ray Data, planned on the workers (``variants`` per image), then the stages."""
    import ray

    plan = _plan_udf(
        ray.put(done),
        ray.put(scan.selected_ids if scan.limited else None),
        variants,
        list(scan.passthrough.names),
        schema,
    )
    # Reading, planning and the cut into blocks fuse into one light task that streams its
    # blocks, so the first reach the image stages while the manifest is still being read, and no
    # worker process is started for planning alone. The plan takes whole read blocks (a batch
    # size would keep Ray Data from fusing it with the read) and yields PLAN_ROWS at a time.
    rows = block_rows(config, cluster, scan.selected)
    ds = read_manifest(scan, config)
    ds = ds.map_batches(plan, batch_size=None, batch_format="pyarrow", num_cpus=PLAN_CPUS)
    ds = _with_cpus(ds.repartition(target_num_rows_per_block=rows), PLAN_CPUS)
    return apply_calls(ds, map_batches_calls(config, cluster, schema, rows))


def iter_tables(ds: Any) -> Iterator[pa.Table]:
    """The output blocks of a dataset as Arrow tables, as they finish (empty ones skipped).
    A stage that could not be built in a worker raises :class:`StageStartError`."""
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if batch.num_rows:
                yield batch
    except Exception as exc:
        # Ray reports an actor's failed constructor as its whole traceback, as text.
        causes = _STAGE_BUILD.findall(_ANSI.sub("", str(exc)))
        if not causes:
            raise
        raise StageStartError(causes[-1].strip()) from exc
