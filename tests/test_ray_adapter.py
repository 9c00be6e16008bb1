"""The Ray adapter: the exact ``map_batches`` arguments planned for each cluster and config,
the arguments that reach Ray Data, and that no other module imports Ray."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from fundus_batch import ray_adapter
from fundus_batch.config import ConfigError, build_config
from fundus_batch.enhance import ClassicalEnhance, Enhance
from fundus_batch.ray_adapter import (
    ClusterShape,
    MapBatchesCall,
    StageUDF,
    TaskUDF,
    _cpus_per_gpu,
    apply_calls,
    block_rows,
    init_ray,
    map_batches_calls,
)
from fundus_batch.schema import work_schema
from fundus_batch.stages import Degrade, Fetch, Preprocess, Score, Write

PACKAGE = Path(__file__).resolve().parents[1] / "fundus_batch"
REPO = Path(__file__).resolve().parents[1]
SCHEMA = work_schema()


def _config(**extra: Any):
    data: dict[str, Any] = {"manifest": "m.csv", "out": "/tmp/out", "variants": 1, "size": 256}
    data.update(extra)
    return build_config(data, "test")


def _calls(cluster: ClusterShape, **extra: Any) -> list[MapBatchesCall]:
    return map_batches_calls(_config(**extra), cluster, SCHEMA)


def _classes(call: MapBatchesCall) -> list[type]:
    return [s.cls for s in call.specs]


def test_cpu_only_two_cpu_cluster_plans_one_actor_pool_from_fetch_to_write():
    [pool] = _calls(ClusterShape(cpus=2, gpus=0))
    assert _classes(pool) == [Fetch, Preprocess, Score, Degrade, Score, Write]
    assert (pool.compute, pool.pool_size, pool.fn) == ("actors", 2, StageUDF)
    assert pool.fn_constructor_args == (pool.specs, SCHEMA, 1.0)
    # No fetch tasks to leave room for (reading and planning ask for no CPU): whole-CPU actors.
    assert pool.kwargs() == {
        "batch_size": 8,
        "batch_format": "pyarrow",
        "zero_copy_batch": True,
        "num_cpus": 1.0,
        "fn_constructor_args": (pool.specs, SCHEMA, 1.0),
    }


def test_cpu_actor_size_and_count_follow_the_ray_options():
    [pool] = _calls(ClusterShape(cpus=8, gpus=0), ray={"degrade_cpus_per_actor": 2.0})
    assert (pool.pool_size, pool.num_cpus, pool.fn_constructor_args[2]) == (4, 2.0, 2.0)
    [pool] = _calls(ClusterShape(cpus=8, gpus=0), ray={"degrade_actors": 3})
    assert (pool.pool_size, pool.num_cpus) == (3, 1.0)


def test_pools_start_with_what_fits_and_grow_as_nodes_join_up_to_the_bound():
    growing = ClusterShape(cpus=8, gpus=0)
    [pool] = _calls(growing)
    assert (pool.pool_size, pool.max_pool_size) == (8, None)
    assert pool.strategy_kwargs() == {"min_size": 8, "max_size": None}
    [pool] = _calls(growing, ray={"max_degrade_actors": 20})
    assert pool.strategy_kwargs() == {"min_size": 8, "max_size": 20}
    [pool] = _calls(growing, ray={"max_degrade_actors": 3})  # the bound caps the start too
    assert pool.strategy_kwargs() == {"size": 3}
    [pool] = _calls(growing, ray={"degrade_actors": 2})  # a start without a bound: fixed
    assert pool.strategy_kwargs() == {"size": 2}
    [pool] = _calls(growing, ray={"degrade_actors": 2, "max_degrade_actors": 12})
    assert pool.strategy_kwargs() == {"min_size": 2, "max_size": 12}
    # A private local instance never gains a node: fixed pools, whatever the bounds.
    [pool] = _calls(ClusterShape(cpus=8, gpus=0, fixed=True), ray={"max_degrade_actors": 20})
    assert pool.strategy_kwargs() == {"size": 8}


def test_the_gpu_pool_grows_with_gpu_nodes_at_the_share_planned_for_the_first():
    cpu, gpu, tail = _calls(ClusterShape(cpus=16, gpus=1), enhance={"enabled": True})
    assert gpu.strategy_kwargs() == {"min_size": 5, "max_size": None} and gpu.num_gpus == 0.2
    assert cpu.strategy_kwargs() == {"min_size": 10, "max_size": None}  # 16 - 1 - 5
    assert tail.compute == "tasks" and tail.pool_size is None
    [_, gpu, _] = _calls(
        ClusterShape(cpus=16, gpus=1), enhance={"enabled": True, "actors": 2, "max_actors": 8}
    )
    assert gpu.strategy_kwargs() == {"min_size": 2, "max_size": 8} and gpu.num_gpus == 0.5
    [_, gpu, _] = _calls(ClusterShape(cpus=16, gpus=1, fixed=True), enhance={"enabled": True})
    assert gpu.strategy_kwargs() == {"size": 5}


def test_cuda_asked_of_a_cluster_without_gpus_waits_for_gpu_nodes_unless_none_can_join():
    # An autoscaling cluster adds a GPU node for the pending GPU actor.
    cpu, gpu, _ = _calls(ClusterShape(cpus=4, gpus=0), enhance={"enabled": True, "device": "cuda"})
    assert (gpu.num_gpus, gpu.strategy_kwargs()) == (1.0, {"min_size": 1, "max_size": None})
    assert cpu.num_gpus == 0
    # auto on a cluster without GPUs stays on CPU actors.
    [_, enh, _] = _calls(ClusterShape(cpus=4, gpus=0), enhance={"enabled": True})
    assert enh.num_gpus == 0
    with pytest.raises(ConfigError, match="local Ray instance has no GPU"):
        _calls(
            ClusterShape(cpus=4, gpus=0, fixed=True), enhance={"enabled": True, "device": "cuda"}
        )


@pytest.mark.parametrize(
    ("section", "start", "most"),
    [("ray", "degrade_actors", "max_degrade_actors"), ("enhance", "actors", "max_actors")],
)
def test_a_bound_below_the_start_is_refused_naming_both_fields(
    section: str, start: str, most: str
) -> None:
    with pytest.raises(ConfigError, match=rf"{most} \(2\) is below {start} \(4\)"):
        _config(**{section: {start: 4, most: 2}})


def test_stage_workers_size_opencv_threads_to_their_cpu_share():
    import cv2

    specs = _calls(ClusterShape(cpus=2, gpus=0))[0].specs
    before = cv2.getNumThreads()
    try:
        StageUDF(specs, SCHEMA, 1.0)
        assert cv2.getNumThreads() == 1
        StageUDF(specs, SCHEMA, 2.0)
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)


def test_gpu_cluster_gives_cofenet_its_own_pool_of_actors_sharing_each_gpu():
    calls = _calls(ClusterShape(cpus=16, gpus=2), enhance={"enabled": True})
    cpu, gpu, tail = calls
    assert _classes(cpu) == [Fetch, Preprocess, Score, Degrade]
    assert _classes(gpu) == [Enhance] and _classes(tail) == [Score, Write]
    # 8 CPUs per GPU: two actors share each GPU, half a GPU and one CPU each.
    assert (gpu.compute, gpu.pool_size, gpu.num_gpus, gpu.num_cpus) == ("actors", 4, 0.5, 1.0)
    assert gpu.kwargs()["num_gpus"] == 0.5
    assert gpu.kwargs()["fn_constructor_args"] == (gpu.specs, SCHEMA, 1.0)
    # 16 CPUs less one of headroom and one per GPU actor: 11 whole-CPU actors for the rest.
    assert (cpu.compute, cpu.pool_size, cpu.num_cpus, cpu.num_gpus) == ("actors", 11, 1.0, 0.0)
    assert "num_gpus" not in cpu.kwargs()
    assert (tail.compute, tail.num_cpus, tail.num_gpus) == ("tasks", 0.25, 0.0)
    assert isinstance(tail.fn, TaskUDF) and tail.fn.specs == tail.specs and tail.fn.cpus == 0.25
    enhance = gpu.specs[0].kwargs
    assert enhance["source_role"] == "degraded" and enhance["image_format"] == "png"
    assert enhance["weights"] == "fundus-cofenet-small" and enhance["batch_size"] == 4
    assert enhance["max_change"] is None
    [_, limited, _] = _calls(
        ClusterShape(cpus=16, gpus=2), enhance={"enabled": True, "max_change": 40}
    )
    assert limited.specs[0].kwargs["max_change"] == 40


@pytest.mark.parametrize(
    ("cpus", "gpus", "actors", "share"),  # actors: all of them, on every GPU
    [(4, 1, 1, 1.0), (8, 1, 2, 0.5), (16, 1, 5, 0.2), (64, 1, 6, 1 / 6), (16, 4, 4, 1.0)],
)
def test_gpu_actors_per_gpu_follow_the_cpus_each_gpu_has(
    cpus: int, gpus: int, actors: int, share: float
) -> None:
    [_, gpu, _] = _calls(ClusterShape(cpus=cpus, gpus=gpus), enhance={"enabled": True})
    assert (gpu.pool_size, gpu.num_gpus) == (actors, pytest.approx(share))


def test_gpu_actors_are_sized_by_a_gpu_nodes_own_cpus_not_the_cluster_total():
    # 656 CPUs and 4 GPUs in all, but each GPU node has 4 CPUs: one actor per GPU, as many as
    # those nodes can hold (the totals would plan six 1-CPU actors to a 4-CPU node).
    shape = ClusterShape(cpus=656, gpus=4, cpus_per_gpu=4.0)
    [_, gpu, _] = _calls(shape, enhance={"enabled": True})
    assert (gpu.pool_size, gpu.num_gpus, gpu.num_cpus) == (4, 1.0, 0.25)


def test_a_bare_head_plans_whole_cpu_actors_and_one_gpu_actor_per_gpu_to_come():
    # A head started with no CPUs and no worker yet: nothing is known of the nodes to come.
    cpu, gpu, _ = _calls(ClusterShape(cpus=0, gpus=0), enhance={"enabled": True, "device": "cuda"})
    assert (cpu.num_cpus, cpu.strategy_kwargs()) == (1.0, {"min_size": 1, "max_size": None})
    assert (gpu.num_gpus, gpu.num_cpus) == (1.0, 1.0)
    assert gpu.strategy_kwargs() == {"min_size": 1, "max_size": None}


def test_cpus_per_gpu_is_the_smallest_ratio_among_live_gpu_nodes():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0}},
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
        {"Alive": False, "Resources": {"CPU": 1.0, "GPU": 1.0}},
        {"Alive": True, "Resources": {"CPU": 2.0}},
    ]
    assert _cpus_per_gpu(nodes) == 4.0
    assert _cpus_per_gpu(nodes[3:]) is None


def test_init_ray_reads_the_gpu_nodes_cpus_from_the_cluster(ray_cluster: None) -> None:
    cluster = init_ray(_config())
    assert (cluster.cpus, cluster.gpus, cluster.cpus_per_gpu) == (2.0, 1.0, 2.0)


def test_actors_set_by_the_user_share_the_gpus_so_that_all_fit():
    [_, gpu, _] = _calls(ClusterShape(cpus=16, gpus=2), enhance={"enabled": True, "actors": 3})
    # Three actors on two GPUs: two share one GPU, so each asks for half of one.
    assert (gpu.pool_size, gpu.num_gpus) == (3, 0.5)


def test_cpu_only_cluster_runs_cofenet_on_cpu_actors_within_the_cpus():
    calls = _calls(ClusterShape(cpus=16, gpus=0), enhance={"enabled": True})
    assert all(c.num_gpus == 0 and "num_gpus" not in c.kwargs() for c in calls)
    [enhance] = [c for c in calls if Enhance in _classes(c)]
    assert enhance.compute == "actors" and enhance.num_cpus == 1.0
    actors = [c for c in calls if c.compute == "actors"]
    assert sum(c.num_cpus * (c.pool_size or 1) for c in actors) <= 16


def test_metrics_off_plans_no_score_stage_and_fetches_no_vessel_maps():
    calls = _calls(ClusterShape(cpus=2, gpus=0), compute_metrics=False)
    assert [_classes(c) for c in calls] == [[Fetch, Preprocess, Degrade, Write]]
    assert calls[0].specs[0].kwargs["vessels"] is False


def test_classical_enhancement_joins_the_cpu_pool_even_on_a_gpu_cluster():
    calls = _calls(
        ClusterShape(cpus=8, gpus=1),
        enhance={"enabled": True, "enhancer": "classical"},
        image_format="jpeg",
    )
    assert [_classes(c) for c in calls] == [
        [Fetch, Preprocess, Score, Degrade, ClassicalEnhance, Score, Write],
    ]
    assert all(c.num_gpus == 0 for c in calls)
    classical = calls[0].specs[4].kwargs
    assert classical == {"source_role": "degraded", "image_format": "jpeg", "jpeg_quality": 95}


def test_enhance_mode_enhances_the_clean_image():
    calls = _calls(ClusterShape(cpus=2, gpus=1), mode="enhance", enhance={"enabled": True})
    [enhance] = [c for c in calls if Enhance in _classes(c)]
    assert enhance.specs[0].kwargs["source_role"] == "clean"
    assert enhance.num_gpus == 1.0 and enhance.pool_size == 1


@pytest.mark.parametrize(
    ("images", "cpus", "rows"),
    [(7, 2, 2), (1, 2, 1), (32, 2, 8), (10_000, 2, 8), (40, 16, 2), (0, 2, 1)],
)
def test_small_runs_get_smaller_blocks_so_every_actor_has_two(images: int, cpus: int, rows: int):
    assert block_rows(_config(), ClusterShape(cpus=cpus, gpus=0), images) == rows


def test_rows_per_block_is_the_most_per_block_and_the_batches_follow_the_blocks():
    config = _config(ray={"rows_per_block": 3})
    assert block_rows(config, ClusterShape(cpus=2, gpus=0), 10_000) == 3
    calls = map_batches_calls(_config(), ClusterShape(cpus=2, gpus=0), SCHEMA, rows_per_block=2)
    assert [c.batch_size for c in calls] == [2]


def test_no_module_but_the_adapter_imports_ray():
    importers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.append(path.relative_to(PACKAGE).as_posix())
    assert importers and set(importers) == {"ray_adapter.py"}


def test_the_real_map_batches_receives_the_planned_arguments(ray_cluster, tmp_path, monkeypatch):
    """Apply the calls of a 2-CPU plan to a tiny real dataset, record what Ray Data's
    ``map_batches`` is given, and run it to written pairs."""
    import ray

    from fundus_batch.io.codecs import encode_jpeg
    from fundus_batch.synth import synth_fundus

    paths = []
    for i in range(2):
        path = tmp_path / f"img{i}.jpg"
        path.write_bytes(encode_jpeg(synth_fundus(400, seed=i, canvas=(480, 420)).image))
        paths.append(str(path))
    out = tmp_path / "out"
    config = _config(out=str(out), variants=2, ray={"rows_per_block": 2})
    calls = map_batches_calls(config, ClusterShape(cpus=2, gpus=0), SCHEMA)

    seen: list[tuple[Any, dict[str, Any]]] = []
    original = ray.data.Dataset.map_batches

    def recording(self, fn, **kwargs):
        seen.append((fn, kwargs))
        return original(self, fn, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", recording)
    planned = pa.table(
        {
            "image_id": [f"img{i}" for i in range(2)],
            "status": ["ok", "ok"],
            "source_uri": paths,
            "pending_variants": pa.array([[0, 1], [0, 1]], pa.list_(pa.int32())),
        }
    )
    ds = apply_calls(ray.data.from_arrow(planned), calls)
    assert len(seen) == len(calls) == 1
    for (fn, kwargs), call in zip(seen, calls, strict=True):
        compute = kwargs.pop("compute", None)
        assert fn is call.fn and kwargs == call.kwargs()
        if call.compute == "actors":
            assert isinstance(compute, ray.data.ActorPoolStrategy)
            # The cluster can gain nodes: the pool starts with both CPUs and may grow.
            assert (compute.min_size, compute.max_size) == (2, float("inf"))
        else:
            assert compute is None
    rows = [r for t in ray_adapter.iter_tables(ds) for r in t.to_pylist()]
    assert sorted((r["image_id"], r["variant"]) for r in rows) == [
        ("img0", 0),
        ("img0", 1),
        ("img1", 0),
        ("img1", 1),
    ]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert all(r["clean_png"] is None and r["degraded_png"] is None for r in rows)
    for r in rows:
        assert (out / r["degraded_uri"]).is_file() and r["psnr_degraded"] > 10


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_reading_and_planning_the_manifest_fuse_into_one_task_before_the_stages(
    ray_cluster, tmp_path, capsys, monkeypatch, kind
):
    """Read, plan and the cut into blocks run as one task (one worker process, not three), then
    the stages' actor pool; planned PLAN_ROWS rows at a time, every pending pair comes out once
    (here as a failed row: the files do not exist)."""
    from fundus_batch.manifest_stream import KeySet, scan_manifest

    monkeypatch.setattr(ray_adapter, "PLAN_ROWS", 2)
    ids = ["a", "b", "c", "d", "e"]
    frame = pa.table({"image_id": ids, "uri": [f"/nowhere/{i}.jpg" for i in ids]})
    path = tmp_path / f"m.{kind}"
    if kind == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(frame, path)
    else:
        import pyarrow.parquet as pq

        pq.write_table(frame, path)
    config = _config(manifest=str(path), out=str(tmp_path / "out"), variants=2)
    scan = scan_manifest(str(path))
    ds = ray_adapter.build_dataset(
        scan, KeySet.of([]), SCHEMA, config, ClusterShape(cpus=2, gpus=0), [0, 1]
    )
    ds.explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    operators = [line.strip(" +-") for line in optimized.splitlines() if "[" in line]
    reader = "ReadCSV" if kind == "csv" else "ReadParquet"
    assert operators == [
        "ActorPoolMapOperator[MapBatches(StageUDF)]",
        f"TaskPoolMapOperator[{reader}->MapBatches(apply)->StreamingRepartition"
        "[num_rows_per_block=2,strict=False]]",  # 5 images, 2 actors: blocks of 2
        "InputDataBuffer[Input]",
    ], operators
    rows = [r for t in ray_adapter.iter_tables(ds) for r in t.to_pylist()]
    assert sorted((r["image_id"], r["variant"]) for r in rows) == [
        (i, v) for i in ids for v in (0, 1)
    ]
    assert {(r["status"], r["failed_stage"]) for r in rows} == {("failed", "fetch")}


def test_stage_specs_are_checked_against_the_stage_signature():
    from fundus_batch.stages import StageSpec

    with pytest.raises(TypeError, match="Degrade"):
        StageSpec(Degrade, {"seed": 1, "variant": 2, "types": ["111"]})
    spec = StageSpec(Preprocess, {"size": 128})
    assert spec.name == "preprocess" and spec.resources == Preprocess.resources
    stage = spec.build()
    assert isinstance(stage, Preprocess) and stage.size == 128


RUN_ALONE = """
import ray
from fundus_batch.config import ConfigError, build_config
from fundus_batch.ray_adapter import connected

