"""Benchmark: the pipeline's three speed ratios (issue 11), each measured within this one run.

1. floor: ``fundus-batch degrade --variants 1``'s run (its defaults, metrics on) over
   ``--floor-images`` raw EyePACS photographs (the 10 in ../shared/data/eyepacs_sample repeated
   under distinct image ids) on a local cluster of ``--cpus`` CPUs (``degrade`` has no option
   for that, so the same run goes to ``fundus-batch run`` as a config with ``ray.num_cpus``;
   the CPUs its run.json records are printed), wall time of the CLI as a subprocess, Ray
   start-up included, divided by the floor: a ``--cpus``-process multiprocessing.Pool that
   reads each file, decodes it reduced (``decode_image(min_side=512)``), resizes it to 512 and
   encodes two PNGs, run before and after the CLI and averaged (target <= 2.5);
2. throughput: the Ray pipeline against a ``--cpus``-process multiprocessing.Pool running the
   same stage chain in-process on the same images, Ray images/s / Pool images/s, with and
   without Ray's start-up (target >= 0.9, start-up excluded);
3. memory: peak memory (PSS summed over the driver and every process it started) of a run over
   ``--big`` synthetic images divided by that of a run over ``--small`` (target <= 1.3).

It also prints where one image's CPU time goes (``steps``: each step timed in-process, no Ray,
one OpenCV thread as in a stage actor, on ``--steps-images`` EyePACS photographs) and the
per-stage CPU seconds per image from the Ray output's ``seconds_*`` columns.

    python bench/pipeline.py                                   # everything
    python bench/pipeline.py --skip-memory --skip-throughput   # steps + floor ratio
    python bench/pipeline.py --skip-floor --skip-steps --skip-throughput --big 5000

The EyePACS sections skip with a message when ../shared (relative to the repo root) is absent;
the throughput section then runs on synthetic photographs. The memory runs end with
`fundus_batch.verify` on their output (every row once, every file present, checksums match).
Working sizes below 128 px are refused. A run whose rows fail stops with the rows failed per
stage and the first error; a Ray driver that fails shows its Ray log's path and last lines.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# One BLAS thread per process, as Ray gives its one-CPU workers (it sets OMP_NUM_THREADS from
# their CPU share): the Pool baseline and the in-process steps then do what an actor does, and
# process CPU time does not count a second BLAS thread's spinning. Set before numpy loads.
os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = "1"

import cv2
import numpy as np
import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fundus_batch.io.codecs import decode_image, encode_png  # noqa: E402
from fundus_batch.shards import read_frame  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inputs import synthetic_manifest  # noqa: E402

EYEPACS = ROOT.parent / "shared" / "data" / "eyepacs_sample"
FLOOR_TARGET, THROUGHPUT_TARGET, MEMORY_TARGET = 2.5, 0.9, 1.3
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}

Rows = list[dict]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def load_avg() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def eyepacs_files() -> list[Path]:
    return sorted(EYEPACS.glob("*.jpeg")) if EYEPACS.is_dir() else []


def eyepacs_manifest(folder: Path, n: int) -> Path:
    """A manifest of ``n`` rows over the EyePACS samples, repeated under distinct image ids."""
    files = eyepacs_files()
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "image_id": f"{files[i % len(files)].stem}_r{i // len(files):04d}",
            "uri": str(files[i % len(files)]),
        }
        for i in range(n)
    ]
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def config_dict(manifest: Path, out: Path, args: argparse.Namespace, size: int) -> dict:
    return {
        "manifest": str(manifest),
        "out": str(out),
        "variants": args.variants,
        "size": size,
        "progress": False,
        "shard_rows": 1000,
        "ray": {"num_cpus": args.cpus}
        | ({"rows_per_block": args.rows_per_block} if args.rows_per_block else {}),
    }


# --- the stage chain without Ray -----------------------------------------------------------


def local_chain(cfg: dict) -> Callable[[Rows], Rows]:
    """The run's stage chain, built and called in this process (no Ray).

    Today this is ``stages.Chain(stage_specs(config))``, each stage called in order on a list of
    row dicts; it is the one place that knows how, so the Pool baseline follows the stage API.
    """
    from fundus_batch.config import build_config
    from fundus_batch.stages import Chain, stage_specs

    return Chain(stage_specs(build_config(cfg, "bench")))


def planned_rows(manifest: Path, variants: int) -> Rows:
    frame = pd.read_csv(manifest)
    return [
        {
            "image_id": r.image_id,
            "source_uri": r.uri,
            "status": "ok",
            "pending_variants": list(range(variants)),
        }
        for r in frame.itertuples()
    ]


def steady_rate(marks: list[tuple[float, int]], total: int) -> float:
    """Rows per second between the marks where 20 % and 80 % of ``total`` rows were done: the
    rate once every worker is busy, without start-up, ramp or tail (NaN if too few marks)."""
    low = next((m for m in marks if m[1] >= 0.2 * total), None)
    high = next((m for m in marks if m[1] >= 0.8 * total), None)
    if low is None or high is None or high[0] <= low[0]:
        return float("nan")
    return (high[1] - low[1]) / (high[0] - low[0])


def first_row(marks: list[tuple[float, int]], start: float) -> float:
    """Seconds from ``start`` to the first mark with a finished row (NaN if none)."""
    return next((t - start for t, n in marks if n > 0), float("nan"))


_CHAIN: list[Callable[[Rows], Rows]] = []


def _pool_init(cfg: dict) -> None:
    cv2.setNumThreads(1)  # as ray_adapter.StageUDF does in a one-CPU actor
    _CHAIN.append(local_chain(cfg))


def _pool_worker(row: dict) -> tuple[int, dict[str, float], list[tuple[str, str]]]:
    """(ok rows, seconds_* summed over the output rows, (failed stage, error) of each failed
    row) of one image."""
    out = _CHAIN[0]([row])
    seconds: dict[str, float] = {}
    for r in out:
        for key, value in r.items():
            if key.startswith("seconds_") and value is not None:
                stage = key.removeprefix("seconds_")
                seconds[stage] = seconds.get(stage, 0.0) + value
    failed = [
        (str(r.get("failed_stage")), str(r.get("error"))) for r in out if r.get("status") != "ok"
    ]
    return sum(1 for r in out if r.get("status", "ok") == "ok"), seconds, failed


def failure_report(what: str, failed: list[tuple[str, str]], expected: int) -> str:
    """A failed run's message: how many rows failed at each stage and the first error."""
    by_stage: dict[str, int] = {}
    for stage, _ in failed:
        by_stage[stage] = by_stage.get(stage, 0) + 1
    first = f"; first error ({failed[0][0]}): {failed[0][1]}" if failed else ""
    return f"{what}: {len(failed)} of {expected} rows failed, failed_by_stage {by_stage}{first}"


