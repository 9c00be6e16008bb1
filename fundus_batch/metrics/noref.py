"""No-reference image quality inside the field of view.

Every metric works on Rec.601 luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (0-255, unrounded) of an
RGB uint8 image and uses only pixels inside the FOV mask (HxW, bool or uint8 0/255): pixels
outside the FOV never change a value. :func:`noref_metrics` computes them all at once under the
column names of :data:`NOREF_METRICS`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import cv2
import numpy as np

from .reference import FOVTooSmallError, check_image, check_mask, erode, frozen_copy

__all__ = [
    "BLUR_EFFECT_H_SIZE",
    "LAPLACIAN_MARGIN",
    "NOREF_METRICS",
    "OVEREXPOSED_Y",
    "UNDEREXPOSED_Y",
    "UNIFORMITY_GRID",
    "NorefContext",
    "blur_effect",
    "inscribed_square",
    "laplacian_variance",
    "luma",
    "luminance",
    "noref_context",
    "noref_metrics",
    "overexposed",
    "rms_contrast",
    "underexposed",
    "uniformity",
]

OVEREXPOSED_Y = 250.0
"""Luma at or above which a FOV pixel counts as over-exposed (clipped highlights)."""
UNDEREXPOSED_Y = 10.0
"""Luma at or below which a FOV pixel counts as under-exposed (lost in the noise floor)."""
LAPLACIAN_MARGIN = 3
"""The Laplacian is taken on the FOV eroded by this many pixels, away from the FOV edge step."""
UNIFORMITY_GRID = 64
"""Luma is area-reduced so that its longer side is this many pixels before the low-pass."""
_UNIFORMITY_SIGMA = 3.0  # Gaussian sigma on the reduced grid (~5% of the FOV diameter)
BLUR_EFFECT_H_SIZE = 11
"""Re-blurring filter size of :func:`skimage.measure.blur_effect`."""

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def luma(image: np.ndarray) -> np.ndarray:
    """Rec.601 luma (HxW float32, 0-255) of an RGB uint8 image."""
    check_image(image)
    return cv2.transform(image.astype(np.float32), _LUMA[None, :])


class NorefContext:
    """What the no-reference metrics derive from a FOV mask alone, computed on first use and
    kept: score every image that shares a mask (all variants of one photograph) with one."""

    def __init__(self, mask: np.ndarray, shape: tuple[int, ...]) -> None:
        self.fov = frozen_copy(check_mask(mask, shape))  # a caller's buffer may be refilled
        self.shape = tuple(shape[:2])
        self.fov8 = self.fov.astype(np.uint8)
        self.count = int(np.count_nonzero(self.fov))

    def check(self, image: np.ndarray) -> None:
        """Raise ValueError unless ``image`` has this mask's height and width."""
        if image.shape[:2] != self.shape:
            raise ValueError(
                f"mask shape {self.shape} does not match image shape {image.shape[:2]}"
            )

    @cached_property
    def laplacian_fov8(self) -> np.ndarray:
        """The FOV eroded by ``LAPLACIAN_MARGIN`` px, as a uint8 mask."""
        inner = erode(self.fov, LAPLACIAN_MARGIN)
        if not inner.any():
            raise FOVTooSmallError(f"FOV too small: empty after eroding by {LAPLACIAN_MARGIN} px")
        return inner.astype(np.uint8)

    @cached_property
    def square(self) -> tuple[slice, slice]:
        """The square of :func:`inscribed_square`."""
        return inscribed_square(self.fov)

    @cached_property
    def uniformity_grid(self) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
        """(reduced size, reduced mask, low-passed reduced mask) of :func:`uniformity`."""
        h, w = self.shape
        scale = min(1.0, UNIFORMITY_GRID / max(h, w))
        dsize = (max(1, round(w * scale)), max(1, round(h * scale)))
        m_small = cv2.resize(self.fov.astype(np.float32), dsize, interpolation=cv2.INTER_AREA)
        den = cv2.GaussianBlur(m_small, (0, 0), _UNIFORMITY_SIGMA, borderType=cv2.BORDER_CONSTANT)
        inside = m_small >= 0.5
        if not inside.any():
            inside = m_small >= m_small.max()
        return dsize, inside, den[inside].astype(np.float64)


def noref_context(mask: np.ndarray, shape: tuple[int, ...]) -> NorefContext:
    """A :class:`NorefContext` for images of ``shape`` scored inside ``mask``."""
    return NorefContext(mask, shape)


