"""Give trained Cofe-Net weights a spot head, trained on the photographs the weights trained on.

    python jobs/train_spot_head.py --weights fundus_batch/weights \\
        --data-root /work/shared/data --out runs/spots --threads 1

``--weights`` is a folder holding ``registry.json`` (its first entry is used) and that entry's
``<name>.eval.json`` written by ``jobs/train_cofenet.py``; the photographs listed there
(``train_image_ids`` and ``leave_alone_image_ids``) train the head and its ``holdout`` is
evaluated, as before. The rest of the network is not changed. Writes to ``--out``: ``<name>.pt``
(the weights plus the head, fp16), ``registry.json`` (the entry with ``spot_head``, the new file's
sha256 and the new held-out metrics), ``<name>.eval.json`` (the old document with the new
evaluation and a ``spot_head`` section: options, losses, seconds), ``<name>.spot-head.pt`` (the
head alone, fp32) and ``train_spot_head.log``. At 4,000 steps a run takes about an hour of one CPU
core; ``--head FILE`` packages a head trained before instead (no training).
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import fundus_batch  # noqa: F401  (installed)
except ImportError:  # running from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from train_cofenet import dataset_files, load_samples, report_metrics

from fundus_batch.io.storage import write_local_files
from fundus_batch.models import file_sha256
from fundus_batch.models.cofenet import SpotHead
from fundus_batch.models.weights import WeightsEntry, model_for_entry, save_torch
from fundus_batch.train import DegradeSource, evaluate
from fundus_batch.train.spots import PRESET, SpotPairs, spot_pairs, train_spot_head

log = logging.getLogger("train_spot_head")

SOURCES = ("hrf", "chase_db1", "eyepacs", "mx_dme")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="folder of registry.json")
    parser.add_argument("--data-root", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--channels", type=int, default=32, help="the head's width (default 32)")
    parser.add_argument("--steps", type=int, default=4000, help="training steps (default 4000)")
    parser.add_argument(
        "--focus", type=float, default=0.35, help="share of crops centred on spots (default 0.35)"
    )
    parser.add_argument("--per-photo", type=int, default=6, help="pairs per photograph (6)")
    parser.add_argument("--pair-seed", type=int, default=11, help="seed of the pairs (11)")
    parser.add_argument("--crop-seed", type=int, default=5, help="seed of the crops (5)")
    parser.add_argument("--init-seed", type=int, default=0, help="seed of the head's init (0)")
    parser.add_argument(
        "--deadzone", type=float, default=0.0, help="spot_deadzone of the entry written (0)"
    )
    parser.add_argument(
        "--head",
        type=Path,
        help="a head this job trained before (its <name>.spot-head.pt): package it, no training",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    for name in ("channels", "steps", "per_photo"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.focus <= 1.0:
        parser.error(f"--focus must be in [0, 1], got {args.focus}")
    if not 0.0 <= args.deadzone < 0.5:
        parser.error(f"--deadzone must be in [0, 0.5), got {args.deadzone}")
    return args


def new_head(channels: int, seed: int) -> SpotHead:
    """A fresh head, initialised from ``seed`` without touching the caller's torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SpotHead(channels)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [
        logging.StreamHandler(sys.stdout),
        logging.FileHandler(args.out / "train_spot_head.log"),
    ]
    formatter = logging.Formatter("%(asctime)s %(message)s")
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return run(args)
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()


def run(args: argparse.Namespace) -> int:
    """Train, save, evaluate and register (see the module docstring)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    registry = args.weights / "registry.json"
    entry = WeightsEntry.from_dict(json.loads(registry.read_text())["weights"][0], registry)
    if entry.field_size is None:
        print(
            f"error: {entry.name} has no field head to put a spot head in front of", file=sys.stderr
        )
        return 2
    document = json.loads((args.weights / f"{entry.name}.eval.json").read_text())
    trained = set(document["train_image_ids"]) | set(document.get("leave_alone_image_ids", []))
    sources = [s for s in SOURCES if any(i.startswith(f"{s}/") for i in trained)]
    entries = [
        e for s in sources for e in dataset_files(args.data_root, s) if e["image_id"] in trained
    ]
    if len(entries) != len(trained):
        print(
            f"error: found {len(entries)} of the {len(trained)} training photographs",
            file=sys.stderr,
        )
        return 2
    size = entry.size
    head = new_head(args.channels, args.init_seed)
    began = time.perf_counter()
    pairs: SpotPairs | None = None
    if args.head is not None:  # trained before: package it (no pairs to build)
        head.load_state_dict(torch.load(args.head, map_location="cpu", weights_only=True))
        head.eval()
        losses: list[float] = []
    else:
        samples = load_samples(args.data_root, entries, size)
        pairs = spot_pairs(samples, args.pair_seed, args.per_photo)
        log.info(
            "%d photographs, %d pairs in %.0fs",
            len(samples),
            len(pairs),
            time.perf_counter() - began,
        )
        began = time.perf_counter()
        losses = train_spot_head(
            head,
            pairs,
            steps=args.steps,
            focus=args.focus,
            seed=args.crop_seed,
            log=lambda step, loss: log.info("step %d loss %.5f", step, loss),
        )
        save_torch(args.out / f"{entry.name}.spot-head.pt", head.state_dict())
    seconds = time.perf_counter() - began

    model = model_for_entry(entry)
    state = {**model.state_dict(), **{f"spot.{k}": v for k, v in head.state_dict().items()}}
    weights = args.out / f"{entry.name}.pt"
    save_torch(weights, {k: v.half() if v.is_floating_point() else v for k, v in state.items()})
    new_entry: dict[str, Any] = {
        **entry.to_dict(),
        "file": weights.name,
        "sha256": file_sha256(weights),
        "spot_head": args.channels,
        "spot_deadzone": args.deadzone,
        "metrics": {},
    }
    # Evaluate what ships: the fp16 file, loaded as the registry entry loads it.
    shipped = model_for_entry(WeightsEntry.from_dict(new_entry, args.out / "registry.json"))
    held = load_samples(args.data_root, list(document["holdout"]), size)
    seed = int(document["protocol"]["seed"])
    preset = str(document["protocol"]["preset"])
    report = evaluate(shipped, DegradeSource(held, preset=preset).val_items(seed))
    log.info("held-out evaluation with the spot head\n%s", report.table())
    new_entry["metrics"] = report_metrics(report)
    registry = json.dumps({"weights": [new_entry]}, indent=2) + "\n"
    skip = ("weights", "data_root", "out", "head")
    options = {k: v for k, v in vars(args).items() if k not in skip}
    document.update(report.to_dict())
    document["spot_head"] = {
        "from": str(args.weights),
        "from_sha256": entry.sha256,
        **options,
        "preset": PRESET,
        "train_photographs": len(entries),
        "pairs": None if pairs is None else len(pairs),
        "head_from": None if args.head is None else str(args.head),
        "train_seconds": round(seconds, 1),
        "loss_every_100": [round(v, 5) for v in losses[::100]],
    }
    write_local_files(
        [
            (args.out / "registry.json", registry.encode()),
            (args.out / f"{entry.name}.eval.json", json.dumps(document, indent=1).encode()),
        ]
    )
    log.info("done: %s (sha256 %s), %.0fs training", weights, new_entry["sha256"], seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
