"""End-to-end runs of the Ray Data pipeline on a local Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fundus_batch import pipeline
from fundus_batch.config import build_config
from fundus_batch.degrade import DegradationRecord, replay
from fundus_batch.imaging import decode_mask
from fundus_batch.io.codecs import decode_image
from fundus_batch.schema import OUTPUT_COLUMNS
from fundus_batch.verify import verify
from tests.pipeline_inputs import write_inputs

REPO = Path(__file__).resolve().parents[1]


def _config(manifest: Path | str, out: Path | str, **extra):
    data = {
        "manifest": str(manifest),
        "out": str(out),
        "variants": 3,
        "size": 256,
        "progress": False,
        "ray": {"rows_per_block": 2},
    }
    data.update(extra)
    return build_config(data, "test")


def _table(out: Path):
    return pq.read_table(str(out / "pairs")).to_pandas()


def test_local_run_accounts_for_every_row_and_writes_decodable_outputs(ray_cluster, tmp_path):
    manifest = write_inputs(tmp_path / "in", n_good=3)
    out = tmp_path / "out"
    summary = pipeline.run(_config(manifest, out))
    assert summary.rows_in == 5 * 3
    assert (summary.ok, summary.failed) == (9, 6)
    assert summary.complete
    df = _table(out)
    assert set(OUTPUT_COLUMNS) <= set(df.columns) and "grade" in df.columns
    assert not any(c.endswith("_png") for c in df.columns)
    assert not df.duplicated(["image_id", "variant"]).any()
    bad = df[df.status == "failed"].set_index(["image_id", "variant"])
    assert set(bad.loc["missing"].failed_stage) == {"fetch"}
    assert set(bad.loc["corrupt"].failed_stage) == {"preprocess"}
    assert bad.error.str.len().min() > 10
    ok = df[df.status == "ok"]
    assert ok.psnr_degraded.between(5, 80).all() and ok.ssim_degraded.between(0, 1).all()
    assert ok.nr_luminance_degraded.notna().all() and ok.nr_luminance_clean.notna().all()
    assert sorted(ok.type_code.unique()) == ["001", "010", "011"]
    for row in ok.itertuples():
        clean = decode_image((out / row.clean_uri).read_bytes())
        mask = decode_mask((out / row.mask_uri).read_bytes())
        degraded = decode_image((out / row.degraded_uri).read_bytes())
        assert clean.shape == degraded.shape == (256, 256, 3)
        record = DegradationRecord.from_json(row.params_json)
        assert np.array_equal(replay(clean, mask, record), degraded)
    run = __import__("json").loads((out / "run.json").read_text())
    assert run["state"] == "complete"
    assert verify(str(out), str(manifest)).ok
    assert run["counts"]["rows_in"] == run["counts"]["ok"] + run["counts"]["failed"]


def test_rerun_redoes_nothing_and_a_lost_shard_is_redone_exactly_once(ray_cluster, tmp_path):
    manifest = write_inputs(tmp_path / "in", n_good=4, broken=False)
    out = tmp_path / "out"
    cfg = _config(manifest, out, variants=2, shard_rows=3)
    first = pipeline.run(cfg)
    assert first.ok == 8
    again = pipeline.run(cfg)
    assert again.done_before == 8 and again.shards == []
    shards = sorted((out / "pairs").glob("*.parquet"))
    lost = pq.read_table(shards[0]).num_rows
    shards[0].unlink()
    (out / "pairs" / "part-junk.parquet.tmp").write_bytes(b"half a file")
    third = pipeline.run(cfg)
    assert third.done_before == 8 - lost
    df = _table(out)
    assert len(df) == 8 and not df.duplicated(["image_id", "variant"]).any()
    assert not list((out / "pairs").glob("*.tmp"))
    assert verify(str(out), str(manifest)).ok


def test_ctrl_c_keeps_the_rows_finished_since_the_last_shard(ray_cluster, tmp_path):
    """Rows wait in the driver until a shard fills; a stop used to drop them (up to
    shard_rows - 1 finished rows a resume had to redo)."""
    manifest = write_inputs(tmp_path / "in", n_good=4, broken=False)
    out = tmp_path / "out"
    cfg = _config(manifest, out, variants=2, shard_rows=1000)

    def stop_after_four(done: int, total: int) -> None:
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, progress=stop_after_four)
    kept = _table(out)
    assert len(kept) >= 4 and set(kept.status) == {"ok"}
    record = json.loads((out / "run.json").read_text())
    assert record["state"] == "interrupted"
    again = pipeline.run(cfg)
    assert again.done_before == len(kept) and again.ok == 8
    df = _table(out)
    assert len(df) == 8 and not df.duplicated(["image_id", "variant"]).any()
    assert verify(str(out), str(manifest)).ok


def test_more_variants_later_extends_the_dataset(ray_cluster, tmp_path):
    manifest = write_inputs(tmp_path / "in", n_good=2, broken=False)
    out = tmp_path / "out"
    pipeline.run(_config(manifest, out, variants=1))
    before = _table(out).set_index(["image_id", "variant"]).degraded_sha256
    summary = pipeline.run(_config(manifest, out, variants=3))
    assert summary.done_before == 2 and summary.ok == 6
    after = _table(out).set_index(["image_id", "variant"]).degraded_sha256
    assert after.loc[before.index].equals(before)


def test_run_reads_and_writes_s3_through_a_real_endpoint(
    ray_cluster, tmp_path, s3_server, s3_bucket
):
    import io

    import pandas as pd
    import s3fs

    so = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**so)
    local = write_inputs(tmp_path / "in", n_good=2)
    frame = pd.read_csv(local)
    for row in frame.itertuples():
        if Path(row.uri).exists():
            fs.put(row.uri, f"{s3_bucket}/raw/{Path(row.uri).name}")
    frame["uri"] = [f"s3://{s3_bucket}/raw/{Path(u).name}" for u in frame.uri]
    fs.pipe(f"{s3_bucket}/manifest.csv", frame.to_csv(index=False).encode())
    out = f"s3://{s3_bucket}/out"
    summary = pipeline.run(
        _config(f"s3://{s3_bucket}/manifest.csv", out, variants=2, storage_options=so)
    )
    assert (summary.rows_in, summary.ok, summary.failed) == (8, 4, 4)
    shards = fs.glob(f"{s3_bucket}/out/pairs/*.parquet")
    df = pd.concat(pq.read_table(io.BytesIO(fs.cat(p))).to_pandas() for p in shards)
    assert len(df) == 8 and not df.duplicated(["image_id", "variant"]).any()
    ok = df[df.status == "ok"]
    assert ok.degraded_uri.str.startswith("images/").all()  # relative to OUT
    for uri in ok.degraded_uri:
        assert decode_image(fs.cat(f"{out}/{uri}")).shape == (256, 256, 3)
    assert set(df[df.status == "failed"].failed_stage) == {"fetch", "preprocess"}
    run_json = fs.cat(f"{s3_bucket}/out/run.json").decode()
    assert "testing" not in run_json
    assert verify(out, f"s3://{s3_bucket}/manifest.csv", storage_options=so).ok


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    import torch

    from fundus_batch.models import build_cofenet, save_weights

    model = build_cofenet("cofe-net", width=0.125, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_weights(path, model.state_dict(), residual=False)
    return path


def test_enhancement_runs_on_a_declared_gpu_actor_with_cpu_fallback(
    ray_cluster, tmp_path, tiny_weights
):
    from fundus_batch.ray_adapter import ClusterShape, plan_pools

    manifest = write_inputs(tmp_path / "in", n_good=2, broken=True, vessels=True)
    out = tmp_path / "out"
    cfg = _config(
        manifest, out, variants=2, enhance={"enabled": True, "weights": str(tiny_weights)}
    )
    pools = plan_pools(cfg, ClusterShape(cpus=2, gpus=1))
    assert [p.resources.num_gpus for p in pools] == [0, 1, 0]
    summary = pipeline.run(cfg)
    assert (summary.ok, summary.failed) == (4, 4)
    df = _table(out)
    ok = df[df.status == "ok"]
    assert ok.model_sha256.notna().all() and ok.psnr_enhanced.notna().all()
    assert ok.enhanced_uri.str.endswith("_enhanced.png").all()
    for role in ("clean", "degraded", "enhanced"):
        assert ok[f"vessel_auc_{role}"].between(0, 1).all()
        assert ok[f"vessel_f1_{role}"].between(0, 1).all()
    assert (ok.vessel_segmenter == "sato-v1").all() and (ok.enhance_device == "cpu").all()
    assert ok.enhance_change.ge(0).all()
    assert ok.vessel_auc_clean.gt(0.9).all()  # the independent segmenter on exact vessel maps
    for row in ok.itertuples():
        enhanced = decode_image((out / row.enhanced_uri).read_bytes())
        mask = decode_mask((out / row.mask_uri).read_bytes())
        assert enhanced.shape == (256, 256, 3) and (enhanced[mask == 0] == 0).all()
    assert verify(str(out), str(manifest)).ok


def test_enhance_mode_writes_one_row_per_source_image(ray_cluster, tmp_path, tiny_weights):
    manifest = write_inputs(tmp_path / "in", n_good=2, broken=False)
    out = tmp_path / "out"
    summary = pipeline.run(
        _config(manifest, out, mode="enhance", enhance={"weights": str(tiny_weights)})
    )
    assert (summary.rows_in, summary.ok) == (2, 2)
    df = _table(out)
    assert df.variant.isna().all() and df.psnr_enhanced.isna().all()
    assert df.nr_luminance_enhanced.notna().all()
    assert df.enhanced_uri.str.endswith("/enhanced.png").all()
    again = pipeline.run(
        _config(manifest, out, mode="enhance", enhance={"weights": str(tiny_weights)})
    )
    assert again.done_before == 2


def test_score_mode_records_fov_and_no_reference_metrics_only(ray_cluster, tmp_path):
    manifest = write_inputs(tmp_path / "in", n_good=2, broken=True)
    out = tmp_path / "out"
    rule = "nr_luminance_clean > 1 and nr_laplacian_var_clean > 1e9"
    summary = pipeline.run(_config(manifest, out, mode="score", min_quality=rule))
    assert (summary.rows_in, summary.ok, summary.failed) == (4, 2, 2)
    df = _table(out)
    ok = df[df.status == "ok"]
    assert ok.nr_luminance_clean.between(1, 255).all() and ok.fov_r.gt(100).all()
    assert ok.degraded_uri.isna().all() and ok.psnr_degraded.isna().all()
    assert all((out / u).is_file() for u in ok.clean_uri)
    assert (~ok.quality_ok).all()
    assert (ok.quality_failed == "nr_laplacian_var_clean > 1e9").all()  # as written


def test_the_summary_counts_the_ok_rows_that_passed_the_quality_gate(ray_cluster, tmp_path):
    """Types 001 (~16 dB at 128 px) and 010 (~36 dB); neither blurs, so blur_sigma is null and
    counts as 0; the corrupt and missing photographs' failed rows are not counted."""
    manifest = write_inputs(tmp_path / "in", n_good=2, size=256)
    rule = "psnr_degraded >= 25 and blur_sigma < 100"
    extra = {"size": 128, "variants": 2, "types": ["001", "010"], "min_quality": rule}
    summary = pipeline.run(_config(manifest, tmp_path / "out", **extra))
    assert (summary.ok, summary.failed) == (4, 4)
    assert summary.quality is not None
    assert summary.quality.line() == (
        "quality gate: 2 of 4 ok rows passed (most broken: psnr_degraded >= 25, 2 rows)"
    )
    ok = _table(tmp_path / "out").query("status == 'ok'")
    assert dict(zip(ok.type_code, ok.quality_ok, strict=True)) == {"001": False, "010": True}


