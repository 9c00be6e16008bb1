"""The Cofe-Net Enhance stage (fundus_batch.enhance): chunked, overlapped, row by row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fundus_batch.degrade import degrade, sample_rng
from fundus_batch.enhance import Enhance
from fundus_batch.io.codecs import decode_image, encode_png
from fundus_batch.metrics.harm import mean_change
from fundus_batch.stages import Item
from fundus_batch.synth import synth_fundus


def _item(image_id: str, size: int, seed: int) -> Item:
    """A type-001 degraded synthetic photograph (the shipped model's gate opens on it)."""
    clean = synth_fundus(size, seed=seed)
    degraded, _ = degrade(clean.image, clean.mask, "001", sample_rng(0, image_id, 0))
    return Item({"image_id": image_id, "status": "ok"}, {"degraded": degraded, "mask": clean.mask})


def _masked(out: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask[..., None] > 0, out, 0).astype(np.uint8)


@pytest.fixture(scope="module")
def stage() -> Enhance:
    return Enhance(batch_size=2, device="cpu")


def test_chunks_enhance_each_image_as_the_model_does_and_skip_a_corrupt_one(stage):
    items = [_item(f"img_{i}", 256, i) for i in range(5)]
    corrupt = Item({"image_id": "bad", "status": "ok"}, {}, {"degraded": b"not a png"})
    batch = [*items[:2], corrupt, *items[2:]]
    want = stage.run_model([i.images["degraded"] for i in items])[0]  # chunks of 2, in order
    out = stage.process(batch)
    assert [i.row["image_id"] for i in out] == [i.row["image_id"] for i in batch]
    assert corrupt.row["status"] == "failed" and corrupt.row["failed_stage"] == "enhance"
    for item, enhanced in zip(items, want, strict=True):
        assert item.row["status"] == "ok"
        got = item.image("enhanced")
        np.testing.assert_array_equal(got, _masked(enhanced, item.images["mask"]))
        assert not np.array_equal(got, _masked(item.images["degraded"], item.images["mask"]))
        assert item.row["enhance_device"] == "cpu" and item.row["seconds_enhance"] > 0


def test_the_change_column_is_zero_exactly_where_the_model_left_the_image_alone(stage):
    clean = synth_fundus(256, seed=7)
    blurred, _ = degrade(clean.image, clean.mask, "100", sample_rng(0, "blur", 0))
    alone = Item({"image_id": "blur", "status": "ok"}, {"degraded": blurred, "mask": clean.mask})
    lifted = _item("hole", 256, 7)
    stage.process([alone, lifted])
    # The shipped model's gate stays shut on a blur-only draw: the image comes back as it was.
    np.testing.assert_array_equal(alone.image("enhanced"), _masked(blurred, clean.mask))
    assert alone.row["enhance_change"] == 0.0
    inside = lifted.images["mask"] > 0
    diff = np.abs(lifted.image("enhanced").astype(int) - lifted.images["degraded"].astype(int))
    assert lifted.row["enhance_change"] == pytest.approx(diff[inside].mean(), abs=1e-9)
    assert lifted.row["enhance_change"] > 0.5


def _stored_item(image_id: str, type_code: str, image_format: str) -> Item:
    """A degraded synthetic photograph as the Degrade stage leaves it: stored in the run's
    format, its pixels those a reader of the stored bytes gets."""
    clean = synth_fundus(256, seed=7)
    degraded, _ = degrade(clean.image, clean.mask, type_code, sample_rng(0, image_id, 0))
    item = Item({"image_id": image_id, "status": "ok"})
    item.put("mask", clean.mask.copy(), encode_png(clean.mask))
    item.put_output("degraded", degraded, image_format, 90)
    return item


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_an_image_left_unchanged_is_stored_as_its_input_bytes_and_change_is_what_is_stored(
    image_format,
):
    """--format jpeg: the degraded image JPEG-encoded a second time would score lower than the
    input although the enhancer changed nothing (the summary's "enhancement lowered PSNR")."""
    stage = Enhance(batch_size=2, device="cpu", image_format=image_format, jpeg_quality=90)
    alone, lifted = (
        _stored_item("blur", "100", image_format),
        _stored_item("hole", "001", image_format),
    )
    stage.process([alone, lifted])
    assert alone.encoded["enhanced"] == alone.encoded["degraded"]  # byte-identical
    np.testing.assert_array_equal(alone.image("enhanced"), alone.image("degraded"))
    assert alone.row["enhance_change"] == 0.0
    stored = decode_image(lifted.encoded["enhanced"])  # what a reader of the file gets
    np.testing.assert_array_equal(lifted.image("enhanced"), stored)
    want = mean_change(lifted.image("degraded"), stored, lifted.image("mask"))
    assert lifted.row["enhance_change"] == want > 0.5


def test_enhanced_images_agree_to_one_grey_level_across_batch_sizes_and_threads(stage):
    """What the README promises on the CPU (oneDNN's kernels depend on the batch and the
    thread count): the stored files, not a re-run, are what checksums verify."""
    images = [_item(f"img_{i}", 256, i).images["degraded"] for i in range(4)]
    one = Enhance(batch_size=1, device="cpu", cpu_share=1.0)
    threads = torch.get_num_threads()
    try:
        runs = [one.enhance_arrays(images), stage.enhance_arrays(images)]
        torch.set_num_threads(2)
        runs.append(one.enhance_arrays(images))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_images_of_another_size_start_a_new_chunk(stage):
    batch = [_item("a", 256, 1), _item("b", 320, 2), _item("c", 256, 3)]
    stage.process(batch)
    for item in batch:
        alone = stage.enhance_arrays([item.images["degraded"]])[0]
        np.testing.assert_array_equal(item.image("enhanced"), _masked(alone, item.images["mask"]))


def test_a_failed_forward_pass_fails_only_its_chunk(stage, monkeypatch):
    calls = []
    launch = stage._launch

    def second_fails(images):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("CUDA error: out of memory")
        return launch(images)

    monkeypatch.setattr(stage, "_launch", second_fails)
    batch = [_item(f"img_{i}", 256, i) for i in range(5)]
    stage.process(batch)
    assert calls == [2, 2, 1]
    assert [i.row["status"] for i in batch] == ["ok", "ok", "failed", "failed", "ok"]
    assert "out of memory" in batch[2].row["error"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only: needs a GPU")
def test_on_cuda_overlapped_chunks_give_what_the_model_gives() -> None:
    cuda = Enhance(batch_size=2, device="cuda")
    items = [_item(f"img_{i}", 256, i) for i in range(5)]
    want = cuda.run_model([i.images["degraded"] for i in items])[0]
    cuda.process(items)
    for item, enhanced in zip(items, want, strict=True):
        got = item.image("enhanced").astype(int)
        assert np.abs(got - _masked(enhanced, item.images["mask"])).max() <= 1
        assert item.row["enhance_device"] == "cuda"


@pytest.mark.parametrize("max_change", [0.5, 300, 0, True])
def test_max_change_outside_whole_grey_levels_1_to_255_is_refused(max_change) -> None:
    """0.5 (what the old message, 'in (0, 1]', invited) bounded every pixel to one grey
    level: enhancement quietly became a near no-op."""
    with pytest.raises(ValueError, match=r"max_change must be whole grey levels in 1\.\.255"):
        Enhance(device="cpu", max_change=max_change)


def test_a_device_other_than_auto_cpu_or_cuda_is_refused_naming_the_choices() -> None:
    from fundus_batch.config import ConfigError

    with pytest.raises(ConfigError, match="must be auto, cpu or cuda, got 'gpu'"):
        Enhance(device="gpu")


@pytest.mark.parametrize(("gpu", "device"), [(True, "cuda"), (False, "cpu")])
def test_auto_picks_cuda_exactly_when_the_worker_sees_a_gpu(
    monkeypatch: pytest.MonkeyPatch, gpu: bool, device: str
) -> None:
    from fundus_batch.enhance import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert pick_device("auto") == device


def test_the_single_image_enhancer_leaves_the_process_torch_threads_alone() -> None:
    from fundus_batch.enhance import ImageEnhancer

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ImageEnhancer(device="cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