@dataclass(frozen=True)
class PoolRun:
    """One run of the stage chain in a multiprocessing.Pool."""

    seconds: float  # pool start and building the stages included
    per_row: dict[str, float]  # each stage's seconds per output row
    cpu_seconds: float  # every pool process, in total
    steady: float  # images/s (:func:`steady_rate`)
    first_row: float  # seconds to the first finished image


def run_pool(manifest: Path, out: Path, args: argparse.Namespace, size: int) -> PoolRun:
    """Run the stage chain on every image in a ``args.cpus``-process multiprocessing.Pool and
    measure it (:class:`PoolRun`); SystemExit naming the failed stages if a row fails."""
    cfg = config_dict(manifest, out, args, size)
    rows = planned_rows(manifest, args.variants)
    ok, per_stage = 0, dict[str, float]()
    failed: list[tuple[str, str]] = []
    start = time.perf_counter()
    cpu = TreeCPU(os.getpid(), include_root=False)
    with mp.get_context("spawn").Pool(args.cpus, _pool_init, (cfg,)) as pool:
        marks: list[tuple[float, int]] = []
        for n, stage_s, bad in pool.imap_unordered(_pool_worker, rows, chunksize=1):
            ok += n
            failed += bad
            marks.append((time.perf_counter(), len(marks) + 1))
            for key, value in stage_s.items():
                per_stage[key] = per_stage.get(key, 0.0) + value
        cpu_s = cpu.stop()
    seconds = time.perf_counter() - start
    expected = len(rows) * args.variants
    if ok != expected or failed:
        raise SystemExit(failure_report("the Pool run", failed, expected))
    per_row = {k: v / ok for k, v in per_stage.items()}
    return PoolRun(seconds, per_row, cpu_s, steady_rate(marks, len(rows)), first_row(marks, start))


