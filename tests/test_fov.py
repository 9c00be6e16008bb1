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
from fundus_batch.io.codecs import decode_image, encode_jpeg
from fundus_batch.synth import synth_fundus


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


# ---- clipped, glared and dim fields; mask-like images ----


def _jpeg(rgb: np.ndarray, quality: int = 90) -> np.ndarray:
    return decode_image(encode_jpeg(rgb, quality))


def _rim_glare(
    rgb: np.ndarray,
    circle: tuple[float, float, float],
    angle_deg: float,
    *,
    depth: float = 0.15,
    half_width_deg: float = 50.0,
    spill: float = 0.0,
) -> np.ndarray:
    """A saturated near-white crescent along the FOV edge around ``angle_deg`` (image
    coordinates), ``depth`` of the radius deep at its middle and tapering to nothing, reaching
    ``spill`` of the radius past the rim, edges softened like a lens does."""
    cx, cy, r = circle
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.hypot(xx - cx, yy - cy)
    off = np.abs((np.degrees(np.arctan2(yy - cy, xx - cx)) - angle_deg + 180.0) % 360.0 - 180.0)
    taper = np.clip(1.0 - off / half_width_deg, 0.0, 1.0)
    crescent = (taper > 0) & (d >= r * (1.0 - depth * taper)) & (d <= r * (1.0 + spill * taper))
    weight = cv2.GaussianBlur(crescent.astype(np.float32), (0, 0), 1.5)[..., None]
    out = rgb * (1.0 - weight) + weight * np.array([255.0, 250.0, 225.0], np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _assert_circle(
    found, truth: tuple[float, float, float], tol_frac: float, tol_px: float = 1.0
) -> None:
    cx, cy, r = truth
    c = found.circle
    tol = tol_px + tol_frac * r
    assert np.hypot(c.cx - cx, c.cy - cy) < tol and abs(c.r - r) < tol, (c, truth)


def _frame(rgb: np.ndarray, border: int) -> np.ndarray:
    """A thin black frame around the photograph, as some cameras write."""
    out = rgb.copy()
    if border:
        out[:border], out[-border:], out[:, :border], out[:, -border:] = 0, 0, 0, 0
    return out


CLIPPED = {
    # size of the FOV square, canvas (w, h), black frame width
    "top_bottom": (1000, (1100, 560), 0),
    "top_bottom_framed": (1000, (1100, 560), 8),
    "tall_circle": (1000, (1000, 600), 0),
    # wider than the frame too; with the frame the old fit said "not circular (19 % of its rim)"
    "all_sides_framed": (1180, (1100, 600), 8),
}


@pytest.mark.parametrize("name", sorted(CLIPPED))
def test_clipped_fields_are_found(name: str) -> None:
    size, canvas, border = CLIPPED[name]
    s = synth_fundus(size, seed=3, canvas=canvas)
    img = _jpeg(_frame(s.image, border))
    found = detect_fov(img)
    assert found.status == "clipped"
    _assert_circle(found, s.circle, 0.002)
    assert _iou(found.mask, _frame(s.mask[..., None], border)[..., 0]) > 0.99


@pytest.mark.parametrize("border", [4, 8])
def test_a_framed_field_cut_on_all_sides_never_gets_a_wrong_circle(border: int) -> None:
    # Only the four frame corners show rim; without the bar-corner check a circle fitted to
    # two of them was accepted 120-200 px off. Finding these fields is not solved: refusing is.
    s = synth_fundus(1300, seed=1, canvas=(1100, 700))
    img = _jpeg(_frame(s.image, border))
    try:
        found = detect_fov(img)
    except FOVError as exc:
        assert exc.reason == "no_circle"
    else:
        _assert_circle(found, s.circle, 0.01)


@pytest.mark.parametrize("angle", [0.0, 150.0, 200.0])
@pytest.mark.parametrize("border", [0, 4])
def test_rim_glare_on_a_clipped_field_keeps_the_circle(angle: float, border: int) -> None:
    s = synth_fundus(1000, seed=4, canvas=(1100, 560))
    glared = _frame(_rim_glare(s.image, s.circle, angle), border)
    found = detect_fov(_jpeg(glared))
    _assert_circle(found, s.circle, 0.003)
    assert found.status == "clipped"


def test_rim_glare_bleeding_past_the_aperture_is_cut_from_the_fit() -> None:
    # A narrow bulge 5 % of the radius past the rim: the trimmed refit lands within 0.1 px
    # (a plain least-squares fit is pulled about 1 px outwards).
    s = synth_fundus(1000, seed=5, canvas=(1100, 700))
    glared = _rim_glare(s.image, s.circle, 20.0, half_width_deg=30.0, spill=0.05)
    _assert_circle(detect_fov(_jpeg(glared)), s.circle, 0.0, tol_px=0.5)


@pytest.mark.parametrize("gain", [0.3, 0.1])
@pytest.mark.parametrize("canvas", [(800, 700), (1100, 560)])
def test_dim_fields_are_found(gain: float, canvas: tuple[int, int]) -> None:
    s = synth_fundus(700 if canvas[0] == 800 else 1000, seed=6, canvas=canvas)
    dim = np.round(s.image * gain).astype(np.uint8)
    found = detect_fov(_jpeg(dim))
    _assert_circle(found, s.circle, 0.003)
    assert _iou(found.mask, s.mask) > 0.99


def _disc_mask() -> np.ndarray:
    return synth_fundus(600, seed=7, canvas=(800, 600)).mask


def _vessel_map() -> np.ndarray:
    return synth_fundus(600, seed=7, canvas=(800, 600)).vessels


MASK_LIKE = {
    "white_disc": lambda: np.dstack([_disc_mask()] * 3),
    "white_disc_jpeg": lambda: decode_image(encode_jpeg(_disc_mask(), 75)),
    "grey_disc": lambda: np.dstack([_disc_mask() // 2] * 3),
    "noisy_disc": lambda: np.clip(
        np.dstack([_disc_mask()] * 3) + np.random.default_rng(0).normal(0.0, 6.0, (600, 800, 3)),
        0,
        255,
    ).astype(np.uint8),
    "vessel_map": lambda: np.dstack([_vessel_map()] * 3),
    "vessel_map_jpeg": lambda: decode_image(encode_jpeg(_vessel_map(), 75)),
}


@pytest.mark.parametrize("name", sorted(MASK_LIKE))
def test_mask_like_images_are_rejected_as_masks(name: str) -> None:
    with pytest.raises(FOVError) as info:
        preprocess(MASK_LIKE[name]())
    assert info.value.reason == "mask_like"
    assert "binary mask" in str(info.value) and "not a photograph" in str(info.value)


def test_a_photograph_and_its_dim_copy_are_not_mask_like() -> None:
    s = synth_fundus(600, seed=7, canvas=(800, 600))
    for gain in (1.0, 0.1):
        found = detect_fov(_jpeg(np.round(s.image * gain).astype(np.uint8)))
        assert _iou(found.mask, s.mask) > 0.99


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


def _shared_photographs(data: Path) -> dict[str, list[Path]]:
    jpg = {".jpg", ".jpeg"}
    hrf = data / "hrf" / "training" / "images"
    return {
        "hrf": sorted(p for p in hrf.glob("*") if p.suffix.lower() in jpg),
        "chase_db1": sorted((data / "chase_db1" / "images").glob("*.jpg")),
        "eyepacs_sample": sorted((data / "eyepacs_sample").glob("*.jpeg")),
        "eyepacs_more": sorted((data / "eyepacs_more").glob("*.jpeg")),
        "mx_dme": sorted((data / "mx_dme").glob("*.jpg")),
        "cofenet_lq": sorted((data / "cofenet_lq" / "image").glob("*.png")),
    }


@pytest.mark.shared
def test_every_shared_photograph_preprocesses(shared_dir: Path) -> None:
    """All photographs of all six folders (297 when complete), decoded as the pipeline does at
    --size 512 (JPEG reduced decode); about 15 s on 2 busy cores. The circle must be sane too:
    centre in the frame, radius between a quarter of the short side and the long side."""
    sources = _shared_photographs(shared_dir / "data")
    if not any(sources.values()):
        pytest.skip("no photographs in ../shared/data")
    failures = []
    for name, files in sources.items():
        for path in files:
            rgb = decode_image(path.read_bytes(), min_side=512)
            h, w = rgb.shape[:2]
            try:
                result = preprocess(rgb, 512)
            except FOVError as exc:
                failures.append(f"{name}/{path.name}: {exc.reason}: {exc}")
                continue
            c = result.circle
            if not (0 <= c.cx < w and 0 <= c.cy < h and 0.25 * min(h, w) < c.r < max(h, w)):
                failures.append(f"{name}/{path.name}: implausible {c} for {w}x{h}")
            elif result.mask.mean() / 255 < 0.5:
                failures.append(f"{name}/{path.name}: only {result.mask.mean() / 255:.0%} is FOV")
    assert not failures, failures


@pytest.mark.parametrize("size", [32, 48, 64, 96])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_clean_fundus_images_are_found(size: int, seed: int) -> None:
    """The thresholded hull lies 1-2 working pixels outside the fitted edge; at these radii that
    rim alone used to exceed the 5 % "outside the circle" limit (every image was no_circle)."""
    fundus = synth_fundus(size, seed=seed)
    cx, cy, r = fundus.circle
    result = preprocess(fundus.image, 64)
    c = result.circle
    assert np.hypot(c.cx - cx, c.cy - cy) < 1.5 and abs(c.r - r) < 1.5
    assert result.status == "ok"


@pytest.mark.shared
@pytest.mark.parametrize("width", [64, 96])
def test_real_photographs_downscaled_to_thumbnails_are_found(shared_dir: Path, width: int) -> None:
    sources = _shared_photographs(shared_dir / "data")
    picks = [files[0] for files in sources.values() if files][:4]
    if not picks:
        pytest.skip("no photographs in ../shared/data")
    for path in picks:
        rgb = decode_image(path.read_bytes())
        full = detect_fov(rgb).circle
        small = cv2.resize(
            rgb, (width, round(rgb.shape[0] * width / rgb.shape[1])), interpolation=cv2.INTER_AREA
        )
        found = preprocess(small, 64).circle
        scale = width / rgb.shape[1]
        assert abs(found.r - full.r * scale) < 0.05 * full.r * scale + 1.0, path.name


@pytest.mark.parametrize("size", [200, 128, 320])
def test_a_field_clipped_at_the_right_and_bottom_has_no_mask_pixel_over_padding(size: int):
    """A uniform photograph whose field runs off its right and bottom edges: the crop pads
    beyond them with zeros, and no pixel of the mask may lie on that padding."""
    rgb = np.full((300, 400, 3), 100, np.uint8)
    circle = Circle(350.0, 250.0, 100.0)  # 50 px past the right and the bottom edge
    image, mask = crop_to_fov(rgb, circle, size)
    assert mask.any() and not mask[-1].any() and not mask[:, -1].any()
    assert image[mask > 0].min() > 0


def test_a_numpy_integer_size_is_a_size() -> None:
    """Sizes read from a DataFrame are numpy integers: they were refused as 'not a positive
    int'."""
    s = synth_fundus(200, seed=1)
    a = preprocess(s.image, np.int64(128))
    b = preprocess(s.image, 128)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="size must be a positive int"):
        preprocess(s.image, True)  # type: ignore[arg-type]
