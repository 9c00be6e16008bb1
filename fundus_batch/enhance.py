"""The enhancement stages: Cofe-Net (a model loaded once per worker, batched inference) and
the classical baseline; ``enhance_image`` enhances one image without Ray."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import cv2
import numpy as np

from fundus_batch.imaging import ImageFormat
from fundus_batch.io import codecs
from fundus_batch.metrics.harm import mean_change
from fundus_batch.stages import Batch, Item, Resources, RowsCallable, SourceRole


def load_model(
    weights: str, variant: str | None = None, width: float | None = None, device: str = "cpu"
):
    """Load registered weights by name, or a checkpoint file (variant/width detected or given).

    Returns ``(model, name, sha256)``. Raises WeightsError for weights that cannot be loaded,
    and for a variant or width given with registered weights (a name, or a file whose bytes a
    registry entry names): the entry sets them, so they would be ignored.
    """
    from fundus_batch.models import (
        WeightsEntry,
        WeightsError,
        file_sha256,
        model_for_entry,
        model_from_weights,
        resolve_weights,
    )

    found = resolve_weights(weights)
    if isinstance(found, WeightsEntry):
        if variant is not None or width is not None:
            named = "" if weights == found.name else f" as {found.name!r}"
            raise WeightsError(
                f"weights {weights!r} are registered{named} (variant {found.variant!r}, width "
                f"{found.width:g}), which sets the variant and width: leave out --variant and "
                "--width (enhance.variant, enhance.width)"
            )
        return model_for_entry(found, device), found.name, found.sha256
    model = model_from_weights(found, variant=variant, width=width)
    return model.to(device), found.name, file_sha256(found)


def check_model(
    weights: str, variant: str | None = None, width: float | None = None, size: int | None = None
) -> tuple[str, str]:
    """Check, before any work, that every :class:`Enhance` stage will build the model and that
    it takes ``size`` px working images. Registered weights are checked by their file's sha256
    and their entry (no model is built here); a checkpoint file is built on this machine's CPU
    as the stages will build it. Returns ``(model name, sha256)``; raises ConfigError with one
    line naming the problem (weights missing, corrupt, not the registered ones or not fitting the
    variant and width; a variant or width that registered weights would ignore; the size)."""
    from fundus_batch.config import ConfigError
    from fundus_batch.models import WeightsEntry, check_entry_file, resolve_weights
    from fundus_batch.models.cofenet import check_input_size

    try:
        found = resolve_weights(weights)
        if isinstance(found, WeightsEntry) and variant is None and width is None:
            check_entry_file(found)
            name, sha256, field = found.name, found.sha256, found.field_size
        else:
            model, name, sha256 = load_model(weights, variant, width, "cpu")
            field = model.field
    except ValueError as exc:  # WeightsError, or the network refusing its settings
        reason = " ".join(str(exc).split())
        raise ConfigError(f"enhance.weights {weights!r} cannot be used: {reason}") from exc
    if size is not None:
        try:
            check_input_size(size, size, field)
        except ValueError as exc:
            raise ConfigError(
                f"size (--size) {size} does not suit weights {name!r}: {exc}"
            ) from None
    return name, sha256


def pick_device(requested: str) -> str:
    """``auto`` means CUDA when this worker sees a GPU, else CPU. Raises ConfigError when
    ``cuda`` is asked for and there is none."""
    import torch

    from fundus_batch.config import ConfigError

    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"enhance.device (--device) must be auto, cpu or cuda, got {requested!r}")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("enhance.device (--device) is 'cuda' but this machine sees no GPU")
    return requested


class Enhance(RowsCallable):
    """Enhance each row's degraded (pairs mode) or source image with Cofe-Net.

    The output is masked to the FOV. On CUDA it runs under bf16 autocast with channels_last; on
    CPU torch uses as many threads as the worker's CPU share (``cpu_share``; None leaves the
    process's setting alone). ``max_change`` (whole grey levels, 1-255) bounds what the network
    may do to any pixel (``CofeNet.max_change``).

    The network's own vessel branch is not scored: it reached ROC AUC 0.49 on clean images
    (it never learnt vessels), and an enhancer judged by its own branch would be circular.
    Downstream vessel scores come from an independent segmenter in the Score stage
    (:func:`fundus_batch.stages.score_vessels`); the branch would be reported again only if it
    reached AUC >= 0.85 on clean held-out images.
    """

    name: ClassVar[str] = "enhance"
    # Wants a GPU; the Ray adapter falls back to CPU actors on clusters without one.
    resources: ClassVar[Resources] = Resources(num_cpus=1.0, num_gpus=1.0, actor=True)

    def __init__(
        self,
        *,
        weights: str = "fundus-cofenet-small",
        variant: str | None = None,
        width: float | None = None,
        batch_size: int = 4,
        device: str = "auto",
        max_change: int | None = None,
        source_role: SourceRole = "degraded",
        image_format: ImageFormat = "png",
        jpeg_quality: int = 95,
        cpu_share: float | None = 1.0,
    ) -> None:
        import torch

        from fundus_batch.models.cofenet import check_max_change

        if max_change is not None and (
            isinstance(max_change, bool)
            or not isinstance(max_change, int)
            or not 1 <= max_change <= 255
        ):
            raise ValueError(f"max_change must be whole grey levels in 1..255, got {max_change!r}")
        self.device = pick_device(device)
        if cpu_share is not None:
            # On CUDA too: torch's CPU ops here (conversions, copies) need no more than that.
            torch.set_num_threads(max(1, round(cpu_share)))
        self.model, self.model_name, self.model_sha256 = load_model(
            weights, variant, width, self.device
        )
        self.model.max_change = check_max_change(None if max_change is None else max_change / 255)
        if self.device == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_size = batch_size
        self.source_role = source_role
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality

    def _forward(self, images: list[np.ndarray]) -> tuple[Any, Any]:
        """Queue the network on one chunk of RGB uint8 images of one size: (the enhanced
        chunk, N x H x W x 3 uint8 on the model's device, unmasked; the network's outputs)."""
        import torch

        # uint8 crosses to the device (a quarter of float32's bytes); it is converted there.
        x = torch.from_numpy(np.stack(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode():
            if self.device == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    outputs = self.model(x)
            else:
                outputs = self.model(x)
            y = self.model.enhanced(outputs).float().clamp_(0, 1)
            y = y.mul_(255.0).round_().to(torch.uint8)
        return y.permute(0, 2, 3, 1), outputs

    def run_model(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], list | None]:
        """Run the network on RGB uint8 images of one size.

        Returns the enhanced images (RGB uint8, unmasked) and, for variants with a vessel
        branch, the vessel probability maps of the inputs (HxW float32), else None.
        """
        enhanced: list[np.ndarray] = []
        vessels: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            y, outputs = self._forward(images[start : start + self.batch_size])
            v = self.model.vessel(outputs)
            if v is not None:
                vessels.extend(v.float()[:, 0].cpu().numpy())
            enhanced.extend(y.cpu().numpy())
        return enhanced, (vessels or None)

    def _launch(self, images: list[np.ndarray]) -> _Launched:
        """Queue one chunk and its copy to the host: on CUDA both run while the CPU goes on."""
        import torch

        y, _ = self._forward(images)
        if self.device != "cuda":
            return _Launched(y, None)
        host = torch.empty(y.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(y, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _Launched(host, done)

    def enhance_arrays(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Enhance RGB uint8 images of one size; returns RGB uint8 images (unmasked)."""
        return self.run_model(images)[0]

    def process(self, batch: Batch) -> Batch:
        """Enhance every ok item, in chunks of up to ``batch_size`` consecutive images of one
        size.

        The CPU and the GPU work at once: while a chunk is on the GPU, the next chunk's inputs
        are decoded and the previous chunk's outputs masked and encoded. ``seconds_enhance`` is
        a row's whole time in the stage: decoding its inputs, its share of its chunk's forward
        pass (the wait for it included) and encoding its output.
        """
        pending: _Chunk | None = None
        filling: list[_Entry] = []
        for item in batch:
            if not item.ok:
                continue
            start = time.perf_counter()
            try:
                entry = _Entry(item, item.image(self.source_role), item.image("mask"))
            except Exception as exc:
                item.fail(self.name, exc)
                continue
            entry.seconds = time.perf_counter() - start
            if filling and (
                len(filling) == self.batch_size or entry.image.shape != filling[0].image.shape
            ):
                pending = self._next(filling, pending)
                filling = []
            filling.append(entry)
        if filling:
            pending = self._next(filling, pending)
        if pending is not None:
            self._finish(pending)
        return batch

    def _next(self, entries: list[_Entry], pending: _Chunk | None) -> _Chunk:
        """Queue ``entries`` on the model, then finish the chunk queued before them."""
        start = time.perf_counter()
        launched: _Launched | Exception
        try:
            launched = self._launch([e.image for e in entries])
        except Exception as exc:
            launched = exc
        current = _Chunk(entries, launched, time.perf_counter() - start)
        if pending is not None:
            self._finish(pending)
        return current

    def _finish(self, chunk: _Chunk) -> None:
        """Wait for the chunk's outputs, mask them to the FOV and encode them."""
        start = time.perf_counter()
        try:
            if isinstance(chunk.launched, Exception):
                raise chunk.launched
            enhanced = chunk.launched.result()
        except Exception as exc:
            for entry in chunk.entries:
                entry.item.fail(self.name, exc)
            return
        shared = (chunk.seconds + time.perf_counter() - start) / len(chunk.entries)
        for entry, out in zip(chunk.entries, enhanced, strict=True):
            start = time.perf_counter()
            item = entry.item
            try:
                result = np.where(entry.mask[..., None] > 0, out, 0).astype(np.uint8)
                change = put_enhanced(
                    item, self.source_role, result, entry.mask, self.image_format, self.jpeg_quality
                )
            except Exception as exc:
                item.fail(self.name, exc)
                continue
            item.row["model_name"] = self.model_name
            item.row["model_sha256"] = self.model_sha256
            item.row["enhance_device"] = self.device
            item.row["enhance_change"] = change
            item.row["seconds_enhance"] = entry.seconds + shared + time.perf_counter() - start