# --- the floor ------------------------------------------------------------------------------


def _floor_one(path: str) -> int:
    rgb = decode_image(Path(path).read_bytes(), min_side=512)
    small = cv2.resize(rgb, (512, 512), interpolation=cv2.INTER_AREA)
    mask = np.where(small[..., 0] > 20, 255, 0).astype(np.uint8)
    return len(encode_png(small)) + len(encode_png(mask))


class TreeCPU:
    """CPU seconds (user + system) of a process's descendants (and of the process itself
    unless ``include_root`` is False), sampled every ``period`` s in a thread: the part of
    the machine a run used, which, unlike its wall time, other users' load barely changes.
    A process that exits between two samples loses at most one period of its CPU time."""

    def __init__(self, pid: int, *, include_root: bool = True, period: float = 0.2) -> None:
        self.root = psutil.Process(pid)
        self.include_root = include_root
        self.period = period
        self.seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            family = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        if self.include_root:
            family.append(self.root)
        for p in family:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    self.seen[(p.pid, p.create_time())] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def stop(self) -> float:
        self._sample()
        self._stop.set()
        self._thread.join()
        return sum(self.seen.values())


def run_floor(manifest: Path, cpus: int) -> tuple[float, float]:
    """(wall s, CPU s) of a ``cpus``-process Pool that reads, decodes reduced, resizes to 512
    and encodes two PNGs (image and a binary mask) per row of ``manifest``."""
    paths = list(pd.read_csv(manifest)["uri"])
    start = time.perf_counter()
    cpu = TreeCPU(os.getpid(), include_root=False)
    with mp.get_context("spawn").Pool(cpus) as pool:
        total = sum(pool.imap_unordered(_floor_one, paths, chunksize=4))
        cpu_s = cpu.stop()  # before the workers exit
    assert total > 0
    return time.perf_counter() - start, cpu_s


def run_cli(
    manifest: Path, out: Path, variants: int, cpus: int
) -> tuple[float, float, float | None]:
    """(wall s, CPU s of the CLI and every process it started, the CPUs of the cluster it ran
    on as its run.json records them) of ``fundus-batch degrade``'s run with its defaults on a
    local cluster of ``cpus`` CPUs, Ray start-up included. ``degrade`` has no option for the
    cluster's CPUs: the same run is given as a config (mode pairs, every other field at its
    default, ``ray.num_cpus: cpus``) to ``fundus-batch run``."""
    cli = Path(sys.executable).with_name("fundus-batch")
    config = out.parent / f"{out.name}.yaml"  # JSON is YAML
    config.write_text(json.dumps({"mode": "pairs", "ray": {"num_cpus": cpus}}))
    command = [str(cli), "run", str(config), "--manifest", str(manifest), "--out", str(out)]
    command += ["--variants", str(variants)]
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, env=RAY_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    cpu = TreeCPU(proc.pid)
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    cpu_s = cpu.stop()
    if proc.returncode != 0:
        raise SystemExit(f"fundus-batch run failed ({proc.returncode}):\n{stderr[-3000:]}")
    return seconds, cpu_s, run_cluster_cpus(out)


