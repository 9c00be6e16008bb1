"""One plain class per pipeline step. Each maps a list of row dicts to a list of row dicts.

Stages know nothing about Ray: :mod:`fundus_batch.pipeline` turns them into Ray Data operators
using the :class:`Resources` each one declares. A failed row keeps flowing with ``status``,
``error`` and ``failed_stage`` set; later stages pass it through untouched. Only bytes and
scalars travel between stages.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from fundus_batch import __version__, outpaths
from fundus_batch.degrade import degrade, sample_rng, stable_hash
from fundus_batch.fov import Circle, FOVError, crop_to_fov, preprocess
from fundus_batch.io import codecs, storage
from fundus_batch.schema import STATUS_OK, failed

if TYPE_CHECKING:
    from fundus_batch.metrics import ReferenceContext

Row = dict[str, Any]


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs. ``actor`` stages keep state (a model) between batches."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    actor: bool = False


def is_ok(row: Row) -> bool:
    return row.get("status", STATUS_OK) == STATUS_OK


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_ext(image_format: str) -> str:
    return "jpg" if image_format == "jpeg" else "png"


def encode_output(rgb: np.ndarray, image_format: str, jpeg_quality: int) -> bytes:
    """Encode an RGB working image in the run's output format."""
    if image_format == "jpeg":
        return codecs.encode_jpeg(rgb, quality=jpeg_quality)
    return codecs.encode_png(rgb)


def decode_mask(data: bytes) -> np.ndarray:
    """Decode a stored FOV mask to a binary HxW uint8 (0/255) array."""
    arr = codecs.decode_image(data)
    grey = arr[..., 0] if arr.ndim == 3 else arr
    return np.where(grey > 127, 255, 0).astype(np.uint8)