_MAGIC: dict[str, bytes] = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}


_RINGING_PX = 16  # a JPEG's ringing around a black surround stays within its 16 px MCUs


def stores_as_source(
    data: bytes, source: np.ndarray, result: np.ndarray, mask: np.ndarray, image_format: str
) -> bool:
    """Whether ``result`` may be stored as the source's own bytes ``data``: they are an 8-bit
    RGB file in ``image_format`` (:func:`codecs.is_plain_rgb`) and hold the result: every pixel
    equal for PNG; for JPEG every FOV pixel equal and black beyond the ringing its encoder
    leaves around the FOV (a label or overlay outside it is not the result's black)."""
    if not data.startswith(_MAGIC[image_format]) or not codecs.is_plain_rgb(data):
        return False
    if image_format != "jpeg":
        return np.array_equal(source, result)
    if mean_change(source, result, mask) != 0.0:
        return False
    side = 2 * _RINGING_PX + 1
    far = cv2.bitwise_not(cv2.dilate(mask, np.ones((side, side), np.uint8)))
    if cv2.countNonZero(far) == 0:
        return True
    return max(cv2.minMaxLoc(channel, far)[1] for channel in cv2.split(source)) <= 2


def put_enhanced(
    item: Item,
    source_role: SourceRole,
    result: np.ndarray,
    mask: np.ndarray,
    image_format: ImageFormat,
    jpeg_quality: int,
) -> float:
    """Store ``result`` as ``item``'s enhanced image and return ``enhance_change``: the mean
    change inside the FOV from the source to what is stored (0.0: the stored image is the
    source's own bytes).

    A result equal to the source (:func:`stores_as_source`) is stored as the source's own bytes
    and pixels: encoded again, a JPEG would lose quality although the enhancer changed nothing.
    """
    source = item.image(source_role)
    data = item.encoded.get(source_role)
    if data is not None and stores_as_source(data, source, result, mask, image_format):
        item.put("enhanced", source, data)
        return 0.0
    item.put_output("enhanced", result, image_format, jpeg_quality)
    return mean_change(source, item.image("enhanced"), mask)