config = build_config({"manifest": "m.csv", "out": "o", "ray": {"num_cpus": 1}}, "test")
with connected(config) as cluster:
    inside = ray.is_initialized()
print(inside, ray.is_initialized(), cluster.cpus)
"""


def test_a_run_that_connected_to_ray_disconnects_at_its_end() -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", RUN_ALONE], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "False", "1.0"]


def test_a_run_inside_an_existing_connection_leaves_it_open(ray_cluster: None) -> None:
    import ray

    with ray_adapter.connected(_config()) as cluster:
        assert cluster.gpus == 1.0  # the fixture's instance, not a new one
    assert ray.is_initialized()


def _sees_a_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_sees_a_gpu(), reason="its workers must see no GPU")
def test_a_stage_that_cannot_start_in_its_workers_stops_the_run_with_its_root_cause(
    ray_cluster: None, tmp_path: Path
) -> None:
    """Not Ray's 100-line traceback of the actor's constructor, on the console and, with
    terminal colour codes, in run.json: one line naming the stage and what stopped it."""
    from fundus_batch import pipeline
    from tests.pipeline_inputs import write_inputs

    manifest = write_inputs(tmp_path / "in", n_good=1, broken=False)
    out = tmp_path / "out"
    data = {"manifest": str(manifest), "out": str(out), "mode": "enhance", "size": 192}
    # The driver cannot check the device for its workers: here they see no GPU.
    config = build_config({**data, "progress": False, "enhance": {"device": "cuda"}}, "test")
    with pytest.raises(ray_adapter.StageStartError) as err:
        pipeline.run(config)
    message = str(err.value)
    assert message == (
        "the enhance stage could not start: ConfigError: enhance.device (--device) is 'cuda' but "
        "this machine sees no GPU"
    )
    error = json.loads((out / "run.json").read_text())["error"]
    assert error == f"StageStartError: {message}"


class Outage(MemoryFileSystem):
    """Refuses the next ``failures`` calls of each kind, as an endpoint that is briefly down."""

    failures: ClassVar[dict[str, int]] = {"open": 0, "info": 0}

    def _fail(self, kind: str) -> None:
        if self.failures[kind]:
            self.failures[kind] -= 1
            raise ConnectionError("endpoint down")

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        self._fail("open")
        return super()._open(path, mode, **kwargs)

    def info(self, path: str, **kwargs: Any) -> Any:
        self._fail("info")
        return super().info(path, **kwargs)


def test_the_manifest_reader_rides_out_a_short_outage_and_pickles(monkeypatch) -> None:
    import pickle

    from fundus_batch.io import storage

    monkeypatch.setattr(storage, "DEFAULT_BACKOFF", storage.Backoff(base=0.01, cap=0.01))
    fs = Outage(skip_instance_cache=True)
    path = f"/outage-{os.getpid()}/m.csv"
    fs.pipe_file(path, b"image_id,uri\na,x.png\n")
    Outage.failures = {"open": 2, "info": 2}  # the endpoint goes down
    handler = ray_adapter._RetryingHandler(fs, "s3://b/m.csv", retries=3)
    [info] = handler.get_file_info([path])
    assert info.size == 21
    with handler.open_input_stream(path) as stream:
        assert stream.read() == b"image_id,uri\na,x.png\n"
    assert Outage.failures == {"open": 0, "info": 0}
    again = pickle.loads(pickle.dumps(handler))
    assert (again.source, again.retries) == ("s3://b/m.csv", 3)
    fs.rm(path)


_GROWTH_DRIVER = """
import json, subprocess, sys, time
import ray
from fundus_batch import pipeline, ray_adapter
from fundus_batch.config import build_config
from ray._private import state

