"""Image quality metrics inside the field of view: full-reference and no-reference."""

from .noref import NOREF_METRICS, noref_metrics
from .reference import (
    METRIC_VERSION,
    PSNR_CAP,
    REFERENCE_METRICS,
    FOVTooSmallError,
    finite,
    full_reference_metrics,
    ms_ssim,
    psnr,
    ssim,
)

__all__ = [
    "METRIC_VERSION",
    "NOREF_METRICS",
    "PSNR_CAP",
    "REFERENCE_METRICS",
    "FOVTooSmallError",
    "finite",
    "full_reference_metrics",
    "ms_ssim",
    "noref_metrics",
    "psnr",
    "ssim",
]
