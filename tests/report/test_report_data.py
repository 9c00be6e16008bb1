"""Loading and aggregation of the report: known rows in, the numbers each section shows out."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fundus_batch.fidelity import FIDELITY_COLUMNS
from fundus_batch.output import OutputStore, ShardWriter
from fundus_batch.report import data as data_module
from fundus_batch.report.data import (
    REPORT_COLUMNS,
    Loaded,
    aggregate,
    downstream,
    failures,
    load,
    throughput,
)
from fundus_batch.report.formatting import fmt
from fundus_batch.schema import output_schema, to_table
from tests.report.report_rows import PSNR, enhance_rows, failed_row, loaded, ok_rows, run_json

SECRET = "hunter2-do-not-print"


def test_full_reference_table_holds_the_mean_per_type_and_over_all_types():
    data = aggregate(loaded(ok_rows()))
    table = data.metrics.full_reference
    assert table is not None
    cols = [(c.metric, c.sub) for c in table.columns]
    assert cols == [
        ("psnr", "degraded"),
        ("psnr", "enhanced"),
        ("ssim", "degraded"),
        ("ssim", "enhanced"),
    ]
    by_label = {r.label[:3]: r for r in table.rows}
    for code, (degraded, enhanced) in PSNR.items():
        row = by_label[code]
        assert row.n == 2 and not row.bold
        assert row.values[0] == pytest.approx(np.mean(degraded))
        assert row.values[1] == pytest.approx(np.mean(enhanced))
    everything = table.rows[-1]
    assert everything.label == "all types" and everything.bold and everything.n == 6
    all_degraded = [v for d, _ in PSNR.values() for v in d]
    assert everything.values[0] == pytest.approx(np.mean(all_degraded))


def test_models_are_told_apart_by_their_weights_not_their_names() -> None:
    """A folder enhanced by one file under two names (the shipped name meant v2 then), or by
    two files under one name, says so."""
    from fundus_batch.report.data import _model_labels

    frame = pd.DataFrame(
        {
            "model_name": ["small", "small", "small-v2", "other"],
            "model_sha256": ["03900cbd11", "03900cbd11", "03900cbd11", "29b4a70422"],
        }
    )
    assert _model_labels(frame) == ["other (29b4a704)", "small, small-v2 (03900cbd)"]
    assert _model_labels(frame.iloc[:2]) == ["small"]
    renamed = pd.DataFrame({"model_name": ["small", "small"], "model_sha256": ["aa", "bb"]})
    assert _model_labels(renamed) == ["small (aa)", "small (bb)"]


def test_every_type_where_enhancement_lowered_psnr_is_flagged_in_summary_and_metrics():
    data = aggregate(loaded(ok_rows()))
    # Only 010 lost PSNR (30 -> 29 dB); SSIM rose everywhere.
    assert data.metrics.warnings == ["WARNING enhancement lowered PSNR on 010 (-1.00 dB)"]
    enhancement = data.summary.enhancement
    assert enhancement is not None and enhancement.warnings == data.metrics.warnings


def test_summary_states_each_device_the_model_ran_on_with_row_counts():
    rows = ok_rows("cuda")
    rows[0]["enhance_device"] = rows[1]["enhance_device"] = "cpu"
    enhancement = aggregate(loaded(rows)).summary.enhancement
    assert enhancement is not None
    assert enhancement.models == ["tiny-model"]
    assert enhancement.devices == [("cuda", 4), ("cpu", 2)]


def test_summary_records_no_device_for_outputs_written_before_it_was_recorded():
    enhancement = aggregate(loaded(ok_rows(device=None))).summary.enhancement
    assert enhancement is not None and enhancement.devices == []


def test_summary_without_enhanced_rows_has_no_enhancement_line():
    rows = [{k: v for k, v in r.items() if "enhance" not in k} for r in ok_rows()]
    assert aggregate(loaded(rows)).summary.enhancement is None


def test_summary_accounts_for_planned_rows_and_notes_disagreement_with_the_parquet():
    rows = [*ok_rows(), failed_row("gone", "fetch", "FileNotFoundError: gone.jpg")]
    summary = aggregate(loaded(rows, run_json(6, 1))).summary
    assert summary.accounted == (7, 6, 1) and summary.disagreement is None
    summary = aggregate(loaded(rows, run_json(5, 2))).summary
    assert summary.disagreement == (6, 1, 5, 2)


def test_summary_from_parquet_only_counts_rows_itself():
    summary = aggregate(loaded(ok_rows())).summary
    assert summary.run_json_missing and summary.state == "unknown (no run.json)"
    assert dict(summary.cards)["ok"] == "6" and dict(summary.cards)["source images"] == "2"


def test_a_classical_run_shows_its_enhancer_and_no_cofenet_settings():
    run = run_json(6, 0)
    run["config"]["enhance"] = {
        "enabled": True,
        "enhancer": "classical",
        "weights": "fundus-cofenet-small",
        "device": "auto",
    }
    settings = {s.label: s.value for s in aggregate(loaded(ok_rows(), run)).summary.config}
    assert settings["enhance"] == "enhancer=classical"


def test_config_shows_listed_keys_only_and_no_storage_options():
    run = run_json(6, 0)
    run["config"]["storage_options"] = {"secret": SECRET}
    run["config"]["enhance"] = {"enabled": True, "device": "auto", "weights": None}
    settings = {s.label: s.value for s in aggregate(loaded(ok_rows(), run)).summary.config}
    assert settings["types"] == "001, 010, 111"
    assert settings["enhance"] == "device=auto"
    run["config"]["enhance"] = {"enabled": True, "enhancer": "cofenet", "weights": "w"}
    settings = {s.label: s.value for s in aggregate(loaded(ok_rows(), run)).summary.config}
    assert settings["enhance"] == "enhancer=cofenet, weights=w"
    assert "storage_options" not in settings and SECRET not in repr(settings)
    run["config"]["enhance"] = {"enabled": False, "device": "auto", "weights": "w"}
    settings = {s.label: s.value for s in aggregate(loaded(ok_rows(), run)).summary.config}
    assert settings["enhance"] == "off"


def test_enhance_run_calls_its_images_input_and_hides_the_degradation_settings():
    run = run_json(2, 0)
    run["config"] = {"mode": "enhance", "preset": "cofe-release", "variants": 7, "seed": 0}
    run["config"] |= {"types": ["001"], "type_mode": "cycle", "size": 512}
    data = aggregate(loaded(enhance_rows(), run))
    assert data.input_label == "input"
    assert {s.label for s in data.summary.config} == {"mode", "size"}
    assert data.summary.enhancement is not None
    assert data.summary.enhancement.notes == ["NOTE enhancement left 1 of 2 images unchanged"]
    table = data.metrics.no_reference
    assert table is not None and table.rows[0].label == "input"
    assert table.rows[0].values[0] == pytest.approx(60.5)
    (plot,) = [p for p in data.metrics.plots if p.key == "nr_luminance"]
    assert plot.groups == ["input", "none"] and plot.series == ["input", "enhanced"]
    assert plot.values[("input", "input")] == [60.0, 61.0]


def test_pairs_run_keeps_clean_and_the_degradation_settings():
    data = aggregate(loaded(ok_rows(), run_json(6, 0)))
    assert data.input_label == "clean"
    assert {"variants", "types"} <= {s.label for s in data.summary.config}
    table = data.metrics.no_reference
    assert table is not None and table.rows[0].label == "clean"


def test_output_without_run_json_is_a_pairs_output_only_when_it_has_degraded_images():
    assert loaded(ok_rows()).pairs
    assert not loaded(enhance_rows()).pairs


def test_failures_grouped_by_stage_order_then_size_with_ids_and_messages_cut():
    long = "RuntimeError: " + "x" * 400
    rows = [failed_row(f"id{i}", "fetch", f"FileNotFoundError: f{i}") for i in range(7)]
    rows += [failed_row("big", "enhance", long, variant=v) for v in range(2)]
    rows += [failed_row("bad", "preprocess", f"DecodeError: s3://AKIAABCDEFGHIJKLMNOP:{SECRET}@b")]
    result = failures(loaded(rows))
    assert (result.rows, result.images) == (10, 9)
    assert result.by_stage == "fetch: 7, preprocess: 1, enhance: 2"
    assert [(g.stage, g.kind, g.rows, g.images) for g in result.groups] == [
        ("fetch", "FileNotFoundError", 7, 7),
        ("preprocess", "DecodeError", 1, 1),
        ("enhance", "RuntimeError", 2, 1),
    ]
    assert result.groups[0].example_ids == "id0, id1, id2, id3, id4 … (+2)"
    assert len(result.groups[2].message) == 301 and result.groups[2].message.endswith("…")
    assert SECRET not in result.groups[1].message


def test_downstream_distinguishes_missing_empty_and_scored_vessel_columns():
    assert downstream(loaded(ok_rows())).status == "no_columns"
    rows = [{**r, "vessel_auc_degraded": None} for r in ok_rows()]
    assert downstream(loaded(rows)).status == "empty"
    auc = {"001": 0.7, "010": 0.9, "111": 0.88}
    rows = [
        {**r, "vessel_auc_degraded": auc[r["type_code"]], "vessel_auc_enhanced": 0.85}
        for r in ok_rows()
    ]
    result = downstream(loaded(rows))
    assert result.status == "table" and result.delta
    gains = {r.label[:3]: r.gain for r in result.table}
    assert gains["001"] == pytest.approx(0.15) and gains["010"] == pytest.approx(-0.05)
    assert result.worse == ["010", "111"]


def test_throughput_counts_per_image_stages_once_per_image_and_shares_sum_to_one():
    result = throughput(loaded(ok_rows(), run_json(6, 0)))
    facts = dict(result.facts)
    assert facts["rows / s"] == "1.50" and facts["source images / s"] == "0.50"
    stages = {s.stage: s for s in result.stages}
    assert stages["fetch"].timed == 2 and stages["fetch"].seconds == pytest.approx(2.0)
    assert stages["degrade"].timed == 6 and stages["degrade"].seconds == pytest.approx(3.0)
    assert sum(s.share for s in result.stages) == pytest.approx(1.0)


def _write_shard(out: str, rows: list[dict]) -> None:
    writer = ShardWriter(OutputStore(out), output_schema())
    writer.add(to_table(rows, output_schema()))
    writer.close()


def test_load_reads_shards_without_provenance_columns_and_fills_missing_types(tmp_path: Path):
    rows = ok_rows()
    rows[0] |= {"type_code": None, "clean_sha256": "ab" * 32, "params_json": "{}"}
    _write_shard(str(tmp_path), rows)
    result = load(str(tmp_path))
    assert result.run is None and len(result.frame) == len(rows)
    assert "clean_sha256" not in result.frame.columns
    assert "params_json" not in result.frame.columns
    assert result.types == ["001", "010", "111", "none"]


def test_load_of_an_empty_folder_names_it(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"nothing to report under .*no run\.json"):
        load(str(tmp_path))


def test_load_of_a_run_without_shards_gives_an_empty_frame(tmp_path: Path):
    OutputStore(str(tmp_path)).write_json("run.json", {"state": "running"})
    result = load(str(tmp_path))
    assert result.frame.empty and result.run == {"state": "running"}
    assert aggregate(result).metrics.has_rows is False


# ---------------------------------------------------------------------------- mean populations

INF = math.inf


def _identical_and_partly_enhanced() -> list[dict]:
    """Six blur rows: a is enhanced; b was not (enhancement added later, with --limit); c-f are
    identical to clean (PSNR ∞, SSIM 1), c alone enhanced."""
    psnr_d = [36.0, 40.0, INF, INF, INF, INF]
    psnr_e = [37.0, None, INF, None, None, None]
    ssim_d = [0.90, 0.99, 1.0, 1.0, 1.0, 1.0]
    ssim_e = [0.92, None, 1.0, None, None, None]
    return [
        {
            "image_id": iid,
            "variant": 0,
            "status": "ok",
            "type_code": "100",
            "degraded_uri": f"images/{iid}/d.png",
            "enhanced_uri": f"images/{iid}/e.png" if psnr_e[i] is not None else None,
            "psnr_degraded": psnr_d[i],
            "psnr_enhanced": psnr_e[i],
            "ssim_degraded": ssim_d[i],
            "ssim_enhanced": ssim_e[i],
            "nr_luminance_degraded": 80.0 + i,
            "nr_luminance_enhanced": 90.0 if psnr_e[i] is not None else None,
        }
        for i, iid in enumerate("abcdef")
    ]


def test_rows_identical_to_clean_are_counted_and_left_out_of_every_column_alike():
    data = aggregate(loaded(_identical_and_partly_enhanced(), run_json(6, 0)))
    table = data.metrics.full_reference
    assert table is not None and table.identical
    blur = table.rows[0]
    # Every column averages row a only: b lacks enhancement, c-f are identical (PSNR ∞).
    assert (blur.rows, blur.n, blur.identical) == (6, 1, 4)
    assert blur.values == pytest.approx([36.0, 37.0, 0.90, 0.92])
    assert "PSNR ∞" in table.note


def test_degraded_and_enhanced_means_pair_the_same_rows_and_show_no_loss_that_is_not_there():
    data = aggregate(loaded(_identical_and_partly_enhanced(), run_json(6, 0)))
    assert data.metrics.warnings == []  # the paired comparison sees no loss...
    table = data.metrics.full_reference
    assert table is not None
    degraded, enhanced = table.rows[0].values[:2]
    assert degraded is not None and enhanced is not None and enhanced >= degraded  # ...nor here
    nr = data.metrics.no_reference
    assert nr is not None and nr.partial
    rows = {r.label: r for r in nr.rows}
    deg, enh = rows["degraded · 100 · blur"], rows["enhanced · 100 · blur"]
    assert deg.n == enh.n == 2 and deg.rows == 6  # rows a and c, both roles
    assert deg.values[0] == pytest.approx(81.0) and enh.values[0] == pytest.approx(90.0)


def test_vessel_means_and_the_auc_gain_are_over_the_rows_scored_in_every_column():
    rows = ok_rows()
    for i, row in enumerate(rows):
        row["vessel_auc_degraded"] = 0.9 if i % 2 else 0.6
        row["vessel_auc_enhanced"] = 0.8 if i % 2 else None  # only odd rows were enhanced
    result = downstream(loaded(rows))
    assert result.partial
    everything = result.table[-1]
    assert (everything.rows, everything.n) == (6, 3)
    assert everything.values == pytest.approx([0.9, 0.8])
    assert everything.gain == pytest.approx(-0.1)


def test_psnr_plot_says_how_many_infinite_values_it_leaves_out():
    data = aggregate(loaded(_identical_and_partly_enhanced(), run_json(6, 0)))
    (psnr,) = [p for p in data.metrics.plots if p.key == "psnr"]
    assert psnr.values[("100", "degraded")] == [36.0, 40.0]
    assert psnr.note == "5 values of ∞ (image identical to clean) not drawn"


# ---------------------------------------------------------------------------- headline counts


def _limit_run() -> dict:
    """run.json of a later ``--limit 2`` run: its counts cover its own 6 rows only."""
    run = run_json(6, 0, manifest_rows=2)
    run["config"]["limit"] = 2
    return run


def test_headline_counts_the_parquet_and_run_json_counts_are_shown_as_the_last_runs():
    rows = [*ok_rows(), failed_row("gone", "fetch", "FileNotFoundError: gone.jpg")]
    rows.append(failed_row("gone", "fetch", "FileNotFoundError: gone.jpg", variant=1))
    summary = aggregate(loaded(rows, _limit_run())).summary
    cards = dict(summary.cards)
    assert (cards["rows"], cards["ok"], cards["failed"]) == ("8", "6", "2")
    assert summary.accounted is None  # no "every planned row is accounted for"
    assert summary.disagreement == (6, 2, 6, 0)
    last = summary.last_run
    assert last is not None and last.scope == "limit 2, 2 manifest rows"
    assert dict(last.facts)["ok"] == "6" and dict(last.facts)["failed"] == "0"
    assert (last.missing, last.beyond) == (0, 2)


def test_rows_run_json_counts_but_the_parquet_lost_are_reported_missing():
    summary = aggregate(loaded(ok_rows()[:4], run_json(6, 1))).summary
    assert dict(summary.cards)["ok"] == "4" and summary.accounted is None
    assert summary.last_run is not None and summary.last_run.missing == 3


# ---------------------------------------------------------------------------- this run's rate

OLD_SHARD = "part-20260101T000000-11-00000.parquet"
NEW_SHARD = "part-20260101T000105-22-00000.parquet"


def _resumed(shards: tuple[tuple[str, int], ...]) -> Loaded:
    """8 rows of 4 images written by a first run (2 variants each), then 4 rows (variant 2 of
    each image) by a resumed run with 3 variants configured."""
    rows = [
        {"image_id": f"img_{i}", "variant": v, "status": "ok", "type_code": "001"}
        for v in range(3)
        for i in range(4)
    ]
    run = run_json(4, 0)
    run |= {"started": "2026-01-01T00:01:04Z", "finished": "2026-01-01T00:01:08Z"}
    run["counts"] |= {"rows_in": 12, "ok": 12, "done_before": 8, "this_run": 4}
    frame = loaded(rows, run).frame
    return Loaded("/tmp/out", run, frame, shards)


def test_source_images_per_second_counts_the_images_this_run_wrote():
    facts = dict(throughput(_resumed(((OLD_SHARD, 8), (NEW_SHARD, 4)))).facts)
    # 4 images in 4 s, one variant each; not 4 rows / 3 configured variants / 4 s.
    assert facts["source images / s"] == "1.00"
    assert "variants per image" not in facts


def test_source_images_per_second_is_left_out_when_the_shards_do_not_tell_this_runs_rows():
    facts = dict(throughput(_resumed((("renamed.parquet", 12),))).facts)
    assert facts["rows / s"] == "1.00"
    assert facts["source images / s"].startswith("not shown: the shards do not tell")
    assert "variants per image" not in facts


def test_a_run_that_wrote_every_row_has_its_rate_without_shard_names():
    facts = dict(throughput(loaded(ok_rows(), run_json(6, 0))).facts)
    assert facts["source images / s"] == "0.50" and facts["variants per image"] == "3"


# ---------------------------------------------------------------------------- loading at scale


def test_load_reads_only_the_columns_the_report_uses(tmp_path: Path, monkeypatch):
    rows = ok_rows()
    rows[0] |= {"row_sha256": "ab" * 32, "source_uri": "s3://bucket/a.jpg", "fov_r": 1.0}
    _write_shard(str(tmp_path), rows)
    asked: list[list[str] | None] = []
    real = data_module.read_shard

    def spy(path: str, columns: list[str] | None = None, *args: Any, **kw: Any) -> Any:
        asked.append(columns)
        return real(path, columns, *args, **kw)

    monkeypatch.setattr(data_module, "read_shard", spy)
    result = load(str(tmp_path))
    assert asked == [list(REPORT_COLUMNS)]
    assert set(result.frame.columns) <= set(REPORT_COLUMNS)
    assert not {"row_sha256", "source_uri", "fov_r"} & set(result.frame.columns)
    assert set(FIDELITY_COLUMNS) <= set(REPORT_COLUMNS)  # the fidelity lines read these


def test_ok_rows_are_selected_once_however_often_sections_ask():
    result = loaded([*ok_rows(), failed_row("gone", "fetch", "FileNotFoundError: x")])
    assert result.ok is result.ok and len(result.ok) == 6
    assert result.numbers("psnr_degraded") is result.numbers("psnr_degraded")


# ---------------------------------------------------------------------------- cosmetics


def test_score_run_plots_have_no_empty_type_slot():
    rows = [{k: v for k, v in r.items() if k != "nr_luminance_enhanced"} for r in enhance_rows()]
    run = run_json(2, 0)
    run["config"] = {"mode": "score"}
    (plot,) = [p for p in aggregate(loaded(rows, run)).metrics.plots if p.key == "nr_luminance"]
    assert plot.groups == ["input"] and plot.series == ["input"]


def test_vessel_columns_of_the_input_image_are_headed_input_outside_pairs_runs():
    rows = [{**r, "vessel_auc_clean": 0.9, "vessel_auc_enhanced": 0.8} for r in enhance_rows()]
    run = run_json(2, 0)
    run["config"] = {"mode": "enhance"}
    result = downstream(loaded(rows, run))
    assert [(c.label, c.sub) for c in result.columns] == [("AUC", "input"), ("AUC", "enhanced")]


def test_each_metric_column_shows_a_fixed_number_of_decimals():
    assert fmt(68.2, "nr_luminance") == "68.20" and fmt(82.678, "nr_luminance") == "82.68"
    assert fmt(0.15, "nr_uniformity") == "0.1500" and fmt(1234.5, "nr_laplacian_var") == "1234.50"


def test_a_type_whose_every_row_is_identical_to_clean_still_counts_them():
    rows = _identical_and_partly_enhanced()[2:]
    for row in rows:
        row |= {"psnr_enhanced": None, "ssim_enhanced": None, "enhanced_uri": None}
    table = aggregate(loaded(rows, run_json(4, 0))).metrics.full_reference
    assert table is not None
    blur = table.rows[0]
    assert (blur.rows, blur.n, blur.identical) == (4, 0, 4)
    assert blur.values == [None, None]  # PSNR and SSIM: no row to average


def test_quality_gate_counts_only_rows_that_stayed_ok_after_the_gate():
    """A row the gate passed (or failed) that failed later, at Write, is no passed row."""
    rows = ok_rows()
    for i, row in enumerate(rows):
        row["quality_ok"] = i % 2 == 0
        row["quality_failed"] = None if i % 2 == 0 else "psnr_degraded >= 25"
    late = [
        {**failed_row("late_pass", "write", "OSError: disk full"), "quality_ok": True},
        {
            **failed_row("late_fail", "write", "OSError: disk full"),
            "quality_ok": False,
            "quality_failed": "nr_luminance_clean >= 40",
        },
    ]
    gate = aggregate(loaded([*rows, *late])).summary.quality
    assert gate is not None
    assert (gate.passed, gate.judged) == (3, 6)
    assert gate.top_failed == [("psnr_degraded >= 25", 3)]


def test_the_report_names_the_most_broken_terms_as_the_run_summary_does():
    """One count (quality.GateCounts): on a tie both name the first term by name."""
    from fundus_batch.quality import GateCounts

    rows = ok_rows()[:4]
    terms = ["z_term > 1", "z_term > 1", "a_term > 1", "a_term > 1"]
    for row, failed in zip(rows, terms, strict=True):
        row |= {"quality_ok": False, "quality_failed": failed}
    gate = aggregate(loaded(rows)).summary.quality
    counts = GateCounts()
    counts.add([False] * 4, [r["quality_failed"] for r in rows])
    assert gate is not None and gate.top_failed[0] == counts.most_broken == ("a_term > 1", 2)


def test_the_clean_row_averages_one_value_per_source_image_however_many_rows_each_has():
    """Image a has three ok rows (luminance 10), image b one (50): the clean row is the mean
    of the two images' values, 30, not the mean over the four rows, 20."""
    rows = [
        {
            "image_id": image_id,
            "variant": variant,
            "status": "ok",
            "type_code": "001",
            "clean_uri": f"images/{image_id}/clean.png",
            "degraded_uri": f"images/{image_id}/v{variant}.png",
            "nr_luminance_clean": lum,
            "nr_luminance_degraded": 5.0,
        }
        for image_id, lum, n in (("a", 10.0, 3), ("b", 50.0, 1))
        for variant in range(n)
    ]
    table = aggregate(loaded(rows)).metrics.no_reference
    assert table is not None
    clean = table.rows[0]
    assert clean.label == "clean" and clean.suffix == " (per source image)"
    assert clean.n == 2
    assert clean.values[0] == pytest.approx(30.0)
