"""Train Cofe-Net generators on (clean, degraded) pairs: a plain library, no Ray.

``train(config, train_source, val_source)`` runs Adam on the released loss (reference
cofe-net-architecture.md section 5.1):

    L = L1_R(out_512, clean) + L1_R(out_256, clean_256)                  FOV-masked, both scales
      + lambda_disc * (L1_D(out_512, clean) + L1_D(out_256, clean_256))  optic-disc box, if given
      + lambda_vessel * BCE_R(vessel, vessel_gt)                          if vessel GT exists
      + lambda_lqa * BCE(sigmoid(attention), pooled spot mask)           optional, off by default
      + lambda_gate * BCE(gate logits, pair has an illumination defect)  field_gate models
      + lambda_overshoot * (10 / ln 10) * OS / MSE                        optional, off by default

where ``L1_R(a, b) = mean(|a - b| * R)`` over all elements, as in the released training code.
A ``field_gate`` model is trained with its gate teacher-forced to that label, so the correction
learns only from pairs that need one, and the gate learns separately, by the BCE term, to tell
them apart. ``OS`` is the FOV mean of max(|out - clean| - |degraded - clean|, 0)^2, the error
an enhancer adds beyond what the degraded input had (over-shoot), and ``MSE`` the pair's own
FOV mean squared error, held constant: per pair, the first-order cost in dB of counting the
over-shoot ``1 + lambda_overshoot`` times in the error.

Pairs come from a :class:`DegradeSource` (clean images degraded on the fly with the
fundus_batch.degrade engine, a fresh draw per (seed, image id, sample index)) or a
:class:`PairsSource` (the Parquet + image files the pipeline writes). Everything random is drawn
from generators seeded by the config seed and the global step, so a run is reproducible and a
resumed run continues exactly where the checkpoint stopped. Checkpoints hold only tensors and
plain containers and load with ``torch.load(weights_only=True)``.

Validation degrades each held-out image with each of the seven types (or uses the stored
pairs), enhances it and reports FOV-masked PSNR/SSIM of degraded-vs-clean and
enhanced-vs-clean per type.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, get_args, overload

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import AfterValidator, ConfigDict, Field, ValidationInfo, field_validator
from torch import Tensor

from fundus_batch.degrade import TYPE_CODES, DegradationRecord, degrade, sample_rng
from fundus_batch.degrade.ops import color_jitter
from fundus_batch.degrade.params import type_groups
from fundus_batch.degrade.presets import get_preset
from fundus_batch.metrics import psnr, ssim
from fundus_batch.models.cofenet import CofeNet, ResBlock, build_cofenet, check_size
from fundus_batch.validation import FieldProblem, Finite, Int, Model, format_problems, length

__all__ = [
    "CHECKPOINT_FORMAT",
    "INITS",
    "LOSS_SCALES",
    "Batch",
    "CleanSample",
    "DegradeSource",
    "PairsSource",
    "TrainConfig",
    "TrainError",
    "TrainItem",
    "TrainResult",
    "TrainSource",
    "TypeMetrics",
    "ValItem",
    "ValReport",
    "cofenet_loss",
    "enhance_images",
    "evaluate",
    "fixup_init",
    "load_checkpoint",
    "load_clean_sample",
    "make_batch",
    "spot_mask",
    "train",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fundus-batch-train-1"
Init = Literal["released", "fixup"]
LossScale = Literal["none", "degraded", "log"]
PixelLoss = Literal["l1", "mse"]
INITS: tuple[str, ...] = get_args(Init)
LOSS_SCALES: tuple[str, ...] = get_args(LossScale)
PIXEL_LOSSES: tuple[str, ...] = get_args(PixelLoss)
_BCE_EPS = 1e-6


class TrainError(ValueError):
    """Bad training input: an invalid config, sample, dataset or checkpoint.

    ``problems`` lists the bad fields of an invalid config (empty otherwise).
    """

    def __init__(self, message: str, problems: Sequence[FieldProblem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


def _crop_size(size: int) -> int:
    if size % 32 or size < 192:
        raise ValueError("must be a multiple of 32 and >= 192")
    return size


_Positive = Annotated[Int, Field(ge=1)]
_NonNegative = Annotated[Int, Field(ge=0)]
_Weight = Annotated[Finite, Field(ge=0.0)]
_Beta = Annotated[Finite, Field(ge=0.0, lt=1.0)]


# ---------------------------------------------------------------------------------- config


class TrainConfig(Model):
    """Everything that decides a training run.

    ``size`` is the side of the square training crop (a multiple of 32, >= 192); samples larger
    than that are cropped at random, so a model trained on 256 crops of 512 images sees 512-scale
    detail. ``steps`` counts optimiser steps; ``epochs`` (passes over the training source), when
    given, overrides it. The learning rate is constant, then decays linearly to zero from
    ``decay_start`` (a fraction of the steps). ``stop_at`` ends this call after that global step
    without changing the schedule (a run split across sessions). ``val_every`` and
    ``checkpoint_every`` are in steps (0: only at the end; ``val_at_end=False`` skips the final
    validation). ``device="auto"`` picks CUDA when
    available; ``amp=None`` means bf16 autocast on CUDA and none on CPU. ``num_threads`` sets
    torch's CPU threads (None: leave them). ``init`` is ``released`` (every conv N(0, 0.02), as
    the released ``define_G``) or ``fixup`` (He-normal convs, with the second conv of every
    residual block, the output convs of G and the LQA head zeroed, so a ``residual`` model
    starts as the identity while its inner layers carry signal). ``loss_scale="degraded"``
    divides each pair's image terms (L1 at both scales, disc) by that pair's degraded-input
    FOV L1 plus ``loss_scale_eps``, so a pair counts by the fraction of its error left rather
    than by its size (closer to a per-pair PSNR gain); ``log`` takes ``10 log10`` of each pair's
    term plus ``loss_scale_eps`` (with ``pixel_loss="mse"`` that is the pair's PSNR up to a
    constant, so a harmed good photograph costs as many dB as a mended bad one gains);
    ``none`` is the reference loss.
    ``field_size`` selects Cofe-Net's smooth-correction head at that network resolution
    (``fundus_batch.models.cofenet``); train such a model on whole images (``size`` = the
    working size). ``pixel_loss`` is ``l1`` (the reference) or ``mse`` (what PSNR measures).
    ``init_weights`` names a state dict of the same architecture to start from (after ``init``);
    for a ``field_size`` model the output conv of G is zeroed again, since its output means a
    correction there, and a ``field_gate`` model may start from weights without a gate (it
    starts undecided). ``head_lr_scale`` multiplies the learning rate of that output conv.
    ``field_gate`` adds the smooth-correction head's global gate, trained as the module
    docstring says with weight ``lambda_gate``; ``lambda_overshoot`` weighs the over-shoot term.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    variant: str = "cofe-net"
    width: Annotated[Finite, Field(gt=0.0, le=1.0)] = 0.25
    residual: bool = True
    field_size: Annotated[Int, Field(ge=1)] | None = None
    field_gate: bool = False
    size: Annotated[Int, AfterValidator(_crop_size)] = 256
    batch_size: _Positive = 4
    steps: _Positive = 1000
    epochs: Annotated[Finite, Field(gt=0.0)] | None = None
    lr: Annotated[Finite, Field(gt=0.0)] = 1e-4
    betas: Annotated[tuple[_Beta, _Beta], length(2, "[beta1, beta2]")] = (0.5, 0.999)
    decay_start: Annotated[Finite, Field(ge=0.0, le=1.0)] = 1.0
    seed: _NonNegative = 0
    flip: bool = True
    val_every: _NonNegative = 0
    val_at_end: bool = True
    val_batch_size: _Positive = 4
    log_every: _Positive = 10
    checkpoint: str | None = None
    checkpoint_every: _NonNegative = 0
    resume: bool = False
    stop_at: _Positive | None = None
    device: str = "auto"
    amp: bool | None = None
    num_threads: _Positive | None = None
    lambda_l1: _Weight = 1.0
    lambda_l1_256: _Weight = 1.0
    lambda_disc: _Weight = 10.0
    lambda_vessel: _Weight = 0.1
    lambda_lqa: _Weight = 0.0
    lambda_gate: _Weight = 1.0
    lambda_overshoot: _Weight = 0.0
    init: Init = "released"
    loss_scale: LossScale = "none"
    loss_scale_eps: Annotated[Finite, Field(gt=0.0)] = 0.01
    pixel_loss: PixelLoss = "l1"
    init_weights: str | None = None
    head_lr_scale: Annotated[Finite, Field(gt=0.0)] = 1.0

    @field_validator("field_gate")
    @classmethod
    def _gate_needs_the_field_head(cls, gate: bool, info: ValidationInfo) -> bool:
        if gate and info.data.get("field_size") is None:
            raise ValueError("needs field_size (the gate belongs to the smooth-correction head)")
        return gate

    @field_validator("resume")
    @classmethod
    def _resume_needs_a_checkpoint(cls, resume: bool, info: ValidationInfo) -> bool:
        if resume and not info.data.get("checkpoint"):
            raise ValueError("needs a checkpoint path")
        return resume

    @classmethod
    def error(cls, problems: list[FieldProblem]) -> TrainError:
        """A TrainError listing every bad field."""
        return TrainError("invalid TrainConfig: " + format_problems(problems), problems)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (betas as a list)."""
        data = self.model_dump()
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys and bad values raise TrainError naming the field."""
        return cls.parse(data)