def run_cluster_cpus(out: Path) -> float | None:
    """The CPUs of the cluster a run used, from its run.json (None if it does not say)."""
    try:
        info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cluster = info.get("cluster")
    cpus = cluster.get("cpus") if isinstance(cluster, dict) else None
    return float(cpus) if isinstance(cpus, int | float) else None


def stage_seconds(out: Path) -> dict[str, float]:
    """Mean seconds per output row of each stage that ran, from the Parquet ``seconds_*``
    columns (time inside the stage's code)."""
    frame = read_frame(str(out))
    if frame is None:
        raise SystemExit(f"the run wrote no Parquet shards under {out / 'pairs'}")
    cols = [c for c in frame.columns if c.startswith("seconds_") and frame[c].notna().any()]
    return {c.removeprefix("seconds_"): float(frame[c].fillna(0.0).mean()) for c in cols}


def print_stage_seconds(out: Path | None, per: dict[str, float] | None = None) -> None:
    """Print each stage's seconds per output row, from the run's Parquet (or ``per``)."""
    per = stage_seconds(out) if out is not None else per or {}
    parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in per.items())
    print(
        f"  per stage, ms per output row (seconds_*: time inside the stage, = CPU time only on "
        f"a machine that is not oversubscribed): {parts} (sum {sum(per.values()) * 1e3:.1f})"
    )


def floor_section(root: Path, args: argparse.Namespace) -> None:
    if not eyepacs_files():
        print(f"floor: SKIPPED ({EYEPACS} is absent: the raw EyePACS samples are needed)")
        return
    manifest = eyepacs_manifest(root / "floor_in", args.floor_images)
    print(
        f"floor ratio ({args.floor_images} raw EyePACS photographs, 1 variant, metrics on, "
        f"{args.cpus} CPUs; {load_avg()})"
    )
    # The floor runs before and after the CLI: the ratio uses their mean, so a machine whose
    # speed drifts during the measurement (a shared host) moves both sides alike.
    before_s, before_cpu = run_floor(manifest, args.cpus)
    cli_s, cli_cpu, cli_cpus = run_cli(manifest, root / "floor_out", 1, args.cpus)
    after_s, after_cpu = run_floor(manifest, args.cpus)
    floor_s, floor_cpu = (before_s + after_s) / 2, (before_cpu + after_cpu) / 2
    ratio = cli_s / floor_s
    print(
        f"  floor (Pool: read + reduced decode + resize 512 + 2 PNG): {floor_s:6.2f} s "
        f"({floor_cpu:.1f} CPU s; mean of {before_s:.2f} s before the CLI and {after_s:.2f} s "
        "after it)"
    )
    if max(before_s, after_s) > 1.15 * min(before_s, after_s):
        print(
            "  WARNING: the floor's two runs differ by more than 15 %: the machine's speed "
            "changed during the measurement"
        )
    print(
        f"  fundus-batch degrade's run (subprocess, Ray start-up included): {cli_s:6.2f} s "
        f"({cli_cpu:.1f} CPU s; cluster CPUs {'unknown' if cli_cpus is None else f'{cli_cpus:g}'} "
        f"per its run.json, floor Pool "
        f"{args.cpus} processes)"
    )
    if cli_cpus != args.cpus:
        print(
            f"  WARNING: the CLI's cluster had {cli_cpus} CPUs, the floor {args.cpus} processes: "
            "the ratio does not compare like with like"
        )
    ok = verdict(ratio <= FLOOR_TARGET)
    print(f"  ratio CLI/floor: {ratio:.2f}  (target <= {FLOOR_TARGET})  {ok}")
    # On a loaded machine the two wall times see different shares of the CPUs; CPU seconds
    # do not, so their ratio is what a quiet machine's wall ratio would approach (start-up
    # aside, which is partly idle waiting).
    print(f"  ratio of CPU seconds (load-independent check): {cli_cpu / floor_cpu:.2f}")
    busy = floor_cpu / (floor_s * args.cpus)
    if busy < 0.8:
        print(
            f"  WARNING: the floor kept only {busy:.0%} of {args.cpus} CPUs busy (other load on "
            "the machine): the wall ratio above is not a fair measurement"
        )
    print_stage_seconds(root / "floor_out")
    print(f"  ({load_avg()})")


