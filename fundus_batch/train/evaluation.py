"""Enhancing images with a trained model and scoring it per degradation type."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fundus_batch.degrade import TYPE_CODES
from fundus_batch.metrics import finite, psnr, ssim
from fundus_batch.models.cofenet import CofeNet, check_size
from fundus_batch.train.config import TrainError
from fundus_batch.train.samples import ValItem, image_batch


def resolve_device(name: str) -> torch.device:
    """The torch device for a config's ``device`` ("auto": CUDA when present, else CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("device 'cuda' requested but CUDA is not available")
    return device


def use_amp(config_amp: bool | None, device: torch.device) -> bool:
    """Whether to run in bf16 autocast: the config's choice, by default on CUDA only."""
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
    given_gates: Sequence[float] | None = None,
) -> list[np.ndarray]:
    """Enhance HxWx3 uint8 images of one size in eval mode; returns uint8 images (unmasked).

    ``gates``, when given, receives each image's gate opening from the same pass (NaN for a
    model without a gate). ``given_gates`` (one value per image, ``field_gate`` models only)
    replaces the predicted gate, e.g. with the type code's answer to measure what the gate costs.
    """
    if given_gates is not None and len(given_gates) != len(images):
        raise ValueError(f"given_gates has {len(given_gates)} values for {len(images)} images")
    device = torch.device(device)
    out: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            x = image_batch(images[start : start + batch_size]).to(device)
            given = None
            if given_gates is not None:
                chunk = given_gates[start : start + batch_size]
                given = torch.tensor(chunk, dtype=torch.float32, device=device)
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                outputs = model(x, gate=given)
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
    """Enhance every held-out pair and compare degraded and enhanced with clean in the FOV.

    Items are taken one at a time (``items`` may read them lazily) and enhanced in batches of
    one image size, so at most ``batch_size`` items per size are held at once; the batches and
    the ``per_image`` order are those of grouping all items by size first.
    """
    if not items:
        raise TrainError("evaluate needs at least one validation item")
    start = time.perf_counter()
    scored: list[tuple[tuple[int, int], dict[str, Any]]] = []  # ((size group, position), row)
    groups: dict[tuple[int, ...], int] = {}  # shape -> group index, by first appearance
    seen: dict[tuple[int, ...], int] = {}  # shape -> items taken so far
    pending: dict[tuple[int, ...], list[tuple[int, ValItem]]] = {}

    def score(batch: list[tuple[int, ValItem]], group: int) -> None:
        enhanced = enhance_images(
            model,
            [it.degraded for _, it in batch],
            batch_size=batch_size,
            device=device,
            amp=amp,
        )
        for (position, it), enh in zip(batch, enhanced, strict=True):
            fov = it.mask > 127
            enh = np.where(fov[..., None], enh, 0).astype(np.uint8)
            row = {
                "image_id": it.image_id,
                "type_code": it.type_code,
                # An unchanged draw (a 1 x 1 blur) has an infinite PSNR: capped.
                "psnr_degraded": finite(psnr(it.degraded, it.clean, fov)),
                "psnr_enhanced": finite(psnr(enh, it.clean, fov)),
                "ssim_degraded": float(ssim(it.degraded, it.clean, fov)),
                "ssim_enhanced": float(ssim(enh, it.clean, fov)),
            }
            scored.append(((group, position), row))

    for it in items:
        check_size(*it.degraded.shape[:2])
        shape = it.degraded.shape
        group = groups.setdefault(shape, len(groups))
        position = seen.get(shape, 0)
        seen[shape] = position + 1
        pending.setdefault(shape, []).append((position, it))
        del it  # held by its batch only: scored and dropped with it
        if len(pending[shape]) == batch_size:
            score(pending.pop(shape), group)
    for shape, batch in pending.items():
        score(batch, groups[shape])
    scored.sort(key=lambda s: s[0])
    per_image = [row for _, row in scored]
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
