"""Per-sample random generators and the parameter sampler.

Every draw comes from a ``numpy.random.Generator`` handed in by the caller; ``sample_rng``
derives one from (run seed, image id, variant) so any sample can be regenerated alone, in any
order, on any worker. Integer parameters are drawn with inclusive integer bounds
(``integers(lo, hi, endpoint=True)``), continuous ones with ``uniform(lo, hi)``.

The draw order is fixed and independent of the image: the release model's hole strength needs
the FOV mean mu at that point of the pipeline, so the sampler always draws b0 and a unit uniform
(even when mu <= 0.25 will make the strength 0) and :func:`resolve_hole_strength` turns them into
the final factor once mu is known.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from typing import cast

import numpy as np

from .params import (
    BlurRecord,
    ColorRecord,
    DegradationRecord,
    HaloRecord,
    HoleRecord,
    SpotRecord,
    TypeCode,
    type_groups,
)
from .presets import (
    REFERENCE_SIZE,
    Preset,
    get_preset,
    make_odd,
    release_halo_blur,
    release_spot_amplitude,
    release_spot_sigma,
)

__all__ = ["resolve_hole_strength", "sample_record", "sample_rng", "stable_hash"]


def stable_hash(text: str) -> int:
    """A 64-bit integer from the first 8 bytes (big-endian) of sha256(text as UTF-8)."""
    if not isinstance(text, str):
        raise TypeError(f"image id must be a string, got {type(text).__name__}")
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def sample_rng(run_seed: int, image_id: str, variant: int) -> np.random.Generator:
    """Generator seeded by SeedSequence([run_seed, stable_hash(image_id), variant])."""
    for name, value in (("run_seed", run_seed), ("variant", variant)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    seq = np.random.SeedSequence([int(run_seed), stable_hash(image_id), int(variant)])
    return np.random.Generator(np.random.PCG64(seq))


def _int_between(rng: np.random.Generator, lo: int, hi: int, what: str) -> int:
    if lo > hi:
        raise ValueError(f"{what}: empty integer range {lo}..{hi} at this image size")
    return int(rng.integers(lo, hi, endpoint=True))


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _color(rng: np.random.Generator, p: Preset) -> ColorRecord:
    return ColorRecord(
        brightness=_uniform(rng, p.brightness),
        contrast=_uniform(rng, p.contrast),
        saturation=_uniform(rng, p.saturation),
    )


def _halo(rng: np.random.Generator, p: Preset, size: int, brightness: float) -> HaloRecord:
    n_styles = len(p.halo_colors)
    below = p.halo_first_style_below
    first = 1 if below is not None and brightness >= below else 0
    style = _int_between(rng, first, n_styles - 1, "halo style")
    lo = math.floor(size * (0.5 - p.halo_center_jitter))
    hi = math.floor(size * (0.5 + p.halo_center_jitter))
    cx = _int_between(rng, lo, hi, "halo centre x")
    cy = _int_between(rng, lo, hi, "halo centre y")
    dia_a = size * _uniform(rng, p.halo_inner)
    reach = math.floor(math.sqrt(max(cx, size - cx) ** 2 + max(cy, size - cy) ** 2))
    u_max = max(2 * reach / size, p.halo_outer_min)
    offset = abs(max(cx - size / 2, cy - size / 2) + p.halo_gamma[style] * size)
    dia_b = size * _uniform(rng, (p.halo_outer_min, u_max)) + offset
    if p.model == "release":
        kernel, sigma = release_halo_blur((cx, cy), dia_a, size)
    else:
        step = _int_between(
            rng,
            math.floor(size * p.halo_sigma[0]),
            math.floor(size * p.halo_sigma[1]),
            "halo sigma",
        )
        sigma = step / 3
        kernel = make_odd(math.floor(1.5 * sigma))
    return HaloRecord(
        style=style,
        color=p.halo_colors[style],
        center=(cx, cy),
        dia_a=dia_a,
        dia_b=dia_b,
        kernel=kernel,
        sigma=sigma,
    )


def _center_bounds(size: int, fractions: tuple[float, float]) -> tuple[int, int]:
    """Pixel bounds of a centre drawn between two fractions of the side, inside 1..size-1."""
    lo, hi = (min(max(math.floor(size * f), 1), size - 1) for f in fractions)
    return lo, hi


def _hole(rng: np.random.Generator, p: Preset, size: int) -> HoleRecord:
    lo, hi = (math.floor(size * f) for f in p.hole_diameter)
    diameter = _int_between(rng, lo, hi, "hole diameter")
    cx = _int_between(rng, *_center_bounds(size, p.hole_center_x), "hole centre x")
    cy = _int_between(rng, *_center_bounds(size, p.hole_center_y), "hole centre y")
    k_lo, k_hi = (math.floor(f * diameter) for f in p.hole_kernel)
    if p.model == "release":
        base = _uniform(rng, p.hole_base)
        mix = float(rng.random())
        k_w = _int_between(rng, k_lo, k_hi, "hole kernel width")
        k_h = _int_between(rng, k_lo, k_hi, "hole kernel height")
        sigma = 2 / 3 * max(k_w, k_h) * 1.2
        return HoleRecord(
            center=(cx, cy),
            diameter=diameter,
            k_w=make_odd(k_w),
            k_h=make_odd(k_h),
            sigma=sigma,
            strength=None,  # needs the FOV mean: see resolve_hole_strength
            base=base,
            mix=mix,
        )
    strength = _uniform(rng, p.hole_strength)
    sigma = _uniform(rng, (p.hole_sigma[0] * diameter, p.hole_sigma[1] * diameter))
    k = make_odd(_int_between(rng, k_lo, k_hi, "hole kernel"))
    return HoleRecord(
        center=(cx, cy), diameter=diameter, k_w=k, k_h=k, sigma=sigma, strength=strength
    )


def resolve_hole_strength(hole: HoleRecord, fov_mean: float, preset: Preset | str) -> HoleRecord:
    """Fill in a release-model hole's strength from its raw draws and the FOV mean mu.

    f = 0 unless mu > ``hole_min_fov_mean``; otherwise f = lo + (hi - lo) * mix with
    [lo, hi] = [b0 - c_hi mu, b0 - c_lo mu]. Records that already hold a strength are returned
    unchanged.
    """
    if hole.strength is not None:
        return hole
    if hole.base is None or hole.mix is None:
        raise ValueError("hole record has neither a strength nor the draws to compute one")
    p = get_preset(preset)
    if fov_mean > p.hole_min_fov_mean:
        lo = hole.base - p.hole_mean_coef[1] * fov_mean
        hi = hole.base - p.hole_mean_coef[0] * fov_mean
        strength = lo + (hi - lo) * hole.mix
    else:
        strength = 0.0
    return replace(hole, strength=float(strength), fov_mean=float(fov_mean))


def _spot(rng: np.random.Generator, p: Preset, size: int) -> SpotRecord:
    widest = (size - 2) // 2  # a centre must fit radius + 1 from either edge
    lo = min(math.ceil(size * p.spot_radius[0]), widest)
    hi = min(math.floor(size * p.spot_radius[1]), widest)
    radius = _int_between(rng, lo, hi, "spot radius")
    cx = _int_between(rng, radius + 1, size - radius - 1, "spot centre x")
    cy = _int_between(rng, radius + 1, size - radius - 1, "spot centre y")
    if p.model == "release":
        amplitude, k, beta, d = release_spot_amplitude(radius, size)
        sigma = release_spot_sigma(radius, size)
        k_w = make_odd(
            _int_between(rng, math.floor(sigma / 5), math.floor(sigma / 4), "spot kernel")
        )
        k_h = make_odd(
            _int_between(rng, math.floor(sigma / 5), math.floor(sigma / 4), "spot kernel")
        )
    else:
        k = _uniform(rng, p.spot_k)
        beta = _uniform(rng, p.spot_beta)
        d = _uniform(rng, p.spot_d)
        amplitude = k * (1 - math.exp(-beta * d))
        scale = size / REFERENCE_SIZE
        k_w = k_h = make_odd(math.floor(p.spot_kernel * scale))
        sigma = p.spot_sigma * scale
    return SpotRecord(
        radius=radius,
        center=(cx, cy),
        k_w=k_w,
        k_h=k_h,
        sigma=sigma,
        amplitude=amplitude,
        haze=(k, beta, d),
    )


def _blur(rng: np.random.Generator, p: Preset, size: int) -> BlurRecord:
    sigma = _uniform(rng, p.blur_sigma)
    if size != REFERENCE_SIZE:
        sigma *= size / REFERENCE_SIZE
    k_lo, k_hi = math.floor(sigma / 3), math.floor(sigma / 2)
    k_w = make_odd(_int_between(rng, k_lo, k_hi, "blur kernel width"))
    k_h = make_odd(_int_between(rng, k_lo, k_hi, "blur kernel height"))
    return BlurRecord(sigma, k_w, k_h)


def sample_record(
    rng: np.random.Generator,
    type_code: str,
    size: int,
    preset: Preset | str = "cofe-release",
    fov_mean: float | None = None,
) -> DegradationRecord:
    """Draw every parameter of one degradation of type ``type_code`` at working size ``size``.

    Draw order: colour, halo, hole, spots, blur (only the groups the type selects). For the
    release model the hole strength depends on the FOV mean at that point of the pipeline: pass
    ``fov_mean`` to resolve it here, or leave it None and let the engine resolve it.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy Generator, e.g. sample_rng(seed, image_id, variant); got "
            f"{type(rng).__name__}"
        )
    p = get_preset(preset)
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    illumination, spots_on, blur_on = type_groups(type_code)
    color = halo = hole = blur = None
    spots = None
    if illumination:
        color = _color(rng, p)
        halo = _halo(rng, p, size, color.brightness)
        hole = _hole(rng, p, size)
        if fov_mean is not None:
            hole = resolve_hole_strength(hole, fov_mean, p)
    if spots_on:
        n = _int_between(rng, p.spot_count[0], p.spot_count[1], "spot count")
        spots = tuple(_spot(rng, p, size) for _ in range(n))
    if blur_on:
        blur = _blur(rng, p, size)
    code = cast(TypeCode, type_code)  # type_groups above refused anything else
    return DegradationRecord(code, p.name, p.model, size, color, halo, hole, spots, blur)
