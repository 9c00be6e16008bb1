"""Full-reference image quality inside the field of view: PSNR, SSIM and MS-SSIM.

All metrics take RGB uint8 images of equal shape and a FOV mask (HxW, bool or uint8 0/255) and
use only FOV pixels, so anything outside the FOV can change without changing the result. SSIM and
MS-SSIM average their quality maps over the FOV eroded by the Gaussian window radius, so that no
window used reaches outside the FOV.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

__all__ = [
    "METRIC_VERSION",
    "MS_SSIM_WEIGHTS",
    "PSNR_CAP",
    "REFERENCE_METRICS",
    "SSIM_SIGMA",
    "SSIM_WIN_RADIUS",
    "FOVTooSmallError",
    "check_image",
    "check_mask",
    "erode",
    "finite",
    "full_reference_metrics",
    "ms_ssim",
    "psnr",
    "ssim",
]

METRIC_VERSION = "fb-metrics-1"
"""Version of every metric definition in this package; bump when any value would change."""

DATA_RANGE = 255.0
PSNR_CAP = 100.0
"""Value that :func:`finite` writes in place of an infinite PSNR (identical images)."""

SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5  # scikit-image's default; gives an 11x11 window at sigma 1.5
SSIM_WIN_RADIUS = int(_SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
_K1, _K2 = 0.01, 0.03

MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Per-scale exponents of Wang, Simoncelli and Bovik (2003), finest scale first."""


class FOVTooSmallError(ValueError):
    """The FOV is too small for a metric's window (nothing is left after erosion)."""


def check_image(image: object, name: str = "image") -> np.ndarray:
    """Return ``image`` if it is an HxWx3 uint8 array, else raise TypeError / ValueError."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be HxWx3 RGB, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty, shape {image.shape}")
    return image


def check_mask(mask: object, shape: tuple[int, ...]) -> np.ndarray:
    """Validate a FOV mask (bool, or uint8 with values 0/255) of ``shape``; return it as bool."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a numpy array, got {type(mask).__name__}")
    if mask.shape != tuple(shape[:2]):
        raise ValueError(f"mask shape {mask.shape} does not match image shape {tuple(shape[:2])}")
    if mask.dtype == np.bool_:
        fov = mask
    elif mask.dtype == np.uint8:
        if np.any((mask != 0) & (mask != 255)):
            raise ValueError("uint8 mask must contain only 0 and 255")
        fov = mask == 255
    else:
        raise TypeError(f"mask must be bool or uint8 0/255, got {mask.dtype}")
    if not fov.any():
        raise ValueError("mask selects no pixels")
    return fov


