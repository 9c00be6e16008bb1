"""Presets: the two built-in ones, custom ranges from a dict, and validation errors."""

from __future__ import annotations

import numpy as np
import pytest

from fundus_batch.degrade import (
    PRESETS,
    Preset,
    PresetError,
    get_preset,
    sample_record,
    sample_rng,
)
from fundus_batch.degrade.presets import max_blur_kernel


def test_builtin_presets() -> None:
    assert set(PRESETS) == {"cofe-release", "cofe-train"}
    assert get_preset("cofe-release").model == "release"
    assert get_preset("cofe-train").model == "train"
    assert get_preset(PRESETS["cofe-train"]) is PRESETS["cofe-train"]
    with pytest.raises(PresetError, match="unknown preset"):
        get_preset("nope")


def test_custom_preset_from_dict_inherits_the_model_defaults() -> None:
    mild = Preset.from_dict({"name": "mild", "blur_sigma": [2, 6], "spot_count": [1, 3]})
    assert mild.model == "release" and mild.blur_sigma == (2.0, 6.0) and mild.spot_count == (1, 3)
    assert mild.brightness == PRESETS["cofe-release"].brightness
    train_like = Preset.from_dict({"name": "t2", "model": "train", "spot_count": [1, 2]})
    assert train_like.halo_colors == PRESETS["cofe-train"].halo_colors
    assert Preset.from_dict(mild.to_dict()) == mild


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "x", "blur_sigma": [6, 2]}, "blur_sigma"),
        ({"name": "x", "blur_speed": [1, 2]}, "blur_speed"),
        ({"name": "x", "brightness": [-0.1, 1.0]}, "brightness"),
        ({"name": "x", "spot_count": [1.5, 3]}, "spot_count[0]"),
        ({"name": "x", "spot_kernel": 4}, "spot_kernel"),
        ({"name": "x", "model": "other"}, "model"),
        ({"name": ""}, "name"),
        ({"blur_sigma": [1, 2]}, "name"),
        ({"name": "x", "halo_colors": [[1, 2, 300]]}, "halo_colors[0][2]"),
        ({"name": "x", "halo_gamma": [0.5]}, "halo_gamma"),
        ({"name": "x", "hole_diameter": [0.5, 1.5]}, "hole_diameter"),
        ({"name": "x", "base": "unknown"}, "base"),
    ],
)
def test_invalid_presets_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(PresetError) as info:
        Preset.from_dict(data)
    assert info.value.field == field


def test_custom_ranges_bound_the_sampled_parameters() -> None:
    narrow = Preset.from_dict(
        {"name": "narrow", "brightness": [0.9, 0.95], "spot_count": [3, 3], "blur_sigma": [2, 3]}
    )
    rng = np.random.default_rng(0)
    for _ in range(50):
        record = sample_record(rng, "111", 512, narrow, fov_mean=0.4)
        assert 0.9 <= record.color.brightness <= 0.95
        assert len(record.spots) == 3
        assert 2 <= record.blur.sigma <= 3
        assert record.preset == "narrow"


def test_building_a_preset_directly_is_validated_like_from_dict() -> None:
    with pytest.raises(PresetError) as info:
        Preset(name="x", blur_sigma=(6.0, 2.0))
    assert info.value.field == "blur_sigma"
    assert str(info.value) == "blur_sigma: low > high (got (6.0, 2.0))"


def test_preset_errors_list_every_bad_field() -> None:
    with pytest.raises(PresetError) as info:
        Preset.from_dict({"name": "x", "spot_kernel": 4, "blur_speed": 1, "contrast": "high"})
    text = str(info.value)
    assert "contrast: expected a pair of numbers [low, high] (got 'high')" in text
    assert "spot_kernel: must be an odd positive integer (got 4)" in text
    assert "blur_speed: unknown field (got 1)" in text


