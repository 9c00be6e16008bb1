"""jobs/train_spot_head.py: a registered field model gets a trained spot head and a new entry."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from fundus_batch.io.codecs import encode_png
from fundus_batch.models import build_cofenet, file_sha256
from fundus_batch.models.weights import WeightsEntry, model_for_entry
from fundus_batch.synth import synth_fundus

REPO = Path(__file__).resolve().parents[1]
NAMES = ("Image_01L", "Image_01R", "Image_02L", "Image_02R")


@pytest.fixture(scope="module")
def spot_job() -> ModuleType:
    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location(
        "train_spot_head", REPO / "jobs" / "train_spot_head.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """A CHASE_DB1-shaped folder of four synthetic photographs."""
    root = tmp_path / "data"
    (root / "chase_db1" / "images").mkdir(parents=True)
    (root / "chase_db1" / "manual").mkdir()
    for i, name in enumerate(NAMES):
        s = synth_fundus(320, seed=30 + i, canvas=(400, 340))
        (root / "chase_db1" / "images" / f"{name}.jpg").write_bytes(encode_png(s.image))
        (root / "chase_db1" / "manual" / f"{name}_1stHO.png").write_bytes(encode_png(s.vessels))
    return root


def _weights(folder: Path, root: Path, field: int | None = 192) -> torch.nn.Module:
    """A registered small model trained (here: initialised) on the first three photographs."""
    folder.mkdir()
    model = build_cofenet(
        "cofe-net", 0.125, field=field, generator=torch.Generator().manual_seed(2)
    )
    torch.save({k: v.half() for k, v in model.state_dict().items()}, folder / "tiny.pt")
    entry = {
        "name": "tiny",
        "file": "tiny.pt",
        "sha256": file_sha256(folder / "tiny.pt"),
        "variant": "cofe-net",
        "width": 0.125,
        "field_size": field,
        "size": 256,
        "metrics": {"val_psnr_gain_mean": 9.0},
    }
    (folder / "registry.json").write_text(json.dumps({"weights": [entry]}))
    held = NAMES[3]
    document = {
        "name": "tiny",
        "protocol": {"seed": 0, "preset": "cofe-release"},
        "holdout": [
            {
                "image_id": f"chase_db1/{held}",
                "image": f"chase_db1/images/{held}.jpg",
                "vessels": f"chase_db1/manual/{held}_1stHO.png",
            }
        ],
        "train_image_ids": [f"chase_db1/{n}" for n in NAMES[:2]],
        "leave_alone_image_ids": [f"chase_db1/{NAMES[2]}"],
    }
    (folder / "tiny.eval.json").write_text(json.dumps(document))
    return model


def test_the_job_adds_a_head_and_keeps_the_rest_of_the_weights(
    spot_job: ModuleType, archive: Path, tmp_path: Path
) -> None:
    source = _weights(tmp_path / "weights", archive)
    out = tmp_path / "out"
    argv = ["--weights", str(tmp_path / "weights"), "--data-root", str(archive)]
    argv += ["--out", str(out), "--steps", "3", "--channels", "4", "--per-photo", "2"]
    assert spot_job.main([*argv, "--deadzone", "0.004", "--threads", "1"]) == 0

    entry = WeightsEntry.from_dict(
        json.loads((out / "registry.json").read_text())["weights"][0], out / "registry.json"
    )
    assert (entry.spot_head, entry.spot_deadzone, entry.field_size) == (4, 0.004, 192)
    assert entry.sha256 == file_sha256(out / "tiny.pt")
    assert entry.metrics != {"val_psnr_gain_mean": 9.0}  # evaluated again, with the head
    assert set(entry.metrics) >= {"val_psnr_gain_mean", "val_psnr_gain_010"}
    model = model_for_entry(entry)
    assert model.spot is not None and model.spot.out.weight.abs().sum() > 0
    loaded = model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value.half().float()), key

    document = json.loads((out / "tiny.eval.json").read_text())
    section = document["spot_head"]
    assert (section["steps"], section["channels"], section["train_photographs"]) == (3, 4, 3)
    assert (
        section["pairs"] == 6
        and section["from_sha256"]
        == json.loads((tmp_path / "weights" / "registry.json").read_text())["weights"][0]["sha256"]
    )
    assert {r["image_id"] for r in document["per_image"]} == {f"chase_db1/{NAMES[3]}"}
    assert (out / "train_spot_head.log").read_text().count("step ") == 2  # steps 0 and 2


def test_the_job_refuses_weights_without_a_field_head(
    spot_job: ModuleType, archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _weights(tmp_path / "weights", archive, field=None)
    argv = ["--weights", str(tmp_path / "weights"), "--data-root", str(archive)]
    assert spot_job.main([*argv, "--out", str(tmp_path / "out"), "--steps", "1"]) == 2
    assert "no field head" in capsys.readouterr().err
    assert not (tmp_path / "out" / "tiny.pt").exists()


def test_the_job_refuses_when_a_training_photograph_is_missing(
    spot_job: ModuleType, archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _weights(tmp_path / "weights", archive)
    (archive / "chase_db1" / "images" / f"{NAMES[0]}.jpg").unlink()
    argv = ["--weights", str(tmp_path / "weights"), "--data-root", str(archive)]
    assert spot_job.main([*argv, "--out", str(tmp_path / "out"), "--steps", "1"]) == 2
    assert "found 2 of the 3 training photographs" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.pt"))


def test_a_head_trained_before_is_packaged_into_the_same_file(
    spot_job: ModuleType, archive: Path, tmp_path: Path
) -> None:
    _weights(tmp_path / "weights", archive)
    argv = ["--weights", str(tmp_path / "weights"), "--data-root", str(archive)]
    argv += ["--channels", "4", "--per-photo", "2", "--threads", "1"]
    assert spot_job.main([*argv, "--out", str(tmp_path / "a"), "--steps", "2"]) == 0
    head = tmp_path / "a" / "tiny.spot-head.pt"
    assert spot_job.main([*argv, "--out", str(tmp_path / "b"), "--head", str(head)]) == 0
    assert file_sha256(tmp_path / "b" / "tiny.pt") == file_sha256(tmp_path / "a" / "tiny.pt")
    section = json.loads((tmp_path / "b" / "tiny.eval.json").read_text())["spot_head"]
    assert section["head_from"] == str(head) and section["loss_every_100"] == []
    assert section["pairs"] is None  # no training pairs are built to package a head
    assert "pairs in" not in (tmp_path / "b" / "train_spot_head.log").read_text()
    assert not (tmp_path / "b" / "tiny.spot-head.pt").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--focus", "1.5"], r"--focus must be in \[0, 1\]"),
        (["--deadzone", "0.5"], r"--deadzone must be in \[0, 0.5\)"),
    ],
)
def test_bad_options_are_refused_before_any_work(
    spot_job: ModuleType,
    tmp_path: Path,
    option: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        spot_job.main(["--weights", str(tmp_path), "--out", str(tmp_path / "out"), *option])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
