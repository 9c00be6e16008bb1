"""A classical, weight-free enhancer: FOV-aware luminosity and contrast normalisation.

The slowly varying illumination (background) of each channel is estimated inside the field of
view only, by normalised convolution (a masked Gaussian mean: the black surround never bleeds
into the estimate at the rim), on a coarse grid and upsampled. Its deviation from the FOV's mean
is removed, after Foracchia et al. 2005 (luminosity normalisation), but only where it is larger
than natural shading (a soft threshold on luma), only for regions darker than the mean (the
degradations' "hole") and only away from the rim (a fundus is naturally darker there).
Optionally CLAHE runs on the L channel of Lab, fed only FOV values. The output is RGB uint8,
zero outside the FOV. CPU only and deterministic.

Measured against clean photographs (FOV PSNR after ``fundus_batch.degrade``), the plain
Foracchia normalisation (full division or subtraction of the background, or CLAHE) loses 10 to
12 dB on spot- and blur-only images: it removes the photograph's own shading. The restrictions
above keep that loss near 0.1 dB while illumination types gain about +0.4 dB
(``bench/classical.py``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import cv2
import numpy as np

VERSION = "1"
MODEL_NAME = f"classical-{VERSION}"


@dataclass(frozen=True)
class ClassicalParams:
    """Parameters of the classical enhancer (their hash identifies its output)."""

    sigma: float = 0.05
    """Gaussian scale of the background, as a fraction of the FOV diameter."""
    deadzone: float = 15.0
    """Luma deviations of the background up to this many grey levels are natural shading and
    left alone; larger ones are shrunk by it (soft threshold)."""
    strength: float = 1.0
    """Share of the (shrunk) deviation that is removed (0..1)."""
    lift_inner: float = 0.3
    """Dark regions are lifted fully within this fraction of the FOV radius ..."""
    lift_outer: float = 0.7
    """... and not at all beyond this one (the natural darker rim is kept)."""
    grid: int = 64
    """The background is estimated on a grid of this many cells along the FOV diameter."""
    clahe_clip: float = 0.0
    """CLAHE clip limit on L of Lab; 0 leaves contrast alone."""
    clahe_tiles: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.sigma <= 1.0:
            raise ValueError(f"sigma must be in (0, 1], got {self.sigma}")
        if self.deadzone < 0.0:
            raise ValueError(f"deadzone must be >= 0, got {self.deadzone}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if not 0.0 <= self.lift_inner < self.lift_outer:
            raise ValueError(
                f"need 0 <= lift_inner < lift_outer, got {self.lift_inner}, {self.lift_outer}"
            )
        if not 8 <= self.grid <= 1024:
            raise ValueError(f"grid must be in [8, 1024], got {self.grid}")
        if self.clahe_clip < 0.0:
            raise ValueError(f"clahe_clip must be >= 0, got {self.clahe_clip}")
        if not 1 <= self.clahe_tiles <= 64:
            raise ValueError(f"clahe_tiles must be in [1, 64], got {self.clahe_tiles}")

    def sha256(self) -> str:
        """A stable hash of the version and the parameters."""
        text = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


DEFAULT_PARAMS = ClassicalParams()


def _check(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Validate the inputs; returns the boolean FOV."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 array, got {getattr(image, 'dtype', type(image))}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 RGB, got shape {image.shape}")
    if not isinstance(mask, np.ndarray) or mask.shape != image.shape[:2]:
        shape = getattr(mask, "shape", type(mask))
        raise ValueError(f"mask must be HxW matching the image {image.shape[:2]}, got {shape}")
    fov = mask > 0
    if not fov.any():
        raise ValueError("the FOV mask is empty")
    return fov


def masked_background(
    values: np.ndarray, fov: np.ndarray, sigma: float, grid: int = 64
) -> np.ndarray:
    """The Gaussian-weighted mean of ``values`` (HxW or HxWxC float32) over FOV pixels only.

    ``sigma`` is a fraction of the FOV diameter. Normalised convolution on a coarse grid
    (area-averaged values and mask, blurred, divided), upsampled bilinearly to HxW: defined
    everywhere the blurred mask reaches, independent of what lies outside the FOV.
    """
    h, w = fov.shape
    ys, xs = np.nonzero(fov)
    diameter = max(int(ys.max() - ys.min()), int(xs.max() - xs.min())) + 1
    cell = max(1.0, diameter / grid)
    gw, gh = max(2, round(w / cell)), max(2, round(h / cell))
    weight = fov.astype(np.float32)
    masked = values * (weight if values.ndim == 2 else weight[..., None])
    small_v = cv2.resize(masked, (gw, gh), interpolation=cv2.INTER_AREA)
    small_w = cv2.resize(weight, (gw, gh), interpolation=cv2.INTER_AREA)
    s = sigma * diameter / cell
    blur_v = cv2.GaussianBlur(small_v, (0, 0), s, borderType=cv2.BORDER_CONSTANT)
    blur_w = cv2.GaussianBlur(small_w, (0, 0), s, borderType=cv2.BORDER_CONSTANT)
    # The weight is tiny only far outside the FOV; the guard keeps those cells finite.
    floor = np.float32(1e-3 * float(blur_w.max()))
    denom = np.maximum(blur_w, floor)
    ratio = blur_v / (denom if blur_v.ndim == 2 else denom[..., None])
    return cv2.resize(ratio, (w, h), interpolation=cv2.INTER_LINEAR)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _lift_weight(fov: np.ndarray, params: ClassicalParams) -> np.ndarray:
    """1 in the FOV's centre, falling linearly to 0 between ``lift_inner`` and ``lift_outer``
    times the FOV radius (the circle of the mask's bounding box)."""
    h, w = fov.shape
    ys, xs = np.nonzero(fov)
    cy, cx = (ys.min() + ys.max()) / 2.0, (xs.min() + xs.max()) / 2.0
    radius = (max(ys.max() - ys.min(), xs.max() - xs.min()) + 1) / 2.0
    yy, xx = np.ogrid[0:h, 0:w]
    r = np.sqrt(((yy - cy) / radius) ** 2 + ((xx - cx) / radius) ** 2)
    ramp = (params.lift_outer - r) / (params.lift_outer - params.lift_inner)
    return np.clip(ramp, 0.0, 1.0).astype(np.float32)


def _clahe_in_fov(rgb: np.ndarray, fov: np.ndarray, params: ClassicalParams) -> np.ndarray:
    """CLAHE on L of Lab; outside the FOV L is filled with its smooth FOV extension so the
    black surround does not weigh on the tiles' histograms."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    light = lab[..., 0]
    fill = masked_background(light.astype(np.float32), fov, params.sigma, params.grid)
    filled = np.where(fov, light, np.clip(fill + 0.5, 0, 255).astype(np.uint8))
    tiles = (params.clahe_tiles, params.clahe_tiles)
    clahe = cv2.createCLAHE(clipLimit=params.clahe_clip, tileGridSize=tiles)
    lab[..., 0] = clahe.apply(filled)
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def enhance_classical(
    image: np.ndarray, mask: np.ndarray, params: ClassicalParams = DEFAULT_PARAMS
) -> np.ndarray:
    """Normalise luminosity (and optionally contrast) of an RGB uint8 image inside its FOV.

    ``mask`` is HxW, nonzero inside the FOV. Returns RGB uint8, zero outside the FOV.
    """
    fov = _check(image, mask)
    rgb = image.astype(np.float32)
    if params.strength > 0.0:
        background = masked_background(rgb, fov, params.sigma, params.grid)
        deviation = background[fov].mean(axis=0) - background  # > 0 where darker than usual
        dev_luma = _luma(deviation)
        # The soft threshold acts on luma; where it leaves something, the same share of every
        # channel's deviation is removed, so a lifted region gets its surroundings' colour.
        kept = np.maximum(dev_luma - params.deadzone, 0.0)
        share = kept / np.maximum(dev_luma, 1e-3) * _lift_weight(fov, params)
        rgb += (params.strength * share)[..., None] * deviation
    out = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    if params.clahe_clip > 0.0:
        out = _clahe_in_fov(out, fov, params)
    out[~fov] = 0
    return out


class ClassicalEnhancer:
    """The classical enhancer with fixed parameters, named and hashed like a model."""

    def __init__(self, params: ClassicalParams = DEFAULT_PARAMS) -> None:
        self.params = params
        self.model_name = MODEL_NAME
        self.model_sha256 = params.sha256()

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return enhance_classical(image, mask, self.params)
