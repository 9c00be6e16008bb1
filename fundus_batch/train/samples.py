"""Training data: clean samples, the sources that pair them with degradations, and batches."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol, overload

import cv2
import numpy as np
import torch
from torch import Tensor

from fundus_batch import outpaths
from fundus_batch.degrade import TYPE_CODES, DegradationRecord, degrade, sample_rng
from fundus_batch.degrade.ops import color_jitter
from fundus_batch.degrade.params import type_groups
from fundus_batch.degrade.presets import get_preset
from fundus_batch.train.config import TrainError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CleanSample:
    """One clean working image for on-the-fly degradation.

    ``image`` HxWx3 uint8 (square), ``mask`` HxW uint8 0/255 (FOV), optional ``vessels`` HxW
    (uint8 0..255 or float 0..1: vessel probability) and ``disc_box`` (x0, y0, x1, y1) in
    working pixels, end exclusive.
    """

    image_id: str
    image: np.ndarray
    mask: np.ndarray
    vessels: np.ndarray | None = None
    disc_box: tuple[int, int, int, int] | None = None


@dataclass
class TrainItem:
    """One training pair at the source's working size (before cropping)."""

    image_id: str
    type_code: str
    clean: np.ndarray
    degraded: np.ndarray
    mask: np.ndarray
    vessels: np.ndarray | None = None  # float32 HxW in [0, 1]
    disc: np.ndarray | None = None  # bool HxW
    spots: np.ndarray | None = None  # float32 HxW in [0, 1]
    photo: np.ndarray | None = None  # the photograph that was degraded, when ``clean`` is not it


@dataclass
class ValItem:
    """One held-out (clean, degraded) pair."""

    image_id: str
    type_code: str
    clean: np.ndarray
    degraded: np.ndarray
    mask: np.ndarray


class TrainSource(Protocol):
    """What ``train`` needs from a dataset."""

    def __len__(self) -> int: ...

    def image_id(self, index: int) -> str: ...

    def train_item(self, index: int, rng: np.random.Generator) -> TrainItem: ...

    def val_items(self, seed: int) -> Sequence[ValItem]: ...


def _check_sample(sample: CleanSample) -> None:
    img, mask = sample.image, sample.mask
    where = f"sample {sample.image_id!r}"
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3:
        raise TrainError(f"{where}: image must be an HxWx3 uint8 array")
    if img.shape[2] != 3 or img.shape[0] != img.shape[1]:
        raise TrainError(f"{where}: image must be square RGB, got shape {img.shape}")
    if not isinstance(mask, np.ndarray) or mask.shape != img.shape[:2] or mask.dtype != np.uint8:
        raise TrainError(f"{where}: mask must be an HxW uint8 array matching the image")
    if not (mask > 127).any():
        raise TrainError(f"{where}: the FOV mask is empty")
    if sample.vessels is not None:
        v = sample.vessels
        if not isinstance(v, np.ndarray) or v.shape != img.shape[:2]:
            raise TrainError(f"{where}: vessels must be an HxW array matching the image")
    if sample.disc_box is not None:
        box = sample.disc_box
        if (
            len(box) != 4
            or not (0 <= box[0] < box[2] <= img.shape[1])
            or not (0 <= box[1] < box[3] <= img.shape[0])
        ):
            raise TrainError(f"{where}: disc_box must be (x0, y0, x1, y1) inside the image")


