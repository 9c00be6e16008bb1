"""verify() on real pipeline output: passes on a fresh run, names every kind of damage."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fundus_batch import pipeline
from fundus_batch.config import build_config
from fundus_batch.io.codecs import decode_image, encode_png
from fundus_batch.verify import VerifyReport, repair, verify
from tests.pipeline_inputs import write_inputs

VARIANTS = 2
N_GOOD = 3


def _config(manifest: Path, out: Path, **extra):
    data = {
        "manifest": str(manifest),
        "out": str(out),
        "variants": VARIANTS,
        "size": 128,
        "shard_rows": 4,
        "progress": False,
        "ray": {"rows_per_block": 2},
    }
    data.update(extra)
    return build_config(data, "test")


@pytest.fixture(scope="module")
def pristine(ray_cluster, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(manifest, out, backup): one pairs run with good, corrupt and missing inputs."""
    root = tmp_path_factory.mktemp("verify")
    manifest = write_inputs(root / "in", n_good=N_GOOD, size=256)
    out = root / "out"
    summary = pipeline.run(_config(manifest, out))
    assert summary.complete and summary.ok == N_GOOD * VARIANTS and summary.failed == 2 * VARIANTS
    backup = root / "backup"
    shutil.copytree(out, backup)
    return manifest, out, backup


@pytest.fixture
def run_out(pristine) -> tuple[Path, Path]:
    """(manifest, out) with ``out`` restored to the pristine run (damage is done in place and
    undone here)."""
    manifest, out, backup = pristine
    shutil.rmtree(out)
    shutil.copytree(backup, out)
    return manifest, out


def _rows(out: Path):
    return pq.read_table(str(out / "pairs")).to_pandas()


def _ok_row(out: Path, index: int = 0):
    ok = _rows(out)
    ok = ok[ok.status == "ok"].sort_values(["image_id", "variant"])
    return ok.iloc[index]


def _problems_about(report: VerifyReport, *words: str) -> list[str]:
    return [p for p in report.problems if all(w in p for w in words)]


def test_fresh_pipeline_output_verifies_with_full_counts(run_out) -> None:
    manifest, out = run_out
    report = verify(str(out), str(manifest))
    assert report.ok, report.summary()
    n_images = N_GOOD + 2
    assert report.expected_rows == report.rows == n_images * VARIANTS
    assert (report.rows_ok, report.rows_failed) == (N_GOOD * VARIANTS, 2 * VARIANTS)
    # clean + mask per image, one degraded file per variant
    assert report.files_checked == N_GOOD * (2 + VARIANTS)
    assert report.mode == "pairs" and report.variants == VARIANTS
    text = report.summary()
    assert "OK" in text and f"rows {report.rows}" in text


def test_removed_image_file_is_named(run_out) -> None:
    manifest, out = run_out
    row = _ok_row(out)
    (out / row.degraded_uri).unlink()
    report = verify(str(out), str(manifest))
    assert not report.ok
    assert _problems_about(report, repr(row.image_id), f"variant {row.variant}", "missing")
    assert report.bad_files == 1 and "FAILED" in report.summary()


def test_changed_bytes_that_still_decode_fail_the_sha256_check(run_out) -> None:
    manifest, out = run_out
    row = _ok_row(out, 1)
    image = decode_image((out / row.degraded_uri).read_bytes()).copy()
    image[0, 0] ^= 1  # one pixel, still a valid PNG of the right size
    (out / row.degraded_uri).write_bytes(encode_png(image))
    report = verify(str(out), str(manifest))
    found = _problems_about(report, repr(row.image_id), f"variant {row.variant}", "sha256")
    assert len(found) == 1 and "degraded" in found[0]
    assert len(report.problems) == 1, report.problems


