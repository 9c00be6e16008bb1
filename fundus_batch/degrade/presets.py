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
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
)

from fundus_batch.validation import (
    FieldProblem,
    Finite,
    Int,
    Model,
    first_and_rest,
    length,
)

__all__ = [
    "CENTER_REACH",
    "MAX_BLUR_SIGMA",
    "MAX_KERNEL_FACTOR",
    "MAX_LENGTH_FACTOR",
    "MODELS",
    "PRESETS",
    "REFERENCE_SIZE",
    "RELEASE_HALO_COLORS",
    "TRAIN_HALO_COLORS",
    "Preset",
    "PresetError",
    "get_preset",
    "known_preset",
    "make_odd",
    "max_blur_kernel",
    "release_halo_blur",
    "release_spot_amplitude",
    "release_spot_sigma",
]

REFERENCE_SIZE = 512
"""Working size at which the released constants are defined."""

MODELS = ("release", "train")

# Geometry bounds of a degradation record, relative to its working side ``size`` (enforced
# when a record is built or parsed). They lie far outside anything a preset can sample: the
# preset fields that scale a length have upper limits that keep every draw inside them. The
# whole-image blur is bounded tighter, by what the spec draws (sigma <= 15 px at 512) with
# twofold slack: its cost grows with the kernel, which at 4 size + 1 would not finish.
CENTER_REACH = 4
"""Centre coordinates lie within [-4 size, 4 size]."""
MAX_LENGTH_FACTOR = 8
"""Diameters and radii are at most 8 size."""
MAX_KERNEL_FACTOR = 4
"""Kernel sizes are at most 4 size + 1 (blur kernels: see ``max_blur_kernel``)."""
MAX_BLUR_SIGMA = 30.0
"""The largest blur sigma a preset may draw, in pixels at 512: twice the spec's 15."""

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


