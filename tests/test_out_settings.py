"""Settings are part of OUT: a later run with other settings is refused before any work,
listing the differences, unless it only adds consistent work (more variants, enhancement)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fundus_batch import outpaths, pipeline
from fundus_batch.config import build_config
from fundus_batch.manifest import ManifestError
from fundus_batch.run_settings import (
    SettingsMismatchError,
    check_column_types,
    compare,
    recorded,
    resolve,
)
from fundus_batch.verify import verify
from tests.pipeline_inputs import folder_snapshot, write_inputs


def _config(manifest: Path, out: Path, **extra):
    data = {
        "manifest": str(manifest),
        "out": str(out),
        "variants": 2,
        "size": 128,
        "seed": 5,
        "progress": False,
        "ray": {"rows_per_block": 2},
    }
    data.update(extra)
    return build_config(data, "test")


def _rows(out: Path):
    return pq.read_table(str(out / "pairs")).to_pandas().set_index(["image_id", "variant"])


# ---------------------------------------------------------------------------- unit level


def test_settings_record_everything_that_determines_the_outputs(tmp_path):
    cfg = _config(tmp_path / "m.csv", tmp_path / "out", image_format="jpeg", jpeg_quality=80)
    s = resolve(cfg)
    assert (s["size"], s["seed"], s["variants"], s["preset"]) == (128, 5, 2, "cofe-release")
    assert s["types"] == ["001", "010", "011", "100", "101", "110", "111"]
    assert (s["type_mode"], s["image_format"], s["jpeg_quality"]) == ("cycle", "jpeg", 80)
    assert s["metric_version"] == "fb-metrics-1" and s["enhance"] is None
    enhanced = resolve(_config(tmp_path / "m.csv", tmp_path / "out", enhance={"enabled": True}))
    assert enhanced["enhance"]["weights"] == "fundus-cofenet-small"
    assert len(enhanced["enhance"]["model_sha256"]) == 64
    assert enhanced["enhance"]["max_change"] is None


def test_a_bound_added_to_a_folder_enhanced_before_the_option_existed_is_refused(tmp_path):
    def settings(**enhance: object) -> dict:
        return resolve(_config(tmp_path / "m.csv", tmp_path / "out", enhance=enhance))

    unbounded = settings(enabled=True)
    del unbounded["enhance"]["max_change"]  # as a run.json written before it was recorded
    old = recorded({"settings": unbounded})
    compare(old, settings(enabled=True))  # the same run again: accepted
    with pytest.raises(SettingsMismatchError) as err:
        compare(old, settings(enabled=True, max_change=40))
    assert "enhance.max_change: off -> 40" in err.value.differences


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("preset", "cofe-train", "preset: 'cofe-release' -> 'cofe-train'"),
        ("types", ["001"], "types: ['001', '010', '011', '100', '101', '110', '111'] -> ['001']"),
        ("type_mode", "sample", "type_mode: 'cycle' -> 'sample'"),
        ("image_format", "jpeg", "image_format: 'png' -> 'jpeg'"),
        ("compute_metrics", False, "metric_version: 'fb-metrics-1' -> off"),
        ("mode", "score", "mode: 'pairs' -> 'score'"),
    ],
)
def test_each_output_setting_change_is_named_with_old_and_new_value(tmp_path, field, value, shown):
    old = resolve(_config(tmp_path / "m.csv", tmp_path / "out"))
    new = resolve(_config(tmp_path / "m.csv", tmp_path / "out", **{field: value}))
    with pytest.raises(SettingsMismatchError) as err:
        compare(old, new, "OUT")
    assert shown in err.value.differences


def test_a_rule_on_a_parameter_judged_before_nulls_were_neutral_is_refused(tmp_path):
    """Rows judged when a null blur_sigma broke ``blur_sigma < 100`` must not be mixed with
    rows judged now, when it passes."""
    rule = "blur_sigma < 100 and psnr_degraded > 10"
    new = resolve(_config(tmp_path / "m.csv", tmp_path / "out", min_quality=rule))
    assert new["quality_nulls"] == "neutral"
    old = {k: v for k, v in new.items() if k != "quality_nulls"}  # as recorded before
    with pytest.raises(SettingsMismatchError, match="quality_nulls: off -> 'neutral'"):
        compare(recorded({"settings": old}), new)
    compare(recorded({"settings": new}), new)  # recorded since: the same setting
    metric_only = resolve(
        _config(tmp_path / "m.csv", tmp_path / "o", min_quality="psnr_degraded > 10")
    )
    assert "quality_nulls" not in metric_only  # its meaning did not change
    compare(recorded({"settings": metric_only}), metric_only)


def test_a_run_json_written_before_settings_were_recorded_is_still_compared(tmp_path):
    cfg = _config(tmp_path / "m.csv", tmp_path / "out")
    legacy = {"config": cfg.redacted(), "state": "complete"}
    assert compare(recorded(legacy), resolve(cfg)).changed is False
    with pytest.raises(SettingsMismatchError, match="seed: 5 -> 99"):
        compare(recorded(legacy), resolve(_config(tmp_path / "m.csv", tmp_path / "o", seed=99)))


RULE = "fov_r > 10 and nr_luminance_clean > 40"


@pytest.mark.parametrize(
    "respelled",
    [
        "nr_luminance_clean >40 and fov_r>10",
        "nr_luminance_clean\u00a0>\u00a040 AND  fov_r > 10",
        " nr_luminance_clean > 40\tand\nfov_r > 10 ",
        "nr_luminance_clean > 40.0 and fov_r > 1e1",
    ],
)
def test_a_quality_rule_spelled_otherwise_is_the_same_setting_recorded_or_read_back(
    tmp_path, respelled
):
    def settings(rule: str) -> dict:
        return resolve(_config(tmp_path / "m.csv", tmp_path / "out", min_quality=rule))

    assert settings(respelled)["min_quality"] == RULE  # recorded in its canonical form
    assert _config(tmp_path / "m.csv", tmp_path / "o", min_quality=respelled).min_quality == (
        respelled  # the config keeps the text as given, for display
    )
    assert compare(recorded({"settings": settings(RULE)}), settings(respelled)).changed is False
    older = {**settings(RULE), "min_quality": respelled}  # run.json recorded the raw text
    assert compare(recorded({"settings": older}), settings(RULE)).changed is False
    legacy = _config(tmp_path / "m.csv", tmp_path / "o", min_quality=respelled).redacted()
    assert compare(recorded({"config": legacy}), settings(RULE)).changed is False
    with pytest.raises(SettingsMismatchError) as err:
        compare(recorded({"settings": older}), settings(RULE.replace("40", "41")))
    assert err.value.differences == [f"min_quality: {RULE!r} -> {RULE.replace('40', '41')!r}"]


def test_pass_through_columns_are_written_in_the_folders_types_and_new_ones_are_refused():
    """pyarrow and pandas read a folder's columns and types from its first shard: a run must
    write each column as the folder holds it, and cannot add one."""
    stored = {"grade": [pa.int64()], "site": [pa.string()], "empty": [pa.null()]}
    written = check_column_types(
        stored,
        pa.schema([("grade", pa.null()), ("site", pa.large_string()), ("empty", pa.null())]),
    )
    assert written == pa.schema(
        [("grade", pa.int64()), ("site", pa.string()), ("empty", pa.null())]
    )
    assert (
        check_column_types(stored, pa.schema([("grade", pa.int32())])).field("grade").type
        == pa.int64()
    )
    assert check_column_types(None, pa.schema([("new", pa.int8())])) == pa.schema(
        [("new", pa.int8())]
    )  # the first run sets them
    changed = pa.schema(
        [("grade", pa.float64()), ("site", pa.int64()), ("empty", pa.int64()), ("new", pa.int8())]
    )
    with pytest.raises(SettingsMismatchError) as err:
        check_column_types(stored, changed, "OUT")
    assert [d.split(" (")[0] for d in err.value.differences] == [
        "manifest column 'grade': int64 -> double",
        "manifest column 'site': string -> int64",
        "manifest column 'empty': empty in every row so far",
        "manifest column 'new' is new",
    ]
    with pytest.raises(SettingsMismatchError, match="int32 -> int64"):
        check_column_types({"grade": [pa.int32()]}, pa.schema([("grade", pa.int64())]))


SHIPPED = (
    Path(__file__).resolve().parents[1] / "fundus_batch" / "weights" / "fundus-cofenet-small.pt"
)


def _tiny(path: Path, *, bare: bool = False, **options: object) -> Path:
    """A width-0.125 Cofe-Net saved at ``path`` with its settings (no registry entry), or as a
    bare state dict."""
    import torch

    from fundus_batch.models import build_cofenet, save_weights

    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_cofenet("cofe-net", 0.125, generator=torch.Generator().manual_seed(0), **options)
    if bare:
        torch.save(model.state_dict(), path)
    else:
        save_weights(path, model.state_dict(), residual=False)
    return path


def _registry(folder: Path, name: str, file: str) -> None:
    """A registry JSON naming ``file`` as the shipped model's bytes under ``name``."""
    from fundus_batch.models import list_weights

    entry = list_weights()["fundus-cofenet-small"].to_dict() | {"name": name, "file": file}
    (folder / f"{name}.json").write_text(json.dumps(entry))


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("truncated", "cannot read weights file"),
        ("registered-file-missing", "registered in .* but the file is missing"),
        ("sha256-mismatch", "sha256 of .* but registry entry 'other' expects"),
        ("variant-does-not-fit", r"weights do not fit the model \(variant='encode_decode_res'"),
        ("gated-bare-file", "a gated correction head, whose settings a checkpoint does not carry"),
        ("registered-with-variant", "registered .* which sets the variant and width"),
    ],
)
def test_weights_that_cannot_be_used_are_refused_in_one_line_before_any_work(
    tmp_path, monkeypatch, problem, message
):
    """Each used to pass the pre-run check and crash every Enhance actor after Ray started,
    with a 100-line traceback in the console and in run.json."""
    from fundus_batch.config import ConfigError

    registry = tmp_path / "registry"
    registry.mkdir()
    monkeypatch.setenv("FUNDUS_BATCH_WEIGHTS", str(registry))
    enhance: dict[str, object] = {"enabled": True}
    if problem == "truncated":
        (tmp_path / "trunc.pt").write_bytes(SHIPPED.read_bytes()[:100_000])
        enhance["weights"] = str(tmp_path / "trunc.pt")
    elif problem == "registered-file-missing":
        _registry(registry, "absent", "absent.pt")
        enhance["weights"] = "absent"
    elif problem == "sha256-mismatch":
        _tiny(registry / "other.pt")
        _registry(registry, "other", "other.pt")
        enhance["weights"] = "other"
    elif problem == "variant-does-not-fit":
        enhance |= {"weights": str(_tiny(tmp_path / "t.pt")), "variant": "encode_decode_res"}
    elif problem == "gated-bare-file":
        enhance["weights"] = str(_tiny(tmp_path / "g.pt", bare=True, field=192, field_gate=True))
    else:
        enhance |= {"variant": "cofe-net", "width": 0.5}
    manifest = write_inputs(tmp_path / "in", n_good=1, broken=False)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message) as err:
        pipeline.run(_config(manifest, out, size=192, enhance=enhance))
    assert "\n" not in str(err.value) and str(err.value).startswith("enhance.weights ")
    assert not out.exists()  # refused before the lease: nothing recorded, nothing written


