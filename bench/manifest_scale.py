"""Benchmark: time to the first written image, and driver peak RSS, for very large manifests.

For each N in ``--rows`` it writes a Parquet manifest of N rows (distinct image ids; the URIs
repeat the JPEGs of ``../shared/data/eyepacs_sample``, or a few synthetic PNGs when that folder
is absent), starts ``pipeline.run`` in a fresh driver process, and watches OUT/images. It prints
the seconds from "Ray is up" to the first image file in OUT, and the driver's peak RSS (VmHWM)
at that moment; then it stops the run. Targets (issue 12): 1,000,000 rows -> first image in
<= 30 s after Ray is up, driver peak RSS <= 1 GB.

    python bench/manifest_scale.py --rows 100000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT.parent / "shared" / "data" / "eyepacs_sample"


def source_images(folder: Path) -> list[str]:
    """Real EyePACS JPEGs when ../shared is present, else a few synthetic PNGs in ``folder``."""
    if SAMPLE.is_dir():
        found = sorted(str(p) for p in SAMPLE.iterdir() if p.suffix.lower() in {".jpeg", ".jpg"})
        if found:
            return found
    from fundus_batch.io.codecs import encode_png
    from fundus_batch.synth import synth_fundus

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(4):
        path = folder / f"synth_{i}.png"
        path.write_bytes(encode_png(synth_fundus(384, seed=i).image))
        paths.append(str(path))
    return paths


def write_manifest(path: Path, rows: int, uris: list[str]) -> None:
    """A Parquet manifest of ``rows`` distinct ids over the repeated ``uris``, in row groups."""
    writer = None
    step = 100_000
    try:
        for start in range(0, rows, step):
            n = min(step, rows - start)
            table = pa.table(
                {
                    "image_id": [f"img{start + i:08d}" for i in range(n)],
                    "uri": [uris[(start + i) % len(uris)] for i in range(n)],
                    "dr_level": pa.array([(start + i) % 5 for i in range(n)], pa.int64()),
                }
            )
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=step)
    finally:
        if writer is not None:
            writer.close()


DRIVER = """
import json, sys, time
from fundus_batch import pipeline
from fundus_batch.config import build_config
config = build_config(json.load(open(sys.argv[1])), "bench")
pipeline.init_ray(config)
print(json.dumps({"ray_up": time.time()}), flush=True)
pipeline.run(config)
print(json.dumps({"finished": time.time()}), flush=True)
"""


def _peak_rss(pid: int) -> int:
    """Peak resident set size (VmHWM) of a live process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _first_image(images: Path) -> bool:
    if not images.is_dir():
        return False
    return any(e.is_dir() and any(os.scandir(e.path)) for e in os.scandir(images))


def measure(rows: int, work: Path, uris: list[str], args: argparse.Namespace) -> dict:
    """One run over a fresh ``rows``-row manifest; stops it once the first image is written."""
    manifest = work / f"manifest_{rows}.parquet"
    t0 = time.time()
    write_manifest(manifest, rows, uris)
    made = time.time() - t0
    out = work / f"out_{rows}"
    config = {
        "manifest": str(manifest),
        "out": str(out),
        "variants": 1,
        "size": args.size,
        "compute_metrics": False,
        "progress": False,
        "ray": {"num_cpus": args.cpus},
    }
    cfg = work / f"config_{rows}.json"
    cfg.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)})
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(cfg)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # the driver and the local Ray it starts stop together
    )
    result: dict = {"rows": rows, "manifest_seconds": round(made, 1)}
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"driver exited before Ray was up (exit code {proc.wait()})")
        ray_up = json.loads(line)["ray_up"]
        result["ray_startup_seconds"] = round(ray_up - started, 1)
        deadline = ray_up + args.timeout
        peak = 0
        while time.time() < deadline and proc.poll() is None:
            peak = max(peak, _peak_rss(proc.pid))
            if _first_image(out / "images"):
                result["first_image_seconds"] = round(time.time() - ray_up, 1)
                break
            time.sleep(0.1)
        if proc.poll() is None:
            peak = max(peak, _peak_rss(proc.pid))
        else:
            result["exit_code"] = proc.returncode
        result["driver_peak_rss_mb"] = round(peak / 2**20)
        result.setdefault("first_image_seconds", None)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return result


def row_counts(text: str) -> list[int]:
    """An argparse type: comma-separated manifest sizes, each a whole number >= 1."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated whole numbers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"give one or more sizes >= 1, got {text!r}")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        type=row_counts,
        default="100000,1000000",
        help="comma-separated manifest sizes",
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait per run")
    args = parser.parse_args()
    sizes = args.rows
    with tempfile.TemporaryDirectory(prefix="manifest_scale_") as tmp:
        work = Path(tmp)
        uris = source_images(work / "synth")
        print(f"source images: {len(uris)} ({'eyepacs_sample' if SAMPLE.is_dir() else 'synth'})")
        for rows in sizes:
            print(json.dumps(measure(rows, work, uris, args)), flush=True)


if __name__ == "__main__":
    main()
