"""Loading and aggregation of the report: known rows in, the numbers each section shows out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fundus_batch.output import OutputStore, ShardWriter
from fundus_batch.report.data import aggregate, downstream, failures, load, throughput
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
    assert dict(summary.cards)["ok"] == "5"


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