# -------------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class CleanSample:
    """One clean working image for on-the-fly degradation.

    ``image`` HxWx3 uint8 (square), ``mask`` HxW uint8 0/255 (FOV), optional ``vessels`` HxW
    (uint8 0..255 or float 0..1: vessel probability) and ``disc_box`` (x0, y0, x1, y1) in
    working pixels, end exclusive.
    """

    image_id: str
    image: np.ndarray
    mask: np.ndarray
    vessels: np.ndarray | None = None
    disc_box: tuple[int, int, int, int] | None = None


@dataclass
class TrainItem:
    """One training pair at the source's working size (before cropping)."""

    image_id: str
    type_code: str
    clean: np.ndarray
    degraded: np.ndarray
    mask: np.ndarray
    vessels: np.ndarray | None = None  # float32 HxW in [0, 1]
    disc: np.ndarray | None = None  # bool HxW
    spots: np.ndarray | None = None  # float32 HxW in [0, 1]


@dataclass
class ValItem:
    """One held-out (clean, degraded) pair."""

    image_id: str
    type_code: str
    clean: np.ndarray
    degraded: np.ndarray
    mask: np.ndarray


class TrainSource(Protocol):
    """What ``train`` needs from a dataset."""

    def __len__(self) -> int: ...

    def image_id(self, index: int) -> str: ...

    def train_item(self, index: int, rng: np.random.Generator) -> TrainItem: ...

    def val_items(self, seed: int) -> list[ValItem]: ...


