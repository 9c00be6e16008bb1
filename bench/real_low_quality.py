"""No-reference quality of the Cofe-Net authors' 100 real low-quality photographs, before and
after enhancement with the shipped model (the README's table comes from this script).

    python bench/real_low_quality.py [--shared ../shared] [--limit N] [--weights NAME]
        [--enhancer cofenet|classical]

Runs `fundus-batch enhance` through the library (local Ray) on `shared/data/cofenet_lq` with the
authors' FOV masks, then prints a markdown table of mean (and median) no-reference metrics of
the source and the enhanced images. Beside them, for scale, the median of each metric over the
raw EyePACS photographs of `shared/data` that pass the shipped recipe's clean-target bounds
(`jobs/configs/train_gated_warm.yaml`): what good photographs of the same screening programme
score, which is what a model trained to restore them moves towards. Needs `../shared`: without
it, prints a SKIPPED line and exits 0.

`--all-sources` also enhances every photograph of the four ordinary sources of `shared/data`
(HRF, CHASE_DB1, raw EyePACS, MX_EyeFundus_DME; poor ones included: no quality gate) one at a
time, without Ray, and prints per source how many the enhancer changed at all.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

from train_cofenet import dataset_files, quality_failures, read_config

from fundus_batch import pipeline
from fundus_batch.config import build_config
from fundus_batch.console import run_on_console
from fundus_batch.enhance import ImageEnhancer
from fundus_batch.fidelity import unchanged_counts, unchanged_lines
from fundus_batch.metrics import NOREF_METRICS, noref_metrics
from fundus_batch.shards import read_frame
from fundus_batch.train import load_clean_sample

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "jobs" / "configs" / "train_gated_warm.yaml"


def clean_eyepacs_medians(data_root: Path) -> tuple[int, dict[str, float]]:
    """How many raw EyePACS photographs pass the recipe's clean-target bounds, and the median
    of each no-reference metric over them (512 px working images, detected FOV)."""
    bounds = read_config(str(RECIPE))["quality"]
    values: list[dict[str, float]] = []
    for entry in dataset_files(data_root, "eyepacs"):
        sample = load_clean_sample(entry["image_id"], data_root / entry["image"], 512)
        if not quality_failures(sample, bounds):
            values.append(noref_metrics(sample.image, sample.mask))
    return len(values), {
        k: float(pd.Series([v[k] for v in values]).median()) for k in NOREF_METRICS
    }


SOURCES = ("hrf", "chase_db1", "eyepacs", "mx_dme")


def changed_per_source(data_root: Path, weights: str, enhancer: str) -> list[str]:
    """Per ordinary source, how many of its photographs (512 px working images, detected FOV)
    the enhancer changed at all, and the largest mean change inside the FOV (grey levels)."""
    enhance = ImageEnhancer(enhancer=enhancer, weights=weights)
    lines = []
    for source in SOURCES:
        changes = []
        for entry in dataset_files(data_root, source):
            sample = load_clean_sample(entry["image_id"], data_root / entry["image"], 512)
            changes.append(enhance(sample.image, sample.mask).change)
        changed = sum(1 for c in changes if c > 0)
        lines.append(
            f"{source}: changed {changed} of {len(changes)} photographs "
            f"(largest mean change {max(changes):.2f} grey levels)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--weights", default="fundus-cofenet-small")
    parser.add_argument("--enhancer", choices=["cofenet", "classical"], default="cofenet")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own output")
    parser.add_argument(
        "--all-sources",
        action="store_true",
        help="also count the photographs of every ordinary source the enhancer changes",
    )
    args = parser.parse_args()
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    folder = args.shared / "data" / "cofenet_lq"
    if not folder.is_dir():
        print(f"SKIPPED: no data at {folder} (this bench needs ../shared)")
        return
    images = sorted((folder / "image").glob("*.png"))[: args.limit]
    if not images:
        raise SystemExit(f"no images under {folder / 'image'}")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "m.csv"
        pd.DataFrame(
            {
                "image_id": [p.stem for p in images],
                "uri": [str(p) for p in images],
                "mask_uri": [str(folder / "mask" / p.name) for p in images],
            }
        ).to_csv(manifest, index=False)
        out = Path(tmp) / "out"
        config = build_config(
            {
                "manifest": str(manifest),
                "out": str(out),
                "mode": "enhance",
                "progress": False,
                "enhance": {
                    "enhancer": args.enhancer,
                    "batch_size": 4,
                    # the classical enhancer takes no weights (a config naming them is refused)
                    **({"weights": args.weights} if args.enhancer == "cofenet" else {}),
                },
                "ray": {"num_cpus": 2},
            },
            "bench",
        )

        # Ray's lines go to a log file, as in the CLI; the run stops the Ray it started
        summary, log_path = run_on_console(
            lambda progress: pipeline.run(config, progress=progress),
            verbose=args.verbose,
            progress=False,
            say=print,
        )
        if log_path is not None:
            print(f"(Ray's output: {log_path})")
        frame = read_frame(str(out))
        if frame is None:
            raise SystemExit(f"the run wrote no Parquet shards under {out / 'pairs'}")
    ok = frame[frame.status == "ok"]
    print(
        f"{len(ok)} of {summary.rows_in} images enhanced with "
        f"{args.weights if args.enhancer == 'cofenet' else 'the classical enhancer'} "
        f"in {summary.seconds:.0f} s"
    )
    for line in unchanged_lines(unchanged_counts(frame)):
        print(line)
    print("")
    n_clean, clean = clean_eyepacs_medians(args.shared / "data")
    print(
        "| metric | source mean | enhanced mean | source median | enhanced median "
        f"| clean EyePACS median ({n_clean}) |"
    )
    print("|---|---|---|---|---|---|")
    for name in NOREF_METRICS:
        before, after = ok[f"{name}_clean"], ok[f"{name}_enhanced"]
        print(
            f"| `{name}` | {before.mean():.4g} | {after.mean():.4g} | {before.median():.4g} "
            f"| {after.median():.4g} | {clean[name]:.4g} |"
        )
    uniformity = ok["nr_uniformity_enhanced"].median() / ok["nr_uniformity_clean"].median() - 1
    overexposed = ok["nr_overexposed_enhanced"].mean() - ok["nr_overexposed_clean"].mean()
    print("")
    print(
        f"median nr_uniformity {100 * uniformity:+.1f} % (target <= -15 %); "
        f"mean nr_overexposed {overexposed:+.2g} (target <= 0)"
    )
    print(
        f"clean EyePACS median nr_uniformity {clean['nr_uniformity']:.4g}: "
        f"{100 * (clean['nr_uniformity'] / ok['nr_uniformity_clean'].median() - 1):+.1f} % "
        "from the source median"
    )
    if args.all_sources:
        print("")
        for line in changed_per_source(args.shared / "data", args.weights, args.enhancer):
            print(line)


if __name__ == "__main__":
    main()
