"""The operators reproduce PIL ImageEnhance and OpenCV GaussianBlur semantics exactly."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from fundus_batch.degrade import ops
from fundus_batch.degrade.params import SpotRecord

BORDER = cv2.BORDER_REFLECT_101


def _random_image(rng: np.random.Generator, h: int = 41, w: int = 57) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pil_chain(image: np.ndarray, b: float, c: float, s: float) -> np.ndarray:
    pil = Image.fromarray(image)
    pil = ImageEnhance.Brightness(pil).enhance(b)
    pil = ImageEnhance.Contrast(pil).enhance(c)
    pil = ImageEnhance.Color(pil).enhance(s)
    return np.asarray(pil)


def test_luma_equals_pil_convert_l() -> None:
    rng = np.random.default_rng(0)
    image = _random_image(rng, 64, 64)
    expected = np.asarray(Image.fromarray(image).convert("L"))
    np.testing.assert_array_equal(ops.luma(image), expected)


@pytest.mark.parametrize("seed", range(8))
def test_color_jitter_equals_pil_image_enhance_chain(seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = _random_image(rng)
    # factors inside and outside [0, 1] (PIL's interpolation and extrapolation branches)
    b, c, s = rng.uniform(0.3, 1.7, size=3)
    np.testing.assert_array_equal(ops.color_jitter(image, b, c, s), _pil_chain(image, b, c, s))


@pytest.mark.parametrize("which", ["brightness", "contrast", "saturation"])
def test_each_colour_factor_alone_equals_pil(which: str) -> None:
    rng = np.random.default_rng(11)
    enhancer = {
        "brightness": ImageEnhance.Brightness,
        "contrast": ImageEnhance.Contrast,
        "saturation": ImageEnhance.Color,
    }[which]
    for _ in range(20):
        image = _random_image(rng, 23, 31)
        factor = float(rng.uniform(0.0, 2.0))
        factors = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, which: factor}
        ours = ops.color_jitter(image, **factors)
        expected = np.asarray(enhancer(Image.fromarray(image)).enhance(factor))
        np.testing.assert_array_equal(ours, expected)


def test_to_unit_float_is_x_over_255_in_float32() -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    out32 = ops.to_unit_float(values)
    out64 = ops.to_unit_float(values, np.float64)
    assert out32.dtype == np.float32 and out64.dtype == np.float64
    expected = values.astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(out32, expected)
    np.testing.assert_array_equal(out64, expected.astype(np.float64))


@pytest.mark.parametrize("radius", [0, 1, 3, 12, 57, 149])
def test_disc_is_a_filled_cv2_circle(radius: int) -> None:
    canvas = np.zeros((300, 320), np.uint8)
    cv2.circle(canvas, (150, 140), radius, 1, -1)
    np.testing.assert_array_equal(ops.disc((300, 320), (150, 140), radius), canvas.astype(bool))


@pytest.mark.parametrize(
    ("h", "w", "k_w", "k_h", "sigma"),
    [
        (512, 512, 237, 237, 158.0),
        (512, 512, 211, 219, 175.2),
        (96, 80, 31, 61, 20.0),
        (40, 300, 45, 33, 9.5),
    ],
)
def test_large_kernel_blur_matches_opencv_float64(
    h: int, w: int, k_w: int, k_h: int, sigma: float
) -> None:
    rng = np.random.default_rng(3)
    src = rng.random((h, w)) - 0.3  # signed values too
    ours = ops._gaussian(src, k_w, k_h, sigma)
    ref = cv2.GaussianBlur(src, (k_w, k_h), sigma, sigmaY=sigma, borderType=BORDER)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-12


def test_large_kernel_blur_is_exactly_zero_out_of_reach() -> None:
    src = np.zeros((200, 200))
    src[90:110, 90:110] = 1.0
    ours = ops._gaussian(src, 41, 41, 30.0)
    # the square covers 90..109 and the kernel reaches 20 px: nonzero exactly on 70..129
    assert np.all(ours[:, :70] == 0.0) and np.all(ours[130:, :] == 0.0)
    assert np.all(ours[70:130, 70:130] > 0.0)


def _full_image_spot(image: np.ndarray, spot: SpotRecord) -> np.ndarray:
    """Reference: blur the whole amplitude map with OpenCV and add it everywhere."""
    h, w = image.shape[:2]
    plane = ops.disc((h, w), spot.center, spot.radius // 2) * spot.amplitude
    spread = cv2.GaussianBlur(plane, (spot.k_w, spot.k_h), spot.sigma, borderType=BORDER)
    return np.clip(image.astype(np.float64) + spread[..., None], 0.0, 1.0)


@pytest.mark.parametrize("center", [(100, 100), (7, 7), (192, 100), (100, 195), (199, 0), (0, 150)])
def test_spot_box_equals_whole_image_blur(center: tuple[int, int]) -> None:
    rng = np.random.default_rng(5)
    image = rng.random((200, 200, 3)).astype(np.float32)
    spot = SpotRecord(14, center, 9, 7, 30.0, 0.3, (1.0, 1.0, 1.0))
    ours = ops.spots(image, [spot])
    np.testing.assert_allclose(ours, _full_image_spot(image, spot), rtol=0, atol=1e-12)
    assert ours.dtype == np.float64


@pytest.mark.parametrize("center", [(256, 256), (60, 300), (450, 80)])
def test_hole_box_equals_whole_image_blur(center: tuple[int, int]) -> None:
    rng = np.random.default_rng(6)
    image = rng.random((512, 512, 3))
    ours = ops.hole(image, center, 204, -0.28, 113, 151, 120.8)
    plane = ops.disc((512, 512), center, 102).astype(np.float64)
    spread = cv2.GaussianBlur(plane, (113, 151), 120.8, borderType=BORDER)
    expected = np.clip(image + (-0.28 * spread)[..., None], 0.0, 1.0)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)


def test_halo_adds_the_colour_weighted_blurred_ring() -> None:
    image = np.full((128, 128, 3), 0.25, np.float32)
    color = (141, 238, 238)
    ours = ops.halo(image, (60, 70), 90.0, 200.0, 31, 20.0, color)
    ring = ops.disc((128, 128), (60, 70), 100) & ~ops.disc((128, 128), (60, 70), 45)
    spread = cv2.GaussianBlur(ring.astype(np.float64), (31, 31), 20.0, borderType=BORDER)
    weights = np.asarray(color) / 255.0
    expected = np.clip(0.25 + 0.25 * spread[..., None] * weights, 0.0, 1.0)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    assert ours[70, 60, 0] == pytest.approx(0.25)  # centre untouched: inside the inner disc


def test_halo_with_its_inner_diameter_larger_draws_the_same_ring() -> None:
    """The released code's ring is |mask_a - mask_b|: the order of the diameters is free."""
    image = np.full((128, 128, 3), 0.25, np.float32)
    args = (31, 20.0, (141, 238, 238))
    swapped = ops.halo(image, (60, 70), 200.0, 90.0, *args)
    np.testing.assert_array_equal(swapped, ops.halo(image, (60, 70), 90.0, 200.0, *args))
    assert (swapped != 0.25).any()


