"""Tests for fundus_batch.fov: circle detection, masks, cropping, failures, real photographs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_batch import fov as fov_module
from fundus_batch.fov import (
    Circle,
    FOVError,
    Preprocessed,
    circle_mask,
    crop_to_fov,
    detect_fov,
    preprocess,
)
from fundus_batch.io.codecs import decode_image


def _fundus(
    w: int,
    h: int,
    cx: float,
    cy: float,
    r: float,
    *,
    seed: int = 0,
    gain: float = 1.0,
    notch: bool = False,
    full_frame: bool = False,
    bars: tuple[int, int] | None = None,
) -> np.ndarray:
    """Textured, vignetted orange disc on a noisy black surround (a raw camera photograph)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.hypot(xx - cx, yy - cy) / r
    coarse = rng.normal(0.0, 1.0, (max(2, h // 32), max(2, w // 32))).astype(np.float32)
    texture = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    shade = (1.0 - 0.45 * np.clip(d, 0.0, 1.5) ** 2) * (1.0 + 0.08 * texture)
    img = np.array([190.0, 95.0, 45.0], np.float32) * shade[..., None] * gain
    inside = d <= 1.0
    if notch:  # small square marker sticking out of the rim at about 1 o'clock
        nx, ny = cx + 1.02 * r * np.cos(-np.pi / 3), cy + 1.02 * r * np.sin(-np.pi / 3)
        inside |= (np.abs(xx - nx) <= 0.04 * r) & (np.abs(yy - ny) <= 0.04 * r)
    if not full_frame:
        img = np.where(inside[..., None], img, 0.0)
    img = img + rng.normal(0.0, 3.0, img.shape)
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if bars is not None:
        out[: bars[0]] = 0
        out[bars[1] :] = 0
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float((a & b).sum() / max(1, (a | b).sum()))


KNOWN = {
    "centred": ((800, 600, 400.0, 300.0, 260.0), {}, "ok"),
    "off_centre": ((900, 700, 430.0, 362.0, 300.0), {"seed": 1}, "ok"),
    "clipped_top_bottom": ((1000, 600, 500.0, 300.0, 390.0), {"seed": 2}, "clipped"),
    "dim": ((800, 600, 400.0, 300.0, 250.0), {"seed": 3, "gain": 0.18}, "ok"),
    "notch": ((800, 600, 400.0, 300.0, 260.0), {"seed": 4, "notch": True}, "ok"),
    "large_frame": ((2592, 1944, 1296.0, 972.0, 900.0), {"seed": 5}, "ok"),
    "small_frame": ((200, 160, 100.0, 80.0, 70.0), {"seed": 6}, "ok"),
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_detects_known_circles(name: str) -> None:
    (w, h, cx, cy, r), kwargs, status = KNOWN[name]
    found = detect_fov(_fundus(w, h, cx, cy, r, **kwargs))
    c = found.circle
    assert np.hypot(c.cx - cx, c.cy - cy) < 1.0 + 0.002 * r
    assert abs(c.r - r) < 1.0 + 0.002 * r
    assert found.status == status
    assert found.mask.shape == (h, w) and found.mask.dtype == np.uint8
    assert set(np.unique(found.mask)) <= {0, 255}
    truth = circle_mask(h, w, Circle(cx, cy, r))
    assert _iou(found.mask, truth) > 0.99


def test_notch_is_not_part_of_the_circle() -> None:
    img = _fundus(800, 600, 400.0, 300.0, 260.0, seed=4, notch=True)
    found = detect_fov(img)
    nx, ny = 400 + 1.02 * 260 * np.cos(-np.pi / 3), 300 + 1.02 * 260 * np.sin(-np.pi / 3)
    assert found.mask[round(ny), round(nx)] == 0


def test_black_bars_clip_the_circle_and_the_mask() -> None:
    # Like an already-cropped 512 image: circle touching left/right, black bars top and bottom.
    img = _fundus(512, 512, 255.5, 255.5, 255.0, seed=7, bars=(60, 450))
    found = detect_fov(img)
    assert found.status == "clipped"
    assert abs(found.circle.r - 255.0) < 2.0
    x0, y0, x1, y1 = found.box
    assert (x0, x1) == (0, 512)
    assert abs(y0 - 60) <= 2 and abs(y1 - 450) <= 2
    assert not found.mask[:y0].any() and not found.mask[y1:].any()
    truth = circle_mask(512, 512, Circle(255.5, 255.5, 255.0), (0, 60, 512, 450))
    assert _iou(found.mask, truth) > 0.99


def test_full_frame_photograph_gets_the_inscribed_circle() -> None:
    img = _fundus(800, 600, 400.0, 300.0, 500.0, full_frame=True)
    found = detect_fov(img)
    assert found.status == "full_frame"
    assert found.circle == Circle(399.5, 299.5, 300.0)
    np.testing.assert_array_equal(found.mask, circle_mask(600, 800, Circle(399.5, 299.5, 300.0)))


def test_circle_clipped_on_all_four_sides_is_fitted_from_the_corners() -> None:
    img = _fundus(800, 600, 400.0, 300.0, 460.0, seed=8)  # only the frame corners are dark
    found = detect_fov(img)
    assert found.status == "clipped"
    assert np.hypot(found.circle.cx - 400.0, found.circle.cy - 300.0) < 2.0
    assert abs(found.circle.r - 460.0) < 3.0


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (np.zeros((600, 800, 3), np.uint8), "blank"),
        (np.full((600, 800, 3), 255, np.uint8), "blank"),
        (np.full((600, 800, 3), 90, np.uint8), "blank"),
    ],
)
def test_uniform_images_are_blank(image: np.ndarray, reason: str) -> None:
    with pytest.raises(FOVError) as info:
        detect_fov(image)
    assert info.value.reason == reason


def test_random_noise_is_not_a_fundus() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    with pytest.raises(FOVError):
        detect_fov(noise)


def test_full_frame_noise_is_rejected_as_not_a_photograph() -> None:
    rng = np.random.default_rng(1)
    noise = rng.integers(100, 256, (600, 800, 3), dtype=np.uint8)
    with pytest.raises(FOVError) as info:
        detect_fov(noise)
    assert info.value.reason in {"no_fov", "too_small", "no_circle"}


def test_tiny_fov_is_too_small() -> None:
    with pytest.raises(FOVError) as info:
        detect_fov(_fundus(800, 600, 400.0, 300.0, 25.0))
    assert info.value.reason == "too_small"


@pytest.mark.parametrize(
    "shape",
    [
        (slice(150, 450), slice(250, 550)),  # square
        (slice(200, 400), slice(150, 650)),  # wide rectangle
    ],
)
def test_non_circular_bright_regions_are_rejected(shape: tuple[slice, slice]) -> None:
    img = np.zeros((600, 800, 3), np.uint8)
    img[shape] = (180, 90, 40)
    with pytest.raises(FOVError) as info:
        detect_fov(img)
    assert info.value.reason == "no_circle"


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((100, 100), np.uint8),
        np.zeros((100, 100, 4), np.uint8),
        np.zeros((100, 100, 3), np.float32),
        np.zeros((10, 100, 3), np.uint8),
    ],
)
def test_bad_input_is_a_typed_error(bad: np.ndarray) -> None:
    with pytest.raises(FOVError) as info:
        detect_fov(bad)
    assert isinstance(info.value, ValueError)
    assert info.value.reason in {"invalid_input", "too_small"}