def test_a_working_size_the_model_does_not_take_is_refused_before_any_work(tmp_path):
    """It used to fail every row and record the size, which then refused the corrected rerun.
    The shipped model's correction is computed from a 192 px copy: it takes 128 px."""
    from fundus_batch.config import ConfigError

    manifest = write_inputs(tmp_path / "in", n_good=1, broken=False)
    plain = {"enabled": True, "weights": str(_tiny(tmp_path / "plain.pt"))}
    with pytest.raises(ConfigError, match=r"size \(--size\) 128 does not suit weights 'plain.pt'"):
        pipeline.run(_config(manifest, tmp_path / "out", size=128, enhance=plain))
    assert not (tmp_path / "out").exists()
    shipped = resolve(_config(manifest, tmp_path / "out", size=128, enhance={"enabled": True}))
    assert shipped["enhance"]["model_name"] == "fundus-cofenet-small"


def test_the_same_weights_by_another_path_or_their_registered_name_are_the_same_setting(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "copy.pt").write_bytes(SHIPPED.read_bytes())
    for folder in ("a", "b"):
        _tiny(tmp_path / folder / "tiny.pt")

    def settings(weights: str) -> dict:
        enhance = {"enabled": True, "weights": weights}
        return resolve(_config(tmp_path / "m.csv", tmp_path / "out", size=192, enhance=enhance))

    spellings = ["fundus-cofenet-small", "./w/copy.pt", str(tmp_path / "w" / "copy.pt")]
    for old in spellings:
        for new in spellings:
            assert compare(settings(old), settings(new)).changed is False
    assert (
        compare(settings("a/tiny.pt"), settings(str(tmp_path / "b" / "tiny.pt"))).changed is False
    )
    named = {"enabled": True, "weights": "b/tiny.pt", "variant": "cofe-net", "width": 0.125}
    given = resolve(_config(tmp_path / "m.csv", tmp_path / "out", size=192, enhance=named))
    assert compare(settings("a/tiny.pt"), given).changed is False  # the file fits one network
    with pytest.raises(SettingsMismatchError) as err:
        compare(settings("fundus-cofenet-small"), settings("a/tiny.pt"))
    shown = [d.split(":")[0] for d in err.value.differences]
    assert shown == ["enhance.model_name", "enhance.model_sha256", "enhance.weights"]
    assert "enhance.model_name: 'fundus-cofenet-small' -> 'tiny.pt'" in err.value.differences
    [sha] = [d for d in err.value.differences if d.startswith("enhance.model_sha256")]
    assert "registered as 'fundus-cofenet-small': --weights fundus-cofenet-small" in sha
    with pytest.raises(SettingsMismatchError) as err:  # a file no registry knows
        compare(settings("a/tiny.pt"), settings("fundus-cofenet-small"))
    [sha] = [d for d in err.value.differences if d.startswith("enhance.model_sha256")]
    assert "not registered here: give their file with --weights PATH" in sha


