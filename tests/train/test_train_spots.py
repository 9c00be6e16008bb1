"""fundus_batch.train.spots: spot-free targets and the spot head's training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fundus_batch.degrade import TYPE_CODES, degrade, replay, sample_rng
from fundus_batch.models.cofenet import SpotHead
from fundus_batch.train.spots import (
    IDENTITY_SHARE,
    PRESET,
    SpotPairs,
    spot_pairs,
    train_spot_head,
)
from tests.train.train_helpers import synth_samples


def test_pairs_are_seeded_per_pair_and_keep_everything_but_the_spots() -> None:
    samples = synth_samples(2, 192)
    pairs = spot_pairs(samples, seed=3, per_photo=8)
    again = spot_pairs(samples, seed=3, per_photo=8)
    assert len(pairs) == 16 and pairs.degraded.shape == (16, 192, 192, 3)
    assert np.array_equal(pairs.degraded, again.degraded)
    assert np.array_equal(pairs.target, again.target)
    assert not np.array_equal(spot_pairs(samples, seed=4, per_photo=8).degraded, pairs.degraded)
    # Pair j of a photograph draws from sample_rng(seed, id, j): whether it is the photograph
    # itself, else its type code and its degradation; the target is that degradation replayed
    # without spots.
    kinds = set()
    for i, sample in enumerate(np.repeat(samples, 8)):
        assert np.array_equal(pairs.fov[i], sample.mask > 127)
        rng = sample_rng(3, sample.image_id, i % 8)
        if rng.random() < IDENTITY_SHARE:
            assert np.array_equal(pairs.degraded[i], sample.image)
            assert np.array_equal(pairs.target[i], sample.image)
            kinds.add("identity")
            continue
        code = TYPE_CODES[int(rng.integers(0, len(TYPE_CODES)))]
        image, record = degrade(sample.image, sample.mask, code, rng, PRESET)
        assert np.array_equal(pairs.degraded[i], image)
        spot_free = replay(sample.image, sample.mask, record, skip=("spots",))
        assert np.array_equal(pairs.target[i], spot_free)
        kinds.add("spots" if code[1] == "1" else "no spots")
    assert "spots" in kinds and "no spots" in kinds


def test_a_pair_without_spots_has_its_input_as_target() -> None:
    pairs = spot_pairs(synth_samples(2, 192), seed=3, per_photo=8)
    same = [np.array_equal(x, y) for x, y in zip(pairs.degraded, pairs.target, strict=True)]
    assert any(same) and not all(same)


def _head() -> SpotHead:
    return SpotHead(4)


def test_training_lowers_the_loss_on_spot_pairs_and_changes_only_the_head() -> None:
    pairs = spot_pairs(synth_samples(3, 128), seed=1, per_photo=6)
    head = _head()
    losses = train_spot_head(head, pairs, steps=60, crop=64, batch_size=4, focus=0.8, lr=3e-3)
    assert len(losses) == 60 and all(np.isfinite(losses))
    assert np.mean(losses[-15:]) < np.mean(losses[:15])
    assert not head.training
    assert head.out.weight.abs().sum() > 0  # it left the identity it started from


def test_training_is_deterministic_for_a_seed() -> None:
    pairs = spot_pairs(synth_samples(2, 128), seed=1, per_photo=4)
    heads = []
    for _ in range(2):
        torch.manual_seed(0)
        head = _head()
        train_spot_head(head, pairs, steps=5, crop=64, batch_size=2, seed=9)
        heads.append(head.state_dict())
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_the_log_is_called_every_100_steps_and_at_the_last() -> None:
    pairs = spot_pairs(synth_samples(1, 128), seed=1, per_photo=2)
    seen: list[int] = []
    train_spot_head(
        _head(), pairs, steps=102, crop=32, batch_size=1, log=lambda s, _: seen.append(s)
    )
    assert seen == [0, 100, 101]


def test_a_crop_larger_than_the_images_is_refused() -> None:
    pairs = SpotPairs(
        np.zeros((1, 64, 64, 3), np.uint8),
        np.zeros((1, 64, 64, 3), np.uint8),
        np.ones((1, 64, 64), bool),
    )
    with pytest.raises(ValueError, match="crop must be in"):
        train_spot_head(_head(), pairs, steps=1, crop=96)
