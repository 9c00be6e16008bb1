"""Custom presets in a run config: a preset is a named set of ranges, given as a mapping,
validated before any work, drawn from on the workers, recorded in OUT and redrawn by verify."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from fundus_batch import pipeline
from fundus_batch.config import ConfigError, RunConfig, build_config, load_config
from fundus_batch.degrade import PRESETS, DegradationRecord, Preset
from fundus_batch.run_settings import SettingsMismatchError, compare, recorded, resolve
from fundus_batch.stages import Degrade, stage_specs
from fundus_batch.verify import verify
from tests.pipeline_inputs import folder_snapshot, write_inputs

REPO = Path(__file__).resolve().parents[1]
SIZE = 256
# blur sigma in pixels at 512, outside cofe-release's 5 to 15: no built-in draw lands in it
STRONG = {"name": "strong-blur", "base": "cofe-release", "blur_sigma": [20.0, 22.0]}


def _config(manifest: Path | str = "m.csv", out: Path | str = "o", **extra: Any) -> RunConfig:
    data: dict[str, Any] = {
        "manifest": str(manifest),
        "out": str(out),
        "variants": 2,
        "size": SIZE,
        "seed": 11,
        "progress": False,
        "ray": {"rows_per_block": 2},
    }
    data.update(extra)
    return build_config(data, "test")


# ---------------------------------------------------------------------------- config


def test_a_preset_mapping_validates_into_its_ranges_and_keeps_its_name():
    config = _config(preset={**STRONG, "spot_count": [1, 3]})
    assert config.preset == "strong-blur"
    preset = config.resolved_preset
    assert isinstance(preset, Preset) and preset.name == "strong-blur"
    assert (preset.blur_sigma, preset.spot_count) == ((20.0, 22.0), (1, 3))
    assert preset.brightness == PRESETS["cofe-release"].brightness  # the rest from its base
    train = _config(preset={"name": "train-mild", "base": "cofe-train", "spot_count": [1, 2]})
    assert train.resolved_preset.model == "train"
    assert train.resolved_preset.halo_colors == PRESETS["cofe-train"].halo_colors


def test_a_built_in_preset_name_keeps_working_and_resolves_to_the_built_in_preset():
    config = _config(preset="cofe-train")
    assert (config.preset, config.custom_preset) == ("cofe-train", None)
    assert config.resolved_preset is PRESETS["cofe-train"]
    spelled_out = _config(preset={"name": "cofe-release"})  # identical to the built-in one
    assert (spelled_out.preset, spelled_out.custom_preset) == ("cofe-release", None)


@pytest.mark.parametrize(
    ("preset", "line"),
    [
        ({**STRONG, "blur_sigma": [4, 2]}, "preset.blur_sigma: low > high (got [4, 2])"),
        ({**STRONG, "blur_sigma": [1, 99]}, "preset.blur_sigma: values must be <= 30.0"),
        ({**STRONG, "spot_count": [1.5, 3]}, "preset.spot_count[0]: Input should be a valid"),
        ({**STRONG, "blurr_sigma": [1, 2]}, "preset.blurr_sigma: unknown field (got [1, 2])"),
        ({"blur_sigma": [1, 2]}, "preset.name: Field required"),
        ({"name": ""}, "preset.name: must be a non-empty string (got '')"),
        ({"name": "cofe-release", "blur_sigma": [1, 2]}, "preset.name: 'cofe-release' is a"),
        ({"name": "x", "base": "cofe-nope"}, "preset.base: unknown preset; known presets:"),
        ({"name": "x", "model": "other"}, "preset.model: Input should be 'release' or 'train'"),
    ],
    ids=["low>high", "limit", "int", "unknown", "no-name", "blank", "built-in", "base", "model"],
)
def test_a_bad_preset_mapping_is_refused_naming_preset_dot_field(preset, line):
    with pytest.raises(ConfigError) as err:
        _config(preset=preset)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid config test:"
    assert any(x.startswith(f"  {line}") for x in lines), lines


def test_a_yaml_preset_error_names_the_file_and_the_field(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text("manifest: m.csv\nout: o\npreset:\n  name: soft\n  blur_sigma: [3, 1]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).splitlines() == [
        f"invalid config {path}:",
        "  preset.blur_sigma: low > high (got [3, 1])",
    ]


def _readme_preset_yaml() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(r"```yaml\n(preset:\n.*?)```", readme, re.S)
    assert found, "the README no longer shows a custom preset in YAML"
    return found.group(1)


def test_the_readme_custom_preset_example_loads_verbatim(tmp_path: Path):
    example = _readme_preset_yaml()
    path = tmp_path / "job.yaml"
    path.write_text(f"manifest: m.csv\nout: o\n{example}")
    config = load_config(path)
    given = yaml.safe_load(example)["preset"]
    assert config.preset == given["name"] and config.custom_preset is not None
    assert list(config.resolved_preset.blur_sigma) == given["blur_sigma"]


def test_fundus_batch_run_reads_a_custom_preset_from_its_yaml(tmp_path: Path, monkeypatch):
    from fundus_batch import cli
    from fundus_batch.cli import main

    seen: list[RunConfig] = []
    monkeypatch.setattr(cli, "_run", lambda config, **kwargs: seen.append(config))
    path = tmp_path / "job.yaml"
    path.write_text(f"manifest: m.csv\nout: o\n{_readme_preset_yaml()}")
    result = CliRunner().invoke(main, ["run", str(path), "--variants", "3"])
    assert result.exit_code == 0, result.output
    [config] = seen
    assert config.variants == 3 and config.custom_preset is not None


def test_a_dumped_config_with_a_custom_preset_reads_back_equal():
    config = _config(preset=STRONG)
    again = build_config(config.model_dump(mode="json"))
    assert again == config and again.resolved_preset == config.resolved_preset
    assert config.redacted()["custom_preset"]["blur_sigma"] == [20.0, 22.0]


def test_the_degrade_stage_gets_the_resolved_preset_and_it_pickles_to_workers():
    config = _config(preset=STRONG)
    [spec] = [s for s in stage_specs(config) if s.cls is Degrade]
    assert spec.kwargs["preset"] == config.resolved_preset
    stage = pickle.loads(pickle.dumps(spec)).build()
    assert isinstance(stage, Degrade) and stage.preset.blur_sigma == (20.0, 22.0)
    builtin = next(s for s in stage_specs(_config()) if s.cls is Degrade).build()
    assert isinstance(builtin, Degrade) and builtin.preset is PRESETS["cofe-release"]


# ---------------------------------------------------------------------------- settings

# What run.json recorded for this config before custom presets existed (commit c8451a3).
BUILT_IN_SETTINGS_BEFORE = {
    "mode": "pairs",
    "size": SIZE,
    "image_format": "png",
    "jpeg_quality": None,
    "compute_metrics": True,
    "metric_version": "fb-metrics-1",
    "min_quality": None,
    "enhance": None,
    "seed": 11,
    "preset": "cofe-release",
    "types": ["001", "010", "011", "100", "101", "110", "111"],
    "type_mode": "cycle",
    "variants": 2,
}


def test_the_built_in_default_records_its_name_exactly_as_before():
    settings = resolve(_config())
    assert settings == BUILT_IN_SETTINGS_BEFORE
    assert compare(recorded({"settings": BUILT_IN_SETTINGS_BEFORE}), settings).changed is False
    old_config = {k: v for k, v in _config().redacted().items() if k != "custom_preset"}
    assert compare(recorded({"config": old_config}), settings).changed is False  # pre-settings


def test_a_custom_preset_records_its_whole_definition():
    config = _config(preset=STRONG)
    settings = resolve(config)
    assert settings["preset"] == config.resolved_preset.to_dict()
    assert json.loads(json.dumps(settings)) == settings  # as run.json reads it back


def test_the_same_name_with_other_ranges_is_refused_listing_the_ranges_that_differ():
    old = recorded({"settings": json.loads(json.dumps(resolve(_config(preset=STRONG))))})
    other = resolve(_config(preset={**STRONG, "blur_sigma": [20.0, 25.0], "spot_count": [1, 2]}))
    with pytest.raises(SettingsMismatchError) as err:
        compare(old, other)
    assert err.value.differences == [
        "preset: 'strong-blur' -> 'strong-blur' (other ranges: blur_sigma [20.0, 22.0] -> "
        "[20.0, 25.0]; spot_count [5, 10] -> [1, 2])"
    ]
    with pytest.raises(SettingsMismatchError) as err:
        compare(old, resolve(_config()))
    assert err.value.differences == [
        "preset: 'strong-blur' -> 'cofe-release' (other ranges: blur_sigma [20.0, 22.0] -> "
        "[5.0, 15.0])"
    ]
    same = compare(old, resolve(_config(preset=dict(STRONG), variants=3)))
    assert same.more_variants == (2, 3)  # the same definition: consistent additions accepted


# ---------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def custom_run(ray_cluster, tmp_path_factory) -> tuple[Path, Path]:
    """(manifest, out): a pairs run of 2 photographs with the strong-blur preset."""
    root = tmp_path_factory.mktemp("custom")
    manifest = write_inputs(root / "in", n_good=2, broken=False, size=SIZE)
    out = root / "out"
    summary = pipeline.run(_config(manifest, out, preset=STRONG, types=["100", "111"]))
    assert summary.complete and summary.ok == 4
    return manifest, out


def test_a_run_with_a_custom_preset_draws_within_its_ranges(custom_run):
    _, out = custom_run
    rows = pq.read_table(str(out / "pairs")).to_pylist()
    assert {r["preset"] for r in rows} == {"strong-blur"}
    for row in rows:
        record = DegradationRecord.from_json(row["params_json"])
        assert record.preset == "strong-blur" and record.blur is not None
        # pixels at 512, scaled to the working size
        assert 20.0 * SIZE / 512 <= record.blur.sigma <= 22.0 * SIZE / 512
        assert row["blur_sigma"] == record.blur.sigma
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["preset"] == Preset.from_dict(STRONG).to_dict()
    assert run["config"]["preset"] == "strong-blur"


def test_verify_deep_redraws_a_custom_preset_run_from_its_recorded_definition(custom_run):
    manifest, out = custom_run
    report = verify(str(out), str(manifest), deep=100)
    assert report.ok, report.summary()
    assert report.deep_checked == 4


def test_verify_deep_reports_a_preset_neither_built_in_nor_recorded(custom_run, tmp_path):
    manifest, made = custom_run
    out = tmp_path / "out"
    shutil.copytree(made, out)
    run = json.loads((out / "run.json").read_text())
    run["settings"]["preset"] = "cofe-release"  # the definition lost
    (out / "run.json").write_text(json.dumps(run))
    report = verify(str(out), str(manifest), deep=100)
    assert not report.ok
    unknown = [p for p in report.problems if "neither built-in nor recorded" in p]
    assert len(unknown) == 4, report.problems
    assert "preset 'strong-blur' is neither built-in nor recorded in run.json" in unknown[0]
    assert not any("could not run" in p for p in report.problems)


def test_verify_deep_catches_rows_not_drawn_from_the_recorded_definition(custom_run, tmp_path):
    manifest, made = custom_run
    out = tmp_path / "out"
    shutil.copytree(made, out)
    run = json.loads((out / "run.json").read_text())
    run["settings"]["preset"]["blur_sigma"] = [10.0, 12.0]
    (out / "run.json").write_text(json.dumps(run))
    report = verify(str(out), str(manifest), deep=100)
    drawn = [p for p in report.problems if "do not draw the recorded params_json" in p]
    assert len(drawn) == 4, report.problems


def test_a_rerun_with_other_ranges_under_the_same_name_is_refused_before_any_work(custom_run):
    manifest, out = custom_run
    before = folder_snapshot(out)
    changed = {**STRONG, "blur_sigma": [20.0, 24.0]}
    with pytest.raises(SettingsMismatchError) as err:
        pipeline.run(_config(manifest, out, preset=changed, types=["100", "111"]))
    assert err.value.differences == [
        "preset: 'strong-blur' -> 'strong-blur' (other ranges: blur_sigma [20.0, 22.0] -> "
        "[20.0, 24.0])"
    ]
    assert "nothing was done" in str(err.value)
    assert folder_snapshot(out) == before  # not a byte, not a timestamp changed