def test_blur_keeps_float32_and_clips() -> None:
    rng = np.random.default_rng(8)
    image = rng.random((64, 64, 3)).astype(np.float32)
    out = ops.blur(image, 5, 3, 9.0)
    assert out.dtype == np.float32
    ref = cv2.GaussianBlur(image, (5, 3), 9.0, borderType=BORDER)
    np.testing.assert_array_equal(out, np.clip(ref, 0, 1))


def test_to_uint8_truncates_and_masks() -> None:
    image = np.array([[[0.999, 0.5, 1.0], [0.2, 0.2, 0.2]]])
    mask = np.array([[True, False]])
    out = ops.to_uint8(image, mask)
    assert out.tolist() == [[[254, 127, 255], [0, 0, 0]]]
    assert ops.to_uint8(image, None)[0, 1].tolist() == [51, 51, 51]


def test_fov_mean_counts_background_in_the_numerator() -> None:
    image = np.zeros((10, 10, 3))
    image[:5] = 0.6  # FOV half
    image[5:] = 0.3  # background lifted by jitter/halo
    mask = np.zeros((10, 10), bool)
    mask[:5] = True
    assert ops.fov_mean(image, mask) == pytest.approx((0.6 * 50 + 0.3 * 50) / 50)
    with pytest.raises(ValueError, match="empty"):
        ops.fov_mean(image, np.zeros((10, 10), bool))