def test_a_rule_on_vessel_metrics_without_vessel_uri_is_refused_before_any_work(tmp_path):
    from fundus_batch.config import ConfigError
    from fundus_batch.manifest_stream import scan_manifest

    manifest = write_inputs(tmp_path / "in", n_good=1, broken=False)
    out = tmp_path / "out"
    rule = "nr_luminance_clean > 1 and vessel_f1_clean > 0.5"
    refused = r"'vessel_f1_clean' is empty for every row: .* no vessel_uri column"
    with pytest.raises(ConfigError, match=refused):
        pipeline.run(_config(manifest, out, mode="score", min_quality=rule))
    assert not out.exists()
    with_truth = write_inputs(tmp_path / "truth", n_good=1, broken=False, vessels=True)
    config = _config(with_truth, out, mode="score", min_quality=rule)
    pipeline.check_rule_against_manifest(config, scan_manifest(str(with_truth)))  # accepted


@pytest.mark.parametrize(
    ("vessel_uris", "limit", "refused"),
    [
        (["", ""], None, True),  # the column is there, empty in every row
        (["", "v.png"], 1, True),  # the one row with ground truth is outside --limit
        (["", "v.png"], None, False),
    ],
)
def test_a_rule_on_vessel_metrics_needs_a_vessel_uri_in_some_row_of_the_run(
    tmp_path, vessel_uris, limit, refused
):
    from fundus_batch.config import ConfigError
    from fundus_batch.manifest_stream import scan_manifest

    manifest = tmp_path / "m.csv"
    lines = [f"a{i},a{i}.jpg,{v}" for i, v in enumerate(vessel_uris)]
    manifest.write_text("image_id,uri,vessel_uri\n" + "\n".join(lines) + "\n")
    config = _config(manifest, tmp_path / "out", mode="score", min_quality="vessel_auc_clean > 0.5")
    scan = scan_manifest(str(manifest), limit=limit)
    if not refused:
        pipeline.check_rule_against_manifest(config, scan)
        return
    with pytest.raises(ConfigError, match="vessel_uri column, empty in every row of this run"):
        pipeline.check_rule_against_manifest(config, scan)


