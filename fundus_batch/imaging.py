"""Small image helpers shared by the stages, the CLI and verification: FOV masks and vessel
maps decoded to binary arrays, the crop of a binary map, the working image of a source
photograph, output encoding and digests.

A plain library module: no rows, no batches, no Ray.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from fundus_batch.fov import (
    Circle,
    FOVError,
    Preprocessed,
    check_given_field,
    check_not_blank,
    crop_to_fov,
    preprocess,
)
from fundus_batch.io import codecs

ImageFormat = Literal["png", "jpeg"]


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as lower-case hex."""
    return hashlib.sha256(data).hexdigest()


def image_ext(image_format: str) -> str:
    """File extension of an output format."""
    return "jpg" if image_format == "jpeg" else "png"


def encode_output(rgb: np.ndarray, image_format: str, jpeg_quality: int) -> bytes:
    """Encode an RGB working image in the run's output format."""
    if image_format == "jpeg":
        return codecs.encode_jpeg(rgb, quality=jpeg_quality)
    return codecs.encode_png(rgb)


def as_stored(rgb: np.ndarray, encoded: bytes, image_format: str) -> np.ndarray:
    """The pixels a reader of ``encoded`` gets back: ``rgb`` itself for lossless PNG, the
    decoded bytes for JPEG."""
    return rgb if image_format == "png" else codecs.decode_image(encoded)


def to_binary(arr: np.ndarray) -> np.ndarray:
    """An image or map as binary HxW uint8 (0/255), thresholded at 127 on its first channel."""
    grey = arr[..., 0] if arr.ndim == 3 else arr
    return np.where(grey > 127, 255, 0).astype(np.uint8)


def decode_mask(data: bytes) -> np.ndarray:
    """Decode a stored FOV mask to a binary HxW uint8 (0/255) array."""
    return to_binary(codecs.decode_image(data))


def circle_from_mask(mask: np.ndarray) -> Circle:
    """The FOV circle of a binary mask whose field may be clipped by the frame.

    Clipped by the frame on one side only (the field touches one edge and is shorter across
    it): the mask's rows (or columns) parallel to that edge are chords of the circle, and the
    centre and radius are fitted to their lengths. Otherwise the bounding box's circle (centred
    on it, its longer side the diameter), unless the circle fitted to the mask's rim differs
    from it by more than a pixel: a field clipped on two or three sides, or an aperture cut flat
    at unequal heights, whose box is not centred on the circle.
    """
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise FOVError("blank", "the given FOV mask is empty")
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    height, width = mask.shape[:2]
    touches_x = int(x0 == 0) + int(x1 == width - 1)
    touches_y = int(y0 == 0) + int(y1 == height - 1)
    if touches_y == 1 and touches_x == 0 and y1 - y0 < x1 - x0:
        fitted = _fit_chords(mask)
        if fitted is not None:
            cy, r = fitted
            return Circle((x0 + x1) / 2.0, cy, r)
    elif touches_x == 1 and touches_y == 0 and x1 - x0 < y1 - y0:
        fitted = _fit_chords(mask.T)
        if fitted is not None:
            cx, r = fitted
            return Circle(cx, (y0 + y1) / 2.0, r)
    box = Circle((x0 + x1) / 2.0, (y0 + y1) / 2.0, (max(x1 - x0, y1 - y0) + 1) / 2.0)
    rim = _fit_rim(mask, xs, ys, (x0, x1, y0, y1))
    if rim is None or max(abs(rim.cx - box.cx), abs(rim.cy - box.cy), abs(rim.r - box.r)) <= 1:
        return box
    return rim


_MIN_RIM_POINTS = 20
_MIN_RIM_DEGREES = 60.0  # the rim off the frame must span this much of the circle
_RIM_SLACK_PX = 2.0  # mask pixels may lie this far outside the fitted circle


