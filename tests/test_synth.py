"""Tests for the synthetic fundus generator."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fundus_batch.synth import MIN_SIZE, SynthFundus, synth_fundus


def _fov(s: SynthFundus) -> np.ndarray:
    return s.mask > 0


def test_same_seed_gives_identical_bytes() -> None:
    a, b = synth_fundus(256, seed=7), synth_fundus(256, seed=7)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.vessels.tobytes() == b.vessels.tobytes()
    assert a.mask.tobytes() == b.mask.tobytes()
    assert a.circle == b.circle


def test_different_seeds_give_different_images_and_trees() -> None:
    a, b = synth_fundus(256, seed=1), synth_fundus(256, seed=2)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.vessels, b.vessels)


def test_generator_does_not_touch_numpy_global_rng() -> None:
    state = np.random.get_state()[1].copy()
    synth_fundus(64, seed=3)
    assert np.array_equal(np.random.get_state()[1], state)


@pytest.mark.parametrize("size", [64, 100, 256, 512, 777])
def test_shapes_dtypes_and_binary_maps(size: int) -> None:
    s = synth_fundus(size, seed=0)
    assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
    assert s.vessels.shape == (size, size) and s.vessels.dtype == np.uint8
    assert s.mask.shape == (size, size) and s.mask.dtype == np.uint8
    assert set(np.unique(s.vessels)) <= {0, 255}
    assert set(np.unique(s.mask)) == {0, 255}


@pytest.mark.parametrize("size", [64, 256, 512])
def test_mask_is_the_returned_circle_with_a_small_margin(size: int) -> None:
    s = synth_fundus(size, seed=4)
    cx, cy, r = s.circle
    yy, xx = np.mgrid[0:size, 0:size]
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    assert np.array_equal(_fov(s), inside)
    assert size - 2 * r <= max(4, 0.05 * size)  # diameter is the size minus a small margin
    assert not _fov(s)[0].any() and not _fov(s)[:, 0].any()


@pytest.mark.parametrize("seed", [0, 5, 11])
def test_nothing_outside_the_fov_is_nonzero(seed: int) -> None:
    s = synth_fundus(300, seed=seed)
    outside = ~_fov(s)
    assert not s.image[outside].any()
    assert not s.vessels[outside].any()


@pytest.mark.parametrize("size", [256, 512, 1024])
def test_vessel_fraction_is_plausible(size: int) -> None:
    for seed in range(3):
        s = synth_fundus(size, seed=seed)
        frac = (s.vessels > 0)[_fov(s)].mean()
        assert 0.05 <= frac <= 0.16, (size, seed, frac)


def test_vessels_are_darker_than_the_background_around_them() -> None:
    s = synth_fundus(512, seed=2)
    vessel = s.vessels > 0
    near = cv2.dilate(s.vessels, np.ones((9, 9), np.uint8)) > 0
    ring = near & ~cv2.dilate(s.vessels, np.ones((3, 3), np.uint8)).astype(bool) & _fov(s)
    green = s.image[..., 1].astype(float)
    red = s.image[..., 0].astype(float)
    assert green[vessel].mean() < 0.85 * green[ring].mean()
    assert red[vessel].mean() < red[ring].mean()


def test_fundus_is_orange_red_with_a_bright_disc() -> None:
    s = synth_fundus(512, seed=0)
    fov = s.image[_fov(s)].astype(float)
    r, g, b = fov.mean(axis=0)
    assert r > 2 * g and g > b
    # The brightest area is the disc: a yellowish blob far brighter than the median fundus.
    luma = s.image.astype(float) @ [0.299, 0.587, 0.114]
    assert np.percentile(luma[_fov(s)], 99.8) > 1.6 * np.median(luma[_fov(s)])


def test_same_eye_at_different_sizes() -> None:
    small = synth_fundus(256, seed=9)
    big = synth_fundus(512, seed=9)
    shrunk = cv2.resize(big.vessels, (256, 256), interpolation=cv2.INTER_AREA) > 127
    vs = small.vessels > 0
    overlap = (shrunk & vs).sum() / max(1, (shrunk | vs).sum())
    assert overlap > 0.4
    other = synth_fundus(256, seed=10).vessels > 0
    assert overlap > 2 * ((shrunk & other).sum() / max(1, (shrunk | other).sum()))


def test_canvas_centres_the_fov_in_a_black_frame() -> None:
    plain = synth_fundus(200, seed=3)
    s = synth_fundus(200, seed=3, canvas=(300, 240))
    assert s.image.shape == (240, 300, 3)
    assert s.vessels.shape == s.mask.shape == (240, 300)
    assert s.circle == (plain.circle[0] + 50, plain.circle[1] + 20, plain.circle[2])
    assert np.array_equal(s.image[20:220, 50:250], plain.image)
    assert np.array_equal(s.vessels[20:220, 50:250], plain.vessels)
    assert np.array_equal(s.mask[20:220, 50:250], plain.mask)
    frame = np.ones((240, 300), bool)
    frame[20:220, 50:250] = False
    assert not s.image[frame].any() and not s.mask[frame].any()


def test_canvas_shorter_than_the_circle_clips_top_and_bottom() -> None:
    plain = synth_fundus(200, seed=3)
    s = synth_fundus(200, seed=3, canvas=(260, 150))
    assert s.image.shape == (150, 260, 3)
    assert s.circle == (plain.circle[0] + 30, plain.circle[1] - 25, plain.circle[2])
    assert np.array_equal(s.image, np.pad(plain.image[25:175], ((0, 0), (30, 30), (0, 0))))
    assert s.mask[0].any() and s.mask[-1].any()  # the circle touches the clipped edges


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"size": MIN_SIZE - 1}, ValueError),
        ({"size": 64.0}, TypeError),
        ({"size": True}, TypeError),
        ({"seed": -1}, ValueError),
        ({"seed": "a"}, TypeError),
        ({"canvas": (0, 10)}, ValueError),
        ({"canvas": (10,)}, TypeError),
        ({"canvas": [100, 100]}, TypeError),
    ],
)
def test_bad_arguments_raise_typed_errors(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        synth_fundus(**kwargs)