# --- Ray in a driver of its own ---------------------------------------------------------------


@dataclass(frozen=True)
class RayRun:
    """One run of the Ray pipeline in a fresh driver process."""

    seconds: float  # after start-up
    startup: float
    peak_pss: float  # bytes, the driver and every process it started
    cpu_seconds: float  # the driver and every process it started
    steady: float  # rows/s (:func:`steady_rate`)
    first_row: float  # seconds from the end of start-up to the first finished block


def run_ray(manifest: Path, out: Path, cfg: dict) -> RayRun:
    """Run the Ray pipeline on ``cfg`` in a fresh driver process and measure it."""
    cfg_path = out.parent / f"{out.name}.json"
    cfg_path.write_text(json.dumps(cfg))
    log_note = out.parent / f"{out.name}.log-path"
    # Ray's own lines go to a log file, as in the CLI, whose path the driver writes to
    # ``log_note`` at once (shown if the run fails); the JSON line goes to stdout after.
    code = f"""
import json, time
from pathlib import Path
from fundus_batch import pipeline
from fundus_batch.config import build_config
from fundus_batch.console import ray_output

c = build_config(json.load(open({str(cfg_path)!r})), "bench")
m = []
with ray_output(False) as console:
    Path({str(log_note)!r}).write_text(str(console.log_path or ""))
    t0 = time.perf_counter()
    pipeline.init_ray(c)
    t = time.perf_counter()
    s = pipeline.run(c, progress=lambda n, _: m.append((time.perf_counter(), n)))
    e = time.perf_counter()
    pipeline.shutdown()
result = {{"seconds": e - t, "startup": t - t0, "ok": s.ok, "rows": s.rows_in, "marks": m, "t": t,
          "failed_by_stage": s.failed_by_stage}}
print(json.dumps(result))
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=RAY_ENV
    )
    peak = [0]
    cpu = TreeCPU(proc.pid)

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
    cpu_s = cpu.stop()
    if proc.returncode != 0:
        raise SystemExit(
            f"ray run failed with exit code {proc.returncode} (its traceback is above)"
            + ray_log_tail(log_note)
        )
    result = json.loads(stdout.strip().splitlines()[-1])
    if result["ok"] != result["rows"]:
        raise SystemExit(
            f"ray run: {result['rows'] - result['ok']} of {result['rows']} rows failed, "
            f"failed_by_stage {result['failed_by_stage']}{first_error(out)}"
            + ray_log_tail(log_note)
        )
    marks = [(t, n) for t, n in result["marks"]]
    steady = steady_rate(marks, result["rows"])
    first = first_row(marks, result["t"])
    return RayRun(result["seconds"], result["startup"], float(peak[0]), cpu_s, steady, first)


def ray_log_tail(log_note: Path, lines: int = 40) -> str:
    """The path of the Ray log a driver named in ``log_note`` and its last ``lines`` lines."""
    try:
        path = Path(log_note.read_text(encoding="utf-8").strip())
    except OSError:
        return "\nRay's log: unknown (the driver stopped before naming it)"
    if not str(path) or not path.is_file():
        return f"\nRay's log: {path or 'none (its output went to the console)'}"
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join([f"\nRay's output ({path}), last lines:", *tail])


def first_error(out: Path) -> str:
    """'; first error (stage): message' of the run's first failed row in its Parquet output."""
    try:
        frame = read_frame(str(out))
    except Exception as exc:  # the failure report must not fail: show what went wrong
        return f"; its output could not be read ({exc})"
    if frame is None or "status" not in frame.columns:
        return ""
    failed = frame[frame["status"] != "ok"]
    if failed.empty:
        return ""
    row = failed.iloc[0]
    return f"; first error ({row.get('failed_stage')}): {row.get('error')}"