def test_given_fov_masks_from_the_manifest_are_used(ray_cluster, tmp_path):
    import pandas as pd

    from fundus_batch.io.codecs import encode_png
    from fundus_batch.synth import synth_fundus

    s = synth_fundus(400, seed=3)
    (tmp_path / "img.png").write_bytes(encode_png(s.image))
    half = s.mask.copy()
    half[:120] = 0  # clipped top and bottom, as in the Cofe-Net authors' masks: detection
    half[280:] = 0  # on the image alone would return the whole circle
    (tmp_path / "mask.png").write_bytes(encode_png(half))
    pd.DataFrame(
        [
            {
                "image_id": "a",
                "uri": str(tmp_path / "img.png"),
                "mask_uri": str(tmp_path / "mask.png"),
            }
        ]
    ).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "out"
    summary = pipeline.run(_config(tmp_path / "m.csv", out, mode="score"))
    assert summary.ok == 1
    row = _table(out).iloc[0]
    assert row.fov_status == "given_mask"
    mask = decode_mask((out / row.mask_uri).read_bytes())
    assert mask[:70].max() == 0 and mask[-70:].max() == 0 and mask[128, 20:236].min() == 255


def test_retry_failed_redoes_failed_rows_once_the_input_is_back(ray_cluster, tmp_path):
    manifest = write_inputs(tmp_path / "in", n_good=2, broken=True)
    out = tmp_path / "out"
    first = pipeline.run(_config(manifest, out, variants=2))
    assert (first.ok, first.failed) == (4, 4)
    (tmp_path / "in" / "does_not_exist.jpg").write_bytes(
        (tmp_path / "in" / "img_0001.jpg").read_bytes()
    )
    assert pipeline.run(_config(manifest, out, variants=2)).done_before == 8  # default: kept
    again = pipeline.run(_config(manifest, out, variants=2, retry_failed=True))
    assert again.done_before == 4 and (again.ok, again.failed) == (6, 2)
    df = _table(out)
    assert len(df) == 8 and not df.duplicated(["image_id", "variant"]).any()
    assert set(df[df.status == "failed"].image_id) == {"corrupt"}


