"""Typed degradation records: every sampled parameter, exact JSON, and the released schema.

A :class:`DegradationRecord` holds everything needed to redo one degradation without
randomness. ``to_dict``/``to_json`` and ``from_dict``/``from_json`` round-trip exactly;
``to_released``/``from_released`` speak the JSON schema written by the released script
(degradation-model.md section 2.9), whose derived values (halo kernel and sigma, spot
amplitude) are recomputed on import.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .presets import (
    MODELS,
    RELEASE_HALO_COLORS,
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

TYPE_CODES = ("001", "010", "011", "100", "101", "110", "111")
"""The seven degradation types: bits (blur, spots, illumination) as in the released code."""

Point = tuple[int, int]


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
# strict readers of JSON values


def _check_keys(
    d: Any, path: str, required: Sequence[str], optional: Sequence[str] = ()
) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise RecordError(path, f"expected an object, got {type(d).__name__}")
    for key in d:
        if key not in required and key not in optional:
            raise RecordError(f"{path}.{key}", f"unknown key; expected {sorted(required)}")
    for key in required:
        if key not in d:
            raise RecordError(f"{path}.{key}", "missing")
    return d


def _int(value: Any, path: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(path, f"expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise RecordError(path, f"must be >= {minimum}, got {value}")
    return value


def _odd(value: Any, path: str) -> int:
    k = _int(value, path, 1)
    if k % 2 == 0:
        raise RecordError(path, f"kernel size must be odd, got {k}")
    return k


def _float(value: Any, path: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(path, f"expected a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise RecordError(path, f"must be finite, got {value!r}")
    if minimum is not None and out < minimum:
        raise RecordError(path, f"must be >= {minimum}, got {value!r}")
    return out


def _opt_float(value: Any, path: str) -> float | None:
    return None if value is None else _float(value, path)


def _point(value: Any, path: str) -> Point:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise RecordError(path, f"expected [x, y], got {value!r}")
    return _int(value[0], f"{path}[0]"), _int(value[1], f"{path}[1]")


def _rgb(value: Any, path: str) -> tuple[int, int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise RecordError(path, f"expected [R, G, B], got {value!r}")
    r, g, b = (_int(v, f"{path}[{i}]", 0) for i, v in enumerate(value))
    if max(r, g, b) > 255:
        raise RecordError(path, f"components must be <= 255, got {value!r}")
    return r, g, b


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class _Sub:
    """JSON helpers shared by the sub-records (dataclass field names are the JSON keys)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with lists for tuples."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# sub-records


@dataclass(frozen=True)
class ColorRecord(_Sub):
    """PIL ImageEnhance factors, applied in this order."""

    brightness: float
    contrast: float
    saturation: float

    @classmethod
    def from_dict(cls, d: Any, path: str = "color") -> ColorRecord:
        """Parse and validate."""
        _check_keys(d, path, ("brightness", "contrast", "saturation"))
        return cls(
            *(_float(d[k], f"{path}.{k}", 0.0) for k in ("brightness", "contrast", "saturation"))
        )


@dataclass(frozen=True)
class HaloRecord(_Sub):
    """Coloured ring between diameters ``dia_a`` and ``dia_b`` around ``center`` (x, y)."""

    style: int
    color: tuple[int, int, int]
    center: Point
    dia_a: float
    dia_b: float
    kernel: int
    sigma: float

    @classmethod
    def from_dict(cls, d: Any, path: str = "halo") -> HaloRecord:
        """Parse and validate."""
        keys = ("style", "color", "center", "dia_a", "dia_b", "kernel", "sigma")
        _check_keys(d, path, keys)
        return cls(
            style=_int(d["style"], f"{path}.style", 0),
            color=_rgb(d["color"], f"{path}.color"),
            center=_point(d["center"], f"{path}.center"),
            dia_a=_float(d["dia_a"], f"{path}.dia_a", 0.0),
            dia_b=_float(d["dia_b"], f"{path}.dia_b", 0.0),
            kernel=_odd(d["kernel"], f"{path}.kernel"),
            sigma=_float(d["sigma"], f"{path}.sigma", 0.0),
        )


