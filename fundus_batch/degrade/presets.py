"""Degradation presets: named, validated sets of parameter ranges.

A :class:`Preset` is a frozen set of ranges plus the *model* that says how they are used:

* ``release``: the released degradation script of Shen et al. (degradation-model.md 2.3-2.6):
  colour -> halo -> hole -> spots -> blur, type-code selection, hole strength from the FOV mean,
  spot amplitude and blur from the spot radius, final multiplication by the FOV mask.
* ``train``: the training-loader variant (section 2.8): colour -> spots -> halo -> blur -> hole,
  random spot haze parameters, fixed spot kernel, random halo sigma and hole strength, and no
  final FOV multiplication.

Lengths are given at the reference working size of 512 px, either as fractions of the image
side or as pixels at 512; the sampler scales pixel constants by ``size / 512`` (a fix of the
released script, whose absolute constants turn spots dark at 1024 px). At 512 the released
behaviour is reproduced exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = [
    "MODELS",
    "PRESETS",
    "REFERENCE_SIZE",
    "RELEASE_HALO_COLORS",
    "TRAIN_HALO_COLORS",
    "Preset",
    "PresetError",
    "get_preset",
    "make_odd",
    "release_halo_blur",
    "release_spot_amplitude",
    "release_spot_sigma",
]

REFERENCE_SIZE = 512
"""Working size at which the released constants are defined."""

MODELS = ("release", "train")

RELEASE_HALO_COLORS: tuple[tuple[int, int, int], ...] = (
    (251, 249, 246),
    (141, 238, 238),
    (177, 195, 147),
)
TRAIN_HALO_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255),
    (141, 238, 238),
    (162, 205, 90),
)

Range = tuple[float, float]


class PresetError(ValueError):
    """An invalid preset definition; ``field`` names the offending entry."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"preset field {field!r}: {message}")
        self.field = field


@dataclass(frozen=True)
class Preset:
    """A named set of degradation ranges (lengths as fractions of the side or pixels at 512).

    Fields used only by one model are ignored by the other: ``halo_sigma``, ``hole_strength``,
    ``hole_sigma``, ``spot_k``, ``spot_beta``, ``spot_d``, ``spot_kernel`` and ``spot_sigma``
    by ``release``; ``hole_base``, ``hole_mean_coef`` and ``hole_min_fov_mean`` by ``train``.
    """

    name: str
    model: str = "release"
    # colour jitter factors (PIL ImageEnhance semantics)
    brightness: Range = (0.7, 1.2)
    contrast: Range = (0.6, 1.4)
    saturation: Range = (0.6, 1.4)
    # halo: centre in side*(1/2 -+ jitter); inner diameter min_side*U(inner); outer u_b >= min
    halo_center_jitter: float = 0.125
    halo_inner: Range = (0.75, 1.0)
    halo_outer_min: float = 1.0
    halo_colors: tuple[tuple[int, int, int], ...] = RELEASE_HALO_COLORS
    halo_gamma: tuple[float, ...] = (2.0 / 3.0, 0.5, 0.5)
    # style 0 is drawable only when brightness < this; None: every style always drawable
    halo_first_style_below: float | None = 0.2
    halo_sigma: Range = (1.0 / 6.0, 0.5)  # train: sigma = U{lo*side..hi*side} / 3
    # hole: diameter and centre as fractions of the side
    hole_diameter: Range = (0.4, 0.7)
    hole_center_x: Range = (0.25, 0.75)
    hole_center_y: Range = (0.375, 0.625)
    hole_base: Range = (-0.262, -0.26)  # release: b0
    hole_mean_coef: Range = (0.05, 0.06)  # release: f ~ U(b0 - hi*mu, b0 - lo*mu)
    hole_min_fov_mean: float = 0.25  # release: f = 0 unless mu > this
    hole_kernel: Range = (0.55, 0.75)  # kernel sizes as fractions of the diameter
    hole_strength: Range = (-0.25, -0.05)  # train
    hole_sigma: Range = (0.25, 1.0 / 3.0)  # train: fractions of the diameter
    # spots
    spot_count: tuple[int, int] = (5, 10)
    spot_radius: Range = (0.01, 0.05)  # fractions of the side
    spot_k: Range = (0.7, 1.0)  # train haze model a = k (1 - exp(-beta d))
    spot_beta: Range = (0.5, 1.5)
    spot_d: Range = (0.0, 0.3)
    spot_kernel: int = 5  # train: pixels at 512
    spot_sigma: float = 1.8  # train: pixels at 512
    # blur sigma in pixels at 512
    blur_sigma: Range = (5.0, 15.0)

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return _listify(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Preset | str | None = None) -> Preset:
        """Build a preset from a mapping; missing fields come from ``base``.

        ``base`` defaults to ``data["base"]`` if given, else to the built-in preset of the
        requested model (``cofe-release`` or ``cofe-train``).
        """
        if not isinstance(data, Mapping):
            raise PresetError("<root>", f"expected a mapping, got {type(data).__name__}")
        items = dict(data)
        base_spec = items.pop("base", base)
        known = {f.name for f in fields(cls)}
        for key in items:
            if key not in known:
                raise PresetError(str(key), f"unknown field; known fields: {sorted(known)}")
        if "name" not in items:
            raise PresetError("name", "missing")
        if base_spec is None:
            model = items.get("model", "release")
            base_spec = "cofe-train" if model == "train" else "cofe-release"
        try:
            base_preset = get_preset(base_spec)
        except (PresetError, TypeError) as exc:
            raise PresetError("base", str(exc)) from None
        values = {key: _coerce(key, value) for key, value in items.items()}
        return replace(base_preset, **values)


