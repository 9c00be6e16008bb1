"""Per-variant cost of the quality metrics, on one core, and their distance from float64.

Synthetic fundus photographs (``fundus_batch.synth``) at the working size, each with one
degraded variant per type code. Prints, in milliseconds:

- full-reference (PSNR, SSIM, MS-SSIM in the FOV) per variant against a clean-image context
  shared by all variants of an image (what the ``Score`` stage does), the context itself per
  clean image, and the unshared call ``full_reference_metrics(image, ref, mask)``;
- no-reference per image with a shared per-mask context and without, and the per-mask context
  itself (built once per clean image, its lazily computed parts included);
- the same computed by the float64 reference in ``tests/metrics/float64_reference.py``;

then the largest absolute difference of every metric from that float64 reference ("n/a" for a
metric that is NaN in both on every variant, such as MS-SSIM below its smallest size). With
``--baseline REV`` the metric modules as they were at git revision REV (read with ``git show``,
e.g. 91ea45a, before the float32 rewrite) are timed in the same run, and the speed-up printed:
both the full-reference and the no-reference figure count their shared context's cost,
amortised over the variants of an image (and whole at K=1).
OpenCV and BLAS run on one thread; every time is the minimum over ``--repeats`` runs (the
machine may be shared), as wall time and as this thread's CPU time.

    python bench/metrics.py [--size 512] [--images 3] [--repeats 15] [--baseline REV]
"""

from __future__ import annotations

import os
import sys

sys.dont_write_bytecode = True  # a benchmark leaves no __pycache__ behind
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.metrics.float64_reference

from fundus_batch.degrade import TYPE_CODES, degrade, sample_rng  # noqa: E402
from fundus_batch.metrics import (  # noqa: E402
    full_reference_metrics,
    noref_context,
    noref_metrics,
    reference_context,
)
from fundus_batch.synth import synth_fundus  # noqa: E402
from tests.metrics import float64_reference as f64  # noqa: E402

TARGET_FULL_REFERENCE_MS = 15.0


def load_baseline(rev: str) -> tuple[ModuleType, ModuleType]:
    """The metrics' ``reference`` and ``noref`` modules as they were at git revision ``rev``."""
    folder = Path(tempfile.mkdtemp(prefix="metrics-baseline-"))
    for name in ("reference", "noref"):
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:fundus_batch/metrics/{name}.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        source = source.replace("from .reference import", "from baseline_reference import")
        (folder / f"baseline_{name}.py").write_text(source)
    sys.path.insert(0, str(folder))
    return importlib.import_module("baseline_reference"), importlib.import_module("baseline_noref")


