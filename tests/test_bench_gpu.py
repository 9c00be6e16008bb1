"""The GPU benchmarks (bench/enhance.py sweep, bench/gpu_pipeline.py) on the CPU, tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.bench_scripts import load_bench

enhance = load_bench("enhance")
gpu_pipeline = load_bench("gpu_pipeline")

TINY = ["--models", "small", "--size", "192", "--images", "1", "--distinct", "1"]
TINY += ["--rounds", "1", "--warmup", "1", "--batch", "1"]


def test_sweep_json_has_every_configuration_and_shows_bf16_error(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    argv = [*TINY, "--sweep", "--device", "cpu", "--dtypes", "fp32,bf16"]
    assert enhance.main([*argv, "--layouts", "channels_last", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and doc["environment"]["device"] == "cpu"
    rows = {(r["dtype"], r["layout"]): r for r in doc["results"]}
    assert set(rows) == {("fp32", "channels_last"), ("bf16", "channels_last")}
    for row in rows.values():
        assert row["status"] == "ok" and row["images_per_s"] > 0 and row["finite"]
        assert row["peak_gpu_mib"] is None  # no GPU: no peak memory to report
    # Against the fp32 NCHW reference: fp32 agrees to rounding, bf16 autocast really is bf16.
    assert rows[("fp32", "channels_last")]["max_abs_diff_vs_fp32"] < 1e-5
    assert 1e-4 < rows[("bf16", "channels_last")]["max_abs_diff_vs_fp32"] < 0.05


def test_cpu_comparison_writes_json_with_naive_and_fast_paths(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    argv = ["--size", "192", "--images", "1", "--rounds", "1", "--batch", "1", "--json", str(out)]
    assert enhance.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["mode"] == "cpu-compare"
    names = [p["name"] for p in doc["paths"]]
    assert names[0].startswith("naive") and len(names) == 3
    assert all(p["images_per_s"] > 0 for p in doc["paths"])


def test_bad_batch_list_names_the_flag() -> None:
    with pytest.raises(SystemExit, match="--batch"):
        enhance.main([*TINY[:-2], "--sweep", "--batch", "0,4"])


def test_sampler_summary_reports_active_window_apart_from_idle_edges() -> None:
    sampler = gpu_pipeline.GpuSampler(200)
    busy = [0, 0, 90, 50, 100, 0]
    sampler.samples = [(0.2 * i, float(b), 1000.0 + i) for i, b in enumerate(busy)]
    got = sampler.summary()
    assert got["busy_mean"] == pytest.approx(40.0) and got["busy_p50"] == pytest.approx(25.0)
    assert got["active_busy_mean"] == pytest.approx(80.0)
    assert got["active_busy_p50"] == pytest.approx(90.0)
    assert got["active_window_s"] == pytest.approx(0.4)
    assert got["memory_used_max_mib"] == 1005.0


def test_sampler_without_samples_reports_none() -> None:
    got = gpu_pipeline.GpuSampler(200).summary()
    assert got["busy_mean"] is None and got["samples"] == 0


def test_synthetic_manifest_repeats_distinct_eyes(tmp_path: Path) -> None:
    manifest = gpu_pipeline.synthetic_manifest(tmp_path, 3, 192, distinct=2)
    lines = manifest.read_text().splitlines()
    assert lines[0] == "image_id,uri" and len(lines) == 4
    files = sorted(tmp_path.glob("img_*.jpg"))
    assert files[0].read_bytes() == files[2].read_bytes() != files[1].read_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only: needs a GPU")
def test_cuda_sweep_reports_peak_gpu_memory(tmp_path: Path) -> None:
    out = tmp_path / "cuda.json"
    argv = [*TINY, "--device", "cuda", "--dtypes", "fp16", "--json", str(out)]
    assert enhance.main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert rows and all(r["status"] == "ok" and r["peak_gpu_mib"] > 0 for r in rows)


@pytest.mark.parametrize("model", [[], ["--width", "0.125"]], ids=["shipped", "random-width"])
def test_pipeline_bench_on_the_cpu_reports_where_each_pool_spends_its_time(
    tmp_path: Path, model: list[str]
) -> None:
    """Without a GPU the enhancement actors run on the CPU; the JSON still says how long a row
    spends in each stage (enhance: decode, forward pass and encode) and how busy each pool was."""
    out = tmp_path / "pipeline.json"
    argv = ["--images", "4", "--size", "192", "--distinct", "2", "--cpus", "2", *model]
    argv += ["--enhance-batch", "2", "--rows-per-block", "2", "--json", str(out)]
    assert gpu_pipeline.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["rows_ok"] == 4 and doc["gpu"]["busy_mean"] is None
    # Enhance mode: one row per image, so images/s is rows/s (pairs mode divides by variants).
    assert doc["rows_per_image"] == 1 and doc["images_per_s"] == doc["rows_per_s"]
    load = doc["stage_load"]
    assert {"fetch", "preprocess", "enhance", "write"} <= set(load["ms_per_row"])
    assert all(v > 0 for v in load["ms_per_row"].values())
    pools = {tuple(p["stages"]): p for p in load["pools"]}
    enhance_pool = pools[("enhance",)]
    assert enhance_pool["actors"] >= 1 and 0 < enhance_pool["busy_share"] <= 1
