"""The classical enhancer: helps the illumination degradation, leaves clean images alone,
never touches the outside of the FOV, and runs as a CPU-only enhancement stage."""

from __future__ import annotations

import numpy as np
import pytest

from fundus_batch.classical import (
    MODEL_NAME,
    ClassicalEnhancer,
    ClassicalParams,
    enhance_classical,
)
from fundus_batch.degrade import degrade, sample_rng
from fundus_batch.enhance import ClassicalEnhance, enhance_image
from fundus_batch.io.codecs import decode_image, encode_png
from fundus_batch.metrics.harm import mean_change
from fundus_batch.metrics.reference import psnr
from fundus_batch.stages import Item
from fundus_batch.synth import synth_fundus


@pytest.fixture(scope="module")
def fundus():
    return synth_fundus(256, seed=1)


def test_type_001_degradation_gains_fov_psnr_on_every_sample():
    gains = []
    for seed in range(3):
        s = synth_fundus(256, seed=seed)
        for variant in range(3):
            degraded, _ = degrade(s.image, s.mask, "001", sample_rng(seed, "synth", variant))
            enhanced = enhance_classical(degraded, s.mask)
            gains.append(psnr(enhanced, s.image, s.mask) - psnr(degraded, s.image, s.mask))
    assert min(gains) > 0.0
    assert np.mean(gains) > 0.3


def test_clean_image_is_left_nearly_unchanged(fundus):
    out = enhance_classical(fundus.image, fundus.mask)
    assert psnr(out, fundus.image, fundus.mask) > 45.0
    diff = np.abs(out.astype(int) - fundus.image.astype(int))
    assert diff.max() <= 10


def test_a_dark_central_blob_is_lifted_and_the_natural_darker_rim_kept():
    size = 256
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - size / 2 + 0.5, xx - size / 2 + 0.5) / (size / 2)
    mask = np.where(r < 0.99, 255, 0).astype(np.uint8)
    vignetting = (1.0 - 0.3 * r**2)[..., None]  # natural shading: the rim 30 % darker
    image = np.clip(np.array([160.0, 80.0, 40.0]) * vignetting, 0, 255).astype(np.uint8)
    image[mask == 0] = 0
    hole = np.exp(-((r / 0.3) ** 2))[..., None] * 70.0
    dark = np.clip(image - hole, 0, 255).astype(np.uint8)
    dark[mask == 0] = 0
    out = enhance_classical(dark, mask)
    centre = r < 0.15
    assert out[centre].astype(int).mean() > dark[centre].astype(int).mean() + 10
    assert psnr(out, image, mask) > psnr(dark, image, mask) + 1.0
    assert out[mask > 0].max() <= image.max()  # lifted toward its surroundings, never past
    rim = (r > 0.75) & (mask > 0)
    assert np.array_equal(out[rim], dark[rim])


def test_a_uniform_field_stays_uniform_up_to_the_rim():
    # normalised convolution: the black surround must not darken the background at the rim
    size = 128
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.where(np.hypot(yy - 63.5, xx - 63.5) < 60, 255, 0).astype(np.uint8)
    image = np.where(mask[..., None] > 0, np.array([150, 70, 30], np.uint8), 0).astype(np.uint8)
    params = ClassicalParams(deadzone=0.0, lift_inner=0.9, lift_outer=1.5)
    assert np.array_equal(enhance_classical(image, mask, params), image)


def test_outside_fov_is_zero_and_does_not_influence_the_inside(fundus):
    noisy = fundus.image.copy()
    rng = np.random.default_rng(0)
    outside = fundus.mask == 0
    noisy[outside] = rng.integers(0, 256, (int(outside.sum()), 3), dtype=np.uint8)
    degraded, _ = degrade(fundus.image, fundus.mask, "001", sample_rng(0, "x", 0))
    junk = degraded.copy()
    junk[outside] = noisy[outside]
    out = enhance_classical(junk, fundus.mask)
    assert (out[outside] == 0).all()
    assert np.array_equal(out, enhance_classical(degraded, fundus.mask))