def test_parquet_manifest_with_limit_does_the_first_rows_then_the_rest_once(ray_cluster, tmp_path):
    import pandas as pd

    frame = pd.read_csv(write_inputs(tmp_path / "in", n_good=4, broken=False, size=320))
    manifest = tmp_path / "in" / "manifest.parquet"
    frame.astype({"grade": "int64"}).to_parquet(manifest, index=False)
    out = tmp_path / "out"
    first = pipeline.run(_config(manifest, out, variants=2, limit=2))
    assert (first.rows_in, first.done_before, first.ok, first.failed) == (4, 0, 4, 0)
    assert sorted(_table(out).image_id.unique()) == ["img_0000", "img_0001"]
    rest = pipeline.run(_config(manifest, out, variants=2))
    assert (rest.rows_in, rest.done_before, rest.ok) == (8, 4, 8) and rest.complete
    df = _table(out)
    assert len(df) == 8 and not df.duplicated(["image_id", "variant"]).any()
    grades = df.groupby("image_id").grade.first().to_dict()
    assert grades == {f"img_{i:04d}": i % 5 for i in range(4)}
    assert verify(str(out), str(manifest)).ok


def test_pass_through_columns_keep_the_first_runs_types_so_pandas_reads_the_folder(
    ray_cluster, tmp_path
):
    """pyarrow and pandas take a folder's columns and types from its first shard: a later
    manifest whose column is empty (type null) is written in the folder's type, and one that
    adds a column, or fills a column the folder holds as null, is refused before any work."""
    import pandas as pd

    from fundus_batch.run_settings import SettingsMismatchError

    frame = pd.read_csv(write_inputs(tmp_path / "in", n_good=4, broken=False, size=320))
    graded, later = tmp_path / "graded.parquet", tmp_path / "later.parquet"
    frame.head(2).astype({"grade": "int64"}).to_parquet(graded, index=False)
    frame.assign(grade=None).to_parquet(later, index=False)  # type null: no value in any row
    out = tmp_path / "out"
    pipeline.run(_config(graded, out, variants=1))
    assert pipeline.run(_config(later, out, variants=1)).ok == 4
    types = {pq.read_schema(p).field("grade").type for p in (out / "pairs").glob("*.parquet")}
    assert types == {pa.int64()}
    read = pd.read_parquet(out / "pairs")
    assert read.set_index("image_id").grade.fillna(-1).to_dict() == {
        "img_0000": 0,
        "img_0001": 1,
        "img_0002": -1,
        "img_0003": -1,
    }
    sited = tmp_path / "sited.parquet"
    frame.assign(site="a").to_parquet(sited, index=False)
    with pytest.raises(SettingsMismatchError, match="'site' is new"):
        pipeline.run(_config(sited, out, variants=1))
    empty_first = tmp_path / "out2"
    pipeline.run(_config(later, empty_first, variants=1, limit=1))
    with pytest.raises(SettingsMismatchError, match="'grade': empty in every row so far"):
        pipeline.run(_config(graded, empty_first, variants=1))
    assert len(pd.read_parquet(empty_first / "pairs")) == 1


