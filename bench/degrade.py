"""Per-core throughput of the degradation path against a decode/resize/encode floor.

Full path, per image: raw JPEG bytes -> reduced decode -> FOV detection -> crop/resize to the
working size -> one degraded variant -> PNG encode of the clean and the degraded image.
Floor, on the same bytes in the same run: reduced decode -> resize to the working size -> PNG
encode. Single process, OpenCV and BLAS on one thread; file reads are outside the timing.

    python bench/degrade.py [--data DIR] [--type mixed|111|...] [--passes N] [--clock cpu|wall]

Uses /work/shared/data/eyepacs_sample (or ../shared/data/eyepacs_sample) when present, else
synthetic 3000x2000 JPEG photographs. The target is full-path time <= 2x the floor time; the
last line printed is that ratio. Times are process CPU seconds by default (``--clock cpu``):
on a shared machine, wall time also counts the time other processes hold the core. Floor and
full passes are interleaved and the median pass is reported. Nothing is written to disk.

It also times, outside the full path, the PNG decode of each working-size clean image
(``decode_image`` on the PNG the full path encoded, as a later stage decodes the stored clean
image; median over the passes).
"""

from __future__ import annotations

import os
import sys

sys.dont_write_bytecode = True  # a benchmark leaves no __pycache__ behind
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's fundus_batch, not an installed one

from fundus_batch.degrade import TYPE_CODES, degrade, sample_rng  # noqa: E402
from fundus_batch.fov import preprocess  # noqa: E402
from fundus_batch.io.codecs import decode_image, encode_jpeg, encode_png  # noqa: E402

CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
DEFAULT_DATA = (
    Path(os.environ.get("FUNDUS_BATCH_SHARED", REPO.parent / "shared")) / "data" / "eyepacs_sample"
)


def _load(data_dir: Path | None, n_synthetic: int) -> tuple[list[tuple[str, bytes]], str]:
    if data_dir is not None and data_dir.is_dir():
        files = sorted(p for p in data_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        if files:
            return [(p.name, p.read_bytes()) for p in files], str(data_dir)
    from fundus_batch.synth import synth_fundus

    items = []
    for seed in range(n_synthetic):
        fundus = synth_fundus(1800, seed=seed, canvas=(3000, 2000))
        items.append((f"synth_{seed}.jpeg", encode_jpeg(fundus.image, quality=95)))
    return items, f"synthetic 3000x2000 JPEG x{n_synthetic}"


def _floor(data: bytes, size: int) -> None:
    rgb = decode_image(data, min_side=size)
    small = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    encode_png(small)


class _Full:
    """The full path, with per-stage timers."""

    def __init__(self, size: int, types: list[str], clock: Callable[[], float]) -> None:
        self.size = size
        self.types = types
        self.clock = clock
        self.stages = {"decode": 0.0, "fov+crop": 0.0, "degrade": 0.0, "png x2": 0.0}
        self.count = 0

    def __call__(self, name: str, data: bytes) -> None:
        clock = self.clock
        t0 = clock()
        rgb = decode_image(data, min_side=self.size)
        t1 = clock()
        pre = preprocess(rgb, self.size)
        t2 = clock()
        code = self.types[self.count % len(self.types)]
        degraded, _ = degrade(pre.image, pre.mask, code, sample_rng(0, name, self.count))
        t3 = clock()
        encode_png(pre.image)
        encode_png(degraded)
        t4 = clock()
        for key, dt in zip(self.stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            self.stages[key] += dt
        self.count += 1


def _clean_pngs(items: list[tuple[str, bytes]], size: int) -> list[tuple[str, bytes]]:
    """Each image's working-size clean image as the PNG the pipeline stores (untimed)."""
    return [
        (name, encode_png(preprocess(decode_image(data, min_side=size), size).image))
        for name, data in items
    ]


def _png_decode(_name: str, data: bytes) -> None:
    decode_image(data)


def _pass_time(
    items: list[tuple[str, bytes]], run: Callable[[str, bytes], None], clock: Callable[[], float]
) -> float:
    start = clock()
    for name, data in items:
        run(name, data)
    return clock() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--type", default="mixed", help="a type code, or 'mixed' (cycle all 7)")
    parser.add_argument("--passes", type=int, default=5, help="timed passes over the files")
    parser.add_argument("--synthetic", type=int, default=6, help="synthetic images if no data")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: process CPU time (robust to other load); wall: elapsed time",
    )
    args = parser.parse_args(argv)
    if args.type != "mixed" and args.type not in TYPE_CODES:
        parser.error(f"--type must be 'mixed' or one of {TYPE_CODES}")
    if args.passes < 1:
        parser.error("--passes must be at least 1")
    if args.synthetic < 1:
        parser.error("--synthetic must be at least 1")
    cv2.setNumThreads(1)
    clock = CLOCKS[args.clock]
    items, source = _load(args.data, args.synthetic)
    types = list(TYPE_CODES) if args.type == "mixed" else [args.type]

    def floor(_name: str, data: bytes) -> None:
        _floor(data, args.size)

    pngs = _clean_pngs(items, args.size)
    _pass_time(items, floor, clock)  # warm-up (imports, allocator, caches)
    _pass_time(items, _Full(args.size, types, clock), clock)
    _pass_time(pngs, _png_decode, clock)
    full = _Full(args.size, types, clock)
    floor_times, full_times, png_times = [], [], []
    for _ in range(args.passes):  # interleaved, so load changes hit both alike
        floor_times.append(_pass_time(items, floor, clock))
        full_times.append(_pass_time(items, full, clock))
        png_times.append(_pass_time(pngs, _png_decode, clock))
    n = len(items)
    floor_s = statistics.median(floor_times) / n
    full_s = statistics.median(full_times) / n
    png_s = statistics.median(png_times) / n
    print(
        f"source: {source} ({n} images), size {args.size}, type {args.type}, 1 thread, "
        f"{args.clock} clock, median of {args.passes} passes"
    )
    for label, per_image in (
        ("floor (decode + resize + PNG)", floor_s),
        ("full (decode + FOV + degrade + 2 PNG)", full_s),
    ):
        print(f"{label:40s} {1 / per_image:7.2f} img/s {per_image * 1e3:8.1f} ms/img")
    runs = full.count
    print(
        "full-path stages (mean ms/img): "
        + ", ".join(f"{k} {v / runs * 1e3:.1f}" for k, v in full.stages.items())
    )
    print(
        f"PNG decode of a {args.size} px clean image (not part of the full path): "
        f"{png_s * 1e3:.1f} ms/img"
    )
    print(f"full / floor time: {full_s / floor_s:.2f}x (target <= 2.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
