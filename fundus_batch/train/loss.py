"""The Cofe-Net training loss (see the package docstring for its terms)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fundus_batch.models.cofenet import CofeNet
from fundus_batch.train.config import TrainConfig
from fundus_batch.train.samples import Batch

_BCE_EPS = 1e-6


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
    if config.lambda_new_error > 0:
        reference = batch.photo if config.new_error_against == "photograph" else batch.clean
        terms["new_error"] = config.lambda_new_error * _overshoot(
            out_512, batch, config, margin=config.new_error_margin, reference=reference
        )
    total = torch.stack(list(terms.values())).sum()
    return total, {k: float(v.detach()) for k, v in terms.items()}


def _overshoot(
    out: Tensor,
    batch: Batch,
    config: TrainConfig,
    margin: float = 0.0,
    reference: Tensor | None = None,
) -> Tensor:
    """(10 / ln 10) * mean over pairs of OS / MSE (package docstring), both FOV means; with a
    ``margin``, OS counts only the error added beyond the degraded input's plus ``margin``;
    errors are against ``reference`` (default: the target, ``batch.clean``)."""
    mask = batch.mask
    ref = batch.clean if reference is None else reference
    count = mask.sum(dim=(1, 2, 3)).clamp_min(1.0) * out.shape[1]
    added = (out - ref).abs() - (batch.degraded - ref).abs()
    excess = torch.relu(added - margin) * mask
    over = excess.square().sum(dim=(1, 2, 3)) / count
    mse = ((out - ref) * mask).square().sum(dim=(1, 2, 3)) / count
    return (10.0 / math.log(10.0)) * (over / (mse.detach() + config.loss_scale_eps)).mean()
