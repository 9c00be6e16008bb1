"""The downstream vessel segmenter (`sato-v1`) on real photographs: ROC AUC and F1 against the
manual vessel maps of HRF and CHASE_DB1, on the clean and on every degradation type, and its
time per image (the README's numbers come from this script).

    python bench/vessel_segmenter.py [--shared ../shared] [--size 512] [--seed 2021]

Each photograph goes through the pipeline's own Fetch and Preprocess stages (HRF with its FOV
masks, CHASE_DB1 with detected ones), then through one seeded degradation of each type. Needs
`../shared`: without it, prints a SKIPPED line and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fundus_batch import imaging, stages
from fundus_batch.degrade import TYPE_CODES, degrade, sample_rng
from fundus_batch.io.codecs import decode_image
from fundus_batch.metrics.vessels import VESSEL_SEGMENTER, segment_and_score, vesselness

REPO = Path(__file__).resolve().parents[1]


def manifest_rows(shared: Path) -> list[dict]:
    """HRF (vessels = AVmanual label > 0, given FOV masks) and CHASE_DB1 (1st observer)."""
    hrf = shared / "data" / "hrf" / "training"
    chase = shared / "data" / "chase_db1"
    rows = []
    for image in sorted((hrf / "images").glob("*")):
        stem = image.stem
        rows.append(
            {
                "image_id": f"hrf/{stem}",
                "status": "ok",
                "source_uri": str(image),
                "source_mask_uri": str(hrf / "mask" / f"{stem}_mask.tif"),
                "vessel_gt_uri": str(hrf / "1st_manual" / f"{stem}_AVmanual.png"),
            }
        )
    for image in sorted((chase / "images").glob("*.jpg")):
        rows.append(
            {
                "image_id": f"chase_db1/{image.stem}",
                "status": "ok",
                "source_uri": str(image),
                "vessel_gt_uri": str(chase / "manual" / f"{image.stem}_1stHO.png"),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=2021)
    args = parser.parse_args()
    if not (args.shared / "data").is_dir():
        print(f"SKIPPED: no data at {args.shared / 'data'} (this bench needs ../shared)")
        return
    rows = manifest_rows(args.shared)
    if not rows:
        raise SystemExit(f"no HRF / CHASE_DB1 images under {args.shared}: this bench needs them")
    rows = stages.Preprocess(size=args.size)(stages.Fetch(threads=2, vessels=True)(rows))
    scores: dict[tuple[str, str], list[dict[str, float]]] = {}
    seconds: list[float] = []
    for row in rows:
        if row["status"] != "ok":
            print(f"skipped {row['image_id']}: {row.get('error')}", file=sys.stderr)
            continue
        source = row["image_id"].split("/")[0]
        clean = decode_image(row["clean_png"])
        mask = imaging.decode_mask(row["mask_png"])
        truth = imaging.decode_mask(row["vessel_gt_png"])
        start = time.perf_counter()
        vesselness(clean, mask)
        seconds.append(time.perf_counter() - start)
        scores.setdefault((source, "clean"), []).append(segment_and_score(clean, truth, mask))
        for code in TYPE_CODES:
            rng = sample_rng(args.seed, row["image_id"], int(code, 2))
            degraded, _ = degrade(clean, mask, code, rng)
            scores.setdefault((source, code), []).append(segment_and_score(degraded, truth, mask))
    print(f"segmenter {VESSEL_SEGMENTER}, {args.size} px, seed {args.seed}")
    print(f"time per image: median {np.median(seconds) * 1000:.0f} ms (vesselness only)\n")
    print("| source | image | n | AUC | F1 (top 12 %) |")
    print("|---|---|---|---|---|")
    for (source, role), found in scores.items():
        auc = np.mean([s["vessel_auc"] for s in found])
        f1 = np.mean([s["vessel_f1"] for s in found])
        print(f"| {source} | {role} | {len(found)} | {auc:.4f} | {f1:.4f} |")


if __name__ == "__main__":
    main()
