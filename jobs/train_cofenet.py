"""Train a small Cofe-Net on real clean photographs degraded on the fly, and package it.

Reproduces the shipped ``fundus-cofenet-small`` model (2 CPU cores, about 45 minutes):

    python jobs/train_cofenet.py --config jobs/configs/train_small.yaml \\
        --data-root /work/shared/data --out runs/cofenet-small

Training images are HRF ``training/`` (vessels = AV label > 0, FOV masks given) and CHASE_DB1
(first observer's vessels, FOV detected), optionally the EyePACS sample (no vessel ground truth),
each cropped to the working size with fov.preprocess. The images listed under ``holdout`` are
never trained on; each is degraded once with each of the seven types for validation.

Writes to ``--out``: ``checkpoint.pt`` (resumable with ``--resume``), ``<name>.pt`` (the state
dict, fp16), ``registry.json`` (an entry usable via ``FUNDUS_BATCH_WEIGHTS=<out>``),
``<name>.eval.json`` (protocol, held-out ids, per-type and per-image metrics) and ``train.log``.
``--eval-only WEIGHTS`` re-evaluates a state dict on the held-out set and writes only the eval
JSON. A pairs dataset written by the pipeline can be used instead with ``--pairs ROOT``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

# Sleeping rather than spinning OpenMP workers: on a shared CPU a spinning torch thread that
# loses its core stalls every parallel region.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import fundus_batch  # noqa: F401  (installed)
except ImportError:  # running from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import yaml

from fundus_batch.degrade import TYPE_CODES
from fundus_batch.models import build_cofenet, file_sha256, load_weights
from fundus_batch.train import (
    CleanSample,
    DegradeSource,
    PairsSource,
    TrainConfig,
    TrainError,
    ValReport,
    evaluate,
    load_clean_sample,
    train,
)

log = logging.getLogger("train_cofenet")

DEFAULT_HOLDOUT = {
    "hrf": ["07_dr", "08_g", "08_h", "08_dr"],
    "chase_db1": ["Image_13L", "Image_13R", "Image_14L", "Image_14R"],
}
DATASETS = ("hrf", "chase_db1", "eyepacs_sample")
TRAINING_DATA = {
    "hrf": "HRF (Budai et al. 2013)",
    "chase_db1": "CHASE_DB1 (Kingston University)",
    "eyepacs_sample": "Kaggle EyePACS sample",
}


def dataset_files(root: Path, dataset: str) -> list[dict[str, str]]:
    """Every image of ``dataset`` under ``root`` with its vessel/mask files (relative paths)."""
    if dataset == "hrf":
        base = root / "hrf" / "training"
        images = sorted(p for p in (base / "images").iterdir() if p.suffix.lower() == ".jpg")
        out = []
        for p in images:
            entry = {
                "image_id": f"hrf/{p.stem}",
                "image": str(p.relative_to(root)),
                "vessels": f"hrf/training/1st_manual/{p.stem}_AVmanual.png",
                "mask": f"hrf/training/mask/{p.stem}_mask.tif",
            }
            out.append(entry)
    elif dataset == "chase_db1":
        images = sorted((root / "chase_db1" / "images").glob("*.jpg"))
        out = [
            {
                "image_id": f"chase_db1/{p.stem}",
                "image": str(p.relative_to(root)),
                "vessels": f"chase_db1/manual/{p.stem}_1stHO.png",
            }
            for p in images
        ]
    elif dataset == "eyepacs_sample":
        images = sorted((root / "eyepacs_sample").glob("*.jpeg"))
        out = [{"image_id": f"eyepacs/{p.stem}", "image": str(p.relative_to(root))} for p in images]
    else:
        raise ValueError(f"unknown dataset {dataset!r}; known: {DATASETS}")
    if not out:
        raise FileNotFoundError(f"no {dataset} images under {root}")
    for entry in out:
        for key in ("image", "vessels", "mask"):
            if key in entry and not (root / entry[key]).is_file():
                raise FileNotFoundError(f"{dataset}: missing {root / entry[key]}")
    return out


def load_samples(root: Path, entries: list[dict[str, str]], size: int) -> list[CleanSample]:
    """Load and preprocess the listed images (see fundus_batch.train.load_clean_sample)."""
    samples = []
    for e in entries:
        samples.append(
            load_clean_sample(
                e["image_id"],
                root / e["image"],
                size,
                vessels_path=root / e["vessels"] if "vessels" in e else None,
                mask_path=root / e["mask"] if "mask" in e else None,
            )
        )
    return samples


def split_entries(
    root: Path, datasets: list[str], holdout: dict[str, list[str]]
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(training entries, held-out entries); every held-out name must exist."""
    train_entries: list[dict[str, str]] = []
    held: list[dict[str, str]] = []
    for dataset in datasets:
        entries = dataset_files(root, dataset)
        names = set(holdout.get(dataset, []))
        known = {Path(e["image"]).stem for e in entries}
        if names - known:
            raise ValueError(f"{dataset}: held-out images not found: {sorted(names - known)}")
        for e in entries:
            (held if Path(e["image"]).stem in names else train_entries).append(e)
    return train_entries, held


