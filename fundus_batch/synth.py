"""Synthetic fundus photographs with exact vessel maps and field-of-view masks.

``synth_fundus`` draws a plausible colour fundus image from a seed: a black surround, a circular
field of view (FOV) with vignetting and choroidal texture, a bright optic disc on the nasal side, a
darker macula temporal to it and a branching artery/vein tree growing out of the disc. The vessel
map is the exact binary rasterisation used to darken the image, so it is usable as ground truth.
The tree topology is defined in units of the FOV diameter, so one seed gives the same eye at any
size. Everything is driven by a local ``numpy.random.Generator``; no global RNG is touched.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = ["MIN_SIZE", "SynthFundus", "synth_fundus", "write_synthetic_set"]

MIN_SIZE = 32
"""Smallest supported FOV side in pixels."""

_SHIFT = 4  # cv2 sub-pixel bits for line end points
_SCALE = float(1 << _SHIFT)

# Fraction of the channel removed at full vessel strength (R, G, B): veins darker than arteries.
_VEIN_DARKEN = np.array([0.30, 0.55, 0.45], dtype=np.float32)
_ARTERY_DARKEN = np.array([0.16, 0.36, 0.28], dtype=np.float32)

# Tree geometry in units of the FOV diameter.
_VEIN_TRUNK = 0.012
_ARTERY_TRUNK = 0.0092
_MIN_WIDTH = 0.0021
_STEP = 0.006


@dataclass
class SynthFundus:
    """A synthetic fundus photograph and its exact ground truth.

    ``image`` is HxWx3 uint8 RGB, ``vessels`` and ``mask`` are HxW uint8 in {0, 255} and
    ``circle`` is the FOV circle ``(cx, cy, r)`` in pixels of ``image`` (pixel centres at integer
    coordinates; ``mask`` is 255 where ``(x - cx)**2 + (y - cy)**2 <= r**2``).
    """

    image: np.ndarray
    vessels: np.ndarray
    mask: np.ndarray
    circle: tuple[float, float, float]


@dataclass
class _Branch:
    x: float
    y: float
    heading: float
    width: float  # fraction of the FOV diameter
    turn: float  # steady turn per step (radians)
    turn_until: float  # steady turning stops once heading is within this of `target`
    target: float
    artery: bool
    budget: float  # remaining length, fraction of the FOV diameter


def synth_fundus(
    size: int = 512, seed: int = 0, *, canvas: tuple[int, int] | None = None
) -> SynthFundus:
    """Render a synthetic fundus photograph.

    ``size`` is the side of the square that holds the FOV circle (diameter ``size`` minus a small
    margin). With ``canvas=(width, height)`` that square is centred in a larger (or smaller) black
    frame like a raw camera photograph, clipped where it does not fit, and all outputs are
    canvas-sized. Same ``(size, seed, canvas)`` gives the same bytes.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if canvas is not None:
        if (
            not isinstance(canvas, tuple)
            or len(canvas) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in canvas)
        ):
            raise TypeError(f"canvas must be a (width, height) tuple of ints, got {canvas!r}")
        if canvas[0] < 1 or canvas[1] < 1:
            raise ValueError(f"canvas sides must be >= 1, got {canvas}")

    size = int(size)
    rng = np.random.default_rng(int(seed))
    margin = max(1.0, round(0.015 * size))
    c = (size - 1) / 2.0
    r = size / 2.0 - margin
    diam = 2.0 * r

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dist2 = (xx - c) ** 2 + (yy - c) ** 2
    mask = dist2 <= r * r

    side = 1.0 if rng.random() < 0.5 else -1.0  # +1: disc right of centre
    # Geometry in units of the FOV diameter, origin at the FOV centre: size-independent.
    disc_rn = rng.uniform(0.9, 1.1) / 14.0
    disc_n = (side * rng.uniform(0.19, 0.23), rng.uniform(-0.03, 0.03))
    fovea_n = (disc_n[0] - side * 5.0 * disc_rn, disc_n[1] + disc_rn * rng.uniform(0.1, 0.5))
    disc = (c + disc_n[0] * diam, c + disc_n[1] * diam)
    fovea = (c + fovea_n[0] * diam, c + fovea_n[1] * diam)
    disc_r = disc_rn * diam

    image = _background(rng, size, xx, yy, dist2, c, r)
    _add_macula(image, xx, yy, fovea, disc_r, rng)
    _add_disc(image, disc, disc_r, side, rng)

    segments = _grow_tree(rng, disc_n, disc_rn, fovea_n, side)
    vessels_bool = _draw_vessels(image, segments, c, diam, mask)

    image += 1.2 * rng.standard_normal(image.shape, dtype=np.float32)
    out = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    out[~mask] = 0
    vessels = np.where(vessels_bool, np.uint8(255), np.uint8(0))
    mask_u8 = np.where(mask, np.uint8(255), np.uint8(0))

    if canvas is None:
        return SynthFundus(out, vessels, mask_u8, (c, c, r))
    return _place(out, vessels, mask_u8, (c, c, r), canvas)


