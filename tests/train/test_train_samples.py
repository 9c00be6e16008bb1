"""fundus_batch.train.samples: clean photographs, on-the-fly degradation and pairs datasets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fundus_batch.degrade import degrade, sample_rng
from fundus_batch.fov import Circle, crop_to_fov
from fundus_batch.io.codecs import encode_png
from fundus_batch.schema import output_schema, to_table
from fundus_batch.synth import synth_fundus
from fundus_batch.train import (
    DegradeSource,
    PairsSource,
    TrainError,
    load_clean_sample,
    make_batch,
    spot_mask,
    train,
)
from fundus_batch.train.samples import flipped, random_crop
from tests.train.train_helpers import synth_samples, tiny_config


def test_keep_colour_targets_carry_the_colour_jitter_but_not_the_halo_or_hole() -> None:
    from fundus_batch.degrade.ops import color_jitter

    sample = synth_samples(1, 192, disc=False)[0]
    plain = DegradeSource([sample], types=("001",))
    kept = DegradeSource([sample], types=("001",), keep_colour=True)
    a = plain.train_item(0, sample_rng(3, "kc", 0))
    b = kept.train_item(0, sample_rng(3, "kc", 0))
    assert np.array_equal(a.degraded, b.degraded) and np.array_equal(a.clean, sample.image)
    _, record = degrade(sample.image, sample.mask, "001", sample_rng(3, "kc", 0))
    c = record.color
    jittered = color_jitter(sample.image, c.brightness, c.contrast, c.saturation)
    assert np.array_equal(b.clean, np.where(sample.mask[..., None] > 127, jittered, 0))
    assert not np.array_equal(b.clean, b.degraded)  # the halo and hole are still to undo
    # The photograph itself travels beside the target (for the new-error term), through
    # flips, crops and batches; a plain item's photograph is its target.
    assert a.photo is None and b.photo is sample.image
    crop = random_crop(flipped(b), 160, np.random.default_rng(0))
    assert crop.photo is not None and crop.photo.shape == crop.clean.shape
    batch = make_batch([a, b])
    assert torch.equal(batch.photo[0], batch.clean[0])
    assert torch.equal(batch.photo[1], make_batch([a]).clean[0])
    # Validation always scores against the clean photograph itself.
    assert all(np.array_equal(v.clean, sample.image) for v in kept.val_items(0))


def test_a_batch_whose_photographs_are_its_targets_moves_that_tensor_once() -> None:
    item = DegradeSource(synth_samples(1, 192, disc=False), types=("001",)).train_item(
        0, sample_rng(3, "mv", 0)
    )
    batch = make_batch([item])
    assert batch.photo is batch.clean
    moved = batch.to(torch.device("meta"))  # a device that always copies
    assert moved.photo is moved.clean and moved.clean is not batch.clean
    assert moved.degraded is not moved.clean and moved.degraded.device.type == "meta"


def test_spot_mask_covers_where_the_spots_changed_the_image() -> None:
    s = synth_fundus(256, seed=4)
    degraded, record = degrade(s.image, s.mask, "010", sample_rng(1, "spots", 0))
    mask = spot_mask(record) > 0
    changed = np.abs(degraded.astype(int) - s.image.astype(int)).max(axis=2) > 8
    assert changed.sum() > 50
    assert mask[changed].mean() > 0.9
    assert mask.mean() < 0.5


def test_bad_samples_raise_a_typed_error() -> None:
    s = synth_fundus(192, seed=0)
    with pytest.raises(TrainError, match="square"):
        DegradeSource([(s.image[:, :100], s.mask[:, :100])])
    with pytest.raises(TrainError, match="empty"):
        DegradeSource([(s.image, np.zeros_like(s.mask))])
    with pytest.raises(TrainError, match="at least one"):
        DegradeSource([])
    small = DegradeSource([(s.image, s.mask)])
    with pytest.raises(TrainError, match="smaller than the training size"):
        train(tiny_config(size=224), small)


def test_clean_jitter_recolours_the_photograph_that_is_both_target_and_input() -> None:
    samples = synth_samples(1, 192, disc=False)
    plain = DegradeSource(samples, types=("010",))
    jittered = DegradeSource(samples, types=("010",), clean_jitter=1.0)
    a = plain.train_item(0, sample_rng(2, "cj", 0))
    b = jittered.train_item(0, sample_rng(2, "cj", 0))
    assert np.array_equal(a.clean, samples[0].image)
    fov = samples[0].mask > 127
    assert not np.array_equal(b.clean[fov], samples[0].image[fov])  # recoloured
    assert not b.clean[~fov].any()  # and still black outside the FOV

    # The spots were added to the recoloured photograph, not to the original.
    def gap(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.abs(x.astype(int) - y.astype(int))[fov].mean())

    assert gap(b.degraded, b.clean) < 0.5 * gap(b.degraded, samples[0].image)
    with pytest.raises(TrainError, match="clean_jitter"):
        DegradeSource(samples, clean_jitter=1.5)


def test_leave_alone_photographs_are_drawn_only_for_types_without_illumination() -> None:
    target, poor = synth_samples(2, 192, disc=False)
    poor = replace(poor, image_id="poor-0")
    source = DegradeSource([target], leave_alone=[poor])
    assert len(source) == 1 and source.image_id(0) == target.image_id
    drawn: dict[str, set[str]] = {}
    for k in range(120):
        item = source.train_item(0, sample_rng(3, "la", k))
        drawn.setdefault(item.image_id, set()).add(item.type_code)
    assert all(t[2] == "0" for t in drawn[poor.image_id])  # never given a halo or a hole
    assert {t for t in drawn[target.image_id] if t[2] == "1"} == {"001", "011", "101", "111"}
    assert {t for t in drawn[target.image_id] if t[2] == "0"}  # still drawn without one too
    # A draw with an illumination defect is the one it would be without leave-alone photographs.
    plain = DegradeSource([target])
    for k in range(6):
        a, b = (src.train_item(0, sample_rng(3, "la", k)) for src in (plain, source))
        if a.type_code[2] == "1":
            assert b.type_code == a.type_code and np.array_equal(a.degraded, b.degraded)
    with pytest.raises(TrainError, match="unique"):
        DegradeSource([target], leave_alone=[replace(poor, image_id=target.image_id)])


def test_load_clean_sample_gives_vessels_the_same_crop_as_the_image(tmp_path: Path) -> None:
    raw = synth_fundus(240, seed=5, canvas=(352, 300))
    (tmp_path / "img.png").write_bytes(encode_png(raw.image))
    (tmp_path / "ves.png").write_bytes(encode_png(raw.vessels))
    (tmp_path / "fov.png").write_bytes(encode_png(raw.mask))
    s = load_clean_sample(
        "x",
        tmp_path / "img.png",
        256,
        vessels_path=tmp_path / "ves.png",
        mask_path=tmp_path / "fov.png",
    )
    assert s.image.shape == (256, 256, 3) and s.vessels is not None
    # What the true circle's crop gives for the image and for the vessel map.
    circle = Circle(*raw.circle)
    want_image = crop_to_fov(raw.image, circle, 256)[0]
    want = crop_to_fov(np.dstack([raw.vessels] * 3), circle, 256)[0][..., 0] > 127
    fov = s.mask > 0
    assert np.abs(s.image.astype(int) - want_image.astype(int))[fov].mean() < 4
    got = s.vessels > 127
    iou = (got & want).sum() / (got | want).sum()
    shifted = np.roll(want, 4, axis=1)
    assert iou > 0.7
    assert iou > 2 * (got & shifted).sum() / (got | shifted).sum()
    assert not s.image[~fov].any() and not s.vessels[~fov].any()


def _write_pairs(root: Path, n_images: int = 3) -> None:
    """A pairs dataset like the pipeline's: PNGs under root/images, rows in root/pairs."""
    rows = []
    for i in range(n_images):
        s = synth_fundus(192, seed=30 + i)
        image_id = f"img{i}"
        folder = root / "images" / image_id
        folder.mkdir(parents=True)
        (folder / "clean.png").write_bytes(encode_png(s.image))
        (folder / "mask.png").write_bytes(encode_png(s.mask))
        for variant, type_code in enumerate(("001", "010")):
            degraded, record = degrade(s.image, s.mask, type_code, sample_rng(0, image_id, variant))
            path = folder / f"v{variant:03d}_{type_code}.png"
            path.write_bytes(encode_png(degraded))
            rows.append(
                {
                    "image_id": image_id,
                    "variant": variant,
                    "status": "ok",
                    "type_code": type_code,
                    "split": "val" if i == 0 else "train",
                    "clean_uri": str(folder / "clean.png"),
                    "mask_uri": str(folder / "mask.png"),
                    "degraded_uri": str(path),
                    "params_json": record.to_json(),
                }
            )
    rows.append(
        {
            "image_id": "broken",
            "variant": 0,
            "status": "failed",
            "split": "train",
            "type_code": "001",
            "error": "DecodeError: truncated",
        }
    )
    (root / "pairs").mkdir()
    import pyarrow.parquet as pq

    pq.write_table(to_table(rows, output_schema()), root / "pairs" / "part-0.parquet")