def test_the_classical_enhancer_records_only_what_determines_its_outputs(tmp_path):
    """Weights and variant do nothing to the classical enhancer: recorded, they refused a
    plain rerun of a folder whose first run had named them."""
    from fundus_batch.classical import ClassicalEnhancer
    from fundus_batch.config import ConfigError

    def settings(**enhance: object) -> dict:
        enhance = {"enabled": True, "enhancer": "classical", **enhance}
        return resolve(_config(tmp_path / "m.csv", tmp_path / "out", enhance=enhance))

    plain = settings()
    classical = ClassicalEnhancer()
    assert plain["enhance"] == {
        "enhancer": "classical",
        "model_name": classical.model_name,
        "model_sha256": classical.model_sha256,
    }
    with pytest.raises(ConfigError, match=r"enhance\.weights is a Cofe-Net setting"):
        settings(weights="w/copy.pt")  # refused now; folders that recorded it still match
    earlier = {**plain, "enhance": {**plain["enhance"], "weights": "w/copy.pt", "variant": None}}
    del earlier["enhance"]["model_name"]  # as earlier versions recorded it
    assert compare(recorded({"settings": earlier}), plain).changed is False
    with pytest.raises(SettingsMismatchError, match=r"enhance\.enhancer: 'classical' -> 'cofenet'"):
        compare(
            plain, resolve(_config(tmp_path / "m.csv", tmp_path / "o", enhance={"enabled": True}))
        )