def _aux_map(path: str | os.PathLike[str], shape: tuple[int, int]) -> np.ndarray:
    """A label map as uint8 0/255 (label > 0), resized (INTER_AREA) to ``shape`` (h, w);
    ValueError for a map whose shape cannot be the photograph's (``map_shape_problem``)."""
    from fundus_batch.imaging import map_shape_problem
    from fundus_batch.io.codecs import decode_image

    grey = decode_image(Path(path).read_bytes()).max(axis=2)
    binary: np.ndarray = np.where(grey > 0, 255, 0).astype(np.uint8)
    if binary.shape != shape:
        problem = map_shape_problem(f"label map {path}", binary.shape, shape)
        if problem is not None:
            raise ValueError(problem)
        binary = cv2.resize(binary, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return binary


def load_clean_sample(
    image_id: str,
    image_path: str | os.PathLike[str],
    size: int = 512,
    *,
    vessels_path: str | os.PathLike[str] | None = None,
    mask_path: str | os.PathLike[str] | None = None,
) -> CleanSample:
    """Read a clean photograph and crop it to the ``size`` working image as the pipeline does
    (``imaging.source_working_image``, around the detected FOV).

    ``vessels_path`` and ``mask_path`` are label images of the photograph's size (any pixel
    value > 0 is vessel / FOV); they get the same crop. A given FOV mask is intersected with
    the detected one. Vessel probabilities follow the released loader: >= 0.6 -> 1, < 0.4 -> 0.
    """
    from fundus_batch.fov import crop_to_fov
    from fundus_batch.imaging import source_working_image

    source = source_working_image(Path(image_path).read_bytes(), size)
    rgb, pre = source.rgb, source.pre

    def cropped(path: str | os.PathLike[str]) -> np.ndarray:
        plane = _aux_map(path, rgb.shape[:2])
        return crop_to_fov(np.dstack([plane, plane, plane]), pre.circle, size)[0][..., 0]

    mask = pre.mask
    if mask_path is not None:
        mask = np.where((mask > 127) & (cropped(mask_path) > 127), 255, 0).astype(np.uint8)
    image = np.where(mask[..., None] > 127, pre.image, 0).astype(np.uint8)
    vessels = None
    if vessels_path is not None:
        v = cropped(vessels_path).astype(np.float32) / 255.0
        v[v >= 0.6] = 1.0
        v[v < 0.4] = 0.0
        vessels = np.where(mask > 127, np.round(v * 255.0), 0).astype(np.uint8)
    sample = CleanSample(image_id, image, mask, vessels)
    _check_sample(sample)
    return sample


def _vessel_float(v: np.ndarray) -> np.ndarray:
    out = v.astype(np.float32)
    if v.dtype == np.uint8:
        out /= 255.0
    return np.clip(out, 0.0, 1.0)


def _box_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box
    out[y0:y1, x0:x1] = True
    return out


Disc = tuple[int, int, int]  # centre x, centre y, radius, in working pixels


def spot_discs(record: DegradationRecord) -> tuple[Disc, ...]:
    """The record's spots as discs grown by one blur sigma."""
    return tuple(
        (int(s.center[0]), int(s.center[1]), round(s.radius // 2 + s.sigma))
        for s in record.spots or ()
    )


def disc_mask(discs: Iterable[Disc], side: int) -> np.ndarray:
    """``discs`` drawn filled on a float32 ``side`` x ``side`` canvas in {0, 1}."""
    out = np.zeros((side, side), dtype=np.uint8)
    for cx, cy, radius in discs:
        cv2.circle(out, (cx, cy), radius, 1, -1)
    return out.astype(np.float32)


def spot_mask(record: DegradationRecord, size: int | None = None) -> np.ndarray:
    """Where the record's spots are: float32 HxW in {0, 1}, discs grown by one blur sigma."""
    return disc_mask(spot_discs(record), record.size if size is None else size)


def flipped(item: TrainItem) -> TrainItem:
    """``item`` mirrored left to right (every plane)."""

    def f(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a[:, ::-1])

    return TrainItem(
        item.image_id,
        item.type_code,
        f(item.clean),  # type: ignore[arg-type]
        f(item.degraded),  # type: ignore[arg-type]
        f(item.mask),  # type: ignore[arg-type]
        f(item.vessels),
        f(item.disc),
        f(item.spots),
        f(item.photo),
    )


class DegradeSource:
    """Clean images degraded on the fly by the fundus_batch.degrade engine.

    Each draw picks a type uniformly from ``types`` and degrades with ``preset``. With
    ``keep_colour`` the training target of an illumination type is the clean image with that
    draw's global colour jitter (brightness, contrast, saturation) applied: the model learns to
    undo the spatial part (halo, hole), which it can see, and not to guess a global colour,
    which it cannot know and would impose on every photograph. With ``clean_jitter`` that share
    of training draws first gives the clean photograph a colour jitter of the preset's ranges
    (the jittered photograph is then both the target and what is degraded): photographs differ
    in colour, and a colour shift alone must not read as an illumination defect. Validation
    items always score against the clean image itself.

    ``leave_alone`` photographs are not training targets for illumination (they failed the
    quality bounds: dark, unevenly lit, soft) but are still photographs whose own lighting a
    model must keep: a draw of a type without an illumination defect takes its photograph
    uniformly from the samples and these together. Indices and ``len`` count the samples only.
    """

    def __init__(
        self,
        samples: Iterable[CleanSample | tuple[Any, ...]],
        preset: Any = "cofe-release",
        types: Sequence[str] = TYPE_CODES,
        *,
        keep_colour: bool = False,
        clean_jitter: float = 0.0,
        leave_alone: Iterable[CleanSample] = (),
    ) -> None:
        items: list[CleanSample] = []
        for i, s in enumerate(samples):
            if not isinstance(s, CleanSample):
                if not isinstance(s, tuple) or not 2 <= len(s) <= 4:
                    raise TrainError(
                        f"sample {i} must be a CleanSample or (image, mask[, vessels[, disc_box]])"
                    )
                s = CleanSample(f"sample-{i:05d}", *s)
            _check_sample(s)
            items.append(s)
        if not items:
            raise TrainError("DegradeSource needs at least one sample")
        self.leave_alone = list(leave_alone)
        for s in self.leave_alone:
            _check_sample(s)
        ids = [s.image_id for s in [*items, *self.leave_alone]]
        if len(set(ids)) != len(ids):
            raise TrainError("DegradeSource sample image_ids must be unique")
        bad = [t for t in types if t not in TYPE_CODES]
        if bad or not types:
            raise TrainError(f"types must be a non-empty subset of {TYPE_CODES}, got {types}")
        self.samples = items
        self.preset = preset
        self.types = tuple(types)
        self.keep_colour = keep_colour
        if not 0.0 <= clean_jitter <= 1.0:
            raise TrainError(f"clean_jitter must be in [0, 1], got {clean_jitter}")
        self.clean_jitter = clean_jitter

    def __len__(self) -> int:
        return len(self.samples)

    def image_id(self, index: int) -> str:
        """Id of sample ``index``."""
        return self.samples[index].image_id

    def _item(self, s: CleanSample, type_code: str, rng: np.random.Generator) -> TrainItem:
        degraded, record = degrade(s.image, s.mask, type_code, rng, self.preset)
        shape = s.image.shape[:2]
        target = s.image
        if self.keep_colour and record.color is not None:
            c = record.color
            jittered = color_jitter(s.image, c.brightness, c.contrast, c.saturation)
            target = np.where(s.mask[..., None] > 127, jittered, 0).astype(np.uint8)
        return TrainItem(
            image_id=s.image_id,
            type_code=type_code,
            clean=target,
            degraded=degraded,
            mask=s.mask,
            vessels=None if s.vessels is None else _vessel_float(s.vessels),
            disc=None if s.disc_box is None else _box_mask(shape, s.disc_box),
            spots=spot_mask(record, shape[0]),
            photo=None if target is s.image else s.image,
        )

    def train_item(self, index: int, rng: np.random.Generator) -> TrainItem:
        """A fresh degradation of sample ``index`` (type and parameters drawn from ``rng``)."""
        s = self.samples[index]
        type_code = self.types[int(rng.integers(len(self.types)))]
        if self.leave_alone and not type_groups(type_code)[0]:
            pick = int(rng.integers(len(self.samples) + len(self.leave_alone)))
            if pick >= len(self.samples):
                s = self.leave_alone[pick - len(self.samples)]
        if self.clean_jitter > 0 and rng.random() < self.clean_jitter:
            p = get_preset(self.preset)
            b, c, sat = (rng.uniform(*r) for r in (p.brightness, p.contrast, p.saturation))
            jittered = color_jitter(s.image, float(b), float(c), float(sat))
            s = replace(s, image=np.where(s.mask[..., None] > 127, jittered, 0).astype(np.uint8))
        return self._item(s, type_code, rng)

    def val_items(self, seed: int) -> list[ValItem]:
        """Every sample degraded once with each type: rng = sample_rng(seed, id, type index)."""
        out: list[ValItem] = []
        for s in self.samples:
            for t_index, type_code in enumerate(TYPE_CODES):
                if type_code not in self.types:
                    continue
                degraded, _ = degrade(
                    s.image, s.mask, type_code, sample_rng(seed, s.image_id, t_index), self.preset
                )
                out.append(ValItem(s.image_id, type_code, s.image, degraded, s.mask))
        return out


class _PairRow(NamedTuple):
    """What training keeps of a pairs row (a few hundred bytes; the record only as spot discs,
    None when the row has no ``params_json``)."""

    image_id: str
    variant: int | None
    type_code: str
    clean_uri: str | None
    mask_uri: str | None
    degraded_uri: str
    size: int | None
    spots: tuple[Disc, ...] | None


class PairsSource:
    """A pairs dataset written by the pipeline, on local disk or any fsspec URL (``s3://``,
    ...): ``root`` is the output folder or its ``pairs/`` folder; shards are read through
    :mod:`fundus_batch.shards`, images from the rows' URIs.

    Only rows with status ``ok`` and a degraded image are used; with ``split`` only rows whose
    ``split`` column equals it (TrainError if the column is absent), with ``exclude_split``
    only rows whose split differs (the rest, when another split is held out). Rows that failed
    the run's ``min_quality`` gate (``quality_ok`` false) are left out unless
    ``include_quality_failed`` (``quality_left_out`` counts them). Relative URIs resolve
    against the output folder (the one holding ``pairs/``). No vessel or disc ground truth;
    spot masks come from ``params_json``.

    Construction checks every used row's images: a URI that points outside the output folder
    (as ``fundus-batch verify`` judges it) or a file that is missing (one listing per image
    folder) is a TrainError naming the rows. ``val_items`` reads the images lazily.
    """

    _COLUMNS = (
        "image_id",
        "variant",
        "status",
        "type_code",
        "clean_uri",
        "mask_uri",
        "degraded_uri",
        "params_json",
    )
    _OPTIONAL = ("split", "quality_ok", "size")
    _ROLES = ("clean", "mask", "degraded")

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | None = None,
        storage_options: dict[str, Any] | None = None,
        *,
        exclude_split: str | None = None,
        include_quality_failed: bool = False,
    ) -> None:
        from fundus_batch import shards

        self.root = str(root)
        self.storage_options = storage_options
        self.split = split
        self.exclude_split = exclude_split
        self.include_quality_failed = include_quality_failed
        folder = shards.pairs_dir(self.root, storage_options)
        # Rows record image paths relative to OUT, the folder that holds pairs/.
        self.out_root = shards.output_root(self.root, storage_options)
        paths = shards.list_shards(folder, storage_options)
        if not paths:
            raise TrainError(f"no Parquet files under {folder}")
        keep: list[_PairRow] = []
        self.quality_left_out = 0
        shared: dict[str, str] = {}  # one string for the ids and files that variants share
        for path in paths:
            table = shards.read_shard(path, [*self._COLUMNS, *self._OPTIONAL], storage_options)
            missing = [c for c in self._COLUMNS if c not in table.column_names]
            if missing:
                raise TrainError(f"{path} lacks pairs columns {missing}")
            if split is not None and "split" not in table.column_names:
                raise TrainError(f"{path} has no split column, cannot select split {split!r}")
            for r in table.to_pylist():
                if not (
                    r["status"] == "ok"
                    and r["degraded_uri"]
                    and r["type_code"] in TYPE_CODES
                    and (split is None or r.get("split") == split)
                    and (exclude_split is None or r.get("split") != exclude_split)
                ):
                    continue
                if r.get("quality_ok") is False and not include_quality_failed:
                    self.quality_left_out += 1
                    continue
                keep.append(_pair_row(r, shared, path))
        if self.quality_left_out:
            log.info(
                "%s: left out %d rows that failed the run's min_quality gate (quality_ok false)",
                folder,
                self.quality_left_out,
            )
        if not keep:
            failed = (
                f"; {self.quality_left_out} rows failed the quality gate "
                "(include_quality_failed, --include-quality-failed, uses them)"
                if self.quality_left_out
                else ""
            )
            raise TrainError(f"no usable rows (status ok, split {split!r}) in {folder}{failed}")
        keep.sort(key=lambda r: (r.image_id, r.variant or 0))
        self.rows = keep
        self._size: int | None = None
        self._check_images(folder)

    def __len__(self) -> int:
        return len(self.rows)

    def image_id(self, index: int) -> str:
        """``image_id/variant`` of row ``index``."""
        row = self.rows[index]
        return f"{row.image_id}/{row.variant}"

    def photo_ids(self) -> set[str]:
        """The photographs (``image_id``) the rows come from."""
        return {r.image_id for r in self.rows}

    def describe(self) -> dict[str, Any]:
        """What selects the rows (the dataset, the splits, the quality choice): a resumed run
        must read the same."""
        from fundus_batch.io.storage import redact
        from fundus_batch.outpaths import absolute_out

        return {
            "pairs": redact(absolute_out(self.out_root).rstrip("/")),
            "split": self.split,
            "exclude_split": self.exclude_split,
            "include_quality_failed": self.include_quality_failed,
        }

    @property
    def working_size(self) -> int:
        """The pairs' working size: the rows' ``size`` (the largest, should they differ), else
        the side of the first row's mask."""
        if self._size is None:
            sizes = {r.size for r in self.rows if r.size}
            if sizes:
                self._size = max(sizes)
            else:
                self._size = int(self._read(str(self.rows[0].mask_uri), grey=True).shape[0])
        return self._size

    def _check_images(self, folder: str) -> None:
        """TrainError naming the rows whose images lie outside OUT or are missing.

        Per file only string checks and a lookup; each image folder is resolved, checked for a
        link out of OUT (local disk) and listed once."""
        from fundus_batch.io import storage

        problems: dict[int, list[str]] = {}
        wanted: dict[str, list[tuple[int, str, str]]] = {}  # stored folder -> (row, role, name)
        for i, row in enumerate(self.rows):
            for role in self._ROLES:
                stored = getattr(row, f"{role}_uri")
                if not stored:
                    problems.setdefault(i, []).append(f"no {role}_uri")
                    continue
                # Never read from a URI outside OUT (a foreign shard's absolute path).
                problem = outpaths.stored_uri_problem(self.out_root, stored)
                if problem is not None:
                    text = f"{role}_uri {storage.redact(stored)} {problem}"
                    problems.setdefault(i, []).append(text)
                    continue
                parent, _, name = stored.rstrip("/").rpartition("/")
                wanted.setdefault(parent, []).append((i, role, name))
        folders = {p: outpaths.resolve(self.out_root, p) if p else self.out_root for p in wanted}
        listings = _list_folders(list(folders.values()), self.storage_options)
        real_dirs: dict[str, str] = {}
        for parent, entries in wanted.items():
            uri = folders[parent]
            present = listings[uri]
            escape = outpaths.folder_escape(self.out_root, uri, real_dirs)
            for i, role, name in entries:
                if escape is not None:
                    problem = escape
                elif name not in present:
                    problem = "is missing"
                elif present[name]:
                    problem = "is a symbolic link"
                else:
                    continue
                stored = storage.redact(str(getattr(self.rows[i], f"{role}_uri")))
                problems.setdefault(i, []).append(f"{role}_uri {stored} {problem}")
        if problems:
            shown = [f"{self.image_id(i)}: {', '.join(p)}" for i, p in sorted(problems.items())]
            more = f"; ... ({len(shown)} rows in all)" if len(shown) > _SHOWN else ""
            raise TrainError(
                f"{len(shown)} rows of {storage.redact(folder)} cannot be trained on: "
                + "; ".join(shown[:_SHOWN])
                + more
                + f"; run `fundus-batch verify {storage.redact(self.out_root)}` to check the "
                "dataset"
            )

    def _read(self, uri: str, grey: bool = False) -> np.ndarray:
        from fundus_batch.io import storage
        from fundus_batch.io.codecs import decode_image
        from fundus_batch.outpaths import resolve

        data = storage.read_bytes(resolve(self.out_root, uri), storage_options=self.storage_options)
        rgb = decode_image(data)
        return rgb[..., 0].copy() if grey else rgb

    def _pair(self, index: int) -> tuple[_PairRow, np.ndarray, np.ndarray, np.ndarray]:
        row = self.rows[index]
        clean = self._read(str(row.clean_uri))
        mask = np.where(self._read(str(row.mask_uri), grey=True) > 127, 255, 0).astype(np.uint8)
        degraded = self._read(row.degraded_uri)
        if clean.shape != degraded.shape or clean.shape[:2] != mask.shape:
            raise TrainError(f"row {self.image_id(index)}: clean/degraded/mask sizes differ")
        return row, clean, degraded, mask

    def train_item(self, index: int, rng: np.random.Generator) -> TrainItem:
        """Row ``index`` as a training pair (``rng`` is unused: the degradation is stored)."""
        row, clean, degraded, mask = self._pair(index)
        spots = None if row.spots is None else disc_mask(row.spots, clean.shape[0])
        return TrainItem(
            self.image_id(index), row.type_code, clean, degraded, mask, None, None, spots
        )

    def val_item(self, index: int) -> ValItem:
        """Row ``index`` as stored, for validation."""
        row, clean, degraded, mask = self._pair(index)
        return ValItem(row.image_id, row.type_code, clean, degraded, mask)

    def val_items(self, seed: int) -> Sequence[ValItem]:
        """Every row as stored (``seed`` is unused: the degradations are fixed), read from
        storage each time an item is taken, so a large validation split is never all in
        memory."""
        return _LazyValItems(self)


def _pair_row(row: dict[str, Any], shared: dict[str, str], shard: str) -> _PairRow:
    """The compact form of a usable shard row (TrainError if its record does not parse)."""
    from fundus_batch.degrade.params import RecordError
    from fundus_batch.io.storage import redact

    def one(value: Any) -> Any:
        return value if value is None else shared.setdefault(str(value), str(value))

    spots = None
    if row.get("params_json"):
        try:
            spots = spot_discs(DegradationRecord.from_json(row["params_json"]))
        except RecordError as exc:
            label = f"{row['image_id']}/{row['variant']}"
            raise TrainError(f"{redact(shard)}: row {label}: params_json: {exc}") from None
    variant = row["variant"]
    return _PairRow(
        image_id=one(row["image_id"]),
        variant=None if variant is None else int(variant),
        type_code=one(row["type_code"]),
        clean_uri=one(row["clean_uri"]),
        mask_uri=one(row["mask_uri"]),
        degraded_uri=row["degraded_uri"],
        size=int(row["size"]) if row.get("size") else None,
        spots=spots,
    )


_SHOWN = 5  # rows named in an error about a dataset's images
_LISTING_THREADS = 16  # concurrent folder listings on object storage


def _list_folder(folder: str, storage_options: dict[str, Any] | None) -> dict[str, bool]:
    """The entries directly in ``folder``, each with whether it is a symbolic link (never on
    object storage); empty when the folder does not exist. One listing."""
    from fundus_batch.io import storage

    if outpaths.is_local(folder):
        try:
            with os.scandir(folder.removeprefix("file://")) as entries:
                return {e.name: e.is_symlink() for e in entries}
        except (FileNotFoundError, NotADirectoryError):
            return {}
    fs, path = storage.filesystem(folder, storage_options)

    def ls() -> list[Any]:
        fs.invalidate_cache(path)  # object-store listings are cached by fsspec
        try:
            return list(fs.ls(path, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    names = storage.with_retries("listing", folder, ls)
    return {str(e).rstrip("/").rsplit("/", 1)[-1]: False for e in names}


def _list_folders(
    folders: Sequence[str], storage_options: dict[str, Any] | None
) -> dict[str, dict[str, bool]]:
    """Each folder's entries (:func:`_list_folder`), several listings at once on object
    storage."""
    from concurrent.futures import ThreadPoolExecutor

    if len(folders) < 2 or outpaths.is_local(folders[0]):
        return {f: _list_folder(f, storage_options) for f in folders}
    with ThreadPoolExecutor(_LISTING_THREADS, thread_name_prefix="listing") as pool:
        names = pool.map(lambda f: _list_folder(f, storage_options), folders)
        return dict(zip(folders, names, strict=True))


class _LazyValItems(Sequence[ValItem]):
    """A pairs source's validation items, each read when it is taken."""

    def __init__(self, source: PairsSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    @overload
    def __getitem__(self, index: int) -> ValItem: ...
    @overload
    def __getitem__(self, index: slice) -> list[ValItem]: ...
    def __getitem__(self, index: int | slice) -> ValItem | list[ValItem]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.source.val_item(index % len(self))


def random_crop(item: TrainItem, size: int, rng: np.random.Generator) -> TrainItem:
    """``item`` cut to a ``size`` square at a position drawn from ``rng``."""
    side = item.clean.shape[0]
    if side < size or item.clean.shape[1] < size:
        raise TrainError(
            f"{item.image_id}: sample is {item.clean.shape[1]}x{side}, smaller than the "
            f"training size {size}"
        )
    y = int(rng.integers(side - size + 1))
    x = int(rng.integers(item.clean.shape[1] - size + 1))

    @overload
    def c(a: np.ndarray) -> np.ndarray: ...
    @overload
    def c(a: None) -> None: ...
    def c(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[y : y + size, x : x + size]

    return TrainItem(
        item.image_id,
        item.type_code,
        c(item.clean),
        c(item.degraded),
        c(item.mask),
        c(item.vessels),
        c(item.disc),
        c(item.spots),
        c(item.photo),
    )


def image_batch(arrs: Sequence[np.ndarray]) -> Tensor:
    """HxWx3 uint8 images as one contiguous NCHW float tensor in [0, 1]."""
    stacked = np.stack(arrs)
    # Contiguous NCHW: a channels_last input crashes CPU conv backward in this torch build.
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def _planes(arrs: Sequence[np.ndarray | None], shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Stacked N x 1 x H x W float planes (zeros where absent) and an N-vector of presence."""
    present = torch.tensor([a is not None for a in arrs], dtype=torch.float32)
    filled = [np.zeros(shape, np.float32) if a is None else a.astype(np.float32) for a in arrs]
    return torch.from_numpy(np.stack(filled))[:, None], present


@dataclass
class Batch:
    """Training tensors on one device (N x C x H x W, floats in [0, 1])."""

    clean: Tensor
    degraded: Tensor
    mask: Tensor
    vessels: Tensor
    has_vessels: Tensor
    disc: Tensor
    has_disc: Tensor
    spots: Tensor
    has_spots: Tensor
    illumination: Tensor  # N: 1.0 where the pair's degradation includes illumination
    photo: Tensor  # the photographs that were degraded (``clean`` where that is the target)

    def to(self, device: torch.device) -> Batch:
        """A copy on ``device``; a tensor that fills two fields (``photo`` is often ``clean``)
        is copied once and stays shared."""
        tensors = [getattr(self, f.name) for f in fields(self)]
        unique = {id(t): t for t in tensors}
        moved = {key: t.to(device) for key, t in unique.items()}
        return Batch(*(moved[id(t)] for t in tensors))


def make_batch(items: Sequence[TrainItem]) -> Batch:
    """Stack training items of one size into tensors."""
    shape = items[0].clean.shape[:2]
    if any(it.clean.shape[:2] != shape for it in items):
        raise TrainError("all items of a batch must have the same size")
    vessels, has_v = _planes([it.vessels for it in items], shape)
    disc, has_d = _planes([it.disc for it in items], shape)
    spots, has_s = _planes([it.spots for it in items], shape)
    mask = torch.from_numpy(np.stack([it.mask > 127 for it in items])).float()[:, None]
    clean = image_batch([it.clean for it in items])
    photo = clean
    if any(it.photo is not None for it in items):
        photo = image_batch([it.clean if it.photo is None else it.photo for it in items])
    return Batch(
        clean=clean,
        degraded=image_batch([it.degraded for it in items]),
        mask=mask,
        vessels=vessels,
        has_vessels=has_v,
        disc=disc,
        has_disc=has_d,
        spots=spots,
        has_spots=has_s,
        illumination=torch.tensor([float(type_groups(it.type_code)[0]) for it in items]),
        photo=photo,
    )
