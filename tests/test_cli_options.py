"""Pipeline command options are generated from RunConfig: help, default and choices come from
the model, and no command declares a config field by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click
import pytest
from click.testing import CliRunner
from pydantic.fields import FieldInfo

from fundus_batch import cli
from fundus_batch.cli import main
from fundus_batch.cli_options import ConfigOption, JsonObject
from fundus_batch.config import RunConfig
from fundus_batch.degrade import PRESETS, TYPE_CODES

PIPELINE_COMMANDS = ("run", "degrade", "enhance", "score", "demo")
# Options of those commands that are not RunConfig fields, by command.
NOT_CONFIG = {
    "run": {"config_path", "verbose"},
    "degrade": {"verbose"},
    "enhance": {"verbose"},
    "score": {"verbose"},
    "demo": {"out", "count", "with_enhance", "verbose"},  # demo's --out holds inputs and run
}
# The option names the README, the jobs and earlier releases use.
KEPT_NAMES = {
    "run": {"--manifest", "--out", "--seed", "--variants", "--address", "--limit"}
    | {"--retry-failed", "--wait-for-lease"},
    "degrade": {"--manifest", "--out", "--variants", "--types", "--type-mode", "--seed", "--size"}
    | {"--preset", "--format", "--address", "--enhance", "--enhancer", "--weights", "--limit"}
    | {"--wait-for-lease", "--min-quality", "--retry-failed"},
    "enhance": {"--manifest", "--out", "--enhancer", "--weights", "--variant", "--width"}
    | {"--size", "--batch-size", "--device", "--address", "--limit", "--wait-for-lease"}
    | {"--min-quality", "--retry-failed"},
    "score": {"--manifest", "--out", "--size", "--address", "--limit", "--min-quality"}
    | {"--wait-for-lease", "--retry-failed"},
    "demo": {"--out", "--count", "--variants", "--enhance"},
}


def _model_field(path: str) -> FieldInfo:
    """The field straight from ``RunConfig.model_fields`` (sections one level deep)."""
    if "." in path:
        section, name = path.split(".")
        model: Any = RunConfig.model_fields[section].annotation
        return model.model_fields[name]
    return RunConfig.model_fields[path]


def _config_options() -> list[tuple[str, ConfigOption]]:
    found = []
    for name in PIPELINE_COMMANDS:
        for param in main.commands[name].params:
            if isinstance(param, ConfigOption):
                found.append((name, param))
    return found


def _help_record(command: str, option: click.Option) -> str:
    ctx = click.Context(main.commands[command], info_name=command)
    record = option.get_help_record(ctx)
    assert record is not None
    return record[1]


def test_no_pipeline_command_declares_a_config_field_by_hand():
    for name in PIPELINE_COMMANDS:
        params = main.commands[name].params
        by_hand = {p.name for p in params if not isinstance(p, ConfigOption)}
        assert by_hand == NOT_CONFIG[name], name
        for param in params:
            if isinstance(param, ConfigOption):
                _model_field(param.field)  # a real field (KeyError otherwise)


def test_every_existing_option_name_is_kept():
    for name, kept in KEPT_NAMES.items():
        options = {o for p in main.commands[name].params for o in p.opts}
        assert kept <= options, (name, kept - options)


def test_each_option_takes_its_help_and_default_from_the_model():
    options = _config_options()
    assert len(options) >= 40
    for command, option in options:
        info = _model_field(option.field)
        assert info.description, f"{option.field} has no description"
        help_text = _help_record(command, option)
        assert help_text.startswith(info.description), (command, option.field)
        if option.required:
            continue
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(default)
        assert option.default == default, (command, option.field)
        if default not in (None, False):
            shown = f"(from CONFIG, else {default})" if command == "run" else default
            assert f"default: {shown}" in help_text, (command, option.field, help_text)


def test_run_help_says_that_options_not_given_keep_the_config_files_values():
    shown = " ".join(CliRunner().invoke(main, ["run", "c.yaml", "--help"]).output.split())
    variants = "--variants INTEGER degraded variants per image [1<=x<=1000]"
    assert f"{variants} [default: (from CONFIG, else 7)]" in shown
    assert "[default: 7]" not in shown
    assert "--manifest TEXT CSV or Parquet manifest URL [default: (from CONFIG)]" in shown
    assert "--retry-failed redo rows that failed before" in shown
    assert shown.count("[default: (from CONFIG") == 8
    degrade = " ".join(CliRunner().invoke(main, ["degrade", "--help"]).output.split())
    assert "[default: 7]" in degrade and "CONFIG" not in degrade


def test_literal_fields_list_their_choices():
    literals = 0
    for command, option in _config_options():
        annotation = _model_field(option.field).annotation
        if get_origin(annotation) is Literal:
            literals += 1
            assert isinstance(option.type, click.Choice)
            assert list(option.type.choices) == list(get_args(annotation)), option.field
            ctx = click.Context(main.commands[command], info_name=command)
            record = option.get_help_record(ctx)
            assert record is not None and "|".join(get_args(annotation)) in record[0]
    assert literals >= 5


def test_preset_lists_the_registered_presets_and_types_the_type_codes():
    degrade = {p.name: p for p in main.commands["degrade"].params}
    preset = degrade["preset"]
    assert isinstance(preset.type, click.Choice)
    assert sorted(preset.type.choices) == sorted(PRESETS)
    shown = CliRunner().invoke(main, ["degrade", "--help"]).output
    assert all(name in shown for name in PRESETS)
    assert isinstance(degrade["types"], ConfigOption)
    assert all(code in _help_record("degrade", degrade["types"]) for code in TYPE_CODES)


def test_numeric_options_show_the_model_limits():
    variants = next(p for p in main.commands["degrade"].params if p.name == "variants")
    assert isinstance(variants, click.Option)
    assert "1<=x<=1000" in _help_record("degrade", variants)


@pytest.fixture
def captured(monkeypatch) -> list[Any]:
    seen: list[Any] = []
    monkeypatch.setattr(cli, "_run", lambda config, **kwargs: seen.append((config, kwargs)))
    return seen


def test_run_options_override_only_the_fields_given(tmp_path: Path, captured):
    config = tmp_path / "c.yaml"
    config.write_text("manifest: m.csv\nout: o\nseed: 5\nvariants: 2\nretry_failed: true\n")
    result = CliRunner().invoke(main, ["run", str(config), "--variants", "3"])
    assert result.exit_code == 0, result.output
    [(cfg, kwargs)] = captured
    assert (cfg.seed, cfg.variants, cfg.retry_failed) == (5, 3, True)  # defaults did not win
    assert kwargs == {"verbose": False}


def test_degrade_options_reach_their_fields(tmp_path: Path, captured):
    args = ["degrade", "--manifest", "m.csv", "--out", str(tmp_path / "o"), "--verbose"]
    args += ["--types", "001,100", "--format", "jpeg", "--address", "ray://h:1"]
    args += ["--wait-for-lease", "5", "--enhance", "--weights", "w.pt", "--preset", "cofe-train"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    [(cfg, kwargs)] = captured
    assert cfg.types == ["001", "100"] and cfg.image_format == "jpeg"
    assert cfg.ray.address == "ray://h:1" and cfg.lease.wait == 5.0
    assert cfg.enhance.enabled and cfg.enhance.weights == "w.pt" and cfg.preset == "cofe-train"
    assert cfg.variants == 7 and cfg.mode == "pairs" and kwargs == {"verbose": True}


@pytest.mark.parametrize(
    ("command", "rule"),
    [
        ("degrade", "psnr_degraded >= 25 and blur_sigma < 3"),
        ("enhance", "nr_luminance_enhanced > 40"),
        ("score", "nr_luminance_clean >= 40"),
    ],
)
def test_degrade_enhance_and_score_take_min_quality_and_retry_failed(
    tmp_path: Path, captured, command: str, rule: str
):
    args = [command, "--manifest", "m.csv", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, [*args, "--min-quality", rule, "--retry-failed"])
    assert result.exit_code == 0, result.output
    [(cfg, _)] = captured
    assert (cfg.min_quality, cfg.retry_failed) == (rule, True)
    CliRunner().invoke(main, args)
    assert (captured[-1][0].min_quality, captured[-1][0].retry_failed) == (None, False)


def test_a_value_outside_the_model_limits_is_rejected_naming_the_field(tmp_path: Path):
    out = tmp_path / "o"
    args = ["degrade", "--manifest", "m.csv", "--out", str(out), "--variants", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "variants" in result.output, result.output
    assert not out.exists()


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_storage_options_option_parses_a_json_object():
    found = [
        path
        for path, command in _commands(main)
        for param in command.params
        if param.name == "storage_options"
        and isinstance(param.type, JsonObject)
        and param.opts == ["--storage-options"]
    ]
    every = [
        path for path, c in _commands(main) if any(p.name == "storage_options" for p in c.params)
    ]
    assert found == every and len(found) >= 3


STORAGE_COMMANDS = {
    "manifest from-dir": lambda d: ["manifest", "from-dir", str(d), "--out", str(d / "m.csv")],
    "manifest from-kaggle": lambda d: [
        *("manifest", "from-kaggle", str(d / "l.csv"), "--images", str(d), "--out", str(d / "m"))
    ],
    "manifest from-eyeq": lambda d: [
        *("manifest", "from-eyeq", str(d / "l.csv"), "--images", str(d), "--out", str(d / "m"))
    ],
    "manifest validate": lambda d: ["manifest", "validate", str(d / "m.csv")],
    "report": lambda d: ["report", str(d)],
    "verify": lambda d: ["verify", str(d)],
    "export": lambda d: ["export", str(d), "--format", "basicsr", "--dest", str(d / "x")],
    "train": lambda d: ["train", "--pairs", str(d), "--out", str(d / "model")],
}


def test_every_command_that_reads_storage_takes_storage_options():
    having = {
        " ".join(path)
        for path, command in _commands(main)
        if any(p.name == "storage_options" for p in command.params)
    }
    assert having == set(STORAGE_COMMANDS)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("[1]", "not an array"),
        ('"SECRET"', "not a string"),
        ("null", "not null"),
        ('{"key": "SECRET"', "not valid JSON"),
    ],
)
@pytest.mark.parametrize("command", sorted(STORAGE_COMMANDS))
def test_storage_options_not_a_json_object_is_a_usage_error_naming_the_option(
    tmp_path: Path, command, value, reason
):
    args = [*STORAGE_COMMANDS[command](tmp_path), "--storage-options", value]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "Invalid value for '--storage-options'" in result.output and reason in result.output
    assert "SECRET" not in result.output  # options hold credentials; never echoed
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ['{"auto_mkdir": true}', ""])
def test_storage_options_as_a_json_object_or_empty_reach_the_filesystem(tmp_path: Path, value):
    made = CliRunner().invoke(main, ["synth", str(tmp_path / "s"), "--count", "1", "--size", "64"])
    assert made.exit_code == 0, made.output
    out = tmp_path / "m.csv"
    args = ["manifest", "from-dir", str(tmp_path / "s"), "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--storage-options", value])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "wrote 1 rows" in result.output and out.is_file()
    assert JsonObject().convert(value, None, None) == (json.loads(value) if value else None)


def test_every_option_of_every_command_has_help_text():
    bare = [
        f"{' '.join(path)} {option.opts[0]}"
        for path, command in _commands(main)
        for option in command.params
        if isinstance(option, click.Option) and not option.hidden and not option.help
    ]
    assert bare == []