def throughput_section(root: Path, args: argparse.Namespace) -> None:
    if eyepacs_files():
        n, size = args.throughput_images, 512
        manifest = eyepacs_manifest(root / "tp_in", n)
        what = "raw EyePACS photographs"
    else:
        n, size = args.images, args.size
        manifest = synthetic_manifest(root / "tp_in", n, size)
        what = f"synthetic photographs ({EYEPACS} absent)"
    print(
        f"throughput ({n} {what} x {args.variants} variants at {size} px, {args.cpus} CPUs; "
        f"{load_avg()})"
    )
    pool = run_pool(manifest, root / "pool_out", args, size)
    pool_s, pool_steady, pool_first = pool.seconds, pool.steady, pool.first_row
    ray = run_ray(manifest, root / "ray_out", config_dict(manifest, root / "ray_out", args, size))
    pool_ips, ray_ips, total_ips = n / pool_s, n / ray.seconds, n / (ray.seconds + ray.startup)
    ray_steady = ray.steady / args.variants  # the Ray run counts output rows, the Pool photographs
    ratio = ray_ips / pool_ips
    print(f"  multiprocessing.Pool (same stage chain): {pool_ips:6.2f} images/s ({pool_s:.1f} s)")
    print(
        f"  Ray pipeline: {ray_ips:6.2f} images/s ({ray.seconds:.1f} s after {ray.startup:.1f} s "
        "of start-up)"
    )
    print(
        f"  ratio Ray/Pool, start-up excluded: {ratio:.2f}  (target >= {THROUGHPUT_TARGET})  "
        f"{verdict(ratio >= THROUGHPUT_TARGET)}"
    )
    print(f"  ratio Ray/Pool, start-up included: {total_ips / pool_ips:.2f}")
    print(
        f"  steady rates (rows 20-80 % done; no start-up, ramp or tail): Pool {pool_steady:.2f}, "
        f"Ray {ray_steady:.2f} images/s, ratio {ray_steady / pool_steady:.2f} (information only: "
        "the target is the ratio above)"
    )
    print(
        f"  first finished row: Pool {pool_first:.1f} s after its start, Ray {ray.first_row:.1f} s "
        "after its start-up (Ray Data's operator and actor start, each worker importing Ray Data "
        "and the stages)"
    )
    pool_cpu = pool.cpu_seconds  # every pool process, all n images x variants
    print(
        f"  CPU seconds per image (every process): Pool {pool_cpu / n * 1e3:.1f} ms, Ray "
        f"{ray.cpu_seconds / n * 1e3:.1f} ms with start-up; ratio Pool/Ray "
        f"{pool_cpu / ray.cpu_seconds:.2f} "
        "(load-independent check of the throughput ratio)"
    )
    print("  Pool:", end="")
    print_stage_seconds(None, pool.per_row)
    print("  Ray: ", end="")
    print_stage_seconds(root / "ray_out")
    print(f"  ({load_avg()})")


def memory_section(root: Path, args: argparse.Namespace) -> None:
    from fundus_batch.verify import verify

    print(
        f"memory ({args.small} vs {args.big} synthetic images at {args.memory_size} px, "
        f"{args.variants} variants; {load_avg()})"
    )
    peaks = {}
    for n in (args.small, args.big):
        manifest = synthetic_manifest(root / f"mem{n}", n, args.memory_size)
        out = root / f"mem_out{n}"
        ray = run_ray(manifest, out, config_dict(manifest, out, args, args.memory_size))
        seconds, peaks[n] = ray.seconds, ray.peak_pss
        print(
            f"  {n} images -> peak PSS {peaks[n] / 2**20:.0f} MiB ({seconds:.0f} s, "
            f"{n / seconds:.1f} images/s)"
        )
        report = verify(str(out), str(manifest))
        print(
            f"  verify: {'OK' if report.ok else 'FAILED'} ({report.rows} rows, "
            f"{report.files_checked} files checked)"
        )
        if not report.ok:
            print(report.summary())
    ratio = peaks[args.big] / peaks[args.small]
    print(
        f"  ratio peak({args.big})/peak({args.small}): {ratio:.2f}  (target <= {MEMORY_TARGET})  "
        f"{verdict(ratio <= MEMORY_TARGET)}"
    )