def circle_from_mask(mask: np.ndarray) -> Circle:
    """The FOV circle of a binary mask whose field may be clipped top/bottom or left/right:
    centred on the mask's bounding box, with its longer side as the diameter."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise FOVError("blank", "the given FOV mask is empty")
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    return Circle((x0 + x1) / 2.0, (y0 + y1) / 2.0, (max(x1 - x0, y1 - y0) + 1) / 2.0)


def decode_vessel_truth(data: bytes) -> np.ndarray:
    """A vessel ground-truth map as binary uint8 (0/255): 0/255 maps are thresholded at 127,
    label maps with small values (HRF's artery/vein labels 0-3) count every label > 0."""
    arr = codecs.decode_image(data).max(axis=2)
    cut = 0 if arr.max() <= 3 else 127
    return np.where(arr > cut, 255, 0).astype(np.uint8)


def crop_like(binary: np.ndarray, shape: tuple[int, int], circle: Circle, size: int) -> np.ndarray:
    """Apply the FOV crop of an image of ``shape`` to a binary map of the same scene."""
    if binary.shape[:2] != shape:
        binary = cv2.resize(binary, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    cropped, _ = crop_to_fov(np.dstack([binary] * 3), circle, size=size)
    return np.where(cropped[..., 0] > 127, 255, 0).astype(np.uint8)


class Fetch:
    """Read each row's source bytes (and optional FOV mask and vessel ground truth) through
    fsspec, with threads."""

    name = "fetch"
    resources = Resources(num_cpus=0.25)

    def __init__(
        self,
        storage_options: dict | None = None,
        threads: int = 8,
        retries: int = storage.DEFAULT_RETRIES,
        vessels: bool = False,
    ) -> None:
        self.storage_options = storage_options or {}
        self.threads = threads
        self.retries = retries
        self.vessels = vessels

    def _fetch_one(self, row: Row) -> Row:
        if not is_ok(row):
            return row
        start = time.perf_counter()
        try:
            row["raw_bytes"] = storage.read_bytes(
                row["source_uri"], storage_options=self.storage_options, retries=self.retries
            )
            if row.get("source_mask_uri"):
                row["mask_png"] = storage.read_bytes(
                    row["source_mask_uri"],
                    storage_options=self.storage_options,
                    retries=self.retries,
                )
            if self.vessels and row.get("vessel_gt_uri"):
                row["vessel_gt_png"] = storage.read_bytes(
                    row["vessel_gt_uri"],
                    storage_options=self.storage_options,
                    retries=self.retries,
                )
        except Exception as exc:
            failed(row, self.name, storage.redact(f"{type(exc).__name__}: {exc}"))
        row["seconds_fetch"] = time.perf_counter() - start
        return row

    def __call__(self, rows: list[Row]) -> list[Row]:
        if len(rows) <= 1 or self.threads == 1:
            return [self._fetch_one(r) for r in rows]
        with ThreadPoolExecutor(max_workers=min(self.threads, len(rows))) as pool:
            return list(pool.map(self._fetch_one, rows))


class Preprocess:
    """Decode (reduced when the source is large), find the FOV, crop, pad and resize."""

    name = "preprocess"
    resources = Resources(num_cpus=0.5)

    def __init__(
        self,
        size: int = 512,
        image_format: str = "png",
        jpeg_quality: int = 95,
        max_pixels: int = codecs.DEFAULT_MAX_PIXELS,
    ) -> None:
        self.size = size
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.max_pixels = max_pixels

    def _one(self, row: Row) -> Row:
        raw = row.pop("raw_bytes", None)
        vessel_raw = row.pop("vessel_gt_png", None)
        if not is_ok(row):
            row.pop("mask_png", None)
            return row
        start = time.perf_counter()
        try:
            width, height = codecs.image_dimensions(raw)
            row["source_width"], row["source_height"] = width, height
            rgb = codecs.decode_image(raw, max_pixels=self.max_pixels, min_side=self.size)
            # Reduced decoding shrinks the image; report the circle in source pixels.
            scale = max(width, height) / max(rgb.shape[:2])
            given_mask = row.pop("mask_png", None)
            if given_mask is not None:
                image, mask, circle, status = self._with_given_mask(rgb, given_mask)
            else:
                pre = preprocess(rgb, size=self.size)
                image, mask, circle, status = pre.image, pre.mask, pre.circle, pre.status
            row["fov_cx"], row["fov_cy"] = circle.cx * scale, circle.cy * scale
            row["fov_r"] = circle.r * scale
            row["fov_status"] = status
            row["size"] = self.size
            row["clean_png"] = encode_output(image, self.image_format, self.jpeg_quality)
            row["mask_png"] = codecs.encode_png(mask)
            if vessel_raw is not None:
                truth = crop_like(decode_vessel_truth(vessel_raw), rgb.shape[:2], circle, self.size)
                row["vessel_gt_png"] = codecs.encode_png(np.where(mask > 0, truth, 0))
        except (codecs.DecodeError, FOVError) as exc:
            failed(row, self.name, f"{type(exc).__name__}({exc.reason}): {exc}")
        except Exception as exc:
            failed(row, self.name, exc)
        row["seconds_preprocess"] = time.perf_counter() - start
        return row

    def _with_given_mask(self, rgb: np.ndarray, mask_bytes: bytes):
        """Crop with a manifest-supplied FOV mask instead of detecting one."""
        mask = decode_mask(mask_bytes)
        if mask.shape[:2] != rgb.shape[:2]:
            mask = cv2.resize(mask, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_AREA)
            mask = np.where(mask > 127, 255, 0).astype(np.uint8)
        circle = circle_from_mask(mask)
        image, _ = crop_to_fov(rgb, circle, size=self.size)
        out_mask = crop_like(mask, rgb.shape[:2], circle, self.size)
        image[out_mask == 0] = 0
        return image, out_mask, circle, "given_mask"

    def __call__(self, rows: list[Row]) -> list[Row]:
        return [self._one(r) for r in rows]


def choose_type(types: Sequence[str], mode: str, run_seed: int, image_id: str, variant: int) -> str:
    """Degradation type of one variant: cycled through ``types`` or drawn per sample."""
    if mode == "cycle":
        return types[variant % len(types)]
    # A stream separate from the degradation draws, so the type choice never shifts them.
    seq = np.random.SeedSequence([run_seed, stable_hash(image_id), variant, 1])
    return types[int(np.random.Generator(np.random.PCG64(seq)).integers(len(types)))]


class Degrade:
    """Expand each image row into one row per pending variant with a degraded image."""

    name = "degrade"
    resources = Resources(num_cpus=0.5, actor=True)

    def __init__(
        self,
        seed: int,
        variants: int,
        types: Sequence[str],
        type_mode: str = "cycle",
        preset: str = "cofe-release",
        image_format: str = "png",
        jpeg_quality: int = 95,
    ) -> None:
        self.seed = seed
        self.variants = variants
        self.types = list(types)
        self.type_mode = type_mode
        self.preset = preset
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality

    def __call__(self, rows: list[Row]) -> list[Row]:
        out: list[Row] = []
        for row in rows:
            out.extend(self._expand(row))
        return out

    def _expand(self, row: Row) -> list[Row]:
        pending = row.pop("pending_variants", None)
        variants = list(range(self.variants)) if pending is None else [int(v) for v in pending]
        image = mask = None
        if is_ok(row):
            try:
                image = codecs.decode_image(row["clean_png"])
                mask = decode_mask(row["mask_png"])
            except Exception as exc:
                failed(row, self.name, exc)
        rows = []
        for i, variant in enumerate(variants):
            vrow = dict(row)
            vrow["variant"] = variant
            vrow["seed"] = self.seed
            vrow["id_hash"] = f"{stable_hash(row['image_id']):016x}"
            vrow["preset"] = self.preset
            vrow["carries_clean"] = i == 0
            vrow["type_code"] = choose_type(
                self.types, self.type_mode, self.seed, row["image_id"], variant
            )
            if is_ok(vrow):
                # a row still ok decoded both (a failed decode marks it not ok)
                assert image is not None and mask is not None
                self._degrade_one(vrow, image, mask)
            rows.append(vrow)
        return rows

    def _degrade_one(self, row: Row, image: np.ndarray, mask: np.ndarray) -> None:
        start = time.perf_counter()
        try:
            rng = sample_rng(self.seed, row["image_id"], row["variant"])
            degraded, record = degrade(image, mask, row["type_code"], rng, preset=self.preset)
            row["params_json"] = record.to_json()
            row.update(record.flat_summary())
            row["degraded_png"] = encode_output(degraded, self.image_format, self.jpeg_quality)
        except Exception as exc:
            failed(row, self.name, exc)
        row["seconds_degrade"] = time.perf_counter() - start


class _CleanScoring:
    """One clean image and its mask, decoded, with the metric contexts built from them."""

    def __init__(self, clean_png: bytes, mask_png: bytes) -> None:
        from fundus_batch.metrics import NorefContext

        self.clean_png = clean_png
        self.mask_png = mask_png
        self.mask = decode_mask(mask_png)
        self.image = codecs.decode_image(clean_png)
        self.noref = NorefContext(self.mask, self.image.shape)
        self._reference: ReferenceContext | None = None

    def matches(self, clean_png: bytes, mask_png: bytes) -> bool:
        """Whether these are the bytes this was built from (same object or equal)."""
        same_clean = clean_png is self.clean_png or clean_png == self.clean_png
        return same_clean and (mask_png is self.mask_png or mask_png == self.mask_png)

    @property
    def reference(self) -> ReferenceContext:
        """The full-reference context of the clean image, built on first use."""
        if self._reference is None:
            from fundus_batch.metrics import reference_context

            self._reference = reference_context(self.image, self.mask)
        return self._reference


class Score:
    """Quality metrics: no-reference for each image present, full-reference against clean."""

    name = "score"
    resources = Resources(num_cpus=0.5)

    def __init__(
        self, roles: Sequence[str] = ("degraded", "enhanced"), reference: bool = True
    ) -> None:
        self.roles = tuple(roles)
        self.reference = reference
        self._clean: _CleanScoring | None = None

    def _clean_for(self, row: Row) -> _CleanScoring:
        """The decoded clean image, mask and metric contexts of ``row``, kept while the rows
        that follow (the other variants of one image) carry the same clean and mask bytes."""
        cached = self._clean
        if cached is None or not cached.matches(row["clean_png"], row["mask_png"]):
            cached = self._clean = _CleanScoring(row["clean_png"], row["mask_png"])
        return cached

    def __call__(self, rows: list[Row]) -> list[Row]:
        from fundus_batch.metrics import METRIC_VERSION, noref_metrics

        for row in rows:
            if not is_ok(row):
                continue
            start = time.perf_counter()
            try:
                clean = self._clean_for(row)
                truth = row.get("vessel_gt_png")
                truth = decode_mask(truth) if truth is not None else None
                for role in self.roles:
                    data = row.get(f"{role}_png")
                    if data is None:
                        continue
                    img = clean.image if role == "clean" else codecs.decode_image(data)
                    for name, value in noref_metrics(img, None, context=clean.noref).items():
                        row[f"{name}_{role}"] = float(value)
                    if role != "clean" and self.reference:
                        fr = clean.reference.metrics(img)
                        for key in ("psnr", "ssim", "ms_ssim"):
                            row[f"{key}_{role}"] = float(fr[key])
                    if truth is not None:
                        score_vessels(row, role, img, truth, clean.mask)
                row["metric_version"] = METRIC_VERSION
            except Exception as exc:
                failed(row, self.name, exc)
            row["seconds_score"] = (row.get("seconds_score") or 0.0) + time.perf_counter() - start
        return rows


def score_vessels(
    row: Row, role: str, image: np.ndarray, truth: np.ndarray, mask: np.ndarray
) -> None:
    """Downstream check: segment ``image`` with the Sato vesselness filter (independent of any
    enhancer) and store ``vessel_auc_<role>``, ``vessel_f1_<role>`` and ``vessel_segmenter``.

    A FOV without vessel or background pixels leaves the scores null rather than failing."""
    from fundus_batch.metrics.vessels import (
        VESSEL_SEGMENTER,
        UndefinedMetricError,
        segment_and_score,
    )

    try:
        scores = segment_and_score(image, truth, mask)
    except UndefinedMetricError:
        return
    for name, value in scores.items():
        row[f"{name}_{role}"] = float(value)
    row["vessel_segmenter"] = VESSEL_SEGMENTER


def image_paths(
    out: str, image_id: str, variant: int | None, type_code: str | None, image_format: str
) -> dict[str, str]:
    """Deterministic output URIs of one row's images."""
    ext = image_ext(image_format)
    base = storage.join(out, "images", image_id)
    paths = {"clean": storage.join(base, f"clean.{ext}"), "mask": storage.join(base, "mask.png")}
    if variant is None or variant < 0:  # enhance/score modes: one row per source image
        paths["enhanced"] = storage.join(base, f"enhanced.{ext}")
        return paths
    stem = f"v{variant:03d}" + (f"_{type_code}" if type_code else "")
    paths["degraded"] = storage.join(base, f"{stem}.{ext}")
    paths["enhanced"] = storage.join(base, f"{stem}_enhanced.{ext}")
    return paths


class Write:
    """Write each row's images under deterministic paths and drop the pixel bytes."""

    name = "write"
    resources = Resources(num_cpus=0.25)

    def __init__(
        self,
        out: str,
        image_format: str = "png",
        storage_options: dict | None = None,
        retries: int = storage.DEFAULT_RETRIES,
    ) -> None:
        self.out = out
        self.image_format = image_format
        self.storage_options = storage_options or {}
        self.retries = retries

    def _check_inside(self, uri: str) -> None:
        root = self.out.rstrip("/") + "/"
        if not uri.startswith(root) or "/../" in uri[len(root) - 1 :]:
            raise ValueError(f"refusing to write outside the output root: {uri}")
        outpaths.check_local_target(self.out, uri)  # no symlinked folder or file inside OUT

    def _put(self, uri: str, data: bytes) -> str:
        self._check_inside(uri)
        storage.write_bytes(uri, data, storage_options=self.storage_options, retries=self.retries)
        return sha256_hex(data)

    def __call__(self, rows: list[Row]) -> list[Row]:
        for row in rows:
            start = time.perf_counter()
            try:
                if is_ok(row):
                    self._write_row(row)
            except Exception as exc:
                failed(row, self.name, storage.redact(f"{type(exc).__name__}: {exc}"))
            for key in (
                "clean_png",
                "mask_png",
                "degraded_png",
                "enhanced_png",
                "raw_bytes",
                "vessel_gt_png",
            ):
                row.pop(key, None)
            row["seconds_write"] = time.perf_counter() - start
            row["fundus_batch_version"] = __version__
            # A presigned or user:pass@ URI must not carry its secret into the dataset.
            row["source_uri"] = storage.redact(row.get("source_uri") or "") or None
            if row.get("vessel_gt_uri"):
                row["vessel_gt_uri"] = storage.redact(row["vessel_gt_uri"])
        return rows

    def _write_row(self, row: Row) -> None:
        paths = image_paths(
            self.out, row["image_id"], row.get("variant"), row.get("type_code"), self.image_format
        )
        for role in ("clean", "mask", "degraded", "enhanced"):
            data = row.get(f"{role}_png")
            if data is None or role not in paths:
                continue
            carried = role in ("clean", "mask")
            if carried and row.get("carries_clean") is False:
                # Another variant row of this image writes the shared files.
                digest = sha256_hex(data)
            else:
                digest = self._put(paths[role], data)
            # Relative to OUT, so that a moved or copied OUT still verifies.
            row[f"{role}_uri"] = outpaths.relative_to_out(self.out, paths[role])
            row[f"{role}_sha256"] = digest
