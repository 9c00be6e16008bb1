"""Replaying the released script's JSON records reproduces its output images (oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_batch.degrade import TYPE_CODES, DegradationRecord, ops, replay

CASES = ("01_dr", "13_left")


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.shared
@pytest.mark.parametrize("code", TYPE_CODES)
@pytest.mark.parametrize("case", CASES)
def test_replay_of_released_json_matches_released_output(
    oracle_dir: Path, case: str, code: str
) -> None:
    folder = oracle_dir / "degrade" / case
    image = _read_rgb(folder / "input.png")
    mask = cv2.imread(str(folder / "mask.png"), cv2.IMREAD_GRAYSCALE)
    record = DegradationRecord.from_released(json.loads((folder / f"{code}.json").read_text()))
    ours = replay(image, mask, record)
    assert _psnr(ours, _read_rgb(folder / f"{code}.png")) >= 40.0


@pytest.mark.shared
@pytest.mark.parametrize("case", CASES)
def test_released_hole_strengths_fit_the_unmasked_fov_mean(oracle_dir: Path, case: str) -> None:
    """The hole's mu sums the whole image (background too) over the mask area (section 2.3)."""
    folder = oracle_dir / "degrade" / case
    image = _read_rgb(folder / "input.png")
    fov = cv2.imread(str(folder / "mask.png"), cv2.IMREAD_GRAYSCALE) > 127
    for code in ("001", "011", "101", "111"):
        record = DegradationRecord.from_released(json.loads((folder / f"{code}.json").read_text()))
        c, h = record.color, record.halo
        current = ops.to_unit_float(ops.color_jitter(image, c.brightness, c.contrast, c.saturation))
        current = ops.halo(current, h.center, h.dia_a, h.dia_b, h.kernel, h.sigma, h.color)
        mu = ops.fov_mean(current, fov)
        # f ~ U(b0 - 0.06 mu, b0 - 0.05 mu) with b0 ~ U(-0.262, -0.26)
        assert -0.262 - 0.06 * mu <= record.hole.strength <= -0.26 - 0.05 * mu
