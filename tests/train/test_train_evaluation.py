"""fundus_batch.train.evaluation: enhancement in eval mode and what it reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fundus_batch.models import build_cofenet
from fundus_batch.train import enhance_images, fixup_init
from fundus_batch.train.samples import image_batch
from tests.train.train_helpers import synth_samples


def test_enhance_images_reports_the_gate_opening_of_the_pass_that_enhanced() -> None:
    gated = build_cofenet("cofe-net", 0.125, field=192, field_gate=True)
    fixup_init(gated, torch.Generator().manual_seed(3))
    with torch.no_grad():
        gated.G_gate.bias.fill_(0.7)  # a gate that is neither shut nor open
    images = [s.image for s in synth_samples(3, 192, disc=False)]
    gates: list[float] = []
    out = enhance_images(gated, images, batch_size=2, gates=gates)
    x = image_batch(images)
    with torch.no_grad():
        want = gated.gate_opening(gated(x))
    assert want is not None
    assert gates == pytest.approx(want.tolist(), abs=1e-6)
    assert min(gates) > 0.1 and max(gates) < 0.9
    assert all(
        np.array_equal(a, b) for a, b in zip(out, enhance_images(gated, images), strict=True)
    )
    plain: list[float] = []
    enhance_images(build_cofenet("cofe-net", 0.125), images[:1], gates=plain)
    assert len(plain) == 1 and np.isnan(plain[0])