def test_reused_scratch_buffers_do_not_leak_between_calls() -> None:
    rng = np.random.default_rng(9)
    big = rng.random((256, 256, 3))
    small = rng.random((96, 96, 3))
    first = ops.hole(big, (120, 130), 120, -0.3, 71, 81, 50.0)
    ops.halo(small, (40, 50), 60.0, 150.0, 41, 27.0, (141, 238, 238))
    ops.hole(small, (50, 40), 40, -0.2, 33, 35, 20.0)
    again = ops.hole(big, (120, 130), 120, -0.3, 71, 81, 50.0)
    np.testing.assert_array_equal(first, again)


# ---- the run-based blur of discs and rings (halo, hole) against OpenCV on the whole map


@pytest.mark.parametrize(
    ("shape", "center", "radius"),
    [
        ((300, 320), (150, 140), 57),
        ((300, 320), (5, 290), 40),  # cut by two borders
        ((64, 64), (-30, 20), 40),  # centre outside the image
        ((64, 64), (30, 30), 500),  # covers the whole image
        ((64, 64), (200, 200), 10),  # entirely outside
        ((40, 50), (10, 10), 0),
    ],
)
def test_disc_spans_are_the_rows_of_disc(
    shape: tuple[int, int], center: tuple[int, int], radius: int
) -> None:
    a, b = ops._disc_spans(shape, center, radius)
    rows = np.zeros(shape, bool)
    for y in range(shape[0]):
        rows[y, a[y] : b[y]] = True
    np.testing.assert_array_equal(rows, ops.disc(shape, center, radius))
    assert np.all((b > a) | ((a == 0) & (b == 0)))  # empty rows are written [0, 0)


def _check_against_opencv(ours: np.ndarray, ref: np.ndarray) -> None:
    assert np.abs(ours - ref).max() < 1e-12
    np.testing.assert_array_equal(ours == 0.0, ref == 0.0)  # exact zeros out of reach