def _lowres_noise(rng: np.random.Generator, grid: int, size: int) -> np.ndarray:
    """Smooth noise: a ``grid`` x ``grid`` normal field upsampled bicubically to ``size``."""
    small = rng.standard_normal((grid, grid)).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _background(
    rng: np.random.Generator,
    size: int,
    xx: np.ndarray,
    yy: np.ndarray,
    dist2: np.ndarray,
    c: float,
    r: float,
) -> np.ndarray:
    """Orange-red fundus with vignetting, uneven illumination and choroidal texture."""
    base = np.array(
        [rng.uniform(185, 215), rng.uniform(52, 75), rng.uniform(24, 42)], dtype=np.float32
    )
    rho = np.sqrt(dist2) / r
    falloff = 1.0 - rng.uniform(0.3, 0.45) * np.clip(rho, 0, 1) ** rng.uniform(2.2, 3.2)
    angle = rng.uniform(0, 2 * math.pi)
    tilt = rng.uniform(0.0, 0.08)
    gradient = 1.0 + tilt * ((xx - c) * math.cos(angle) + (yy - c) * math.sin(angle)) / r
    illum = falloff * gradient * (1.0 + 0.04 * _lowres_noise(rng, 6, size))

    # Choroidal vessels: ridges where a mid-frequency field crosses zero, seen through the RPE.
    field = _lowres_noise(rng, 36, size)
    choroid = np.exp(-((field / 0.35) ** 2)) * (0.6 + 0.4 * _lowres_noise(rng, 10, size))
    strength = rng.uniform(0.03, 0.07)

    image = np.empty((size, size, 3), dtype=np.float32)
    for ch, k in enumerate((0.5, 1.4, 1.2)):
        image[..., ch] = base[ch] * illum * (1.0 - strength * k * choroid)
    return image


def _add_macula(
    image: np.ndarray,
    xx: np.ndarray,
    yy: np.ndarray,
    fovea: tuple[float, float],
    disc_r: float,
    rng: np.random.Generator,
) -> None:
    d2 = (xx - fovea[0]) ** 2 + (yy - fovea[1]) ** 2
    macula = rng.uniform(0.2, 0.3) * np.exp(-d2 / (2 * (1.3 * disc_r) ** 2))
    pit = rng.uniform(0.12, 0.2) * np.exp(-d2 / (2 * (0.35 * disc_r) ** 2))
    for ch, k in enumerate((0.8, 1.2, 1.1)):
        image[..., ch] *= 1.0 - k * (macula + pit)


