"""fundus_batch.metrics.harm: how much an enhancer changed an image, and the pixels it moved
further from the clean image."""

from __future__ import annotations

import numpy as np
import pytest

from fundus_batch.metrics.harm import mean_change, new_error_map, new_error_share


def _images() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    clean = np.full((4, 4, 3), 100, np.uint8)
    degraded = clean.copy()
    degraded[0, :, 0] = 150  # 50 levels off in red along the top row
    enhanced = degraded.copy()
    enhanced[0, 0, 0] = 100  # mended
    enhanced[1, 0, 1] = 141  # 41 levels worse than the degraded, in green only
    enhanced[2, 0, 2] = 140  # 40 levels worse: not more than the limit
    enhanced[0, 1, 0] = 200  # 100 off where the degraded was 50 off: 50 worse
    return enhanced, degraded, clean


def test_new_error_counts_pixels_more_than_40_levels_worse_in_any_channel() -> None:
    enhanced, degraded, clean = _images()
    expected = np.zeros((4, 4), bool)
    expected[1, 0] = expected[0, 1] = True
    assert np.array_equal(new_error_map(enhanced, degraded, clean), expected)
    assert new_error_share(enhanced, degraded, clean, np.full((4, 4), 255, np.uint8)) == 2 / 16


def test_new_error_share_counts_only_the_field_of_view() -> None:
    enhanced, degraded, clean = _images()
    fov = np.zeros((4, 4), bool)
    fov[0] = True  # the top row holds (0, 1), not (1, 0)
    assert new_error_share(enhanced, degraded, clean, fov) == 1 / 4


def test_new_error_rejects_images_of_different_shapes() -> None:
    enhanced, degraded, clean = _images()
    with pytest.raises(ValueError, match="shapes differ"):
        new_error_map(enhanced[:2], degraded, clean)


def test_mean_change_averages_the_fov_pixels_and_channels_and_is_zero_only_when_equal() -> None:
    before = np.zeros((4, 4, 3), np.uint8)
    after = before.copy()
    after[0, 0] = (30, 60, 90)  # 60 on average over the channels, inside the FOV
    after[3, 3] = 255  # outside the FOV: does not count
    mask = np.full((4, 4), 255, np.uint8)
    mask[3, 3] = 0
    assert mean_change(before, after, mask) == pytest.approx(60 / 15)
    assert mean_change(after, before, mask) == pytest.approx(60 / 15)
    after[0, 0] = 0
    assert mean_change(before, after, mask) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        mean_change(before, after[:2], mask)
