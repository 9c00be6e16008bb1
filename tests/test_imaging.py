"""The FOV circle of a supplied mask, clipped by the frame or not, and the crop it gives."""

from __future__ import annotations

import numpy as np
import pytest

from fundus_batch.fov import Circle, FOVError, circle_mask, crop_to_fov
from fundus_batch.imaging import circle_from_mask, crop_with_given_mask
from fundus_batch.io.codecs import encode_png
from fundus_batch.synth import synth_fundus


def _bounding_box_circle(mask: np.ndarray) -> Circle:
    """The estimate for unclipped and two-side-clipped masks before one-side clipping was
    handled: the bounding box's centre, its longer side the diameter."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    return Circle((x0 + x1) / 2.0, (y0 + y1) / 2.0, (max(x1 - x0, y1 - y0) + 1) / 2.0)


def _flipped(circle: Circle, side: str, height: int, width: int) -> tuple[Circle, int, int]:
    """``circle`` clipped at the top of a ``height`` x ``width`` frame, turned so that the
    frame clips it at ``side`` instead (and the frame's shape with it)."""
    cx, cy, r = circle.cx, circle.cy, circle.r
    if side == "top":
        return Circle(cx, cy, r), height, width
    if side == "bottom":
        return Circle(cx, height - 1 - cy, r), height, width
    if side == "left":
        return Circle(cy, cx, r), width, height
    return Circle(height - 1 - cy, cx, r), width, height


@pytest.mark.parametrize("side", ["top", "bottom", "left", "right"])
@pytest.mark.parametrize("cut", [0.05, 0.3, 0.9, 1.4])  # share of the radius the frame cuts off
def test_a_mask_clipped_on_one_side_gives_the_circle_it_was_cut_from(side: str, cut: float):
    r = 301.3
    top_clipped = Circle(412.6, r - cut * r, r)
    height, width = int(top_clipped.cy + r) + 23, 860
    truth, h, w = _flipped(top_clipped, side, height, width)
    found = circle_from_mask(circle_mask(h, w, truth))
    assert abs(found.cx - truth.cx) < 0.5 and abs(found.cy - truth.cy) < 0.5
    assert abs(found.r - truth.r) < 0.5


@pytest.mark.parametrize(
    ("circle", "shape"),
    [
        (Circle(320.0, 240.0, 200.0), (480, 640)),  # inside the frame
        (Circle(319.5, 239.5, 240.0), (480, 640)),  # touching top and bottom
        (Circle(320.2, 239.7, 290.0), (480, 640)),  # clipped at top and bottom
        (Circle(240.0, 320.4, 300.0), (640, 480)),  # clipped at left and right
        (Circle(200.0, 200.0, 200.0), (500, 500)),  # touching the top-left corner
    ],
)
def test_unclipped_and_two_side_clipped_masks_keep_the_bounding_box_circle(
    circle: Circle, shape: tuple[int, int]
):
    mask = circle_mask(*shape, circle)
    assert circle_from_mask(mask) == _bounding_box_circle(mask)


def test_a_photograph_clipped_at_the_top_is_cropped_around_its_whole_circle():
    truth = Circle(400.0, 210.0, 290.0)  # the frame cuts 80 px off the top of the field
    rgb = np.random.default_rng(0).integers(60, 180, (560, 800, 3), dtype=np.uint8)  # not blank
    mask = circle_mask(560, 800, truth)
    pre = crop_with_given_mask(rgb, encode_png(mask), 256)
    _, expected = crop_to_fov(rgb, truth, 256, (0, 0, 800, 560))
    overlap = np.logical_and(pre.mask, expected).sum() / np.logical_or(pre.mask, expected).sum()
    assert overlap > 0.995
    assert pre.mask[-1].any()  # the field's bottom reaches the bottom of the working image


def _disc(shape: tuple[int, int], r: float) -> np.ndarray:
    return circle_mask(*shape, Circle((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0, r))


def _marks(shape: tuple[int, int], points: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for y, x in points:
        mask[y, x] = 255
    return mask


def _line(shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[shape[0] // 2, 20:-20] = 255
    return mask


def _sparse(shape: tuple[int, int]) -> np.ndarray:
    """Every third pixel of a whole disc: a large field to the checks at source size that
    averages away (below half) when resized to the working size."""
    mask = _disc(shape, min(shape) / 2.0)
    mask[::3] = 0
    mask[:, ::3] = 0
    mask[1::3, 1::3] = 0
    return mask


SHAPE = (300, 360)


@pytest.mark.parametrize(
    ("name", "mask"),
    [
        ("one pixel", _marks(SHAPE, [(150, 180)])),
        ("two far dots", _marks(SHAPE, [(5, 5), (290, 350)])),
        ("a line", _line(SHAPE)),
        ("a disc under 10 % of the shorter side", _disc(SHAPE, 25.0)),
        ("sparse: nothing left at the working size", _sparse(SHAPE)),
    ],
)
def test_a_given_mask_too_small_for_a_field_of_view_fails_as_too_small(name, mask):
    photo = synth_fundus(300, seed=1, canvas=(360, 300)).image
    with pytest.raises(FOVError) as caught:
        crop_with_given_mask(photo, encode_png(mask), 64)
    assert caught.value.reason == "too_small", (name, caught.value)


def test_a_given_mask_that_vanishes_when_resized_to_the_image_fails_as_too_small():
    photo = synth_fundus(300, seed=1, canvas=(360, 300)).image
    big = np.zeros((600, 720), np.uint8)
    big[300, 360] = 255  # one pixel of a mask twice the image's size
    with pytest.raises(FOVError) as caught:
        crop_with_given_mask(photo, encode_png(big), 256)
    assert caught.value.reason == "too_small"


@pytest.mark.parametrize("level", [0, 128, 255])
def test_a_uniform_image_inside_a_given_mask_fails_as_blank(level: int):
    rgb = np.full((*SHAPE, 3), level, np.uint8)
    with pytest.raises(FOVError) as caught:
        crop_with_given_mask(rgb, encode_png(_disc(SHAPE, 140.0)), 256)
    assert caught.value.reason == "blank"


def test_an_empty_given_mask_fails_as_blank():
    photo = synth_fundus(300, seed=1, canvas=(360, 300)).image
    with pytest.raises(FOVError) as caught:
        crop_with_given_mask(photo, encode_png(np.zeros(SHAPE, np.uint8)), 256)
    assert caught.value.reason == "blank"


def test_a_field_at_the_size_limit_is_cropped_as_before():
    """10 % of the shorter side is the smallest field detection accepts; so for a mask."""
    photo = synth_fundus(300, seed=1, canvas=(360, 300)).image
    mask = _disc(SHAPE, 30.5)
    pre = crop_with_given_mask(photo, encode_png(mask), 64)
    circle = circle_from_mask(mask)
    image, _ = crop_to_fov(photo, circle, 64)
    image[pre.mask == 0] = 0
    assert np.array_equal(pre.image, image) and pre.mask.any()


@pytest.mark.parametrize(
    ("truth", "shape"),
    [
        (Circle(260.0, 250.0, 300.0), (700, 640)),  # clipped at the top and the left
        (Circle(560.0, 250.0, 300.0), (600, 800)),  # top and right, the field's foot inside
        (Circle(250.0, 330.0, 380.0), (700, 640)),  # top, bottom and left
        (Circle(400.0, 300.0, 340.0), (560, 800)),  # top and bottom, off the frame's middle
    ],
)
def test_a_mask_clipped_on_two_or_three_sides_gives_the_circle_it_was_cut_from(truth, shape):
    found = circle_from_mask(circle_mask(*shape, truth))
    assert abs(found.cx - truth.cx) < 1.0 and abs(found.cy - truth.cy) < 1.0, found
    assert abs(found.r - truth.r) < 1.0, found


def test_a_mask_drawn_on_the_unturned_pixels_fails_as_mask_shape():
    photo = synth_fundus(300, seed=1, canvas=(360, 300)).image  # 300 high, 360 wide
    turned = _disc((360, 300), 140.0)  # 360 high, 300 wide: the photograph's EXIF turn missed
    with pytest.raises(FOVError) as caught:
        crop_with_given_mask(photo, encode_png(turned), 256)
    assert caught.value.reason == "mask_shape"
    assert "300x360 px and the photograph 360x300" in str(caught.value)


def test_a_mask_at_another_resolution_with_the_same_shape_is_accepted():
    photo = synth_fundus(300, seed=1, canvas=(360, 300)).image
    half = _disc((151, 180), 70.0)  # half the size, one row over by rounding
    assert crop_with_given_mask(photo, encode_png(half), 128).mask.any()


def test_a_vessel_map_of_another_shape_is_refused_not_stretched():
    from fundus_batch.imaging import crop_like

    circle = Circle(180.0, 150.0, 140.0)
    with pytest.raises(ValueError, match="cannot be this photograph's"):
        crop_like(np.zeros((360, 300), np.uint8), (300, 360), circle, 128)
    assert crop_like(np.zeros((150, 180), np.uint8), (300, 360), circle, 128).shape == (128, 128)


def _small_field_jpeg() -> bytes:
    """A 2400 x 1700 JPEG whose field is 600 px across: at 256 px the largest reduction that
    keeps the shorter side >= 256 (1/4) leaves the field 150 px across."""
    from fundus_batch.io.codecs import encode_jpeg

    return encode_jpeg(synth_fundus(600, seed=2, canvas=(2400, 1700)).image, quality=95)


def test_a_field_narrower_than_the_working_size_after_reduction_is_decoded_again():
    from fundus_batch.imaging import source_working_image

    source = source_working_image(_small_field_jpeg(), 256)
    assert source.factor == 2  # 1/4 would scale a 150 px field up to 256
    assert 2 * source.pre.circle.r >= 256
    assert source.pre.image.shape == (256, 256, 3)


def test_the_source_circle_of_a_reduced_decode_is_the_full_decodes():
    from fundus_batch.fov import preprocess
    from fundus_batch.imaging import source_working_image
    from fundus_batch.io.codecs import decode_image

    raw = _small_field_jpeg()
    reduced = source_working_image(raw, 256)
    full = preprocess(decode_image(raw), 256).circle
    found = reduced.source_circle
    assert reduced.factor > 1
    assert abs(found.cx - full.cx) < 0.1 and abs(found.cy - full.cy) < 0.1, (found, full)


@pytest.mark.parametrize(
    ("truth", "top", "bottom"),
    [
        (Circle(256.0, 256.0, 256.0), 20, 20),
        (Circle(256.0, 256.0, 256.0), 40, 12),  # the authors' masks: touching left and right
        (Circle(300.0, 290.0, 200.0), 140, 110),  # inside the frame
    ],
)
def test_an_aperture_with_flat_top_and_bottom_gives_its_circle_not_its_chords(truth, top, bottom):
    """A camera's aperture cut straight at top and bottom (the authors' masks of real
    low-quality photographs): the straight edges are chords, kept out of the rim fit."""
    top, bottom = int(truth.cy - truth.r) + top, int(512 - truth.cy - truth.r) + bottom
    mask = circle_mask(512, 512, truth)
    mask[:top] = 0
    mask[512 - bottom :] = 0
    found = circle_from_mask(mask)
    assert abs(found.cx - truth.cx) < 1.0 and abs(found.cy - truth.cy) < 1.0, found
    assert abs(found.r - truth.r) < 1.0, found


def test_vessel_label_maps_with_values_up_to_3_mark_every_labelled_pixel():
    """HRF's artery/vein maps label vessels 1-3: the highest label 3 is still a label map, so
    every labelled pixel is a vessel, not only those over the 0/255 threshold."""
    from fundus_batch.imaging import decode_vessel_truth

    labels = np.zeros((40, 48), np.uint8)
    labels[5:10] = 1
    labels[15:20] = 2
    labels[25:30] = 3
    truth = decode_vessel_truth(encode_png(labels))
    assert truth.dtype == np.uint8
    assert np.array_equal(truth, np.where(labels > 0, 255, 0))


def test_the_working_image_of_a_given_mask_is_zero_wherever_the_mask_is():
    """A mask cut flat at the bottom inside the frame: its circle runs below the cut, but the
    pixels between the cut and the circle are outside the field and must be black."""
    rgb = np.random.default_rng(3).integers(60, 180, (400, 480, 3), dtype=np.uint8)
    truth = Circle(240.0, 190.0, 170.0)
    mask = circle_mask(400, 480, truth)
    mask[300:] = 0  # the aperture's straight bottom edge, 60 px above the circle's foot
    pre = crop_with_given_mask(rgb, encode_png(mask), 128)
    _, circle_only = crop_to_fov(rgb, pre.circle, 128)
    assert np.logical_and(circle_only > 0, pre.mask == 0).any()  # the cut-off part exists
    assert not pre.image[pre.mask == 0].any()
