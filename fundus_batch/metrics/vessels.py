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