def test_presets_are_frozen_and_round_trip_their_dict() -> None:
    preset = get_preset("cofe-train")
    with pytest.raises(PresetError, match="frozen"):
        preset.name = "other"  # type: ignore[misc]
    assert Preset.from_dict(preset.to_dict()) == preset
    assert preset.to_dict()["halo_colors"] == [list(c) for c in preset.halo_colors]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "x", "halo_inner": [1.0, 4.5]}, "halo_inner"),
        ({"name": "x", "halo_outer_min": 4.5}, "halo_outer_min"),
        ({"name": "x", "halo_gamma": [0.5, 3.5, 0.5]}, "halo_gamma[1]"),
        ({"name": "x", "hole_kernel": [0.5, 4.5]}, "hole_kernel"),
        ({"name": "x", "blur_sigma": [5, 30.001]}, "blur_sigma"),
        ({"name": "x", "model": "train", "spot_kernel": 2049}, "spot_kernel"),
    ],
)
def test_length_ranges_stop_where_a_draw_could_leave_the_record_bounds(
    data: dict, field: str
) -> None:
    with pytest.raises(PresetError) as info:
        Preset.from_dict(data)
    assert info.value.field == field


@pytest.mark.parametrize("model", ["release", "train"])
def test_presets_at_their_upper_limits_never_sample_a_record_the_bounds_refuse(
    model: str,
) -> None:
    widest = Preset.from_dict(
        {
            "name": "widest",
            "model": model,
            "halo_inner": [4.0, 4.0],
            "halo_outer_min": 4.0,
            "halo_gamma": [3.0, 3.0, 3.0],
            "halo_center_jitter": 0.4999,
            "halo_first_style_below": None,
            "halo_sigma": [1.0, 1.0],
            "hole_diameter": [1.0, 1.0],
            "hole_center_x": [0.0, 1.0],
            "hole_center_y": [0.0, 1.0],
            "hole_kernel": [4.0, 4.0],
            "spot_radius": [0.2, 0.45],
            "spot_kernel": 2047,
            "blur_sigma": [29.9, 30.0],
        }
    )
    for size in (32, 33, 64, 100, 511, 512, 1000, 4096):
        for variant in range(8):
            # a refused record would raise RecordError from the record's own checks
            record = sample_record(sample_rng(0, str(size), variant), "111", size, widest, 0.3)
            assert record.blur is not None and record.blur.k_w <= max_blur_kernel(size)


@pytest.mark.parametrize(
    "ranges",
    [{"spot_radius": [0.5, 0.5]}, {"hole_center_x": [0.0, 0.0]}, {"hole_center_y": [1.0, 1.0]}],
)
@pytest.mark.parametrize("size", [64, 256])
def test_a_preset_at_the_ends_of_its_ranges_draws_at_every_size(ranges: dict, size: int) -> None:
    preset = Preset.from_dict({"name": "edge", **ranges})
    record = sample_record(sample_rng(0, "x", 0), "111", size, preset, fov_mean=0.4)
    assert all(0 < c < size for c in record.hole.center)
    assert all(s.radius + 1 <= c <= size - s.radius - 1 for s in record.spots for c in s.center)


def test_a_custom_preset_may_not_take_a_built_in_name() -> None:
    with pytest.raises(PresetError, match="name: 'cofe-release' is a built-in preset"):
        Preset.from_dict({"name": "cofe-release", "blur_sigma": [1.0, 2.0]})
    assert Preset.from_dict({"name": "cofe-release"}) == PRESETS["cofe-release"]


def test_a_preset_derived_with_model_copy_is_checked_before_it_degrades_or_configures() -> None:
    """Preset is frozen, so a notebook derives one with model_copy(update=...), which skips
    pydantic's checks: a negative brightness gave an all-black FOV and a record that its own
    JSON reader refuses."""
    from fundus_batch.config import RunConfig
    from fundus_batch.degrade import degrade, sample_rng
    from fundus_batch.degrade.presets import PresetError, get_preset
    from fundus_batch.synth import synth_fundus

    bad = get_preset("cofe-release").model_copy(update={"name": "x", "brightness": (-0.5, -0.1)})
    s = synth_fundus(64, seed=1)
    with pytest.raises(PresetError, match=r"brightness: values must be >= 0"):
        degrade(s.image, s.mask, "001", sample_rng(0, "a", 0), preset=bad)
    with pytest.raises(ValueError, match=r"custom_preset\.brightness"):
        RunConfig(manifest="m.csv", out="o", custom_preset=bad, preset="x")
    good = get_preset("cofe-release").model_copy(update={"name": "y"})
    image, _ = degrade(s.image, s.mask, "001", sample_rng(0, "a", 0), preset=good)
    same, _ = degrade(s.image, s.mask, "001", sample_rng(0, "a", 0), preset="cofe-release")
    assert np.array_equal(image, same)
