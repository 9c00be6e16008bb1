"""Manifest validation names the row and field; builders produce valid manifests."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from fundus_batch import manifest as mf
from fundus_batch.manifest_stream import manifest_ids, scan_manifest
from fundus_batch.schema import WORK_COLUMNS


def _frame(**cols) -> pd.DataFrame:
    return pd.DataFrame(cols)


def test_valid_manifest_keeps_passthrough_columns():
    m = mf.validate_frame(
        _frame(image_id=["a", "b"], uri=["x/a.png", "x/b.png"], grade=[1, 2], split=["train", None])
    )
    assert len(m) == 2
    assert m.passthrough_columns == ["grade"]
    assert m.frame["split"].tolist() == ["train", None]


@pytest.mark.parametrize(
    ("ids", "row", "needle"),
    [
        (["a", "a"], 2, "duplicate"),
        (["a", ""], 2, "empty"),
        (["ok", "../etc"], 2, "'..'"),
        (["x/y", "b"], 1, "path separator"),
        (["a\\b", "b"], 1, "path separator"),
        (["a", "b\x00c"], 2, "control"),
        (["a", "tab\there"], 2, "control"),
        (["a", " pad"], 2, "whitespace"),
        (["a", "é" * 150], 2, "longer than"),
        (["p::1", "b"], 1, "'::'"),
    ],
)
def test_unsafe_or_duplicate_ids_are_rejected_naming_row_and_field(ids, row, needle):
    with pytest.raises(mf.ManifestError) as err:
        mf.validate_frame(_frame(image_id=ids, uri=["u1", "u2"]))
    assert f"row {row}" in str(err.value)
    assert "field 'image_id'" in str(err.value)
    assert needle in str(err.value)


def test_unicode_ids_are_accepted():
    m = mf.validate_frame(_frame(image_id=["ретина_1", "眼底-2"], uri=["a", "b"]))
    assert m.frame["image_id"].tolist() == ["ретина_1", "眼底-2"]


def test_missing_column_and_empty_uri_are_named():
    with pytest.raises(mf.ManifestError, match="field 'uri'"):
        mf.validate_frame(_frame(image_id=["a"]))
    with pytest.raises(mf.ManifestError, match="row 2, field 'uri'"):
        mf.validate_frame(_frame(image_id=["a", "b"], uri=["x", None]))


def test_passthrough_column_may_not_shadow_an_output_column():
    with pytest.raises(mf.ManifestError, match="status"):
        mf.validate_frame(_frame(image_id=["a"], uri=["x"], status=["weird"]))


@pytest.mark.parametrize(
    "column",
    sorted(
        (set(WORK_COLUMNS) | {"row_sha256", "clean_uri", "params_json"})
        - set(mf.OPTIONAL_COLUMNS)
        - set(mf.REQUIRED_COLUMNS)
    ),
)
def test_internal_column_names_are_rejected_naming_the_column(column: str):
    frame = _frame(image_id=["a"], uri=["x"], **{column: ["v"]})
    with pytest.raises(mf.ManifestError, match=f"field '{column}'") as info:
        mf.validate_frame(frame)
    assert f"column '{column}'" in str(info.value)


def test_the_reserved_names_cover_every_key_the_stages_put_in_a_row():
    from fundus_batch.schema import INTERNAL_COLUMNS

    for name in ("raw_bytes", "source_mask_uri", "clean_png", "pending_variants", "mask_png"):
        assert name in INTERNAL_COLUMNS


def test_a_folder_given_as_manifest_or_image_uri_is_named_as_a_folder(tmp_path: Path):
    from fundus_batch.stages import Fetch

    folder = tmp_path / "photos.jpg"
    folder.mkdir()
    with pytest.raises(mf.ManifestError, match="is a folder") as info:
        scan_manifest(str(folder))
    assert str(folder) in str(info.value)
    [row] = Fetch(threads=1, retries=0)(
        [{"image_id": "a", "status": "ok", "source_uri": str(folder)}]
    )
    assert row["status"] == "failed" and row["failed_stage"] == "fetch"
    assert "is a folder, not a file" in row["error"] and str(folder) in row["error"]


def test_from_dir_skips_mask_and_vessel_files_unless_asked(tmp_path: Path):
    for name in ("p1.png", "p1_mask.png", "p1_vessel.png", "p2.jpg", "p2_MASK.tif", "masked.png"):
        (tmp_path / name).write_bytes(b"data")
    assert sorted(mf.from_dir(str(tmp_path)).frame["image_id"]) == ["masked", "p1", "p2"]
    every = mf.from_dir(str(tmp_path), include_companions=True)
    assert len(every) == 6


def test_csv_and_parquet_round_trip(tmp_path: Path):
    m = mf.validate_frame(_frame(image_id=["a", "b"], uri=["x/a.png", "x/b.png"], level=[0, 4]))
    for name in ("m.csv", "m.parquet"):
        mf.write_manifest(m, str(tmp_path / name))
        scan = scan_manifest(str(tmp_path / name))
        assert scan.rows == 2 and scan.passthrough.names == ["level"]
        assert manifest_ids(str(tmp_path / name)) == ["a", "b"]


def test_unreadable_or_empty_manifest_is_a_clear_error(tmp_path: Path):
    with pytest.raises(mf.ManifestError, match="not found"):
        scan_manifest(str(tmp_path / "missing.csv"))
    (tmp_path / "empty.csv").write_text("image_id,uri\n")
    with pytest.raises(mf.ManifestError, match="no rows"):
        scan_manifest(str(tmp_path / "empty.csv"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(mf.ManifestError, match="cannot parse"):
        scan_manifest(str(tmp_path / "bad.parquet"))


def test_from_dir_lists_images_recursively_and_qualifies_clashing_stems(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for p in ("a/x.jpeg", "b/x.jpeg", "b/y.png", "b/notes.txt"):
        (tmp_path / p).write_bytes(b"data")
    m = mf.from_dir(str(tmp_path))
    assert sorted(m.frame["image_id"]) == ["a__x", "b__x", "y"]
    assert all(u.endswith((".jpeg", ".png")) for u in m.frame["uri"])
    only_png = mf.from_dir(str(tmp_path), extensions=(".png",))
    assert only_png.frame["image_id"].tolist() == ["y"]


def test_from_dir_with_the_previous_manifest_keeps_the_ids_of_files_it_listed(tmp_path: Path):
    """A growing folder listed again: a file that gets a twin stem keeps the id a run already
    processed it under (without --previous it becomes a__x, and a resumed run redoes it)."""
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "a" / "x.jpg").write_bytes(b"data")
    first = mf.from_dir(str(photos))
    assert first.frame["image_id"].tolist() == ["x"]
    mf.write_manifest(first, str(tmp_path / "m1.csv"))
    (photos / "b").mkdir()
    for name in ("b/x.jpg", "b/x.png"):
        (photos / name).write_bytes(b"data")
    assert mf.from_dir(str(photos)).frame["image_id"].tolist() == ["a__x", "b__x", "x.png"]
    previous = mf.manifest_uri_ids(str(tmp_path / "m1.csv"))
    again = mf.from_dir(str(photos), previous=previous)
    by_file = dict(zip(again.frame["uri"], again.frame["image_id"], strict=True))
    assert by_file[str(photos / "a" / "x.jpg")] == "x"
    new_ids = {by_file[str(photos / n)] for n in ("b/x.jpg", "b/x.png")}
    assert "x" not in new_ids and len(new_ids) == 2


def test_from_dir_refuses_a_previous_manifest_of_other_files(tmp_path: Path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "x.jpg").write_bytes(b"data")
    with pytest.raises(mf.ManifestError, match="lists none of the files under"):
        mf.from_dir(str(tmp_path / "p"), previous={"s3://elsewhere/x.jpg": "x"})


def test_cli_from_dir_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from click.testing import CliRunner

    from fundus_batch.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p" / "a").mkdir(parents=True)
    (tmp_path / "p" / "a" / "x.jpg").write_bytes(b"data")
    runner = CliRunner()
    assert runner.invoke(main, ["manifest", "from-dir", "p", "--out", "m.csv"]).exit_code == 0
    (tmp_path / "p" / "b").mkdir()
    (tmp_path / "p" / "b" / "x.jpg").write_bytes(b"data")
    args = ["manifest", "from-dir", "p", "--out", "m.csv", "--previous", "m.csv"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(pd.read_csv(tmp_path / "m.csv")["image_id"]) == ["x", "x.jpg"]


def test_from_kaggle_and_from_eyeq(tmp_path: Path):
    (tmp_path / "trainLabels.csv").write_text("image,level\n10_left,0\n10_right,3\n")
    m = mf.from_kaggle(str(tmp_path / "trainLabels.csv"), "s3://bucket/train")
    assert m.frame["uri"].tolist() == [
        "s3://bucket/train/10_left.jpeg",
        "s3://bucket/train/10_right.jpeg",
    ]
    assert m.frame["dr_level"].tolist() == [0, 3]
    (tmp_path / "eyeq.csv").write_text(
        ",image,quality,DR_grade\n0,1_left.jpeg,0,0\n1,1_right.jpeg,2,1\n"
    )
    e = mf.from_eyeq(str(tmp_path / "eyeq.csv"), str(tmp_path / "img"), split="train")
    assert e.frame["image_id"].tolist() == ["1_left", "1_right"]
    assert e.frame["eyeq_quality_label"].tolist() == ["good", "reject"]
    assert set(e.frame["split"]) == {"train"}


def test_label_file_without_expected_columns_is_named(tmp_path: Path):
    (tmp_path / "labels.csv").write_text("name,grade\na,1\n")
    with pytest.raises(mf.ManifestError, match="field 'image'"):
        mf.from_kaggle(str(tmp_path / "labels.csv"), "imgs")


def test_eyeq_labels_in_shared_build_a_manifest(shared_dir: Path):
    labels = shared_dir / "data" / "labels" / "Label_EyeQ_train.csv"
    m = mf.from_eyeq(str(labels), "s3://bucket/eyepacs/train")
    assert len(m) > 10_000
    assert m.frame["image_id"].is_unique


@pytest.mark.parametrize(
    ("split", "needle"),
    [
        ("../../escaped_split", "'..'"),
        ("/abs", "path separator"),
        ("a\\b", "path separator"),
        (".", "'..'"),
        ("-train", "starts with '-'"),
        (" train", "whitespace"),
        ("tr\x00ain", "control"),
        ("   ", "blank"),
        ("s" * 201, "longer than"),
    ],
)
def test_unsafe_split_is_rejected_naming_row_and_field(split, needle):
    frame = _frame(image_id=["a", "b"], uri=["u1", "u2"], split=["train", split])
    with pytest.raises(mf.ManifestError, match=r"row 2, field 'split'") as err:
        mf.validate_frame(frame)
    assert needle in str(err.value)


def test_eyeq_split_option_is_checked_like_a_manifest_split(tmp_path: Path):
    (tmp_path / "eyeq.csv").write_text(",image,quality,DR_grade\n0,1_left.jpeg,0,0\n")
    with pytest.raises(mf.ManifestError, match=r"row 1, field 'split'"):
        mf.from_eyeq(str(tmp_path / "eyeq.csv"), "imgs", split="../x")


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"data")


def test_from_dir_ids_do_not_depend_on_how_the_prefix_is_spelled(tmp_path: Path, monkeypatch):
    deep = "/".join(["folder_with_a_long_name"] * 6)
    _touch(tmp_path / "nested", "a/x.jpeg", "b/x.jpeg", f"{deep}/y.png", f"{deep}/z/y.png")
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "nested")
    spellings = ["nested", "nested/", "./nested", absolute, f"file://{absolute}/"]
    built = {s: sorted(mf.from_dir(s).frame["image_id"]) for s in spellings}
    qualified = [f"{deep}/y", f"{deep}/z/y"]
    expected = sorted(["a__x", "b__x", *(q.replace("/", "__") for q in qualified)])
    assert built == dict.fromkeys(spellings, expected)


def test_from_dir_gives_every_file_name_a_valid_unique_id(tmp_path: Path):
    names = [
        "x.jpeg",
        "x.png",
        "-scan.jpeg",
        "scan2 .jpeg",
        "scan2.jpeg",
        "a..b.jpeg",
        "a_b.jpeg",
        "tab\there.jpeg",
        " .png",
        "n" * 250 + ".png",
    ]
    _touch(tmp_path, *names)
    first = mf.from_dir(str(tmp_path)).frame
    ids = dict(zip((Path(u).name for u in first["uri"]), first["image_id"], strict=True))
    long_id = ids.pop("n" * 250 + ".png")
    assert ids == {
        "x.jpeg": "x.jpeg",
        "x.png": "x.png",
        "-scan.jpeg": "_scan",
        "scan2 .jpeg": "scan2 .jpeg",
        "scan2.jpeg": "scan2",
        "a..b.jpeg": "a_b.jpeg",
        "a_b.jpeg": "a_b",
        "tab\there.jpeg": "tab_here",
        " .png": "_",
    }
    assert len(long_id.encode()) <= mf.MAX_ID_BYTES and long_id.startswith("nnn")
    for image_id in first["image_id"]:
        mf.check_image_id(image_id)
    again = mf.from_dir(str(tmp_path)).frame
    assert again["image_id"].tolist() == first["image_id"].tolist()


@pytest.mark.parametrize(
    "name",
    [
        *("-a", "--", " ", "..", "a..b", "a/b", "x\u200by", "\udcff", "é" * 150, ". x"),
        *("-" + "é" * 120, "eye::L", ":::"),
    ],
)
def test_id_from_path_always_passes_the_id_check(name: str):
    mf.check_image_id(mf.id_from_path(f"/data/{name}.jpeg"))
    mf.check_image_id(mf.safe_id(name))


def test_names_that_clean_to_the_same_id_get_hashed_ids_or_an_error_naming_them(
    tmp_path: Path, monkeypatch
):
    _touch(tmp_path, "b..c.jpeg", "b\tc.jpeg")
    ids = mf.from_dir(str(tmp_path)).frame["image_id"].tolist()
    assert len(set(ids)) == 2 and all(i.startswith("b_c.jpeg-") for i in ids)
    monkeypatch.setattr(mf, "_digest", lambda text: "0")  # as if the hashes collided
    with pytest.raises(mf.ManifestError) as err:
        mf.from_dir(str(tmp_path))
    message = str(err.value)
    assert not re.search(r"\brow \d", message) and "distinct image ids" in message
    assert str(tmp_path / "b..c.jpeg") in message and str(tmp_path / "b\tc.jpeg") in message


def test_from_kaggle_takes_the_extension_with_or_without_its_dot(tmp_path: Path):
    (tmp_path / "trainLabels.csv").write_text("image,level\n10_left,0\n")
    for ext in ("jpeg", ".jpeg"):
        m = mf.from_kaggle(str(tmp_path / "trainLabels.csv"), "s3://b/train", extension=ext)
        assert m.frame["uri"].tolist() == ["s3://b/train/10_left.jpeg"], ext


def test_a_relative_images_folder_gives_absolute_uris(tmp_path: Path, monkeypatch) -> None:
    """A manifest of relative paths would name other files from a worker's working directory."""
    (tmp_path / "trainLabels.csv").write_text("image,level\n10_left,0\n")
    (tmp_path / "eyeq.csv").write_text(",image,quality,DR_grade\n0,1_left.jpeg,0,0\n")
    monkeypatch.chdir(tmp_path)
    kaggle = mf.from_kaggle("trainLabels.csv", "train")
    assert kaggle.frame["uri"].tolist() == [str(tmp_path / "train" / "10_left.jpeg")]
    eyeq = mf.from_eyeq("eyeq.csv", "./img/")
    assert eyeq.frame["uri"].tolist() == [str(tmp_path / "img" / "1_left.jpeg")]


