"""Vessel segmentation scores inside the field of view: ROC AUC and F1.

A vessel probability map (HxW float, 0-1) is compared with a binary ground-truth vessel map
(bool, or uint8 0/1 or 0/255) on the pixels of the FOV mask only (bool or uint8 0/255), as in the
DRIVE protocol. The AUC is exact: the Mann-Whitney statistic from per-value counts, tied scores
counting one half, in integer arithmetic up to the final division.
"""

from __future__ import annotations

import math

import numpy as np

from .reference import check_mask

__all__ = [
    "VESSEL_METRICS",
    "UndefinedMetricError",
    "vessel_auc",
    "vessel_f1",
    "vessel_metrics",
]

VESSEL_METRICS = ("vessel_auc", "vessel_f1")
"""Keys of :func:`vessel_metrics`, also the stem of the Parquet columns ``<key>_<role>``."""


class UndefinedMetricError(ValueError):
    """The score has no value for this input (e.g. no vessel or no background pixel in the FOV)."""


def _check_prob(prob: object) -> np.ndarray:
    if not isinstance(prob, np.ndarray):
        raise TypeError(f"prob must be a numpy array, got {type(prob).__name__}")
    if prob.ndim != 2:
        raise ValueError(f"prob must be HxW, got shape {prob.shape}")
    if not np.issubdtype(prob.dtype, np.floating):
        raise TypeError(f"prob must be a float array with values in [0, 1], got {prob.dtype}")
    if not np.isfinite(prob).all():
        raise ValueError("prob contains NaN or infinite values")
    if prob.size and (prob.min() < 0.0 or prob.max() > 1.0):
        raise ValueError(f"prob values must lie in [0, 1], got [{prob.min()}, {prob.max()}]")
    return prob