_PAIR_RULES: dict[str, tuple[float | None, float | None]] = {
    # field: (lowest allowed value, highest allowed value) for both ends of the range
    "brightness": (0.0, None),
    "contrast": (0.0, None),
    "saturation": (0.0, None),
    "halo_inner": (1e-6, None),
    "halo_sigma": (1e-6, 1.0),
    "hole_diameter": (1e-6, 1.0),
    "hole_center_x": (0.0, 1.0),
    "hole_center_y": (0.0, 1.0),
    "hole_base": (None, None),
    "hole_mean_coef": (None, None),
    "hole_kernel": (1e-6, None),
    "hole_strength": (None, None),
    "hole_sigma": (1e-6, None),
    "spot_count": (0, None),
    "spot_radius": (1e-6, 0.5),
    "spot_k": (None, None),
    "spot_beta": (None, None),
    "spot_d": (None, None),
    "blur_sigma": (0.0, None),
}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce(key: str, value: Any) -> Any:
    """Turn JSON/YAML lists into the tuples the dataclass holds."""
    if key == "halo_colors" and isinstance(value, (list, tuple)):
        return tuple(tuple(c) if isinstance(c, (list, tuple)) else c for c in value)
    if isinstance(value, (list, tuple)):
        if key in _PAIR_RULES and key != "spot_count":
            return tuple(float(v) if _is_number(v) else v for v in value)
        return tuple(value)
    return value


def _validate(p: Preset) -> None:
    if not isinstance(p.name, str) or not p.name.strip():
        raise PresetError("name", "must be a non-empty string")
    if p.model not in MODELS:
        raise PresetError("model", f"must be one of {MODELS}, got {p.model!r}")
    for key, (low, high) in _PAIR_RULES.items():
        pair = getattr(p, key)
        if not isinstance(pair, tuple) or len(pair) != 2 or not all(map(_is_number, pair)):
            raise PresetError(key, f"must be a pair of numbers (low, high), got {pair!r}")
        if key == "spot_count" and not all(isinstance(v, int) for v in pair):
            raise PresetError(key, f"must be a pair of integers, got {pair!r}")
        if not all(math.isfinite(v) for v in pair):
            raise PresetError(key, f"must be finite, got {pair!r}")
        if pair[0] > pair[1]:
            raise PresetError(key, f"low > high in {pair!r}")
        if low is not None and pair[0] < low:
            raise PresetError(key, f"values must be >= {low}, got {pair!r}")
        if high is not None and pair[1] > high:
            raise PresetError(key, f"values must be <= {high}, got {pair!r}")
    for key, low, high in (
        ("halo_center_jitter", 0.0, 0.5),
        ("halo_outer_min", 1e-6, None),
        ("hole_min_fov_mean", None, None),
        ("spot_sigma", 1e-6, None),
    ):
        value = getattr(p, key)
        if not _is_number(value) or not math.isfinite(value):
            raise PresetError(key, f"must be a finite number, got {value!r}")
        if low is not None and value < low:
            raise PresetError(key, f"must be >= {low}, got {value!r}")
        if high is not None and value >= high:
            raise PresetError(key, f"must be < {high}, got {value!r}")
    if not isinstance(p.spot_kernel, int) or isinstance(p.spot_kernel, bool):
        raise PresetError("spot_kernel", f"must be an odd positive integer, got {p.spot_kernel!r}")
    if p.spot_kernel < 1 or p.spot_kernel % 2 == 0:
        raise PresetError("spot_kernel", f"must be an odd positive integer, got {p.spot_kernel!r}")
    colors = p.halo_colors
    if not isinstance(colors, tuple) or not colors:
        raise PresetError("halo_colors", "must be a non-empty list of (R, G, B) triples")
    for color in colors:
        if (
            not isinstance(color, tuple)
            or len(color) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in color)
            or not all(0 <= v <= 255 for v in color)
        ):
            raise PresetError("halo_colors", f"each colour must be 3 ints in 0..255, got {color!r}")
    gamma = p.halo_gamma
    if not isinstance(gamma, tuple) or len(gamma) != len(colors):
        raise PresetError("halo_gamma", "must hold one value per halo colour")
    if not all(_is_number(g) and math.isfinite(g) and g >= 0 for g in gamma):
        raise PresetError("halo_gamma", f"values must be finite and >= 0, got {gamma!r}")
    below = p.halo_first_style_below
    if below is not None:
        if not _is_number(below) or not math.isfinite(below):
            raise PresetError("halo_first_style_below", f"must be a number or None, got {below!r}")
        if len(colors) < 2:
            raise PresetError(
                "halo_first_style_below", "needs at least two halo colours (or set it to None)"
            )


