"""The enhancement stages: Cofe-Net (a model loaded once per worker, batched inference) and
the classical baseline; ``enhance_image`` enhances one image without Ray."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fundus_batch.imaging import ImageFormat
from fundus_batch.stages import Batch, Item, Resources, RowsCallable, SourceRole


def load_model(
    weights: str, variant: str | None = None, width: float | None = None, device: str = "cpu"
):
    """Load registered weights by name, or a checkpoint file (variant/width detected or given).

    Returns ``(model, name, sha256)``.
    """
    from fundus_batch.models import (
        WeightsEntry,
        build_cofenet,
        file_sha256,
        load_registered,
        load_weights,
        model_from_weights,
        resolve_weights,
    )

    found = resolve_weights(weights)
    if isinstance(found, WeightsEntry):
        model = load_registered(found.name, device=device)
        return model, found.name, found.sha256
    if variant is not None:
        model = load_weights(build_cofenet(variant, width or 1.0), found).eval()
    else:
        model = model_from_weights(found)
    return model.to(device), found.name, file_sha256(found)


def pick_device(requested: str) -> str:
    """``auto`` means CUDA when this worker sees a GPU, else CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("enhance.device is 'cuda' but this worker sees no GPU")
    return requested


class Enhance(RowsCallable):
    """Enhance each row's degraded (pairs mode) or source image with Cofe-Net.

    The output is masked to the FOV. On CUDA it runs under bf16 autocast with channels_last; on
    CPU torch uses as many threads as the worker's CPU share.

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
        source_role: SourceRole = "degraded",
        image_format: ImageFormat = "png",
        jpeg_quality: int = 95,
        cpu_share: float = 1.0,
    ) -> None:
        import torch

        self.device = pick_device(device)
        # On CUDA too: torch's CPU ops here (conversions, copies) need no more than the share.
        torch.set_num_threads(max(1, round(cpu_share)))
        self.model, self.model_name, self.model_sha256 = load_model(
            weights, variant, width, self.device
        )
        if self.device == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_size = batch_size
        self.source_role = source_role
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality

    def run_model(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], list | None]:
        """Run the network on RGB uint8 images of one size.

        Returns the enhanced images (RGB uint8, unmasked) and, for variants with a vessel
        branch, the vessel probability maps of the inputs (HxW float32), else None.
        """
        import torch

        enhanced: list[np.ndarray] = []
        vessels: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = np.stack(images[start : start + self.batch_size])
            x = torch.from_numpy(chunk).permute(0, 3, 1, 2).float().div_(255.0)
            x = x.to(self.device)
            with torch.inference_mode():
                if self.device == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        outputs = self.model(x)
                else:
                    outputs = self.model(x)
                y = self.model.enhanced(outputs).float().clamp_(0, 1)
                y = y.mul_(255.0).round_().to(torch.uint8)
                v = self.model.vessel(outputs)
                if v is not None:
                    vessels.extend(v.float()[:, 0].cpu().numpy())
            enhanced.extend(y.permute(0, 2, 3, 1).cpu().numpy())
        return enhanced, (vessels or None)

    def enhance_arrays(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Enhance RGB uint8 images of one size; returns RGB uint8 images (unmasked)."""
        return self.run_model(images)[0]

    def process(self, batch: Batch) -> Batch:
        """Enhance every ok item; ``seconds_enhance`` is a row's whole time in the stage: decoding
        its inputs, its share of the forward pass and encoding its output."""
        todo: list[tuple[Item, np.ndarray, np.ndarray]] = []
        seconds: dict[int, float] = {}
        for item in batch:
            if not item.ok:
                continue
            start = time.perf_counter()
            try:
                todo.append((item, item.image(self.source_role), item.image("mask")))
            except Exception as exc:
                item.fail(self.name, exc)
            seconds[id(item)] = time.perf_counter() - start
        # Batch images of equal size together.
        by_shape: dict[tuple[int, ...], list[tuple[Item, np.ndarray, np.ndarray]]] = {}
        for entry in todo:
            by_shape.setdefault(entry[1].shape, []).append(entry)
        for group in by_shape.values():
            start = time.perf_counter()
            try:
                enhanced, _ = self.run_model([img for _, img, _ in group])
                results = [
                    np.where(mask[..., None] > 0, out, 0).astype(np.uint8)
                    for (_, _, mask), out in zip(group, enhanced, strict=True)
                ]
            except Exception as exc:
                for item, _, _ in group:
                    item.fail(self.name, exc)
                continue
            per_row = (time.perf_counter() - start) / len(group)
            for (item, _, _), result in zip(group, results, strict=True):
                start = time.perf_counter()
                item.put_output("enhanced", result, self.image_format, self.jpeg_quality)
                item.row["model_name"] = self.model_name
                item.row["model_sha256"] = self.model_sha256
                item.row["enhance_device"] = self.device
                item.row["seconds_enhance"] = (
                    seconds[id(item)] + per_row + time.perf_counter() - start
                )
        return batch


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
                result = self.enhancer(item.image(self.source_role), item.image("mask"))
                item.put_output("enhanced", result, self.image_format, self.jpeg_quality)
            except Exception as exc:
                item.fail(self.name, exc)
                continue
            item.row["model_name"] = self.enhancer.model_name
            item.row["model_sha256"] = self.enhancer.model_sha256
            item.row["enhance_device"] = "cpu"
            item.row["seconds_enhance"] = time.perf_counter() - start
        return batch


@dataclass(frozen=True)
class EnhancedImage:
    """One enhanced working image (RGB uint8, zero outside the FOV) and what made it."""

    image: np.ndarray
    model_name: str
    model_sha256: str
    seconds: float


def enhance_image(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    enhancer: str = "cofenet",
    weights: str = "fundus-cofenet-small",
    device: str = "auto",
) -> EnhancedImage:
    """Enhance one FOV-preprocessed RGB uint8 image (HxWx3) with its FOV mask (HxW), no Ray.

    ``enhancer`` is ``cofenet`` (``weights``: registered name or checkpoint path; the network
    states the sizes it accepts) or ``classical``.
    """
    from fundus_batch.classical import ClassicalEnhancer

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    start = time.perf_counter()
    if enhancer == "classical":
        model = ClassicalEnhancer()
        out = model(image, mask)
        return EnhancedImage(out, model.model_name, model.model_sha256, time.perf_counter() - start)
    if enhancer != "cofenet":
        raise ValueError(f"enhancer must be 'cofenet' or 'classical', got {enhancer!r}")
    net = Enhance(
        weights=weights, batch_size=1, device=device, cpu_share=float(os.cpu_count() or 1)
    )
    result = net.enhance_arrays([image])[0]
    out = np.where(mask[..., None] > 0, result, 0).astype(np.uint8)
    return EnhancedImage(out, net.model_name, net.model_sha256, time.perf_counter() - start)