def test_detection_is_deterministic() -> None:
    img = _fundus(900, 700, 430.0, 362.0, 300.0, seed=1, notch=True)
    a, b = detect_fov(img), detect_fov(img)
    assert a.circle == b.circle and np.array_equal(a.mask, b.mask)


def test_circle_mask_follows_pixel_centres() -> None:
    mask = circle_mask(7, 9, Circle(4.0, 3.0, 2.0))
    yy, xx = np.mgrid[0:7, 0:9]
    expected = ((xx - 4.0) ** 2 + (yy - 3.0) ** 2 <= 4.0).astype(np.uint8) * 255
    np.testing.assert_array_equal(mask, expected)
    boxed = circle_mask(7, 9, Circle(4.0, 3.0, 2.0), (0, 2, 9, 7))
    np.testing.assert_array_equal(boxed[2:], expected[2:])
    assert not boxed[:2].any()


def test_circle_mask_matches_a_distance_test_for_random_circles() -> None:
    rng = np.random.default_rng(21)
    yy, xx = np.mgrid[0:61, 0:83]
    for _ in range(200):
        circle = Circle(*rng.uniform(-30.0, 110.0, 2), float(rng.uniform(0.3, 60.0)))
        box = (int(rng.integers(-5, 40)), int(rng.integers(-5, 30)), 90, int(rng.integers(31, 70)))
        inside = (xx - circle.cx) ** 2 + (yy - circle.cy) ** 2 <= circle.r**2
        inside &= (xx >= box[0]) & (xx < box[2]) & (yy >= box[1]) & (yy < box[3])
        expected = inside.astype(np.uint8) * 255
        np.testing.assert_array_equal(circle_mask(61, 83, circle, box), expected)


