"""jobs/train_cofenet.py's YAML job config: shipped configs load, bad ones name the field."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


TRAIN_CONFIGS = sorted(p.name for p in (REPO / "jobs" / "configs").glob("train*.yaml"))


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_shipped_training_configs_load_unchanged(job: ModuleType, name: str) -> None:
    path = REPO / "jobs" / "configs" / name
    config = job.load_job(str(path))
    raw = yaml.safe_load(path.read_text())
    assert job.read_config(str(path)) == raw
    assert config.data.datasets == raw["data"]["datasets"]
    assert config.quality == raw["quality"]


def test_no_config_means_the_defaults(job: ModuleType) -> None:
    config = job.load_job(None)
    assert config.working_size == 512 and config.preset == "cofe-release"
    assert config.data.holdout == job.DEFAULT_HOLDOUT and config.quality == job.DEFAULT_QUALITY
    assert job.read_config(None) == {}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"nmae": "x"}, "nmae: unknown field"),
        ({"working_size": "512"}, "working_size: Input should be a valid integer (got '512')"),
        ({"preset": "cofe-rleease"}, "preset: unknown preset"),
        ({"data": {"datasets": ["hrf", "drive"]}}, "data.datasets[1]: Input should be"),
        ({"data": {"holdout": {"drive": ["01"]}}}, "data.holdout.drive: bad key"),
        ({"quality": {"nr_luminance": [170.0, 45.0]}}, "quality.nr_luminance: low > high"),
        ({"quality": {"nr_luma": [1.0, 2.0]}}, "quality.nr_luma: bad key: unknown measure"),
        (
            {"train": {"field_deadzone": -0.1}},
            "train.field_deadzone: Input should be greater than or equal to 0",
        ),
        ({"field_deadzone": 0.01}, "field_deadzone: unknown field"),
        ({"train": {"lr": 0.0}}, "train.lr: Input should be greater than 0 (got 0.0)"),
        ({"train": {"field_gate_threshold": 0.9}}, "train.field_gate_threshold: needs field_gate"),
        (
            {"train": {"field_gate": True, "field_size": 192, "field_gate_threshold": 1.0}},
            "train.field_gate_threshold: Input should be less than 1",
        ),
        ({"train": {"widht": 0.5}}, "train.widht: unknown field (got 0.5)"),
        ([1, 2], "<root>: expected an object (got list)"),
    ],
)
def test_bad_job_configs_name_the_field(
    job: ModuleType, tmp_path: Path, data: object, expected: str
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(job.JobConfigError) as info:
        job.load_job(str(path))
    assert str(info.value).startswith(f"invalid job config {path}: ")
    assert expected in str(info.value)


def test_the_command_reports_a_bad_config_and_exits_2(
    job: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  steps: 0\n")
    assert job.main(["--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert (
        "train.steps: Input should be greater than or equal to 1 (got 0)" in capsys.readouterr().err
    )


def test_pairs_without_a_train_split_are_an_error_and_exit_2(
    job: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--pairs", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"), "--steps", "1"]
    assert job.main(args) == 2
    assert f"error: --pairs {tmp_path / 'nothing'}:" in capsys.readouterr().err


def test_photographs_outside_the_quality_bounds_go_to_the_rejected_list(
    job: ModuleType, tmp_path: Path
) -> None:
    from fundus_batch.io.codecs import encode_png
    from fundus_batch.synth import synth_fundus

    entries = []
    for name, gain in (("bright", 1.0), ("dark", 0.15)):
        s = synth_fundus(256, seed=3)
        image = (s.image.astype(float) * gain).astype("uint8")
        (tmp_path / f"{name}.png").write_bytes(encode_png(image))
        entries.append({"image_id": f"synth/{name}", "image": f"{name}.png"})
    bounds = {"nr_luminance": [45.0, 170.0]}
    rejected: list = []
    kept = job.load_samples(tmp_path, entries, 256, bounds, rejected)
    assert [s.image_id for s in kept] == ["synth/bright"]
    assert [s.image_id for s in rejected] == ["synth/dark"]
    assert [s.image_id for s in job.load_samples(tmp_path, entries, 256, bounds)] == [
        "synth/bright"
    ]


def test_the_shipped_recipe_builds_the_model_the_registry_describes(job: ModuleType) -> None:
    """train_gated_warm.yaml (the v3 recipe) yields the shipped registry entry's architecture,
    deadzone and gate threshold: the shipped settings are declared once, in the train section."""
    import json

    from fundus_batch.train import TrainConfig

    path = REPO / "jobs" / "configs" / "train_gated_warm.yaml"
    config = TrainConfig.from_dict(job.load_job(str(path)).train)
    registry = json.loads((REPO / "fundus_batch" / "weights" / "registry.json").read_text())
    [entry] = [e for e in registry["weights"] if e["name"] == "fundus-cofenet-small"]
    model = job.inference_model(config)
    keys = ("width", "residual", "field_size", "field_deadzone", "field_gate")
    assert {k: getattr(config, k) for k in keys} == {k: entry[k] for k in keys}
    assert config.field_gate_threshold == entry["field_gate_threshold"]
    assert (model.field_deadzone, model.field_gate_threshold) == (0.00784, 0.95)
