"""Small synthetic samples and configs shared by the training tests."""

from __future__ import annotations

import torch

from fundus_batch.synth import synth_fundus
from fundus_batch.train import CleanSample, TrainConfig


def synth_samples(n: int = 3, size: int = 224, disc: bool = True) -> list[CleanSample]:
    """``n`` synthetic fundus photographs of ``size`` px, with a disc box unless told not to."""
    out = []
    for i in range(n):
        s = synth_fundus(size, seed=10 + i)
        box = (size // 2 - 20, size // 2 - 20, size // 2 + 20, size // 2 + 20) if disc else None
        out.append(CleanSample(f"synth-{i}", s.image, s.mask, s.vessels, box))
    return out


def tiny_config(**kw: object) -> TrainConfig:
    """A training config small enough for a unit test, with ``kw`` overriding it."""
    base: dict[str, object] = dict(
        width=0.125, size=192, batch_size=2, steps=4, lr=1e-3, log_every=1, device="cpu"
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s weights."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