def read_config(path: str | None) -> dict[str, Any]:
    """The YAML job config: ``train`` (TrainConfig fields) and ``data``/``name``/``preset``."""
    if path is None:
        return {}
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    unknown = set(data) - {"name", "preset", "working_size", "train", "data"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}")
    return data


def registry_entry(
    name: str, weights: Path, config: TrainConfig, size: int, training_data: str, report: ValReport
) -> dict[str, Any]:
    """A registry entry (fundus_batch.models.WeightsEntry fields) for the trained weights."""
    metrics: dict[str, float] = {"val_psnr_gain_mean": round(report.mean_psnr_gain, 3)}
    for t, m in report.per_type.items():
        metrics[f"val_psnr_gain_{t}"] = round(m.psnr_gain, 3)
        metrics[f"val_psnr_enhanced_{t}"] = round(m.psnr_enhanced, 3)
        metrics[f"val_ssim_enhanced_{t}"] = round(m.ssim_enhanced, 4)
    return {
        "name": name,
        "file": weights.name,
        "sha256": file_sha256(weights),
        "variant": build_cofenet(config.variant, config.width, device="meta").variant,
        "width": config.width,
        "residual": config.residual,
        "size": size,
        "training_data": training_data,
        "metrics": metrics,
        "notes": "see MODEL_CARD.md",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML job config (jobs/configs/train_small.yaml)")
    parser.add_argument("--data-root", default="/work/shared/data", help="folder of datasets")
    parser.add_argument("--pairs", help="train on a pipeline pairs dataset instead (its root)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--name", help="weights name (default fundus-cofenet-small)")
    parser.add_argument("--datasets", help="comma-separated subset of " + ",".join(DATASETS))
    parser.add_argument("--working-size", type=int, help="preprocess size (default 512)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--width", type=float)
    parser.add_argument("--size", type=int, help="training crop side")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--init", choices=["released", "fixup"])
    parser.add_argument("--loss-scale", choices=["none", "degraded"])
    parser.add_argument("--val-every", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--eval-only", metavar="WEIGHTS", help="only evaluate this state dict")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[logging.StreamHandler(sys.stdout), handler],
    )
    try:
        job = read_config(args.config)
        name = args.name or job.get("name", "fundus-cofenet-small")
        preset = job.get("preset", "cofe-release")
        size = args.working_size or int(job.get("working_size", 512))
        data = job.get("data", {})
        datasets = (
            args.datasets.split(",")
            if args.datasets
            else data.get("datasets", ["hrf", "chase_db1"])
        )
        holdout = data.get("holdout", DEFAULT_HOLDOUT)
        values = dict(job.get("train", {}))
        overrides = {
            "steps": args.steps,
            "width": args.width,
            "size": args.size,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "init": args.init,
            "loss_scale": args.loss_scale,
            "val_every": args.val_every,
            "num_threads": args.threads,
            "device": args.device,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["checkpoint"] = str(out / "checkpoint.pt")
        values["resume"] = args.resume
        values["val_at_end"] = False  # the job evaluates the saved (fp16) weights itself
        config = TrainConfig.from_dict(values)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)

    root = Path(args.data_root)
    start = time.perf_counter()
    if args.pairs:
        train_source: Any = PairsSource(args.pairs, split="train")
        val_source: Any = PairsSource(args.pairs, split="val")
        held: list[dict[str, str]] = []
        training_data = f"fundus_batch pairs dataset {args.pairs} (split train)"
    else:
        train_entries, held = split_entries(root, datasets, holdout)
        log.info("held out: %s", ", ".join(e["image_id"] for e in held))
        training_data = (
            ", ".join(TRAINING_DATA[d] for d in datasets)
            + f"; degradations synthesised on the fly by fundus_batch.degrade ({preset})"
        )
        train_source = DegradeSource(load_samples(root, train_entries, size), preset=preset)
        val_source = DegradeSource(load_samples(root, held, size), preset=preset)
        log.info(
            "%d training and %d held-out images loaded in %.1fs",
            len(train_entries),
            len(held),
            time.perf_counter() - start,
        )

    protocol = {
        "seed": config.seed,
        "preset": preset,
        "working_size": size,
        "types": list(TYPE_CODES),
        "rng": "degrade.sample_rng(seed, image_id, type index)",
        "metrics": "fundus_batch.metrics psnr/ssim inside the FOV mask, uint8, data range 255",
    }
    if args.eval_only:
        model = build_cofenet(config.variant, config.width, residual=config.residual)
        load_weights(model, args.eval_only)
        report = evaluate(model, val_source.val_items(config.seed), device="cpu")
        log.info("evaluation of %s\n%s", args.eval_only, report.table())
        eval_doc = {"name": name, "protocol": protocol, "holdout": held, **report.to_dict()}
        (out / f"{name}.eval.json").write_text(json.dumps(eval_doc, indent=1), encoding="utf-8")
        return 0

    try:
        result = train(config, train_source, val_source)
    except TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    weights = out / f"{name}.pt"
    state = {
        k: v.half() if v.is_floating_point() else v for k, v in result.model.state_dict().items()
    }
    torch.save(state, weights)
    # Evaluate what ships (fp16-rounded weights, loaded like load_registered does).
    shipped = build_cofenet(config.variant, config.width, residual=config.residual)
    load_weights(shipped, weights).eval()
    report = evaluate(shipped, val_source.val_items(config.seed), step=result.step)
    log.info("shipped weights, held-out evaluation\n%s", report.table())
    entry = registry_entry(name, weights, config, size, training_data, report)
    (out / "registry.json").write_text(json.dumps({"weights": [entry]}, indent=2) + "\n")
    eval_doc = {
        "name": name,
        "protocol": protocol,
        "holdout": held,
        "train_config": config.to_dict(),
        "train_images": len(train_source),
        "steps": result.step,
        "train_seconds": round(result.seconds, 1),
        "seconds_per_step": round(result.seconds_per_step, 3),
        "wall_seconds": round(wall, 1),
        "history": result.history,
        "val_history": [
            {
                "step": r.step,
                "mean_psnr_gain": r.mean_psnr_gain,
                "psnr_gain": {t: m.psnr_gain for t, m in r.per_type.items()},
            }
            for r in result.val
        ],
        **report.to_dict(),
    }
    (out / f"{name}.eval.json").write_text(json.dumps(eval_doc, indent=1), encoding="utf-8")
    log.info(
        "done: %d steps, %.0fs wall, weights %s (sha256 %s)",
        result.step,
        wall,
        weights,
        entry["sha256"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
