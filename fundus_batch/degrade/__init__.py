"""Degradation synthesis after Shen et al. (Cofe-Net, IEEE TMI 2021).

``degrade`` samples and applies one of the seven degradation types (``TYPE_CODES``) to a
working image; ``replay`` re-applies a recorded :class:`DegradationRecord` with no randomness.
Parameters come from a :class:`Preset` (``cofe-release`` by default, ``cofe-train``, or your
own ranges) and a per-sample generator from :func:`sample_rng`.
"""

from __future__ import annotations

from .engine import degrade, replay
from .params import (
    TYPE_CODES,
    BlurRecord,
    ColorRecord,
    DegradationRecord,
    HaloRecord,
    HoleRecord,
    RecordError,
    SpotRecord,
)
from .presets import PRESETS, Preset, PresetError, get_preset
from .sample import resolve_hole_strength, sample_record, sample_rng, stable_hash

__all__ = [
    "PRESETS",
    "TYPE_CODES",
    "BlurRecord",
    "ColorRecord",
    "DegradationRecord",
    "HaloRecord",
    "HoleRecord",
    "Preset",
    "PresetError",
    "RecordError",
    "SpotRecord",
    "degrade",
    "get_preset",
    "replay",
    "resolve_hole_strength",
    "sample_record",
    "sample_rng",
    "stable_hash",
]