@dataclass(frozen=True)
class HoleRecord(_Sub):
    """Dark blurred disc. ``strength`` is the final additive factor (None: not yet resolved).

    ``base`` and ``mix`` are the release model's raw draws (b0 and the unit uniform that places
    the strength inside [b0 - 0.06 mu, b0 - 0.05 mu]); ``fov_mean`` is the mu that was used.
    """

    center: Point
    diameter: int
    k_w: int
    k_h: int
    sigma: float
    strength: float | None
    fov_mean: float | None = None
    base: float | None = None
    mix: float | None = None

    @classmethod
    def from_dict(cls, d: Any, path: str = "hole") -> HoleRecord:
        """Parse and validate."""
        _check_keys(
            d,
            path,
            ("center", "diameter", "k_w", "k_h", "sigma", "strength"),
            ("fov_mean", "base", "mix"),
        )
        return cls(
            center=_point(d["center"], f"{path}.center"),
            diameter=_int(d["diameter"], f"{path}.diameter", 0),
            k_w=_odd(d["k_w"], f"{path}.k_w"),
            k_h=_odd(d["k_h"], f"{path}.k_h"),
            sigma=_float(d["sigma"], f"{path}.sigma", 0.0),
            strength=_opt_float(d["strength"], f"{path}.strength"),
            fov_mean=_opt_float(d.get("fov_mean"), f"{path}.fov_mean"),
            base=_opt_float(d.get("base"), f"{path}.base"),
            mix=_opt_float(d.get("mix"), f"{path}.mix"),
        )


@dataclass(frozen=True)
class SpotRecord(_Sub):
    """One bright blurred spot: disc of radius ``radius // 2`` at ``center`` with ``amplitude``.

    ``haze`` = (k, beta, d) of the amplitude model a = k (1 - exp(-beta d)).
    """

    radius: int
    center: Point
    k_w: int
    k_h: int
    sigma: float
    amplitude: float
    haze: tuple[float, float, float]

    @classmethod
    def from_dict(cls, d: Any, path: str = "spots[0]") -> SpotRecord:
        """Parse and validate."""
        _check_keys(d, path, ("radius", "center", "k_w", "k_h", "sigma", "amplitude", "haze"))
        haze = d["haze"]
        if not isinstance(haze, (list, tuple)) or len(haze) != 3:
            raise RecordError(f"{path}.haze", f"expected [k, beta, d], got {haze!r}")
        return cls(
            radius=_int(d["radius"], f"{path}.radius", 0),
            center=_point(d["center"], f"{path}.center"),
            k_w=_odd(d["k_w"], f"{path}.k_w"),
            k_h=_odd(d["k_h"], f"{path}.k_h"),
            sigma=_float(d["sigma"], f"{path}.sigma", 0.0),
            amplitude=_float(d["amplitude"], f"{path}.amplitude"),
            haze=(
                _float(haze[0], f"{path}.haze[0]"),
                _float(haze[1], f"{path}.haze[1]"),
                _float(haze[2], f"{path}.haze[2]"),
            ),
        )


@dataclass(frozen=True)
class BlurRecord(_Sub):
    """Truncated Gaussian blur with kernel (k_w, k_h) and ``sigma``."""

    sigma: float
    k_w: int
    k_h: int

    @classmethod
    def from_dict(cls, d: Any, path: str = "blur") -> BlurRecord:
        """Parse and validate."""
        _check_keys(d, path, ("sigma", "k_w", "k_h"))
        return cls(
            sigma=_float(d["sigma"], f"{path}.sigma", 0.0),
            k_w=_odd(d["k_w"], f"{path}.k_w"),
            k_h=_odd(d["k_h"], f"{path}.k_h"),
        )


# ----------------------------------------------------------------------------------------------
# the record