def test_a_variant_recorded_by_its_alias_matches_its_released_name(tmp_path):
    """The config now stores the released name; a folder recorded before settings were (no
    sha256 to compare the weights by) holds the alias it was given."""
    weights = str(_tiny(tmp_path / "tiny.pt"))
    enhance = {"enabled": True, "weights": weights, "variant": "cofe-net", "width": 0.125}
    cfg = _config(tmp_path / "m.csv", tmp_path / "out", size=192, enhance=enhance)
    now = resolve(cfg)
    assert now["enhance"]["variant"] == "encode_decode_vessel_2scale_share_res_atten"
    legacy = cfg.redacted()
    legacy["enhance"]["variant"] = "cofe-net"
    assert recorded({"config": legacy})["enhance"]["variant"] == "cofe-net"
    assert compare(recorded({"config": legacy}), now).changed is False
    legacy["enhance"]["variant"] = "encode_decode_res"
    with pytest.raises(SettingsMismatchError, match=r"enhance\.variant: 'encode_decode_res' -> "):
        compare(recorded({"config": legacy}), now)


# ------------------------------------------------------------------------- on a real OUT


@pytest.fixture(scope="module")
def made(ray_cluster, tmp_path_factory):
    """An OUT made by one run: 2 photographs x 2 variants at 128 px, seed 5."""
    base = tmp_path_factory.mktemp("settings")
    manifest = write_inputs(base / "in", n_good=2, broken=False)
    out = base / "out"
    summary = pipeline.run(_config(manifest, out))
    assert summary.complete and summary.ok == 4
    return manifest, out


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        ({"size": 160}, ["size: 128 -> 160"]),
        ({"seed": 99}, ["seed: 5 -> 99"]),
        ({"variants": 1}, ["variants: 2 -> 1"]),
        ({"size": 160, "variants": 3, "seed": 99}, ["size: 128 -> 160", "seed: 5 -> 99"]),
    ],
    ids=["size", "seed", "fewer-variants", "several"],
)
def test_a_rerun_with_other_settings_is_refused_before_any_work(made, change, shown):
    manifest, out = made
    before = folder_snapshot(out)
    with pytest.raises(SettingsMismatchError) as err:
        pipeline.run(_config(manifest, out, **change))
    for text in shown:
        assert any(d.startswith(text) for d in err.value.differences), err.value.differences
    assert "nothing was done" in str(err.value)
    assert folder_snapshot(out) == before  # not a byte, not a timestamp changed
    assert verify(str(out), str(manifest)).ok