def _listify(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_listify(v) for v in value]
    if isinstance(value, dict):
        return {k: _listify(v) for k, v in value.items()}
    return value


COFE_RELEASE = Preset(name="cofe-release")
COFE_TRAIN = Preset(
    name="cofe-train",
    model="train",
    brightness=(0.5, 1.5),
    contrast=(0.5, 1.5),
    saturation=(0.5, 1.5),
    halo_colors=TRAIN_HALO_COLORS,
    halo_gamma=(0.5, 0.5, 0.5),
    halo_first_style_below=None,
    hole_diameter=(0.3, 0.5),
    hole_center_x=(0.0, 1.0),
    hole_center_y=(0.0, 1.0),
    hole_kernel=(0.25, 1.0 / 3.0),
    spot_count=(5, 20),
    spot_radius=(0.026, 0.05),
    blur_sigma=(0.0, 15.0),
)

PRESETS: Mapping[str, Preset] = {p.name: p for p in (COFE_RELEASE, COFE_TRAIN)}
"""The built-in presets by name; ``cofe-release`` is the default."""


def get_preset(preset: Preset | str) -> Preset:
    """Return ``preset`` itself or the built-in preset of that name (PresetError if unknown)."""
    if isinstance(preset, Preset):
        return preset
    if not isinstance(preset, str):
        raise TypeError(f"preset must be a Preset or a name, got {type(preset).__name__}")
    try:
        return PRESETS[preset]
    except KeyError:
        raise PresetError(
            "name", f"unknown preset {preset!r}; known presets: {sorted(PRESETS)}"
        ) from None


# ----------------------------------------------------------------------------------------------
# Derived quantities of the release model (shared by the sampler and the released-schema import)


def make_odd(k: int) -> int:
    """k + 1 if k is even (the released scripts' kernel rule)."""
    return k + 1 if k % 2 == 0 else k


def release_halo_blur(center: tuple[int, int], dia_a: float, size: int) -> tuple[int, float]:
    """Halo kernel size (odd) and sigma: g = floor(|D - D_a|), sigma = 2g/3 before making g odd."""
    cx, cy = center
    far = 2 * max(cx, size - cx, cy, size - cy)
    g = math.floor(abs(far - dia_a))
    return make_odd(g), 2 * g / 3


def _spot_scale(radius: int, size: int) -> float:
    """The radius expressed in pixels at 512 (the released "/25" constants are absolute)."""
    return radius * REFERENCE_SIZE / size


def release_spot_amplitude(radius: int, size: int) -> tuple[float, float, float, float]:
    """(amplitude, k, beta, d) of the haze model a = k (1 - exp(-beta d)) for a spot radius."""
    r = _spot_scale(radius, size)
    k = 14 / 25 + 1 - r / 25
    beta = 0.5 + r / 25
    d = 0.3 * r / 25
    return k * (1 - math.exp(-beta * d)), k, beta, d


def release_spot_sigma(radius: int, size: int) -> float:
    """Spot blur sigma 2 (5 + 20 r / 25), with r at 512 and the result scaled back to ``size``."""
    r = _spot_scale(radius, size)
    sigma = 2 * (5 + 20 * (r / 25))
    return sigma if size == REFERENCE_SIZE else sigma * size / REFERENCE_SIZE
