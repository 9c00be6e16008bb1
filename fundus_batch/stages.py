"""The pipeline steps: Fetch, Preprocess, Degrade, Score, QualityGate, Write (Enhance lives in
``enhance``), each a :class:`Stage` that maps a batch of :class:`Item` to a
batch of :class:`Item`.

Stages know nothing about Ray: :mod:`fundus_batch.ray_adapter` turns :class:`StageSpec` lists
into Ray Data operators using the :class:`Resources` each stage class declares. An item keeps
its images decoded while the stages of one worker pass it along; encoded bytes travel only
where a batch crosses the object store and reach storage at Write. A failed row keeps flowing
with ``status``, ``error`` and ``failed_stage`` set; later stages pass it through untouched.
"""

from __future__ import annotations

import inspect
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np

from fundus_batch import __version__, outpaths
from fundus_batch.degrade import Preset, degrade, get_preset, sample_rng, stable_hash
from fundus_batch.fov import FOVError
from fundus_batch.imaging import (
    ImageFormat,
    as_stored,
    crop_like,
    decode_mask,
    decode_vessel_truth,
    encode_output,
    sha256_hex,
    source_working_image,
)
from fundus_batch.io import codecs, storage
from fundus_batch.quality import parse_rule
from fundus_batch.schema import STATUS_OK, failed

if TYPE_CHECKING:
    from fundus_batch.config import RunConfig
    from fundus_batch.metrics import NorefContext, ReferenceContext

Row = dict[str, Any]
SourceRole = Literal["degraded", "clean"]

# The encoded images an item may carry, by role, and their column in the work schema. Before
# Preprocess, ``mask`` and ``vessel_gt`` hold the source files; after it, the working maps.
ENCODED_COLUMNS: dict[str, str] = {
    "raw": "raw_bytes",
    "clean": "clean_png",
    "mask": "mask_png",
    "degraded": "degraded_png",
    "enhanced": "enhanced_png",
    "vessel_gt": "vessel_gt_png",
}
_ROLE_OF_COLUMN = {column: role for role, column in ENCODED_COLUMNS.items()}
_BINARY_ROLES = frozenset({"mask", "vessel_gt"})


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs. ``actor`` stages keep state (a model) between batches."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    actor: bool = False


@dataclass
class Item:
    """One row between stages: its scalar columns, its images decoded (kept while the stages of
    one worker pass the item on) and encoded (what Write stores and what crosses workers).

    Decoded arrays are read-only: variant items of one image share them, and the metric
    contexts of its clean image (``clean_scoring``: built by the first Score stage, reused by
    the later ones in the same worker, never serialised).
    """

    row: Row
    images: dict[str, np.ndarray] = field(default_factory=dict)
    encoded: dict[str, bytes] = field(default_factory=dict)
    clean_scoring: _CleanScoring | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return bool(self.row.get("status", STATUS_OK) == STATUS_OK)

    def fail(self, stage: str, exc: BaseException | str) -> None:
        """Mark the row failed at ``stage`` (the first failure is kept)."""
        failed(self.row, stage, exc)

    def has(self, role: str) -> bool:
        return role in self.images or role in self.encoded

    def image(self, role: str) -> np.ndarray:
        """The decoded image of ``role``, decoded from the encoded bytes on first use (masks and
        vessel maps as binary HxW uint8, images as RGB uint8)."""
        arr = self.images.get(role)
        if arr is None:
            data = self.encoded[role]
            arr = decode_mask(data) if role in _BINARY_ROLES else codecs.decode_image(data)
            arr.flags.writeable = False
            self.images[role] = arr
        return arr

    def put(self, role: str, pixels: np.ndarray, encoded: bytes) -> None:
        """Store an image both ways; ``pixels`` must be what decoding ``encoded`` gives back."""
        pixels.flags.writeable = False
        self.images[role] = pixels
        self.encoded[role] = encoded

    def put_output(self, role: str, rgb: np.ndarray, image_format: str, jpeg_quality: int) -> None:
        """Encode ``rgb`` in the output format and keep the pixels a reader will decode (for
        JPEG the decoded bytes, so that later stages see what is stored)."""
        data = encode_output(rgb, image_format, jpeg_quality)
        self.put(role, as_stored(rgb, data, image_format), data)

    def take_encoded(self, role: str) -> bytes | None:
        """Remove and return the encoded bytes of ``role`` (and its decoded image)."""
        self.images.pop(role, None)
        return self.encoded.pop(role, None)

    def drop_images(self) -> None:
        self.images.clear()
        self.encoded.clear()
        self.clean_scoring = None

    def derive(self, **columns: Any) -> Item:
        """A new item of the same images (shared, not copied) with ``columns`` set."""
        return Item(
            {**self.row, **columns}, dict(self.images), dict(self.encoded), self.clean_scoring
        )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Item:
        """An item of a row dict whose ``*_png``/``raw_bytes`` columns hold encoded images."""
        scalars: Row = {}
        encoded: dict[str, bytes] = {}
        for key, value in row.items():
            role = _ROLE_OF_COLUMN.get(key)
            if role is None or value is None:  # a null image column passes through as is
                scalars[key] = value
            else:
                encoded[role] = value
        return cls(scalars, {}, encoded)

    def to_row(self) -> Row:
        """The row dict of this item, encoded images in their work columns."""
        row = dict(self.row)
        for role, data in self.encoded.items():
            row[ENCODED_COLUMNS[role]] = data
        return row