def test_a_manifest_column_whose_type_changed_is_refused_before_any_work(made, tmp_path):
    """Shards with a column of two types cannot be read as one table: verify, export and
    training would fail on the folder afterwards."""
    manifest, out = made
    rows = pd.read_csv(manifest)  # as a CSV manifest, grade was stored as text
    rows = pd.concat([rows, rows.head(1).assign(image_id="img_more")], ignore_index=True)
    as_integers = tmp_path / "m.parquet"
    rows.astype({"grade": "int64"}).to_parquet(as_integers, index=False)
    before = folder_snapshot(out)
    with pytest.raises(SettingsMismatchError) as err:
        pipeline.run(_config(as_integers, out))
    assert err.value.differences[0].startswith("manifest column 'grade': string -> int64")
    assert "nothing was done" in str(err.value)
    assert folder_snapshot(out) == before
    assert verify(str(out), str(manifest)).ok


def test_an_image_whose_split_changed_is_refused_naming_its_line(made, tmp_path):
    """More variants of a photograph under another split would put it in train and val."""
    import shutil

    manifest, made_out = made
    out = tmp_path / "out"
    shutil.copytree(made_out, out)
    rows = pd.read_csv(manifest)  # no split: the folder's rows have none
    moved = tmp_path / "moved.csv"
    rows.assign(split=["", "val"]).to_csv(moved, index=False)
    before = folder_snapshot(out)
    with pytest.raises(ManifestError, match=r"row 2 \(line 3\), field 'split'.*'img_0001'"):
        pipeline.run(_config(moved, out, variants=3))
    assert folder_snapshot(out) == before
    # Enhancement added would first drop the ok rows without it: refused before that too.
    with pytest.raises(ManifestError, match="field 'split'"):
        pipeline.run(_config(moved, out, enhance={"enabled": True}))
    assert folder_snapshot(out) == before
    kept = tmp_path / "kept.csv"  # the same splits (none), and a new image under any split
    pd.concat([rows, rows.head(1).assign(image_id="img_new", split="val")]).to_csv(
        kept, index=False
    )
    summary = pipeline.run(_config(kept, out, variants=3))
    assert summary.complete and (summary.done_before, summary.ok) == (4, 9)  # 3 images x 3


def test_a_run_killed_before_its_first_shard_still_fixes_the_settings(made, tmp_path):
    """Its images were made with its settings: a rerun with others would fail every row on
    "already exists with other content" and record the new settings over them."""
    import shutil

    manifest, made_out = made
    out = tmp_path / "out"
    shutil.copytree(made_out, out)
    shutil.rmtree(out / "pairs")  # as if killed before any shard was committed
    before = folder_snapshot(out)
    with pytest.raises(SettingsMismatchError, match="size: 128 -> 160"):
        pipeline.run(_config(manifest, out, size=160))
    assert folder_snapshot(out) == before
    (out / "run.json").unlink()  # nothing recorded: nothing to compare with
    shutil.rmtree(out / "images")
    (out / "images").mkdir()
    assert pipeline.run(_config(manifest, out, size=160)).complete


def test_a_memory_out_or_manifest_is_refused_before_any_work(made):
    """Ray's workers would write the images into their own process's memory, lost at exit,
    while the run said complete."""
    import fsspec

    from fundus_batch.config import ConfigError

    manifest, _ = made
    with pytest.raises(ConfigError, match=r"^out: memory://fb-mem-out lives in this process"):
        pipeline.run(_config(manifest, "memory://fb-mem-out"))
    assert not fsspec.filesystem("memory").exists("/fb-mem-out")
    memory_manifest = "memory://fb-mem-in/m.csv"
    fsspec.filesystem("memory").pipe("/fb-mem-in/m.csv", manifest.read_bytes())
    with pytest.raises(ConfigError, match=r"^manifest: memory://fb-mem-in/m.csv lives in"):
        pipeline.run(_config(memory_manifest, "memory://fb-mem-out"))