def test_circle_fit_is_exact_on_a_circle_and_survives_collinear_points() -> None:
    angles = np.linspace(0.3, 2.0, 50)  # an arc, not the whole circle
    x, y = 40.0 + 25.0 * np.cos(angles), -7.0 + 25.0 * np.sin(angles)
    cx, cy, r = fov_module._fit_circle(x, y)
    assert abs(cx - 40.0) < 1e-9 and abs(cy + 7.0) < 1e-9 and abs(r - 25.0) < 1e-9
    line = np.arange(10.0)
    assert all(np.isfinite(fov_module._fit_circle(line, 2.0 * line + 1.0)))


def test_circle_scaling_maps_pixel_centres() -> None:
    c = Circle(10.0, 20.0, 5.0).scaled(2.0)
    assert c == Circle(20.5, 40.5, 10.0)
    assert c.scaled(0.5) == Circle(10.0, 20.0, 5.0)


def test_crop_without_resize_is_an_exact_masked_copy() -> None:
    img = _fundus(700, 600, 350.5, 300.5, 256.0, seed=9)
    circle = Circle(350.5, 300.5, 256.0)
    out, mask = crop_to_fov(img, circle, size=512)
    window = img[45:557, 95:607]
    expected_mask = circle_mask(512, 512, Circle(255.5, 255.5, 256.0))
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_array_equal(out, np.where(mask[..., None] > 0, window, 0))


def test_crop_output_is_binary_centred_and_zero_outside() -> None:
    img = _fundus(1200, 900, 610.5, 440.5, 400.0, seed=10)
    out, mask = crop_to_fov(img, Circle(610.5, 440.5, 400.0), size=256)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 255}
    assert not out[mask == 0].any()
    np.testing.assert_array_equal(mask, mask[::-1])
    np.testing.assert_array_equal(mask, mask[:, ::-1])
    assert abs((mask > 0).sum() / (np.pi * 128**2) - 1.0) < 0.01
    assert out[mask > 0].mean() > 60  # the fundus, not padding


def test_crop_of_a_clipped_circle_pads_with_zeros() -> None:
    img = _fundus(1000, 600, 500.0, 300.0, 390.0, seed=2)
    out, mask = crop_to_fov(img, Circle(500.0, 300.0, 390.0), size=390)
    # The 780 px square starts about 90 rows above the frame: at half scale, ~45 padding rows.
    rows = np.flatnonzero(mask.any(axis=1))
    assert rows[0] in (44, 45) and rows.size == 300  # the 600 frame rows at half scale
    assert mask[195, 5:-5].all()
    assert not out[: rows[0]].any() and not out[rows[-1] + 1 :].any()


def test_crop_honours_the_valid_box() -> None:
    img = _fundus(512, 512, 255.5, 255.5, 256.0, seed=7, bars=(60, 450))
    out, mask = crop_to_fov(img, Circle(255.5, 255.5, 256.0), size=512, box=(0, 60, 512, 450))
    assert not mask[:60].any() and not mask[450:].any()
    assert mask[60].any() and mask[449].any() and mask[255].all()
    np.testing.assert_array_equal(out, np.where(mask[..., None] > 0, img, 0))


def test_crop_centres_an_arbitrary_circle_to_half_a_source_pixel() -> None:
    img = _fundus(1200, 900, 610.3, 440.8, 401.7, seed=12)
    _, mask = crop_to_fov(img, Circle(610.3, 440.8, 401.7), size=512)
    ys, xs = np.nonzero(mask)
    scale = 512 / 803  # output pixels per source pixel
    assert abs(xs.mean() - 255.5) <= 0.5 * scale + 0.05
    assert abs(ys.mean() - 255.5) <= 0.5 * scale + 0.05


def test_crop_rejects_bad_arguments() -> None:
    img = _fundus(200, 160, 100.0, 80.0, 70.0)
    with pytest.raises(ValueError):
        crop_to_fov(img, Circle(100.0, 80.0, 70.0), size=0)
    with pytest.raises(FOVError):
        crop_to_fov(img, Circle(100.0, 80.0, 0.0))
    with pytest.raises(FOVError) as info:
        crop_to_fov(img, Circle(900.0, 80.0, 50.0))  # entirely right of the image
    assert info.value.reason == "no_overlap"