@dataclass
class _Entry:
    """An item to enhance, its decoded input and FOV mask, and the seconds spent decoding."""

    item: Item
    image: np.ndarray
    mask: np.ndarray
    seconds: float = 0.0


@dataclass
class _Launched:
    """A chunk's enhanced images on the host (N x H x W x 3 uint8), ready once ``done`` (a CUDA
    event; None on the CPU) has happened."""

    host: Any
    done: Any

    def result(self) -> list[np.ndarray]:
        if self.done is not None:
            self.done.synchronize()
        return list(self.host.numpy())


@dataclass
class _Chunk:
    """Consecutive entries of one input size, their queued forward pass (or the exception that
    stopped it) and the seconds spent queueing it."""

    entries: list[_Entry]
    launched: _Launched | Exception
    seconds: float


class ClassicalEnhance(RowsCallable):
    """The classical baseline (``fundus_batch.classical``) as a stage: CPU only, no weights,
    the same output columns as :class:`Enhance`."""

    name: ClassVar[str] = "enhance"
    resources: ClassVar[Resources] = Resources(num_cpus=1.0, num_gpus=0.0, actor=False)

    def __init__(
        self,
        *,
        source_role: SourceRole = "degraded",
        image_format: ImageFormat = "png",
        jpeg_quality: int = 95,
    ) -> None:
        from fundus_batch.classical import ClassicalEnhancer

        self.enhancer = ClassicalEnhancer()
        self.source_role = source_role
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality

    def process(self, batch: Batch) -> Batch:
        for item in batch:
            if not item.ok:
                continue
            start = time.perf_counter()
            try:
                source, mask = item.image(self.source_role), item.image("mask")
                result = self.enhancer(source, mask)
                change = put_enhanced(
                    item, self.source_role, result, mask, self.image_format, self.jpeg_quality
                )
            except Exception as exc:
                item.fail(self.name, exc)
                continue
            item.row["model_name"] = self.enhancer.model_name
            item.row["model_sha256"] = self.enhancer.model_sha256
            item.row["enhance_device"] = "cpu"
            item.row["enhance_change"] = change
            item.row["seconds_enhance"] = time.perf_counter() - start
        return batch