def test_a_run_that_does_nothing_leaves_run_json_as_it_was(made):
    manifest, out = made
    before = (out / "run.json").read_bytes(), (out / "run.json").stat().st_mtime_ns
    summary = pipeline.run(_config(manifest, out))
    assert summary.complete and summary.done_before == 4 and summary.shards == []
    assert ((out / "run.json").read_bytes(), (out / "run.json").stat().st_mtime_ns) == before
    assert len(json.loads(before[0])["history"]) == 1


def test_more_variants_are_added_and_recorded_with_a_history(ray_cluster, tmp_path):
    manifest = write_inputs(tmp_path / "in", n_good=2, broken=False)
    out = tmp_path / "out"
    pipeline.run(_config(manifest, out, variants=1))
    old = _rows(out).degraded_sha256
    summary = pipeline.run(_config(manifest, out, variants=3))
    assert summary.complete and summary.done_before == 2 and summary.ok == 6
    new = _rows(out)
    assert len(new) == 6 and new.degraded_sha256.loc[old.index].equals(old)
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["variants"] == 3 and run["config"]["variants"] == 3
    assert [h["settings"]["variants"] for h in run["history"]] == [1, 3]
    assert [h["state"] for h in run["history"]] == ["complete", "complete"]
    assert verify(str(out), str(manifest)).ok


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    import torch

    from fundus_batch.models import build_cofenet, save_weights

    def save(seed: int) -> Path:
        gen = torch.Generator().manual_seed(seed)
        model = build_cofenet("cofe-net", width=0.125, generator=gen)
        path = tmp_path_factory.mktemp("weights") / f"tiny{seed}.pt"
        save_weights(path, model.state_dict(), residual=False)
        return path

    return save(0), save(1)


def test_enhancement_added_later_is_done_for_existing_rows_and_cannot_be_removed(
    ray_cluster, tmp_path, tiny_weights
):
    manifest = write_inputs(tmp_path / "in", n_good=2, broken=True)
    out = tmp_path / "out"
    pipeline.run(_config(manifest, out, variants=1, size=192))  # Cofe-Net needs >= 192 px
    plain = _rows(out)
    assert plain.enhanced_uri.isna().all()
    enh = {"enabled": True, "weights": str(tiny_weights[0])}
    summary = pipeline.run(_config(manifest, out, variants=1, size=192, enhance=enh))
    assert summary.complete and (summary.ok, summary.failed) == (2, 2)
    rows = _rows(out)
    assert len(rows) == 4 and not rows.index.duplicated().any()
    ok = rows[rows.status == "ok"]
    assert ok.enhanced_uri.notna().all() and ok.model_sha256.notna().all()
    assert ok.degraded_sha256.equals(plain.loc[ok.index].degraded_sha256)  # same pixels
    for uri in ok.enhanced_uri:
        assert Path(outpaths.resolve(str(out), uri)).is_file()
    report = verify(str(out), str(manifest))
    assert report.ok, report.summary()
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["enhance"]["weights"] == str(tiny_weights[0])

    before = folder_snapshot(out)
    with pytest.raises(SettingsMismatchError, match="enhance: on -> off"):
        pipeline.run(_config(manifest, out, variants=1, size=192))
    other = {"enabled": True, "weights": str(tiny_weights[1])}
    with pytest.raises(SettingsMismatchError, match=r"enhance\.model_sha256: "):
        pipeline.run(_config(manifest, out, variants=1, size=192, enhance=other))
    assert folder_snapshot(out) == before