def test_output_is_deterministic_and_the_hash_names_the_parameters(fundus):
    degraded, _ = degrade(fundus.image, fundus.mask, "111", sample_rng(0, "x", 1))
    a = enhance_classical(degraded, fundus.mask)
    assert np.array_equal(a, enhance_classical(degraded.copy(), fundus.mask.copy()))
    assert a.dtype == np.uint8 and a.shape == degraded.shape
    first, again = ClassicalEnhancer(), ClassicalEnhancer()
    assert first.model_name == MODEL_NAME == "classical-1"
    assert first.model_sha256 == again.model_sha256 and len(first.model_sha256) == 64
    assert ClassicalEnhancer(ClassicalParams(deadzone=5.0)).model_sha256 != first.model_sha256


def test_optional_clahe_keeps_the_outside_black_and_changes_the_inside(fundus):
    out = enhance_classical(fundus.image, fundus.mask, ClassicalParams(clahe_clip=2.0))
    assert (out[fundus.mask == 0] == 0).all()
    assert not np.array_equal(out, fundus.image)


@pytest.mark.parametrize(
    ("image", "mask", "message"),
    [
        (np.zeros((64, 64), np.uint8), np.full((64, 64), 255, np.uint8), "HxWx3"),
        (np.zeros((64, 64, 3), np.float32), np.full((64, 64), 255, np.uint8), "uint8"),
        (np.zeros((64, 64, 4), np.uint8), np.full((64, 64), 255, np.uint8), "HxWx3"),
        (np.zeros((64, 64, 3), np.uint8), np.full((32, 64), 255, np.uint8), "matching"),
        (np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8), "empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(image, mask, message):
    with pytest.raises(ValueError, match=message):
        enhance_classical(image, mask)


@pytest.mark.parametrize(
    "kwargs",
    [{"sigma": 0.0}, {"strength": 1.5}, {"deadzone": -1.0}, {"lift_inner": 0.8}, {"grid": 4}],
)
def test_bad_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ClassicalParams(**kwargs)


def test_with_jpeg_outputs_an_image_left_unchanged_is_stored_as_its_input_bytes(fundus):
    """Encoded a second time, it would score lower than its input although the enhancer
    changed nothing; ``enhance_change`` is measured on what is stored."""
    stage = ClassicalEnhance(source_role="degraded", image_format="jpeg", jpeg_quality=90)
    items = []
    for code in ("100", "001"):  # blur: left alone; illumination: corrected
        degraded, _ = degrade(fundus.image, fundus.mask, code, sample_rng(0, "x", 1))
        item = Item({"image_id": code, "status": "ok"})
        item.put("mask", fundus.mask.copy(), encode_png(fundus.mask))
        item.put_output("degraded", degraded, "jpeg", 90)
        items.append(item)
    alone, lifted = stage.process(items)
    assert alone.encoded["enhanced"] == alone.encoded["degraded"]
    assert alone.row["enhance_change"] == 0.0
    stored = decode_image(lifted.encoded["enhanced"])
    want = mean_change(lifted.image("degraded"), stored, fundus.mask)
    assert lifted.row["enhance_change"] == want > 0.3


def test_stage_writes_the_enhance_columns_and_fails_bad_rows_alone(fundus):
    stage = ClassicalEnhance(source_role="degraded", image_format="png", jpeg_quality=95)
    assert stage.resources.num_gpus == 0
    degraded, _ = degrade(fundus.image, fundus.mask, "001", sample_rng(0, "x", 2))
    mask_png = encode_png(fundus.mask)
    good = {"status": "ok", "degraded_png": encode_png(degraded), "mask_png": mask_png}
    bad = {"status": "ok", "degraded_png": b"not an image", "mask_png": mask_png}
    skipped = {"status": "failed", "degraded_png": None, "mask_png": None}
    good_out, bad_out, skipped_out = stage([good, bad, dict(skipped)])
    assert np.array_equal(
        decode_image(good_out["enhanced_png"]), enhance_classical(degraded, fundus.mask)
    )
    assert good_out["model_name"] == "classical-1"
    assert good_out["model_sha256"] == ClassicalEnhancer().model_sha256
    assert good_out["seconds_enhance"] >= 0.0
    inside = fundus.mask > 0
    diff = np.abs(decode_image(good_out["enhanced_png"]).astype(int) - degraded.astype(int))
    assert good_out["enhance_change"] == pytest.approx(diff[inside].mean(), abs=1e-9)
    assert good_out["enhance_change"] > 0.5  # the hole of type 001 is lifted
    assert bad_out["status"] == "failed" and bad_out["failed_stage"] == "enhance"
    assert "enhanced_png" not in bad_out
    assert skipped_out == skipped


def test_pipeline_plans_the_classical_stage_on_cpu_actors_even_with_a_gpu():
    from fundus_batch.config import build_config
    from fundus_batch.ray_adapter import ClusterShape, plan_pools

    cfg = build_config(
        {"manifest": "m.csv", "out": "o", "enhance": {"enabled": True, "enhancer": "classical"}}
    )
    pools = plan_pools(cfg, ClusterShape(cpus=8, gpus=1))
    assert all(p.resources.num_gpus == 0 for p in pools)
    chained = [s.cls for p in pools for s in p.specs]
    assert ClassicalEnhance in chained
    assert all(c.__name__ != "Enhance" for c in chained)


def test_enhance_image_runs_the_classical_enhancer_and_rejects_unknown_names(fundus):
    result = enhance_image(fundus.image, fundus.mask, enhancer="classical")
    assert np.array_equal(result.image, enhance_classical(fundus.image, fundus.mask))
    assert result.model_name == "classical-1" and result.seconds >= 0.0
    with pytest.raises(ValueError, match="enhancer"):
        enhance_image(fundus.image, fundus.mask, enhancer="magic")
    with pytest.raises(ValueError, match="match"):
        enhance_image(fundus.image, fundus.mask[:128])


def test_pipeline_run_with_the_classical_enhancer_writes_enhanced_rows(ray_cluster, tmp_path):
    import pyarrow.parquet as pq

    from fundus_batch import pipeline
    from fundus_batch.config import build_config
    from fundus_batch.imaging import decode_mask
    from tests.pipeline_inputs import write_inputs

    manifest = write_inputs(tmp_path / "in", n_good=2, broken=False, size=256)
    out = tmp_path / "out"
    cfg = build_config(
        {
            "manifest": str(manifest),
            "out": str(out),
            "variants": 2,
            "types": "001",
            "size": 256,
            "progress": False,
            "ray": {"rows_per_block": 2},
            "enhance": {"enabled": True, "enhancer": "classical"},
        }
    )
    summary = pipeline.run(cfg)
    assert (summary.rows_in, summary.ok) == (4, 4)
    df = pq.read_table(str(out / "pairs")).to_pandas()
    assert (df.model_name == "classical-1").all() and df.model_sha256.nunique() == 1
    assert df.psnr_enhanced.notna().all() and df.seconds_enhance.notna().all()
    for row in df.itertuples():
        enhanced = decode_image((out / row.enhanced_uri).read_bytes())
        degraded = decode_image((out / row.degraded_uri).read_bytes())
        mask = decode_mask((out / row.mask_uri).read_bytes())
        assert np.array_equal(enhanced, enhance_classical(degraded, mask))


def test_switching_enhancer_on_an_existing_out_is_a_recorded_settings_change():
    from fundus_batch import run_settings
    from fundus_batch.config import build_config

    def settings(enhancer: str) -> dict:
        enhance = {"enabled": True, "enhancer": enhancer}
        return run_settings.resolve(build_config({"manifest": "m", "out": "o", "enhance": enhance}))

    classical, cofenet = settings("classical"), settings("cofenet")
    assert classical["enhance"]["enhancer"] == "classical"
    assert classical["enhance"]["model_sha256"] == ClassicalEnhancer().model_sha256
    run_settings.compare(classical, settings("classical"))  # the same run again: accepted
    with pytest.raises(run_settings.SettingsMismatchError, match=r"enhance\.enhancer"):
        run_settings.compare(classical, cofenet)
