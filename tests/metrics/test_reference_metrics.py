"""Tests for the FOV-masked full-reference metrics (PSNR, SSIM, MS-SSIM)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fundus_batch.degrade import TYPE_CODES, degrade, sample_rng
from fundus_batch.metrics import (
    METRIC_VERSION,
    PSNR_CAP,
    REFERENCE_METRICS,
    FOVTooSmallError,
    ReferenceContext,
    finite,
    full_reference_metrics,
    ms_ssim,
    psnr,
    reference_context,
    ssim,
)
from fundus_batch.metrics.reference import MS_SSIM_WEIGHTS
from fundus_batch.synth import synth_fundus
from tests.metrics import float64_reference as f64

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]
METRICS: list[Metric] = [psnr, ssim, ms_ssim]


@pytest.fixture(scope="module")
def eye() -> tuple[np.ndarray, np.ndarray]:
    s = synth_fundus(320, seed=1)  # 5-scale MS-SSIM needs a FOV diameter of ~270 px
    return s.image, s.mask


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigma)


def _darken(img: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(img * factor + 0.5, 0, 255).astype(np.uint8)


def _noise(img: np.ndarray, sd: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, sd, img.shape), 0, 255).astype(np.uint8)


def _in_fov(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[mask == 0] = 0
    return out


def test_registry_names_and_version() -> None:
    assert METRIC_VERSION == "fb-metrics-1"
    assert {"psnr": psnr, "ssim": ssim, "ms_ssim": ms_ssim} == REFERENCE_METRICS


def test_identical_images_give_inf_psnr_and_unit_ssim(eye: tuple[np.ndarray, np.ndarray]) -> None:
    img, mask = eye
    assert psnr(img, img.copy(), mask) == math.inf
    assert ssim(img, img.copy(), mask) == pytest.approx(1.0, abs=1e-12)
    assert ms_ssim(img, img.copy(), mask) == pytest.approx(1.0, abs=1e-12)


def test_finite_caps_infinite_psnr_only() -> None:
    assert finite(math.inf) == PSNR_CAP
    assert finite(42.5) == 42.5
    assert finite(250.0, cap=60.0) == 60.0


def test_psnr_matches_skimage_on_a_full_mask(eye: tuple[np.ndarray, np.ndarray]) -> None:
    img, _ = eye
    full = np.ones(img.shape[:2], bool)
    for other in (_blur(img, 1.0), _noise(img, 8.0), _darken(img, 0.8)):
        expected = peak_signal_noise_ratio(img, other, data_range=255)
        assert psnr(img, other, full) == pytest.approx(expected, rel=1e-12)


def test_psnr_over_the_fov_equals_psnr_of_the_fov_pixels(
    eye: tuple[np.ndarray, np.ndarray],
) -> None:
    img, mask = eye
    other = _noise(img, 10.0)
    fov = mask > 0
    mse = np.mean((img[fov].astype(float) - other[fov].astype(float)) ** 2)
    assert psnr(img, other, mask) == pytest.approx(10 * np.log10(255**2 / mse), rel=1e-12)


def test_ssim_matches_skimage_on_a_full_mask(eye: tuple[np.ndarray, np.ndarray]) -> None:
    img, _ = eye
    full = np.full(img.shape[:2], 255, np.uint8)
    for other in (_blur(img, 1.5), _noise(img, 12.0)):
        expected = structural_similarity(
            img,
            other,
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
        )
        # An all-ones mask eroded by the window radius is exactly skimage's border crop. The
        # package computes in float32 (skimage in float64): measured differences are ~4e-7.
        assert ssim(img, other, full) == pytest.approx(expected, abs=1e-5)


def test_single_scale_ms_ssim_equals_ssim(eye: tuple[np.ndarray, np.ndarray]) -> None:
    img, mask = eye
    for other in (_blur(img, 2.0), _noise(img, 15.0), _darken(img, 0.7)):
        assert ms_ssim(img, other, mask, weights=(1.0,)) == pytest.approx(
            ssim(img, other, mask), abs=1e-9
        )


def test_ms_ssim_second_scale_is_skimage_ssim_of_the_pooled_images() -> None:
    s = synth_fundus(256, seed=2)
    other = _noise(_blur(s.image, 1.0), 4.0)

    def pool(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]) / 4

    _, smap = structural_similarity(
        pool(s.image),
        pool(other),
        channel_axis=2,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        full=True,
    )
    # Coarse FOV: pooled pixels whose four parents are all in the FOV, then eroded by 5 px.
    coarse = pool(s.mask > 0) == 1.0
    inner = cv2.erode(coarse.astype(np.uint8), np.ones((11, 11), np.uint8), borderValue=0) > 0
    expected = smap[inner].mean()
    # float32 in the package, float64 in skimage
    assert ms_ssim(s.image, other, s.mask, weights=(0.0, 1.0)) == pytest.approx(expected, abs=1e-5)


def test_ms_ssim_combines_scales_as_a_weighted_geometric_mean() -> None:
    s = synth_fundus(256, seed=2)
    grey = np.repeat(s.image[..., 1:2], 3, axis=2)  # equal channels: no averaging across them
    other = _blur(grey, 1.5)
    one = ms_ssim(grey, other, s.mask, weights=(1.0, 1.0, 1.0))
    assert 0.0 < one < 1.0
    assert ms_ssim(grey, other, s.mask, weights=(0.5, 0.5, 0.5)) == pytest.approx(
        math.sqrt(one), rel=1e-9
    )
    assert ms_ssim(grey, other, s.mask, weights=(1.0, 0.0, 0.0)) * ms_ssim(
        grey, other, s.mask, weights=(0.0, 1.0, 1.0)
    ) == pytest.approx(one, rel=1e-9)


def test_ms_ssim_weights_are_wang_2003() -> None:
    assert pytest.approx((0.0448, 0.2856, 0.3001, 0.2363, 0.1333)) == MS_SSIM_WEIGHTS


def test_ms_ssim_is_kinder_than_ssim_to_fine_scale_blur() -> None:
    s = synth_fundus(512, seed=2)
    blurred = _blur(s.image, 1.5)
    # Blur removes fine detail that coarse scales do not see, so MS-SSIM forgives more.
    assert ms_ssim(s.image, blurred, s.mask) > ssim(s.image, blurred, s.mask)


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.__name__)
def test_decreases_monotonically_with_blur(
    metric: Metric, eye: tuple[np.ndarray, np.ndarray]
) -> None:
    img, mask = eye
    values = [metric(img, _in_fov(_blur(img, s), mask), mask) for s in (0.7, 1.5, 3.0, 6.0)]
    assert all(a > b for a, b in itertools.pairwise(values)), values


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.__name__)
def test_decreases_monotonically_with_darkening(
    metric: Metric, eye: tuple[np.ndarray, np.ndarray]
) -> None:
    img, mask = eye
    values = [metric(img, _darken(img, f), mask) for f in (0.9, 0.7, 0.5, 0.3)]
    assert all(a > b for a, b in itertools.pairwise(values)), values


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.__name__)
def test_decreases_monotonically_with_noise(
    metric: Metric, eye: tuple[np.ndarray, np.ndarray]
) -> None:
    img, mask = eye
    values = [metric(img, _in_fov(_noise(img, sd), mask), mask) for sd in (2, 6, 15, 35)]
    assert all(a > b for a, b in itertools.pairwise(values)), values


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.__name__)
def test_pixels_outside_the_fov_are_ignored(
    metric: Metric, eye: tuple[np.ndarray, np.ndarray]
) -> None:
    img, mask = eye
    other = _noise(img, 10.0)
    base = metric(img, other, mask)
    rng = np.random.default_rng(5)
    outside = mask == 0
    img2, other2 = img.copy(), other.copy()
    img2[outside] = rng.integers(0, 256, (int(outside.sum()), 3), dtype=np.uint8)
    other2[outside] = 255
    assert metric(img2, other2, mask) == base


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.__name__)
def test_bool_and_uint8_masks_agree(metric: Metric, eye: tuple[np.ndarray, np.ndarray]) -> None:
    img, mask = eye
    other = _blur(img, 1.0)
    assert metric(img, other, mask) == metric(img, other, mask > 0)


def test_full_reference_metrics_returns_all_three(eye: tuple[np.ndarray, np.ndarray]) -> None:
    img, mask = eye
    other = _blur(img, 1.0)
    out = full_reference_metrics(img, other, mask)
    assert out == {
        "psnr": psnr(img, other, mask),
        "ssim": ssim(img, other, mask),
        "ms_ssim": ms_ssim(img, other, mask),
    }


def test_ms_ssim_rejects_a_fov_too_small_for_five_scales() -> None:
    s = synth_fundus(256, seed=0)
    with pytest.raises(FOVTooSmallError, match="5-scale"):
        ms_ssim(s.image, s.image, s.mask)
    assert ms_ssim(s.image, s.image, s.mask, weights=MS_SSIM_WEIGHTS[:3]) == pytest.approx(1.0)


def test_full_reference_metrics_marks_ms_ssim_missing_on_a_small_fov() -> None:
    s = synth_fundus(128, seed=0)
    other = _blur(s.image, 1.0)
    out = full_reference_metrics(s.image, other, s.mask)
    assert math.isnan(out["ms_ssim"])
    assert out["psnr"] == psnr(s.image, other, s.mask)
    assert out["ssim"] == ssim(s.image, other, s.mask)


def test_ssim_rejects_a_fov_smaller_than_its_window() -> None:
    img = np.full((40, 40, 3), 100, np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[10:20, 10:20] = True
    with pytest.raises(FOVTooSmallError):
        ssim(img, img, mask)


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.__name__)
def test_bad_inputs_raise_typed_errors(metric: Metric, eye: tuple[np.ndarray, np.ndarray]) -> None:
    img, mask = eye
    with pytest.raises(TypeError):
        metric(img.astype(np.float32), img, mask)
    with pytest.raises(TypeError):
        metric(img.tolist(), img, mask)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not match"):
        metric(img, img[:-1], mask)
    with pytest.raises(ValueError, match="RGB"):
        metric(img[..., 0], img[..., 0], mask)
    with pytest.raises(ValueError, match="mask shape"):
        metric(img, img, mask[:-1])
    with pytest.raises(ValueError, match="0 and 255"):
        metric(img, img, (mask > 0).astype(np.uint8))
    with pytest.raises(TypeError):
        metric(img, img, mask.astype(np.float32))
    with pytest.raises(ValueError, match="no pixels"):
        metric(img, img, np.zeros_like(mask))


# --- the float32 implementation against a float64 reference, and the shared clean context ---

FLOAT32_TOL = 1e-5  # SSIM / MS-SSIM, absolute; measured <= 6e-7 (the protocol promises 1e-4)


def _variants(img: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """One degraded variant per type code, plus a blurred, a noisy and a darkened copy."""
    out = [degrade(img, mask, code, sample_rng(7, "v", i))[0] for i, code in enumerate(TYPE_CODES)]
    return [*out, _blur(img, 2.0), _noise(img, 20.0), _darken(img, 0.4)]


def _assert_close_to_reference(got: dict[str, float], ref: dict[str, float]) -> None:
    assert got.keys() == ref.keys()
    for key in ref:
        if math.isnan(ref[key]) or math.isinf(ref[key]):
            assert got[key] == ref[key] or (math.isnan(got[key]) and math.isnan(ref[key])), key
        elif key == "psnr":
            assert got[key] == pytest.approx(ref[key], abs=1e-9), key
        else:
            assert got[key] == pytest.approx(ref[key], abs=FLOAT32_TOL), key


@pytest.mark.parametrize("size", [512, 320])
def test_full_reference_metrics_equal_the_float64_reference_on_degraded_variants(
    size: int,
) -> None:
    s = synth_fundus(size, seed=11)
    fov = s.mask > 0
    ctx = reference_context(s.image, s.mask)
    for other in _variants(s.image, s.mask):
        expected = f64.full_reference(other, s.image, fov)
        _assert_close_to_reference(ctx.metrics(other), expected)
        _assert_close_to_reference(full_reference_metrics(other, s.image, s.mask), expected)


def _random_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A few random filled ellipses: irregular, possibly disconnected FOVs."""
    mask = np.zeros(shape, np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        center = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        axes = (int(rng.integers(20, shape[1])), int(rng.integers(20, shape[0])))
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    return mask


@pytest.mark.parametrize("seed", range(6))
def test_full_reference_metrics_equal_the_float64_reference_on_random_masks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(250, 520)), int(rng.integers(250, 520)))  # odd sizes too
    s = synth_fundus(max(shape), seed=seed)
    img = np.ascontiguousarray(s.image[: shape[0], : shape[1]])
    mask = _random_mask(rng, shape)
    if not mask.any():
        mask[shape[0] // 2, shape[1] // 2] = 255
    other = _noise(_blur(img, float(rng.uniform(0.5, 3.0))), float(rng.uniform(1, 15)), seed)
    expected = f64.full_reference(other, img, mask > 0)
    if math.isnan(f64.ssim(other, img, mask > 0)):  # nothing left after erosion
        with pytest.raises(FOVTooSmallError):
            full_reference_metrics(other, img, mask)
        return
    _assert_close_to_reference(full_reference_metrics(other, img, mask), expected)


def test_a_context_reused_for_many_images_gives_what_fresh_computation_gives(
    eye: tuple[np.ndarray, np.ndarray],
) -> None:
    img, mask = eye
    others = _variants(img, mask)
    ctx = reference_context(img, mask)
    # Interleaved: state kept in the context's work buffers must not leak between images.
    for other in [*others, *reversed(others)]:
        fresh = {"psnr": psnr(other, img, mask), "ssim": ssim(other, img, mask)}
        fresh["ms_ssim"] = ms_ssim(other, img, mask)
        assert ctx.metrics(other) == fresh
        assert full_reference_metrics(other, img, mask, context=ctx) == fresh
        assert ctx.ssim(other) == fresh["ssim"]
        assert ctx.ms_ssim(other) == fresh["ms_ssim"]
        assert ctx.psnr(other) == fresh["psnr"]


def test_identical_images_give_exactly_one_through_a_context(
    eye: tuple[np.ndarray, np.ndarray],
) -> None:
    img, mask = eye
    out = reference_context(img, mask).metrics(img.copy())
    assert out == {"psnr": math.inf, "ssim": 1.0, "ms_ssim": 1.0}


def test_a_context_from_another_image_or_mask_is_refused(
    eye: tuple[np.ndarray, np.ndarray],
) -> None:
    img, mask = eye
    other = _blur(img, 1.0)
    ctx = reference_context(img, mask)
    with pytest.raises(ValueError, match="different ref or mask"):
        full_reference_metrics(img, other, mask, context=ctx)
    smaller = cv2.erode(mask, np.ones((5, 5), np.uint8))
    with pytest.raises(ValueError, match="different ref or mask"):
        full_reference_metrics(other, img, smaller, context=ctx)
    with pytest.raises(ValueError, match="does not match"):
        ctx.metrics(other[:-2])
    with pytest.raises(ValueError, match="scales"):
        ReferenceContext(img, mask, scales=1).metrics(other)


def test_a_context_on_a_small_fov_gives_nan_ms_ssim_and_a_finite_ssim() -> None:
    s = synth_fundus(128, seed=0)
    other = _blur(s.image, 1.0)
    out = reference_context(s.image, s.mask).metrics(other)
    assert math.isnan(out["ms_ssim"])
    assert out["ssim"] == pytest.approx(f64.ssim(other, s.image, s.mask > 0), abs=FLOAT32_TOL)
    with pytest.raises(FOVTooSmallError, match="5-scale"):
        reference_context(s.image, s.mask).ms_ssim(other)


@pytest.mark.shared
def test_full_reference_metrics_equal_the_float64_reference_on_real_photographs(
    shared_dir: Path,
) -> None:
    images = sorted((shared_dir / "data" / "cofenet_lq" / "image").glob("*.png"))[:2]
    if not images:
        pytest.skip("cofenet_lq images not found")
    for path in images:
        img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        mask_path = next((path.parent.parent / "mask").glob(path.stem + ".*"))
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        size = (img.shape[1], img.shape[0])
        fov = cv2.resize(mask, size, interpolation=cv2.INTER_AREA) > 127
        ctx = reference_context(img, fov)
        for other in _variants(img, fov.astype(np.uint8) * 255)[::3]:
            _assert_close_to_reference(ctx.metrics(other), f64.full_reference(other, img, fov))


def test_ms_ssim_of_an_image_inverted_inside_the_fov_is_zero(
    eye: tuple[np.ndarray, np.ndarray],
) -> None:
    """Inverting the image makes its structure terms negative: they clip to 0, so the
    weighted geometric mean is 0, not a positive score from their magnitudes."""
    img, mask = eye
    inverted = _in_fov(255 - img, mask)
    assert ms_ssim(inverted, img, mask) == 0.0


def test_a_context_is_not_changed_by_refilling_the_buffer_it_was_built_from() -> None:
    """A notebook loop refills one buffer per photograph: a context built from it must keep
    scoring against the image it was built from (it held a reference; PSNR saw the new image
    and SSIM the old one)."""
    first = synth_fundus(128, seed=1)
    second = synth_fundus(128, seed=2)
    buffer = first.image.copy()
    mask = first.mask.copy()
    context = ReferenceContext(buffer, mask, scales=1)
    degraded, _ = degrade(first.image, first.mask, "001", sample_rng(0, "a", 0))
    before = (context.psnr(degraded), context.ssim(degraded))
    buffer[:] = second.image
    mask[:] = 0
    assert (context.psnr(degraded), context.ssim(degraded)) == before
    assert not context.matches(buffer, second.mask)  # a context of the old image, by value