def _fit_rim(
    mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, extent: tuple[int, int, int, int]
) -> Circle | None:
    """The least-squares circle through the mask's outer rim, left out where it runs along the
    frame border or the mask's outermost rows and columns (straight edges there are chords);
    None when the rest is too short to fix a circle, or the circle leaves more than 1 % of the
    mask (``xs``, ``ys``: its pixels; ``extent``: their x0, x1, y0, y1) outside it."""
    height, width = mask.shape[:2]
    contours, _ = cv2.findContours(
        np.ascontiguousarray(mask), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
    )
    pts = np.concatenate(contours, axis=0).reshape(-1, 2).astype(np.float64)
    px, py = pts[:, 0], pts[:, 1]
    x0, x1, y0, y1 = extent
    off = (px > max(x0, 0)) & (px < min(x1, width - 1)) & (py > max(y0, 0))
    off &= py < min(y1, height - 1)
    px, py = px[off], py[off]
    if px.size < _MIN_RIM_POINTS:
        return None
    # x^2 + y^2 + d x + e y + f = 0 (Kasa); the contour runs through the outermost pixel
    # centres, half a pixel inside the field's edge.
    design = np.stack([px, py, np.ones_like(px)], axis=1)
    (d, e, f), *_ = np.linalg.lstsq(design, -(px * px + py * py), rcond=None)
    cx, cy = -d / 2.0, -e / 2.0
    r_squared = cx * cx + cy * cy - f
    if r_squared <= 0:
        return None
    circle = Circle(float(cx), float(cy), float(np.sqrt(r_squared)) + 0.5)
    angles = np.sort(np.degrees(np.arctan2(py - cy, px - cx)))
    gaps = np.diff(np.concatenate([angles, angles[:1] + 360.0]))
    if 360.0 - float(gaps.max()) < _MIN_RIM_DEGREES:
        return None
    outside = np.hypot(xs - cx, ys - cy) > circle.r + _RIM_SLACK_PX
    return None if outside.mean() > 0.01 else circle