def test_preprocess_returns_working_image_and_is_stable_when_repeated() -> None:
    img = _fundus(1296, 972, 650.0, 486.0, 430.0, seed=11, notch=True)
    first = preprocess(img)
    assert isinstance(first, Preprocessed)
    found = detect_fov(img)
    image, mask = crop_to_fov(img, found.circle, 512, found.box)
    assert (first.circle, first.status, first.box) == (found.circle, found.status, found.box)
    np.testing.assert_array_equal(first.image, image)
    np.testing.assert_array_equal(first.mask, mask)
    assert first.image.shape == (512, 512, 3) and first.mask.shape == (512, 512)
    assert first.status == "ok"
    again = detect_fov(first.image)  # an already-preprocessed crop is a valid input
    assert np.hypot(again.circle.cx - 255.5, again.circle.cy - 255.5) < 1.5
    assert abs(again.circle.r - 256.0) < 2.0
    assert _iou(again.mask, first.mask) > 0.98


def test_skimage_retina() -> None:
    data = pytest.importorskip("skimage.data")
    try:
        rgb = data.retina()
    except Exception as exc:  # the sample image ships with scikit-image; skip if a build lacks it
        pytest.skip(f"skimage retina sample unavailable: {exc}")
    found = detect_fov(rgb)
    h, w = rgb.shape[:2]
    assert found.status == "ok"
    assert abs(found.circle.cx - w / 2) < 0.02 * w and abs(found.circle.cy - h / 2) < 0.02 * h
    assert 0.45 * min(h, w) < found.circle.r < 0.5 * min(h, w)
    # Independent check: the bright region (minus the small notch) agrees with the mask.
    bright = (cv2.GaussianBlur(rgb.max(axis=2), (5, 5), 0) > 40).astype(np.uint8) * 255
    assert _iou(found.mask, bright) > 0.98


# ---- real photographs from ../shared (skipped when it is absent) ----


@pytest.mark.shared
def test_hrf_fov_masks_match(shared_dir: Path) -> None:
    root = shared_dir / "data" / "hrf" / "training"
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in {".jpg", ".jpeg"})
    if not images:
        pytest.skip("no HRF images")
    ious = []
    for path in images:
        truth = cv2.imread(str(root / "mask" / f"{path.stem}_mask.tif"), cv2.IMREAD_GRAYSCALE)
        assert truth is not None, path
        rgb = decode_image(path.read_bytes(), min_side=500)  # quarter-size decode
        found = detect_fov(rgb)
        h, w = truth.shape
        circle = found.circle.scaled(w / rgb.shape[1], h / rgb.shape[0])
        ious.append(_iou(circle_mask(h, w, circle), truth))
    assert np.mean(ious) >= 0.97, ious
    assert min(ious) >= 0.95, ious


@pytest.mark.shared
def test_eyepacs_samples_all_succeed_with_sane_circles(shared_dir: Path) -> None:
    files = sorted((shared_dir / "data" / "eyepacs_sample").glob("*.jpeg"))
    if not files:
        pytest.skip("no EyePACS samples")
    for path in files:
        rgb = decode_image(path.read_bytes(), min_side=512)
        result = preprocess(rgb)
        h, w = rgb.shape[:2]
        c = result.circle
        assert result.status in {"ok", "clipped"}, path.name
        # Horizontal extent always inside the frame; clipping only ever cuts top and bottom.
        assert c.cx - c.r > -0.01 * w and c.cx + c.r < 1.01 * w, path.name
        assert abs(c.cx - w / 2) < 0.05 * w and abs(c.cy - h / 2) < 0.05 * h, path.name
        assert 0.4 * h < c.r < 0.7 * h, path.name
        if path.name.startswith("10_"):  # small-FOV, dim camera
            assert c.r < 0.5 * h and result.status == "ok"
        assert result.mask.mean() / 255 > 0.7  # most of the working square is fundus
        assert result.image[result.mask > 0].mean() > 25


@pytest.mark.shared
def test_cofenet_preprocessed_crops_match_their_masks(shared_dir: Path) -> None:
    root = shared_dir / "data" / "cofenet_lq"
    files = sorted((root / "image").glob("*.png"))
    if not files:
        pytest.skip("no Cofe-Net LQ images")
    ious = []
    for path in files:
        rgb = decode_image(path.read_bytes())
        mask = cv2.imread(str(root / "mask" / path.name), cv2.IMREAD_GRAYSCALE)
        truth = cv2.resize(mask, rgb.shape[1::-1], interpolation=cv2.INTER_AREA) > 127
        ious.append(_iou(detect_fov(rgb).mask, truth))
    assert np.mean(ious) >= 0.97, np.mean(ious)
