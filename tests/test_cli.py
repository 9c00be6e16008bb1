"""The command line: single-image commands, manifests, the pipeline, export and the demo."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fundus_batch import __version__, cli, stages
from fundus_batch.cli import main
from fundus_batch.imaging import ImageFormat
from fundus_batch.io.codecs import decode_image, encode_jpeg, encode_png
from fundus_batch.synth import synth_fundus
from tests.pipeline_inputs import write_inputs


@pytest.fixture
def raw_photo(tmp_path: Path) -> Path:
    s = synth_fundus(600, seed=5, canvas=(800, 640))
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode_jpeg(s.image))
    return path


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def test_version_has_one_source_the_package_the_installed_metadata_and_the_cli_agree():
    assert importlib.metadata.version("fundus-batch") == __version__
    result = CliRunner().invoke(main, ["--version"])
    _ok(result)
    assert result.output.strip() == f"fundus-batch, version {__version__}"


def test_synth_writes_image_vessel_mask_and_a_manifest_of_the_photographs(tmp_path: Path):
    result = CliRunner().invoke(main, ["synth", str(tmp_path), "--count", "2", "--size", "128"])
    _ok(result)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "manifest.csv",
        "synth_00000.png",
        "synth_00000_mask.png",
        "synth_00000_vessel.png",
        "synth_00001.png",
        "synth_00001_mask.png",
        "synth_00001_vessel.png",
    ]
    from fundus_batch.manifest_stream import scan_manifest

    assert scan_manifest(str(tmp_path / "manifest.csv")).rows == 2
    frame = pd.read_csv(tmp_path / "manifest.csv", dtype=str)
    assert list(frame.image_id) == ["synth_00000", "synth_00001"]
    for row in frame.itertuples():
        assert Path(row.uri) == tmp_path.resolve() / f"{row.image_id}.png"
        assert Path(row.mask_uri).name == f"{row.image_id}_mask.png"
        assert Path(row.vessel_uri).name == f"{row.image_id}_vessel.png"
        assert Path(row.mask_uri).is_file() and Path(row.vessel_uri).is_file()


def test_manifest_from_dir_skips_masks_and_vessel_maps_unless_asked(tmp_path: Path):
    _ok(CliRunner().invoke(main, ["synth", str(tmp_path / "s"), "--count", "3", "--size", "64"]))
    out = tmp_path / "m.csv"
    _ok(CliRunner().invoke(main, ["manifest", "from-dir", str(tmp_path / "s"), "--out", str(out)]))
    assert sorted(pd.read_csv(out).image_id) == ["synth_00000", "synth_00001", "synth_00002"]
    args = ["manifest", "from-dir", str(tmp_path / "s"), "--out", str(out), "--include-masks"]
    _ok(CliRunner().invoke(main, args))
    assert len(pd.read_csv(out)) == 9


def test_degrade_image_is_byte_identical_for_same_seed_and_replays(raw_photo, tmp_path):
    run = CliRunner().invoke
    args = ["degrade-image", str(raw_photo)]
    _ok(
        run(
            main,
            [
                *args,
                str(tmp_path / "a.png"),
                "--seed",
                "4",
                "--size",
                "256",
                "--params-out",
                str(tmp_path / "p.json"),
            ],
        )
    )
    _ok(run(main, [*args, str(tmp_path / "b.png"), "--seed", "4", "--size", "256"]))
    _ok(run(main, [*args, str(tmp_path / "c.png"), "--seed", "5", "--size", "256"]))
    _ok(
        run(
            main,
            [*args, str(tmp_path / "d.png"), "--size", "256", "--replay", str(tmp_path / "p.json")],
        )
    )
    a, b, c, d = ((tmp_path / f"{n}.png").read_bytes() for n in "abcd")
    assert a == b == d and a != c
    record = json.loads((tmp_path / "p.json").read_text())
    assert record["type_code"] == "111"


def test_degrade_image_refuses_sampling_options_that_a_replay_would_ignore(raw_photo, tmp_path):
    record = tmp_path / "p.json"
    args = ["degrade-image", str(raw_photo), "--size", "256"]
    _ok(CliRunner().invoke(main, [*args, str(tmp_path / "a.png"), "--params-out", str(record)]))
    result = CliRunner().invoke(
        main,
        [*args, str(tmp_path / "b.png"), "--replay", str(record), "--type", "001", "--id", "x"],
    )
    assert result.exit_code == 2 and "--type, --id would be ignored" in result.output
    assert not (tmp_path / "b.png").exists()


def test_degrade_image_preprocessed_replays_the_released_json_schema(tmp_path: Path):
    s = synth_fundus(512, seed=9)
    (tmp_path / "in.png").write_bytes(
        __import__("fundus_batch.io.codecs").io.codecs.encode_png(s.image)
    )
    (tmp_path / "mask.png").write_bytes(
        __import__("fundus_batch.io.codecs").io.codecs.encode_png(s.mask)
    )
    released = {
        "name": "x.png",
        "type": "100",
        "params": {"blur": {"sigma": 9.0, "rad_w": 7, "rad_h": 7}},
    }
    (tmp_path / "p.json").write_text(json.dumps(released))
    result = CliRunner().invoke(
        main,
        [
            "degrade-image",
            str(tmp_path / "in.png"),
            str(tmp_path / "out.png"),
            "--preprocessed",
            "--mask",
            str(tmp_path / "mask.png"),
            "--replay",
            str(tmp_path / "p.json"),
        ],
    )
    _ok(result)
    out = decode_image((tmp_path / "out.png").read_bytes()).astype(float)
    assert np.abs(out - s.image).mean() > 0.5  # the 7x7 blur changed the image


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"", "empty"), (b"hello, I am text", "format"), (None, "no such file")],
)
def test_bad_input_exits_non_zero_with_a_one_line_reason(tmp_path, content, needle):
    src = tmp_path / "in.jpg"
    if content is not None:
        src.write_bytes(content)
    result = CliRunner().invoke(main, ["degrade-image", str(src), str(tmp_path / "o.png")])
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0].lower(), result.output


def test_all_black_photo_is_a_clear_fov_error(tmp_path):
    src = tmp_path / "black.jpg"
    src.write_bytes(encode_jpeg(np.zeros((300, 400, 3), np.uint8)))
    result = CliRunner().invoke(main, ["degrade-image", str(src), str(tmp_path / "o.png")])
    assert result.exit_code != 0 and "FOV" in result.output.upper()


def test_manifest_from_dir_then_degrade_then_export(ray_cluster, tmp_path):
    inputs = tmp_path / "in"
    write_inputs(inputs, n_good=2, broken=False, size=320)
    runner = CliRunner()
    _ok(
        runner.invoke(
            main,
            [
                "manifest",
                "from-dir",
                str(inputs),
                "--ext",
                ".jpg",
                "--out",
                str(tmp_path / "m.csv"),
            ],
        )
    )
    _ok(runner.invoke(main, ["manifest", "validate", str(tmp_path / "m.csv")]))
    out = tmp_path / "out"
    result = runner.invoke(
        main,
        [
            "degrade",
            "--manifest",
            str(tmp_path / "m.csv"),
            "--out",
            str(out),
            "--variants",
            "2",
            "--types",
            "001,100",
            "--size",
            "256",
            "--seed",
            "3",
        ],
    )
    _ok(result)
    assert "rows_in == ok + failed: True" in result.output
    bar = [line for line in result.stderr.splitlines() if line.startswith("rows ")]
    assert bar[0].startswith("rows 0/4 ") and bar[-1].startswith("rows 4/4 100% "), bar
    df = pq.read_table(str(out / "pairs")).to_pandas()
    assert len(df) == 4 and set(df.type_code) == {"001", "100"}
    verify = ["verify", str(out), "--manifest", str(tmp_path / "m.csv")]
    _ok(runner.invoke(main, verify))
    deep = runner.invoke(main, [*verify, "--deep", "--deep-rows", "2"])
    _ok(deep)
    assert "rows recomputed from their files (--deep): 2" in deep.output
    kept = (out / df.degraded_uri.iloc[0]).read_bytes()
    (out / df.degraded_uri.iloc[0]).unlink()
    result = runner.invoke(main, verify)
    assert result.exit_code == 1 and "is missing" in result.output
    (out / df.degraded_uri.iloc[0]).write_bytes(kept)
    _ok(
        runner.invoke(
            main, ["export", str(out), "--format", "basicsr", "--dest", str(tmp_path / "bsr")]
        )
    )
    meta = (tmp_path / "bsr" / "meta_info.txt").read_text().splitlines()
    assert len(meta) == 4 and meta[0].endswith("(256,256,3)")
    for line in meta:
        name = line.split()[0]
        assert (tmp_path / "bsr" / "GT" / name).is_file()
        assert (tmp_path / "bsr" / "LQ" / name).is_file()
    _ok(
        runner.invoke(
            main, ["export", str(out), "--format", "pix2pix", "--dest", str(tmp_path / "p2p")]
        )
    )
    [sample, *_] = sorted((tmp_path / "p2p" / "train").iterdir())
    assert decode_image(sample.read_bytes()).shape == (256, 512, 3)


@pytest.fixture(scope="module")
def large_photo(tmp_path_factory) -> tuple[Path, Path]:
    """A raw JPEG that the pipeline decodes at 1/4 for a 256 working image, and a full-size FOV
    mask smaller than the detected field (so that using it shows)."""
    folder = tmp_path_factory.mktemp("large")
    s = synth_fundus(1000, seed=7, canvas=(1200, 1100))
    photo, mask_path = folder / "large_eye.jpg", folder / "small_fov.png"
    photo.write_bytes(encode_jpeg(s.image))
    mask = np.zeros((1100, 1200), np.uint8)
    cv2.circle(mask, (600, 550), 400, 255, -1)
    mask_path.write_bytes(encode_png(mask))
    return photo, mask_path


def _preprocess_stage(
    photo: Path, mask: Path | None, size: int = 256, image_format: ImageFormat = "png"
) -> stages.Item:
    encoded = {"raw": photo.read_bytes()}
    if mask is not None:
        encoded["mask"] = mask.read_bytes()
    item = stages.Item({"image_id": photo.stem, "status": "ok"}, encoded=encoded)
    preprocess = stages.Preprocess(size=size, image_format=image_format, jpeg_quality=80)
    [out] = preprocess.process([item])
    assert out.ok, out.row.get("error")
    return out


@pytest.mark.parametrize("given_mask", [False, True], ids=["detected_fov", "given_mask"])
def test_working_image_is_the_preprocess_stage_output_for_a_jpeg_larger_than_working_size(
    large_photo, given_mask
):
    photo, mask = large_photo[0], large_photo[1] if given_mask else None
    image, working_mask = cli._working_image(photo.read_bytes(), mask, False, 256)
    stage = _preprocess_stage(photo, mask)
    assert np.array_equal(image, stage.image("clean"))
    assert np.array_equal(working_mask, stage.image("mask"))
    other = _preprocess_stage(photo, None if given_mask else large_photo[1])
    assert not np.array_equal(image, other.image("clean"))  # the mask changes the crop


@pytest.mark.parametrize("given_mask", [False, True], ids=["detected_fov", "given_mask"])
def test_degrade_image_regenerates_the_pipeline_row_byte_for_byte(
    large_photo, tmp_path, given_mask
):
    photo, mask = large_photo[0], large_photo[1] if given_mask else None
    out, params = tmp_path / "out.png", tmp_path / "p.json"
    args = ["degrade-image", str(photo), str(out), "--size", "256", "--seed", "5"]
    args += ["--variant", "1", "--type", "011", "--params-out", str(params)]
    _ok(CliRunner().invoke(main, [*args, *(["--mask", str(mask)] if mask else [])]))
    degrade = stages.Degrade(seed=5, variants=2, types=["011"])
    [_, row] = degrade.process([_preprocess_stage(photo, mask)])
    assert row.ok and row.row["variant"] == 1
    assert out.read_bytes() == row.encoded["degraded"]
    assert json.loads(params.read_text()) == json.loads(row.row["params_json"])


@pytest.mark.parametrize("given_mask", [False, True], ids=["detected_fov", "given_mask"])
def test_degrade_image_regenerates_a_jpeg_pipeline_row_byte_for_byte(
    large_photo, tmp_path, given_mask
):
    """A --format jpeg run degrades its clean image as stored (after JPEG encoding)."""
    photo, mask = large_photo[0], large_photo[1] if given_mask else None
    clean = _preprocess_stage(photo, mask, image_format="jpeg")  # at quality 80
    degrade = stages.Degrade(
        seed=5, variants=2, types=["011"], image_format="jpeg", jpeg_quality=80
    )
    [_, row] = degrade.process([clean])
    assert row.ok and row.row["variant"] == 1
    params = tmp_path / "p.json"
    params.write_text(row.row["params_json"])
    args = ["--size", "256", "--quality", "80", "--jpeg-clean"]
    args += ["--mask", str(mask)] if mask else []
    sampled, replayed = tmp_path / "sampled.jpg", tmp_path / "replayed.jpg"
    drawn = ["--seed", "5", "--variant", "1", "--type", "011"]
    _ok(CliRunner().invoke(main, ["degrade-image", str(photo), str(sampled), *args, *drawn]))
    _ok(
        CliRunner().invoke(
            main, ["degrade-image", str(photo), str(replayed), *args, "--replay", str(params)]
        )
    )
    assert sampled.read_bytes() == row.encoded["degraded"]
    assert replayed.read_bytes() == row.encoded["degraded"]
    # From the run's own files: its stored clean image, degraded as it is.
    (tmp_path / "clean.jpg").write_bytes(clean.encoded["clean"])
    (tmp_path / "mask.png").write_bytes(clean.encoded["mask"])
    stored = ["--preprocessed", "--mask", str(tmp_path / "mask.png"), "--quality", "80"]
    again = tmp_path / "again.jpg"
    args = ["degrade-image", str(tmp_path / "clean.jpg"), str(again), *stored]
    _ok(CliRunner().invoke(main, [*args, "--replay", str(params)]))
    assert again.read_bytes() == row.encoded["degraded"]


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--jpeg-clean"], "--jpeg-clean needs a .jpg or .jpeg OUTPUT"),
        (["--jpeg-clean", "--preprocessed", "--mask", "m.png"], "must not be JPEG-encoded again"),
    ],
)
def test_degrade_image_refuses_jpeg_clean_where_no_jpeg_run_row_could_come_out(
    raw_photo, tmp_path, extra, reason
):
    out = tmp_path / ("o.png" if "--preprocessed" not in extra else "o.jpg")
    result = CliRunner().invoke(main, ["degrade-image", str(raw_photo), str(out), *extra])
    assert result.exit_code == 2 and reason in " ".join(result.output.split()), result.output
    assert not out.exists()


def test_degrade_image_without_preprocessed_reads_the_mask_it_is_given(raw_photo, tmp_path):
    args = ["degrade-image", str(raw_photo), str(tmp_path / "o.png"), "--size", "256"]
    result = CliRunner().invoke(main, [*args, "--mask", str(tmp_path / "nope.png")])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no such file" in lines[0], result.output
    assert not (tmp_path / "o.png").exists()


def test_a_failed_write_leaves_the_existing_file_whole_and_no_partial_one(tmp_path):
    resource = pytest.importorskip("resource")
    s = synth_fundus(256, seed=1)
    src, mask = tmp_path / "eye.png", tmp_path / "eye_mask.png"
    src.write_bytes(encode_png(s.image))
    mask.write_bytes(encode_png(s.mask))
    before, names = src.read_bytes(), sorted(p.name for p in tmp_path.iterdir())
    limit = 8192  # bytes a process may write to one file; the output needs more
    assert len(before) > limit
    # OUTPUT is INPUT: a write that fails halfway must not destroy the photograph.
    args = ["degrade-image", str(src), str(src), "--preprocessed", "--mask", str(mask)]
    done = subprocess.run(
        [sys.executable, "-c", "from fundus_batch.cli import main; main()", *args],
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        check=False,
    )
    assert done.returncode == 1
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "too large" in lines[0], lines
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == names


@pytest.mark.parametrize("command", ["degrade-image", "enhance-image"])
def test_single_image_commands_write_through_the_storage_atomic_writer(
    raw_photo, tmp_path, monkeypatch, command
):
    written: list[list[tuple[Path, bytes]]] = []
    monkeypatch.setattr(cli, "write_local_files", written.append)
    args = [command, str(raw_photo), str(tmp_path / "o.png"), "--size", "256"]
    if command == "enhance-image":
        args += ["--enhancer", "classical"]
    _ok(CliRunner().invoke(main, args))
    [[(path, data)]] = written
    assert path == tmp_path / "o.png" and data.startswith(b"\x89PNG")


def test_params_out_into_a_missing_folder_creates_it(raw_photo, tmp_path):
    out, params = tmp_path / "o.png", tmp_path / "new" / "deep" / "p.json"
    args = ["degrade-image", str(raw_photo), str(out), "--size", "256", "--type", "010"]
    _ok(CliRunner().invoke(main, [*args, "--params-out", str(params)]))
    assert out.is_file() and json.loads(params.read_text())["type_code"] == "010"


def test_a_params_out_that_cannot_be_written_leaves_no_image_without_its_record(
    raw_photo, tmp_path
):
    (tmp_path / "a_file").write_text("not a folder")
    out, params = tmp_path / "o.png", tmp_path / "a_file" / "p.json"
    args = ["degrade-image", str(raw_photo), str(out), "--size", "256"]
    result = CliRunner().invoke(main, [*args, "--params-out", str(params)])
    assert result.exit_code == 1 and result.output.startswith("Error:"), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", raw_photo.name]


def test_params_out_the_same_file_as_output_is_refused(raw_photo, tmp_path):
    out = tmp_path / "o.png"
    args = ["degrade-image", str(raw_photo), str(out), "--params-out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--params-out and OUTPUT" in result.output
    assert not out.exists()


@pytest.mark.parametrize("name", ["o.tif", "o.webp", "o"])
@pytest.mark.parametrize("command", ["degrade-image", "enhance-image"])
def test_an_output_in_a_format_not_written_is_refused_naming_the_supported_ones(
    raw_photo, tmp_path, command, name
):
    args = [command, str(raw_photo), str(tmp_path / name), "--size", "256"]
    if command == "enhance-image":
        args += ["--enhancer", "classical"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "Invalid value for 'OUTPUT'" in result.output
    assert "supported: .png, .jpg, .jpeg" in result.output
    assert not (tmp_path / name).exists()


def test_bad_config_or_manifest_is_rejected_before_any_work(tmp_path):
    runner = CliRunner()
    (tmp_path / "m.csv").write_text("image_id,uri\na,x.jpg\na,y.jpg\n")
    result = runner.invoke(
        main, ["degrade", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code != 0 and "row 2" in result.output and "duplicate" in result.output
    assert not (tmp_path / "out").exists()
    (tmp_path / "c.yaml").write_text("manifest: m.csv\nout: o\nvariants: -3\n")
    result = runner.invoke(main, ["run", str(tmp_path / "c.yaml")])
    assert result.exit_code != 0 and "variants" in result.output


def test_fidelity_lines_count_only_the_pairs_of_this_run(tmp_path, capsys):
    from fundus_batch.config import build_config
    from fundus_batch.manifest_stream import in_run, scan_manifest
    from fundus_batch.output import OutputStore, ShardWriter
    from fundus_batch.schema import output_schema, to_table

    ids = [f"img_{i:04d}" for i in range(6)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,uri\n" + "".join(f"{i},{i}.jpg\n" for i in ids))
    out = tmp_path / "out"
    writer = ShardWriter(OutputStore(str(out)), output_schema())
    rows = [{"image_id": i, "variant": -1, "status": "ok", "enhance_change": 0.0} for i in ids]
    writer.add(to_table(rows, output_schema()))
    writer.close()
    data = {"mode": "enhance", "manifest": str(manifest), "out": str(out)}

    def pairs(limit: int | None):  # what pipeline.run's summary carries
        scan = scan_manifest(str(manifest), limit=limit)
        return lambda table: in_run(table, scan, [-1])

    cli._print_fidelity(build_config({**data, "limit": 2}), pairs(2))
    assert capsys.readouterr().out == "NOTE enhancement left 2 of 2 images unchanged\n"
    cli._print_fidelity(build_config(data), pairs(None))
    assert capsys.readouterr().out == "NOTE enhancement left 6 of 6 images unchanged\n"


@pytest.mark.parametrize("rule", [None, "nr_luminance_clean >= 40"])
def test_the_run_summary_says_how_many_ok_rows_passed_the_quality_gate(monkeypatch, tmp_path, rule):
    from fundus_batch import pipeline
    from fundus_batch.quality import GateCounts

    def run(config, progress=None):
        gate = None if config.min_quality is None else GateCounts(3, 5, {config.min_quality: 2})
        return pipeline.RunSummary(str(config.out), 6, 0, 5, 1, {"fetch": 1}, quality=gate)

    monkeypatch.setattr(pipeline, "run", run)
    (tmp_path / "m.csv").write_text("image_id,uri\na,a.jpg\n")
    args = ["score", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, [*args, *(["--min-quality", rule] if rule else [])])
    _ok(result)
    line = f"quality gate: 3 of 5 ok rows passed (most broken: {rule}, 2 rows)"
    assert (line in result.output.splitlines()) == (rule is not None), result.output
    assert ("quality gate" in result.output) == (rule is not None)


def _interrupted(monkeypatch, tmp_path, exc: BaseException):
    from fundus_batch import pipeline

    def run(config, progress=None):
        raise exc

    monkeypatch.setattr(pipeline, "run", run)
    (tmp_path / "m.csv").write_text("image_id,uri\na,a.jpg\n")
    args = ["degrade", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")]
    return CliRunner().invoke(main, args)


def test_ctrl_c_exits_130_saying_the_output_can_be_resumed(monkeypatch, tmp_path):
    result = _interrupted(monkeypatch, tmp_path, KeyboardInterrupt())
    assert result.exit_code == 130
    assert "Aborted" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        f"interrupted (Ctrl-C): {tmp_path / 'o'} keeps the rows written so far; "
        "run the same command again to resume"
    )


def test_other_exits_of_a_run_pass_through_unchanged(monkeypatch, tmp_path):
    assert _interrupted(monkeypatch, tmp_path, SystemExit(3)).exit_code == 3


def test_ray_that_cannot_be_reached_is_one_error_line_not_a_traceback(monkeypatch, tmp_path):
    from fundus_batch.ray_adapter import RayStartError

    unreachable = RayStartError("could not start or reach the Ray cluster at h:6379: boom")
    result = _interrupted(monkeypatch, tmp_path, unreachable)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: could not start or reach the Ray cluster at h:6379: boom"
    )


SIGTERM_RUN = """
import os, signal, sys, time
from fundus_batch import pipeline
from fundus_batch.cli import main