def test_metrics_added_later_are_computed_for_existing_rows_and_cannot_be_removed(
    ray_cluster, tmp_path
):
    manifest = write_inputs(tmp_path / "in", n_good=2, broken=True)
    out = tmp_path / "out"
    pipeline.run(_config(manifest, out, compute_metrics=False))
    plain = _rows(out)
    assert plain.metric_version.isna().all() and plain.psnr_degraded.isna().all()
    summary = pipeline.run(_config(manifest, out))
    assert summary.complete and (summary.ok, summary.failed) == (4, 4)
    rows = _rows(out)
    assert len(rows) == 8 and not rows.index.duplicated().any()
    ok = rows[rows.status == "ok"]
    assert ok.metric_version.notna().all() and ok.psnr_degraded.notna().all()
    assert ok.degraded_sha256.equals(plain.loc[ok.index].degraded_sha256)  # same pixels
    report = verify(str(out), str(manifest), deep=True)
    assert report.ok, report.summary()
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["compute_metrics"] is True

    before = folder_snapshot(out)
    with pytest.raises(SettingsMismatchError, match="metric_version: 'fb-metrics-1' -> off"):
        pipeline.run(_config(manifest, out, compute_metrics=False))
    assert folder_snapshot(out) == before
    assert pipeline.run(_config(manifest, out)).complete  # a rerun redoes nothing
    assert folder_snapshot(out) == before


def test_a_stopped_run_that_added_metrics_is_finished_by_the_next_and_verify_sees_the_gap(
    ray_cluster, tmp_path
):
    """The stopped run recorded metrics on in run.json: the next run used to see no change,
    redo nothing and call the folder complete with rows never scored."""
    manifest = write_inputs(tmp_path / "in", n_good=3, broken=False)
    out = tmp_path / "out"
    pipeline.run(_config(manifest, out, compute_metrics=False))

    def stop_after_the_first_block(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run(_config(manifest, out), progress=stop_after_the_first_block)
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["compute_metrics"] is True and record["state"] == "interrupted"
    unscored = [p for p in verify(str(out)).problems if "ok row without metrics" in p]
    assert unscored, "verify must name the rows the stopped run did not score"

    assert pipeline.run(_config(manifest, out)).complete
    rows = _rows(out)
    assert len(rows) == 6 and not rows.index.duplicated().any()
    assert rows.metric_version.notna().all() and rows.psnr_degraded.notna().all()
    assert verify(str(out), str(manifest)).ok


def test_a_redo_that_fails_keeps_the_rows_it_was_to_replace(ray_cluster, tmp_path):
    """Metrics (or enhancement) added to a folder an earlier version made: where this version
    preprocesses a photograph otherwise, the redone rows fail ('clean.png already exists with
    other content'). They used to be dropped before the redo, losing the folder's ok rows."""
    import cv2

    from fundus_batch.imaging import sha256_hex
    from fundus_batch.schema import with_row_checksums

    manifest = write_inputs(tmp_path / "in", n_good=2, broken=True)
    out = tmp_path / "out"
    pipeline.run(_config(manifest, out, compute_metrics=False))
    plain = _rows(out)
    ok_ids = sorted({i for (i, _), s in plain.status.items() if s == "ok"})
    old = ok_ids[0]  # as an earlier version cropped it: other clean bytes, recorded as such
    clean = out / "images" / old / "clean.png"
    image = cv2.imread(str(clean), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(clean), cv2.flip(image, 1))
    digest = sha256_hex(clean.read_bytes())
    for shard in (out / "pairs").glob("*.parquet"):
        table = pq.read_table(shard)
        ids = table.column("image_id").to_pylist()
        column = table.schema.get_field_index("clean_sha256")
        recorded = table.column(column).to_pylist()
        values = [digest if i == old else v for i, v in zip(ids, recorded, strict=True)]
        table = table.set_column(column, "clean_sha256", pa.array(values, pa.string()))
        pq.write_table(with_row_checksums(table), shard)
    kept = _rows(out).loc[old]

    summary = pipeline.run(_config(manifest, out))
    assert not summary.complete and summary.not_redone == 2
    assert "already exists with other content" in str(summary.not_redone_error)
    rows = _rows(out)
    assert len(rows) == len(plain) and not rows.index.duplicated().any()
    assert (rows.loc[old].status == "ok").all() and rows.loc[old].metric_version.isna().all()
    assert rows.loc[old].degraded_sha256.equals(kept.degraded_sha256)
    redone = rows.loc[ok_ids[1]]
    assert (redone.status == "ok").all() and redone.metric_version.notna().all()
    run = json.loads((out / "run.json").read_text())
    assert run["state"] == "incomplete" and run["counts"]["not_redone"] == 2
    report = verify(str(out), str(manifest))
    assert [p for p in report.problems if "run.json" not in p] == [
        f"'{old}' variant {v}: ok row without metrics (no metric_version)" for v in (0, 1)
    ], report.summary()