class PresetError(ValueError):
    """An invalid preset definition; ``field`` names the offending entry."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _non_empty(value: tuple[Any, ...]) -> tuple[Any, ...]:
    if not value:
        raise ValueError("must not be empty")
    return value


def _odd_positive(value: int) -> int:
    if value < 1 or value % 2 == 0:
        raise ValueError("must be an odd positive integer")
    return value


Name = Annotated[str, Strict(), AfterValidator(_non_blank)]
FloatRange = Annotated[tuple[Finite, Finite], length(2, "a pair of numbers [low, high]")]
IntRange = Annotated[tuple[Int, Int], length(2, "a pair of integers [low, high]")]
Channel = Annotated[Int, Field(ge=0, le=255)]
RGB = Annotated[tuple[Channel, Channel, Channel], length(3, "3 integers (R, G, B) in 0..255")]

_PAIR_RULES: dict[str, tuple[float | None, float | None]] = {
    # field: (lowest allowed value, highest allowed value) for both ends of the range
    "brightness": (0.0, None),
    "contrast": (0.0, None),
    "saturation": (0.0, None),
    "halo_inner": (1e-6, 4.0),  # dia_a <= 4 size, so the release halo kernel <= 4 size + 1
    "halo_sigma": (1e-6, 1.0),
    "hole_diameter": (1e-6, 1.0),
    "hole_center_x": (0.0, 1.0),
    "hole_center_y": (0.0, 1.0),
    "hole_base": (None, None),
    "hole_mean_coef": (None, None),
    "hole_kernel": (1e-6, 4.0),  # kernel <= 4 diameter + 1 <= 4 size + 1
    "hole_strength": (None, None),
    "hole_sigma": (1e-6, None),
    "spot_count": (0, None),
    "spot_radius": (1e-6, 0.5),
    "spot_k": (None, None),
    "spot_beta": (None, None),
    "spot_d": (None, None),
    "blur_sigma": (0.0, MAX_BLUR_SIGMA),  # kernel <= max_blur_kernel(size)
}


class Preset(Model):
    """A named set of degradation ranges (lengths as fractions of the side or pixels at 512).

    Fields used only by one model are ignored by the other: ``halo_sigma``, ``hole_strength``,
    ``hole_sigma``, ``spot_k``, ``spot_beta``, ``spot_d``, ``spot_kernel`` and ``spot_sigma``
    by ``release``; ``hole_base``, ``hole_mean_coef`` and ``hole_min_fov_mean`` by ``train``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    name: Name
    model: Literal["release", "train"] = "release"
    # colour jitter factors (PIL ImageEnhance semantics)
    brightness: FloatRange = (0.7, 1.2)
    contrast: FloatRange = (0.6, 1.4)
    saturation: FloatRange = (0.6, 1.4)
    # halo: centre in side*(1/2 -+ jitter); inner diameter min_side*U(inner); outer u_b >= min
    halo_center_jitter: Annotated[Finite, Field(ge=0.0, lt=0.5)] = 0.125
    halo_inner: FloatRange = (0.75, 1.0)
    # dia_b <= size (max(2 sqrt 2, outer_min) + 1/2 + gamma) <= 7.5 size (record bound 8 size)
    halo_outer_min: Annotated[Finite, Field(ge=1e-6, le=4.0)] = 1.0
    halo_colors: Annotated[tuple[RGB, ...], AfterValidator(_non_empty)] = RELEASE_HALO_COLORS
    halo_gamma: tuple[Annotated[Finite, Field(ge=0.0, le=3.0)], ...] = (2.0 / 3.0, 0.5, 0.5)
    # style 0 is drawable only when brightness < this; None: every style always drawable
    halo_first_style_below: Finite | None = 0.2
    halo_sigma: FloatRange = (1.0 / 6.0, 0.5)  # train: sigma = U{lo*side..hi*side} / 3
    # hole: diameter and centre as fractions of the side
    hole_diameter: FloatRange = (0.4, 0.7)
    hole_center_x: FloatRange = (0.25, 0.75)
    hole_center_y: FloatRange = (0.375, 0.625)
    hole_base: FloatRange = (-0.262, -0.26)  # release: b0
    hole_mean_coef: FloatRange = (0.05, 0.06)  # release: f ~ U(b0 - hi*mu, b0 - lo*mu)
    hole_min_fov_mean: Finite = 0.25  # release: f = 0 unless mu > this
    hole_kernel: FloatRange = (0.55, 0.75)  # kernel sizes as fractions of the diameter
    hole_strength: FloatRange = (-0.25, -0.05)  # train
    hole_sigma: FloatRange = (0.25, 1.0 / 3.0)  # train: fractions of the diameter
    # spots
    spot_count: IntRange = (5, 10)
    spot_radius: FloatRange = (0.01, 0.05)  # fractions of the side
    spot_k: FloatRange = (0.7, 1.0)  # train haze model a = k (1 - exp(-beta d))
    spot_beta: FloatRange = (0.5, 1.5)
    spot_d: FloatRange = (0.0, 0.3)
    # train: pixels at 512 (at most 2047, so the kernel stays <= 4 size + 1)
    spot_kernel: Annotated[Int, Field(le=2047), AfterValidator(_odd_positive)] = 5
    spot_sigma: Annotated[Finite, Field(ge=1e-6)] = 1.8  # train: pixels at 512
    # blur sigma in pixels at 512
    blur_sigma: FloatRange = (5.0, 15.0)

    @field_validator(*_PAIR_RULES)
    @classmethod
    def _range(cls, pair: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        low, high = _PAIR_RULES[info.field_name or ""]
        if pair[0] > pair[1]:
            raise ValueError("low > high")
        if low is not None and pair[0] < low:
            raise ValueError(f"values must be >= {low}")
        if high is not None and pair[1] > high:
            raise ValueError(f"values must be <= {high}")
        return pair

    @field_validator("halo_gamma")
    @classmethod
    def _one_gamma_per_colour(
        cls, gamma: tuple[float, ...], info: ValidationInfo
    ) -> tuple[float, ...]:
        colors = info.data.get("halo_colors")
        if colors is not None and len(gamma) != len(colors):
            raise ValueError(f"must hold one value per halo colour ({len(colors)})")
        return gamma

    @field_validator("halo_first_style_below")
    @classmethod
    def _needs_two_colours(cls, below: float | None, info: ValidationInfo) -> float | None:
        colors = info.data.get("halo_colors")
        if below is not None and colors is not None and len(colors) < 2:
            raise ValueError("needs at least two halo colours (or set it to None)")
        return below

    @classmethod
    def error(cls, problems: list[FieldProblem]) -> PresetError:
        """A PresetError naming the first bad field (and listing any others)."""
        return PresetError(*first_and_rest(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return _listify(self.model_dump())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Preset | str | None = None) -> Preset:
        """Build a preset from a mapping; missing fields (except ``name``) come from ``base``.

        ``base`` defaults to ``data["base"]`` if given, else to the built-in preset of the
        requested model (``cofe-release`` or ``cofe-train``).
        """
        if not isinstance(data, Mapping):
            raise PresetError("<root>", f"expected a mapping, got {type(data).__name__}")
        items = dict(data)
        base_spec = items.pop("base", base)
        if base_spec is None:
            model = items.get("model", "release")
            base_spec = "cofe-train" if model == "train" else "cofe-release"
        try:
            base_preset = get_preset(base_spec)
        except (PresetError, TypeError) as exc:
            raise PresetError("base", str(exc)) from None
        inherited = base_preset.model_dump(exclude={"name"})
        preset = cls.parse({**inherited, **items})
        builtin = PRESETS.get(preset.name)
        if builtin is not None and preset != builtin:
            # Records name their preset, and replay checks them against the built-in one.
            raise PresetError(
                "name", f"{preset.name!r} is a built-in preset: give other ranges another name"
            )
        return preset


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


def known_preset(name: str) -> str:
    """``name`` if it is a built-in preset, else ValueError (a pydantic validator of names)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset; known presets: {sorted(PRESETS)}")
    return name


def get_preset(preset: Preset | str) -> Preset:
    """Return ``preset``, checked, or the built-in preset of that name (PresetError if unknown
    or invalid: a preset derived with ``model_copy(update=...)`` skipped pydantic's checks)."""
    if isinstance(preset, Preset):
        if any(preset is builtin for builtin in PRESETS.values()):
            return preset
        return Preset.from_dict(preset.to_dict())
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


def max_blur_kernel(size: int) -> int:
    """The largest blur kernel side at working size ``size``: what a sigma of
    ``MAX_BLUR_SIGMA`` px at 512 draws (floor(sigma / 2), made odd), scaled as the sampler
    scales it (15 at 512, 121 at 4096)."""
    return make_odd(math.floor(MAX_BLUR_SIGMA * (size / REFERENCE_SIZE) / 2))


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