def _check_pair(
    image: object, ref: object, mask: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = check_image(image, "image")
    b = check_image(ref, "ref")
    if a.shape != b.shape:
        raise ValueError(f"image shape {a.shape} does not match ref shape {b.shape}")
    return a, b, check_mask(mask, a.shape)


def erode(fov: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose (2*radius+1)^2 square neighbourhood lies inside ``fov`` (outside = not FOV)."""
    if radius <= 0:
        return fov
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    out = cv2.erode(fov.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return out.astype(bool)


def finite(value: float, cap: float = PSNR_CAP) -> float:
    """``value`` with +inf (and anything above ``cap``) replaced by ``cap``, e.g. for Parquet."""
    return min(float(value), cap)


def psnr(image: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over FOV pixels and all three channels (range 255).

    Identical images give ``+inf``; use :func:`finite` where a finite number is needed.
    """
    a, b, fov = _check_pair(image, ref, mask)
    diff = a[fov].astype(np.float64) - b[fov].astype(np.float64)
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(DATA_RANGE * DATA_RANGE / mse)


def ssim(image: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004, Gaussian window sigma 1.5) inside the FOV.

    The SSIM map is computed per channel on the full image (OpenCV Gaussian filtering; equal to
    scikit-image's ``structural_similarity`` with the same window, tested) and averaged over the
    channels and over the FOV eroded by the window radius (5 px).
    """
    a, b, fov = _check_pair(image, ref, mask)
    return float(_scale_means(a.astype(np.float64), b.astype(np.float64), fov)[0].mean())


def _scale_means(x: np.ndarray, y: np.ndarray, fov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel means of the SSIM map and of the contrast-structure map over the FOV
    eroded by the window radius; x, y are HxWx3 float64."""
    inner = erode(fov, SSIM_WIN_RADIUS)
    if not inner.any():
        raise FOVTooSmallError(
            f"FOV too small for SSIM at {x.shape[1]}x{x.shape[0]}: empty after erosion"
        )
    lum, cs = _ssim_terms(x, y)
    mask8 = inner.astype(np.uint8)
    cs_mean = _masked_mean(cs, mask8)
    lum *= cs
    return _masked_mean(lum, mask8), cs_mean


def _masked_mean(arr: np.ndarray, mask8: np.ndarray) -> np.ndarray:
    """Per-channel mean of an HxW or HxWx3 float64 array over the non-zero pixels of mask8."""
    n = arr.shape[2] if arr.ndim == 3 else 1
    return np.asarray(cv2.mean(arr, mask=mask8)[:n], dtype=np.float64)


def _blur(x: np.ndarray) -> np.ndarray:
    size = 2 * SSIM_WIN_RADIUS + 1
    return cv2.GaussianBlur(x, (size, size), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)


def _ssim_terms(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Luminance and contrast-structure maps of a channel pair, or of HxWx3 images channel by
    channel (float64)."""
    c1 = (_K1 * DATA_RANGE) ** 2
    c2 = (_K2 * DATA_RANGE) ** 2
    # In-place arithmetic: fresh full-size temporaries cost more than the maths here.
    mx, my = _blur(x), _blur(y)
    vx, vy, vxy = _blur(x * x), _blur(y * y), _blur(x * y)
    mxy = mx * my
    mx *= mx
    my *= my
    vx -= mx
    vy -= my
    vxy -= mxy
    lum = np.multiply(mxy, 2.0, out=mxy)
    lum += c1
    mx += my
    mx += c1
    lum /= mx
    cs = np.multiply(vxy, 2.0, out=vxy)
    cs += c2
    vx += vy
    vx += c2
    cs /= vx
    return lum, cs


def _pool(x: np.ndarray) -> np.ndarray:
    """2x2 average pooling (an odd last row/column is dropped)."""
    h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
    x = x[:h, :w]
    return 0.25 * (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2])


def ms_ssim(
    image: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray,
    *,
    weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
) -> float:
    """Multi-scale SSIM (Wang, Simoncelli and Bovik 2003) inside the FOV.

    At each of ``len(weights)`` scales (2x2 average pooling between scales) the contrast-structure
    term is averaged over the FOV of that scale eroded by the window radius; the coarsest scale
    uses the full SSIM (luminance x contrast-structure). The FOV at a coarser scale keeps only
    pooled pixels whose four parents were all inside the FOV, so no value depends on pixels
    outside it. Negative per-scale terms are clipped to 0 before the weighted geometric mean.
    Each channel is scored separately and the three values are averaged. With
    ``weights=(1.0,)`` this equals :func:`ssim`. Five scales need a FOV diameter of about
    270 px or more; smaller FOVs raise :class:`FOVTooSmallError` (pass fewer ``weights``).
    """
    a, b, fov = _check_pair(image, ref, mask)
    if not weights or any(w < 0 for w in weights):
        raise ValueError(f"weights must be a non-empty sequence of non-negative numbers: {weights}")
    return _ms_ssim(a.astype(np.float64), b.astype(np.float64), fov, weights)


def _ms_ssim(
    x: np.ndarray,
    y: np.ndarray,
    fov: np.ndarray,
    weights: tuple[float, ...],
    first: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """MS-SSIM of float64 HxWx3 images; ``first`` reuses the scale-1 means of :func:`ssim`."""
    per_channel = np.ones(3)
    for scale, weight in enumerate(weights):
        if scale:
            x, y = _pool(x), _pool(y)
            fov = _pool(fov.astype(np.float64)) == 1.0
        try:
            full, cs = first if (scale == 0 and first is not None) else _scale_means(x, y, fov)
        except FOVTooSmallError:
            raise FOVTooSmallError(
                f"FOV too small for {len(weights)}-scale MS-SSIM: empty after erosion at scale "
                f"{scale + 1} ({x.shape[1]}x{x.shape[0]})"
            ) from None
        term = full if scale == len(weights) - 1 else cs
        per_channel *= np.maximum(term, 0.0) ** weight
    return float(per_channel.mean())


def full_reference_metrics(
    image: np.ndarray, ref: np.ndarray, mask: np.ndarray
) -> dict[str, float]:
    """All full-reference metrics by registry name: ``psnr``, ``ssim`` and ``ms_ssim``.

    ``ms_ssim`` is NaN (a missing value, not an error) when the FOV is too small for its five
    scales, so that small working sizes still get PSNR and SSIM; every other problem raises.
    """
    a, b, fov = _check_pair(image, ref, mask)
    x, y = a.astype(np.float64), b.astype(np.float64)
    first = _scale_means(x, y, fov)  # shared by SSIM and the first MS-SSIM scale
    out = {"psnr": psnr(image, ref, mask), "ssim": float(first[0].mean())}
    try:
        out["ms_ssim"] = _ms_ssim(x, y, fov, MS_SSIM_WEIGHTS, first)
    except FOVTooSmallError:
        out["ms_ssim"] = math.nan
    return out


REFERENCE_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "psnr": psnr,
    "ssim": ssim,
    "ms_ssim": ms_ssim,
}
"""Registry of full-reference metrics, ``name -> fn(image, ref, mask)``."""