def test_a_run_over_the_first_images_leaves_the_other_images_rows_and_the_record_alone(
    ray_cluster, tmp_path
):
    manifest = write_inputs(tmp_path / "in", n_good=2, broken=True, size=320)
    out = tmp_path / "out"
    full = pipeline.run(_config(manifest, out, variants=1, size=128))
    assert (full.ok, full.failed) == (2, 2)
    record = (out / "run.json").read_bytes()

    # nothing to do for the first image: complete, and run.json still describes the full run
    subset = pipeline.run(_config(manifest, out, variants=1, size=128, limit=1))
    assert subset.complete and (subset.rows_in, subset.ok, subset.failed) == (1, 1, 0)
    assert (out / "run.json").read_bytes() == record

    # failed rows of images after the limit are not dropped (only this run's are redone)
    retried = pipeline.run(_config(manifest, out, variants=1, size=128, limit=1, retry_failed=True))
    assert retried.complete and len(_table(out)) == 4
    assert set(_table(out).query("status == 'failed'").image_id) == {"corrupt", "missing"}

    # enhancement added over the first image only: the other images' rows stay as they were
    before = _table(out).set_index("image_id")
    enh = {"enabled": True, "enhancer": "classical"}
    added = pipeline.run(_config(manifest, out, variants=1, size=128, limit=1, enhance=enh))
    assert added.complete and (added.rows_in, added.ok) == (1, 1)
    after = _table(out).set_index("image_id")
    assert sorted(after.index) == sorted(before.index)
    assert after.enhanced_uri.notna().to_dict() == {
        "img_0000": True,
        "img_0001": False,
        "corrupt": False,
        "missing": False,
    }
    assert after.loc["img_0001", "row_sha256"] == before.loc["img_0001", "row_sha256"]
    report = verify(str(out), str(manifest))
    assert report.missing_rows == 0 and report.unexpected_rows == 0
    assert report.problems == ["'img_0001' variant 0: ok row without enhanced_uri"]
    assert any("--limit 1" in note for note in report.notes)


def test_a_run_that_stops_with_an_error_says_so_in_run_json(tmp_path: Path) -> None:
    """CUDA asked of a private local instance without a GPU: refused once Ray has started,
    after run.json was written; the record says the run failed, and why, not running. In a
    process of its own, so that the private instance is the run's own."""
    import os
    import subprocess
    import sys

    manifest = write_inputs(tmp_path / "in", n_good=1, broken=False, size=320)
    config = {
        "manifest": str(manifest),
        "out": str(tmp_path / "out"),
        "progress": False,
        "enhance": {"enabled": True, "device": "cuda"},
        "ray": {"num_cpus": 1, "num_gpus": 0},
    }
    code = (
        "import json, sys\n"
        "from fundus_batch import pipeline\n"
        "from fundus_batch.config import ConfigError, build_config\n"
        "try:\n"
        "    pipeline.run(build_config(json.loads(sys.argv[1]), 'test'))\n"
        "except ConfigError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "REFUSED" in done.stdout and "no GPU" in done.stdout, done.stdout + done.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["state"] == "failed" and "cuda" in record["error"], record
    assert record["history"][-1]["state"] == "failed" and record["finished"]
