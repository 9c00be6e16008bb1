"""Vessel AUC and F1 inside the FOV, checked against brute-force and hand-computed references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fundus_batch.metrics.vessels import (
    UndefinedMetricError,
    vessel_auc,
    vessel_f1,
    vessel_metrics,
)


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
