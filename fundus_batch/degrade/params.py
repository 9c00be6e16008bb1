"""Typed degradation records: every sampled parameter, exact JSON, and the released schema.

A :class:`DegradationRecord` holds everything needed to redo one degradation without
randomness. ``to_dict``/``to_json`` and ``from_dict``/``from_json`` round-trip exactly;
``to_released``/``from_released`` speak the JSON schema written by the released script
(degradation-model.md section 2.9), whose derived values (halo kernel and sigma, spot
amplitude) are recomputed on import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from fundus_batch.validation import (
    FieldProblem,
    Finite,
    Int,
    field_problems,
    first_and_rest,
    length,
    validate,
)

from .presets import (
    CENTER_REACH,
    MAX_BLUR_SIGMA,
    MAX_KERNEL_FACTOR,
    MAX_LENGTH_FACTOR,
    MODELS,
    PRESETS,
    RELEASE_HALO_COLORS,
    max_blur_kernel,
    release_halo_blur,
    release_spot_amplitude,
)

__all__ = [
    "TYPE_CODES",
    "BlurRecord",
    "ColorRecord",
    "DegradationRecord",
    "HaloRecord",
    "HoleRecord",
    "RecordError",
    "SpotRecord",
    "type_groups",
]

RecordT = TypeVar("RecordT")
SubT = TypeVar("SubT", bound="_Sub")

TYPE_CODES = ("001", "010", "011", "100", "101", "110", "111")
"""The seven degradation types: bits (blur, spots, illumination) as in the released code."""


class RecordError(ValueError):
    """A malformed degradation record; ``field`` is the dotted path of the offending entry."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def type_groups(type_code: str) -> tuple[bool, bool, bool]:
    """(illumination, spots, blur) flags of a type code; RecordError if it is not one of seven."""
    if type_code not in TYPE_CODES:
        raise RecordError("type_code", f"must be one of {TYPE_CODES}, got {type_code!r}")
    return type_code[2] == "1", type_code[1] == "1", type_code[0] == "1"


# ----------------------------------------------------------------------------------------------
# field constraints, declared once: the records' annotations (checked by pydantic on JSON input,
# plain annotations when a record is built in Python) and the released schema's models


def _odd(value: int) -> int:
    if value < 1 or value % 2 == 0:
        raise ValueError("kernel size must be an odd integer >= 1")
    return value


TypeCode = Literal["001", "010", "011", "100", "101", "110", "111"]
ModelName = Literal["release", "train"]
Odd = Annotated[Int, AfterValidator(_odd)]
Count = Annotated[Int, Field(ge=0)]
NonNeg = Annotated[Finite, Field(ge=0.0)]
Point = Annotated[tuple[Int, Int], length(2, "[x, y]")]
Channel = Annotated[Int, Field(ge=0, le=255)]
RGB = Annotated[tuple[Channel, Channel, Channel], length(3, "[R, G, B]")]
Haze = Annotated[tuple[Finite, Finite, Finite], length(3, "[k, beta, d]")]