def best_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(min wall ms, min thread-CPU ms) of ``fn`` over ``repeats`` calls."""
    wall = cpu = math.inf
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpu = min(cpu, time.thread_time() - c0)
        wall = min(wall, time.perf_counter() - w0)
    return wall * 1e3, cpu * 1e3


def per_item(
    label: str, fn: Callable[[], object], items: int, repeats: int, unit: str
) -> np.ndarray:
    """Time ``fn`` (which handles ``items`` items), print and return (wall, cpu) ms per item."""
    wall, cpu = best_ms(fn, repeats)
    print(f"  {label:<58} {wall / items:8.2f} ms wall {cpu / items:8.2f} ms cpu  / {unit}")
    return np.array([wall, cpu]) / items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="working size (default 512)")
    parser.add_argument("--images", type=int, default=3, help="clean images (default 3)")
    parser.add_argument("--repeats", type=int, default=15, help="timing repeats (default 15)")
    parser.add_argument(
        "--reference-repeats", type=int, default=3, help="repeats for the slow float64 reference"
    )
    parser.add_argument("--baseline", metavar="REV", help="also time the metrics at git REV")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    baseline = load_baseline(args.baseline) if args.baseline else None

    cases = []
    for seed in range(args.images):
        s = synth_fundus(args.size, seed=seed)
        variants = [
            degrade(s.image, s.mask, code, sample_rng(seed, f"bench{seed}", i))[0]
            for i, code in enumerate(TYPE_CODES)
        ]
        cases.append((s.image, s.mask, variants))
    k = len(TYPE_CODES)
    n_variants = len(cases) * k
    print(
        f"{len(cases)} synthetic images at {args.size} px, {k} variants each, one thread, "
        f"min of {args.repeats} runs"
    )

    contexts = [reference_context(img, mask) for img, mask, _ in cases]
    masks = [noref_context(mask, img.shape) for img, mask, _ in cases]

    def shared_full() -> None:
        for ctx, (_, _, variants) in zip(contexts, cases, strict=True):
            for v in variants:
                ctx.metrics(v)

    def build_contexts() -> None:
        for img, mask, _ in cases:
            reference_context(img, mask)

    def unshared_full() -> None:
        for img, mask, variants in cases:
            for v in variants:
                full_reference_metrics(v, img, mask)

    def shared_noref() -> None:
        for ctx, (_, _, variants) in zip(masks, cases, strict=True):
            for v in variants:
                noref_metrics(v, None, context=ctx)

    def build_noref_contexts() -> None:
        for img, mask, _ in cases:
            ctx = noref_context(mask, img.shape)
            _ = ctx.laplacian_fov8, ctx.square, ctx.uniformity_grid  # the lazily built parts

    def unshared_noref() -> None:
        for _, mask, variants in cases:
            for v in variants:
                noref_metrics(v, mask)

    def reference_full() -> None:
        for img, mask, variants in cases:
            for v in variants:
                f64.full_reference(v, img, mask > 0)

    def reference_noref() -> None:
        for _, mask, variants in cases:
            for v in variants:
                f64.noref(v, mask > 0)

    print("full-reference (PSNR, SSIM, MS-SSIM):")
    shared = per_item(
        "per variant, clean context shared", shared_full, n_variants, args.repeats, "variant"
    )
    build = per_item(
        "clean context, once per image", build_contexts, len(cases), args.repeats, "image"
    )
    per_item(
        "per variant, unshared (context built per call)",
        unshared_full,
        n_variants,
        args.repeats,
        "variant",
    )
    if baseline is not None:
        old_full = per_item(
            f"per variant, at {args.baseline}",
            lambda: [
                baseline[0].full_reference_metrics(v, img, mask)
                for img, mask, variants in cases
                for v in variants
            ],
            n_variants,
            args.repeats,
            "variant",
        )
    per_item(
        "float64 reference (tests/metrics)",
        reference_full,
        n_variants,
        args.reference_repeats,
        "variant",
    )
    print("no-reference (7 metrics):")
    new_noref = per_item(
        "per image, mask context shared", shared_noref, n_variants, args.repeats, "image"
    )
    noref_build = per_item(
        "mask context, once per clean image",
        build_noref_contexts,
        len(cases),
        args.repeats,
        "clean image",
    )
    per_item("per image, unshared", unshared_noref, n_variants, args.repeats, "image")
    if baseline is not None:
        old_noref = per_item(
            f"per image, at {args.baseline}",
            lambda: [
                baseline[1].noref_metrics(v, mask) for _, mask, variants in cases for v in variants
            ],
            n_variants,
            args.repeats,
            "image",
        )
    per_item(
        "float64 reference (tests/metrics)",
        reference_noref,
        n_variants,
        args.reference_repeats,
        "image",
    )

    worst: dict[str, float] = {}
    finite_seen: set[str] = set()  # metrics finite in the reference on at least one variant
    for (img, mask, variants), ctx, mctx in zip(cases, contexts, masks, strict=True):
        for v in variants:
            pairs = [
                (ctx.metrics(v), f64.full_reference(v, img, mask > 0)),
                (noref_metrics(v, None, context=mctx), f64.noref(v, mask > 0)),
            ]
            for got, expected in pairs:
                for name, value in expected.items():
                    if math.isfinite(value):
                        finite_seen.add(name)
                        diff = abs(got[name] - value)
                    else:
                        same = got[name] == value or (math.isnan(got[name]) and math.isnan(value))
                        diff = 0.0 if same else math.inf
                    worst[name] = max(worst.get(name, 0.0), diff)
    print("max |fast - float64 reference| over all variants:")
    for name, diff in worst.items():
        nan_in_both = name not in finite_seen and diff == 0.0
        print(f"  {name:<20} {'n/a (NaN in both)' if nan_in_both else f'{diff:.2e}'}")

    amortised, single = shared + build / k, shared + build
    noref_amortised, noref_single = new_noref + noref_build / k, new_noref + noref_build
    for i, clock in enumerate(("wall", "cpu")):
        print(
            f"full-reference per variant ({clock}): {amortised[i]:.2f} ms at K={k} with the "
            f"context amortised (target <= {TARGET_FULL_REFERENCE_MS:g}), {single[i]:.2f} ms at K=1"
        )
        print(
            f"no-reference per variant ({clock}): {noref_amortised[i]:.2f} ms at K={k} with the "
            f"mask context amortised, {noref_single[i]:.2f} ms at K=1"
        )
        if baseline is not None:
            print(
                f"  speed-up against {args.baseline} ({clock}): full-reference "
                f"{old_full[i] / amortised[i]:.1f}x at K={k}, {old_full[i] / single[i]:.1f}x "
                f"at K=1; no-reference {old_noref[i] / noref_amortised[i]:.1f}x at K={k}, "
                f"{old_noref[i] / noref_single[i]:.1f}x at K=1 (the mask context amortised as "
                "the clean one)"
            )


if __name__ == "__main__":
    main()
