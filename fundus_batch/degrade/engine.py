"""``degrade`` (sample + apply) and ``replay`` (apply a recorded parameter set).

Both run the same code path, so ``replay(image, mask, record)`` is byte-identical to the
``degrade`` call that produced ``record``. Operator order per model:

* release: colour -> halo -> hole -> spots -> blur, then O = uint8(255 I M) (truncated);
* train: colour -> spots -> halo -> blur -> hole, then O = uint8(255 I) (no FOV product).

Only the groups selected by the type code run (illumination = colour, halo and hole).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import ops
from .params import DegradationRecord, RecordError
from .presets import Preset, get_preset
from .sample import resolve_hole_strength, sample_record

__all__ = ["degrade", "replay"]

_ORDER = {
    "release": ("halo", "hole", "spots", "blur"),
    "train": ("spots", "halo", "blur", "hole"),
}


def _check_inputs(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Validate the working image and mask; return the mask as boolean (pixels > 127)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise TypeError("image must be a uint8 numpy array")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 RGB, got shape {image.shape}")
    if image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be square (the working size), got shape {image.shape}")
    if not isinstance(mask, np.ndarray) or mask.dtype not in (np.uint8, np.bool_):
        raise TypeError("mask must be a uint8 (0/255) or boolean numpy array")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    fov = mask if mask.dtype == np.bool_ else mask > 127
    if not fov.any():
        if mask.dtype == np.uint8 and mask.any():
            raise ValueError(
                "the FOV mask has no pixel above 127: a uint8 mask must be 0/255 "
                f"(got values up to {int(mask.max())}; pass a 0/1 mask as bool or times 255)"
            )
        raise ValueError("the FOV mask is empty")
    return fov


STEPS = frozenset({"color", "halo", "hole", "spots", "blur"})


def _apply(
    image: np.ndarray,
    fov: np.ndarray,
    record: DegradationRecord,
    preset: Preset | None,
    skip: frozenset[str] = frozenset(),
) -> tuple[np.ndarray, DegradationRecord]:
    if image.shape[0] != record.size:
        raise RecordError("size", f"record is for {record.size} px, image is {image.shape[0]} px")
    # The float image lives in reused per-thread buffers ("a"/"b" per dtype): the operators
    # write in place, only the blur needs the other buffer. (Fresh multi-megabyte arrays per
    # step cost page faults comparable to the arithmetic.)
    slot = "a"
    if record.color is not None and "color" not in skip:
        c = record.color
        jittered = ops.color_jitter(image, c.brightness, c.contrast, c.saturation)
        # the halo's float64 map promotes the float32 image next anyway: promote it here
        current = ops.to_unit_float(jittered, np.float64, out=_buffer(slot, image, np.float64))
    else:
        current = ops.to_unit_float(image, out=_buffer(slot, image, np.float32))
    for step in _ORDER[record.model]:
        if step in skip:
            continue
        # halo, hole and spots give float64 (in place when the image already is)
        target = current if current.dtype == np.float64 else _buffer(slot, image, np.float64)
        if step == "halo" and record.halo is not None:
            h = record.halo
            current = ops.halo(
                current, h.center, h.dia_a, h.dia_b, h.kernel, h.sigma, h.color, out=target
            )
        elif step == "hole" and record.hole is not None:
            hole = record.hole
            if hole.strength is None:
                if preset is None:
                    raise RecordError("hole.strength", "missing: the record was never resolved")
                hole = resolve_hole_strength(hole, ops.fov_mean(current, fov), preset)
                record = replace(record, hole=hole)
            assert hole.strength is not None
            current = ops.hole(
                current,
                hole.center,
                hole.diameter,
                hole.strength,
                hole.k_w,
                hole.k_h,
                hole.sigma,
                out=target,
            )
        elif step == "spots" and record.spots is not None:
            current = ops.spots(current, record.spots, out=target)
        elif step == "blur" and record.blur is not None:
            b = record.blur
            slot = "b" if slot == "a" else "a"
            target = _buffer(slot, image, current.dtype.type)
            current = ops.blur(current, b.k_w, b.k_h, b.sigma, out=target)
    out = ops.to_uint8(current, fov if record.model == "release" else None)
    return out, record


def _buffer(slot: str, image: np.ndarray, dtype: type) -> np.ndarray:
    """The per-thread working buffer ``slot`` for a float copy of ``image``."""
    return ops._scratch(f"engine_{slot}", image.shape, dtype)


def degrade(
    image: np.ndarray,
    mask: np.ndarray,
    type_code: str,
    rng: np.random.Generator,
    preset: Preset | str = "cofe-release",
) -> tuple[np.ndarray, DegradationRecord]:
    """Degrade a working image (HxWx3 uint8 RGB, square) inside its FOV mask (HxW, 0/255).

    Returns the degraded HxWx3 uint8 image and the complete record of every parameter drawn
    from ``rng``. The mask is binarised at 127.
    """
    fov = _check_inputs(image, mask)
    p = get_preset(preset)
    record = sample_record(rng, type_code, image.shape[0], p)
    return _apply(image, fov, record, p)


def replay(
    image: np.ndarray,
    mask: np.ndarray,
    record: DegradationRecord,
    *,
    skip: frozenset[str] | set[str] | tuple[str, ...] = (),
) -> np.ndarray:
    """Apply a recorded parameter set with no randomness (same output as ``degrade``).

    ``skip`` leaves steps out (``color``, ``halo``, ``hole``, ``spots``, ``blur``), e.g. to
    measure how much of a degradation's error one step causes.
    """
    if not isinstance(record, DegradationRecord):
        raise TypeError(f"record must be a DegradationRecord, got {type(record).__name__}")
    unknown = sorted(set(skip) - STEPS)
    if unknown:
        raise ValueError(f"skip: unknown steps {unknown}; known: {sorted(STEPS)}")
    fov = _check_inputs(image, mask)
    return _apply(image, fov, record, None, frozenset(skip))[0]
