"""jobs/train_cofenet.py --pack: a pack of working images trains like the archive it came from."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fundus_batch.io.codecs import encode_png
from fundus_batch.synth import synth_fundus

REPO = Path(__file__).resolve().parents[1]
BOUNDS = {"nr_luminance": [45.0, 170.0]}


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """A CHASE_DB1-shaped folder: three synthetic photographs (one dark) with vessel maps."""
    root = tmp_path / "data"
    (root / "chase_db1" / "images").mkdir(parents=True)
    (root / "chase_db1" / "manual").mkdir()
    for i, (name, gain) in enumerate((("Image_01L", 1.0), ("Image_01R", 1.0), ("Image_02L", 0.15))):
        s = synth_fundus(320, seed=20 + i, canvas=(400, 340))
        image = (s.image.astype(float) * gain).astype(np.uint8)
        (root / "chase_db1" / "images" / f"{name}.jpg").write_bytes(encode_png(image))
        vessels = np.zeros((340, 400), np.uint8)
        vessels[40:300, 195:205] = 255
        (root / "chase_db1" / "manual" / f"{name}_1stHO.png").write_bytes(encode_png(vessels))
    return root


def test_a_pack_selects_the_same_targets_and_holds_the_same_working_images(
    job: ModuleType, archive: Path, tmp_path: Path
) -> None:
    pack = tmp_path / "pack"
    assert job.pack_samples(archive, ["chase_db1"], 256, pack) == 3
    raw_rejected: list = []
    raw = job.load_samples(
        archive, job.dataset_files(archive, "chase_db1"), 256, BOUNDS, raw_rejected
    )
    packed_rejected: list = []
    entries = job.dataset_files(pack, "chase_db1")
    assert all("noref" in e for e in entries)
    packed = job.load_samples(pack, entries, 256, BOUNDS, packed_rejected)
    assert (
        [s.image_id for s in packed]
        == [s.image_id for s in raw]
        == [
            "chase_db1/Image_01L",
            "chase_db1/Image_01R",
        ]
    )
    assert [s.image_id for s in packed_rejected] == ["chase_db1/Image_02L"]
    for a, b in zip(raw, packed, strict=True):
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.vessels, b.vessels)
        fov = a.mask > 127
        rms = np.sqrt(np.mean((a.image[fov].astype(float) - b.image[fov]) ** 2))
        assert 0 < rms < 2.0  # a quality-98 JPEG: close, not lossless
        assert not b.image[~fov].any()


def test_a_pack_holds_out_photographs_by_their_name_like_the_archive(
    job: ModuleType, archive: Path, tmp_path: Path
) -> None:
    pack = tmp_path / "pack"
    job.pack_samples(archive, ["chase_db1"], 256, pack)
    for root in (archive, pack):
        train, held = job.split_entries(root, ["chase_db1"], {"chase_db1": ["Image_01R"]})
        assert [e["image_id"] for e in held] == ["chase_db1/Image_01R"]
        assert len(train) == 2
    with pytest.raises(FileNotFoundError, match="no hrf images"):
        job.dataset_files(pack, "hrf")


def test_a_pack_of_another_working_size_is_refused(
    job: ModuleType, archive: Path, tmp_path: Path
) -> None:
    pack = tmp_path / "pack"
    job.pack_samples(archive, ["chase_db1"], 256, pack)
    with pytest.raises(ValueError, match="holds 256 px images, not 320"):
        job.load_samples(pack, job.dataset_files(pack, "chase_db1"), 320)


def test_the_pack_command_writes_an_index_and_trains_nothing(
    job: ModuleType, archive: Path, tmp_path: Path
) -> None:
    pack = tmp_path / "pack"
    argv = ["--pack", "--data-root", str(archive), "--datasets", "chase_db1"]
    assert job.main([*argv, "--working-size", "256", "--out", str(pack)]) == 0
    assert len(job.dataset_files(pack, "chase_db1")) == 3
    assert not list(pack.glob("*.pt"))