def _add_disc(
    image: np.ndarray,
    disc: tuple[float, float],
    disc_r: float,
    side: float,
    rng: np.random.Generator,
) -> None:
    """Blend a yellowish disc with a paler cup and a faint peripapillary halo into ``image``."""
    size = image.shape[0]
    reach = 3.0 * disc_r
    x0, x1 = max(0, int(disc[0] - reach)), min(size, int(disc[0] + reach) + 1)
    y0, y1 = max(0, int(disc[1] - reach)), min(size, int(disc[1] + reach) + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    ecc = rng.uniform(0.9, 1.1)
    d = np.sqrt(((xx - disc[0]) * ecc) ** 2 + ((yy - disc[1]) / ecc) ** 2)
    edge = max(1.0, 0.18 * disc_r)
    rim = np.clip((disc_r - d) / edge + 0.5, 0, 1)
    halo = 0.25 * np.exp(-(np.maximum(d - disc_r, 0) ** 2) / (2 * (0.4 * disc_r) ** 2))
    cup_c = (disc[0] - side * 0.15 * disc_r, disc[1])
    cup_d = np.sqrt((xx - cup_c[0]) ** 2 + (yy - cup_c[1]) ** 2)
    cup = np.clip((0.5 * disc_r - cup_d) / edge + 0.5, 0, 1)
    disc_rgb = np.array([248, rng.uniform(190, 220), rng.uniform(120, 160)], dtype=np.float32)
    cup_rgb = np.array([255, 245, 215], dtype=np.float32)
    alpha = np.maximum(0.85 * rim, halo * (1 - rim))[..., None]
    cup_a = (0.8 * cup)[..., None]
    patch = image[y0:y1, x0:x1]
    patch *= 1 - alpha
    patch += alpha * disc_rgb
    patch *= 1 - cup_a
    patch += cup_a * cup_rgb


def _angle_diff(a: float, b: float) -> float:
    """Signed smallest difference ``a - b`` in radians."""
    return (a - b + math.pi) % (2 * math.pi) - math.pi


def _grow_tree(
    rng: np.random.Generator,
    disc: tuple[float, float],
    disc_r: float,
    fovea: tuple[float, float],
    side: float,
) -> list[tuple[float, float, float, float, float, bool]]:
    """Grow artery and vein trees from the disc; returns segments (x0, y0, x1, y1, width, artery).

    All lengths are fractions of the FOV diameter, with the origin at the FOV centre, so that
    the same random draws give the same tree at every image size.
    """
    temporal = math.pi if side > 0 else 0.0  # heading towards the macula
    nasal = 0.0 if side > 0 else math.pi
    stack: list[_Branch] = []
    for artery in (False, True):
        trunk = _ARTERY_TRUNK if artery else _VEIN_TRUNK
        jitter = 0.12 if artery else -0.12
        for v in (-1.0, 1.0):  # -1 superior (up), +1 inferior
            vertical = v * math.pi / 2
            # Temporal arcade: leaves the disc nearly vertically and sweeps round the macula.
            h0 = vertical + _angle_diff(temporal, vertical) * rng.uniform(0.15, 0.3) + jitter * v
            turn = -math.copysign(1.0, _angle_diff(h0, temporal)) * _STEP / rng.uniform(0.3, 0.4)
            stack.append(
                _Branch(*disc, h0, trunk, turn, 0.1, temporal, artery, rng.uniform(0.9, 1.2))
            )
            # Nasal vessels: thinner, fanning towards the nasal periphery.
            h1 = vertical + _angle_diff(nasal, vertical) * rng.uniform(0.3, 0.6)
            turn = -math.copysign(1.0, _angle_diff(h1, nasal)) * _STEP / rng.uniform(0.4, 0.7)
            stack.append(
                _Branch(*disc, h1, trunk * 0.7, turn, 0.3, nasal, artery, rng.uniform(0.5, 0.7))
            )
        # Small direct branches to the macula and straight nasal.
        for target, frac in ((temporal, 0.35), (nasal, 0.5)):
            h = target + rng.uniform(-0.35, 0.35)
            stack.append(_Branch(*disc, h, trunk * frac, 0.0, 0.0, h, artery, 0.3))

    segments: list[tuple[float, float, float, float, float, bool]] = []
    fovea_keepout = (0.45 * disc_r) ** 2
    rim2 = 0.499**2
    while stack:
        b = stack.pop()
        x, y, heading, width = b.x, b.y, b.heading, b.width
        travelled = 0.0
        next_branch = rng.exponential(_branch_spacing(width))
        while travelled < b.budget and width >= _MIN_WIDTH:
            if abs(_angle_diff(heading, b.target)) > b.turn_until:
                heading += b.turn
            heading += rng.normal(0.0, 0.04)
            nx = x + _STEP * math.cos(heading)
            ny = y + _STEP * math.sin(heading)
            if nx * nx + ny * ny > rim2:
                break
            if (nx - fovea[0]) ** 2 + (ny - fovea[1]) ** 2 < fovea_keepout:
                break
            segments.append((x, y, nx, ny, width, b.artery))
            x, y = nx, ny
            travelled += _STEP
            width *= 1.0 - 0.004
            if travelled >= next_branch:
                child_w = width * rng.uniform(0.3, 0.75)
                width = (width**3 - 0.5 * child_w**3) ** (1 / 3)
                sign = 1.0 if rng.random() < 0.5 else -1.0
                child_h = heading + sign * rng.uniform(0.45, 1.2)
                # Children curve gently and steadily: their target heading is never reached.
                stack.append(
                    _Branch(
                        x=x,
                        y=y,
                        heading=child_h,
                        width=child_w,
                        turn=sign * rng.uniform(0.0, 0.006),
                        turn_until=0.0,
                        target=child_h + sign * math.pi,
                        artery=b.artery,
                        budget=min(b.budget - travelled, 30.0 * child_w + rng.uniform(0.03, 0.15)),
                    )
                )
                next_branch = travelled + rng.exponential(_branch_spacing(width))
    return segments


def _branch_spacing(width: float) -> float:
    """Mean distance between branch points, shorter on thinner vessels."""
    return 0.05 + 6.0 * width


def _draw_vessels(
    image: np.ndarray,
    segments: list[tuple[float, float, float, float, float, bool]],
    c: float,
    diam: float,
    mask: np.ndarray,
) -> np.ndarray:
    """Rasterise segments into the binary vessel map and darken ``image`` along the same lines."""
    size = mask.shape[0]
    layers = {False: np.zeros((size, size), np.float32), True: np.zeros((size, size), np.float32)}
    vmap = np.zeros((size, size), np.uint8)
    # Thin (faint) first so thicker vessels overwrite them at junctions.
    for x0, y0, x1, y1, w, artery in sorted(segments, key=lambda s: s[4]):
        if w * diam < 0.5:  # sub-pixel vessels are invisible at this size
            continue
        thickness = max(1, round(w * diam))
        p0 = (round((c + x0 * diam) * _SCALE), round((c + y0 * diam) * _SCALE))
        p1 = (round((c + x1 * diam) * _SCALE), round((c + y1 * diam) * _SCALE))
        strength = min(1.0, 0.35 + 0.65 * w / _VEIN_TRUNK)
        cv2.line(layers[artery], p0, p1, strength, thickness, cv2.LINE_8, _SHIFT)
        cv2.line(vmap, p0, p1, 1, thickness, cv2.LINE_8, _SHIFT)
    vmap_bool = (vmap > 0) & mask
    sigma = max(0.4, size / 1024)
    veins = cv2.GaussianBlur(layers[False], (0, 0), sigma)
    arteries = cv2.GaussianBlur(layers[True], (0, 0), sigma)
    for ch in range(3):
        dark = np.maximum(veins * _VEIN_DARKEN[ch], arteries * _ARTERY_DARKEN[ch])
        image[..., ch] *= 1.0 - dark
    return vmap_bool


def _place(
    image: np.ndarray,
    vessels: np.ndarray,
    mask: np.ndarray,
    circle: tuple[float, float, float],
    canvas: tuple[int, int],
) -> SynthFundus:
    """Centre the FOV square in a black ``canvas`` (width, height), clipping what falls outside."""
    cw, ch = int(canvas[0]), int(canvas[1])
    size = image.shape[0]
    ox, oy = (cw - size) // 2, (ch - size) // 2
    # Destination and source windows of the overlap.
    dx0, dy0 = max(ox, 0), max(oy, 0)
    dx1, dy1 = min(ox + size, cw), min(oy + size, ch)
    sx0, sy0 = dx0 - ox, dy0 - oy
    sx1, sy1 = sx0 + (dx1 - dx0), sy0 + (dy1 - dy0)

    def paste(src: np.ndarray) -> np.ndarray:
        dst = np.zeros((ch, cw, *src.shape[2:]), dtype=src.dtype)
        dst[dy0:dy1, dx0:dx1] = src[sy0:sy1, sx0:sx1]
        return dst

    cx, cy, r = circle
    return SynthFundus(paste(image), paste(vessels), paste(mask), (cx + ox, cy + oy, r))


def write_synthetic_set(
    folder: str | os.PathLike[str], count: int = 8, size: int = 512, seed: int = 0
) -> Path:
    """Write ``count`` photographs (``synth_<seed>.png``) with their vessel maps and FOV masks
    beside them, and ``manifest.csv`` (``image_id``, ``uri``, ``mask_uri``, ``vessel_uri``,
    absolute paths) listing the photographs only; returns the manifest path."""
    import csv
    import io

    from fundus_batch.io.codecs import encode_png
    from fundus_batch.io.storage import write_local_files

    out = Path(folder).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        s = synth_fundus(size, seed=seed + i)
        stem = f"synth_{seed + i:05d}"
        paths = {kind: out / f"{stem}{kind}.png" for kind in ("", "_vessel", "_mask")}
        # Each file whole or not at all: a kill never leaves a cut PNG under its name.
        write_local_files(
            [
                (paths[""], encode_png(s.image)),
                (paths["_vessel"], encode_png(s.vessels)),
                (paths["_mask"], encode_png(s.mask)),
            ]
        )
        rows.append([stem, paths[""], paths["_mask"], paths["_vessel"]])
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["image_id", "uri", "mask_uri", "vessel_uri"])
    writer.writerows([[str(v) for v in row] for row in rows])
    manifest = out / "manifest.csv"
    write_local_files([(manifest, text.getvalue().encode())])
    return manifest