@dataclass(frozen=True)
class DegradationRecord:
    """All parameters of one degraded variant.

    ``preset`` names the preset it was drawn from (provenance); ``model`` (``release`` or
    ``train``) decides the operator order and the final FOV multiplication at replay. ``size``
    is the working side in pixels.
    """

    type_code: str
    preset: str
    model: str
    size: int
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
        _int(self.size, "size", 1)
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
        """Parse and validate a dict written by :meth:`to_dict` (RecordError names the field)."""
        _check_keys(
            d,
            "record",
            ("type_code", "preset", "model", "size"),
            ("color", "halo", "hole", "spots", "blur"),
        )
        type_code = d["type_code"]
        if not isinstance(type_code, str):
            raise RecordError("type_code", f"expected a string, got {type_code!r}")
        type_groups(type_code)
        spots = d.get("spots")
        if spots is not None:
            if not isinstance(spots, list):
                raise RecordError("spots", f"expected a list, got {type(spots).__name__}")
            spots = tuple(SpotRecord.from_dict(s, f"spots[{i}]") for i, s in enumerate(spots))
        return cls(
            type_code=type_code,
            preset=d["preset"],
            model=d["model"],
            size=_int(d["size"], "size", 1),
            color=None if d.get("color") is None else ColorRecord.from_dict(d["color"]),
            halo=None if d.get("halo") is None else HaloRecord.from_dict(d["halo"]),
            hole=None if d.get("hole") is None else HoleRecord.from_dict(d["hole"]),
            spots=spots,
            blur=None if d.get("blur") is None else BlurRecord.from_dict(d["blur"]),
        )

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
        be resolved.
        """
        if self.model != "release":
            raise RecordError("model", "only release-model records have a released-schema form")
        params: dict[str, Any] = {}
        if self.color is not None and self.halo is not None and self.hole is not None:
            c, h, o = self.color, self.halo, self.hole
            if o.strength is None:
                raise RecordError("hole.strength", "unresolved (no FOV mean was applied)")
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
        geometry with the release-model formulas.
        """
        _check_keys(d, "released", ("type", "params"), ("name",))
        type_code = d["type"]
        if not isinstance(type_code, str) or type_code not in TYPE_CODES:
            raise RecordError("released.type", f"must be one of {TYPE_CODES}, got {type_code!r}")
        _int(size, "size", 1)
        illumination, spots_on, blur_on = type_groups(type_code)
        wanted = [
            k
            for k, on in (("illumination", illumination), ("spots", spots_on), ("blur", blur_on))
            if on
        ]
        params = _check_keys(d["params"], "released.params", wanted)
        color = halo = hole = blur = None
        spots = None
        if illumination:
            ill = _check_keys(
                params["illumination"], "released.params.illumination", ("color", "halo", "hole")
            )
            color = _released_color(ill["color"], "released.params.illumination.color")
            halo = _released_halo(ill["halo"], "released.params.illumination.halo", size)
            hole = _released_hole(ill["hole"], "released.params.illumination.hole")
        if spots_on:
            raw = params["spots"]
            if not isinstance(raw, list):
                raise RecordError(
                    "released.params.spots", f"expected a list, got {type(raw).__name__}"
                )
            spots = tuple(
                _released_spot(s, f"released.params.spots[{i}]", size) for i, s in enumerate(raw)
            )
        if blur_on:
            path = "released.params.blur"
            b = _check_keys(params["blur"], path, ("sigma", "rad_w", "rad_h"))
            blur = BlurRecord(
                sigma=_float(b["sigma"], f"{path}.sigma", 0.0),
                k_w=_odd(b["rad_w"], f"{path}.rad_w"),
                k_h=_odd(b["rad_h"], f"{path}.rad_h"),
            )
        return cls(type_code, "cofe-release", "release", size, color, halo, hole, spots, blur)

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


def _released_color(d: Any, path: str) -> ColorRecord:
    keys = ("brightness_factor", "contrast_factor", "saturation_factor")
    _check_keys(d, path, keys)
    return ColorRecord(*(_float(d[k], f"{path}.{k}", 0.0) for k in keys))


def _released_halo(d: Any, path: str, size: int) -> HaloRecord:
    _check_keys(d, path, ("num", "center_a", "dia_a", "center_b", "dia_b"))
    style = _int(d["num"], f"{path}.num", 0)
    if style >= len(RELEASE_HALO_COLORS):
        raise RecordError(f"{path}.num", f"must be 0..{len(RELEASE_HALO_COLORS) - 1}, got {style}")
    center = _point(d["center_a"], f"{path}.center_a")
    if _point(d["center_b"], f"{path}.center_b") != center:
        raise RecordError(f"{path}.center_b", "must equal center_a (the rings are concentric)")
    dia_a = _float(d["dia_a"], f"{path}.dia_a", 0.0)
    kernel, sigma = release_halo_blur(center, dia_a, size)
    return HaloRecord(
        style=style,
        color=RELEASE_HALO_COLORS[style],
        center=center,
        dia_a=dia_a,
        dia_b=_float(d["dia_b"], f"{path}.dia_b", 0.0),
        kernel=kernel,
        sigma=sigma,
    )


def _released_hole(d: Any, path: str) -> HoleRecord:
    _check_keys(
        d, path, ("center", "diameter_circle", "brightness_factor", "rad_w", "rad_h", "sigma")
    )
    return HoleRecord(
        center=_point(d["center"], f"{path}.center"),
        diameter=_int(d["diameter_circle"], f"{path}.diameter_circle", 0),
        k_w=_odd(d["rad_w"], f"{path}.rad_w"),
        k_h=_odd(d["rad_h"], f"{path}.rad_h"),
        sigma=_float(d["sigma"], f"{path}.sigma", 0.0),
        strength=_float(d["brightness_factor"], f"{path}.brightness_factor"),
    )


def _released_spot(d: Any, path: str, size: int) -> SpotRecord:
    _check_keys(d, path, ("radius", "center", "rad_w", "rad_h", "sigma"))
    radius = _int(d["radius"], f"{path}.radius", 0)
    amplitude, k, beta, dist = release_spot_amplitude(radius, size)
    return SpotRecord(
        radius=radius,
        center=_point(d["center"], f"{path}.center"),
        k_w=_odd(d["rad_w"], f"{path}.rad_w"),
        k_h=_odd(d["rad_h"], f"{path}.rad_h"),
        sigma=_float(d["sigma"], f"{path}.sigma", 0.0),
        amplitude=amplitude,
        haze=(k, beta, dist),
    )
