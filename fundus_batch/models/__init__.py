"""Cofe-Net generators (the four released variants, with a width multiplier) and weight loading."""

from fundus_batch.models.cofenet import (
    DEFAULT_VARIANT,
    MIN_SIZE,
    SIZE_MULTIPLE,
    VARIANTS,
    CofeNet,
    build_cofenet,
    canonical_variant,
    check_size,
    default_x256,
)
from fundus_batch.models.weights import (
    WeightsEntry,
    WeightsError,
    detect_architecture,
    file_sha256,
    list_weights,
    load_registered,
    load_weights,
    model_for_entry,
    model_from_weights,
    read_state_dict,
    resolve_weights,
)

__all__ = [
    "DEFAULT_VARIANT",
    "MIN_SIZE",
    "SIZE_MULTIPLE",
    "VARIANTS",
    "CofeNet",
    "WeightsEntry",
    "WeightsError",
    "build_cofenet",
    "canonical_variant",
    "check_size",
    "default_x256",
    "detect_architecture",
    "file_sha256",
    "list_weights",
    "load_registered",
    "load_weights",
    "model_for_entry",
    "model_from_weights",
    "read_state_dict",
    "resolve_weights",
]
