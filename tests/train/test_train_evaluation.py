"""fundus_batch.train.evaluation: enhancement in eval mode and what it reports."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest
import torch

from fundus_batch.models import build_cofenet
from fundus_batch.train import DegradeSource, ValItem, enhance_images, evaluate, fixup_init
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


class _Lazy(Sequence[ValItem]):
    """Validation items made when taken (copies), counting how many are alive at once."""

    def __init__(self, items: list[ValItem]) -> None:
        self.items = items
        self.alive: list[weakref.ref[ValItem]] = []
        self.most_alive = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):  # type: ignore[override]  # evaluate takes items by int
        it = self.items[index]  # IndexError ends iteration
        self.alive = [r for r in self.alive if r() is not None]
        self.most_alive = max(self.most_alive, len(self.alive))
        made = replace(it, clean=it.clean.copy(), degraded=it.degraded.copy(), mask=it.mask.copy())
        self.alive.append(weakref.ref(made))
        return made


def test_evaluate_holds_one_batch_of_items_at_a_time_and_scores_as_before() -> None:
    """A large validation split is never all in memory; the numbers and the per-image order
    are those of grouping every item by size first (the earlier implementation)."""
    model = build_cofenet("cofe-net", 0.125, residual=True)
    fixup_init(model, torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.G_deconv1_0.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(6))
    types = ("001", "010", "100")
    small = DegradeSource(synth_samples(1, 192, disc=False), types=types).val_items(0)
    large = DegradeSource(synth_samples(1, 224, disc=False), types=types[:2]).val_items(1)
    mixed = [small[0], large[0], small[1], large[1], small[2]]
    lazy = _Lazy(mixed)
    streamed = evaluate(model, lazy, batch_size=2)
    assert lazy.most_alive <= 2  # one batch (of the size being filled), never all five
    eager = evaluate(model, mixed, batch_size=2)
    grouped = [*small, *large]  # by size, in order of first appearance
    assert [(r["image_id"], r["type_code"]) for r in streamed.per_image] == [
        (it.image_id, it.type_code) for it in grouped
    ]
    assert streamed.per_image == eager.per_image
    assert {t: vars(m) for t, m in streamed.per_type.items()} == {
        t: vars(m) for t, m in eager.per_type.items()
    }
