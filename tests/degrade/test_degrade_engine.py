"""degrade/replay: byte-identical replay, the documented effect of each operator, scaling."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import cv2
import numpy as np
import pytest

from fundus_batch.degrade import (
    TYPE_CODES,
    DegradationRecord,
    Preset,
    RecordError,
    degrade,
    ops,
    replay,
    sample_record,
    sample_rng,
)
from fundus_batch.degrade.presets import release_spot_amplitude
from fundus_batch.synth import synth_fundus

# Section 2.9 of degradation-model.md: a real type-111 record of the released script.
EXAMPLE_111 = {
    "name": "13_left.jpeg",
    "type": "111",
    "params": {
        "illumination": {
            "color": {
                "brightness_factor": 0.7762,
                "contrast_factor": 0.7339,
                "saturation_factor": 1.2277,
            },
            "halo": {
                "num": 1,
                "center_a": [233, 289],
                "dia_a": 422.73,
                "center_b": [233, 289],
                "dia_b": 840.52,
            },
            "hole": {
                "center": [327, 279],
                "diameter_circle": 235,
                "brightness_factor": -0.2801,
                "rad_w": 163,
                "rad_h": 171,
                "sigma": 136.0,
            },
        },
        "spots": [
            {"radius": 9, "center": [339, 364], "rad_w": 7, "rad_h": 5, "sigma": 24.4},
            {"radius": 17, "center": [328, 412], "rad_w": 9, "rad_h": 9, "sigma": 37.2},
        ],
        "blur": {"sigma": 13.73, "rad_w": 5, "rad_h": 5},
    },
}


@pytest.fixture(scope="module")
def fundus512() -> tuple[np.ndarray, np.ndarray]:
    s = synth_fundus(512, seed=1)
    return s.image, s.mask


@pytest.fixture(scope="module")
def example() -> DegradationRecord:
    return DegradationRecord.from_released(json.loads(json.dumps(EXAMPLE_111)))


def _only(record: DegradationRecord, code: str, **parts) -> DegradationRecord:
    """The example's sub-records for the groups of ``code`` (others dropped)."""
    keep = {"color": None, "halo": None, "hole": None, "spots": None, "blur": None}
    if code[2] == "1":
        keep.update(color=record.color, halo=record.halo, hole=record.hole)
    if code[1] == "1":
        keep["spots"] = record.spots
    if code[0] == "1":
        keep["blur"] = record.blur
    keep.update(parts)
    return replace(record, type_code=code, **keep)


def _fov(mask: np.ndarray) -> np.ndarray:
    return mask > 127