# --- where one image's time goes ----------------------------------------------------------------


class Timer:
    """Process CPU seconds (OpenCV threads included) per named step, summed over calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[..., Any], *a: object, **kw: object) -> Any:
        start = time.process_time()
        result = fn(*a, **kw)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.process_time() - start
        return result


def profile_steps(paths: list[Path], size: int = 512, seed: int = 0) -> dict[str, float]:
    """CPU seconds per image of each step of one image's work (one variant, metrics on), on
    one OpenCV thread as in a one-CPU stage actor (``ray_adapter.StageUDF``)."""
    from fundus_batch.degrade import TYPE_CODES, degrade, sample_rng
    from fundus_batch.fov import _detect, crop_to_fov
    from fundus_batch.metrics import METRIC_VERSION, noref_metrics, reference_context
    from fundus_batch.schema import to_table, work_schema
    from fundus_batch.stages import choose_type

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    t = Timer()
    schema = work_schema()
    blank = dict.fromkeys(schema.names)
    for path in paths:
        image_id = path.stem
        raw = t("read file", path.read_bytes)
        rgb = t("reduced JPEG decode", decode_image, raw, min_side=size)
        circle, _, box = t("FOV detection", _detect, rgb)
        image, mask = t("crop + resize", crop_to_fov, rgb, circle, size, box)
        t(FLOOR_ONLY, cv2.resize, rgb, (size, size), interpolation=cv2.INTER_AREA)
        clean_png = t("PNG encode clean", encode_png, image)
        mask_png = t("PNG encode mask", encode_png, mask)
        type_code = choose_type(TYPE_CODES, "cycle", seed, image_id, 0)
        degraded, record = t(
            "degradation", degrade, image, mask, type_code, sample_rng(seed, image_id, 0)
        )
        t("record to JSON", lambda r: (r.to_json(), r.flat_summary()), record)
        degraded_png = t("PNG encode degraded", encode_png, degraded)
        ctx = t("no-reference context (from the mask)", noref_mask_context, mask, image.shape)
        nr_clean = t("no-reference metrics clean", noref_metrics, image, None, context=ctx)
        nr_deg = t("no-reference metrics degraded", noref_metrics, degraded, None, context=ctx)
        ref = t("full-reference context (clean)", reference_context, image, mask)
        fr = t("full-reference metrics (variant)", ref.metrics, degraded)
        row = {
            "image_id": image_id,
            "variant": 0,
            "status": "ok",
            "type_code": type_code,
            "clean_png": clean_png,
            "mask_png": mask_png,
            "degraded_png": degraded_png,
            "params_json": record.to_json(),
            "metric_version": METRIC_VERSION,
            **{f"{k}_clean": float(v) for k, v in nr_clean.items()},
            **{f"{k}_degraded": float(v) for k, v in nr_deg.items()},
            **{f"{k}_degraded": float(fr[k]) for k in ("psnr", "ssim", "ms_ssim")},
            **record.flat_summary(),
        }
        full = {**blank, **row}
        table = t(TO_ARROW, to_table, [full], schema)
        t(FROM_ARROW, table.to_pylist)
    cv2.setNumThreads(threads)
    return {k: v / len(paths) for k, v in t.seconds.items()}


def noref_mask_context(mask: np.ndarray, shape: tuple[int, ...]) -> Any:
    """A no-reference context with everything it derives from the mask computed (lazily
    computed parts would otherwise land in the first image's metrics)."""
    from fundus_batch.metrics import NorefContext

    ctx = NorefContext(mask, shape)
    _ = ctx.laplacian_fov8, ctx.square, ctx.uniformity_grid
    return ctx


FLOOR_ONLY = "(floor only: resize the whole frame to 512)"
TO_ARROW = "row -> Arrow (the actor's output block)"
FROM_ARROW = "Arrow -> row (the actor's input block)"
FLOOR_STEPS = (
    "read file",
    "reduced JPEG decode",
    FLOOR_ONLY,
    "PNG encode clean",
    "PNG encode mask",
)


def steps_section(args: argparse.Namespace) -> None:
    files = eyepacs_files()
    if not files:
        print(f"steps: SKIPPED ({EYEPACS} is absent)")
        return
    paths = [files[i % len(files)] for i in range(args.steps_images)]
    profile_steps(paths[:2])  # warm-up: imports, OpenCV and scikit-image first calls
    print(
        f"where one image's CPU time goes ({len(paths)} raw EyePACS photographs, 512 px, "
        f"1 variant, metrics on, in-process, process CPU time; {load_avg()})"
    )
    per = profile_steps(paths)
    for name, seconds in per.items():
        print(f"  {name:<62} {seconds * 1e3:7.1f} ms")
    floor = sum(per[k] for k in FLOOR_STEPS)
    chain = sum(v for k, v in per.items() if k != FLOOR_ONLY)
    print(f"  {'pipeline total (the stage chain)':<62} {chain * 1e3:7.1f} ms")
    print(f"  {'floor total':<62} {floor * 1e3:7.1f} ms")
    n, startup = args.floor_images, args.startup
    bound = (chain * n / args.cpus + startup) / (floor * n / args.cpus)
    print(
        f"  CPU-bound lower limit of the floor ratio: {chain / floor:.2f} without start-up, "
        f"{bound:.2f} with {startup:.0f} s of it at {n} images on {args.cpus} CPUs (no Ray "
        "overhead counted)"
    )


MIN_SIZE = 128  # the smallest working size the bench runs (FOV detection's working range)


def working_size(text: str) -> int:
    """An argparse type: a working size of at least ``MIN_SIZE`` px, a multiple of 32."""
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if size < MIN_SIZE or size % 32:
        raise argparse.ArgumentTypeError(
            f"{size}: the bench needs a working size of at least {MIN_SIZE} px, a multiple of 32 "
            "(smaller ones are outside FOV detection's working range)"
        )
    return size


def positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floor-images", type=positive, default=600)
    parser.add_argument("--steps-images", type=positive, default=20)
    parser.add_argument(
        "--startup",
        type=float,
        default=5.0,
        help="Ray start-up seconds assumed by the steps' limit",
    )
    parser.add_argument("--throughput-images", type=positive, default=600, help="EyePACS images")
    parser.add_argument("--images", type=positive, default=160, help="synthetic throughput images")
    parser.add_argument("--variants", type=positive, default=1)
    parser.add_argument(
        "--size", type=working_size, default=256, help=f"synthetic throughput size (>= {MIN_SIZE})"
    )
    parser.add_argument("--memory-size", type=working_size, default=128, help=f">= {MIN_SIZE}")
    parser.add_argument("--cpus", type=positive, default=2)
    parser.add_argument(
        "--rows-per-block",
        type=positive,
        default=None,
        help="default: the run config's (as the CLI)",
    )
    parser.add_argument("--small", type=positive, default=1000)
    parser.add_argument("--big", type=positive, default=10000)
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--skip-floor", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.skip_steps:
            steps_section(args)
        if not args.skip_floor:
            floor_section(root, args)
        if not args.skip_throughput:
            throughput_section(root, args)
        if not args.skip_memory:
            memory_section(root, args)


if __name__ == "__main__":
    main()
