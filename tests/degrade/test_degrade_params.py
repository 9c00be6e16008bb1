"""Records round-trip exactly through JSON and the released schema; bad input names the field."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from fundus_batch.degrade import (
    TYPE_CODES,
    BlurRecord,
    DegradationRecord,
    HoleRecord,
    RecordError,
    SpotRecord,
    sample_record,
)
from fundus_batch.degrade.presets import RELEASE_HALO_COLORS, make_odd, max_blur_kernel

# Section 2.9 of degradation-model.md: a real type-111 record of the released script.
EXAMPLE_111 = (
    '{"name": "13_left.jpeg", "type": "111", "params": {"illumination": {"color": '
    '{"brightness_factor": 0.7762, "contrast_factor": 0.7339, "saturation_factor": 1.2277}, '
    '"halo": {"num": 1, "center_a": [233, 289], "dia_a": 422.73, "center_b": [233, 289], '
    '"dia_b": 840.52}, "hole": {"center": [327, 279], "diameter_circle": 235, '
    '"brightness_factor": -0.2801, "rad_w": 163, "rad_h": 171, "sigma": 136.0}}, "spots": '
    '[{"radius": 9, "center": [339, 364], "rad_w": 7, "rad_h": 5, "sigma": 24.4}, {"radius": '
    '17, "center": [328, 412], "rad_w": 9, "rad_h": 9, "sigma": 37.2}], "blur": {"sigma": '
    '13.73, "rad_w": 5, "rad_h": 5}}}'
)


def _records() -> list[DegradationRecord]:
    out = []
    for i, code in enumerate(TYPE_CODES):
        for preset in ("cofe-release", "cofe-train"):
            rng = np.random.default_rng(100 + i)
            out.append(sample_record(rng, code, 512, preset, fov_mean=0.41))
    return out


@pytest.mark.parametrize("record", _records(), ids=lambda r: f"{r.preset}-{r.type_code}")
def test_json_round_trip_is_exact(record: DegradationRecord) -> None:
    again = DegradationRecord.from_json(record.to_json())
    assert again == record
    assert again.to_json() == record.to_json()
    assert DegradationRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_unresolved_hole_strength_round_trips_as_null() -> None:
    record = sample_record(np.random.default_rng(0), "001", 512)
    assert record.hole is not None and record.hole.strength is None
    assert record.hole.base is not None and record.hole.mix is not None
    assert DegradationRecord.from_json(record.to_json()) == record


def test_released_example_imports_with_derived_values() -> None:
    record = DegradationRecord.from_released(json.loads(EXAMPLE_111))
    assert record.type_code == "111" and record.model == "release" and record.size == 512
    assert record.color is not None and record.color.brightness == 0.7762
    halo = record.halo
    assert halo is not None and halo.style == 1 and halo.color == (141, 238, 238)
    # D = 2 max(233, 279, 289, 223) = 578; g = floor(|578 - 422.73|) = 155; sigma = 2g/3
    assert halo.kernel == 155 and halo.sigma == pytest.approx(2 * 155 / 3)
    hole = record.hole
    assert hole is not None and hole.strength == -0.2801 and (hole.k_w, hole.k_h) == (163, 171)
    assert record.spots is not None and [s.radius for s in record.spots] == [9, 17]
    r = 9
    k, beta, d = 14 / 25 + 1 - r / 25, 0.5 + r / 25, 0.3 * r / 25
    assert record.spots[0].amplitude == pytest.approx(k * (1 - np.exp(-beta * d)), rel=1e-12)
    assert record.blur is not None and (record.blur.k_w, record.blur.k_h) == (5, 5)
    assert record.flat_summary() == {
        "blur_sigma": 13.73,
        "n_spots": 2,
        "hole_strength": -0.2801,
        "brightness": 0.7762,
        "contrast": 0.7339,
        "saturation": 1.2277,
    }


def test_released_schema_round_trip() -> None:
    data = json.loads(EXAMPLE_111)
    record = DegradationRecord.from_released(data)
    assert record.to_released(name="13_left.jpeg") == data
    assert DegradationRecord.from_released(record.to_released()) == record
    assert DegradationRecord.from_any(data) == record
    assert DegradationRecord.from_any(record.to_dict()) == record


@pytest.mark.parametrize("code", TYPE_CODES)
def test_sampled_release_records_export_and_reimport(code: str) -> None:
    record = sample_record(np.random.default_rng(7), code, 512, fov_mean=0.5)
    back = DegradationRecord.from_released(record.to_released())
    # the released schema drops only the hole's raw draws and the FOV mean
    if record.hole is not None:
        assert back.hole is not None and back.hole.strength == record.hole.strength
        back = DegradationRecord(**{**back.__dict__, "hole": record.hole})
    assert back == record


def test_flat_summary_has_none_for_operators_that_did_not_run() -> None:
    record = sample_record(np.random.default_rng(1), "100", 512)
    summary = record.flat_summary()
    assert set(summary) == {
        "blur_sigma",
        "n_spots",
        "hole_strength",
        "brightness",
        "contrast",
        "saturation",
    }
    assert summary["blur_sigma"] is not None
    assert all(summary[k] is None for k in summary if k != "blur_sigma")


def test_train_records_have_no_released_form() -> None:
    record = sample_record(np.random.default_rng(1), "111", 512, "cofe-train")
    with pytest.raises(RecordError, match="model"):
        record.to_released()


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(type="112"), "released.type"),
        (lambda d: d["params"].update(extra=1), "released.params.extra"),
        (lambda d: d["params"].pop("blur"), "released.params.blur"),
        (
            lambda d: d["params"]["illumination"]["halo"].pop("num"),
            "released.params.illumination.halo.num",
        ),
        (
            lambda d: d["params"]["illumination"]["hole"].update(rad_w=164),
            "released.params.illumination.hole.rad_w",
        ),
        (
            lambda d: d["params"]["illumination"]["hole"].update(center=[1]),
            "released.params.illumination.hole.center",
        ),
        (
            lambda d: d["params"]["illumination"]["color"].update(brightness_factor="x"),
            "released.params.illumination.color.brightness_factor",
        ),
        (
            lambda d: d["params"]["illumination"]["halo"].update(center_b=[0, 0]),
            "released.params.illumination.halo.center_b",
        ),
        (lambda d: d["params"]["spots"][1].update(radius=2.5), "released.params.spots[1].radius"),
        (lambda d: d["params"]["spots"][0].update(colour=3), "released.params.spots[0].colour"),
    ],
)
def test_bad_released_records_name_the_field(mutate, field: str) -> None:
    data = json.loads(EXAMPLE_111)
    mutate(data)
    with pytest.raises(RecordError) as info:
        DegradationRecord.from_released(data)
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(type_code="000"), "type_code"),
        (lambda d: d.update(unknown=True), "unknown"),
        (lambda d: d.pop("size"), "size"),
        (lambda d: d.update(model="fancy"), "model"),
        (lambda d: d.update(blur=None), "blur"),
        (lambda d: d.update(color=None), "color"),
        (lambda d: d["hole"].update(k_h=4), "hole.k_h"),
        (lambda d: d["halo"].update(color=[1, 2]), "halo.color"),
        (lambda d: d["spots"][0].pop("amplitude"), "spots[0].amplitude"),
        (lambda d: d["spots"][0].update(haze=[1, 2]), "spots[0].haze"),
        (lambda d: d["blur"].update(sigma=float("nan")), "blur.sigma"),
    ],
)
def test_bad_records_name_the_field(mutate, field: str) -> None:
    data = sample_record(np.random.default_rng(3), "111", 512, fov_mean=0.4).to_dict()
    data = copy.deepcopy(data)
    mutate(data)
    with pytest.raises(RecordError) as info:
        DegradationRecord.from_dict(data)
    assert info.value.field == field


def test_unknown_keys_wrong_types_and_non_objects_read_plainly() -> None:
    data = sample_record(np.random.default_rng(3), "111", 512, fov_mean=0.4).to_dict()
    data["hole"]["zz"] = 1
    data["halo"]["center"] = ["1", 2]
    data["spots"][0] = 5
    with pytest.raises(RecordError) as info:
        DegradationRecord.from_dict(data)
    assert str(info.value) == (
        "halo.center[0]: Input should be a valid integer (got '1'); "
        "hole.zz: unknown field (got 1); "
        "spots[0]: expected an object (got int)"
    )
    with pytest.raises(RecordError, match=r"^<root>: expected an object \(got list\)$"):
        DegradationRecord.from_dict([data])


def test_sub_records_parse_alone_and_name_the_field_under_their_path() -> None:
    record = sample_record(np.random.default_rng(3), "111", 512, fov_mean=0.4)
    assert record.hole is not None and record.spots is not None
    assert HoleRecord.from_dict(record.hole.to_dict()) == record.hole
    assert SpotRecord.from_dict(record.spots[1].to_dict(), "spots[1]") == record.spots[1]
    with pytest.raises(RecordError) as info:
        SpotRecord.from_dict(record.spots[1].to_dict() | {"k_w": 4}, "spots[1]")
    assert info.value.field == "spots[1].k_w"


def test_invalid_json_text_is_a_record_error() -> None:
    with pytest.raises(RecordError, match="invalid JSON"):
        DegradationRecord.from_json("{not json")


def test_record_errors_list_every_bad_field_with_the_value_it_got() -> None:
    data = sample_record(np.random.default_rng(3), "111", 512, fov_mean=0.4).to_dict()
    data["hole"]["k_h"] = 4
    data["spots"][1]["radius"] = 2.5
    with pytest.raises(RecordError) as info:
        DegradationRecord.from_json(json.dumps(data))
    assert info.value.field == "hole.k_h"
    assert str(info.value) == (
        "hole.k_h: kernel size must be an odd integer >= 1 (got 4); "
        "spots[1].radius: Input should be a valid integer (got 2.5)"
    )


@pytest.mark.parametrize(
    ("value", "why"),
    [(True, "valid integer"), ("512", "valid integer"), (0, "greater than or equal to 1")],
)
def test_record_size_must_be_a_positive_integer(value: object, why: str) -> None:
    data = sample_record(np.random.default_rng(3), "001", 512).to_dict() | {"size": value}
    with pytest.raises(RecordError, match=why) as info:
        DegradationRecord.from_dict(data)
    assert info.value.field == "size"


def test_released_sections_must_match_the_type_code() -> None:
    data = json.loads(EXAMPLE_111)
    data["type"] = "001"  # illumination only: spots and blur are not allowed
    with pytest.raises(RecordError) as info:
        DegradationRecord.from_released(data)
    assert info.value.field == "released.params.spots"
    assert str(info.value).startswith("released.params.spots: not allowed for type 001")
    assert "released.params.blur: not allowed for type 001" in str(info.value)
    del data["params"]["illumination"]
    with pytest.raises(RecordError, match="required for type 001") as info:
        DegradationRecord.from_released(data)
    assert info.value.field == "released.params.illumination"


def test_a_released_record_that_is_not_an_object_is_a_record_error() -> None:
    with pytest.raises(RecordError, match=r"released: expected an object \(got list\)"):
        DegradationRecord.from_released([1, 2])


@pytest.mark.parametrize("seed", range(5))
def test_json_text_survives_parsing_byte_for_byte(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for code in TYPE_CODES:
        text = sample_record(rng, code, 512, fov_mean=0.3 + seed / 10).to_json()
        assert DegradationRecord.from_json(text).to_json() == text
        again = DegradationRecord.from_json(text.encode())
        assert type(again.size) is int and all(
            isinstance(s.center[0], int) for s in again.spots or ()
        )


# ---- geometry bounds (relative to the working size) and the halo style table


def _released_with(mutate) -> dict:
    data = json.loads(EXAMPLE_111)
    mutate(data)
    return data


def _ill(d: dict) -> dict:
    return d["params"]["illumination"]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda d: d["params"]["spots"][1].update(center=[2**63, 5]),
            "released.params.spots[1].center",
        ),
        (
            lambda d: _ill(d)["hole"].update(center=[5, -(2**63)]),
            "released.params.illumination.hole.center",
        ),
        (
            lambda d: _ill(d)["hole"].update(diameter_circle=2**64),
            "released.params.illumination.hole.diameter_circle",
        ),
        (lambda d: _ill(d)["halo"].update(dia_b=1e30), "released.params.illumination.halo.dia_b"),
        (lambda d: _ill(d)["halo"].update(dia_a=1e30), "released.params.illumination.halo.dia_a"),
        (
            lambda d: _ill(d)["halo"].update(center_a=[10**400, 0], center_b=[10**400, 0]),
            "released.params.illumination.halo.center_a",
        ),
        (
            lambda d: d["params"]["spots"][0].update(radius=10**400),
            "released.params.spots[0].radius",
        ),
        (lambda d: d["params"]["blur"].update(rad_w=2**31 + 1), "released.params.blur.rad_w"),
        (
            lambda d: _ill(d)["hole"].update(rad_h=2 * 4 * 512 + 1),
            "released.params.illumination.hole.rad_h",
        ),
    ],
)
def test_released_geometry_far_outside_the_image_is_a_record_error_naming_the_field(
    mutate, field: str
) -> None:
    with pytest.raises(RecordError) as info:
        DegradationRecord.from_released(_released_with(mutate))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["spots"][1].update(center=[2**32 + 5, 5]), "spots[1].center"),
        (lambda d: d["hole"].update(center=[2**63, 5]), "hole.center"),
        (lambda d: d["hole"].update(diameter=2**64), "hole.diameter"),
        (lambda d: d["halo"].update(dia_b=1e30), "halo.dia_b"),
        (lambda d: d["halo"].update(kernel=4 * 512 + 3), "halo.kernel"),
        (lambda d: d["spots"][0].update(radius=8 * 512 + 1), "spots[0].radius"),
        (lambda d: d["spots"][0].update(k_h=2**31 + 1), "spots[0].k_h"),
        (lambda d: d["blur"].update(k_w=2**31 + 1), "blur.k_w"),
    ],
)
def test_own_geometry_far_outside_the_image_is_a_record_error_naming_the_field(
    mutate, field: str
) -> None:
    data = sample_record(np.random.default_rng(3), "111", 512, fov_mean=0.4).to_dict()
    mutate(data)
    with pytest.raises(RecordError) as info:
        DegradationRecord.from_dict(data)
    assert info.value.field == field


@pytest.mark.parametrize("size", [64, 512, 4096])
def test_geometry_bounds_are_4_8_and_4_plus_1_times_the_size_inclusive(size: int) -> None:
    def released(spot: dict) -> dict:
        base = {"radius": 9, "center": [10, 10], "rad_w": 3, "rad_h": 3, "sigma": 1.0}
        return {"type": "010", "params": {"spots": [{**base, **spot}]}}

    edge = {"radius": 8 * size, "center": [-4 * size, 4 * size], "rad_w": 4 * size + 1}
    record = DegradationRecord.from_released(released(edge), size=size)
    assert record.spots is not None and record.spots[0].center == (-4 * size, 4 * size)
    assert DegradationRecord.from_dict(record.to_dict()) == record
    for beyond in (
        {"radius": 8 * size + 1},
        {"center": [4 * size + 1, 0]},
        {"center": [0, -4 * size - 1]},
        {"rad_w": 4 * size + 3},
    ):
        with pytest.raises(RecordError, match=r"released\.params\.spots\[0\]\."):
            DegradationRecord.from_released(released(beyond), size=size)


@pytest.mark.parametrize(("size", "most"), [(512, 15), (1024, 31), (4096, 121)])
def test_blur_kernels_are_bounded_by_twice_the_specs_blur_scaled_to_the_size(
    size: int, most: int
) -> None:
    """A hand-edited 4 size + 1 blur kernel (16,385 px at 4096) took over an hour to replay."""
    data = sample_record(np.random.default_rng(3), "100", size).to_dict()
    data["blur"].update(k_w=most, k_h=most)
    assert DegradationRecord.from_dict(data).blur == BlurRecord(data["blur"]["sigma"], most, most)
    for field in ("k_w", "k_h"):
        too_big = copy.deepcopy(data)
        too_big["blur"][field] = 4 * size + 1
        with pytest.raises(RecordError) as info:
            DegradationRecord.from_dict(too_big)
        assert info.value.field == f"blur.{field}"
        assert str(info.value) == (
            f"blur.{field}: must be at most {most} at size {size}, the kernel of a blur sigma of "
            f"30 px at 512 (got {4 * size + 1})"
        )


def test_a_released_blur_kernel_beyond_the_bound_is_refused_naming_the_field() -> None:
    released = {"type": "100", "params": {"blur": {"sigma": 9.0, "rad_w": 15, "rad_h": 15}}}
    assert DegradationRecord.from_released(released).blur == BlurRecord(9.0, 15, 15)
    released["params"]["blur"]["rad_h"] = 17
    with pytest.raises(RecordError) as info:
        DegradationRecord.from_released(released)
    assert info.value.field == "released.params.blur.rad_h"
    assert "(got 17)" in str(info.value)


@pytest.mark.parametrize("preset", ["cofe-release", "cofe-train"])
@pytest.mark.parametrize("size", [64, 100, 512, 4096])
def test_built_in_presets_draw_blur_kernels_within_the_spec_and_the_bound(
    preset: str, size: int
) -> None:
    spec_most = make_odd(math.floor(15 * size / 512 / 2))  # sigma <= 15 px at 512 (spec 2.5)
    for seed in range(40):
        record = sample_record(np.random.default_rng(seed), "100", size, preset)
        assert record.blur is not None
        assert max(record.blur.k_w, record.blur.k_h) <= spec_most <= max_blur_kernel(size)


def test_a_released_halo_whose_derived_kernel_is_too_large_is_refused() -> None:
    # D = 2 max(2048, 512 - 2048, ...) = 4096 and dia_a = 0: g = 4096 > 4 x 512 + 1
    data = _released_with(
        lambda d: _ill(d)["halo"].update(center_a=[2048, 2048], center_b=[2048, 2048], dia_a=0.0)
    )
    with pytest.raises(RecordError) as info:
        DegradationRecord.from_released(data)
    assert info.value.field == "released.params.illumination.halo"
    assert "4097" in str(info.value)


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "512"])
def test_from_released_with_a_bad_size_is_a_record_error_naming_size(size: object) -> None:
    with pytest.raises(RecordError) as info:
        DegradationRecord.from_released(json.loads(EXAMPLE_111), size=size)  # type: ignore[arg-type]
    assert info.value.field == "size"


@pytest.mark.parametrize(
    ("preset", "style", "color", "field"),
    [
        ("cofe-release", 5, [141, 238, 238], "halo.style"),
        ("cofe-release", 3, [141, 238, 238], "halo.style"),
        ("cofe-release", 2, [141, 238, 238], "halo.color"),
        ("cofe-train", 0, [251, 249, 246], "halo.color"),
    ],
)
def test_built_in_preset_records_must_hold_that_presets_halo_colour_for_the_style(
    preset: str, style: int, color: list[int], field: str
) -> None:
    data = sample_record(np.random.default_rng(3), "001", 512, preset, fov_mean=0.4).to_dict()
    data["halo"].update(style=style, color=color)
    with pytest.raises(RecordError) as info:
        DegradationRecord.from_dict(data)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("style", "color", "field"),
    [(5, [141, 238, 238], "halo.style"), (2, [141, 238, 238], "halo.color")],
)
def test_to_released_refuses_a_halo_the_released_schema_cannot_express(
    style: int, color: list[int], field: str
) -> None:
    data = sample_record(np.random.default_rng(3), "001", 512, fov_mean=0.4).to_dict()
    data.update(preset="my-own")  # a custom preset's table is unknown: parsing accepts it
    data["halo"].update(style=style, color=color)
    record = DegradationRecord.from_dict(data)
    with pytest.raises(RecordError) as info:
        record.to_released()
    assert info.value.field == field


@pytest.mark.parametrize("style", [0, 1, 2])
def test_every_release_halo_style_exports_and_reimports_the_same_record(style: int) -> None:
    data = sample_record(np.random.default_rng(3), "001", 512, fov_mean=0.4).to_dict()
    data["halo"].update(style=style, color=list(RELEASE_HALO_COLORS[style]))
    record = DegradationRecord.from_dict(data)
    again = DegradationRecord.from_released(json.loads(json.dumps(record.to_released())))
    assert again.halo == record.halo