@pytest.mark.parametrize("level", ["x", "5", "-1", "1.5"])
def test_an_invalid_kaggle_level_is_named_not_dropped(tmp_path: Path, level: str):
    (tmp_path / "trainLabels.csv").write_text(f"image,level\n10_left,0\n10_right,{level}\n")
    with pytest.raises(mf.ManifestError, match=r"row 2, field 'level'"):
        mf.from_kaggle(str(tmp_path / "trainLabels.csv"), "imgs")


@pytest.mark.parametrize(
    ("quality", "grade", "field"),
    [("3", "0", "quality"), ("x", "0", "quality"), ("0", "9", "DR_grade"), ("0", "y", "DR_grade")],
)
def test_an_invalid_eyeq_label_is_named_not_dropped(
    tmp_path: Path, quality: str, grade: str, field: str
):
    (tmp_path / "e.csv").write_text(
        f",image,quality,DR_grade\n0,a.jpeg,0,0\n1,b.jpeg,{quality},{grade}\n"
    )
    with pytest.raises(mf.ManifestError, match=rf"row 2, field '{field}'"):
        mf.from_eyeq(str(tmp_path / "e.csv"), "imgs")


def test_empty_label_cells_stay_empty_and_whole_float_grades_are_read(tmp_path: Path):
    (tmp_path / "k.csv").write_text("image,level\na,\nb,2.0\n")
    assert mf.from_kaggle(str(tmp_path / "k.csv"), "i").frame["dr_level"].tolist() == [pd.NA, 2]
    (tmp_path / "e.csv").write_text(",image,quality,DR_grade\n0,a.jpeg,,\n1,b.jpeg,1,4\n")
    e = mf.from_eyeq(str(tmp_path / "e.csv"), "i").frame
    assert e["eyeq_quality"].tolist() == [pd.NA, 1]
    assert pd.isna(e["eyeq_quality_label"][0]) and e["eyeq_quality_label"][1] == "usable"
    assert e["dr_level"].tolist() == [pd.NA, 4]