Batch = list[Item]


def items_of(rows: Iterable[Mapping[str, Any]]) -> Batch:
    return [Item.from_row(r) for r in rows]


def rows_of(items: Iterable[Item]) -> list[Row]:
    return [i.to_row() for i in items]


class Stage(Protocol):
    """A pipeline step: a name, the resources one worker needs, and batch -> batch."""

    name: ClassVar[str]
    resources: ClassVar[Resources]

    def process(self, batch: Batch) -> Batch: ...


class RowsCallable:
    """Lets a stage be called on row dicts (notebooks, tests): ``stage(rows) -> rows``."""

    def process(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def __call__(self, rows: list[Row]) -> list[Row]:
        return rows_of(self.process(items_of(rows)))


@dataclass(frozen=True)
class StageSpec:
    """How to build one stage in a worker: its class and keyword arguments, checked against
    the class's signature when the spec is made (a typo fails in the driver, before work)."""

    cls: type[Stage]
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            inspect.signature(self.cls).bind(**self.kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.cls.__name__}: {exc}") from None

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def resources(self) -> Resources:
        return self.cls.resources

    def build(self) -> Stage:
        factory: Callable[..., Stage] = self.cls
        return factory(**self.kwargs)


def run_stages(stages: Sequence[Stage], batch: Batch) -> Batch:
    """Run ``stages`` in order on one batch; a stage that raises fails its items, never the
    batch."""
    for stage in stages:
        try:
            batch = stage.process(batch)
        except Exception as exc:
            for item in batch:
                item.fail(stage.name, exc)
    return batch


class StageBuildError(RuntimeError):
    """A stage could not be built in a worker (its weights, its device, ...): one line that
    names the stage and the root cause, which the driver can show as it is."""


def _build(spec: StageSpec) -> Stage:
    """``spec.build()``, whose failure becomes a one-line :class:`StageBuildError`."""
    try:
        return spec.build()
    except Exception as exc:
        reason = " ".join(str(exc).split())
        raise StageBuildError(
            f"the {spec.name} stage could not start: {type(exc).__name__}: {reason}"
        ) from exc


class Chain(RowsCallable):
    """Stages built from specs and run one after the other on the same items, in one worker."""

    def __init__(self, specs: Sequence[StageSpec]) -> None:
        self.stages = [_build(s) for s in specs]
        self.name = "+".join(s.name for s in self.stages)

    def process(self, batch: Batch) -> Batch:
        return run_stages(self.stages, batch)


class Fetch(RowsCallable):
    """Read each row's source bytes (and optional FOV mask and vessel ground truth) through
    fsspec, with threads."""

    name: ClassVar[str] = "fetch"
    resources: ClassVar[Resources] = Resources(num_cpus=0.25)

    def __init__(
        self,
        *,
        storage_options: Mapping[str, Any] | None = None,
        threads: int = 8,
        retries: int = storage.DEFAULT_RETRIES,
        vessels: bool = False,
    ) -> None:
        self.storage_options = dict(storage_options or {})
        self.threads = threads
        self.retries = retries
        self.vessels = vessels

    def _read(self, uri: str) -> bytes:
        return storage.read_bytes(uri, storage_options=self.storage_options, retries=self.retries)

    def _fetch_one(self, item: Item) -> Item:
        if not item.ok:
            return item
        row = item.row
        start = time.perf_counter()
        try:
            item.encoded["raw"] = self._read(row["source_uri"])
            if row.get("source_mask_uri"):
                item.encoded["mask"] = self._read(row["source_mask_uri"])
            if self.vessels and row.get("vessel_gt_uri"):
                item.encoded["vessel_gt"] = self._read(row["vessel_gt_uri"])
        except Exception as exc:
            item.fail(self.name, storage.redact(f"{type(exc).__name__}: {exc}"))
        row["seconds_fetch"] = time.perf_counter() - start
        return item

    def process(self, batch: Batch) -> Batch:
        if len(batch) <= 1 or self.threads == 1:
            return [self._fetch_one(i) for i in batch]
        with ThreadPoolExecutor(max_workers=min(self.threads, len(batch))) as pool:
            return list(pool.map(self._fetch_one, batch))


class Preprocess(RowsCallable):
    """Decode (reduced when the source is large), find the FOV, crop, pad and resize."""

    name: ClassVar[str] = "preprocess"
    resources: ClassVar[Resources] = Resources(num_cpus=0.5)

    def __init__(
        self,
        *,
        size: int = 512,
        image_format: ImageFormat = "png",
        jpeg_quality: int = 95,
        max_pixels: int = codecs.DEFAULT_MAX_PIXELS,
    ) -> None:
        self.size = size
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.max_pixels = max_pixels

    def _one(self, item: Item) -> Item:
        raw = item.take_encoded("raw")
        vessel_raw = item.take_encoded("vessel_gt")
        given_mask = item.take_encoded("mask")
        if not item.ok:
            return item
        row = item.row
        start = time.perf_counter()
        try:
            if raw is None:
                raise ValueError("no source bytes were fetched")
            width, height = codecs.image_dimensions(raw)
            row["source_width"], row["source_height"] = width, height
            source = source_working_image(
                raw, self.size, given_mask, self.max_pixels, (width, height)
            )
            pre = source.pre
            in_source = source.source_circle  # reported in source pixels
            row["fov_cx"], row["fov_cy"], row["fov_r"] = in_source.cx, in_source.cy, in_source.r
            row["fov_status"] = pre.status
            row["size"] = self.size
            item.put_output("clean", pre.image, self.image_format, self.jpeg_quality)
            item.put("mask", pre.mask, codecs.encode_png(pre.mask))
            if vessel_raw is not None:
                truth = decode_vessel_truth(vessel_raw)
                truth = crop_like(truth, source.rgb.shape[:2], pre.circle, self.size, "vessel map")
                truth = np.where(pre.mask > 0, truth, 0).astype(np.uint8)
                item.put("vessel_gt", truth, codecs.encode_png(truth))
        except (codecs.DecodeError, FOVError) as exc:
            item.fail(self.name, f"{type(exc).__name__}({exc.reason}): {exc}")
        except Exception as exc:
            item.fail(self.name, exc)
        row["seconds_preprocess"] = time.perf_counter() - start
        return item

    def process(self, batch: Batch) -> Batch:
        return [self._one(i) for i in batch]


def choose_type(types: Sequence[str], mode: str, run_seed: int, image_id: str, variant: int) -> str:
    """Degradation type of one variant: cycled through ``types`` or drawn per sample."""
    if mode == "cycle":
        return types[variant % len(types)]
    # A stream separate from the degradation draws, so the type choice never shifts them.
    seq = np.random.SeedSequence([run_seed, stable_hash(image_id), variant, 1])
    return types[int(np.random.Generator(np.random.PCG64(seq)).integers(len(types)))]


class Degrade(RowsCallable):
    """Expand each image item into one item per pending variant with a degraded image."""

    name: ClassVar[str] = "degrade"
    resources: ClassVar[Resources] = Resources(num_cpus=0.5, actor=True)

    def __init__(
        self,
        *,
        seed: int,
        variants: int,
        types: Sequence[str],
        type_mode: Literal["cycle", "sample"] = "cycle",
        preset: Preset | str = "cofe-release",
        image_format: ImageFormat = "png",
        jpeg_quality: int = 95,
    ) -> None:
        self.seed = seed
        self.variants = variants
        self.types = list(types)
        self.type_mode = type_mode
        # the resolved ranges (a custom preset's travel to the workers with the stage's
        # arguments); rows carry the preset's name
        self.preset = get_preset(preset)
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality

    def process(self, batch: Batch) -> Batch:
        out: Batch = []
        for item in batch:
            out.extend(self._expand(item))
        return out

    def _expand(self, item: Item) -> Batch:
        pending = item.row.pop("pending_variants", None)
        variants = list(range(self.variants)) if pending is None else [int(v) for v in pending]
        image = mask = None
        if item.ok:
            try:
                image, mask = item.image("clean"), item.image("mask")
            except Exception as exc:
                item.fail(self.name, exc)
        image_id = item.row["image_id"]
        out = []
        for variant in variants:
            vitem = item.derive(
                variant=variant,
                seed=self.seed,
                id_hash=f"{stable_hash(image_id):016x}",
                preset=self.preset.name,
                type_code=choose_type(self.types, self.type_mode, self.seed, image_id, variant),
            )
            if vitem.ok:
                # an item still ok decoded both (a failed decode marks it not ok)
                assert image is not None and mask is not None
                self._degrade_one(vitem, image, mask)
            out.append(vitem)
        return out

    def _degrade_one(self, item: Item, image: np.ndarray, mask: np.ndarray) -> None:
        row = item.row
        start = time.perf_counter()
        try:
            rng = sample_rng(self.seed, row["image_id"], row["variant"])
            degraded, record = degrade(image, mask, row["type_code"], rng, preset=self.preset)
            row["params_json"] = record.to_json()
            row.update(record.flat_summary())
            item.put_output("degraded", degraded, self.image_format, self.jpeg_quality)
        except Exception as exc:
            item.fail(self.name, exc)
        row["seconds_degrade"] = time.perf_counter() - start


class _CleanScoring:
    """One clean image and its mask, decoded, with the metric contexts built from them."""

    def __init__(self, item: Item) -> None:
        from fundus_batch.metrics import NorefContext

        self.image = item.image("clean")
        self.mask = item.image("mask")
        self.clean_bytes = item.encoded.get("clean")
        self.mask_bytes = item.encoded.get("mask")
        self.noref: NorefContext = NorefContext(self.mask, self.image.shape)
        self._reference: ReferenceContext | None = None

    def matches(self, item: Item) -> bool:
        """Whether ``item`` carries this clean image and mask (the same arrays, or equal bytes
        when it came across the object store)."""
        return _same(item, "clean", self.image, self.clean_bytes) and _same(
            item, "mask", self.mask, self.mask_bytes
        )

    @property
    def reference(self) -> ReferenceContext:
        """The full-reference context of the clean image, built on first use."""
        if self._reference is None:
            from fundus_batch.metrics import reference_context

            self._reference = reference_context(self.image, self.mask)
        return self._reference

    def release_reference(self) -> None:
        """Free the full-reference context (several image-sized float arrays); it is rebuilt
        if needed again."""
        self._reference = None


def _same(item: Item, role: str, pixels: np.ndarray, data: bytes | None) -> bool:
    if item.images.get(role) is pixels:
        return True
    other = item.encoded.get(role)
    return data is not None and other is not None and (other is data or other == data)


class Score(RowsCallable):
    """Quality metrics: no-reference for each image present, full-reference against clean."""

    name: ClassVar[str] = "score"
    resources: ClassVar[Resources] = Resources(num_cpus=0.5)

    def __init__(
        self,
        *,
        roles: Sequence[Literal["clean", "degraded", "enhanced"]] = ("degraded", "enhanced"),
        reference: bool = True,
    ) -> None:
        self.roles = tuple(roles)
        self.reference = reference
        self._clean: _CleanScoring | None = None

    def _clean_for(self, item: Item) -> _CleanScoring:
        """The clean image, mask and metric contexts of ``item``: those an earlier Score stage
        left on the item, else those kept while the items that follow (the other variants of
        one image) carry the same clean image and mask."""
        cached = item.clean_scoring or self._clean
        if cached is None or not cached.matches(item):
            cached = _CleanScoring(item)
        else:  # share the decoded arrays with the item rather than decoding its bytes again
            item.images.setdefault("clean", cached.image)
            item.images.setdefault("mask", cached.mask)
        if self._clean is not None and self._clean is not cached:
            # The items of a batch keep their image's contexts until Write: keep only one
            # image's full-reference context alive at a time, as when each stage kept its own.
            self._clean.release_reference()
        self._clean = item.clean_scoring = cached
        return cached

    def process(self, batch: Batch) -> Batch:
        from fundus_batch.metrics import METRIC_VERSION, noref_metrics

        for item in batch:
            if not item.ok:
                continue
            row = item.row
            start = time.perf_counter()
            try:
                clean = self._clean_for(item)
                truth = item.image("vessel_gt") if item.has("vessel_gt") else None
                for role in self.roles:
                    if not item.has(role):
                        continue
                    img = item.image(role)
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
                item.fail(self.name, exc)
            row["seconds_score"] = (row.get("seconds_score") or 0.0) + time.perf_counter() - start
        return batch


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


class QualityGate(RowsCallable):
    """Flag each row against a quality rule (``quality.parse_rule``); rows are never dropped."""

    name: ClassVar[str] = "quality"
    resources: ClassVar[Resources] = Resources(num_cpus=0.25)

    def __init__(self, *, rule: str) -> None:
        self.rule = parse_rule(rule)

    def process(self, batch: Batch) -> Batch:
        for item in batch:
            if not item.ok:
                continue
            ok, broken = self.rule.evaluate(item.row)
            item.row["quality_ok"] = ok
            item.row["quality_failed"] = "; ".join(broken) or None
        return batch


_SHARED_REMEMBERED = 4096  # shared files whose content a Write stage remembers


class Write(RowsCallable):
    """Write each item's images under deterministic paths and drop the pixels."""

    name: ClassVar[str] = "write"
    resources: ClassVar[Resources] = Resources(num_cpus=0.25)

    def __init__(
        self,
        *,
        out: str,
        image_format: ImageFormat = "png",
        storage_options: Mapping[str, Any] | None = None,
        retries: int = storage.DEFAULT_RETRIES,
    ) -> None:
        self.out = out
        self.image_format = image_format
        self.storage_options = dict(storage_options or {})
        self.retries = retries
        self._shared: OrderedDict[str, str] = OrderedDict()  # path -> sha256 of its bytes

    def _check_inside(self, uri: str) -> None:
        root = self.out.rstrip("/") + "/"
        if not uri.startswith(root) or "/../" in uri[len(root) - 1 :]:
            raise ValueError(f"refusing to write outside the output root: {uri}")
        outpaths.check_local_target(self.out, uri)  # no symlinked folder or file inside OUT

    def _put(self, uri: str, data: bytes) -> str:
        self._check_inside(uri)
        storage.write_bytes(uri, data, storage_options=self.storage_options, retries=self.retries)
        return sha256_hex(data)

    def _put_shared(self, uri: str, data: bytes) -> str:
        """Write a file all variant rows of an image share (clean, mask) unless it is there.

        Any row writes it when it is missing (the row meant to carry it may have failed); one
        already there must hold these bytes, or the row fails (the source photograph changed
        since an earlier run wrote it, whose rows point at it). What this actor last wrote or
        read at each path is remembered, so the image's other rows cost no I/O.
        """
        self._check_inside(uri)
        digest = sha256_hex(data)
        held = self._shared.get(uri)
        if held is None:
            options, retries = self.storage_options, self.retries
            size = storage.file_size(uri, storage_options=options, retries=retries)
            if size is None:
                storage.write_bytes(uri, data, storage_options=options, retries=retries)
                held = digest
            elif size == len(data):
                held = sha256_hex(storage.read_bytes(uri, storage_options=options, retries=retries))
            else:
                held = f"{size} bytes"
            self._shared[uri] = held
            if len(self._shared) > _SHARED_REMEMBERED:
                self._shared.popitem(last=False)
        if held != digest:
            raise ValueError(
                f"{outpaths.relative_to_out(self.out, uri)} already exists with other content: "
                "the source image changed since an earlier run wrote it, or an earlier "
                "version of fundus-batch preprocessed it otherwise; remove the image's rows "
                "and files (or give it a new image_id) to redo it"
            )
        return digest

    def process(self, batch: Batch) -> Batch:
        for item in batch:
            row = item.row
            start = time.perf_counter()
            try:
                if item.ok:
                    self._write_item(item)
            except Exception as exc:
                item.fail(self.name, storage.redact(f"{type(exc).__name__}: {exc}"))
            item.drop_images()
            for column in ENCODED_COLUMNS.values():
                row.pop(column, None)
            row["seconds_write"] = time.perf_counter() - start
            row["fundus_batch_version"] = __version__
            # A presigned or user:pass@ URI must not carry its secret into the dataset.
            row["source_uri"] = storage.redact_uri(row.get("source_uri") or "") or None
            if row.get("vessel_gt_uri"):
                row["vessel_gt_uri"] = storage.redact_uri(row["vessel_gt_uri"])
        return batch

    def _write_item(self, item: Item) -> None:
        row = item.row
        paths = outpaths.image_paths(
            self.out, row["image_id"], row.get("variant"), row.get("type_code"), self.image_format
        )
        for role in ("clean", "mask", "degraded", "enhanced"):
            data = item.encoded.get(role)
            if data is None or role not in paths:
                continue
            if role in ("clean", "mask") and row.get("variant") is not None:
                digest = self._put_shared(paths[role], data)
            else:
                digest = self._put(paths[role], data)
            # Relative to OUT, so that a moved or copied OUT still verifies.
            row[f"{role}_uri"] = outpaths.relative_to_out(self.out, paths[role])
            row[f"{role}_sha256"] = digest


def stage_specs(config: RunConfig) -> list[StageSpec]:
    """Every stage of this run, in order, each built from its own config section."""
    from fundus_batch.enhance import ClassicalEnhance, Enhance

    fmt: dict[str, Any] = {
        "image_format": config.image_format,
        "jpeg_quality": config.jpeg_quality,
    }
    specs = [
        StageSpec(
            Fetch,
            {
                "storage_options": config.storage_options,
                "threads": config.ray.fetch_threads,
                "retries": config.storage_retries,
                "vessels": config.compute_metrics,
            },
        ),
        StageSpec(Preprocess, {"size": config.size, **fmt}),
    ]
    if config.compute_metrics:
        specs.append(StageSpec(Score, {"roles": ("clean",)}))
    if config.mode == "pairs":
        specs.append(
            StageSpec(
                Degrade,
                {
                    "seed": config.seed,
                    "variants": config.variants,
                    "types": tuple(config.types),
                    "type_mode": config.type_mode,
                    "preset": config.resolved_preset,
                    **fmt,
                },
            )
        )
    enh = config.enhance
    if enh.enabled:
        source_role = "degraded" if config.mode == "pairs" else "clean"
        if enh.enhancer == "classical":
            specs.append(StageSpec(ClassicalEnhance, {"source_role": source_role, **fmt}))
        else:
            specs.append(
                StageSpec(
                    Enhance,
                    {
                        "weights": enh.weights,
                        "variant": enh.variant,
                        "width": enh.width,
                        "batch_size": enh.batch_size,
                        "device": enh.device,
                        "max_change": enh.max_change,
                        "source_role": source_role,
                        "cpu_share": enh.cpus_per_actor,
                        **fmt,
                    },
                )
            )
    if config.compute_metrics:
        specs.append(
            StageSpec(
                Score, {"roles": ("degraded", "enhanced"), "reference": config.mode == "pairs"}
            )
        )
    if config.min_quality:
        specs.append(StageSpec(QualityGate, {"rule": config.min_quality}))
    specs.append(
        StageSpec(
            Write,
            {
                "out": outpaths.absolute_out(config.out),  # workers do not share the cwd
                "image_format": config.image_format,
                "storage_options": config.out_storage_options,
                "retries": config.storage_retries,
            },
        )
    )
    return specs
