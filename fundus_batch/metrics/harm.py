"""What an enhancer did to an image: how much it changed it, and the damage it added (pixels it
moved further from the clean image)."""

from __future__ import annotations

import cv2
import numpy as np

from fundus_batch.metrics.reference import check_image, check_mask

NEW_ERROR_LEVELS = 40


def mean_change(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute difference of two RGB uint8 images of one size over the FOV pixels (HxW
    mask) and the three channels, in grey levels: 0.0 exactly when every FOV pixel is the same
    in both."""
    before = check_image(before, "before")
    after = check_image(after, "after")
    if before.shape != after.shape:
        raise ValueError(f"shapes differ: before {before.shape}, after {after.shape}")
    fov = check_mask(mask, before.shape).astype(np.uint8)
    return float(np.mean(cv2.mean(cv2.absdiff(before, after), mask=fov)[:3]))


def new_error_map(
    enhanced: np.ndarray,
    degraded: np.ndarray,
    clean: np.ndarray,
    levels: int = NEW_ERROR_LEVELS,
) -> np.ndarray:
    """HxW bool: where |enhanced - clean| exceeds |degraded - clean| by more than ``levels``
    grey levels in any channel (RGB uint8 images of one size)."""
    enhanced = check_image(enhanced, "enhanced")
    degraded = check_image(degraded, "degraded")
    clean = check_image(clean, "clean")
    if not enhanced.shape == degraded.shape == clean.shape:
        raise ValueError(
            f"shapes differ: enhanced {enhanced.shape}, degraded {degraded.shape}, "
            f"clean {clean.shape}"
        )
    ref = clean.astype(np.int16)
    worse = np.abs(enhanced.astype(np.int16) - ref) - np.abs(degraded.astype(np.int16) - ref)
    return (worse > levels).any(axis=2)


def new_error_share(
    enhanced: np.ndarray,
    degraded: np.ndarray,
    clean: np.ndarray,
    mask: np.ndarray,
    levels: int = NEW_ERROR_LEVELS,
) -> float:
    """Share of FOV pixels of :func:`new_error_map` (HxW mask)."""
    hit = new_error_map(enhanced, degraded, clean, levels)
    fov = check_mask(mask, hit.shape)
    return float(hit[fov].mean())
