"""FOV fidelity of the classical enhancer on real photographs degraded with every type code
(the numbers in the README's classical-enhancer note come from this script).

    python bench/classical.py [--shared ../shared] [--per-source 3] [--skip 3] [--size 512]

Takes ``--per-source`` photographs from each of HRF, CHASE_DB1, EyePACS (more) and MX_DME (in
sorted order, after skipping the first ``--skip``: the defaults' parameters were tuned on the
first three), preprocesses them, degrades each with every type (seeded), enhances with
``fundus_batch.classical`` and prints per type: mean FOV PSNR and SSIM of degraded and enhanced
against the clean image, the PSNR gain, and the 95th percentile over images of the new-error
share (FOV pixels where |enhanced - clean| exceeds |degraded - clean| by more than 40 grey
levels in any channel). Also the PSNR of enhanced clean images and the CPU time per image.
Needs ``../shared``: without it, prints a SKIPPED line and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fundus_batch.classical import MODEL_NAME, enhance_classical
from fundus_batch.degrade import TYPE_CODES, degrade, sample_rng
from fundus_batch.fov import preprocess
from fundus_batch.io.codecs import decode_image
from fundus_batch.metrics.reference import psnr, ssim

REPO = Path(__file__).resolve().parents[1]
SOURCES = {
    "hrf": "hrf/training/images/*.jpg",
    "chase_db1": "chase_db1/images/*.jpg",
    "eyepacs_more": "eyepacs_more/*.jpeg",
    "mx_dme": "mx_dme/*.jpg",
}


def new_error_share(enhanced: np.ndarray, degraded: np.ndarray, clean: np.ndarray, fov) -> float:
    """Share of FOV pixels the enhancer put 40+ grey levels further from clean, any channel."""
    c = clean.astype(np.int16)
    extra = np.abs(enhanced.astype(np.int16) - c) - np.abs(degraded.astype(np.int16) - c)
    return float((extra[fov] > 40).any(axis=-1).mean())


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--per-source", type=at_least(1), default=3)
    parser.add_argument("--skip", type=at_least(0), default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    data = args.shared / "data"
    if not data.is_dir():
        print(f"SKIPPED: no data at {data} (this bench needs ../shared)")
        return
    files = [
        f
        for pattern in SOURCES.values()
        for f in sorted(data.glob(pattern))[args.skip : args.skip + args.per_source]
    ]
    if not files:
        raise SystemExit(f"no photographs under {data} after skipping the first {args.skip}")
    stats: dict[str, dict[str, list[float]]] = {t: {} for t in TYPE_CODES}
    clean_psnr: list[float] = []
    cpu: list[float] = []
    for path in files:
        pre = preprocess(decode_image(path.read_bytes(), min_side=args.size), size=args.size)
        clean, mask = pre.image, pre.mask
        fov = mask > 0
        start = time.process_time()
        clean_psnr.append(psnr(enhance_classical(clean, mask), clean, mask))
        cpu.append(time.process_time() - start)
        for variant, code in enumerate(TYPE_CODES):
            rng = sample_rng(args.seed, path.name, variant)
            degraded, _ = degrade(clean, mask, code, rng)
            start = time.process_time()
            enhanced = enhance_classical(degraded, mask)
            cpu.append(time.process_time() - start)
            row = {
                "psnr_degraded": psnr(degraded, clean, mask),
                "psnr_enhanced": psnr(enhanced, clean, mask),
                "ssim_degraded": ssim(degraded, clean, mask),
                "ssim_enhanced": ssim(enhanced, clean, mask),
                "new_error": new_error_share(enhanced, degraded, clean, fov),
            }
            for key, value in row.items():
                stats[code].setdefault(key, []).append(value)
    print(f"{MODEL_NAME} on {len(files)} photographs ({', '.join(SOURCES)}), {args.size} px\n")
    print(
        "| type | PSNR degraded | PSNR enhanced | gain dB | SSIM degraded | SSIM enhanced "
        "| new-error p95 |"
    )
    print("|---|---|---|---|---|---|---|")
    gains = []
    for code, s in stats.items():
        gain = float(np.mean(np.subtract(s["psnr_enhanced"], s["psnr_degraded"])))
        gains.append(gain)
        psnrs = f"{np.mean(s['psnr_degraded']):.2f} | {np.mean(s['psnr_enhanced']):.2f}"
        ssims = f"{np.mean(s['ssim_degraded']):.4f} | {np.mean(s['ssim_enhanced']):.4f}"
        share = np.percentile(s["new_error"], 95) * 100
        print(f"| {code} | {psnrs} | {gain:+.2f} | {ssims} | {share:.2f} % |")
    finite = [p for p in clean_psnr if np.isfinite(p)]
    print(f"\nmean gain over the seven types: {np.mean(gains):+.2f} dB")
    print(
        f"clean photographs through the enhancer: {len(clean_psnr) - len(finite)} of "
        f"{len(clean_psnr)} unchanged, the others at {np.median(finite) if finite else np.inf:.1f}"
        " dB median FOV PSNR"
    )
    print(f"CPU time per image: median {np.median(cpu) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