def _check_truth(truth: object, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(truth, np.ndarray):
        raise TypeError(f"truth must be a numpy array, got {type(truth).__name__}")
    if truth.shape != tuple(shape):
        raise ValueError(f"truth shape {truth.shape} does not match prob shape {tuple(shape)}")
    if truth.dtype == np.bool_:
        return truth
    if truth.dtype != np.uint8:
        raise TypeError(f"truth must be bool or uint8 (0/1 or 0/255), got {truth.dtype}")
    values = set(np.unique(truth).tolist())
    if not (values <= {0, 1} or values <= {0, 255}):
        shown = sorted(values)[:6]
        raise ValueError(
            f"uint8 truth must be binary (0/1 or 0/255), found values {shown}; threshold it first"
        )
    return truth != 0


def _inputs(prob: object, truth: object, mask: object) -> tuple[np.ndarray, np.ndarray]:
    """Validated FOV pixels: (scores float64, labels bool), both 1-D."""
    p = _check_prob(prob)
    t = _check_truth(truth, p.shape)
    fov = check_mask(mask, p.shape)
    return p[fov].astype(np.float64), t[fov]


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        what = "vessel" if n_pos == 0 else "background"
        raise UndefinedMetricError(f"AUC is undefined: the FOV holds no {what} pixel")
    _, inverse = np.unique(scores, return_inverse=True)
    inverse = inverse.ravel()
    pos = np.bincount(inverse[labels], minlength=inverse.max() + 1).astype(np.int64)
    neg = np.bincount(inverse[~labels], minlength=inverse.max() + 1).astype(np.int64)
    neg_below = np.cumsum(neg) - neg
    # Twice the Mann-Whitney U: each positive beats the negatives below it, ties count one half.
    twice_u = int(np.sum(pos * (2 * neg_below + neg)))
    return twice_u / (2 * n_pos * n_neg)


def _f1(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    pred = scores >= threshold
    tp = int(np.count_nonzero(pred & labels))
    fp = int(np.count_nonzero(pred & ~labels))
    fn = int(np.count_nonzero(~pred & labels))
    if 2 * tp + fp + fn == 0:
        raise UndefinedMetricError(
            "F1 is undefined: the FOV holds no vessel pixel and none is predicted"
        )
    return 2 * tp / (2 * tp + fp + fn)


def vessel_auc(prob: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """ROC AUC of ``prob`` against ``truth`` over the FOV pixels (ties count one half).

    Raises :class:`UndefinedMetricError` when the FOV holds only vessel or only background.
    """
    scores, labels = _inputs(prob, truth, mask)
    return _auc(scores, labels)


def vessel_f1(
    prob: np.ndarray, truth: np.ndarray, mask: np.ndarray, threshold: float = 0.5
) -> float:
    """F1 (Dice) of ``prob >= threshold`` against ``truth`` over the FOV pixels."""
    scores, labels = _inputs(prob, truth, mask)
    return _f1(scores, labels, threshold)


def vessel_metrics(
    prob: np.ndarray, truth: np.ndarray, mask: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Both scores at once: ``{"vessel_auc": ..., "vessel_f1": ...}``."""
    scores, labels = _inputs(prob, truth, mask)
    return {"vessel_auc": _auc(scores, labels), "vessel_f1": _f1(scores, labels, threshold)}


# ------------------------------------------------------------------ the independent segmenter

VESSEL_SEGMENTER = "sato-v1"
"""Name of :func:`vesselness` as stored in the ``vessel_segmenter`` column; bump it whenever the
segmenter's output changes, so that scores of different versions are never pooled."""

SEGMENTER_SIGMAS = (1.0, 2.0, 3.0)
"""Sato scales in pixels at a 512 px working size (scaled with the image size)."""

F1_TOP_SHARE = 0.12
"""F1 counts the top 12 % of FOV pixels by vesselness as vessel: about the vessel share of the
FOV in HRF, CHASE_DB1 and the synthetic images (9-13 %), so the threshold needs no tuning per
image and a map with no vessel contrast gets no free pass."""

_RIM_PX = 3.0  # FOV pixels this close to the rim (at 512 px) are replaced before filtering


def _gaussian_kernels(sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampled Gaussian and its first and second derivative, as float32 column kernels for
    correlation (OpenCV's filters correlate: the first derivative kernel is mirrored)."""
    radius = max(1, math.ceil(4.0 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    g /= g.sum()
    d1 = x / sigma**2 * g
    d1 /= np.sum(x * d1)  # a unit ramp gives a slope of exactly 1
    d2 = (x**2 / sigma**4 - 1.0 / sigma**2) * g
    d2 -= d2.mean()
    d2 /= 0.5 * np.sum(x**2 * d2)  # a unit parabola x^2/2 gives a curvature of exactly 1
    return tuple(k.astype(np.float32)[:, None] for k in (g, d1, d2))  # type: ignore[return-value]


def sato_tubeness(grey: np.ndarray, sigmas: tuple[float, ...] = SEGMENTER_SIGMAS) -> np.ndarray:
    """Sato et al. (1998) tubeness of dark ridges in 2-D: per pixel the largest over ``sigmas`` of
    ``sigma**2 * max(lambda_1, 0)``, lambda_1 the larger Hessian eigenvalue.

    What ``skimage.filters.sato(grey, sigmas, black_ridges=True, mode="reflect")`` computes,
    with separable OpenCV Gaussian-derivative filters (about 20x faster at 512 px) whose
    derivative kernels are rescaled so that a unit ramp and a unit parabola measure exactly 1
    (scikit-image samples the derivatives as they are). The two agree within 1 % of the
    largest response at sigma >= 1.5 (tested); at sigma 1 they differ by about 5 % on a real
    photograph and by more below, where the sampled kernels are coarse (the 256 px scales
    start at 0.5).
    """
    import cv2

    img = np.ascontiguousarray(grey, dtype=np.float32)
    best = np.zeros_like(img)
    border = cv2.BORDER_REFLECT
    for sigma in sigmas:
        g, d1, d2 = _gaussian_kernels(float(sigma))
        hrr = cv2.sepFilter2D(img, cv2.CV_32F, g, d2, borderType=border)
        hcc = cv2.sepFilter2D(img, cv2.CV_32F, d2, g, borderType=border)
        hrc = cv2.sepFilter2D(img, cv2.CV_32F, d1, d1, borderType=border)
        half_trace = 0.5 * (hrr + hcc)
        radius = np.sqrt((0.5 * (hrr - hcc)) ** 2 + hrc**2)
        np.maximum(best, float(sigma) ** 2 * np.maximum(half_trace + radius, 0.0), out=best)
    return best


def _fill_outside(grey: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """``grey`` inside ``inner``; outside it, the local mean of the nearby ``inner`` pixels.

    Normalised convolution on an 8x smaller grid, widening until every pixel has a value: the
    filled field continues the FOV's slow shading without its texture, so the rim makes no edge
    for the filter to answer.
    """
    import cv2

    h, w = grey.shape
    small = (max(1, w // 8), max(1, h // 8))
    known = inner.astype(np.float32)
    num = cv2.resize(grey * known, small, interpolation=cv2.INTER_AREA)
    den = cv2.resize(known, small, interpolation=cv2.INTER_AREA)
    field = np.full(den.shape, float(grey[inner].mean()), np.float32)
    unset = np.ones(den.shape, bool)
    for sigma in (1.0, 3.0, 9.0, 27.0):
        n = cv2.GaussianBlur(num, (0, 0), sigma)
        d = cv2.GaussianBlur(den, (0, 0), sigma)
        ready = unset & (d > 1e-3)
        field[ready] = n[ready] / d[ready]
        unset &= ~ready
        if not unset.any():
            break
    full = cv2.resize(field, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.where(inner, grey, full).astype(np.float32)


def vesselness(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Vessel probability-like map (HxW float64, 0-1, zero outside the FOV) of an RGB uint8
    fundus image: the Sato tubeness of its green channel, scale-normalised to the image size.

    The segmenter shares nothing with any enhancement model, so it can score one. The FOV is
    eroded by ~3 px (at 512 px) and everything outside is filled with the local FOV mean before
    filtering: the dark rim is then no ridge. The map is divided by its FOV maximum, which keeps
    the ranking (AUC) and puts it on the 0-1 scale the scores expect.
    """
    import cv2

    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an HxWx3 RGB array, got {getattr(image, 'shape', None)}")
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {image.dtype}")
    fov = check_mask(mask, image.shape[:2])
    scale = max(image.shape[:2]) / 512.0
    rim = max(1, round(_RIM_PX * scale))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rim + 1, 2 * rim + 1))
    inner = cv2.erode(fov.astype(np.uint8), disc) > 0
    if not inner.any():
        inner = fov
    grey = image[..., 1].astype(np.float32) / 255.0
    tube = sato_tubeness(
        _fill_outside(grey, inner), tuple(max(0.5, s * scale) for s in SEGMENTER_SIGMAS)
    )
    tube[~fov] = 0.0
    top = float(tube.max())
    return (tube / top if top > 0 else tube).astype(np.float64)


def top_share_threshold(prob: np.ndarray, mask: np.ndarray, share: float = F1_TOP_SHARE) -> float:
    """The score above which the top ``share`` of FOV pixels lie (the F1 threshold)."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must lie in (0, 1), got {share}")
    values = _check_prob(prob)[check_mask(mask, prob.shape)]
    return float(np.quantile(values, 1.0 - share))


def segment_and_score(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Segment ``image`` with :func:`vesselness` and score it against ``truth`` in the FOV:
    ``{"vessel_auc": ..., "vessel_f1": ...}``, F1 at :func:`top_share_threshold`."""
    prob = vesselness(image, mask)
    return vessel_metrics(prob, truth, mask, threshold=top_share_threshold(prob, mask))