def _check_sample(sample: CleanSample) -> None:
    img, mask = sample.image, sample.mask
    where = f"sample {sample.image_id!r}"
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3:
        raise TrainError(f"{where}: image must be an HxWx3 uint8 array")
    if img.shape[2] != 3 or img.shape[0] != img.shape[1]:
        raise TrainError(f"{where}: image must be square RGB, got shape {img.shape}")
    if not isinstance(mask, np.ndarray) or mask.shape != img.shape[:2] or mask.dtype != np.uint8:
        raise TrainError(f"{where}: mask must be an HxW uint8 array matching the image")
    if not (mask > 127).any():
        raise TrainError(f"{where}: the FOV mask is empty")
    if sample.vessels is not None:
        v = sample.vessels
        if not isinstance(v, np.ndarray) or v.shape != img.shape[:2]:
            raise TrainError(f"{where}: vessels must be an HxW array matching the image")
    if sample.disc_box is not None:
        box = sample.disc_box
        if (
            len(box) != 4
            or not (0 <= box[0] < box[2] <= img.shape[1])
            or not (0 <= box[1] < box[3] <= img.shape[0])
        ):
            raise TrainError(f"{where}: disc_box must be (x0, y0, x1, y1) inside the image")


def _aux_map(path: str | os.PathLike[str], shape: tuple[int, int]) -> np.ndarray:
    """A label map as uint8 0/255 (label > 0), resized (INTER_AREA) to ``shape`` (h, w)."""
    from fundus_batch.io.codecs import decode_image

    grey = decode_image(Path(path).read_bytes()).max(axis=2)
    binary: np.ndarray = np.where(grey > 0, 255, 0).astype(np.uint8)
    if binary.shape != shape:
        binary = cv2.resize(binary, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return binary


def load_clean_sample(
    image_id: str,
    image_path: str | os.PathLike[str],
    size: int = 512,
    *,
    vessels_path: str | os.PathLike[str] | None = None,
    mask_path: str | os.PathLike[str] | None = None,
) -> CleanSample:
    """Read a clean photograph and crop it to the ``size`` working image with fov.preprocess.

    ``vessels_path`` and ``mask_path`` are label images of the photograph's size (any pixel
    value > 0 is vessel / FOV); they get the same crop. A given FOV mask is intersected with
    the detected one. Vessel probabilities follow the released loader: >= 0.6 -> 1, < 0.4 -> 0.
    """
    from fundus_batch.fov import crop_to_fov, preprocess
    from fundus_batch.io.codecs import decode_image

    rgb = decode_image(Path(image_path).read_bytes(), min_side=size)
    pre = preprocess(rgb, size)

    def cropped(path: str | os.PathLike[str]) -> np.ndarray:
        plane = _aux_map(path, rgb.shape[:2])
        return crop_to_fov(np.dstack([plane, plane, plane]), pre.circle, size)[0][..., 0]

    mask = pre.mask
    if mask_path is not None:
        mask = np.where((mask > 127) & (cropped(mask_path) > 127), 255, 0).astype(np.uint8)
    image = np.where(mask[..., None] > 127, pre.image, 0).astype(np.uint8)
    vessels = None
    if vessels_path is not None:
        v = cropped(vessels_path).astype(np.float32) / 255.0
        v[v >= 0.6] = 1.0
        v[v < 0.4] = 0.0
        vessels = np.where(mask > 127, np.round(v * 255.0), 0).astype(np.uint8)
    sample = CleanSample(image_id, image, mask, vessels)
    _check_sample(sample)
    return sample


def _vessel_float(v: np.ndarray) -> np.ndarray:
    out = v.astype(np.float32)
    if v.dtype == np.uint8:
        out /= 255.0
    return np.clip(out, 0.0, 1.0)


def _box_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box
    out[y0:y1, x0:x1] = True
    return out


def spot_mask(record: DegradationRecord, size: int | None = None) -> np.ndarray:
    """Where the record's spots are: float32 HxW in {0, 1}, discs grown by one blur sigma."""
    side = record.size if size is None else size
    out = np.zeros((side, side), dtype=np.uint8)
    for spot in record.spots or ():
        radius = round(spot.radius // 2 + spot.sigma)
        cv2.circle(out, (int(spot.center[0]), int(spot.center[1])), int(radius), 1, -1)
    return out.astype(np.float32)


def _flip(item: TrainItem) -> TrainItem:
    def f(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a[:, ::-1])

    return TrainItem(
        item.image_id,
        item.type_code,
        f(item.clean),  # type: ignore[arg-type]
        f(item.degraded),  # type: ignore[arg-type]
        f(item.mask),  # type: ignore[arg-type]
        f(item.vessels),
        f(item.disc),
        f(item.spots),
    )


class DegradeSource:
    """Clean images degraded on the fly by the fundus_batch.degrade engine.

    Each draw picks a type uniformly from ``types`` and degrades with ``preset``. With
    ``keep_colour`` the training target of an illumination type is the clean image with that
    draw's global colour jitter (brightness, contrast, saturation) applied: the model learns to
    undo the spatial part (halo, hole), which it can see, and not to guess a global colour,
    which it cannot know and would impose on every photograph. With ``clean_jitter`` that share
    of training draws first gives the clean photograph a colour jitter of the preset's ranges
    (the jittered photograph is then both the target and what is degraded): photographs differ
    in colour, and a colour shift alone must not read as an illumination defect. Validation
    items always score against the clean image itself.

    ``leave_alone`` photographs are not training targets for illumination (they failed the
    quality bounds: dark, unevenly lit, soft) but are still photographs whose own lighting a
    model must keep: a draw of a type without an illumination defect takes its photograph
    uniformly from the samples and these together. Indices and ``len`` count the samples only.
    """

    def __init__(
        self,
        samples: Iterable[CleanSample | tuple[Any, ...]],
        preset: Any = "cofe-release",
        types: Sequence[str] = TYPE_CODES,
        *,
        keep_colour: bool = False,
        clean_jitter: float = 0.0,
        leave_alone: Iterable[CleanSample] = (),
    ) -> None:
        items: list[CleanSample] = []
        for i, s in enumerate(samples):
            if not isinstance(s, CleanSample):
                if not isinstance(s, tuple) or not 2 <= len(s) <= 4:
                    raise TrainError(
                        f"sample {i} must be a CleanSample or (image, mask[, vessels[, disc_box]])"
                    )
                s = CleanSample(f"sample-{i:05d}", *s)
            _check_sample(s)
            items.append(s)
        if not items:
            raise TrainError("DegradeSource needs at least one sample")
        self.leave_alone = list(leave_alone)
        for s in self.leave_alone:
            _check_sample(s)
        ids = [s.image_id for s in [*items, *self.leave_alone]]
        if len(set(ids)) != len(ids):
            raise TrainError("DegradeSource sample image_ids must be unique")
        bad = [t for t in types if t not in TYPE_CODES]
        if bad or not types:
            raise TrainError(f"types must be a non-empty subset of {TYPE_CODES}, got {types}")
        self.samples = items
        self.preset = preset
        self.types = tuple(types)
        self.keep_colour = keep_colour
        if not 0.0 <= clean_jitter <= 1.0:
            raise TrainError(f"clean_jitter must be in [0, 1], got {clean_jitter}")
        self.clean_jitter = clean_jitter

    def __len__(self) -> int:
        return len(self.samples)

    def image_id(self, index: int) -> str:
        """Id of sample ``index``."""
        return self.samples[index].image_id

    def _item(self, s: CleanSample, type_code: str, rng: np.random.Generator) -> TrainItem:
        degraded, record = degrade(s.image, s.mask, type_code, rng, self.preset)
        shape = s.image.shape[:2]
        target = s.image
        if self.keep_colour and record.color is not None:
            c = record.color
            jittered = color_jitter(s.image, c.brightness, c.contrast, c.saturation)
            target = np.where(s.mask[..., None] > 127, jittered, 0).astype(np.uint8)
        return TrainItem(
            image_id=s.image_id,
            type_code=type_code,
            clean=target,
            degraded=degraded,
            mask=s.mask,
            vessels=None if s.vessels is None else _vessel_float(s.vessels),
            disc=None if s.disc_box is None else _box_mask(shape, s.disc_box),
            spots=spot_mask(record, shape[0]),
        )

    def train_item(self, index: int, rng: np.random.Generator) -> TrainItem:
        """A fresh degradation of sample ``index`` (type and parameters drawn from ``rng``)."""
        s = self.samples[index]
        type_code = self.types[int(rng.integers(len(self.types)))]
        if self.leave_alone and not type_groups(type_code)[0]:
            pick = int(rng.integers(len(self.samples) + len(self.leave_alone)))
            if pick >= len(self.samples):
                s = self.leave_alone[pick - len(self.samples)]
        if self.clean_jitter > 0 and rng.random() < self.clean_jitter:
            p = get_preset(self.preset)
            b, c, sat = (rng.uniform(*r) for r in (p.brightness, p.contrast, p.saturation))
            jittered = color_jitter(s.image, float(b), float(c), float(sat))
            s = replace(s, image=np.where(s.mask[..., None] > 127, jittered, 0).astype(np.uint8))
        return self._item(s, type_code, rng)

    def val_items(self, seed: int) -> list[ValItem]:
        """Every sample degraded once with each type: rng = sample_rng(seed, id, type index)."""
        out: list[ValItem] = []
        for s in self.samples:
            for t_index, type_code in enumerate(TYPE_CODES):
                if type_code not in self.types:
                    continue
                degraded, _ = degrade(
                    s.image, s.mask, type_code, sample_rng(seed, s.image_id, t_index), self.preset
                )
                out.append(ValItem(s.image_id, type_code, s.image, degraded, s.mask))
        return out


class PairsSource:
    """A pairs dataset written by the pipeline, on local disk or any fsspec URL (``s3://``,
    ...): ``root`` is the output folder or its ``pairs/`` folder; shards are read through
    :mod:`fundus_batch.shards`, images from the rows' URIs.

    Only rows with status ``ok`` and a degraded image are used; with ``split`` only rows whose
    ``split`` column equals it (TrainError if the column is absent). Relative URIs resolve
    against the output folder (the one holding ``pairs/``). No vessel or disc ground truth;
    spot masks come from ``params_json``.
    """

    _COLUMNS = (
        "image_id",
        "variant",
        "status",
        "type_code",
        "clean_uri",
        "mask_uri",
        "degraded_uri",
        "params_json",
    )

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        from fundus_batch import shards

        self.root = str(root)
        self.storage_options = storage_options
        folder = shards.pairs_dir(self.root, storage_options)
        # Rows record image paths relative to OUT, the folder that holds pairs/.
        self.out_root = shards.output_root(self.root, storage_options)
        paths = shards.list_shards(folder, storage_options)
        if not paths:
            raise TrainError(f"no Parquet files under {folder}")
        rows: list[dict[str, Any]] = []
        for path in paths:
            table = shards.read_shard(path, [*self._COLUMNS, "split"], storage_options)
            missing = [c for c in self._COLUMNS if c not in table.column_names]
            if missing:
                raise TrainError(f"{path} lacks pairs columns {missing}")
            if split is not None and "split" not in table.column_names:
                raise TrainError(f"{path} has no split column, cannot select split {split!r}")
            rows.extend(table.to_pylist())
        keep = [
            r
            for r in rows
            if r["status"] == "ok"
            and r["degraded_uri"]
            and r["type_code"] in TYPE_CODES
            and (split is None or r.get("split") == split)
        ]
        if not keep:
            raise TrainError(f"no usable rows (status ok, split {split!r}) in {folder}")
        keep.sort(key=lambda r: (str(r["image_id"]), int(r["variant"] or 0)))
        self.rows = keep

    def __len__(self) -> int:
        return len(self.rows)

    def image_id(self, index: int) -> str:
        """``image_id/variant`` of row ``index``."""
        row = self.rows[index]
        return f"{row['image_id']}/{row['variant']}"

    def _read(self, uri: str, grey: bool = False) -> np.ndarray:
        from fundus_batch.io import storage
        from fundus_batch.io.codecs import decode_image
        from fundus_batch.outpaths import resolve

        data = storage.read_bytes(resolve(self.out_root, uri), storage_options=self.storage_options)
        rgb = decode_image(data)
        return rgb[..., 0].copy() if grey else rgb

    def _pair(self, index: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
        row = self.rows[index]
        clean = self._read(row["clean_uri"])
        mask = np.where(self._read(row["mask_uri"], grey=True) > 127, 255, 0).astype(np.uint8)
        degraded = self._read(row["degraded_uri"])
        if clean.shape != degraded.shape or clean.shape[:2] != mask.shape:
            raise TrainError(f"row {self.image_id(index)}: clean/degraded/mask sizes differ")
        return row, clean, degraded, mask

    def train_item(self, index: int, rng: np.random.Generator) -> TrainItem:
        """Row ``index`` as a training pair (``rng`` is unused: the degradation is stored)."""
        row, clean, degraded, mask = self._pair(index)
        spots = None
        if row.get("params_json"):
            record = DegradationRecord.from_json(row["params_json"])
            spots = spot_mask(record, clean.shape[0])
        return TrainItem(
            self.image_id(index), row["type_code"], clean, degraded, mask, None, None, spots
        )

    def val_items(self, seed: int) -> list[ValItem]:
        """Every row as stored (``seed`` is unused: the degradations are fixed)."""
        out = []
        for i in range(len(self.rows)):
            row, clean, degraded, mask = self._pair(i)
            out.append(ValItem(str(row["image_id"]), row["type_code"], clean, degraded, mask))
        return out


# ---------------------------------------------------------------------------------- batches


def _crop(item: TrainItem, size: int, rng: np.random.Generator) -> TrainItem:
    side = item.clean.shape[0]
    if side < size or item.clean.shape[1] < size:
        raise TrainError(
            f"{item.image_id}: sample is {item.clean.shape[1]}x{side}, smaller than the "
            f"training size {size}"
        )
    y = int(rng.integers(side - size + 1))
    x = int(rng.integers(item.clean.shape[1] - size + 1))

    @overload
    def c(a: np.ndarray) -> np.ndarray: ...
    @overload
    def c(a: None) -> None: ...
    def c(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[y : y + size, x : x + size]

    return TrainItem(
        item.image_id,
        item.type_code,
        c(item.clean),
        c(item.degraded),
        c(item.mask),
        c(item.vessels),
        c(item.disc),
        c(item.spots),
    )


def _images(arrs: Sequence[np.ndarray]) -> Tensor:
    stacked = np.stack(arrs)
    # Contiguous NCHW: a channels_last input crashes CPU conv backward in this torch build.
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def _planes(arrs: Sequence[np.ndarray | None], shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Stacked N x 1 x H x W float planes (zeros where absent) and an N-vector of presence."""
    present = torch.tensor([a is not None for a in arrs], dtype=torch.float32)
    filled = [np.zeros(shape, np.float32) if a is None else a.astype(np.float32) for a in arrs]
    return torch.from_numpy(np.stack(filled))[:, None], present


@dataclass
class Batch:
    """Training tensors on one device (N x C x H x W, floats in [0, 1])."""

    clean: Tensor
    degraded: Tensor
    mask: Tensor
    vessels: Tensor
    has_vessels: Tensor
    disc: Tensor
    has_disc: Tensor
    spots: Tensor
    has_spots: Tensor
    illumination: Tensor  # N: 1.0 where the pair's degradation includes illumination

    def to(self, device: torch.device) -> Batch:
        """A copy on ``device``."""
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


def make_batch(items: Sequence[TrainItem]) -> Batch:
    """Stack training items of one size into tensors."""
    shape = items[0].clean.shape[:2]
    if any(it.clean.shape[:2] != shape for it in items):
        raise TrainError("all items of a batch must have the same size")
    vessels, has_v = _planes([it.vessels for it in items], shape)
    disc, has_d = _planes([it.disc for it in items], shape)
    spots, has_s = _planes([it.spots for it in items], shape)
    mask = torch.from_numpy(np.stack([it.mask > 127 for it in items])).float()[:, None]
    return Batch(
        clean=_images([it.clean for it in items]),
        degraded=_images([it.degraded for it in items]),
        mask=mask,
        vessels=vessels,
        has_vessels=has_v,
        disc=disc,
        has_disc=has_d,
        spots=spots,
        has_spots=has_s,
        illumination=torch.tensor([float(type_groups(it.type_code)[0]) for it in items]),
    )


# ------------------------------------------------------------------------------------- loss


def _half(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 2)


def _masked_l1(
    out: Tensor,
    ref: Tensor,
    weight: Tensor,
    scale: Tensor | None = None,
    kind: str = "l1",
    log_eps: float | None = None,
) -> Tensor:
    """mean(|out - ref| * weight) over all elements (weight broadcast over channels); with
    ``kind="mse"`` the squared difference instead.

    With ``scale`` (one value per item) each item's mean is divided by its scale first.
    """
    if kind == "mse":
        per_item = ((out - ref).square() * weight).mean(dim=(1, 2, 3))
    else:
        per_item = _masked_l1_items(out, ref, weight)
    if log_eps is not None:
        return (10.0 * torch.log10(per_item + log_eps)).mean()
    if scale is not None:
        per_item = per_item / scale
    return per_item.mean()


def _masked_l1_items(out: Tensor, ref: Tensor, weight: Tensor) -> Tensor:
    return ((out - ref).abs() * weight).mean(dim=(1, 2, 3))


def cofenet_loss(
    model: CofeNet, outputs: Any, batch: Batch, config: TrainConfig
) -> tuple[Tensor, dict[str, float]]:
    """The total training loss and its terms (as floats) for one batch of model outputs."""
    out_512 = model.enhanced(outputs).float()
    scale = None
    if config.loss_scale == "degraded":
        with torch.no_grad():
            scale = _masked_l1_items(batch.degraded, batch.clean, batch.mask)
            scale = scale + config.loss_scale_eps
    terms: dict[str, Tensor] = {}
    kind = config.pixel_loss
    log_eps = config.loss_scale_eps if config.loss_scale == "log" else None
    terms["l1"] = config.lambda_l1 * _masked_l1(
        out_512, batch.clean, batch.mask, scale, kind, log_eps
    )
    out_256 = model.coarse(outputs)
    clean_256 = mask_256 = None
    if out_256 is not None and config.lambda_l1_256 > 0:
        clean_256, mask_256 = _half(batch.clean), _half(batch.mask)
        terms["l1_256"] = config.lambda_l1_256 * _masked_l1(
            out_256.float(), clean_256, mask_256, scale, kind, log_eps
        )
    if config.lambda_disc > 0 and bool(batch.has_disc.any()):
        disc = batch.disc * batch.mask
        disc_term = _masked_l1(out_512, batch.clean, disc, scale, kind, log_eps)
        if out_256 is not None and clean_256 is not None:
            disc_term = disc_term + _masked_l1(
                out_256.float(), clean_256, _half(disc), scale, kind, log_eps
            )
        terms["disc"] = config.lambda_disc * disc_term
    vessel = model.vessel(outputs)
    if vessel is not None and config.lambda_vessel > 0 and bool(batch.has_vessels.any()):
        p = vessel.float().clamp(_BCE_EPS, 1.0 - _BCE_EPS)
        gt = batch.vessels * batch.mask
        p = p * batch.mask  # released form: BCE(pred * R, gt * R); outside R both are 0
        bce = -(gt * torch.log(p.clamp_min(_BCE_EPS)) + (1 - gt) * torch.log(1 - p))
        per_item = bce.mean(dim=(1, 2, 3))
        weight = batch.has_vessels
        terms["vessel"] = config.lambda_vessel * (per_item * weight).sum() / weight.sum()
    attention = model.attention(outputs)
    if attention is not None and config.lambda_lqa > 0 and bool(batch.has_spots.any()):
        # torch's stubs reject a Size here, which it accepts at run time
        target = F.adaptive_avg_pool2d(batch.spots, attention.shape[-2:])  # type: ignore[arg-type]
        bce = F.binary_cross_entropy_with_logits(attention.float(), target, reduction="none")
        weight = batch.has_spots
        per_item = bce.mean(dim=(1, 2, 3))
        terms["lqa"] = config.lambda_lqa * (per_item * weight).sum() / weight.sum()
    logits = model.gate_logits(outputs)
    if logits is not None and config.lambda_gate > 0:
        labels = batch.illumination.to(logits).view(-1, 1).expand_as(logits)
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        terms["gate"] = config.lambda_gate * bce
    if config.lambda_overshoot > 0:
        terms["overshoot"] = config.lambda_overshoot * _overshoot(out_512, batch, config)
    total = torch.stack(list(terms.values())).sum()
    return total, {k: float(v.detach()) for k, v in terms.items()}


def _overshoot(out: Tensor, batch: Batch, config: TrainConfig) -> Tensor:
    """(10 / ln 10) * mean over pairs of OS / MSE (module docstring), both FOV means."""
    mask = batch.mask
    count = mask.sum(dim=(1, 2, 3)).clamp_min(1.0) * out.shape[1]
    excess = torch.relu((out - batch.clean).abs() - (batch.degraded - batch.clean).abs()) * mask
    over = excess.square().sum(dim=(1, 2, 3)) / count
    mse = ((out - batch.clean) * mask).square().sum(dim=(1, 2, 3)) / count
    return (10.0 / math.log(10.0)) * (over / (mse.detach() + config.loss_scale_eps)).mean()


# ------------------------------------------------------------------------------- evaluation


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("device 'cuda' requested but CUDA is not available")
    return device


def _use_amp(config_amp: bool | None, device: torch.device) -> bool:
    if config_amp is None:
        return device.type == "cuda"
    if config_amp and device.type != "cuda":
        raise TrainError("amp (bf16 autocast) is only supported on CUDA in this trainer")
    return config_amp


def enhance_images(
    model: CofeNet,
    images: Sequence[np.ndarray],
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    amp: bool = False,
    gates: list[float] | None = None,
) -> list[np.ndarray]:
    """Enhance HxWx3 uint8 images of one size in eval mode; returns uint8 images (unmasked).

    ``gates``, when given, receives each image's gate opening from the same pass (NaN for a
    model without a gate).
    """
    device = torch.device(device)
    out: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            x = _images(images[start : start + batch_size]).to(device)
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                outputs = model(x)
                y = model.enhanced(outputs)
                y = y.float().clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
                opening = model.gate_opening(outputs)
            out.extend(y.permute(0, 2, 3, 1).cpu().numpy())
            if gates is not None:
                if opening is None:
                    gates.extend([float("nan")] * len(x))
                else:
                    gates.extend(float(v) for v in opening.float().cpu())
    finally:
        model.train(was_training)
    return out


@dataclass
class TypeMetrics:
    """Mean FOV-masked metrics of one degradation type."""

    n: int
    psnr_degraded: float
    psnr_enhanced: float
    ssim_degraded: float
    ssim_enhanced: float

    @property
    def psnr_gain(self) -> float:
        """Enhanced minus degraded PSNR (dB)."""
        return self.psnr_enhanced - self.psnr_degraded


@dataclass
class ValReport:
    """Validation at one step: per-type means and the per-image values behind them."""

    step: int
    per_type: dict[str, TypeMetrics]
    per_image: list[dict[str, Any]]
    seconds: float

    @property
    def mean_psnr_gain(self) -> float:
        """PSNR gain averaged over the types (each type weighs the same)."""
        return float(np.mean([m.psnr_gain for m in self.per_type.values()]))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return {
            "step": self.step,
            "seconds": self.seconds,
            "mean_psnr_gain": self.mean_psnr_gain,
            "per_type": {
                t: {**asdict(m), "psnr_gain": m.psnr_gain} for t, m in self.per_type.items()
            },
            "per_image": self.per_image,
        }

    def table(self) -> str:
        """A Markdown table of the per-type metrics."""
        lines = [
            "| type | n | PSNR degraded | PSNR enhanced | gain (dB) | SSIM degraded "
            "| SSIM enhanced |",
            "|---|---|---|---|---|---|---|",
        ]
        for t, m in self.per_type.items():
            lines.append(
                f"| {t} | {m.n} | {m.psnr_degraded:.2f} | {m.psnr_enhanced:.2f} | "
                f"{m.psnr_gain:+.2f} | {m.ssim_degraded:.4f} | {m.ssim_enhanced:.4f} |"
            )
        d = np.mean([m.psnr_degraded for m in self.per_type.values()])
        e = np.mean([m.psnr_enhanced for m in self.per_type.values()])
        sd = np.mean([m.ssim_degraded for m in self.per_type.values()])
        se = np.mean([m.ssim_enhanced for m in self.per_type.values()])
        n = sum(m.n for m in self.per_type.values())
        lines.append(
            f"| mean | {n} | {d:.2f} | {e:.2f} | {self.mean_psnr_gain:+.2f} | {sd:.4f} | {se:.4f} |"
        )
        return "\n".join(lines)


def evaluate(
    model: CofeNet,
    items: Sequence[ValItem],
    *,
    step: int = 0,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> ValReport:
    """Enhance every held-out pair and compare degraded and enhanced with clean in the FOV."""
    if not items:
        raise TrainError("evaluate needs at least one validation item")
    start = time.perf_counter()
    per_image: list[dict[str, Any]] = []
    by_shape: dict[tuple[int, ...], list[ValItem]] = {}
    for it in items:
        check_size(*it.degraded.shape[:2])
        by_shape.setdefault(it.degraded.shape, []).append(it)
    for group in by_shape.values():
        enhanced = enhance_images(
            model, [it.degraded for it in group], batch_size=batch_size, device=device, amp=amp
        )
        for it, enh in zip(group, enhanced, strict=True):
            fov = it.mask > 127
            enh = np.where(fov[..., None], enh, 0).astype(np.uint8)
            per_image.append(
                {
                    "image_id": it.image_id,
                    "type_code": it.type_code,
                    "psnr_degraded": float(psnr(it.degraded, it.clean, fov)),
                    "psnr_enhanced": float(psnr(enh, it.clean, fov)),
                    "ssim_degraded": float(ssim(it.degraded, it.clean, fov)),
                    "ssim_enhanced": float(ssim(enh, it.clean, fov)),
                }
            )
    per_type: dict[str, TypeMetrics] = {}
    for t in TYPE_CODES:
        rows = [r for r in per_image if r["type_code"] == t]
        if rows:
            per_type[t] = TypeMetrics(
                n=len(rows),
                **{
                    k: float(np.mean([r[k] for r in rows]))
                    for k in ("psnr_degraded", "psnr_enhanced", "ssim_degraded", "ssim_enhanced")
                },
            )
    return ValReport(step, per_type, per_image, time.perf_counter() - start)


# ------------------------------------------------------------------------------ checkpoints


def fixup_init(model: CofeNet, generator: torch.Generator) -> None:
    """He-normal convs (zero bias), unit BatchNorm, and zeroed residual branches and heads."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)
            module.reset_running_stats()
    zeroed = [m.conv2 for m in model.modules() if isinstance(m, ResBlock)]
    zeroed.append(model.G_deconv1_0)
    if model.has_lqa:
        zeroed.append(model.a_spot_256)
    for conv in zeroed:
        torch.nn.init.zeros_(conv.weight)


def _rng_for(seed: int, *parts: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *parts])))


def _sample_index(k: int, n: int, seed: int) -> int:
    """The k-th drawn sample: epoch-wise permutations seeded by (seed, epoch)."""
    epoch, pos = divmod(k, n)
    return int(_rng_for(seed, 0x5EED, epoch).permutation(n)[pos])


def _lr_at(step: int, total: int, config: TrainConfig) -> float:
    start = int(config.decay_start * total)
    if step < start or total <= start:
        return config.lr
    return config.lr * max(0.0, 1.0 - (step - start) / (total - start))


_ARCH_KEYS = ("variant", "width", "residual", "field_size", "field_gate")


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint (weights_only=True); TrainError if it is not one."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise TrainError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a fundus_batch training checkpoint")
    return data