class _Json(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _ReleasedColor(_Json):
    brightness_factor: NonNeg
    contrast_factor: NonNeg
    saturation_factor: NonNeg


class _ReleasedHalo(_Json):
    num: Annotated[Int, Field(ge=0, lt=len(RELEASE_HALO_COLORS))]
    center_a: Point
    dia_a: NonNeg
    center_b: Point
    dia_b: NonNeg

    @field_validator("center_b")
    @classmethod
    def _concentric(cls, value: Point, info: ValidationInfo) -> Point:
        if "center_a" in info.data and value != info.data["center_a"]:
            raise ValueError("must equal center_a (the rings are concentric)")
        return value


class _ReleasedHole(_Json):
    center: Point
    diameter_circle: Count
    brightness_factor: Finite
    rad_w: Odd
    rad_h: Odd
    sigma: NonNeg


class _ReleasedIllumination(_Json):
    color: _ReleasedColor
    halo: _ReleasedHalo
    hole: _ReleasedHole


class _ReleasedSpot(_Json):
    radius: Count
    center: Point
    rad_w: Odd
    rad_h: Odd
    sigma: NonNeg


class _ReleasedBlur(_Json):
    sigma: NonNeg
    rad_w: Odd
    rad_h: Odd


class _ReleasedParams(_Json):
    """The operator sections; the type code (validation context ``type``) says which must exist."""

    illumination: _ReleasedIllumination | None = Field(None, validate_default=True)
    spots: list[_ReleasedSpot] | None = Field(None, validate_default=True)
    blur: _ReleasedBlur | None = Field(None, validate_default=True)

    @field_validator("illumination", "spots", "blur")
    @classmethod
    def _wanted(cls, value: Any, info: ValidationInfo) -> Any:
        type_code = (info.context or {}).get("type")
        if type_code in TYPE_CODES:
            on = dict(zip(("illumination", "spots", "blur"), type_groups(type_code), strict=True))
            if on[info.field_name or ""] and value is None:
                raise ValueError(f"required for type {type_code}")
            if not on[info.field_name or ""] and value is not None:
                raise ValueError(f"not allowed for type {type_code}")
        return value


class _Released(_Json):
    name: str | None = None
    type: TypeCode
    params: _ReleasedParams


# ----------------------------------------------------------------------------------------------
# geometry bounds relative to the working size (a huge coordinate, diameter or kernel size would
# overflow or wrap around in the operators' integer arithmetic, or make OpenCV refuse it)

Geometry = Literal["point", "length", "kernel", "blur_kernel"]


def _check_geometry(path: str, kind: Geometry, value: Any, size: int) -> None:
    """RecordError naming ``path`` unless ``value`` lies within the bound of ``kind``."""
    if kind == "point":
        reach = CENTER_REACH * size
        if any(abs(v) > reach for v in value):
            raise RecordError(
                path,
                f"coordinates must lie within [-{reach}, {reach}] ({CENTER_REACH} x size "
                f"{size}), got {_plain(value)}",
            )
    elif kind == "length":
        most = MAX_LENGTH_FACTOR * size
        if value > most:
            raise RecordError(
                path, f"must be at most {most} ({MAX_LENGTH_FACTOR} x size {size}), got {value}"
            )
    elif kind == "blur_kernel":
        most = max_blur_kernel(size)
        if value > most:
            raise RecordError(
                path,
                f"must be at most {most} at size {size}, the kernel of a blur sigma of "
                f"{MAX_BLUR_SIGMA:g} px at 512 (got {value})",
            )
    else:
        most = MAX_KERNEL_FACTOR * size + 1
        if value > most:
            raise RecordError(
                path,
                f"kernel size must be at most {most} ({MAX_KERNEL_FACTOR} x size {size} + 1), "
                f"got {value}",
            )


def _check_size(size: Any) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise RecordError("size", f"must be an integer >= 1, got {size!r}")


def _record_error(problems: list[FieldProblem]) -> RecordError:
    return RecordError(*first_and_rest(problems))


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _parse(cls: type[RecordT], data: Any, path: str = "") -> RecordT:
    """Validate JSON data into the record dataclass ``cls`` (RecordError names the field)."""
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    try:
        record: RecordT = adapter.validate_python(data)
    except ValidationError as exc:
        errors = exc.errors()
        cause = errors[0].get("ctx", {}).get("error") if len(errors) == 1 else None
        if isinstance(cause, RecordError):  # raised by DegradationRecord.__post_init__
            raise cause from None
        raise _record_error(field_problems(exc, path)) from None
    return record


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class _Sub:
    """JSON helpers shared by the sub-records (dataclass field names are the JSON keys)."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    json_path: ClassVar[str]
    """Where the record sits in a degradation record's JSON (error messages name it)."""
    geometry: ClassVar[tuple[tuple[str, Geometry], ...]] = ()
    """Fields bounded relative to the working size, and how (see ``_check_geometry``)."""

    def check_geometry(self, path: str, size: int) -> None:
        """RecordError naming ``path.field`` for a coordinate, length or kernel out of bounds."""
        for name, kind in self.geometry:
            _check_geometry(f"{path}.{name}", kind, getattr(self, name), size)

    @classmethod
    def from_dict(cls: type[SubT], d: Any, path: str | None = None) -> SubT:
        """Parse and validate (RecordError names the field under ``path``, by default the
        record's ``json_path``)."""
        return _parse(cls, d, cls.json_path if path is None else path)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with lists for tuples."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# sub-records


@dataclass(frozen=True)
class ColorRecord(_Sub):
    """PIL ImageEnhance factors, applied in this order."""

    json_path: ClassVar[str] = "color"

    brightness: NonNeg
    contrast: NonNeg
    saturation: NonNeg


@dataclass(frozen=True)
class HaloRecord(_Sub):
    """Coloured ring between diameters ``dia_a`` and ``dia_b`` around ``center`` (x, y)."""

    json_path: ClassVar[str] = "halo"
    geometry: ClassVar[tuple[tuple[str, Geometry], ...]] = (
        ("center", "point"),
        ("dia_a", "length"),
        ("dia_b", "length"),
        ("kernel", "kernel"),
    )

    style: Count
    color: RGB
    center: Point
    dia_a: NonNeg
    dia_b: NonNeg
    kernel: Odd
    sigma: NonNeg


@dataclass(frozen=True)
class HoleRecord(_Sub):
    """Dark blurred disc. ``strength`` is the final additive factor (None: not yet resolved).

    ``base`` and ``mix`` are the release model's raw draws (b0 and the unit uniform that places
    the strength inside [b0 - 0.06 mu, b0 - 0.05 mu]); ``fov_mean`` is the mu that was used.
    """

    json_path: ClassVar[str] = "hole"
    geometry: ClassVar[tuple[tuple[str, Geometry], ...]] = (
        ("center", "point"),
        ("diameter", "length"),
        ("k_w", "kernel"),
        ("k_h", "kernel"),
    )

    center: Point
    diameter: Count
    k_w: Odd
    k_h: Odd
    sigma: NonNeg
    strength: Finite | None
    fov_mean: Finite | None = None
    base: Finite | None = None
    mix: Finite | None = None


@dataclass(frozen=True)
class SpotRecord(_Sub):
    """One bright blurred spot: disc of radius ``radius // 2`` at ``center`` with ``amplitude``.

    ``haze`` = (k, beta, d) of the amplitude model a = k (1 - exp(-beta d)).
    """

    json_path: ClassVar[str] = "spots[0]"
    geometry: ClassVar[tuple[tuple[str, Geometry], ...]] = (
        ("radius", "length"),
        ("center", "point"),
        ("k_w", "kernel"),
        ("k_h", "kernel"),
    )

    radius: Count
    center: Point
    k_w: Odd
    k_h: Odd
    sigma: NonNeg
    amplitude: Finite
    haze: Haze


@dataclass(frozen=True)
class BlurRecord(_Sub):
    """Truncated Gaussian blur with kernel (k_w, k_h) and ``sigma``."""

    json_path: ClassVar[str] = "blur"
    geometry: ClassVar[tuple[tuple[str, Geometry], ...]] = (
        ("k_w", "blur_kernel"),
        ("k_h", "blur_kernel"),
    )

    sigma: NonNeg
    k_w: Odd
    k_h: Odd


# ----------------------------------------------------------------------------------------------
# the record


@dataclass(frozen=True)
class DegradationRecord:
    """All parameters of one degraded variant.

    ``preset`` names the preset it was drawn from (provenance); ``model`` (``release`` or
    ``train``) decides the operator order and the final FOV multiplication at replay. ``size``
    is the working side in pixels.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    type_code: TypeCode
    preset: Annotated[str, Strict(), Field(min_length=1)]
    model: ModelName
    size: Annotated[Int, Field(ge=1)]
    color: ColorRecord | None = None
    halo: HaloRecord | None = None
    hole: HoleRecord | None = None
    spots: tuple[SpotRecord, ...] | None = None
    blur: BlurRecord | None = None

    def __post_init__(self) -> None:
        illumination, spots, blur = type_groups(self.type_code)
        if self.model not in MODELS:
            raise RecordError("model", f"must be one of {MODELS}, got {self.model!r}")
        if not isinstance(self.preset, str) or not self.preset:
            raise RecordError("preset", f"must be a non-empty string, got {self.preset!r}")
        _check_size(self.size)
        for name, wanted in (
            ("color", illumination),
            ("halo", illumination),
            ("hole", illumination),
            ("spots", spots),
            ("blur", blur),
        ):
            present = getattr(self, name) is not None
            if present != wanted:
                state = "required" if wanted else "not allowed"
                raise RecordError(name, f"{state} for type {self.type_code}")
        if self.spots is not None and not isinstance(self.spots, tuple):
            object.__setattr__(self, "spots", tuple(self.spots))
        for sub in (self.halo, self.hole, self.blur):
            if sub is not None:
                sub.check_geometry(sub.json_path, self.size)
        for i, spot in enumerate(self.spots or ()):
            spot.check_geometry(f"spots[{i}]", self.size)

    # ---- own schema

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return {
            "type_code": self.type_code,
            "preset": self.preset,
            "model": self.model,
            "size": self.size,
            "color": None if self.color is None else self.color.to_dict(),
            "halo": None if self.halo is None else self.halo.to_dict(),
            "hole": None if self.hole is None else self.hole.to_dict(),
            "spots": None if self.spots is None else [s.to_dict() for s in self.spots],
            "blur": None if self.blur is None else self.blur.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Any) -> DegradationRecord:
        """Parse and validate a dict written by :meth:`to_dict` (RecordError names the field).

        A record of a built-in preset must have that preset's halo colour for its style.
        """
        record = _parse(cls, d)
        record._check_halo_table()
        return record

    def _check_halo_table(self) -> None:
        """RecordError unless the halo style and colour are an entry of the built-in preset's
        table (records of custom presets are not checked: their table is not known here)."""
        preset = PRESETS.get(self.preset)
        if self.halo is None or preset is None or preset.model != self.model:
            return
        _check_halo_style(self.halo, preset.halo_colors, f"preset {self.preset}")

    def to_json(self) -> str:
        """Compact JSON text; floats round-trip exactly."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> DegradationRecord:
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError("record", f"invalid JSON: {exc}") from None
        return cls.from_dict(data)

    # ---- released schema (degradation-model.md 2.9)

    def to_released(self, name: str | None = None) -> dict[str, Any]:
        """The released script's ``{"name", "type", "params"}`` dict (name only if given).

        Only release-model records can be expressed in that schema; the hole strength must
        be resolved, and the halo colour must be the released colour of its style (the schema
        stores only the style).
        """
        if self.model != "release":
            raise RecordError("model", "only release-model records have a released-schema form")
        params: dict[str, Any] = {}
        if self.color is not None and self.halo is not None and self.hole is not None:
            c, h, o = self.color, self.halo, self.hole
            if o.strength is None:
                raise RecordError("hole.strength", "unresolved (no FOV mean was applied)")
            # the schema stores only the style ("num"); the importer takes the colour from it
            _check_halo_style(h, RELEASE_HALO_COLORS, "the released schema")
            params["illumination"] = {
                "color": {
                    "brightness_factor": c.brightness,
                    "contrast_factor": c.contrast,
                    "saturation_factor": c.saturation,
                },
                "halo": {
                    "num": h.style,
                    "center_a": list(h.center),
                    "dia_a": h.dia_a,
                    "center_b": list(h.center),
                    "dia_b": h.dia_b,
                },
                "hole": {
                    "center": list(o.center),
                    "diameter_circle": o.diameter,
                    "brightness_factor": o.strength,
                    "rad_w": o.k_w,
                    "rad_h": o.k_h,
                    "sigma": o.sigma,
                },
            }
        if self.spots is not None:
            params["spots"] = [
                {
                    "radius": s.radius,
                    "center": list(s.center),
                    "rad_w": s.k_w,
                    "rad_h": s.k_h,
                    "sigma": s.sigma,
                }
                for s in self.spots
            ]
        if self.blur is not None:
            params["blur"] = {
                "sigma": self.blur.sigma,
                "rad_w": self.blur.k_w,
                "rad_h": self.blur.k_h,
            }
        out: dict[str, Any] = {"type": self.type_code, "params": params}
        if name is not None:
            out = {"name": name, **out}
        return out

    @classmethod
    def from_released(cls, d: Any, size: int = 512) -> DegradationRecord:
        """Import a released-script JSON dict made at working size ``size``.

        The halo kernel and sigma and the spot amplitudes are recomputed from the stored
        geometry with the release-model formulas. Geometry is bounded relative to ``size``
        (see ``_check_geometry``); a RecordError names the released field.
        """
        _check_size(size)
        type_code = d.get("type") if isinstance(d, Mapping) else None
        j = validate(_Released, d, _record_error, "released", context={"type": type_code})
        _check_released_geometry(j.params, size)
        color = halo = hole = blur = None
        spots = None
        ill = j.params.illumination
        if ill is not None:
            c, h, o = ill.color, ill.halo, ill.hole
            color = ColorRecord(c.brightness_factor, c.contrast_factor, c.saturation_factor)
            kernel, sigma = release_halo_blur(h.center_a, h.dia_a, size)
            if kernel > MAX_KERNEL_FACTOR * size + 1:
                raise RecordError(
                    "released.params.illumination.halo",
                    f"center_a {list(h.center_a)} and dia_a {h.dia_a} give a halo blur kernel of "
                    f"{kernel} px, more than {MAX_KERNEL_FACTOR} x size {size} + 1",
                )
            halo = HaloRecord(
                style=h.num,
                color=RELEASE_HALO_COLORS[h.num],
                center=h.center_a,
                dia_a=h.dia_a,
                dia_b=h.dia_b,
                kernel=kernel,
                sigma=sigma,
            )
            hole = HoleRecord(
                center=o.center,
                diameter=o.diameter_circle,
                k_w=o.rad_w,
                k_h=o.rad_h,
                sigma=o.sigma,
                strength=o.brightness_factor,
            )
        if j.params.spots is not None:
            spots = tuple(_released_spot(s, size) for s in j.params.spots)
        if j.params.blur is not None:
            b = j.params.blur
            blur = BlurRecord(sigma=b.sigma, k_w=b.rad_w, k_h=b.rad_h)
        return cls(j.type, "cofe-release", "release", size, color, halo, hole, spots, blur)

    @classmethod
    def from_any(cls, d: Any, size: int = 512) -> DegradationRecord:
        """Parse either schema: the released one (has ``params``) or :meth:`to_dict`'s."""
        if isinstance(d, Mapping) and "params" in d:
            return cls.from_released(d, size)
        return cls.from_dict(d)

    # ---- summaries

    def flat_summary(self) -> dict[str, Any]:
        """Headline numbers for table columns (None where the operator did not run)."""
        return {
            "blur_sigma": None if self.blur is None else self.blur.sigma,
            "n_spots": None if self.spots is None else len(self.spots),
            "hole_strength": None if self.hole is None else self.hole.strength,
            "brightness": None if self.color is None else self.color.brightness,
            "contrast": None if self.color is None else self.color.contrast,
            "saturation": None if self.color is None else self.color.saturation,
        }


def _released_spot(s: _ReleasedSpot, size: int) -> SpotRecord:
    amplitude, k, beta, dist = release_spot_amplitude(s.radius, size)
    return SpotRecord(
        radius=s.radius,
        center=s.center,
        k_w=s.rad_w,
        k_h=s.rad_h,
        sigma=s.sigma,
        amplitude=amplitude,
        haze=(k, beta, dist),
    )


def _check_halo_style(
    halo: HaloRecord, colors: tuple[tuple[int, int, int], ...], where: str
) -> None:
    """RecordError unless ``halo.style`` indexes ``colors`` and ``halo.color`` is that entry."""
    if halo.style >= len(colors):
        raise RecordError(
            "halo.style", f"must be 0..{len(colors) - 1} for {where}, got {halo.style}"
        )
    expected = colors[halo.style]
    if tuple(halo.color) != expected:
        raise RecordError(
            "halo.color",
            f"style {halo.style} has colour {list(expected)} in {where}, got {_plain(halo.color)}",
        )


_RELEASED_GEOMETRY: dict[str, tuple[tuple[str, Geometry], ...]] = {
    "halo": (("center_a", "point"), ("dia_a", "length"), ("dia_b", "length")),
    "hole": (
        ("center", "point"),
        ("diameter_circle", "length"),
        ("rad_w", "kernel"),
        ("rad_h", "kernel"),
    ),
    "spot": (("radius", "length"), ("center", "point"), ("rad_w", "kernel"), ("rad_h", "kernel")),
    "blur": (("rad_w", "blur_kernel"), ("rad_h", "blur_kernel")),
}


def _check_released_geometry(params: _ReleasedParams, size: int) -> None:
    """The geometry bounds of :class:`DegradationRecord`, named by released-schema paths."""
    root = "released.params"
    sections: list[tuple[str, str, Any]] = []
    if params.illumination is not None:
        sections.append((f"{root}.illumination.halo", "halo", params.illumination.halo))
        sections.append((f"{root}.illumination.hole", "hole", params.illumination.hole))
    for i, spot in enumerate(params.spots or ()):
        sections.append((f"{root}.spots[{i}]", "spot", spot))
    if params.blur is not None:
        sections.append((f"{root}.blur", "blur", params.blur))
    for path, kind, section in sections:
        for name, bound in _RELEASED_GEOMETRY[kind]:
            _check_geometry(f"{path}.{name}", bound, getattr(section, name), size)
