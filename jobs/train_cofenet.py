"""Train a small Cofe-Net on real clean photographs degraded on the fly, and package it.

Reproduces the shipped ``fundus-cofenet-small`` model (v3: 1,500 steps from v2, about 40
minutes of one free CPU core; ``jobs/configs/train_small.yaml`` reproduces v2 from v1):

    python jobs/train_cofenet.py --config jobs/configs/train_gated_warm.yaml \\
        --data-root /work/shared/data --name fundus-cofenet-small --threads 1 --out runs/v3

Training images are HRF ``training/`` (vessels = AV label > 0, FOV masks given) and CHASE_DB1
(first observer's vessels, FOV detected), optionally the EyePACS sample (no vessel ground truth),
each cropped to the working size with fov.preprocess. The images listed under ``holdout`` are
never trained on; each is degraded once with each of the seven types for validation.

Writes to ``--out``: ``checkpoint.pt`` (resumable with ``--resume``), ``<name>.pt`` (the state
dict, fp16), ``registry.json`` (an entry usable via ``FUNDUS_BATCH_WEIGHTS=<out>``),
``<name>.eval.json`` (protocol, held-out ids, per-type and per-image metrics) and ``train.log``.
``--eval-only WEIGHTS`` re-evaluates a state dict on the held-out set and writes only the eval
JSON. A pairs dataset written by the pipeline can be used instead with ``--pairs ROOT`` (its
``train`` and ``val`` splits; rows that failed the run's quality gate are left out unless
``--include-quality-failed``; the registry records the pairs' working size). A run into an
``--out`` that holds a checkpoint is refused unless ``--resume``; ``--stop-at`` ends a call early
and a later call with ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

# Sleeping rather than spinning OpenMP workers: on a shared CPU a spinning torch thread that
# loses its core stalls every parallel region.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import fundus_batch  # noqa: F401  (installed)
except ImportError:  # running from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict

from fundus_batch.degrade import TYPE_CODES
from fundus_batch.degrade.presets import known_preset
from fundus_batch.io.codecs import decode_image, encode_jpeg, encode_png
from fundus_batch.io.storage import write_local_files
from fundus_batch.metrics.noref import NOREF_METRICS, noref_metrics
from fundus_batch.models import build_cofenet, load_weights
from fundus_batch.models.weights import save_torch
from fundus_batch.train import (
    INITS,
    LOSS_SCALES,
    CleanSample,
    DegradeSource,
    PairsSource,
    TrainConfig,
    TrainError,
    ValReport,
    check_checkpoint_target,
    evaluate,
    load_clean_sample,
    registry_entry,
    train,
)
from fundus_batch.validation import FieldProblem, Finite, Int, format_problems, length, validate

log = logging.getLogger("train_cofenet")

Dataset = Literal["hrf", "chase_db1", "eyepacs_sample", "eyepacs", "mx_dme"]
DATASETS: tuple[str, ...] = get_args(Dataset)
DEFAULT_DATASETS: tuple[Dataset, ...] = ("hrf", "chase_db1")
DEFAULT_HOLDOUT: dict[Dataset, list[str]] = {
    "hrf": ["07_dr", "08_g", "08_h", "08_dr"],
    "chase_db1": ["Image_13L", "Image_13R", "Image_14L", "Image_14R"],
}
TRAINING_DATA = {
    "hrf": "HRF (Budai et al. 2013)",
    "chase_db1": "CHASE_DB1 (Kingston University)",
    "eyepacs_sample": "Kaggle EyePACS sample",
    "eyepacs": "Kaggle EyePACS (sample and 25 test-set photographs)",
    "mx_dme": "MX_EyeFundus_DME (Hughes Cano et al.)",
}
PACK_INDEX = "pack.json"
PACK_JPEG_QUALITY = 98
# A clean training target must look like a usable photograph (fundus_batch.metrics.noref on the
# preprocessed image); photographs outside these bounds are neither trained on nor scored.
DEFAULT_QUALITY = {
    "nr_luminance": [45.0, 170.0],
    "nr_uniformity": [0.0, 0.35],
    "nr_underexposed": [0.0, 0.02],
    "nr_overexposed": [0.0, 0.01],
    "nr_blur_effect": [0.0, 0.42],
}


def dataset_files(root: Path, dataset: str) -> list[dict[str, Any]]:
    """Every image of ``dataset`` under ``root`` with its vessel/mask files (relative paths).

    ``root`` may be a pack (:func:`pack_samples`): its entries also carry ``noref``.
    """
    pack = _pack_index(root)
    if pack is not None:
        found = [e for e in pack["images"] if e["dataset"] == dataset]
        if not found:
            raise FileNotFoundError(f"the pack {root} holds no {dataset} images")
        return found
    if dataset == "hrf":
        base = root / "hrf" / "training"
        images = sorted(p for p in (base / "images").iterdir() if p.suffix.lower() == ".jpg")
        out: list[dict[str, Any]] = []
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
    elif dataset in ("eyepacs_sample", "eyepacs"):
        folders = ["eyepacs_sample"] + (["eyepacs_more"] if dataset == "eyepacs" else [])
        images = sorted(p for f in folders for p in (root / f).glob("*.jpeg"))
        out = [{"image_id": f"eyepacs/{p.stem}", "image": str(p.relative_to(root))} for p in images]
    elif dataset == "mx_dme":
        images = sorted(p for p in (root / "mx_dme").rglob("*") if p.suffix.lower() == ".jpg")
        out = [{"image_id": f"mx_dme/{p.stem}", "image": str(p.relative_to(root))} for p in images]
    else:
        raise ValueError(f"unknown dataset {dataset!r}; known: {DATASETS}")
    if not out:
        raise FileNotFoundError(f"no {dataset} images under {root}")
    for entry in out:
        for key in ("image", "vessels", "mask"):
            if key in entry and not (root / entry[key]).is_file():
                raise FileNotFoundError(f"{dataset}: missing {root / entry[key]}")
    return out


def quality_failures(
    sample: CleanSample, bounds: dict[str, list[float]], values: dict[str, float] | None = None
) -> list[str]:
    """The no-reference measures of ``sample`` that fall outside ``bounds`` (name: [lo, hi]).

    ``values``: the measures already taken (a pack's, on the exact working image).
    """
    if values is None:
        values = noref_metrics(sample.image, sample.mask)
    return [f"{k}={values[k]:.4g}" for k, (lo, hi) in bounds.items() if not lo <= values[k] <= hi]


def _pack_index(root: Path) -> dict[str, Any] | None:
    path = root / PACK_INDEX
    if not path.is_file():
        return None
    index: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return index


def pack_samples(root: Path, datasets: list[str], size: int, dest: Path) -> int:
    """Write the working images of ``datasets`` as a pack that ``--data-root`` can read.

    A pack carries a training run to a machine without the archive (a lent GPU: 64 MiB with the
    repository). Each photograph is stored as it is trained on, after fov.preprocess: a JPEG of
    quality 98 with 4:4:4 chroma (about 1 grey level RMS off the working image; lossless would
    be twice the size), its FOV mask and vessels as PNG, and its no-reference measures taken on
    the exact working image, so a pack selects the same clean targets as the archive does.
    """
    dest.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    for dataset in datasets:
        for e in dataset_files(root, dataset):
            sample = load_samples(root, [e], size)[0]
            stem = e["image_id"].replace("/", "__")
            entry: dict[str, Any] = {
                "dataset": dataset,
                "image_id": e["image_id"],
                "image": f"{stem}.jpg",
                "mask": f"{stem}.mask.png",
                "noref": noref_metrics(sample.image, sample.mask),
            }
            jpeg = encode_jpeg(sample.image, PACK_JPEG_QUALITY, full_chroma=True)
            (dest / entry["image"]).write_bytes(jpeg)
            (dest / entry["mask"]).write_bytes(encode_png(sample.mask))
            if sample.vessels is not None:
                entry["vessels"] = f"{stem}.vessels.png"
                (dest / entry["vessels"]).write_bytes(encode_png(sample.vessels))
            images.append(entry)
    index = {"working_size": size, "jpeg_quality": PACK_JPEG_QUALITY, "images": images}
    (dest / PACK_INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
    return len(images)


def _packed_sample(root: Path, e: dict[str, Any], size: int) -> CleanSample:
    def read(name: str) -> np.ndarray:
        return decode_image((root / name).read_bytes())

    mask = read(e["mask"])[..., 0]
    if mask.shape != (size, size):
        raise ValueError(f"pack {root} holds {mask.shape[0]} px images, not {size}")
    image = np.where(mask[..., None] > 127, read(e["image"]), 0).astype(np.uint8)
    vessels = read(e["vessels"])[..., 0] if "vessels" in e else None
    return CleanSample(e["image_id"], image, mask, vessels)


def load_samples(
    root: Path,
    entries: list[dict[str, Any]],
    size: int,
    quality: dict[str, list[float]] | None = None,
    rejected: list[CleanSample] | None = None,
) -> list[CleanSample]:
    """Load and preprocess the listed images (see fundus_batch.train.load_clean_sample).

    With ``quality``, photographs whose measures fall outside the bounds are left out (logged)
    or, given a ``rejected`` list, appended to it.
    """
    samples = []
    for e in entries:
        if "noref" in e:  # from a pack
            sample = _packed_sample(root, e, size)
        else:
            sample = load_clean_sample(
                e["image_id"],
                root / e["image"],
                size,
                vessels_path=root / e["vessels"] if "vessels" in e else None,
                mask_path=root / e["mask"] if "mask" in e else None,
            )
        bad = quality_failures(sample, quality, e.get("noref")) if quality else []
        if bad:
            log.info("not a clean target: %s (%s)", e["image_id"], ", ".join(bad))
            if rejected is not None:
                rejected.append(sample)
            continue
        samples.append(sample)
    return samples


def evenly(items: list[Any], count: int) -> list[Any]:
    """``count`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if count <= 0 or len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def _name(entry: dict[str, Any]) -> str:
    """The photograph's name within its dataset (``image_id`` is ``dataset/name``)."""
    return str(entry["image_id"]).split("/", 1)[1]


def split_entries(
    root: Path, datasets: list[str], holdout: dict[str, list[str]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training entries, held-out entries); every held-out name must exist."""
    train_entries: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    for dataset in datasets:
        entries = dataset_files(root, dataset)
        known = {_name(e) for e in entries}
        names = set(holdout.get(dataset, []))
        if names == {"*"}:
            names = known
        if names - known:
            raise ValueError(f"{dataset}: held-out images not found: {sorted(names - known)}")
        for e in entries:
            (held if _name(e) in names else train_entries).append(e)
    return train_entries, held


def inference_model(config: TrainConfig) -> Any:
    """An untrained model of the configured architecture, as it will ship."""
    return build_cofenet(
        config.variant,
        config.width,
        residual=config.residual,
        field=config.field_size,
        field_deadzone=config.field_deadzone,
        field_gate=config.field_gate,
        field_gate_threshold=config.field_gate_threshold,
    )


class JobConfigError(ValueError):
    """A job config that cannot run; the message names the file and the field."""


def _ordered(bounds: list[float]) -> list[float]:
    if bounds[0] > bounds[1]:
        raise ValueError("low > high")
    return bounds


def _known_measure(name: str) -> str:
    if name not in NOREF_METRICS:
        raise ValueError(f"unknown measure; known: {sorted(NOREF_METRICS)}")
    return name


Bounds = Annotated[list[Finite], length(2, "[low, high]"), AfterValidator(_ordered)]
QualityMeasure = Annotated[str, AfterValidator(_known_measure)]


class DataSection(BaseModel):
    """Which datasets are trained on, and the images of each held out for validation."""

    model_config = ConfigDict(extra="forbid")

    datasets: Annotated[list[Dataset], Field(min_length=1)] = Field(
        default_factory=lambda: list(DEFAULT_DATASETS)
    )
    holdout: dict[Dataset, list[Annotated[str, Strict()]]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_HOLDOUT.items()}
    )


class JobConfig(BaseModel):
    """The YAML job config: ``train`` holds TrainConfig fields (checked by :func:`load_job`)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Strict(), Field(min_length=1)] = "fundus-cofenet-small"
    preset: Annotated[str, AfterValidator(known_preset)] = "cofe-release"
    working_size: Annotated[Int, Field(ge=64, le=4096)] = 512
    train: dict[str, Any] = Field(default_factory=dict)
    data: DataSection = Field(default_factory=DataSection)
    quality: dict[QualityMeasure, Bounds] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_QUALITY.items()}
    )
    keep_colour: bool = False
    clean_jitter: Annotated[Finite, Field(ge=0.0, le=1.0)] = 0.0
    leave_alone: bool = Field(
        default=False,
        description="photographs outside the quality bounds still train, as ones to leave alone"
        " (types without an illumination defect only; DegradeSource)",
    )


def load_job(path: str | None) -> JobConfig:
    """The validated YAML job config (defaults when ``path`` is None); JobConfigError if bad."""
    if path is None:
        return JobConfig()
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise JobConfigError(f"{path} is not valid YAML: {exc}") from None

    def error(problems: list[FieldProblem]) -> JobConfigError:
        return JobConfigError(f"invalid job config {path}: {format_problems(problems)}")

    job = validate(JobConfig, data, error)
    try:  # the train section as it stands; CLI overrides are checked again in main
        TrainConfig.from_dict(job.train)
    except TrainError as exc:
        problems = exc.problems or [FieldProblem("", str(exc))]
        raise error([p._replace(field=f"train.{p.field}".rstrip(".")) for p in problems]) from None
    return job


def read_config(path: str | None) -> dict[str, Any]:
    """The YAML job config as a dict of the keys it sets, validated (see :class:`JobConfig`)."""
    return load_job(path).model_dump(exclude_unset=True)


def report_metrics(report: ValReport) -> dict[str, float]:
    """A registry entry's ``metrics``: the held-out evaluation's gain, PSNR and SSIM per type."""
    metrics: dict[str, float] = {"val_psnr_gain_mean": round(report.mean_psnr_gain, 3)}
    for t, m in report.per_type.items():
        metrics[f"val_psnr_gain_{t}"] = round(m.psnr_gain, 3)
        metrics[f"val_psnr_enhanced_{t}"] = round(m.psnr_enhanced, 3)
        metrics[f"val_ssim_enhanced_{t}"] = round(m.ssim_enhanced, 4)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML job config (jobs/configs/train_small.yaml)")
    parser.add_argument("--data-root", default="/work/shared/data", help="folder of datasets")
    parser.add_argument("--pairs", help="train on a pipeline pairs dataset instead (its root)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--name", help="weights name (default fundus-cofenet-small)")
    parser.add_argument("--datasets", help="comma-separated subset of " + ",".join(DATASETS))
    parser.add_argument(
        "--holdout-source",
        help="leave-one-source-out: hold out this whole dataset (one of --datasets)",
    )
    parser.add_argument(
        "--eval-count", type=int, default=8, help="held-out photographs scored (spread evenly)"
    )
    parser.add_argument("--working-size", type=int, help="preprocess size (default 512)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--width", type=float)
    parser.add_argument("--size", type=int, help="training crop side")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--head-lr-scale", type=float, help="learning-rate factor of G's output")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--init", choices=INITS)
    parser.add_argument(
        "--init-weights",
        help="state dict to start from (relative paths: to the repository; '' for none)",
    )
    parser.add_argument(
        "--init-head",
        choices=("zero", "keep"),
        help="G's output conv from --init-weights: zeroed (default) or kept (train further)",
    )
    parser.add_argument("--loss-scale", choices=LOSS_SCALES)
    parser.add_argument(
        "--trainable", help="comma-separated parameter-name prefixes that train (default: all)"
    )
    parser.add_argument("--val-every", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument(
        "--stop-at",
        type=int,
        help="end this call after that step (same schedule); continue in a later call with "
        "--resume",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt (without it, an OUT that has one is refused)",
    )
    parser.add_argument(
        "--include-quality-failed",
        action="store_true",
        help="with --pairs: also train on rows that failed the run's --min-quality gate",
    )
    parser.add_argument(
        "--pack",
        action="store_true",
        help="only write the datasets' working images to OUT as a pack (a --data-root elsewhere)",
    )
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
        job = load_job(args.config)
        name = args.name or job.name
        preset = job.preset
        size = args.working_size or job.working_size
        datasets: list[str] = args.datasets.split(",") if args.datasets else list(job.data.datasets)
        holdout: dict[str, list[str]] = {str(k): v for k, v in job.data.holdout.items()}
        quality: dict[str, list[float]] = dict(job.quality)
        if args.holdout_source:
            if args.holdout_source not in datasets:
                raise ValueError(f"--holdout-source {args.holdout_source} is not in {datasets}")
            holdout = {args.holdout_source: ["*"]}
        values = dict(job.train)
        overrides = {
            "steps": args.steps,
            "width": args.width,
            "size": args.size,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "head_lr_scale": args.head_lr_scale,
            "seed": args.seed,
            "init": args.init,
            "init_weights": args.init_weights,
            "init_head": args.init_head,
            "loss_scale": args.loss_scale,
            "val_every": args.val_every,
            "num_threads": args.threads,
            "device": args.device,
            "stop_at": args.stop_at,
            "trainable": tuple(args.trainable.split(",")) if args.trainable else None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if args.init_weights == "":  # a cold start
            values["init_weights"] = None
        if values.get("init_weights"):  # relative to the repository
            values["init_weights"] = str(
                Path(__file__).resolve().parents[1] / values["init_weights"]
            )
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
    if args.pack:
        count = pack_samples(root, datasets, size, out)
        log.info("packed %d photographs of %s into %s", count, ", ".join(datasets), out)
        return 0
    if not args.eval_only:
        try:  # before any data is read
            check_checkpoint_target(config)
        except TrainError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.pairs:
        try:
            train_source: Any = PairsSource(
                args.pairs, split="train", include_quality_failed=args.include_quality_failed
            )
            val_source: Any = PairsSource(
                args.pairs, split="val", include_quality_failed=args.include_quality_failed
            )
        except (TrainError, OSError) as exc:
            print(f"error: --pairs {args.pairs}: {exc}", file=sys.stderr)
            return 2
        for role, source in (("training", train_source), ("held-out", val_source)):
            if source.quality_left_out:
                log.info(
                    "%s: left out %d rows that failed the quality gate "
                    "(--include-quality-failed uses them)",
                    role,
                    source.quality_left_out,
                )
        size = train_source.working_size  # what the pairs were made at, whatever --working-size
        held: list[dict[str, Any]] = []
        training_data = f"fundus_batch pairs dataset {args.pairs} (split train)"
    else:
        train_entries, held = split_entries(root, datasets, holdout)
        log.info("held out: %s", ", ".join(e["image_id"] for e in held))
        training_data = (
            ", ".join(TRAINING_DATA[d] for d in datasets if d != args.holdout_source)
            + f"; degradations synthesised on the fly by fundus_batch.degrade ({preset})"
        )
        leave_alone: list[CleanSample] = []
        train_source = DegradeSource(
            load_samples(root, train_entries, size, quality, leave_alone),
            preset=preset,
            keep_colour=job.keep_colour,
            clean_jitter=job.clean_jitter,
            leave_alone=leave_alone if job.leave_alone else (),
        )
        if job.leave_alone:
            log.info("%d photographs to leave alone", len(leave_alone))
        held_samples = evenly(load_samples(root, held, size, quality), args.eval_count)
        held = [e for e in held if e["image_id"] in {s.image_id for s in held_samples}]
        val_source = DegradeSource(held_samples, preset=preset)
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
        model = inference_model(config)
        load_weights(model, args.eval_only)
        report = evaluate(model, val_source.val_items(config.seed), device="cpu")
        log.info("evaluation of %s\n%s", args.eval_only, report.table())
        eval_doc = {"name": name, "protocol": protocol, "holdout": held, **report.to_dict()}
        write_local_files([(out / f"{name}.eval.json", json.dumps(eval_doc, indent=1).encode())])
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
    save_torch(weights, state)
    # Evaluate what ships (fp16-rounded weights, loaded like load_registered does).
    shipped = inference_model(config)
    load_weights(shipped, weights).eval()
    report = evaluate(shipped, val_source.val_items(config.seed), step=result.step)
    log.info("shipped weights, held-out evaluation\n%s", report.table())
    entry = registry_entry(
        name,
        weights,
        config,
        size=size,
        training_data=training_data,
        metrics=report_metrics(report),
        notes="see MODEL_CARD.md",
    )
    registry = json.dumps({"weights": [entry]}, indent=2) + "\n"
    eval_doc = {
        "name": name,
        "protocol": protocol,
        "holdout": held,
        "train_config": config.to_dict(),
        "train_images": len(train_source),
        "train_image_ids": [train_source.image_id(i) for i in range(len(train_source))],
        "leave_alone_image_ids": [s.image_id for s in getattr(train_source, "leave_alone", [])],
        "quality": quality,
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
    # The registry and its evaluation record go in together, each whole.
    write_local_files(
        [
            (out / "registry.json", registry.encode()),
            (out / f"{name}.eval.json", json.dumps(eval_doc, indent=1).encode()),
        ]
    )
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