@dataclass(frozen=True)
class EnhancedImage:
    """One enhanced working image (RGB uint8, zero outside the FOV), what made it and how much
    it changed the input (``metrics.harm.mean_change``; 0.0: left as it was)."""

    image: np.ndarray
    model_name: str
    model_sha256: str
    seconds: float
    change: float


def _check_image(image: np.ndarray, mask: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")


class ImageEnhancer:
    """Enhances FOV-preprocessed RGB uint8 images (HxWx3) with their FOV masks (HxW) one at a
    time, without Ray; the model loads once, here.

    ``enhancer`` is ``cofenet`` (``weights``: registered name or checkpoint path; the network
    states the sizes it accepts, ``max_change`` limits it as in :class:`Enhance`) or
    ``classical``.
    """

    def __init__(
        self,
        *,
        enhancer: str = "cofenet",
        weights: str = "fundus-cofenet-small",
        device: str = "auto",
        max_change: int | None = None,
    ) -> None:
        from fundus_batch.classical import ClassicalEnhancer

        if max_change is not None and enhancer != "cofenet":
            raise ValueError("max_change limits the cofenet enhancer only")
        self._run: Callable[[np.ndarray, np.ndarray], np.ndarray]
        self._sizes: Callable[[int, int], None] = lambda height, width: None
        if enhancer == "classical":
            model = ClassicalEnhancer()
            self._run = model
            self.model_name, self.model_sha256 = model.model_name, model.model_sha256
        elif enhancer == "cofenet":
            net = Enhance(
                weights=weights,
                batch_size=1,
                device=device,
                max_change=max_change,
                cpu_share=None,  # the process's torch threads stay as they are
            )

            def run(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
                result = net.enhance_arrays([image])[0]
                return np.where(mask[..., None] > 0, result, 0).astype(np.uint8)

            self._run = run
            self._sizes = net.model.check_input_size
            self.model_name, self.model_sha256 = net.model_name, net.model_sha256
        else:
            raise ValueError(f"enhancer must be 'cofenet' or 'classical', got {enhancer!r}")

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> EnhancedImage:
        _check_image(image, mask)
        try:
            self._sizes(*image.shape[:2])
        except ValueError as exc:
            height, width = image.shape[:2]
            raise ValueError(
                f"a {height}x{width} px working image does not suit weights "
                f"{self.model_name!r}: {exc}"
            ) from None
        start = time.perf_counter()
        out = self._run(image, mask)
        seconds = time.perf_counter() - start
        change = mean_change(image, out, mask)
        return EnhancedImage(out, self.model_name, self.model_sha256, seconds, change)


def enhance_image(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    enhancer: str = "cofenet",
    weights: str = "fundus-cofenet-small",
    device: str = "auto",
    max_change: int | None = None,
) -> EnhancedImage:
    """Enhance one image with a fresh :class:`ImageEnhancer` (same arguments); ``seconds``
    includes loading the model."""
    _check_image(image, mask)  # before the model loads
    start = time.perf_counter()
    one = ImageEnhancer(enhancer=enhancer, weights=weights, device=device, max_change=max_change)
    return replace(one(image, mask), seconds=time.perf_counter() - start)
