"""Training a Cofe-Net's spot head on its own (``CofeNet(spot_head=...)``).

Each clean photograph gives ``per_photo`` pairs: with probability ``IDENTITY_SHARE`` the photograph
itself (the head must leave it alone), else a degradation of a random type and, as target, the same
degradation replayed without its spots. Blur, halo, hole and colour stay in the target, so the head
learns to remove spots only; the smooth field behind it handles illumination, and blur is left as
it is. Training draws square crops, a share ``focus`` of them centred near a pixel the target
changes, and minimises the squared error inside the FOV.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fundus_batch.degrade import TYPE_CODES, degrade, replay, sample_rng
from fundus_batch.models.cofenet import SpotHead
from fundus_batch.train.loop import decayed_lr
from fundus_batch.train.samples import CleanSample, image_batch

IDENTITY_SHARE = 0.15
PRESET = "cofe-release"
_CHANGED = 2  # grey levels: a target pixel further than this from the input is a spot pixel
_MIN_FOV_SHARE = 0.3  # a random crop is redrawn (up to 10 times) until this much of it is FOV
_DECAY_START = 0.6  # the learning rate is constant for this share of the steps, then falls to 0

__all__ = ["IDENTITY_SHARE", "SpotPairs", "spot_pairs", "train_spot_head"]


@dataclass(frozen=True)
class SpotPairs:
    """Inputs and targets (N x H x W x 3 uint8) and FOVs (N x H x W bool) of spot training."""

    degraded: np.ndarray
    target: np.ndarray
    fov: np.ndarray

    def __len__(self) -> int:
        return len(self.degraded)


def spot_pairs(samples: Sequence[CleanSample], seed: int, per_photo: int) -> SpotPairs:
    """``per_photo`` (degraded, spot-free target) pairs of each photograph. Pair j draws from
    ``sample_rng(seed, image_id, j)``: first whether it is the photograph itself, then the type
    code, then the degradation."""
    degraded, target, fov = [], [], []
    for sample in samples:
        inside = sample.mask > 127
        for j in range(per_photo):
            rng = sample_rng(seed, sample.image_id, j)
            if rng.random() < IDENTITY_SHARE:
                degraded.append(sample.image)
                target.append(sample.image)
                fov.append(inside)
                continue
            code = TYPE_CODES[int(rng.integers(0, len(TYPE_CODES)))]
            image, record = degrade(sample.image, sample.mask, code, rng, PRESET)
            degraded.append(image)
            target.append(replay(sample.image, sample.mask, record, skip=("spots",)))
            fov.append(inside)
    return SpotPairs(np.stack(degraded), np.stack(target), np.stack(fov))


def train_spot_head(
    head: SpotHead,
    pairs: SpotPairs,
    *,
    steps: int,
    crop: int = 96,
    batch_size: int = 16,
    focus: float = 0.35,
    lr: float = 2e-3,
    seed: int = 5,
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``head`` in place with Adam; returns the loss of every step.

    ``log(step, loss)`` is called every 100 steps and at the last.
    """
    size = pairs.degraded.shape[1]
    if not 0 < crop <= size:
        raise ValueError(f"crop must be in (0, {size}], got {crop}")
    changed = [
        np.argwhere(np.abs(x.astype(np.int16) - y).max(axis=2) > _CHANGED)
        for x, y in zip(pairs.degraded, pairs.target, strict=True)
    ]
    optimiser = torch.optim.Adam(head.parameters(), lr)
    g = np.random.default_rng(seed)
    losses: list[float] = []
    head.train()
    for step in range(steps):
        xs, ys, ms = [], [], []
        for i in g.integers(0, len(pairs), batch_size):
            r, c = _crop_corner(g, changed[i], pairs.fov[i], crop, focus)
            xs.append(pairs.degraded[i, r : r + crop, c : c + crop])
            ys.append(pairs.target[i, r : r + crop, c : c + crop])
            ms.append(pairs.fov[i, r : r + crop, c : c + crop])
        x, y = image_batch(xs), image_batch(ys)
        m = torch.from_numpy(np.stack(ms)).unsqueeze(1).float()
        for group in optimiser.param_groups:
            group["lr"] = decayed_lr(step, steps, lr, _DECAY_START)
        loss = _masked_mse(head(x, m), y, m)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.item()))
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(step, losses[-1])
    head.eval()
    return losses


def _crop_corner(
    g: np.random.Generator, changed: np.ndarray, fov: np.ndarray, crop: int, focus: float
) -> tuple[int, int]:
    size = fov.shape[0]
    if len(changed) and g.random() < focus:
        centre = changed[g.integers(0, len(changed))]
        r, c = centre - crop // 2 + g.integers(-crop // 4, crop // 4, 2)
        return int(np.clip(r, 0, size - crop)), int(np.clip(c, 0, size - crop))
    for _ in range(10):
        r, c = g.integers(0, size - crop, 2)
        if fov[r : r + crop, c : c + crop].mean() > _MIN_FOV_SHARE:
            break
    return int(r), int(c)


def _masked_mse(out: Tensor, target: Tensor, fov: Tensor) -> Tensor:
    """Squared error inside the FOV, per channel-pixel, times 1,000."""
    return (((out - target) ** 2) * fov).sum() / (fov.sum() * 3 + 1) * 1e3
