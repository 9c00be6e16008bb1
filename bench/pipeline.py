"""Benchmark: the Ray pipeline against a plain multiprocessing.Pool doing the same per-image work.

Prints two ratios, each measured within this one run:

1. throughput: Ray images/s divided by Pool images/s on the same images (target >= 0.8 once the
   run is long enough to amortise Ray's start-up);
2. memory: peak memory (PSS summed over the driver and every process it started) of a run over
   ``--big`` images divided by that of a run over ``--small`` images (target <= 1.3: memory must
   not grow with the archive).

    python bench/pipeline.py --images 160 --variants 2 --size 256
    python bench/pipeline.py --skip-throughput --small 1000 --big 10000 --size 128 --variants 1

The memory runs end with `fundus_batch.verify` on their output (every row once, every file
present and matching its checksum).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fundus_batch.io.codecs import encode_jpeg
from fundus_batch.synth import synth_fundus
from fundus_batch.verify import verify


def make_inputs(folder: Path, n: int, size: int) -> Path:
    """``n`` raw-camera-like synthetic JPEGs (a few distinct eyes, repeated) and a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    distinct = []
    for i in range(min(n, 16)):
        s = synth_fundus(int(size * 1.5), seed=i, canvas=(int(size * 2), int(size * 1.6)))
        distinct.append(encode_jpeg(s.image, quality=90))
    rows = []
    for i in range(n):
        path = folder / f"img_{i:06d}.jpg"
        path.write_bytes(distinct[i % len(distinct)])
        rows.append({"image_id": f"img_{i:06d}", "uri": str(path)})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def _config_dict(manifest: Path, out: Path, args: argparse.Namespace) -> dict:
    return {
        "manifest": str(manifest),
        "out": str(out),
        "variants": args.variants,
        "size": args.size,
        "progress": False,
        "shard_rows": 1000,
        "ray": {
            "num_cpus": args.cpus,
            "rows_per_block": args.rows_per_block,
            "degrade_actors": args.actors,
        },
    }


_CHAIN: list = []


def _pool_init(cfg: dict) -> None:
    from fundus_batch.config import build_config
    from fundus_batch.pipeline import _Chain, stage_factories

    _CHAIN.append(_Chain(tuple(stage_factories(build_config(cfg, "bench")))))


def _pool_worker(row: dict) -> int:
    from fundus_batch import stages

    return sum(1 for r in _CHAIN[0]([row]) if stages.is_ok(r))


def run_pool(manifest: Path, out: Path, args: argparse.Namespace) -> float:
    """Seconds for a multiprocessing.Pool to do every image's work."""
    cfg = _config_dict(manifest, out, args)
    frame = pd.read_csv(manifest)
    rows = [
        {
            "image_id": r.image_id,
            "source_uri": r.uri,
            "status": "ok",
            "pending_variants": list(range(args.variants)),
        }
        for r in frame.itertuples()
    ]
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(args.cpus, _pool_init, (cfg,)) as pool:
        ok = sum(pool.imap_unordered(_pool_worker, rows, chunksize=1))
    seconds = time.perf_counter() - start
    assert ok == len(rows) * args.variants, f"pool produced {ok} ok rows"
    return seconds


def run_ray(manifest: Path, out: Path, args: argparse.Namespace) -> tuple[float, float, float]:
    """(seconds after start-up, start-up seconds, peak PSS bytes) of the Ray pipeline in a fresh
    driver process."""
    cfg_path = out.parent / f"{out.name}.json"
    cfg_path.write_text(json.dumps(_config_dict(manifest, out, args)))
    code = (
        "import json, sys, time; from fundus_batch.config import build_config; "
        "from fundus_batch import pipeline; "
        f"c = build_config(json.load(open({str(cfg_path)!r})), 'bench'); "
        "t0 = time.perf_counter(); pipeline.init_ray(c); "
        "t = time.perf_counter(); s = pipeline.run(c); e = time.perf_counter(); "
        "print(json.dumps({'seconds': e - t, 'startup': t - t0, 'ok': s.ok, "
        "'rows': s.rows_in}))"
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    peak = [0]

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            try:
                family = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in family:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            peak[0] = max(peak[0], total)
            time.sleep(0.5)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    stdout, _ = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"ray run failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["ok"] == result["rows"], result
    return result["seconds"], result["startup"], float(peak[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--variants", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--rows-per-block", type=int, default=4)
    parser.add_argument("--actors", type=int, default=None, help="CPU actors [auto]")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--big", type=int, default=5000)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.skip_throughput:
            manifest = make_inputs(root / "in", args.images, args.size)
            pool_s = run_pool(manifest, root / "pool_out", args)
            ray_s, startup, _ = run_ray(manifest, root / "ray_out", args)
            pool_ips, ray_ips = args.images / pool_s, args.images / ray_s
            total_ips = args.images / (ray_s + startup)
            print(
                f"throughput ({args.images} images x {args.variants} variants at "
                f"{args.size} px, {args.cpus} CPUs)"
            )
            print(f"  multiprocessing.Pool: {pool_ips:6.2f} images/s ({pool_s:.1f} s)")
            print(
                f"  Ray pipeline:         {ray_ips:6.2f} images/s ({ray_s:.1f} s after "
                f"{startup:.1f} s of Ray start-up)"
            )
            print(f"  ratio Ray/Pool:       {ray_ips / pool_ips:.2f}  (target >= 0.8)")
            print(f"  ratio with start-up:  {total_ips / pool_ips:.2f}")
        if not args.skip_memory:
            peaks = {}
            for n in (args.small, args.big):
                manifest = make_inputs(root / f"mem{n}", n, args.size)
                seconds, _, peaks[n] = run_ray(manifest, root / f"mem_out{n}", args)
                print(
                    f"memory: {n} images -> peak PSS {peaks[n] / 2**20:.0f} MiB "
                    f"({seconds:.0f} s, {n / seconds:.1f} images/s)"
                )
                report = verify(str(root / f"mem_out{n}"), str(manifest))
                print(
                    f"  verify: {'OK' if report.ok else 'FAILED'} ({report.rows} rows, "
                    f"{report.files_checked} files checked)"
                )
                if not report.ok:
                    print(report.summary())
            ratio = peaks[args.big] / peaks[args.small]
            print(f"  ratio peak({args.big})/peak({args.small}): {ratio:.2f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