def test_training_from_a_pairs_dataset(tmp_path: Path) -> None:
    _write_pairs(tmp_path)
    train_src = PairsSource(tmp_path, split="train")
    val_src = PairsSource(tmp_path, split="val")
    assert len(train_src) == 4 and len(val_src) == 2  # the failed row is not used
    assert len(PairsSource(tmp_path)) == 6
    rest = PairsSource(tmp_path, exclude_split="val")  # what `train --val-split val` trains on
    assert len(rest) == 4 and {r["split"] for r in rest.rows} == {"train"}
    result = train(tiny_config(steps=2, lambda_lqa=1.0), train_src, val_src)
    assert result.step == 2
    assert set(result.val[-1].per_type) == {"001", "010"}
    item = train_src.train_item(1, sample_rng(0, "x", 0))
    assert item.spots is not None and item.vessels is None


def test_pairs_dataset_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="no Parquet"):
        PairsSource(tmp_path)
    _write_pairs(tmp_path, 2)
    with pytest.raises(TrainError, match="no usable rows"):
        PairsSource(tmp_path, split="test")


def test_pairs_source_reads_pairs_from_s3_with_uris_relative_to_out(
    tmp_path: Path, s3_server: dict, s3_bucket: str
) -> None:
    import io

    import fsspec
    import pyarrow.parquet as pq

    options = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **options)
    _write_pairs(tmp_path)
    table = pq.read_table(tmp_path / "pairs" / "part-0.parquet")
    prefix = f"{tmp_path}/"
    for name in ("clean_uri", "mask_uri", "degraded_uri"):  # as the pipeline records them
        uris = [u and u.removeprefix(prefix) for u in table.column(name).to_pylist()]
        table = table.set_column(table.schema.get_field_index(name), name, [uris])
    for path in (tmp_path / "images").rglob("*.png"):
        fs.pipe(f"{s3_bucket}/out/{path.relative_to(tmp_path)}", path.read_bytes())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe(f"{s3_bucket}/out/pairs/part-0.parquet", buf.getvalue())

    out = f"s3://{s3_bucket}/out"
    remote = PairsSource(out, split="train", storage_options=options)
    assert remote.out_root == out and len(remote) == 4
    assert len(PairsSource(out + "/pairs", storage_options=options)) == 6
    local = PairsSource(tmp_path, split="train")
    for index in (0, 3):
        rng = sample_rng(0, "x", 0)  # unused: the degradations are stored
        got, want = remote.train_item(index, rng), local.train_item(index, rng)
        assert got.image_id == want.image_id and got.type_code == want.type_code
        for name in ("clean", "degraded", "mask", "spots"):
            assert np.array_equal(getattr(got, name), getattr(want, name))
