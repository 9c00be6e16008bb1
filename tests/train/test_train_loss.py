"""fundus_batch.train.loss: every term of the Cofe-Net training loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fundus_batch.degrade import sample_rng
from fundus_batch.models import build_cofenet
from fundus_batch.train import CleanSample, DegradeSource, cofenet_loss, fixup_init, make_batch
from tests.train.train_helpers import synth_samples, tiny_config


def test_loss_has_every_term_and_ignores_pixels_outside_the_fov() -> None:
    source = DegradeSource(synth_samples(2, 192))
    items = [source.train_item(i, sample_rng(0, "t", i)) for i in range(2)]
    batch = make_batch(items)
    model = build_cofenet("cofe-net", 0.125, residual=True, generator=torch.Generator())
    config = tiny_config(lambda_lqa=1.0)
    outputs = model(batch.degraded)
    total, terms = cofenet_loss(model, outputs, batch, config)
    assert set(terms) == {"l1", "l1_256", "disc", "vessel", "lqa"}
    assert all(np.isfinite(v) and v > 0 for v in terms.values())
    assert total.item() == pytest.approx(sum(terms.values()), rel=1e-5)

    # A perfect output: the image terms vanish; garbage outside the FOV changes nothing.
    out_512 = batch.clean + (1 - batch.mask) * 0.7
    out_256 = torch.nn.functional.avg_pool2d(batch.clean, 2)
    vessel, attention = outputs[2].detach(), outputs[3].detach()
    _, perfect = cofenet_loss(model, (out_512, out_256, vessel, attention), batch, config)
    assert perfect["l1"] == 0.0 and perfect["l1_256"] == 0.0 and perfect["disc"] == 0.0

    # Terms without ground truth are left out instead of being computed against zeros.
    bare_source = DegradeSource(
        [CleanSample(f"b{i}", it.clean, it.mask) for i, it in enumerate(items)]
    )
    bare = make_batch([bare_source.train_item(i, sample_rng(0, "b", i)) for i in range(2)])
    _, bare_terms = cofenet_loss(model, model(bare.degraded), bare, config)
    assert set(bare_terms) == {"l1", "l1_256", "lqa"}


def test_degraded_loss_scale_measures_the_fraction_of_error_left() -> None:
    source = DegradeSource(synth_samples(2, 192, disc=False), types=("001", "010"))
    batch = make_batch([source.train_item(i, sample_rng(5, "scale", i)) for i in range(2)])
    model = build_cofenet("cofe-net", 0.125, residual=True, generator=torch.Generator())
    # Each output removes half of its own pair's error, whatever that error's size.
    half_way = batch.clean + 0.5 * (batch.degraded - batch.clean)
    out_256 = torch.nn.functional.avg_pool2d(half_way, 2)
    vessel = torch.full_like(batch.mask, 0.5)
    outputs = (half_way, out_256, vessel, torch.zeros_like(out_256[:, :1]))
    eps = 0.01
    config = tiny_config(loss_scale="degraded", loss_scale_eps=eps, lambda_vessel=0.0)
    _, terms = cofenet_loss(model, outputs, batch, config)
    errors = [
        float(((batch.degraded[i] - batch.clean[i]).abs() * batch.mask[i]).mean()) for i in range(2)
    ]
    assert errors[0] > 5 * errors[1]  # an illumination pair and a spots pair
    want = np.mean([0.5 * e / (e + eps) for e in errors])
    assert terms["l1"] == pytest.approx(want, rel=1e-4)
    _, plain = cofenet_loss(model, outputs, batch, tiny_config(lambda_vessel=0.0))
    assert plain["l1"] == pytest.approx(0.5 * np.mean(errors), rel=1e-4)


def test_log_loss_counts_each_pair_in_decibels_of_its_own_error() -> None:
    source = DegradeSource(synth_samples(2, 192, disc=False), types=("001", "010"))
    batch = make_batch([source.train_item(i, sample_rng(5, "log", i)) for i in range(2)])
    model = build_cofenet("cofe-net", 0.125, residual=True, generator=torch.Generator())
    eps = 1e-6
    config = tiny_config(pixel_loss="mse", loss_scale="log", loss_scale_eps=eps, lambda_vessel=0.0)

    def loss_of(out: torch.Tensor) -> float:
        outputs = (
            out,
            torch.nn.functional.avg_pool2d(out, 2),
            batch.mask,
            batch.mask[:, :, ::2, ::2],
        )
        return cofenet_loss(model, outputs, batch, config)[1]["l1"]

    mse = [
        float(((batch.degraded[i] - batch.clean[i]).square() * batch.mask[i]).mean())
        for i in range(2)
    ]
    assert loss_of(batch.degraded) == pytest.approx(
        np.mean([10 * np.log10(m + eps) for m in mse]), rel=1e-4
    )
    # Halving the error of either pair lowers the loss by the same ~6 dB / 2, however large
    # that pair's error was: a harmed good pair weighs what a mended bad pair does.
    for i in range(2):
        out = batch.degraded.clone()
        out[i] = batch.clean[i] + 0.5 * (batch.degraded[i] - batch.clean[i])
        drop = loss_of(batch.degraded) - loss_of(out)
        want = 0.5 * (10 * np.log10(mse[i] + eps) - 10 * np.log10(0.25 * mse[i] + eps))
        assert drop == pytest.approx(want, rel=1e-3)
        assert drop > 2.5


def test_overshoot_term_charges_only_error_added_beyond_the_degraded_input() -> None:
    source = DegradeSource(synth_samples(2, 192, disc=False), types=("001",))
    batch = make_batch([source.train_item(i, sample_rng(4, "os", i)) for i in range(2)])
    model = build_cofenet("cofe-net", 0.125, field=192)
    fixup_init(model, torch.Generator().manual_seed(0))  # the identity: output = input
    config = tiny_config(residual=False, field_size=192, lambda_overshoot=2.0)
    _, terms = cofenet_loss(model, model(batch.degraded), batch, config)
    assert terms["overshoot"] == 0.0  # left as degraded: nothing added
    assert "overshoot" not in cofenet_loss(model, model(batch.degraded), batch, tiny_config())[1]

    from fundus_batch.train.loss import _overshoot

    clean, degraded, mask = batch.clean, batch.degraded, batch.mask
    assert _overshoot(clean, batch, config).item() == 0.0  # mended
    twice = clean + 2 * (degraded - clean)  # twice the degraded error, same direction
    count = mask.sum(dim=(1, 2, 3)) * 3
    err = ((degraded - clean) * mask).square().sum(dim=(1, 2, 3)) / count
    want = (10 / np.log(10)) * (err / (4 * err + config.loss_scale_eps)).mean()
    assert _overshoot(twice, batch, config).item() == pytest.approx(want.item(), rel=1e-4)


def test_new_error_term_charges_only_error_added_beyond_the_margin() -> None:
    from fundus_batch.train.loss import _overshoot

    source = DegradeSource(synth_samples(2, 192, disc=False), types=("001",))
    batch = make_batch([source.train_item(i, sample_rng(4, "ne", i)) for i in range(2)])
    config = tiny_config(residual=False, field_size=192, lambda_new_error=3.0)
    clean, degraded, mask = batch.clean, batch.degraded, batch.mask
    added = 0.05 * torch.sign(degraded - clean + 1e-9)  # 0.05 beyond the degraded error
    small = degraded + added
    assert _overshoot(small, batch, config, margin=0.1).item() == 0.0  # under the margin
    assert _overshoot(small, batch, config).item() > 0.0  # the plain over-shoot charges it
    big = degraded + 3 * added  # 0.15 added: 0.05 beyond the margin in every FOV pixel
    count = mask.sum(dim=(1, 2, 3)) * 3
    tail = ((0.05 * mask).square() * torch.ones_like(big)).sum(dim=(1, 2, 3)) / count
    err = ((big - clean) * mask).square().sum(dim=(1, 2, 3)) / count
    want = (10 / np.log(10)) * (tail / (err + config.loss_scale_eps)).mean()
    got = _overshoot(big, batch, config, margin=0.1)
    assert got.item() == pytest.approx(want.item(), rel=1e-3)
    model = build_cofenet("cofe-net", 0.125, field=192)
    fixup_init(model, torch.Generator().manual_seed(0))  # the identity: output = input
    _, terms = cofenet_loss(model, model(degraded), batch, config)
    assert terms["new_error"] == 0.0  # left as degraded: nothing added
    assert "new_error" not in cofenet_loss(model, model(degraded), batch, tiny_config())[1]


def test_new_error_term_can_measure_against_the_photograph_instead_of_the_target() -> None:
    from fundus_batch.train.loss import _overshoot

    source = DegradeSource(synth_samples(2, 192, disc=False), types=("001",), keep_colour=True)
    batch = make_batch([source.train_item(i, sample_rng(5, "ph", i)) for i in range(2)])
    assert not torch.equal(batch.photo, batch.clean)  # the target keeps the colour jitter
    model = build_cofenet("cofe-net", 0.125, field=192)
    fixup_init(model, torch.Generator().manual_seed(0))
    outputs = model(batch.degraded)
    out = model.enhanced(outputs).float()
    for against, ref in (("target", batch.clean), ("photograph", batch.photo)):
        config = tiny_config(
            residual=False,
            field_size=192,
            lambda_new_error=2.0,
            new_error_margin=0.0,
            new_error_against=against,
        )
        _, terms = cofenet_loss(model, outputs, batch, config)
        want = 2.0 * _overshoot(out, batch, config, reference=ref).item()
        assert terms["new_error"] == pytest.approx(want, rel=1e-5)
    # mended to the target: nothing added against it, the kept jitter added against the photo
    assert _overshoot(batch.clean, batch, config, reference=batch.clean).item() == 0.0
    assert _overshoot(batch.clean, batch, config, reference=batch.photo).item() > 0.0
