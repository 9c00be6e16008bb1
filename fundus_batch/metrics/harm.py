"""How much damage an enhancer adds: pixels it moved further from the clean image."""

from __future__ import annotations

import numpy as np

from fundus_batch.metrics.reference import check_image, check_mask

NEW_ERROR_LEVELS = 40


def new_error_share(
    enhanced: np.ndarray,
    degraded: np.ndarray,
    clean: np.ndarray,
    mask: np.ndarray,
    levels: int = NEW_ERROR_LEVELS,
) -> float:
    """Share of FOV pixels where |enhanced - clean| exceeds |degraded - clean| by more than
    ``levels`` grey levels in any channel (RGB uint8 images of one size, HxW mask)."""
    enhanced = check_image(enhanced, "enhanced")
    degraded = check_image(degraded, "degraded")
    clean = check_image(clean, "clean")
    if not enhanced.shape == degraded.shape == clean.shape:
        raise ValueError(
            f"shapes differ: enhanced {enhanced.shape}, degraded {degraded.shape}, "
            f"clean {clean.shape}"
        )
    fov = check_mask(mask, clean.shape)
    ref = clean.astype(np.int16)
    worse = np.abs(enhanced.astype(np.int16) - ref) - np.abs(degraded.astype(np.int16) - ref)
    hit = (worse > levels).any(axis=2)
    return float(hit[fov].mean())
