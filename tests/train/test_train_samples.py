"""fundus_batch.train.samples: clean photographs, on-the-fly degradation and pairs datasets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

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


def _write_pairs(root: Path, n_images: int = 3, side: int = 192) -> None:
    """A pairs dataset like the pipeline's: PNGs under root/images, rows in root/pairs."""
    rows = []
    for i in range(n_images):
        s = synth_fundus(side, seed=30 + i)
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
    ids = [rest.image_id(i) for i in range(len(rest))]
    assert ids == [train_src.image_id(i) for i in range(len(train_src))]  # the train rows
    result = train(tiny_config(steps=2, lambda_lqa=1.0), train_src, val_src)
    assert result.step == 2
    assert set(result.val[-1].per_type) == {"001", "010"}
    item = train_src.train_item(1, sample_rng(0, "x", 0))
    assert item.spots is not None and item.vessels is None


def test_a_pairs_items_spots_are_its_records_spot_mask(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from fundus_batch.degrade import DegradationRecord
    from fundus_batch.train.samples import spot_mask

    _write_pairs(tmp_path)
    source = PairsSource(tmp_path)
    rows = pq.read_table(tmp_path / "pairs").to_pylist()
    records = {(r["image_id"], r["variant"]): r["params_json"] for r in rows}
    spotted = 0
    for index in range(len(source)):
        item = source.train_item(index, sample_rng(0, "x", 0))
        image_id, variant = item.image_id.split("/")
        record = DegradationRecord.from_json(records[(image_id, int(variant))])
        assert item.spots is not None
        np.testing.assert_array_equal(item.spots, spot_mask(record, item.clean.shape[0]))
        spotted += bool(item.spots.any())
    assert spotted == 3  # the three 010 rows


def test_a_row_whose_record_does_not_parse_is_refused_before_training(tmp_path: Path) -> None:
    _write_pairs(tmp_path)
    _rewrite_rows(
        tmp_path,
        lambda r: {**r, "params_json": "{not json"} if r["image_id"] == "img1" else r,
    )
    with pytest.raises(TrainError, match=r"part-0\.parquet: row img1/0: params_json"):
        PairsSource(tmp_path)


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


def _rewrite_rows(root: Path, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Rewrite every row of the dataset ``_write_pairs`` made at ``root`` through ``edit``."""
    import pyarrow.parquet as pq

    shard = root / "pairs" / "part-0.parquet"
    rows = [edit(dict(r)) for r in pq.read_table(shard).to_pylist()]
    pq.write_table(to_table(rows, output_schema()), shard)


def _relative_uris(root: Path) -> None:
    """Make the image URIs of the dataset at ``root`` relative to it, as the pipeline's are."""
    prefix = f"{root}/"
    roles = ("clean_uri", "mask_uri", "degraded_uri")
    _rewrite_rows(root, lambda r: {**r, **{k: r[k] and r[k].removeprefix(prefix) for k in roles}})


def test_rows_that_failed_the_quality_gate_are_left_out_unless_asked_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_pairs(tmp_path)
    # The run's min_quality gate failed img0's rows: status stays ok, quality_ok is false.
    _rewrite_rows(tmp_path, lambda r: {**r, "quality_ok": r["image_id"] != "img0"})
    with caplog.at_level("INFO", logger="fundus_batch.train.samples"):
        source = PairsSource(tmp_path)
    assert len(source) == 4 and source.quality_left_out == 2
    assert "img0" not in source.photo_ids()
    assert "left out 2 rows that failed the run's min_quality gate" in caplog.text
    included = PairsSource(tmp_path, include_quality_failed=True)
    assert len(included) == 6 and included.quality_left_out == 0
    with pytest.raises(TrainError, match=r"2 rows failed the quality gate.*include_quality_failed"):
        PairsSource(tmp_path, split="val")  # img0 is the whole val split


def test_missing_images_are_refused_when_the_source_is_built_naming_the_rows(
    tmp_path: Path,
) -> None:
    import shutil

    _write_pairs(tmp_path, n_images=5)
    (tmp_path / "images" / "img0" / "v001_010.png").unlink()
    for image_id in ("img2", "img3", "img4"):
        shutil.rmtree(tmp_path / "images" / image_id)
    with pytest.raises(TrainError) as info:
        PairsSource(tmp_path)
    message = str(info.value)
    assert message.startswith(f"7 rows of {tmp_path / 'pairs'} cannot be trained on: ")
    assert f"img0/1: degraded_uri {tmp_path}/images/img0/v001_010.png is missing" in message
    assert "img2/0: clean_uri" in message and "img3/0" in message
    assert "img4/0" not in message and "(7 rows in all)" in message  # the first five, a count
    assert "fundus-batch verify" in message
    assert "img1/" not in message  # its files are all there


def test_the_image_check_on_object_storage_is_one_listing_per_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scale: the check asks the store once per image folder (3 here), never once per file
    (18), so a 600k-row dataset costs one listing per photograph; a missing file is found."""
    import uuid

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    _write_pairs(tmp_path)
    out = f"memory://pairs-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for path in (tmp_path / "images").rglob("*.png"):
        fs.pipe(f"{out}/{path.relative_to(tmp_path)}", path.read_bytes())
    _relative_uris(tmp_path)
    fs.pipe(f"{out}/pairs/part-0.parquet", (tmp_path / "pairs" / "part-0.parquet").read_bytes())
    asked: list[tuple[str, str]] = []
    for method in ("ls", "info", "exists", "cat_file", "open"):
        real = getattr(MemoryFileSystem, method)

        def spy(
            self: Any, path: str, *args: Any, _m: str = method, _r: Any = real, **kw: Any
        ) -> Any:
            if "/images/" in path:
                asked.append((_m, path.rsplit("/images/", 1)[1]))
            return _r(self, path, *args, **kw)

        monkeypatch.setattr(MemoryFileSystem, method, spy)
    assert len(PairsSource(out)) == 6
    assert sorted(asked) == [("ls", "img0"), ("ls", "img1"), ("ls", "img2")]
    fs.rm(f"{out}/images/img2/v001_010.png")
    with pytest.raises(
        TrainError, match=r"img2/1: degraded_uri images/img2/v001_010\.png is missing"
    ):
        PairsSource(out)


def test_an_image_file_that_is_a_symbolic_link_out_of_the_folder_is_refused(
    tmp_path: Path,
) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    _write_pairs(out)
    _relative_uris(out)  # as the pipeline records them: only the files can point elsewhere
    elsewhere.mkdir()
    target = out / "images" / "img1" / "mask.png"
    (elsewhere / "mask.png").write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(elsewhere / "mask.png")
    with pytest.raises(
        TrainError, match=r"img1/0: mask_uri images/img1/mask\.png is a symbolic link"
    ):
        PairsSource(out)
    (out / "images" / "img1").rename(elsewhere / "img1")  # the whole folder a link elsewhere
    (out / "images" / "img1").symlink_to(elsewhere / "img1")
    with pytest.raises(TrainError, match="through a symbolic link"):
        PairsSource(out)


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("{foreign}/images/img1/clean.png", "lies outside the output folder"),
        ("../foreign/images/img1/clean.png", "climbs out of the output folder with '..'"),
    ],
)
def test_a_row_whose_image_lies_outside_the_output_folder_is_refused_not_read(
    tmp_path: Path, uri: str, problem: str
) -> None:
    out, foreign = tmp_path / "out", tmp_path / "foreign"
    _write_pairs(out)
    _write_pairs(foreign)  # real, readable images: only where they lie is wrong
    stored = uri.format(foreign=foreign)

    def edit(row: dict[str, Any]) -> dict[str, Any]:
        if row["image_id"] == "img1" and row["variant"] == 0:
            row["clean_uri"] = stored
        return row

    _rewrite_rows(out, edit)
    with pytest.raises(TrainError, match="1 rows of") as info:
        PairsSource(out)
    assert f"img1/0: clean_uri {stored} {problem}" in str(info.value)


def test_pairs_validation_items_are_read_only_when_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_pairs(tmp_path)
    source = PairsSource(tmp_path, split="train")
    reads: list[str] = []
    real = source._read

    def spy(uri: str, grey: bool = False) -> np.ndarray:
        reads.append(uri)
        return real(uri, grey)

    monkeypatch.setattr(source, "_read", spy)
    items = source.val_items(0)
    assert len(items) == 4 and reads == []  # nothing decoded before validation runs
    item = items[3]
    assert len(reads) == 3  # clean, mask, degraded of that row only
    row = source.rows[3]
    assert (item.image_id, item.type_code) == (row.image_id, row.type_code)
    assert item.degraded.shape == (192, 192, 3) and item.mask.shape == (192, 192)


def test_working_size_is_the_rows_size_or_else_the_images(tmp_path: Path) -> None:
    _write_pairs(tmp_path, side=224)  # rows without a size column value
    assert PairsSource(tmp_path).working_size == 224
    # The size column, when the rows have it, is taken as it is (no image is decoded).
    _rewrite_rows(tmp_path, lambda r: {**r, "size": 256 if r["status"] == "ok" else None})
    assert PairsSource(tmp_path).working_size == 256


def test_a_label_map_of_another_shape_is_refused_not_stretched(tmp_path: Path) -> None:
    s = synth_fundus(256, seed=1, canvas=(320, 256))  # 256 high, 320 wide
    (tmp_path / "photo.png").write_bytes(encode_png(s.image))
    (tmp_path / "turned.png").write_bytes(encode_png(np.ascontiguousarray(s.vessels.T)))
    with pytest.raises(ValueError, match=r"turned\.png is 256x320 px and the photograph 320x256"):
        load_clean_sample("a", tmp_path / "photo.png", 256, vessels_path=tmp_path / "turned.png")
    (tmp_path / "half.png").write_bytes(encode_png(s.vessels[::2, ::2]))  # the same shape
    sample = load_clean_sample("a", tmp_path / "photo.png", 256, vessels_path=tmp_path / "half.png")
    assert sample.vessels is not None and sample.vessels.any()
