"""Degradation synthesis after Shen et al. (Cofe-Net, IEEE TMI 2021).

``degrade`` samples and applies one of the seven degradation types (``TYPE_CODES``) to a
working image; ``replay`` re-applies a recorded :class:`DegradationRecord` with no randomness.
Parameters come from a :class:`Preset` (``cofe-release`` by default, ``cofe-train``, or your
own ranges) and a per-sample generator from :func:`sample_rng`.

At 512 px, ``cofe-release`` reproduces the released script (replaying its JSON records gives
its images up to a few pixels one level apart). Where fundus_batch departs from it on purpose:

* pixel constants defined at 512 px scale with the working size: spot amplitude and blur use
  the radius expressed at 512 (the released "/25" constants make spots dark at 1024 px),
  and the blur sigma and the training model's fixed spot kernel scale by ``size / 512``;
* the FOV mask is binary (pixels > 127), never JPEG-compressed;
* integer parameters are drawn with integer bounds from a per-sample numpy generator;
* the hole's b0 and unit uniform are always drawn, so later draws do not depend on the image;
  the record stores the final strength (and the FOV mean mu it came from).

Kept as released: the truncated OpenCV kernels, the hole strength rule (0 unless mu > 0.25,
with mu = sum of the whole image / (3 * FOV area)), the unreachable white halo style, and
PIL's colour blends, which truncate (not round) to uint8 after each factor.
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