def _laplacian_var(image: np.ndarray, fov: np.ndarray) -> float:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64)
    inner = cv2.erode(fov.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    return float(cv2.Laplacian(grey, cv2.CV_64F)[inner].var())


# ---- determinism of replay


@pytest.mark.parametrize("preset", ["cofe-release", "cofe-train"])
@pytest.mark.parametrize("code", TYPE_CODES)
def test_replay_is_byte_identical_to_degrade(fundus512, code: str, preset: str) -> None:
    image, mask = fundus512
    out, record = degrade(image, mask, code, sample_rng(3, "eye", 1), preset=preset)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert record.type_code == code and record.preset == preset
    if record.hole is not None:
        assert record.hole.strength is not None
    assert np.array_equal(replay(image, mask, record), out)
    assert np.array_equal(replay(image, mask, DegradationRecord.from_json(record.to_json())), out)


def test_release_output_is_zero_outside_the_fov_but_train_output_is_not(fundus512) -> None:
    image, mask = fundus512
    outside = ~_fov(mask)
    rel, _ = degrade(image, mask, "111", sample_rng(1, "x", 0))
    assert not rel[outside].any()
    train, record = degrade(image, mask, "111", sample_rng(1, "x", 0), preset="cofe-train")
    assert record.model == "train"
    assert train[outside].any()  # no FOV multiplication in the training-loader model


def test_custom_preset_is_used_and_recorded(fundus512) -> None:
    image, mask = fundus512
    few = Preset.from_dict({"name": "two-spots", "spot_count": [2, 2], "blur_sigma": [1, 1.5]})
    out, record = degrade(image, mask, "110", sample_rng(0, "y", 0), preset=few)
    assert record.preset == "two-spots" and len(record.spots) == 2
    assert record.blur.sigma <= 1.5
    assert np.array_equal(replay(image, mask, record), out)


# ---- the documented effect of each operator (section 2.9 example on a synthetic fundus)


def test_example_blur_lowers_laplacian_variance(fundus512, example) -> None:
    image, mask = fundus512
    fov = _fov(mask)
    blurred = replay(image, mask, _only(example, "100"))
    assert _laplacian_var(blurred, fov) < 0.5 * _laplacian_var(image, fov)
    full = replay(image, mask, example)
    assert _laplacian_var(full, fov) < 0.5 * _laplacian_var(image, fov)


def test_example_hole_darkens_its_disc(fundus512, example) -> None:
    image, mask = fundus512
    with_hole = replay(image, mask, _only(example, "001")).astype(np.float64)
    no_hole = replay(
        image, mask, _only(example, "001", hole=replace(example.hole, strength=0.0))
    ).astype(np.float64)
    inside = ops.disc((512, 512), example.hole.center, example.hole.diameter // 2) & _fov(mask)
    drop = no_hole[inside].mean() - with_hole[inside].mean()
    assert drop > 0.15 * 255 * 0.5  # strength -0.28 at the centre, about half of it on average
    assert np.all(with_hole[inside] <= no_hole[inside])


def test_example_spots_brighten_their_centres(fundus512, example) -> None:
    image, mask = fundus512
    spotted = replay(image, mask, _only(example, "010")).astype(int)
    clean = replay(image, mask, replace(_only(example, "010"), spots=())).astype(int)
    for spot in example.spots:
        x, y = spot.center
        assert _fov(mask)[y, x]
        gain = spotted[y, x] - clean[y, x]
        assert np.all(gain >= 1) and gain.max() >= 0.3 * spot.amplitude * 255
    assert np.all(spotted >= clean)


def _neutral_illumination(record: DegradationRecord, **color) -> DegradationRecord:
    """Type 001 with the given colour factors, an empty halo ring and no hole."""
    halo = replace(record.halo, dia_b=record.halo.dia_a)
    hole = replace(record.hole, strength=0.0)
    base = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, **color}
    return _only(record, "001", color=replace(record.color, **base), halo=halo, hole=hole)


def _fov_stats(image: np.ndarray, fov: np.ndarray) -> tuple[float, float, float]:
    pixels = image[fov].astype(np.float64)
    grey = pixels.mean(axis=1)
    saturation = np.abs(pixels - grey[:, None]).mean()
    return pixels.mean(), grey.std(), saturation


def test_colour_factors_move_mean_contrast_and_saturation(fundus512, example) -> None:
    image, mask = fundus512
    fov = _fov(mask)
    identity = replay(image, mask, _neutral_illumination(example))
    assert np.array_equal(identity, image * fov[..., None].astype(np.uint8))
    mean0, std0, sat0 = _fov_stats(image, fov)
    c = example.color
    dark = replay(image, mask, _neutral_illumination(example, brightness=c.brightness))
    mean1, _, _ = _fov_stats(dark, fov)
    assert mean1 == pytest.approx(mean0 * c.brightness, rel=0.02)
    flat = replay(image, mask, _neutral_illumination(example, contrast=c.contrast))
    _, std2, _ = _fov_stats(flat, fov)
    assert std2 == pytest.approx(std0 * c.contrast, rel=0.05)
    vivid = replay(image, mask, _neutral_illumination(example, saturation=c.saturation))
    _, _, sat3 = _fov_stats(vivid, fov)
    assert sat3 > sat0 * (1 + 0.5 * (c.saturation - 1))
    # the example's own combination: darker, flatter, and more saturated than without its
    # saturation factor
    both = replay(image, mask, _neutral_illumination(example, **c.__dict__))
    grey = replay(image, mask, _neutral_illumination(example, **{**c.__dict__, "saturation": 1.0}))
    mean4, std4, sat4 = _fov_stats(both, fov)
    assert mean4 < mean0 and std4 < std0 and sat4 > _fov_stats(grey, fov)[2]


# ---- resolution scaling


def test_spots_stay_bright_at_1024() -> None:
    # the released constants at 1024 give k < 0 (dark spots) for radii above 39 px
    assert release_spot_amplitude(51, 512)[0] < 0
    rng = np.random.default_rng(0)
    radii = []
    for _ in range(100):
        record = sample_record(rng, "010", 1024)
        for spot in record.spots:
            radii.append(spot.radius)
            assert spot.amplitude > 0.05
            assert spot.amplitude == pytest.approx(
                release_spot_amplitude(spot.radius // 2, 512)[0], abs=0.02
            )
    assert max(radii) >= 48  # the large-radius range where the released formula turns dark


def test_degrade_at_1024_brightens_spot_centres() -> None:
    s = synth_fundus(1024, seed=2)
    out, record = degrade(s.image, s.mask, "010", sample_rng(0, "big", 0))
    clean = replay(s.image, s.mask, replace(record, spots=()))
    fov = _fov(s.mask)
    checked = 0
    for spot in record.spots:
        x, y = spot.center
        if fov[y, x] and clean[y, x].max() < 240:
            assert (out[y, x].astype(int) - clean[y, x]).min() > 0
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("size", [64, 256, 1024])
def test_sampled_geometry_scales_with_the_working_size(size: int) -> None:
    record = sample_record(np.random.default_rng(1), "111", size, fov_mean=0.4)
    scale = size / 512
    assert 0.4 * size - 1 <= record.hole.diameter <= 0.7 * size
    assert 384 * scale <= record.halo.dia_a <= 512 * scale
    assert 5 * scale <= record.blur.sigma <= 15 * scale
    for spot in record.spots:
        assert math.ceil(0.01 * size) <= spot.radius <= 0.05 * size


# ---- input validation


def test_bad_inputs_raise_clear_errors(fundus512, example) -> None:
    image, mask = fundus512
    rng = sample_rng(0, "z", 0)
    with pytest.raises(TypeError, match="uint8"):
        degrade(image.astype(np.float32), mask, "111", rng)
    with pytest.raises(ValueError, match="square"):
        degrade(image[:500], mask[:500], "111", rng)
    with pytest.raises(ValueError, match="does not match"):
        degrade(image, mask[:256, :256], "111", rng)
    with pytest.raises(ValueError, match="empty"):
        degrade(image, np.zeros_like(mask), "111", rng)
    with pytest.raises(RecordError, match="type_code"):
        degrade(image, mask, "000", rng)
    small = synth_fundus(256, seed=1)
    with pytest.raises(RecordError, match="size"):
        replay(small.image, small.mask, example)
    unresolved = sample_record(rng, "001", 512)
    with pytest.raises(RecordError, match=r"hole\.strength"):
        replay(image, mask, unresolved)


def test_results_do_not_share_the_engines_reused_buffers(fundus512) -> None:
    image, mask = fundus512
    first, record = degrade(image, mask, "111", sample_rng(5, "a", 0))
    kept = first.copy()
    other = synth_fundus(256, seed=3)  # another size in between, all types, both models
    for code in TYPE_CODES:
        for preset in ("cofe-release", "cofe-train"):
            degrade(other.image, other.mask, code, sample_rng(5, code, 1), preset=preset)
    again = replay(image, mask, record)
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_array_equal(again, first)


# ---- ablation replay: steps left out on purpose


def test_replay_skipping_the_hole_equals_a_zero_strength_hole(fundus512, example) -> None:
    image, mask = fundus512
    record = _only(example, "001")
    skipped = replay(image, mask, record, skip=("hole",))
    zero = replay(image, mask, _only(example, "001", hole=replace(example.hole, strength=0.0)))
    assert np.array_equal(skipped, zero)
    assert not np.array_equal(skipped, replay(image, mask, record))


def test_replay_skipping_nothing_is_the_plain_replay(fundus512) -> None:
    image, mask = fundus512
    out, record = degrade(image, mask, "111", sample_rng(5, "eye", 2))
    assert np.array_equal(replay(image, mask, record, skip=()), out)
    halo_left_out = replay(image, mask, record, skip=("halo",))
    assert not np.array_equal(halo_left_out, out)


def test_replay_rejects_an_unknown_step_by_name(fundus512, example) -> None:
    image, mask = fundus512
    with pytest.raises(ValueError, match="'vignette'"):
        replay(image, mask, example, skip=("vignette",))


def test_a_uint8_mask_of_zeros_and_ones_is_refused_as_not_0_255(fundus512) -> None:
    image, mask = fundus512
    ones = (mask > 127).astype(np.uint8)
    with pytest.raises(ValueError, match="must be 0/255") as info:
        degrade(image, ones, "111", sample_rng(0, "z", 0))
    assert "empty" not in str(info.value)
    # the same mask as bool (or times 255) is accepted and gives the same output
    as_bool, _ = degrade(image, ones.astype(bool), "111", sample_rng(0, "z", 0))
    scaled, _ = degrade(image, ones * 255, "111", sample_rng(0, "z", 0))
    np.testing.assert_array_equal(as_bool, scaled)


def test_replay_skipping_the_colour_equals_a_neutral_colour_jitter(fundus512, example) -> None:
    image, mask = fundus512
    record = _only(example, "001")
    skipped = replay(image, mask, record, skip=("color",))
    neutral = replace(example.color, brightness=1.0, contrast=1.0, saturation=1.0)
    assert np.array_equal(skipped, replay(image, mask, _only(example, "001", color=neutral)))
    assert not np.array_equal(skipped, replay(image, mask, record))