@pytest.mark.parametrize(
    ("shape", "center", "diameter", "k_w", "k_h"),
    [
        ((512, 512), (256, 256), 300, 181, 205),
        ((512, 512), (20, 490), 260, 193, 171),  # mirrored runs at two borders
        ((96, 80), (40, 50), 60, 159, 191),  # half a kernel = the image size - 1
        ((200, 200), (100, 100), 50, 3, 1),
    ],
)
def test_hole_blur_matches_opencv_on_the_whole_map(
    shape: tuple[int, int], center: tuple[int, int], diameter: int, k_w: int, k_h: int
) -> None:
    sigma = 2 / 3 * max(k_w, k_h) * 1.2
    ours = ops.hole(np.zeros((*shape, 3)), center, diameter, 1.0, k_w, k_h, sigma)
    plane = ops.disc(shape, center, diameter // 2).astype(np.float64)
    ref = cv2.GaussianBlur(plane, (k_w, k_h), sigma, sigmaY=sigma, borderType=BORDER)
    _check_against_opencv(ours[..., 0], ref)
    np.testing.assert_array_equal(ours[..., 0], ours[..., 2])


@pytest.mark.parametrize(
    ("center", "dia_a", "dia_b", "kernel"),
    [
        ((205, 268), 390.7, 1043.9, 223),  # outer circle beyond the image (real record)
        ((261, 235), 494.9, 795.8, 59),
        ((300, 200), 450.0, 600.0, 1023),  # half a kernel = the image size - 1
        ((256, 256), 500.0, 400.0, 101),  # inner diameter above the outer: the ring between
    ],
)
def test_halo_blur_matches_opencv_on_the_whole_map(
    center: tuple[int, int], dia_a: float, dia_b: float, kernel: int
) -> None:
    sigma = 2 * kernel / 3
    image = np.zeros((512, 512, 3))
    assert not ops.halo(image, center, dia_a, dia_b, kernel, sigma, (255, 255, 255)).any()
    image[..., 1:] = 1.0  # mean 2/3; channel 0 then holds exactly the added ring
    ours = ops.halo(image, center, dia_a, dia_b, kernel, sigma, (255, 255, 255))
    inner, outer = sorted((int(dia_a // 2), int(dia_b // 2)))  # the released |mask_a - mask_b|
    ring = ops.disc((512, 512), center, outer) & ~ops.disc((512, 512), center, inner)
    ref = cv2.GaussianBlur(ring.astype(np.float64), (kernel, kernel), sigma, borderType=BORDER)
    _check_against_opencv(ours[..., 0], ref * (2 / 3))


def test_kernel_wider_than_the_image_falls_back_to_opencv_semantics() -> None:
    rng = np.random.default_rng(4)
    image = rng.random((40, 40, 3))
    ours = ops.hole(image, (20, 18), 16, -0.3, 101, 95, 70.0)
    plane = ops.disc((40, 40), (20, 18), 8).astype(np.float64)
    spread = cv2.GaussianBlur(plane, (101, 95), 70.0, borderType=BORDER)
    expected = np.clip(image + (-0.3 * spread)[..., None], 0.0, 1.0)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)


def test_operators_write_into_out_exactly_as_into_a_new_array() -> None:
    rng = np.random.default_rng(12)
    image = rng.random((128, 128, 3))
    spot = SpotRecord(14, (60, 70), 9, 7, 30.0, 0.3, (1.0, 1.0, 1.0))
    calls = [
        lambda img, **kw: ops.halo(img, (60, 70), 90.0, 200.0, 31, 20.0, (141, 238, 238), **kw),
        lambda img, **kw: ops.hole(img, (50, 64), 60, -0.25, 41, 45, 30.0, **kw),
        lambda img, **kw: ops.spots(img, [spot], **kw),
    ]
    for call in calls:
        fresh = call(image)
        buffer = image.copy()
        assert call(buffer, out=buffer) is buffer  # in place
        np.testing.assert_array_equal(buffer, fresh)
        other = np.empty_like(image)
        assert call(image, out=other) is other
        np.testing.assert_array_equal(other, fresh)
        with pytest.raises(ValueError, match="out must be"):
            call(image, out=np.empty((128, 128, 3), np.float32))
    blurred = np.empty_like(image)
    np.testing.assert_array_equal(
        ops.blur(image, 5, 3, 2.0, out=blurred), ops.blur(image, 5, 3, 2.0)
    )
    with pytest.raises(ValueError, match="out must be"):
        ops.blur(image, 5, 3, 2.0, out=image)


def _naive_disc(shape: tuple[int, int], center: tuple[int, int], radius: int) -> np.ndarray:
    """The disc test in Python integers (no overflow at any centre)."""
    h, w = shape
    cx, cy = center
    return np.array(
        [[(x - cx) ** 2 + (y - cy) ** 2 <= radius * radius for x in range(w)] for y in range(h)]
    )


@pytest.mark.parametrize(
    "center",
    [
        (2**32 + 5, 5),  # (x - cx)^2 wraps around to a small int64: used to fill the image
        (3037000500, 5),  # (x - cx)^2 just past int64: used to set scattered pixels
        (5, -(2**40)),
        (-(2**62), 2**62),
        (2**63 + 7, 3),  # not an int64 at all: used to raise OverflowError
        (-12, 20),  # near the rim just outside: clamping must not touch these
        (50, 60),
        (61, 20),
    ],
)
def test_disc_and_its_spans_are_exact_for_far_out_centres(center: tuple[int, int]) -> None:
    shape, radius = (24, 40), 11
    expected = _naive_disc(shape, center, radius)
    np.testing.assert_array_equal(ops.disc(shape, center, radius), expected)
    a, b = ops._disc_spans(shape, center, radius)
    rows = np.zeros(shape, bool)
    for y in range(shape[0]):
        rows[y, a[y] : b[y]] = True
    np.testing.assert_array_equal(rows, expected)


def test_operators_with_a_far_out_centre_leave_the_image_unchanged() -> None:
    image = np.random.default_rng(0).uniform(0.2, 0.8, (64, 64, 3))
    spot = SpotRecord(8, (2**32 + 5, 5), 5, 5, 2.0, 0.9, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(ops.spots(image, [spot]), image)
    np.testing.assert_array_equal(ops.hole(image, (2**63, 5), 40, -0.3, 31, 31, 9.0), image)
    far_ring = ops.halo(image, (-(2**63), 7), 10.0, 60.0, 31, 9.0, (255, 255, 255))
    np.testing.assert_array_equal(far_ring, image)
