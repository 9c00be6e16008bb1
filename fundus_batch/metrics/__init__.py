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
from .vessels import UndefinedMetricError, vessel_auc, vessel_f1, vessel_metrics

__all__ = [
    "METRIC_VERSION",
    "NOREF_METRICS",
    "PSNR_CAP",
    "REFERENCE_METRICS",
    "FOVTooSmallError",
    "UndefinedMetricError",
    "finite",
    "full_reference_metrics",
    "ms_ssim",
    "noref_metrics",
    "psnr",
    "ssim",
    "vessel_auc",
    "vessel_f1",
    "vessel_metrics",
]