def run(config, progress=None):
    try:
        progress(0, 4)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    finally:
        open(sys.argv[3], "w").close()  # stdout goes to Ray's log here

pipeline.run = run
main(["degrade", "--manifest", sys.argv[1], "--out", sys.argv[2]])
"""


def test_sigterm_runs_the_cleanup_and_exits_143_saying_the_output_can_be_resumed(tmp_path):
    (tmp_path / "m.csv").write_text("image_id,uri\na,a.jpg\n")
    released = tmp_path / "released"
    args = [str(tmp_path / "m.csv"), str(tmp_path / "o"), str(released)]
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_RUN, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 143, proc.stderr
    assert released.exists()  # the run's finally blocks ran
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith("rows 0/4 ")  # the bar's final line
    assert lines[-1].startswith("interrupted (SIGTERM): ") and "to resume" in lines[-1]


@pytest.mark.slow
def test_demo_runs_end_to_end(ray_cluster, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--count",
            "2",
            "--variants",
            "2",
            "--no-enhance",
        ],
    )
    _ok(result)
    assert "rows_in == ok + failed: True" in result.output
    df = pq.read_table(str(tmp_path / "demo" / "run" / "pairs")).to_pandas()
    assert len(df) == 6 and (df.status == "ok").all()
    assert "skimage_retina" in set(df.image_id)
    assert "failed rows: 0 of 6" in result.output and "NaN" not in result.output
    # Vessel scores need no enhancement: the synthetic images carry their vessel maps.
    synthetic = df[df.image_id != "skimage_retina"]
    assert synthetic.vessel_auc_degraded.notna().all() and df.vessel_auc_degraded.notna().sum() == 4


def test_train_command_trains_on_pipeline_pairs_and_resumes(ray_cluster, tmp_path):
    inputs = tmp_path / "in"
    manifest = write_inputs(inputs, n_good=2, broken=False, size=320)
    runner = CliRunner()
    out = tmp_path / "pairs"
    _ok(
        runner.invoke(
            main,
            [
                "degrade",
                "--manifest",
                str(manifest),
                "--out",
                str(out),
                "--variants",
                "2",
                "--size",
                "256",
            ],
        )
    )
    args = [
        "train",
        "--pairs",
        str(out),
        "--out",
        str(tmp_path / "model"),
        "--width",
        "0.125",
        "--size",
        "192",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    result = runner.invoke(main, [*args, "--steps", "2"])
    _ok(result)
    assert "trained 2 steps" in result.output
    result = runner.invoke(main, [*args, "--steps", "3", "--resume"])
    _ok(result)
    assert "trained 3 steps" in result.output
    import torch

    from fundus_batch.enhance import load_model
    from fundus_batch.models import model_from_weights

    trained = model_from_weights(tmp_path / "model" / "model.pt", residual=True)
    # the registry.json beside the weights says what they do not: the residual output
    loaded, name, _ = load_model(str(tmp_path / "model" / "model.pt"))
    assert (loaded.width, loaded.residual, name) == (0.125, True, "model")
    x = torch.rand(1, 3, 192, 192)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], trained(x)[0])


def test_ctrl_c_in_any_command_exits_130_with_one_line(monkeypatch, tmp_path):
    from fundus_batch import manifest

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(manifest, "from_dir", interrupted)
    args = ["manifest", "from-dir", str(tmp_path), "--out", str(tmp_path / "m.csv")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130
    assert result.output.strip().splitlines() == ["interrupted (Ctrl-C)"]
