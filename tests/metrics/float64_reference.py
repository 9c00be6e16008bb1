"""Straightforward float64 versions of the FOV metrics (protocol ``fb-metrics-1``).

Written for clarity, not speed, and on different libraries where one exists (SciPy filters,
NumPy reductions, scikit-image's ``blur_effect``), so that the fast float32 implementations in
``fundus_batch.metrics`` are checked against an independent computation of the same
definitions. Used by the metric tests and by ``bench/metrics.py``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage
from skimage.measure import blur_effect as skimage_blur_effect

from fundus_batch.metrics.noref import (
    BLUR_EFFECT_H_SIZE,
    LAPLACIAN_MARGIN,
    OVEREXPOSED_Y,
    UNDEREXPOSED_Y,
    UNIFORMITY_GRID,
    inscribed_square,
)
from fundus_batch.metrics.reference import MS_SSIM_WEIGHTS

SIGMA = 1.5
RADIUS = 5  # int(3.5 * 1.5 + 0.5): scikit-image's window at sigma 1.5
C1 = (0.01 * 255) ** 2
C2 = (0.03 * 255) ** 2
UNIFORMITY_SIGMA = 3.0


def _erode(fov: np.ndarray, radius: int) -> np.ndarray:
    square = np.ones((2 * radius + 1, 2 * radius + 1), bool)
    return ndimage.binary_erosion(fov, square, border_value=0)


def _gauss(x: np.ndarray) -> np.ndarray:
    """Gaussian filter of an HxWx3 float64 image, channel by channel."""
    return ndimage.gaussian_filter(x, (SIGMA, SIGMA, 0), mode="reflect", truncate=RADIUS / SIGMA)


def _ssim_maps(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SSIM and contrast-structure maps of two float64 HxWx3 images."""
    mx, my = _gauss(x), _gauss(y)
    vx = _gauss(x * x) - mx * mx
    vy = _gauss(y * y) - my * my
    cov = _gauss(x * y) - mx * my
    cs = (2 * cov + C2) / (vx + vy + C2)
    lum = (2 * mx * my + C1) / (mx * mx + my * my + C1)
    return lum * cs, cs


def _pool(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
    x = x[:h, :w].astype(np.float64)
    return (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]) / 4


def psnr(image: np.ndarray, ref: np.ndarray, fov: np.ndarray) -> float:
    """PSNR over the FOV pixels of all three channels (inf for identical images)."""
    diff = image[fov].astype(np.float64) - ref[fov].astype(np.float64)
    mse = float(np.mean(diff**2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ms_ssim(
    image: np.ndarray,
    ref: np.ndarray,
    fov: np.ndarray,
    weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
) -> float:
    """MS-SSIM per channel (CS at every scale but the last, SSIM at the last), then averaged
    over the channels; NaN when an eroded FOV is empty. ``weights=(1.0,)`` gives SSIM."""
    x, y, f = image.astype(np.float64), ref.astype(np.float64), fov
    per_channel = np.ones(3)
    for scale, weight in enumerate(weights):
        if scale:
            x, y, f = _pool(x), _pool(y), _pool(f) == 1.0
        inner = _erode(f, RADIUS)
        if not inner.any():
            return math.nan
        full, cs = _ssim_maps(x, y)
        term = full if scale == len(weights) - 1 else cs
        per_channel *= np.maximum(term[inner].mean(axis=0), 0.0) ** weight
    return float(per_channel.mean())


def ssim(image: np.ndarray, ref: np.ndarray, fov: np.ndarray) -> float:
    """SSIM averaged over the eroded FOV and the channels."""
    return ms_ssim(image, ref, fov, weights=(1.0,))


def full_reference(image: np.ndarray, ref: np.ndarray, fov: np.ndarray) -> dict[str, float]:
    """PSNR, SSIM and MS-SSIM as ``fundus_batch.metrics.full_reference_metrics`` names them."""
    return {
        "psnr": psnr(image, ref, fov),
        "ssim": ssim(image, ref, fov),
        "ms_ssim": ms_ssim(image, ref, fov),
    }


def luma(image: np.ndarray) -> np.ndarray:
    """Rec.601 luma in float64."""
    return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _uniformity(y: np.ndarray, fov: np.ndarray) -> float:
    h, w = fov.shape
    scale = min(1.0, UNIFORMITY_GRID / max(h, w))
    dsize = (max(1, round(w * scale)), max(1, round(h * scale)))
    m = fov.astype(np.float64)
    ym_small = cv2.resize(y * m, dsize, interpolation=cv2.INTER_AREA)
    m_small = cv2.resize(m, dsize, interpolation=cv2.INTER_AREA)
    num = ndimage.gaussian_filter(ym_small, UNIFORMITY_SIGMA, mode="constant", truncate=4.0)
    den = ndimage.gaussian_filter(m_small, UNIFORMITY_SIGMA, mode="constant", truncate=4.0)
    inside = m_small >= 0.5
    if not inside.any():
        inside = m_small >= m_small.max()
    low = num[inside] / den[inside]
    return 0.0 if low.std() == 0 else float(low.std() / low.mean())


def noref(image: np.ndarray, fov: np.ndarray) -> dict[str, float]:
    """The seven no-reference metrics under their column names."""
    y = luma(image)
    vals = y[fov]
    inner = _erode(fov, LAPLACIAN_MARGIN)
    rows, cols = inscribed_square(fov)
    return {
        "nr_luminance": float(vals.mean()),
        "nr_uniformity": _uniformity(y, fov),
        "nr_rms_contrast": float(vals.std() / 255),
        "nr_laplacian_var": float(ndimage.laplace(y, mode="reflect")[inner].var()),
        "nr_blur_effect": float(
            skimage_blur_effect(y[rows, cols] / 255.0, h_size=BLUR_EFFECT_H_SIZE)
        ),
        "nr_overexposed": float(np.mean(vals >= OVEREXPOSED_Y)),
        "nr_underexposed": float(np.mean(vals <= UNDEREXPOSED_Y)),
    }