def test_truncated_shared_clean_file_is_named_for_every_variant_using_it(run_out) -> None:
    manifest, out = run_out
    row = _ok_row(out)
    data = (out / row.clean_uri).read_bytes()
    (out / row.clean_uri).write_bytes(data[: len(data) // 2])
    report = verify(str(out), str(manifest))
    for variant in range(VARIANTS):
        assert _problems_about(report, repr(row.image_id), f"variant {variant}", "decode")
        assert _problems_about(report, repr(row.image_id), f"variant {variant}", "sha256")


def test_a_row_copied_into_an_extra_shard_is_a_duplicate(run_out) -> None:
    manifest, out = run_out
    table = pq.read_table(str(out / "pairs"))
    ok = table.filter(pc.equal(table["status"], "ok"))
    pq.write_table(ok.slice(0, 1), out / "pairs" / "part-extra-00000.parquet")
    image_id, variant = ok["image_id"][0].as_py(), ok["variant"][0].as_py()
    report = verify(str(out), str(manifest))
    assert report.duplicate_rows == 1
    assert _problems_about(report, repr(image_id), f"variant {variant}", "duplicate")


def _drop_rows(out: Path, image_id: str, variant: int | None = None) -> None:
    """Rewrite every shard without the rows of ``image_id`` (one variant, or all)."""
    for path in sorted((out / "pairs").glob("*.parquet")):
        table = pq.read_table(path)
        drop = pc.equal(table["image_id"], image_id)
        if variant is not None:
            drop = pc.and_(drop, pc.equal(table["variant"], variant))
        pq.write_table(table.filter(pc.invert(drop)), path)


def test_an_image_missing_from_the_output_is_found_through_the_manifest(run_out) -> None:
    manifest, out = run_out
    _drop_rows(out, "img_0001")
    assert verify(str(out)).ok  # without the manifest nothing says the image should be there
    report = verify(str(out), str(manifest))
    assert report.missing_rows == VARIANTS
    for variant in range(VARIANTS):
        assert _problems_about(report, "'img_0001'", f"variant {variant}", "no row")


def test_after_a_limit_run_images_an_earlier_complete_run_made_are_still_checked(
    run_out,
) -> None:
    """A full run, then a --limit 2 run that redid a row: the last run's limit does not hide
    the rows missing beyond it, which the first run had written."""
    manifest, out = run_out
    _drop_rows(out, "img_0000", variant=0)
    _drop_rows(out, "img_0002")
    summary = pipeline.run(_config(manifest, out, limit=2))
    assert summary.complete and summary.done_before == 2 * VARIANTS - 1
    assert json.loads((out / "run.json").read_text())["config"]["limit"] == 2
    report = verify(str(out), str(manifest))
    assert report.missing_rows == VARIANTS, report.problems
    assert _problems_about(report, "'img_0002'", "no row")


def test_a_missing_variant_is_found_even_without_the_manifest(run_out) -> None:
    _, out = run_out
    _drop_rows(out, "img_0002", variant=1)
    report = verify(str(out))
    assert report.missing_rows == 1
    assert _problems_about(report, "'img_0002'", "variant 1", "no row")


def test_rows_for_images_outside_the_manifest_are_reported(run_out, tmp_path: Path) -> None:
    manifest, out = run_out
    lines = manifest.read_text().splitlines()
    smaller = tmp_path / "smaller.csv"
    smaller.write_text("\n".join(line for line in lines if "img_0000" not in line) + "\n")
    report = verify(str(out), str(smaller))
    assert report.unexpected_rows == VARIANTS
    assert _problems_about(report, "'img_0000'", "not in the manifest")


def test_an_unfinished_run_and_a_row_without_status_fail(run_out) -> None:
    manifest, out = run_out
    info = json.loads((out / "run.json").read_text())
    info["state"] = "running"
    (out / "run.json").write_text(json.dumps(info))
    path = sorted((out / "pairs").glob("*.parquet"))[0]
    table = pq.read_table(path)
    status = table["status"].to_pylist()
    status[0] = None
    column = pa.array(status, pa.string())
    table = table.set_column(table.schema.get_field_index("status"), "status", column)
    pq.write_table(table, path)
    report = verify(str(out), str(manifest))
    assert _problems_about(report, "run.json", "'running'")
    assert _problems_about(report, repr(table["image_id"][0].as_py()), "status is None")


def test_score_mode_output_has_one_row_per_image_with_a_null_variant(pristine, tmp_path) -> None:
    manifest, _, _ = pristine
    out = tmp_path / "score"
    summary = pipeline.run(_config(manifest, out, mode="score"))
    assert summary.rows_in == N_GOOD + 2
    report = verify(str(out), str(manifest))
    assert report.ok, report.summary()
    assert report.mode == "score" and report.variants is None
    assert report.expected_rows == report.rows == N_GOOD + 2
    assert report.files_checked == 2 * N_GOOD  # clean + mask, no degraded file


def test_an_empty_folder_is_not_a_verified_output(tmp_path: Path) -> None:
    report = verify(str(tmp_path))
    assert not report.ok
    assert _problems_about(report, "run.json", "missing")
    assert _problems_about(report, "no readable Parquet shard")


def test_variants_beyond_the_last_runs_count_are_a_note_not_a_problem(run_out) -> None:
    manifest, out = run_out
    info = json.loads((out / "run.json").read_text())
    info["config"]["variants"] = 1  # as after a later run that asked for fewer variants
    (out / "run.json").write_text(json.dumps(info))
    report = verify(str(out), str(manifest))
    assert report.ok, report.summary()
    assert report.expected_rows == N_GOOD + 2
    assert any("beyond" in n for n in report.notes) and "note:" in report.summary()


# -- tampering with row values, URIs outside OUT, moved and copied outputs, --deep


def _edit_ok_row(out: Path, edit, *, rechecksum: bool = False) -> tuple[str, int]:
    """Apply ``edit(row_dict)`` to the first ok row of the first shard holding one; with
    ``rechecksum`` the row's ``row_sha256`` is recomputed, as a tamperer who knows the scheme
    would. Returns the row's (image_id, variant)."""
    from fundus_batch.schema import ROW_CHECKSUM, row_checksum

    for path in sorted((out / "pairs").glob("*.parquet")):
        table = pq.read_table(path)
        rows = table.to_pylist()
        index = next((i for i, r in enumerate(rows) if r["status"] == "ok"), None)
        if index is None:
            continue
        edit(rows[index])
        if rechecksum:
            rows[index][ROW_CHECKSUM] = row_checksum(rows[index])
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
        return rows[index]["image_id"], rows[index]["variant"]
    raise AssertionError("no ok row")


def _checksum_problems(report: VerifyReport, image_id: str, variant: int) -> list[str]:
    return _problems_about(report, repr(image_id), f"variant {variant}", "row_sha256")


def test_a_changed_metric_value_fails_the_row_checksum(run_out) -> None:
    manifest, out = run_out
    image_id, variant = _edit_ok_row(out, lambda r: r.update(psnr_degraded=r["psnr_degraded"] + 3))
    report = verify(str(out), str(manifest))
    assert len(_checksum_problems(report, image_id, variant)) == 1, report.problems


def test_a_changed_seed_and_params_json_fail_the_row_checksum(run_out) -> None:
    manifest, out = run_out

    def edit(row: dict) -> None:
        row["seed"] = row["seed"] + 1
        row["params_json"] = json.dumps(json.loads(row["params_json"]), indent=1)

    image_id, variant = _edit_ok_row(out, edit)
    report = verify(str(out), str(manifest))
    assert _checksum_problems(report, image_id, variant), report.problems


def test_a_row_flipped_to_failed_fails_the_row_checksum(run_out) -> None:
    manifest, out = run_out
    image_id, variant = _edit_ok_row(
        out, lambda r: r.update(status="failed", failed_stage="degrade", error="ValueError: x")
    )
    report = verify(str(out), str(manifest))
    assert report.rows_failed == 2 * VARIANTS + 1
    assert _checksum_problems(report, image_id, variant), report.problems


def test_a_uri_into_another_folder_is_rejected_even_with_a_matching_checksum(
    run_out, tmp_path: Path
) -> None:
    manifest, out = run_out
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def edit(row: dict) -> None:
        target = elsewhere / "v.png"
        shutil.copy(out / row["degraded_uri"], target)  # same bytes, same sha256
        row["degraded_uri"] = str(target)

    image_id, variant = _edit_ok_row(out, edit, rechecksum=True)
    report = verify(str(out), str(manifest))
    found = _problems_about(report, repr(image_id), f"variant {variant}", "outside the output")
    assert len(found) == 1 and "degraded_uri" in found[0], report.problems


def test_a_relative_uri_climbing_out_with_dotdot_is_rejected(run_out) -> None:
    manifest, out = run_out
    image_id, variant = _edit_ok_row(
        out, lambda r: r.update(degraded_uri="../backup/" + r["degraded_uri"]), rechecksum=True
    )
    report = verify(str(out), str(manifest))
    assert _problems_about(report, repr(image_id), f"variant {variant}", "'..'"), report.problems


def test_a_moved_output_folder_verifies(run_out, tmp_path: Path) -> None:
    manifest, out = run_out
    moved = tmp_path / "moved" / "out"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    try:
        report = verify(str(moved), str(manifest))
        assert report.ok, report.summary()
        assert report.files_checked == N_GOOD * (2 + VARIANTS)
    finally:
        shutil.move(str(moved), str(out))


def test_a_copied_output_folder_reads_its_own_files(run_out, tmp_path: Path) -> None:
    manifest, out = run_out
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    row = _ok_row(out)
    (out / row.degraded_uri).unlink()  # damage the original only
    assert verify(str(copy), str(manifest)).ok
    assert not verify(str(out), str(manifest)).ok
    (copy / row.degraded_uri).unlink()
    report = verify(str(copy), str(manifest))
    assert _problems_about(report, str(copy / row.degraded_uri), "missing"), report.problems


def test_deep_check_recomputes_every_row_of_a_fresh_output(run_out) -> None:
    manifest, out = run_out
    report = verify(str(out), str(manifest), deep=100)
    assert report.ok, report.summary()
    assert report.deep_checked == N_GOOD * VARIANTS
    assert "recomputed" in report.summary()


def test_deep_check_of_a_fresh_jpeg_output_reports_no_problem(ray_cluster, tmp_path) -> None:
    """JPEG degraded images (.jpg) are lossy: a replay matches them only to within the
    encoding error, which the deep check must allow for."""
    manifest = write_inputs(tmp_path / "in", n_good=1, broken=False, size=256)
    out = tmp_path / "out"
    summary = pipeline.run(_config(manifest, out, image_format="jpeg"))
    assert summary.complete and summary.ok == VARIANTS
    assert all(uri.endswith(".jpg") for uri in _rows(out).degraded_uri)
    report = verify(str(out), str(manifest), deep=VARIANTS)
    assert report.ok, report.summary()
    assert report.deep_checked == VARIANTS


def test_deep_check_catches_a_metric_changed_with_its_checksum_recomputed(run_out) -> None:
    manifest, out = run_out
    image_id, variant = _edit_ok_row(
        out, lambda r: r.update(ssim_degraded=r["ssim_degraded"] * 0.9), rechecksum=True
    )
    assert verify(str(out), str(manifest)).ok  # the checksum alone cannot see it
    report = verify(str(out), str(manifest), deep=100)
    found = _problems_about(report, repr(image_id), f"variant {variant}", "ssim_degraded")
    assert len(found) == 1 and "recomputed" in found[0], report.problems


def test_deep_check_catches_a_seed_and_params_json_changed_with_their_checksum(run_out) -> None:
    from fundus_batch.degrade import degrade, sample_rng
    from fundus_batch.imaging import decode_mask
    from fundus_batch.io.codecs import decode_image as dec

    manifest, out = run_out

    def edit(row: dict) -> None:
        clean = dec((out / row["clean_uri"]).read_bytes())
        mask = decode_mask((out / row["mask_uri"]).read_bytes())
        rng = sample_rng(row["seed"] + 7, row["image_id"], row["variant"])
        _, record = degrade(clean, mask, row["type_code"], rng, preset=row["preset"])
        row["seed"] += 7  # a consistent story: the params of another seed
        row["params_json"] = record.to_json()

    image_id, variant = _edit_ok_row(out, edit, rechecksum=True)
    report = verify(str(out), str(manifest), deep=100)
    found = _problems_about(report, repr(image_id), f"variant {variant}", "replayed")
    assert len(found) == 1, report.problems


def test_rows_with_absolute_uris_from_older_versions_still_verify(run_out) -> None:
    from fundus_batch.schema import ROW_CHECKSUM, row_checksum

    manifest, out = run_out
    for path in sorted((out / "pairs").glob("*.parquet")):
        table = pq.read_table(path)
        rows = table.to_pylist()
        for row in rows:
            for role in ("clean", "mask", "degraded"):
                if row[f"{role}_uri"]:
                    row[f"{role}_uri"] = str(out / row[f"{role}_uri"])
            row[ROW_CHECKSUM] = row_checksum(row)
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    report = verify(str(out), str(manifest), deep=2)
    assert report.ok, report.summary()


def test_shards_from_before_row_checksums_are_a_note_and_a_blanked_checksum_is_a_problem(
    run_out,
) -> None:
    manifest, out = run_out
    first, *_ = sorted((out / "pairs").glob("*.parquet"))
    table = pq.read_table(first)
    blanked = table.set_column(
        table.schema.get_field_index("row_sha256"),
        "row_sha256",
        pa.nulls(table.num_rows, pa.string()),
    )
    pq.write_table(blanked, first)
    report = verify(str(out), str(manifest))
    assert len(_problems_about(report, "row has no row_sha256")) == table.num_rows
    pq.write_table(table.drop_columns(["row_sha256"]), first)  # as an older version wrote it
    report = verify(str(out), str(manifest))
    assert report.ok, report.summary()
    assert any(f"{table.num_rows} row(s) from 1 shard(s)" in n for n in report.notes)


def test_the_legacy_note_counts_every_shard_written_before_row_checksums(run_out) -> None:
    manifest, out = run_out
    paths = sorted((out / "pairs").glob("*.parquet"))
    assert len(paths) > 1
    for path in paths:
        pq.write_table(pq.read_table(path).drop_columns(["row_sha256"]), path)
    report = verify(str(out), str(manifest))
    assert report.ok, report.summary()
    assert any(f"from {len(paths)} shard(s) written before" in n for n in report.notes), report


def test_a_column_typed_differently_by_two_runs_passes_each_shards_checksums(run_out) -> None:
    """One run's manifest gave ``grade`` as integers, a later one's as floats: each shard's
    rows still match the checksums their writer computed (combining the shards first would
    turn 2 into 2.0 and flag every row of the integer shard as edited)."""
    from fundus_batch.schema import with_row_checksums

    manifest, out = run_out
    first, *later = sorted((out / "pairs").glob("*.parquet"))
    assert later
    for path, kind in [(first, pa.int64())] + [(p, pa.float64()) for p in later]:
        table = pq.read_table(path)
        grade = table.schema.get_field_index("grade")
        values = pa.array([int(v) for v in table.column(grade).to_pylist()], kind)
        pq.write_table(with_row_checksums(table.set_column(grade, "grade", values)), path)
    report = verify(str(out), str(manifest), deep=2)
    assert report.ok, report.summary()
    assert report.deep_checked == 2


def test_image_folders_or_files_swapped_for_links_to_elsewhere_are_rejected(
    run_out, tmp_path: Path
) -> None:
    manifest, out = run_out
    row = _ok_row(out)
    folder = out / "images" / row.image_id
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(folder), str(elsewhere))  # same bytes, now outside OUT
    folder.symlink_to(elsewhere, target_is_directory=True)
    report = verify(str(out), str(manifest), deep=100)
    found = _problems_about(report, repr(row.image_id), "symbolic link")
    assert len(found) == VARIANTS * 3, report.problems  # clean, mask, degraded of each variant
    folder.unlink()
    shutil.move(str(elsewhere), str(folder))
    degraded = out / row.degraded_uri
    outside = tmp_path / "degraded.png"
    shutil.move(str(degraded), str(outside))
    degraded.symlink_to(outside)
    report = verify(str(out), str(manifest))
    found = _problems_about(report, repr(row.image_id), "symbolic link")
    assert len(found) == 1 and "degraded_uri" in found[0], report.problems


def test_deep_check_catches_a_forged_row_that_drops_its_record(run_out) -> None:
    from fundus_batch.schema import ROW_CHECKSUM, row_checksum

    manifest, out = run_out

    def forge(row: dict) -> None:  # paint the degraded image, then hide what would replay it
        path = out / row["degraded_uri"]
        image = decode_image(path.read_bytes()).copy()
        image[:50, :50] = 255
        data = encode_png(image)
        path.write_bytes(data)
        row["degraded_sha256"] = hashlib.sha256(data).hexdigest()
        row["params_json"] = row["metric_version"] = None
        row[ROW_CHECKSUM] = row_checksum(row)

    image_id, variant = _edit_ok_row(out, forge)
    report = verify(str(out), str(manifest), deep=100)
    found = _problems_about(report, repr(image_id), f"variant {variant}", "deep check: an ok row")
    assert len(found) == 1 and "params_json" in found[0] and "metric_version" in found[0]
    # Every row, not only the sampled ones: a folder scored throughout has metrics in each.
    unscored = _problems_about(report, repr(image_id), f"variant {variant}", "without metrics")
    assert len(unscored) == 1


def test_deep_check_catches_a_seed_the_folders_settings_do_not_have(run_out) -> None:
    manifest, out = run_out
    image_id, variant = _edit_ok_row(out, lambda r: r.update(seed=r["seed"] + 7), rechecksum=True)
    report = verify(str(out), str(manifest), deep=100)
    found = _problems_about(report, repr(image_id), f"variant {variant}", "the folder's is")
    assert len(found) == 1 and "deep check: seed" in found[0]


def test_repair_with_nothing_to_remove_leaves_run_json_as_it_was(run_out) -> None:
    _, out = run_out
    before = (out / "run.json").read_bytes()
    assert repair(str(out)).duplicates_removed == 0
    assert (out / "run.json").read_bytes() == before


def test_repair_refuses_a_pairs_folder_that_links_out_of_out(run_out, tmp_path: Path) -> None:
    from fundus_batch.outpaths import OutsideOutError

    _, out = run_out
    outside = tmp_path / "elsewhere"
    shutil.move(out / "pairs", outside)
    (out / "pairs").symlink_to(outside, target_is_directory=True)
    shards_before = sorted(p.name for p in outside.iterdir())
    with pytest.raises(OutsideOutError):
        repair(str(out))
    assert sorted(p.name for p in outside.iterdir()) == shards_before


def test_shards_whose_columns_disagree_are_a_problem_not_a_crash(run_out) -> None:
    manifest, out = run_out
    [first, *_] = sorted((out / "pairs").glob("*.parquet"))
    table = pq.read_table(first)
    grade = table.schema.get_field_index("grade")
    # the manifest of a later run gave the pass-through column another type
    as_number = pa.array([int(v) for v in table.column(grade).to_pylist()], pa.int64())
    pq.write_table(table.set_column(grade, "grade", as_number), first)
    report = verify(str(out), str(manifest))
    assert not report.ok and _problems_about(report, "columns do not agree")


def test_a_redrawn_record_may_differ_from_the_recorded_one_only_in_the_last_bits() -> None:
    """A hole's fov_mean is computed from the image and differs in its last bit between numpy
    and OpenCV builds: the deep check must not call that tampering, but must see a real change."""
    import math

    from fundus_batch.degrade import degrade, sample_rng
    from fundus_batch.synth import synth_fundus
    from fundus_batch.verify import _same_record

    s = synth_fundus(128, seed=3)
    _, record = degrade(s.image, s.mask, "001", sample_rng(0, "a", 0))
    recorded = record.to_dict()
    assert recorded["hole"] is not None
    fov_mean = recorded["hole"]["fov_mean"]
    last_bit = {**recorded, "hole": {**recorded["hole"], "fov_mean": math.nextafter(fov_mean, 2)}}
    assert _same_record(last_bit, recorded)
    moved = {**recorded, "hole": {**recorded["hole"], "fov_mean": fov_mean * (1 + 1e-6)}}
    assert not _same_record(moved, recorded)
    other_centre = {**recorded, "hole": {**recorded["hole"], "center": [0, 0]}}
    assert not _same_record(other_centre, recorded)
    assert not _same_record({**recorded, "type_code": "011"}, recorded)


def test_a_folder_with_no_shard_is_reported_as_such_and_a_path_is_accepted(tmp_path: Path) -> None:
    report = verify(tmp_path / "nothing")  # a pathlib.Path, as a notebook user passes it
    assert not report.ok
    assert report.problems[:2] == [
        "run.json is missing: not a fundus_batch output folder, or never started",
        f"no readable Parquet shard under {tmp_path / 'nothing' / 'pairs'}",
    ]
