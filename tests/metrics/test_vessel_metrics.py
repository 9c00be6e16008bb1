"""Vessel AUC and F1 inside the FOV, checked against brute-force and hand-computed references,
and the independent vesselness segmenter that the Score stage runs."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fundus_batch.metrics.vessels import (
    F1_TOP_SHARE,
    UndefinedMetricError,
    sato_tubeness,
    segment_and_score,
    top_share_threshold,
    vessel_auc,
    vessel_f1,
    vessel_metrics,
    vesselness,
)
from fundus_batch.synth import synth_fundus


def _pairwise_auc(prob: np.ndarray, truth: np.ndarray, fov: np.ndarray) -> float:
    """O(n*m) reference: the share of (vessel, background) pairs ranked right, ties one half."""
    pos = prob[fov & truth]
    neg = prob[fov & ~truth]
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (pos.size * neg.size)


def _disc_mask(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    r = min(h, w) / 2
    return (((yy - h / 2 + 0.5) ** 2 + (xx - w / 2 + 0.5) ** 2) <= r * r).astype(np.uint8) * 255


@pytest.mark.parametrize("levels", [5, 1000])
def test_auc_equals_pairwise_reference_with_and_without_ties(levels: int):
    rng = np.random.default_rng(levels)
    truth = rng.random((24, 30)) < 0.3
    # Few levels force many tied scores across the two classes.
    prob = rng.integers(0, levels, size=truth.shape) / (levels - 1) * 0.6 + 0.4 * truth
    prob = np.clip(prob, 0, 1)
    mask = _disc_mask(*truth.shape)
    expected = _pairwise_auc(prob, truth, mask == 255)
    assert vessel_auc(prob, truth, mask) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    levels=st.integers(2, 8),
    share=st.floats(0.05, 0.95),
)
def test_auc_matches_pairwise_reference_on_random_small_inputs(
    seed: int, levels: int, share: float
):
    rng = np.random.default_rng(seed)
    truth = rng.random((9, 11)) < share
    truth[0, 0], truth[0, 1] = True, False  # both classes always present
    prob = rng.integers(0, levels, size=truth.shape) / (levels - 1)
    fov = np.ones(truth.shape, dtype=bool)
    assert vessel_auc(prob, truth, fov) == pytest.approx(_pairwise_auc(prob, truth, fov))


def test_perfect_prediction_scores_one_and_inverted_scores_zero():
    rng = np.random.default_rng(0)
    truth = (rng.random((40, 40)) < 0.2).astype(np.uint8) * 255
    mask = _disc_mask(40, 40)
    prob = np.where(truth == 255, 0.9, 0.1)
    assert vessel_auc(prob, truth, mask) == 1.0
    assert vessel_f1(prob, truth, mask) == 1.0
    assert vessel_auc(1.0 - prob, truth, mask) == 0.0
    assert vessel_f1(1.0 - prob, truth, mask) == 0.0


def test_random_prediction_scores_about_one_half():
    rng = np.random.default_rng(1)
    truth = rng.random((200, 200)) < 0.15
    prob = rng.random((200, 200))
    assert abs(vessel_auc(prob, truth, _disc_mask(200, 200)) - 0.5) < 0.02


def test_constant_prediction_scores_exactly_one_half():
    truth = np.zeros((10, 10), dtype=bool)
    truth[2:5] = True
    assert vessel_auc(np.full((10, 10), 0.3), truth, np.ones((10, 10), bool)) == 0.5


def test_more_noise_gives_lower_auc():
    rng = np.random.default_rng(2)
    truth = rng.random((128, 128)) < 0.2
    mask = _disc_mask(128, 128)
    noise = rng.normal(size=truth.shape)
    aucs = []
    for sigma in (0.2, 0.5, 1.0, 2.0, 4.0):
        prob = 1 / (1 + np.exp(-(np.where(truth, 1.0, -1.0) + sigma * noise)))
        aucs.append(vessel_auc(prob, truth, mask))
    assert all(a > b for a, b in itertools.pairwise(aucs)), aucs
    assert aucs[0] > 0.99 and aucs[-1] < 0.7


def test_f1_matches_hand_counted_confusion_matrix():
    truth = np.array([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=np.uint8)
    prob = np.array([[0.9, 0.5, 0.7, 0.1], [0.2, 0.49, 0.0, 0.6]])
    fov = np.ones(truth.shape, dtype=bool)
    # prob >= 0.5: TP at (0,0),(0,1),(1,3); FP at (0,2); FN at (1,0) -> 2*3 / (2*3 + 1 + 1)
    assert vessel_f1(prob, truth, fov) == pytest.approx(6 / 8)
    # prob >= 0.65: TP (0,0); FP (0,2); FN (0,1),(1,0),(1,3) -> 2 / (2 + 1 + 3)
    assert vessel_f1(prob, truth, fov, threshold=0.65) == pytest.approx(2 / 6)


def test_pixels_outside_the_fov_do_not_change_either_score():
    rng = np.random.default_rng(3)
    truth = rng.random((64, 64)) < 0.25
    prob = np.clip(truth * 0.5 + rng.random((64, 64)) * 0.6, 0, 1)
    mask = _disc_mask(64, 64)
    before = vessel_metrics(prob, truth, mask)
    outside = mask == 0
    prob2, truth2 = prob.copy(), truth.copy()
    prob2[outside] = rng.random(int(outside.sum()))
    truth2[outside] = ~truth2[outside]
    assert vessel_metrics(prob2, truth2, mask) == before
    # ... whereas scoring the whole frame does see them.
    assert vessel_auc(prob2, truth2, np.ones_like(truth)) != before["vessel_auc"]


def test_vessel_metrics_returns_both_scores_under_stable_keys():
    rng = np.random.default_rng(4)
    truth = rng.random((32, 32)) < 0.3
    prob = rng.random((32, 32))
    mask = _disc_mask(32, 32)
    got = vessel_metrics(prob, truth, mask, threshold=0.4)
    assert set(got) == {"vessel_auc", "vessel_f1"}
    assert got["vessel_auc"] == vessel_auc(prob, truth, mask)
    assert got["vessel_f1"] == vessel_f1(prob, truth, mask, threshold=0.4)


def test_truth_encodings_bool_01_and_0255_agree():
    rng = np.random.default_rng(5)
    t = rng.random((20, 20)) < 0.3
    prob = rng.random((20, 20))
    fov = np.ones((20, 20), dtype=bool)
    ref = vessel_metrics(prob, t, fov)
    assert vessel_metrics(prob, t.astype(np.uint8), fov) == ref
    assert vessel_metrics(prob, t.astype(np.uint8) * 255, fov) == ref


def test_undefined_scores_raise_a_typed_error():
    fov = np.ones((8, 8), dtype=bool)
    prob = np.full((8, 8), 0.2)
    with pytest.raises(UndefinedMetricError, match="no vessel"):
        vessel_auc(prob, np.zeros((8, 8), bool), fov)
    with pytest.raises(UndefinedMetricError, match="no background"):
        vessel_auc(prob, np.ones((8, 8), bool), fov)
    with pytest.raises(UndefinedMetricError, match="F1 is undefined"):
        vessel_f1(prob, np.zeros((8, 8), bool), fov)
    # Vessels exist only outside the FOV: still undefined inside it.
    truth = np.zeros((8, 8), bool)
    truth[0, 0] = True
    fov[0, 0] = False
    with pytest.raises(UndefinedMetricError):
        vessel_auc(prob, truth, fov)


@pytest.mark.parametrize(
    ("prob", "truth", "mask", "exc", "match"),
    [
        ([[0.5]], np.ones((1, 1), bool), np.ones((1, 1), bool), TypeError, "numpy array"),
        (np.full((4, 4), 128, np.uint8), np.eye(4, dtype=bool), None, TypeError, "float"),
        (np.full((4, 4), 1.5), np.eye(4, dtype=bool), None, ValueError, r"\[0, 1\]"),
        (np.full((4, 4), np.nan), np.eye(4, dtype=bool), None, ValueError, "NaN"),
        (np.full((4, 4, 1), 0.5), np.eye(4, dtype=bool), None, ValueError, "HxW"),
        (np.full((4, 4), 0.5), np.eye(5, dtype=bool), None, ValueError, "does not match"),
        (np.full((4, 4), 0.5), np.eye(4) * 0.5, None, TypeError, "bool or uint8"),
        (np.full((4, 4), 0.5), np.eye(4, dtype=np.uint8) * 7, None, ValueError, "binary"),
        (np.full((4, 4), 0.5), np.eye(4, dtype=bool), np.zeros((4, 4), bool), ValueError, "no"),
        (np.full((4, 4), 0.5), np.eye(4, dtype=bool), np.ones((3, 3), bool), ValueError, "shape"),
    ],
)
def test_bad_inputs_raise_clear_typed_errors(prob, truth, mask, exc, match):
    mask = np.ones((4, 4), dtype=bool) if mask is None else mask
    with pytest.raises(exc, match=match):
        vessel_metrics(prob, truth, mask)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_threshold_outside_unit_interval_is_rejected(threshold: float):
    with pytest.raises(ValueError, match="threshold"):
        vessel_f1(np.full((4, 4), 0.5), np.eye(4, dtype=bool), np.ones((4, 4), bool), threshold)


# ------------------------------------------------------------ the independent segmenter


def _rim_band(mask: np.ndarray, width: int) -> np.ndarray:
    """FOV pixels within ``width`` px of the FOV edge."""
    import cv2

    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    return (mask > 0) & ~(cv2.erode(mask, disc) > 0)


def test_sato_tubeness_matches_skimage_sato_away_from_the_image_border_from_sigma_1_5():
    from skimage.filters import sato

    s = synth_fundus(256, seed=1)  # sharp vessels: sigma 1 would differ by several per cent
    grey = s.image[48:144, 48:144, 1].astype(np.float32) / 255
    for sigmas in ((1.5,), (2.0,), (1.5, 3.0)):
        want = sato(grey, sigmas=sigmas, black_ridges=True, mode="reflect")
        got = sato_tubeness(grey, sigmas)
        inner = (slice(16, -16), slice(16, -16))
        assert np.abs(got[inner] - want[inner]).max() < 0.01 * want.max(), sigmas


@pytest.mark.parametrize("size", [512, 256])
def test_vesselness_finds_the_synthetic_vessels_and_heavy_blur_hides_them(size: int):
    import cv2

    s = synth_fundus(size, seed=3)
    clean = segment_and_score(s.image, s.vessels, s.mask)
    assert clean["vessel_auc"] > 0.9 and clean["vessel_f1"] > 0.6
    blurred = cv2.GaussianBlur(s.image, (0, 0), 6 * size / 512)
    blurred[s.mask == 0] = 0
    worse = segment_and_score(blurred, s.vessels, s.mask)
    assert worse["vessel_auc"] < clean["vessel_auc"] - 0.08
    assert worse["vessel_f1"] < clean["vessel_f1"] - 0.2


def test_vesselness_is_a_0_1_map_that_is_zero_outside_the_fov():
    s = synth_fundus(256, seed=1)
    prob = vesselness(s.image, s.mask)
    assert prob.shape == s.mask.shape and prob.dtype == np.float64
    assert prob.min() >= 0.0 and prob.max() == pytest.approx(1.0)
    assert not prob[s.mask == 0].any()


def test_a_dark_rim_inside_the_fov_is_not_taken_for_a_vessel():
    """Real photographs darken towards the FOV edge (vignetting, anti-aliased resizing): a
    dark ring is a ridge to a vesselness filter unless the rim is handled."""
    s = synth_fundus(512, seed=3)
    image = s.image.copy()
    ring = _rim_band(s.mask, 3)
    image[ring] = (image[ring] * 0.5).astype(np.uint8)
    band = _rim_band(s.mask, 6) & (s.vessels == 0)
    prob = vesselness(image, s.mask)
    assert (prob[band] >= top_share_threshold(prob, s.mask)).mean() < 0.01
    # Control: the bare filter on the same image marks much of the rim band as vessel.
    bare = sato_tubeness(image[..., 1].astype(np.float32) / 255.0)
    bare[s.mask == 0] = 0.0
    bare /= bare.max()
    assert (bare[band] >= top_share_threshold(bare, s.mask)).mean() > 0.05


def test_f1_threshold_marks_the_top_share_of_fov_pixels():
    s = synth_fundus(256, seed=2)
    prob = vesselness(s.image, s.mask)
    thr = top_share_threshold(prob, s.mask)
    share = (prob[s.mask > 0] >= thr).mean()
    assert share == pytest.approx(F1_TOP_SHARE, abs=0.005)
    scores = segment_and_score(s.image, s.vessels, s.mask)
    assert scores["vessel_f1"] == pytest.approx(vessel_f1(prob, s.vessels, s.mask, thr))
    with pytest.raises(ValueError, match="share"):
        top_share_threshold(prob, s.mask, share=1.0)


@pytest.mark.parametrize(
    ("image", "exc", "match"),
    [
        (np.zeros((64, 64), np.uint8), ValueError, "HxWx3"),
        (np.zeros((64, 64, 3), np.float32), TypeError, "uint8"),
    ],
)
def test_vesselness_rejects_images_that_are_not_rgb_uint8(image, exc, match):
    with pytest.raises(exc, match=match):
        vesselness(image, np.full((64, 64), 255, np.uint8))


def _real_images(shared: Path) -> list[dict]:
    hrf = shared / "data" / "hrf" / "training"
    chase = shared / "data" / "chase_db1"
    rows = []
    for stem in ("01_h", "02_g", "03_h"):
        rows.append(
            {
                "image_id": f"hrf_{stem}",
                "status": "ok",
                "source_uri": str(hrf / "images" / f"{stem}.jpg"),
                "source_mask_uri": str(hrf / "mask" / f"{stem}_mask.tif"),
                "vessel_gt_uri": str(hrf / "1st_manual" / f"{stem}_AVmanual.png"),
            }
        )
    for stem in ("Image_01L", "Image_05R", "Image_10L"):
        rows.append(
            {
                "image_id": f"chase_{stem}",
                "status": "ok",
                "source_uri": str(chase / "images" / f"{stem}.jpg"),
                "vessel_gt_uri": str(chase / "manual" / f"{stem}_1stHO.png"),
            }
        )
    missing = [r["source_uri"] for r in rows if not Path(r["source_uri"]).is_file()]
    if missing:
        pytest.skip(f"HRF / CHASE_DB1 photographs not found: {missing[:2]}")
    return rows


def test_vesselness_scores_real_hrf_and_chase_photographs_well(shared_dir: Path):
    """On clean photographs preprocessed as the pipeline does (512 px), a decent segmenter
    reaches AUC >= 0.85; measured over all 52 images: HRF 0.949, CHASE_DB1 0.932."""
    from fundus_batch import imaging, stages
    from fundus_batch.io.codecs import decode_image

    rows = stages.Preprocess(size=512)(
        stages.Fetch(threads=1, vessels=True)(_real_images(shared_dir))
    )
    for row in rows:
        assert row["status"] == "ok", row.get("error")
        image = decode_image(row["clean_png"])
        mask = imaging.decode_mask(row["mask_png"])
        truth = imaging.decode_mask(row["vessel_gt_png"])
        scores = segment_and_score(image, truth, mask)
        assert scores["vessel_auc"] >= 0.88, (row["image_id"], scores)
        band = _rim_band(mask, 6) & (truth == 0)
        prob = vesselness(image, mask)
        assert (prob[band] >= top_share_threshold(prob, mask)).mean() < 0.04, row["image_id"]
