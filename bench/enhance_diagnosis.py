"""Where an enhancer's remaining error sits on the illumination types: halo or hole.

    python bench/enhance_diagnosis.py [--fold jobs/weights/folds/fold-eyepacs] [--images 12]

For each held-out photograph of the fold and each illumination type (the draw of
``bench/enhance_quality.py``: ``sample_rng(seed, image_id, type index)``), the degradation is
replayed with steps left out (``replay(..., skip=...)``). Printed per type, as means:

- PSNR against the clean photograph of the degraded and the enhanced image, of the colour-kept
  target (only the draw's global colour jitter: the ceiling of a model trained with
  ``keep_colour``), and of the degradation without its halo or without its hole;
- the share of the squared error the enhancer removed (against the colour-kept target) in the
  pixels only the halo moved and in the pixels only the hole moved (by more than 2 grey levels);
- the new-error share (``fundus_batch.metrics.harm``, in % of FOV pixels) against the clean
  photograph and against the colour-kept target, and where the new-error pixels lie: the share
  of them in pixels only the halo moved, only the hole moved, both, or neither;
- the new-error share of the colour-kept target itself (what a model that removed the halo and
  the hole perfectly but kept the colour jitter would add), also at the 95th percentile of
  photographs, as issue 10's line counts it.

Needs ``../shared``; prints a line and exits 0 without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fundus_batch.degrade import TYPE_CODES, degrade, replay, sample_rng
from fundus_batch.metrics.harm import new_error_map, new_error_share
from fundus_batch.metrics.reference import psnr
from fundus_batch.models import WeightsEntry, model_for_entry
from fundus_batch.train import enhance_images, load_clean_sample

REPO = Path(__file__).resolve().parents[1]
ILLUMINATION = ("001", "011", "101", "111")
MOVED = 2  # grey levels: a step "moved" a pixel when it changed it by more than this


def _removed(
    enhanced: np.ndarray, degraded: np.ndarray, target: np.ndarray, region: np.ndarray
) -> float:
    """1 - (enhancer's squared error / degraded's squared error) inside ``region``."""
    if not region.any():
        return float("nan")
    before = ((degraded.astype(np.float64) - target)[region] ** 2).mean()
    after = ((enhanced.astype(np.float64) - target)[region] ** 2).mean()
    return float(1.0 - after / before) if before > 0 else float("nan")


def _moved(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > MOVED


def _where(new: np.ndarray, halo: np.ndarray, hole: np.ndarray) -> dict[str, float]:
    """Shares of the new-error pixels ``new`` in each region (NaN where there are none)."""
    regions = {
        "new_in_halo_only": halo & ~hole,
        "new_in_hole_only": hole & ~halo,
        "new_in_both": halo & hole,
        "new_in_neither": ~halo & ~hole,
    }
    count = int(new.sum())
    return {
        key: (float((new & region).sum()) / count if count else float("nan"))
        for key, region in regions.items()
    }


def diagnose(fold: Path, data_root: Path, images: int) -> tuple[dict[str, dict[str, float]], int]:
    """Per-type means over the fold's first ``images`` held-out photographs, and how many
    photographs that was (the fold may hold out fewer than ``images``)."""
    registry = json.loads((fold / "registry.json").read_text(encoding="utf-8"))
    entry = WeightsEntry.from_dict(registry["weights"][0], fold / "registry.json")
    model = model_for_entry(entry)
    evaluation = json.loads((fold / f"{entry.name}.eval.json").read_text(encoding="utf-8"))
    seed, preset = evaluation["protocol"]["seed"], evaluation["protocol"]["preset"]
    rows: dict[str, list[dict[str, float]]] = {t: [] for t in ILLUMINATION}
    held_out = evaluation["holdout"][:images]
    for held in held_out:
        mask_path = data_root / held["mask"] if "mask" in held else None
        sample = load_clean_sample(
            held["image_id"], data_root / held["image"], 512, mask_path=mask_path
        )
        image, mask, fov = sample.image, sample.mask, sample.mask > 127
        for index, code in enumerate(TYPE_CODES):
            if code not in rows:
                continue
            rng = sample_rng(seed, sample.image_id, index)
            degraded, record = degrade(image, mask, code, rng, preset)
            spatial = ("halo", "hole", "spots", "blur")
            target = replay(image, mask, record, skip=spatial)  # the colour jitter alone
            no_halo = replay(image, mask, record, skip=("halo",))
            no_hole = replay(image, mask, record, skip=("hole",))
            halo_only = _moved(replay(image, mask, record, skip=("hole", "spots", "blur")), target)
            hole_only = _moved(replay(image, mask, record, skip=("halo", "spots", "blur")), target)
            enhanced = enhance_images(model, [degraded], batch_size=1)[0]
            enhanced = np.where(fov[..., None], enhanced, 0).astype(np.uint8)
            new = new_error_map(enhanced, degraded, image) & fov
            rows[code].append(
                {
                    "psnr_degraded": psnr(degraded, image, fov),
                    "psnr_enhanced": psnr(enhanced, image, fov),
                    "psnr_colour_kept_target": psnr(target, image, fov),
                    "psnr_without_halo": psnr(no_halo, image, fov),
                    "psnr_without_hole": psnr(no_hole, image, fov),
                    "halo_error_removed": _removed(
                        enhanced, degraded, target, halo_only & ~hole_only & fov
                    ),
                    "hole_error_removed": _removed(
                        enhanced, degraded, target, hole_only & ~halo_only & fov
                    ),
                    "new_error_pct": 100 * new_error_share(enhanced, degraded, image, mask),
                    "new_error_vs_colour_kept_pct": 100
                    * new_error_share(enhanced, degraded, target, mask),
                    "colour_kept_new_error_pct": 100
                    * new_error_share(target, degraded, image, mask),
                    **_where(new, halo_only, hole_only),
                }
            )
    table = {
        code: {
            **{key: float(np.nanmean([r[key] for r in found])) for key in found[0]},
            "colour_kept_new_error_p95_pct": float(
                np.percentile([r["colour_kept_new_error_pct"] for r in found], 95)
            ),
        }
        for code, found in rows.items()
        if found
    }
    return table, len(held_out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--fold", type=Path, default=REPO / "jobs" / "weights" / "folds" / "fold-eyepacs"
    )
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--images", type=int, default=12, help="held-out photographs to use, at most"
    )
    args = parser.parse_args()
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    if not (args.fold / "registry.json").is_file():
        parser.error(f"--fold: no registry.json in {args.fold}")
    if not args.data_root.is_dir():
        print(f"SKIPPED: no data at {args.data_root} (this bench needs ../shared)")
        return 0
    table, scored = diagnose(args.fold, args.data_root, args.images)
    keys = list(next(iter(table.values())))
    print(f"fold {args.fold.name}, {scored} held-out photographs, means per type")
    print("| type | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for code, stats in table.items():
        print(f"| {code} | " + " | ".join(f"{stats[k]:.3f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
