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


def test_enhance_images_given_gates_apply_the_correction_only_where_the_gate_is_one() -> None:
    gated = build_cofenet("cofe-net", 0.125, field=192, field_gate=True, field_gate_threshold=0.95)
    fixup_init(gated, torch.Generator().manual_seed(3))
    with torch.no_grad():
        gated.G_gate.bias.fill_(-5.0)  # the predicted gate stays shut
        for p in gated.G_deconv1_0.parameters():  # a correction of a few grey levels
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(4))
    images = [s.image for s in synth_samples(3, 192, disc=False)]
    predicted = enhance_images(gated, images)
    assert all(np.array_equal(a, b) for a, b in zip(predicted, images, strict=True))
    forced = enhance_images(gated, images, batch_size=2, given_gates=[0.0, 1.0, 0.0])
    assert np.array_equal(forced[0], images[0]) and np.array_equal(forced[2], images[2])
    assert not np.array_equal(forced[1], images[1])
    with pytest.raises(ValueError, match="given_gates has 2 values for 3 images"):
        enhance_images(gated, images, given_gates=[1.0, 1.0])
    with pytest.raises(ValueError, match="gate needs a field_gate model"):
        enhance_images(build_cofenet("cofe-net", 0.125), images, given_gates=[1.0] * 3)
