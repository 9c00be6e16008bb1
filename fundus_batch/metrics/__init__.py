"""Image quality metrics inside the field of view: full-reference and no-reference."""

from .noref import NOREF_METRICS, NorefContext, noref_context, noref_metrics
from .reference import (
    METRIC_VERSION,
    PSNR_CAP,
    REFERENCE_METRICS,
    FOVTooSmallError,
    ReferenceContext,
    finite,
    full_reference_metrics,
    ms_ssim,
    psnr,
    reference_context,
    ssim,
)
from .vessels import UndefinedMetricError, vessel_auc, vessel_f1, vessel_metrics

__all__ = [
    "METRIC_VERSION",
    "NOREF_METRICS",
    "PSNR_CAP",
    "REFERENCE_METRICS",
    "FOVTooSmallError",
    "NorefContext",
    "ReferenceContext",
    "UndefinedMetricError",
    "finite",
    "full_reference_metrics",
    "ms_ssim",
    "noref_context",
    "noref_metrics",
    "psnr",
    "reference_context",
    "ssim",
    "vessel_auc",
    "vessel_f1",
    "vessel_metrics",
]
