"""Configs are typed, validated before any work, and name the bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fundus_batch.config import ConfigError, build_config, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_all_seven_types_and_release_preset():
    c = build_config({"manifest": "m.csv", "out": "o"})
    assert c.types == ["001", "010", "011", "100", "101", "110", "111"]
    assert c.preset == "cofe-release" and c.variants == 7 and c.size == 512


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"out": "o"}, "manifest"),
        ({"manifest": "m", "out": "o", "variants": 0}, "variants"),
        ({"manifest": "m", "out": "o", "types": ["123"]}, "types"),
        ({"manifest": "m", "out": "o", "size": 500}, "size"),
        ({"manifest": "m", "out": "o", "preset": "nope"}, "preset"),
        ({"manifest": "m", "out": "o", "ray": {"rows_per_block": 0}}, "ray.rows_per_block"),
        ({"manifest": "m", "out": "o", "unknown_key": 1}, "unknown_key"),
        (
            {
                "manifest": "m",
                "out": "o",
                "image_format": "jpeg",
                "enhance": {"enabled": True, "max_change": 40},
            },
            "max_change needs image_format png",
        ),
    ],
)
def test_invalid_values_are_rejected_naming_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        build_config(data)
    assert field in str(err.value)


def test_types_accept_comma_string_and_all():
    assert build_config({"manifest": "m", "out": "o", "types": "001,111"}).types == ["001", "111"]
    assert len(build_config({"manifest": "m", "out": "o", "types": "all"}).types) == 7


@pytest.mark.parametrize(
    ("yaml_value", "codes"),
    [("111", ["111"]), ("001", ["001"]), ("'010'", ["010"]), ("['010', 111]", ["010", "111"])],
)
def test_types_read_from_yaml_as_one_number_or_a_mixed_list(tmp_path: Path, yaml_value, codes):
    path = tmp_path / "c.yaml"
    path.write_text(f"manifest: m.csv\nout: o\ntypes: {yaml_value}\n")
    assert load_config(path).types == codes


@pytest.mark.parametrize(
    ("yaml_value", "message"),
    [
        ("1.5", "expected type codes"),
        ("true", "expected type codes"),
        ("{a: 1}", "expected type codes"),
        ("[010, 011]", "octal"),  # YAML 1.1 reads them as 8 and 9
    ],
)
def test_types_that_yaml_reads_as_something_else_are_refused_naming_the_field(
    tmp_path: Path, yaml_value, message
):
    path = tmp_path / "c.yaml"
    path.write_text(f"manifest: m.csv\nout: o\ntypes: {yaml_value}\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert "types" in str(err.value)


def test_yaml_overrides_and_redaction(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "manifest: m.csv\nout: o\nstorage_options:\n  key: AKIAXXXX\n"
        "  secret: hunter2\n  client_kwargs: {endpoint_url: 'http://127.0.0.1:1'}\n"
    )
    c = load_config(path, {"seed": 5, "ray.address": "auto"})
    assert c.seed == 5 and c.ray.address == "auto"
    red = c.redacted()
    assert "hunter2" not in str(red) and "AKIAXXXX" not in str(red)
    headers = {"http": {"headers": {"Authorization": "Bearer sekrit"}}}
    assert "sekrit" not in str(load_config(path, {"storage_options": headers}).redacted())
    assert red["storage_options"]["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:1"


def test_bad_yaml_is_a_config_error(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("manifest: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):
        load_config(path)


RUN_CONFIGS = sorted(
    p.name for p in (REPO / "jobs" / "configs").glob("*.yaml") if not p.name.startswith("train")
)


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_shipped_job_configs_validate(name):
    load_config(REPO / "jobs" / "configs" / name)


def test_enhancer_classical_validates_and_an_unknown_enhancer_names_the_field():
    c = build_config(
        {"manifest": "m", "out": "o", "enhance": {"enabled": True, "enhancer": "classical"}}
    )
    assert c.enhance.enhancer == "classical"
    assert build_config({"manifest": "m", "out": "o"}).enhance.enhancer == "cofenet"
    with pytest.raises(ConfigError) as err:
        build_config({"manifest": "m", "out": "o", "enhance": {"enhancer": "clahe"}})
    assert "enhance.enhancer" in str(err.value)


def test_max_change_is_a_grey_level_count_for_cofenet_only():
    c = build_config({"manifest": "m", "out": "o", "enhance": {"enabled": True, "max_change": 40}})
    assert c.enhance.max_change == 40
    assert build_config({"manifest": "m", "out": "o"}).enhance.max_change is None
    for bad in (0, 256):
        with pytest.raises(ConfigError) as err:
            build_config({"manifest": "m", "out": "o", "enhance": {"max_change": bad}})
        assert "enhance.max_change" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_config(
            {"manifest": "m", "out": "o", "enhance": {"enhancer": "classical", "max_change": 40}}
        )
    assert "max_change limits the cofenet enhancer only" in str(err.value)


def test_enhance_variant_is_a_known_cofenet_variant_stored_by_its_released_name():
    def enhance(**options):
        data = {"manifest": "m", "out": "o", "enhance": {"enabled": True, **options}}
        return build_config(data).enhance

    assert enhance(variant="Cofe-Net").variant == "encode_decode_vessel_2scale_share_res_atten"
    assert enhance(variant="encode_decode_res", width=0.25).width == 0.25
    with pytest.raises(ConfigError) as err:
        enhance(variant="bogus")
    assert "enhance.variant: unknown Cofe-Net variant 'bogus'" in str(err.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"enhancer": "classical", "variant": "cofe-net"}, "enhance.variant selects"),
        ({"enhancer": "classical", "width": 0.5}, "enhance.width selects"),
        ({"enhancer": "classical", "weights": "my.pt"}, "enhance.weights is a Cofe-Net setting"),
        ({"enhancer": "classical", "device": "cuda"}, "enhance.device is a Cofe-Net setting"),
        ({"width": 0.5}, "enhance.width needs enhance.variant"),
    ],
)
def test_variant_and_width_are_refused_where_they_would_be_ignored(options, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"manifest": "m", "out": "o", "enhance": options})


def test_config_errors_list_each_field_with_the_value_it_got():
    with pytest.raises(ConfigError) as err:
        build_config(
            {"manifest": "m", "out": "o", "variants": 0, "preset": "nope", "ray": {"fetch": 1}},
            "job.yaml",
        )
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid config job.yaml:"
    assert "  variants: Input should be greater than or equal to 1 (got 0)" in lines
    assert any(line.startswith("  preset: unknown preset;") for line in lines)
    assert "  ray.fetch: unknown field (got 1)" in lines


def test_local_demo_config_reads_the_manifest_its_own_recipe_writes(tmp_path, monkeypatch):
    import re
    import shlex

    from click.testing import CliRunner

    from fundus_batch.cli import main
    from fundus_batch.manifest_stream import scan_manifest

    path = REPO / "jobs" / "configs" / "local_demo.yaml"
    recipe = re.search(r"`fundus-batch (synth [^`]+)`", path.read_text())
    assert recipe is not None, "local_demo.yaml no longer names its synth recipe"
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*shlex.split(recipe.group(1)), "--size", "64"])
    assert result.exit_code == 0, result.output
    assert scan_manifest(load_config(path).manifest).rows == 4


@pytest.mark.parametrize("field", ["max_change", "weights", "enhancer", "variant"])
def test_an_enhancement_setting_without_enhancement_is_refused(field: str) -> None:
    value = {"max_change": 40, "weights": "my.pt", "enhancer": "classical", "variant": "cofe-net"}
    with pytest.raises(ConfigError, match=rf"enhance\.{field} is given but nothing is enhanced"):
        build_config({"manifest": "m", "out": "o", "enhance": {field: value[field]}})


def test_enhancement_settings_with_enhancement_on_or_explicitly_off_are_accepted() -> None:
    on = build_config({"manifest": "m", "out": "o", "enhance": {"enabled": True, "max_change": 9}})
    assert on.enhance.max_change == 9
    off = {"enabled": False, "weights": "my.pt"}  # a template with enhancement switched off
    assert build_config({"manifest": "m", "out": "o", "enhance": off}).enhance.weights == "my.pt"
    mode = build_config(
        {"manifest": "m", "out": "o", "mode": "enhance", "enhance": {"width": None}}
    )
    assert mode.enhance.enabled