def _mean_y(y: np.ndarray, ctx: NorefContext) -> float:
    return float(cv2.mean(y, mask=ctx.fov8)[0])


def _rms_contrast_y(y: np.ndarray, ctx: NorefContext) -> float:
    return float(cv2.meanStdDev(y, mask=ctx.fov8)[1][0, 0] / 255.0)


def _overexposed_y(y: np.ndarray, ctx: NorefContext) -> float:
    return float(np.count_nonzero((y >= OVEREXPOSED_Y) & ctx.fov) / ctx.count)


def _underexposed_y(y: np.ndarray, ctx: NorefContext) -> float:
    return float(np.count_nonzero((y <= UNDEREXPOSED_Y) & ctx.fov) / ctx.count)


def _uniformity_y(y: np.ndarray, ctx: NorefContext) -> float:
    dsize, inside, den = ctx.uniformity_grid
    ym_small = cv2.resize(y * ctx.fov, dsize, interpolation=cv2.INTER_AREA)
    # Normalised convolution: a FOV-only low-pass that the black surround does not darken.
    num = cv2.GaussianBlur(ym_small, (0, 0), _UNIFORMITY_SIGMA, borderType=cv2.BORDER_CONSTANT)
    low = num[inside].astype(np.float64) / den
    mean = low.mean()
    std = low.std()
    if std == 0.0:
        return 0.0
    return float(std / mean)


def _laplacian_var_y(y: np.ndarray, ctx: NorefContext) -> float:
    inner8 = ctx.laplacian_fov8
    lap = cv2.Laplacian(y, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT)
    return float(cv2.meanStdDev(lap, mask=inner8)[1][0, 0] ** 2)


