"""The example manifests in the top-level ``manifests/`` folder stay valid and in sync."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fundus_batch import manifest as mf
from fundus_batch.manifest_stream import scan_manifest

FOLDER = Path(__file__).resolve().parents[1] / "manifests"
MANIFESTS = sorted(p.name for p in FOLDER.glob("*.csv"))


def test_the_folder_holds_the_four_documented_examples() -> None:
    assert MANIFESTS == [
        "bucket_listing.csv",
        "demo.csv",
        "eyeq_train.csv",
        "kaggle_eyepacs_train.csv",
    ]
    readme = (FOLDER / "README.md").read_text()
    for name in MANIFESTS + [p.name for p in (FOLDER / "labels").glob("*.csv")]:
        assert f"`{name}`" in readme or f"labels/{name}" in readme, name


@pytest.mark.parametrize("name", MANIFESTS)
def test_each_example_manifest_passes_validation(name: str) -> None:
    scan = scan_manifest(str(FOLDER / name))  # the run's reader and checks
    assert scan.rows >= 5


def test_the_bucket_listing_names_s3_objects() -> None:
    frame = pd.read_csv(FOLDER / "bucket_listing.csv", dtype=str)
    assert frame["uri"].str.startswith("s3://").all()
    assert [mf.id_from_path(u) for u in frame["uri"]] == list(frame["image_id"])


def test_kaggle_and_eyeq_examples_are_what_the_builders_make_from_labels(tmp_path: Path) -> None:
    built = {
        "kaggle_eyepacs_train.csv": mf.from_kaggle(
            str(FOLDER / "labels" / "kaggle_trainLabels.csv"), "s3://my-bucket/eyepacs/train"
        ),
        "eyeq_train.csv": mf.from_eyeq(
            str(FOLDER / "labels" / "Label_EyeQ_train.csv"), "/data/eyepacs/train", split="train"
        ),
    }
    for name, manifest in built.items():
        mf.write_manifest(manifest, str(tmp_path / name))
        assert (tmp_path / name).read_text() == (FOLDER / name).read_text(), name


def test_the_demo_example_has_the_columns_and_ids_the_demo_writes(tmp_path: Path) -> None:
    from fundus_batch.demo import make_demo_inputs

    written = pd.read_csv(make_demo_inputs(tmp_path / "inputs", count=6))
    example = pd.read_csv(FOLDER / "demo.csv")
    assert list(example.columns) == list(written.columns)
    assert list(example.image_id) == list(written.image_id)
    assert list(example.split) == list(written.split)
