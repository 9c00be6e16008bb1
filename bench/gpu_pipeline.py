"""The pipeline with GPU enhancement actors: images/s and how busy the GPU is while it runs.

Runs ``fundus_batch.pipeline.run`` (enhancement on, Cofe-Net, device auto) over ``--images``
synthetic raw-camera-like JPEGs (``fundus_batch.synth``; a few distinct eyes, repeated), while a
background thread samples GPU utilisation and memory every ``--sample-ms`` (``nvidia-smi -lms``;
else ``torch.cuda.utilization``; else 'n/a'). Ray start-up is timed apart from the run.

    python bench/gpu_pipeline.py --images 3000 --json out/gpu_pipeline.json

Busy % is reported over the whole run and over its active window (first to last sample with the
GPU above 0 %), so that Ray's actor start and the last shard's write do not hide the steady
state. Target on an H100/H200-class GPU: >= 150 images/s, GPU busy >= 80 %. Without a GPU the
run falls back to CPU enhancement and the utilisation reads 'n/a' (for testing the script).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fundus_batch

import torch

from fundus_batch.config import RunConfig
from fundus_batch.console import ray_output
from fundus_batch.models import build_cofenet, save_weights
from fundus_batch.pipeline import init_ray, run, shutdown
from fundus_batch.ray_adapter import ClusterShape, plan_pools
from fundus_batch.shards import read_frame

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inputs import synthetic_manifest

IMAGES_PER_S_TARGET, BUSY_TARGET = 150.0, 80.0


class GpuSampler:
    """Samples (seconds since start, GPU busy %, memory MiB) in a background thread."""

    def __init__(self, interval_ms: int) -> None:
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, float, float]] = []
        self.source = "n/a"
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    def start(self) -> GpuSampler:
        self._t0 = time.monotonic()
        if shutil.which("nvidia-smi") and torch.cuda.is_available():
            self.source = "nvidia-smi"
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    str(self.interval_ms),
                    "-i",
                    "0",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        elif torch.cuda.is_available():
            try:
                torch.cuda.utilization()
            except Exception:  # no pynvml / NVML: nothing to sample with
                return self
            self.source = "torch.cuda.utilization"
            self._thread = threading.Thread(target=self._poll_torch, daemon=True)
        if self._thread is not None:
            self._thread.start()
        return self

    def _read_smi(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                busy, mem = float(parts[0]), float(parts[1])
            except (ValueError, IndexError):
                continue  # "[N/A]" or a partial line
            self.samples.append((time.monotonic() - self._t0, busy, mem))

    def _poll_torch(self) -> None:
        while not self._stop.wait(self.interval_ms / 1000):
            mem = (
                torch.cuda.device_memory_used() / 2**20
                if hasattr(torch.cuda, "device_memory_used")
                else float("nan")
            )
            self.samples.append((time.monotonic() - self._t0, float(torch.cuda.utilization()), mem))

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        """Mean and median busy % over all samples and over the active window."""
        out: dict[str, Any] = {"source": self.source, "samples": len(self.samples)}
        if not self.samples:
            return {**out, "busy_mean": None, "busy_p50": None}
        busy = [b for _, b, _ in self.samples]
        active = [i for i, b in enumerate(busy) if b > 0]
        window = busy[active[0] : active[-1] + 1] if active else []
        return {
            **out,
            "busy_mean": statistics.fmean(busy),
            "busy_p50": statistics.median(busy),
            "active_window_s": (
                self.samples[active[-1]][0] - self.samples[active[0]][0] if active else 0.0
            ),
            "active_busy_mean": statistics.fmean(window) if window else 0.0,
            "active_busy_p50": statistics.median(window) if window else 0.0,
            "memory_used_max_mib": max((m for _, _, m in self.samples if m == m), default=None),
            "trace": [[round(t, 2), b, m] for t, b, m in self.samples],
        }


def stage_load(out: Path, config: RunConfig, cluster: ClusterShape, run_s: float) -> dict[str, Any]:
    """Where the run's time went, from the output's ``seconds_*`` columns (a row's time inside
    each stage): ms per row of each stage, and for each actor pool the share of its actors'
    time spent inside its stages (near 1: that pool bounds the run; well below: it waits).
    Shares are given in enhance mode only: in pairs mode every variant row repeats its image's
    fetch and preprocess seconds."""
    frame = read_frame(str(out))
    if frame is None or frame.empty:
        return {"ms_per_row": {}, "pools": []}
    cols = [c for c in frame.columns if c.startswith("seconds_") and frame[c].notna().any()]
    totals = {c.removeprefix("seconds_"): float(frame[c].fillna(0.0).sum()) for c in cols}
    pools = []
    for pool in plan_pools(config, cluster):
        names = [s.name for s in pool.specs]
        busy = sum(totals.get(n, 0.0) for n in names)
        share = busy / (pool.actors * run_s) if pool.actors and run_s > 0 else None
        pools.append(
            {
                "stages": names,
                "actors": pool.actors,
                "busy_share": share if config.mode == "enhance" else None,
            }
        )
    return {"ms_per_row": {k: v / len(frame) * 1e3 for k, v in totals.items()}, "pools": pools}


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.1f}{unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images in the manifest")
    parser.add_argument("--size", type=int, default=512, help="working size (multiple of 32)")
    parser.add_argument("--distinct", type=int, default=16, help="distinct synthetic eyes")
    parser.add_argument("--mode", choices=("enhance", "pairs"), default="enhance")
    parser.add_argument("--variants", type=int, default=1, help="pairs mode: variants per image")
    parser.add_argument("--metrics", action="store_true", help="compute the quality metrics")
    parser.add_argument("--weights", default="fundus-cofenet-small")
    parser.add_argument(
        "--width",
        type=float,
        help="instead of --weights: a Cofe-Net of this width with random weights (1.0: full,"
        " the network whose GPU cost the busy target is about)",
    )
    parser.add_argument("--enhance-batch", type=int, default=16, help="images per forward pass")
    parser.add_argument(
        "--actors", type=int, default=None, help="enhancement actors (default: the planner's)"
    )
    parser.add_argument("--rows-per-block", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    parser.add_argument("--sample-ms", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--verbose", action="store_true", help="Ray's own output on the console")
    args = parser.parse_args(argv)
    if args.images < 1:
        raise SystemExit(f"--images: must be >= 1, got {args.images}")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    work = Path(tempfile.mkdtemp(prefix="gpu_pipeline_", dir=args.workdir))
    try:
        start = time.perf_counter()
        manifest = synthetic_manifest(work / "in", args.images, args.size, args.distinct)
        inputs_s = time.perf_counter() - start
        weights, variant = args.weights, None
        if args.width is not None:
            weights, variant = str(work / "random.pt"), "cofe-net"
            model = build_cofenet(variant, args.width, generator=torch.Generator().manual_seed(0))
            save_weights(weights, model.state_dict(), residual=False)
        config = RunConfig.model_validate(
            {
                "manifest": str(manifest),
                "out": str(work / "out"),
                "mode": args.mode,
                "variants": args.variants,
                "size": args.size,
                "compute_metrics": args.metrics,
                "progress": False,
                "ray": {"num_cpus": args.cpus, "rows_per_block": args.rows_per_block},
                "enhance": {
                    "enabled": True,
                    "enhancer": "cofenet",
                    "weights": weights,
                    "variant": variant,
                    "width": args.width,
                    "batch_size": args.enhance_batch,
                    "actors": args.actors,
                    "device": "auto",
                },
            }
        )
        log_path: Path | None = None
        try:
            with ray_output(args.verbose) as console:  # Ray's lines go to a file, as in the CLI
                log_path = console.log_path
                start = time.perf_counter()
                cluster = init_ray(config)
                ray_start_s = time.perf_counter() - start
                sampler = GpuSampler(args.sample_ms).start()
                start = time.perf_counter()
                try:
                    summary = run(config)
                finally:
                    run_s = time.perf_counter() - start
                    sampler.stop()
                    shutdown()
        except BaseException:
            if log_path is not None and log_path.is_file():  # the device keeps no files
                tail = log_path.read_text(errors="replace").splitlines()[-40:]
                print(f"Ray's output ({log_path}), last lines:", *tail, sep="\n", file=sys.stderr)
            raise
        load = stage_load(work / "out", config, cluster, run_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gpu = sampler.summary()
    enhance_pool = next(p for p in plan_pools(config, cluster) if p.specs[0].name == "enhance")
    # A row is one image in enhance mode and one (image, variant) pair in pairs mode.
    rows_per_image = args.variants if args.mode == "pairs" else 1
    rows_per_s = summary.ok / run_s
    rate = rows_per_s / rows_per_image
    result = {
        "images": args.images,
        "mode": args.mode,
        "size": args.size,
        "enhance_batch": args.enhance_batch,
        "model": f"cofe-net width {args.width:g}, random weights" if args.width else args.weights,
        "enhance_actors": enhance_pool.actors,
        "enhance_actor_gpus": enhance_pool.resources.num_gpus,
        "metrics": args.metrics,
        "cluster": {"cpus": cluster.cpus, "gpus": cluster.gpus},
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "inputs_s": inputs_s,
        "ray_start_s": ray_start_s,
        "run_s": run_s,
        "rows_ok": summary.ok,
        "rows_failed": summary.failed,
        "failed_by_stage": summary.failed_by_stage,
        "rows_per_image": rows_per_image,
        "rows_per_s": rows_per_s,
        "images_per_s": rate,
        "images_per_s_with_start": summary.ok / rows_per_image / (run_s + ray_start_s),
        "gpu": gpu,
        "stage_load": load,
        "targets": {"images_per_s": IMAGES_PER_S_TARGET, "gpu_busy": BUSY_TARGET},
    }
    print(
        f"{summary.ok} rows ok / {summary.failed} failed of {args.images} images x "
        f"{rows_per_image} rows ({args.mode}, "
        f"cluster {cluster.cpus:g} CPU {cluster.gpus:g} GPU; {result['model']}, "
        f"{enhance_pool.actors} enhance actors of {enhance_pool.resources.num_gpus:g} GPU); "
        f"Ray start {ray_start_s:.1f} s, run {run_s:.1f} s"
    )
    print(
        f"images/s {rate:.1f} (target >= {IMAGES_PER_S_TARGET:g}; rows/s {rows_per_s:.1f}); "
        f"with Ray start {result['images_per_s_with_start']:.1f}"
    )
    print(
        f"GPU busy ({gpu['source']}, {gpu['samples']} samples): mean {_fmt(gpu['busy_mean'], '%')}"
        f", p50 {_fmt(gpu['busy_p50'], '%')}; active window mean "
        f"{_fmt(gpu.get('active_busy_mean'), '%')}, p50 {_fmt(gpu.get('active_busy_p50'), '%')}"
        f" (target >= {BUSY_TARGET:g}%)"
    )
    per_stage = ", ".join(f"{k} {v:.1f}" for k, v in load["ms_per_row"].items())
    print(f"ms per row inside each stage: {per_stage}")
    for pool in load["pools"]:
        share = pool["busy_share"]
        print(
            f"  pool {'+'.join(pool['stages'])}: "
            + (f"{pool['actors']} actors" if pool["actors"] else "tasks")
            + ("" if share is None else f", busy {share * 100:.0f} % of their time")
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if summary.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