def inscribed_square(fov: np.ndarray) -> tuple[slice, slice]:
    """Row and column slices of a large axis-aligned square that lies entirely inside ``fov``.

    The square is centred on the FOV pixel farthest from the FOV border.
    """
    dist = cv2.distanceTransform(
        np.pad(fov.astype(np.uint8), 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE
    )[1:-1, 1:-1]
    # OpenCV's result differs by ~1e-5 with its thread count (one thread vs several): rounded,
    # the centre and the side no longer depend on it (a side of 89.99999 vs 90.00001 px).
    dist = np.round(dist.astype(np.float64), 3)
    cy, cx = np.unravel_index(int(np.argmax(dist)), dist.shape)
    half = max(0, int(np.round(dist[cy, cx] / np.sqrt(2.0), 3)) - 1)
    while half > 0 and not fov[cy - half : cy + half + 1, cx - half : cx + half + 1].all():
        half -= 1
    return slice(cy - half, cy + half + 1), slice(cx - half, cx + half + 1)


_SOBEL_EDGE = np.array([1.0, 0.0, -1.0], np.float32)
_SOBEL_SMOOTH = np.array([0.25, 0.5, 0.25], np.float32)


def _blur_effect_crop(crop: np.ndarray) -> float:
    """scikit-image's ``blur_effect`` (h_size ``BLUR_EFFECT_H_SIZE``, max over both axes) of a
    float32 image in [0, 1], in float32 with OpenCV filters (same reflect border)."""
    eps = np.float32(np.spacing(1.0))  # scikit-image's guard against division by zero
    inner = (slice(2, crop.shape[0] - 1), slice(2, crop.shape[1] - 1))
    blurs = []
    for axis in (0, 1):
        # The box re-blur and the Sobel derivative run along ``axis``; Sobel smooths across it.
        box = (1, BLUR_EFFECT_H_SIZE) if axis == 0 else (BLUR_EFFECT_H_SIZE, 1)  # (w, h)
        kx, ky = (_SOBEL_SMOOTH, _SOBEL_EDGE) if axis == 0 else (_SOBEL_EDGE, _SOBEL_SMOOTH)
        refl = cv2.BORDER_REFLECT
        filtered = cv2.blur(crop, box, borderType=refl)
        sharp = np.abs(cv2.sepFilter2D(crop, cv2.CV_32F, kx, ky, borderType=refl))
        blurred = np.abs(cv2.sepFilter2D(filtered, cv2.CV_32F, kx, ky, borderType=refl))
        np.maximum(sharp, eps, out=sharp)
        np.maximum(blurred, eps, out=blurred)
        m1 = float(sharp[inner].sum(dtype=np.float64))
        sharp -= blurred
        np.maximum(sharp, 0.0, out=sharp)
        m2 = float(sharp[inner].sum(dtype=np.float64))
        blurs.append(abs(m1 - m2) / m1)
    return max(blurs)


def _blur_effect_y(y: np.ndarray, ctx: NorefContext) -> float:
    rows, cols = ctx.square
    crop = y[rows, cols]
    if min(crop.shape) < BLUR_EFFECT_H_SIZE:
        raise FOVTooSmallError(
            f"FOV too small for blur_effect: inscribed square {crop.shape[1]} px "
            f"< h_size {BLUR_EFFECT_H_SIZE}"
        )
    return _blur_effect_crop(crop * np.float32(1.0 / 255.0))


_LumaMetric = Callable[[np.ndarray, NorefContext], float]


def _prepare(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, NorefContext]:
    check_image(image)
    return luma(image), NorefContext(mask, image.shape)


def luminance(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean luma inside the FOV (0-255)."""
    return _mean_y(*_prepare(image, mask))


def uniformity(image: np.ndarray, mask: np.ndarray) -> float:
    """Illumination non-uniformity: coefficient of variation of heavily low-passed FOV luma.

    Luma is area-reduced to a ``UNIFORMITY_GRID`` grid and low-passed by a FOV-only normalised
    convolution (Gaussian, ~5% of the FOV diameter), which removes vessels and texture but keeps
    vignetting and uneven illumination. 0 is perfectly even; higher is less uniform.
    """
    return _uniformity_y(*_prepare(image, mask))


def rms_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """RMS contrast: standard deviation of FOV luma divided by 255."""
    return _rms_contrast_y(*_prepare(image, mask))


def laplacian_variance(image: np.ndarray, mask: np.ndarray) -> float:
    """Sharpness: variance of the 4-neighbour Laplacian of luma on the eroded FOV.

    The FOV is eroded by ``LAPLACIAN_MARGIN`` px so that the step at the FOV edge is excluded.
    Higher is sharper (or noisier).
    """
    return _laplacian_var_y(*_prepare(image, mask))


def blur_effect(image: np.ndarray, mask: np.ndarray) -> float:
    """Blur: scikit-image's ``blur_effect`` (Crete et al. 2007) of luma / 255 in the FOV.

    Computed on the largest square inscribed in the FOV (see :func:`inscribed_square`) rather
    than the FOV bounding box, whose corners lie outside the FOV. 0 is sharp, 1 fully blurred.
    """
    return _blur_effect_y(*_prepare(image, mask))


def overexposed(image: np.ndarray, mask: np.ndarray) -> float:
    """Share of FOV pixels with luma >= ``OVEREXPOSED_Y``."""
    return _overexposed_y(*_prepare(image, mask))


def underexposed(image: np.ndarray, mask: np.ndarray) -> float:
    """Share of FOV pixels with luma <= ``UNDEREXPOSED_Y``."""
    return _underexposed_y(*_prepare(image, mask))


_FROM_LUMA: dict[str, _LumaMetric] = {
    "nr_luminance": _mean_y,
    "nr_uniformity": _uniformity_y,
    "nr_rms_contrast": _rms_contrast_y,
    "nr_laplacian_var": _laplacian_var_y,
    "nr_blur_effect": _blur_effect_y,
    "nr_overexposed": _overexposed_y,
    "nr_underexposed": _underexposed_y,
}

NOREF_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "nr_luminance": luminance,
    "nr_uniformity": uniformity,
    "nr_rms_contrast": rms_contrast,
    "nr_laplacian_var": laplacian_variance,
    "nr_blur_effect": blur_effect,
    "nr_overexposed": overexposed,
    "nr_underexposed": underexposed,
}
"""Registry of no-reference metrics, ``column name -> fn(image, mask)``."""


def noref_metrics(
    image: np.ndarray, mask: np.ndarray | None = None, *, context: NorefContext | None = None
) -> dict[str, float]:
    """All no-reference metrics, keyed by the column names of :data:`NOREF_METRICS`.

    ``context`` (from :func:`noref_context`) reuses what was derived from the mask for an
    earlier image; ``mask`` may then be None (a mask that is given must equal its mask).
    """
    check_image(image)
    if context is None:
        if mask is None:
            raise ValueError("noref_metrics needs a mask or a context")
        context = NorefContext(mask, image.shape)
    else:
        context.check(image)
        if mask is not None and not np.array_equal(check_mask(mask, image.shape), context.fov):
            raise ValueError("context was built from a different mask")
    y = luma(image)
    return {name: fn(y, context) for name, fn in _FROM_LUMA.items()}