config = build_config(json.loads(sys.argv[1]), "growth")
join = json.loads(sys.argv[2])
ray.init(address=config.ray.address)  # pipeline.run then leaves the connection open
planned = ray_adapter.init_ray


def init_then_a_node_joins(config):
    shape = planned(config)  # the pools are planned for the 1-CPU head
    subprocess.run(join, check=True, capture_output=True, timeout=180)
    while ray.cluster_resources().get("CPU", 0) < 3:
        time.sleep(0.2)
    return shape


ray_adapter.init_ray = init_then_a_node_joins
summary = pipeline.run(config)
nodes = [
    a["Address"]["NodeID"] for a in state.actors().values() if "StageUDF" in a["ActorClassName"]
]
heads = [n["NodeID"] for n in ray.nodes() if n["Resources"].get("CPU") == 1.0]
print(json.dumps({"ok": summary.ok, "rows": summary.rows_in, "nodes": nodes, "head": heads}))
"""


@pytest.mark.slow
def test_a_node_that_joins_after_planning_gets_actors_of_the_stage_pool(tmp_path: Path) -> None:
    """A real two-node cluster: a 1-CPU head, a run that plans its pool on it (one actor), and
    a 2-CPU node started with `ray start --address` before the stages start. The pool grows
    onto the new node."""
    import shutil
    import socket

    import pandas as pd

    from tests.pipeline_inputs import write_inputs

    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    head = [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1"]
    head += ["--include-dashboard=false", "--disable-usage-stats"]
    started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        source = pd.read_csv(write_inputs(tmp_path / "in", n_good=3, broken=False, size=512))
        rows = [{"image_id": f"p{i:03d}", "uri": source.uri[i % 3]} for i in range(60)]
        manifest = tmp_path / "in" / "many.csv"
        pd.DataFrame(rows).to_csv(manifest, index=False)
        config = {
            "manifest": str(manifest),
            "out": str(tmp_path / "out"),
            "variants": 2,
            "progress": False,
            "ray": {"address": f"127.0.0.1:{port}", "rows_per_block": 1},
        }
        join = [ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2"]
        driver = subprocess.run(
            [sys.executable, "-c", _GROWTH_DRIVER, json.dumps(config), json.dumps(join)],
            env={**env, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
        result = json.loads(driver.stdout.strip().splitlines()[-1])
        assert (result["ok"], result["rows"]) == (120, 120)
        [head_node] = result["head"]
        assert len(result["nodes"]) > 1, result  # the pool started with one actor
        assert any(n != head_node for n in result["nodes"]), result
    finally:
        _stop_cluster(port)


def _stop_cluster(port: int) -> None:
    """Stop the processes of the cluster whose head listens on ``port`` (``ray stop`` would
    stop every Ray instance on the machine)."""
    import psutil

    mine: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if f":{port}" in line or f"port={port}" in line:
            with contextlib.suppress(psutil.Error):  # the raylets' agents name no port
                mine.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
    for proc in mine.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(mine.values()), timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    # `ray start` left its address for a later ray.init() without one to join, as `ray stop` would.
    from ray._common.utils import get_ray_address_file

    marker = Path(get_ray_address_file(None))
    if marker.is_file() and marker.read_text().strip().endswith(f":{port}"):
        marker.unlink()


def test_ray_that_cannot_start_or_be_reached_is_one_error_naming_the_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    def unreachable(**kwargs: Any) -> None:
        raise ConnectionError("GCS did not answer")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", unreachable)
    config = _config(ray={"address": "10.0.0.7:6379"})
    with pytest.raises(ray_adapter.RayStartError) as caught:
        ray_adapter.init_ray(config)
    assert str(caught.value) == (
        "could not start or reach the Ray cluster at 10.0.0.7:6379: "
        "ConnectionError: GCS did not answer"
    )
    with pytest.raises(ray_adapter.RayStartError, match="a local Ray instance"):
        ray_adapter.init_ray(_config())
