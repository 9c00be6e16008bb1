"""The training configuration (:class:`TrainConfig`) and :class:`TrainError`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, ConfigDict, Field, ValidationInfo, field_validator

from fundus_batch.validation import FieldProblem, Finite, Int, Model, format_problems, length

CHECKPOINT_FORMAT = "fundus-batch-train-1"
Init = Literal["released", "fixup"]
LossScale = Literal["none", "degraded", "log"]
PixelLoss = Literal["l1", "mse"]
INITS: tuple[str, ...] = get_args(Init)
LOSS_SCALES: tuple[str, ...] = get_args(LossScale)
PIXEL_LOSSES: tuple[str, ...] = get_args(PixelLoss)


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
    torch's CPU threads (None: leave them). ``prefetch`` builds the next batch in a thread while
    the model trains on this one (the same batches; worth it when the model runs on a GPU).
    ``init`` is ``released`` (every conv N(0, 0.02), as
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
    for a ``field_size`` model the output conv of G is zeroed again (``init_head: zero``),
    since its output means a correction there, unless ``init_head`` is ``keep`` (the weights
    are a model of the same head, trained further), and a ``field_gate`` model may start from
    weights without a gate (it starts undecided). ``head_lr_scale`` multiplies the learning
    rate of that output conv.
    ``field_gate`` adds the smooth-correction head's global gate, trained as the module
    docstring says with weight ``lambda_gate``; ``lambda_overshoot`` weighs the over-shoot term
    and ``lambda_new_error`` its tail: only the error added beyond ``new_error_margin`` (in
    [0, 1], the degraded input's error plus that much), which is where the new-error share of
    ``fundus_batch.metrics.harm`` counts pixels, measured against the training target
    (``new_error_against: target``) or, as that share is, against the photograph that was
    degraded (``photograph``: they differ where the target keeps the draw's colour jitter).
    ``trainable`` lists the parameter-name prefixes that train (None: all); the others keep
    their loaded values (``("G_deconv",)`` trains G's decoder and output, so a gated model's
    gate, computed before them, decides exactly as the weights it started from did).
    ``field_deadzone`` and ``field_gate_threshold`` are how the model will ship
    (``fundus_batch.models.cofenet``): validation during training applies them, training not.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    variant: str = "cofe-net"
    width: Annotated[Finite, Field(gt=0.0, le=1.0)] = 0.25
    residual: Annotated[bool, Field(validate_default=True)] = True
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
    prefetch: bool = False
    lambda_l1: _Weight = 1.0
    lambda_l1_256: _Weight = 1.0
    lambda_disc: _Weight = 10.0
    lambda_vessel: _Weight = 0.1
    lambda_lqa: _Weight = 0.0
    lambda_gate: _Weight = 1.0
    lambda_overshoot: _Weight = 0.0
    lambda_new_error: _Weight = 0.0
    new_error_margin: Annotated[Finite, Field(ge=0.0, lt=1.0)] = 0.1
    new_error_against: Literal["target", "photograph"] = "target"
    init: Init = "released"
    loss_scale: LossScale = "none"
    loss_scale_eps: Annotated[Finite, Field(gt=0.0)] = 0.01
    pixel_loss: PixelLoss = "l1"
    init_weights: str | None = None
    init_head: Literal["zero", "keep"] = "zero"
    head_lr_scale: Annotated[Finite, Field(gt=0.0)] = 1.0
    trainable: tuple[str, ...] | None = None
    field_deadzone: Annotated[Finite, Field(ge=0.0, lt=0.5)] = 0.0
    field_gate_threshold: Annotated[Finite, Field(gt=0.0, lt=1.0)] | None = None

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, variant: str) -> str:
        from fundus_batch.models.cofenet import canonical_variant

        canonical_variant(variant)  # raises naming the known variants
        return variant

    @field_validator("residual")
    @classmethod
    def _residual_needs_a_narrow_model(cls, residual: bool, info: ValidationInfo) -> bool:
        if residual and info.data.get("width") == 1.0:
            raise ValueError("needs width < 1 (the full-width variants keep their output)")
        return residual

    @field_validator("field_size")
    @classmethod
    def _field_head_needs_a_plain_narrow_model(
        cls, field_size: int | None, info: ValidationInfo
    ) -> int | None:
        if field_size is not None and (info.data.get("residual") or info.data.get("width") == 1.0):
            raise ValueError("needs width < 1 and residual: false")
        return field_size

    @field_validator("device")
    @classmethod
    def _torch_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
            raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
        return device

    @field_validator("field_gate")
    @classmethod
    def _gate_needs_the_field_head(cls, gate: bool, info: ValidationInfo) -> bool:
        if gate and info.data.get("field_size") is None:
            raise ValueError("needs field_size (the gate belongs to the smooth-correction head)")
        return gate

    @field_validator("field_gate_threshold")
    @classmethod
    def _threshold_needs_the_gate(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and not info.data.get("field_gate"):
            raise ValueError("needs field_gate")
        return value

    @field_validator("init_head")
    @classmethod
    def _keeping_the_head_needs_weights(cls, value: str, info: ValidationInfo) -> str:
        if value == "keep" and not info.data.get("init_weights"):
            raise ValueError("keep needs init_weights")
        return value

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