def _fit_chords(mask: np.ndarray) -> tuple[float, float] | None:
    """(cy, r) of the circle whose chords are the mask's rows: the least-squares solution of
    (w/2)^2 + y^2 = r^2 - cy^2 + 2 cy y over the rows' widths w; None when underdetermined."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size < 3:
        return None
    inside = mask[rows] > 0
    first = np.argmax(inside, axis=1)
    last = inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1)
    half = (last - first + 1) / 2.0
    y = rows.astype(np.float64)
    design = np.stack([np.ones_like(y), 2.0 * y], axis=1)
    (a, cy), *_ = np.linalg.lstsq(design, half * half + y * y, rcond=None)
    r_squared = float(a + cy * cy)
    return (float(cy), float(np.sqrt(r_squared))) if r_squared > 0 else None


def decode_vessel_truth(data: bytes) -> np.ndarray:
    """A vessel ground-truth map as binary uint8 (0/255): 0/255 maps are thresholded at 127,
    label maps with small values (HRF's artery/vein labels 0-3) count every label > 0."""
    arr = codecs.decode_image(data).max(axis=2)
    cut = 0 if arr.max() <= 3 else 127
    return np.where(arr > cut, 255, 0).astype(np.uint8)


_MAX_ASPECT_MISMATCH = 0.02  # a map's width/height may differ from its image's by 2 %


def map_shape_problem(what: str, map_shape: tuple[int, ...], shape: tuple[int, ...]) -> str | None:
    """Why a map of ``map_shape`` (any resolution) cannot be of an image of ``shape``, or None:
    their aspect ratios differ by more than 2 %, so resizing it to the image would stretch it
    (a mask drawn on a JPEG's stored pixels while its EXIF orientation turns the photograph, a
    map of another photograph)."""
    (mh, mw), (h, w) = map_shape[:2], shape[:2]
    if abs((mw / mh) / (w / h) - 1.0) <= _MAX_ASPECT_MISMATCH:
        return None
    return (
        f"the {what} is {mw}x{mh} px and the photograph {w}x{h} (as displayed, after its EXIF "
        "orientation): their shapes differ, so it cannot be this photograph's"
    )


def crop_like(
    binary: np.ndarray, shape: tuple[int, int], circle: Circle, size: int, what: str = "map"
) -> np.ndarray:
    """Apply the FOV crop of an image of ``shape`` to a binary map of the same scene (of any
    resolution with the image's aspect ratio: :func:`map_shape_problem`, naming it ``what``)."""
    if binary.shape[:2] != shape:
        problem = map_shape_problem(what, binary.shape, shape)
        if problem is not None:
            raise ValueError(problem)
        binary = cv2.resize(binary, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    cropped, _ = crop_to_fov(np.dstack([binary] * 3), circle, size=size)
    return np.where(cropped[..., 0] > 127, 255, 0).astype(np.uint8)


def decode_source(raw: bytes, size: int, max_pixels: int = codecs.DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a source photograph for a ``size`` working image: a JPEG at the largest reduction
    whose shorter side stays >= ``size``, other formats at full size."""
    return codecs.decode_image(raw, max_pixels=max_pixels, min_side=size)


@dataclass(frozen=True)
class SourceImage:
    """A source photograph as decoded for its working image: ``rgb`` (a JPEG possibly at a
    reduction), its working image ``pre`` (circle in ``rgb``'s pixels), and ``factor``, the
    source pixels per ``rgb`` pixel."""

    rgb: np.ndarray
    pre: Preprocessed
    factor: int

    @property
    def source_circle(self) -> Circle:
        """The FOV circle in the source photograph's pixels."""
        return self.pre.circle.scaled(self.factor)


def source_working_image(
    raw: bytes,
    size: int,
    mask_bytes: bytes | None = None,
    max_pixels: int = codecs.DEFAULT_MAX_PIXELS,
    dimensions: tuple[int, int] | None = None,
) -> SourceImage:
    """Decode ``raw`` and make its ``size`` working image (:func:`working_image`);
    ``dimensions``: ``raw``'s (width, height) as displayed, when the caller has read them.

    The reduced JPEG decode keeps the image's shorter side >= ``size``, but a field inside the
    frame is narrower than that side: when the field comes out under ``size`` across, the
    photograph is decoded again at the reduction that keeps the field >= ``size``, so a working
    image is never scaled up from a reduced decode."""
    width, height = dimensions or codecs.image_dimensions(raw)
    min_side = size
    while True:
        rgb = decode_source(raw, min_side, max_pixels)
        pre = working_image(rgb, size, mask_bytes)
        factor = max(1, round(max(width, height) / max(rgb.shape[:2])))
        across = 2.0 * pre.circle.r
        if factor == 1 or across >= size:
            return SourceImage(rgb, pre, factor)
        min_side = math.ceil(min(rgb.shape[:2]) * size / across)


def crop_with_given_mask(rgb: np.ndarray, mask_bytes: bytes, size: int) -> Preprocessed:
    """The working image of ``rgb`` cropped around a supplied FOV mask (of any resolution)
    instead of a detected one; zero outside the mask.

    The field is checked as a detected one is (``FOVError``): an empty mask, or an image
    uniform inside it, is ``blank``; a field under 10 % of the image's shorter side (radius or
    area), or one that leaves no pixel once resized to the image or to ``size``, ``too_small``.
    """
    mask = decode_mask(mask_bytes)
    if not mask.any():
        raise FOVError("blank", "the given FOV mask is empty")
    height, width = rgb.shape[:2]
    if mask.shape[:2] != (height, width):
        problem = map_shape_problem("given FOV mask", mask.shape, (height, width))
        if problem is not None:
            raise FOVError("mask_shape", problem)
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_AREA)
        mask = np.where(mask > 127, 255, 0).astype(np.uint8)
        if not mask.any():
            raise FOVError(
                "too_small", f"the given FOV mask leaves no pixel at the image's {width}x{height}"
            )
    circle = circle_from_mask(mask)
    check_given_field(circle, int(np.count_nonzero(mask)), height, width)
    image, _ = crop_to_fov(rgb, circle, size=size)
    out_mask = crop_like(mask, (height, width), circle, size)
    if not out_mask.any():
        raise FOVError("too_small", f"the given FOV mask leaves no pixel at {size}x{size}")
    image[out_mask == 0] = 0
    check_not_blank(image, out_mask)
    return Preprocessed(image=image, mask=out_mask, circle=circle, status="given_mask")


def working_image(rgb: np.ndarray, size: int, mask_bytes: bytes | None = None) -> Preprocessed:
    """The ``size`` working image of a decoded source photograph, as the pipeline makes it:
    around the given FOV mask when there is one, else around the detected FOV."""
    if mask_bytes is not None:
        return crop_with_given_mask(rgb, mask_bytes, size)
    return preprocess(rgb, size=size)