def _save_checkpoint(
    path: str,
    model: CofeNet,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: TrainConfig,
    history: list[list[float]],
) -> None:
    data = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": step,
        "config": config.to_dict(),
        "history": history,
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, target)


# ------------------------------------------------------------------------------------ train


@dataclass
class TrainResult:
    """What a training run produced."""

    model: CofeNet
    step: int
    total_steps: int
    history: list[list[float]]  # [step, loss] per logged step
    val: list[ValReport] = field(default_factory=list)
    seconds: float = 0.0  # training time of this call, validation excluded
    seconds_per_step: float = 0.0
    checkpoint: str | None = None

    @property
    def final_loss(self) -> float:
        """Loss at the last logged step (nan if none)."""
        return self.history[-1][1] if self.history else float("nan")


def train(
    config: TrainConfig,
    train_source: TrainSource,
    val_source: TrainSource | None = None,
    *,
    on_val: Callable[[ValReport], None] | None = None,
) -> TrainResult:
    """Train a Cofe-Net generator; see the module docstring for the loss and the data flow."""
    if len(train_source) == 0:
        raise TrainError("the training source is empty")
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    device = _device(config.device)
    amp = _use_amp(config.amp, device)
    total = config.steps
    if config.epochs is not None:
        total = max(1, math.ceil(config.epochs * len(train_source) / config.batch_size))
    end = total if config.stop_at is None else min(total, config.stop_at)

    model = build_cofenet(
        config.variant,
        config.width,
        residual=config.residual,
        field=config.field_size,
        field_gate=config.field_gate,
        generator=torch.Generator().manual_seed(config.seed),
    )
    if config.init == "fixup":
        fixup_init(model, torch.Generator().manual_seed(config.seed))
    if config.init_weights:
        from fundus_batch.models import load_weights
        from fundus_batch.models.weights import read_state_dict

        state = dict(read_state_dict(config.init_weights))
        if config.field_gate:  # weights from a model without the gate: keep the gate's init
            for key, value in model.state_dict().items():
                if key.startswith("G_gate."):
                    state.setdefault(key, value)
        load_weights(model, state)
        model.train()
        if config.field_size is not None:
            torch.nn.init.zeros_(model.G_deconv1_0.weight)
            assert model.G_deconv1_0.bias is not None  # built with a bias
            torch.nn.init.zeros_(model.G_deconv1_0.bias)
    model = model.to(device)
    head = list(model.G_deconv1_0.parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    optimizer = torch.optim.Adam(
        [
            {"params": body, "lr_scale": 1.0},
            {"params": head, "lr_scale": config.head_lr_scale},
        ],
        lr=config.lr,
        betas=config.betas,
    )
    step = 0
    history: list[list[float]] = []
    if config.resume and config.checkpoint and Path(config.checkpoint).is_file():
        ckpt = load_checkpoint(config.checkpoint)
        saved = ckpt["config"]
        clash = [
            k
            for k in (*_ARCH_KEYS, "seed", "batch_size", "size")
            if saved.get(k, TrainConfig.model_fields[k].default) != getattr(config, k)
        ]
        if clash:
            raise TrainError(f"checkpoint {config.checkpoint} was trained with other {clash}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        history = [list(h) for h in ckpt["history"]]
        log.info("resumed from %s at step %d", config.checkpoint, step)
    elif config.resume:
        log.info("no checkpoint at %s yet: starting from step 0", config.checkpoint)

    val_items = val_source.val_items(config.seed) if val_source is not None else []
    reports: list[ValReport] = []
    val_seconds = [0.0]

    def validate(at: int) -> None:
        report = evaluate(
            model, val_items, step=at, batch_size=config.val_batch_size, device=device, amp=amp
        )
        val_seconds[0] += report.seconds
        reports.append(report)
        log.info("step %d: validation (%.1fs)\n%s", at, report.seconds, report.table())
        if on_val is not None:
            on_val(report)

    n = len(train_source)
    model.train()
    start_time = time.perf_counter()
    first_step = step
    running: list[float] = []
    while step < end:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, total, config) * group.get("lr_scale", 1.0)
        items = []
        for slot in range(config.batch_size):
            k = step * config.batch_size + slot
            index = _sample_index(k, n, config.seed)
            rng = sample_rng(config.seed, train_source.image_id(index), k)
            item = train_source.train_item(index, rng)
            if config.flip and rng.integers(2):
                item = _flip(item)
            items.append(_crop(item, config.size, rng))
        batch = make_batch(items).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            teacher = batch.illumination if config.field_gate else None
            outputs = model(batch.degraded, gate=teacher)
        loss, terms = cofenet_loss(model, outputs, batch, config)
        if not torch.isfinite(loss):
            raise TrainError(f"loss is not finite at step {step}: {terms}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        running.append(float(loss.detach()))
        if step % config.log_every == 0 or step == end:
            mean = float(np.mean(running))
            history.append([float(step), mean])
            running = []
            elapsed = time.perf_counter() - start_time - val_seconds[0]
            log.info(
                "step %d/%d loss %.5f (%s) lr %.2e %.2fs/step",
                step,
                total,
                mean,
                ", ".join(f"{k} {v:.4f}" for k, v in terms.items()),
                optimizer.param_groups[0]["lr"],
                elapsed / (step - first_step),
            )
        if config.checkpoint and config.checkpoint_every and step % config.checkpoint_every == 0:
            _save_checkpoint(config.checkpoint, model, optimizer, step, config, history)
        if val_items and config.val_every and step % config.val_every == 0 and step < end:
            validate(step)
    seconds = time.perf_counter() - start_time - val_seconds[0]
    if config.checkpoint:
        _save_checkpoint(config.checkpoint, model, optimizer, step, config, history)
    if val_items and config.val_at_end and (not reports or reports[-1].step != step):
        validate(step)
    model.eval()
    done = step - first_step
    return TrainResult(
        model=model,
        step=step,
        total_steps=total,
        history=history,
        val=reports,
        seconds=seconds,
        seconds_per_step=seconds / done if done else 0.0,
        checkpoint=config.checkpoint,
    )
