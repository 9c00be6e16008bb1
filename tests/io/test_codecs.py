"""Tests for fundus_batch.io.codecs: decoding every format, normalisation, limits and errors."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from fundus_batch.io import codecs
from fundus_batch.io.codecs import (
    DecodeError,
    decode_image,
    encode_image,
    encode_jpeg,
    encode_png,
    image_dimensions,
)


def _rgb(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Asymmetric test picture: gradients plus noise, so flips and rotations are visible."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), (xx + yy) % 256], -1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _smooth_rgb(h: int, w: int) -> np.ndarray:
    """Low-frequency picture: JPEG and area resampling both reproduce it closely."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(xx / w * 3.1) * np.cos(yy / h * 2.3)
    g = 128 + 90 * np.cos(xx / w * 1.7 + yy / h * 2.9)
    b = 60 + 50 * (xx / w)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def _save(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _reason(data: bytes, **kwargs: object) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(data, **kwargs)  # type: ignore[arg-type]
    return info.value.reason


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("PNG", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("PPM", {}),
        ("BMP", {}),
        ("WEBP", {"lossless": True}),
    ],
)
def test_lossless_formats_round_trip_exactly(fmt: str, kwargs: dict[str, object]) -> None:
    rgb = _rgb()
    out = decode_image(_save(Image.fromarray(rgb), fmt, **kwargs))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


def test_gif_with_few_colours_round_trips_exactly() -> None:
    rgb = np.zeros((32, 40, 3), np.uint8)
    rgb[:, :20] = (200, 30, 10)
    rgb[10:, 25:] = (5, 180, 250)
    np.testing.assert_array_equal(decode_image(_save(Image.fromarray(rgb), "GIF")), rgb)


def test_jpeg_round_trip_is_close_and_deterministic() -> None:
    rgb = _smooth_rgb(96, 128)
    data = _save(Image.fromarray(rgb), "JPEG", quality=95)
    first, second = decode_image(data), decode_image(data)
    np.testing.assert_array_equal(first, second)
    assert np.abs(first.astype(int) - rgb).mean() < 2.0


def test_greyscale_png_becomes_three_equal_channels() -> None:
    grey = _rgb()[..., 0]
    out = decode_image(_save(Image.fromarray(grey), "PNG"))
    assert out.shape == (*grey.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_rgba_is_composited_on_black() -> None:
    rgb = _rgb()
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    data = _save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG")
    expected = np.round(rgb.astype(np.float64) * alpha[..., None] / 255.0).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(data), expected)


def test_grey_alpha_is_composited_on_black() -> None:
    grey = _rgb()[..., 1]
    alpha = np.full_like(grey, 51)
    data = _save(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG")
    expected = np.round(grey.astype(np.float64) * 51 / 255.0).astype(np.uint8)
    out = decode_image(data)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_sixteen_bit_grey_png_keeps_the_high_byte() -> None:
    rng = np.random.default_rng(1)
    grey16 = rng.integers(0, 65536, size=(40, 50), dtype=np.uint16)
    data = cv2.imencode(".png", grey16)[1].tobytes()
    out = decode_image(data)
    np.testing.assert_array_equal(out[..., 0], (grey16 // 256).astype(np.uint8))
    np.testing.assert_array_equal(out[..., 2], out[..., 0])


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_sixteen_bit_rgb_is_scaled_to_eight_bit(ext: str) -> None:
    rng = np.random.default_rng(2)
    rgb16 = rng.integers(0, 65536, size=(40, 50, 3), dtype=np.uint16)
    data = cv2.imencode(ext, rgb16[..., ::-1].copy())[1].tobytes()  # OpenCV writes BGR
    out = decode_image(data)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, (rgb16 // 256).astype(np.uint8))


def test_palette_png_is_expanded() -> None:
    pal = Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    data = _save(pal, "PNG")
    np.testing.assert_array_equal(decode_image(data), np.asarray(pal.convert("RGB")))


def test_palette_with_transparent_index_is_composited_on_black() -> None:
    pal = Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    index = np.asarray(pal)
    data = _save(pal, "PNG", transparency=int(index[0, 0]))
    out = decode_image(data)
    transparent = index == index[0, 0]
    assert np.all(out[transparent] == 0)
    np.testing.assert_array_equal(out[~transparent], np.asarray(pal.convert("RGB"))[~transparent])


def test_multi_page_tiff_yields_the_first_page() -> None:
    first, second = _rgb(40, 50, seed=3), _rgb(20, 30, seed=4)
    data = _save(
        Image.fromarray(first), "TIFF", save_all=True, append_images=[Image.fromarray(second)]
    )
    np.testing.assert_array_equal(decode_image(data), first)


def test_cmyk_jpeg_matches_pillow_conversion() -> None:
    rgb = _smooth_rgb(64, 80)
    data = _save(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert np.abs(decode_image(data).astype(int) - reference).mean() < 2.0


def _with_orientation(rgb: np.ndarray, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    kwargs: dict[str, object] = {"exif": exif}
    if fmt == "JPEG":
        kwargs["quality"] = 95
    return _save(Image.fromarray(rgb), fmt, **kwargs)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_exif_transpose(fmt: str, orientation: int) -> None:
    rgb = _rgb(30, 50)
    extra = {"lossless": True} if fmt == "WEBP" else {}
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(Image.fromarray(rgb), fmt, exif=exif, **extra)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    out = decode_image(data)
    np.testing.assert_array_equal(out, expected)
    assert image_dimensions(data) == (out.shape[1], out.shape[0])


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_jpeg_exif_orientation_is_honoured(orientation: int) -> None:
    rgb = _smooth_rgb(60, 100)
    data = _with_orientation(rgb, "JPEG", orientation)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    out = decode_image(data)
    assert out.shape == np.asarray(reference).shape
    assert np.abs(out.astype(int) - np.asarray(reference)).mean() < 1.0
    assert image_dimensions(data) == reference.size


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_reduced_jpeg_decode_honours_exif_orientation(orientation: int) -> None:
    rgb = _smooth_rgb(400, 640)
    data = _with_orientation(rgb, "JPEG", orientation)
    full = decode_image(data)
    reduced = decode_image(data, min_side=100)  # 400 / 4 = 100 -> quarter size
    assert reduced.shape == (full.shape[0] // 4, full.shape[1] // 4, 3)
    resized = cv2.resize(full, reduced.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(reduced.astype(int) - resized).mean() < 2.5


@pytest.mark.parametrize(
    ("min_side", "factor"),
    [(None, 1), (1, 8), (96, 8), (97, 4), (192, 4), (193, 2), (384, 2), (385, 1), (5000, 1)],
)
def test_reduced_jpeg_picks_the_largest_reduction_keeping_min_side(
    min_side: int | None, factor: int
) -> None:
    data = _save(Image.fromarray(_smooth_rgb(768, 1024)), "JPEG", quality=90)
    out = decode_image(data, min_side=min_side)
    assert out.shape == (768 // factor, 1024 // factor, 3)


def test_reduced_decode_rounds_odd_sizes_up() -> None:
    data = _save(Image.fromarray(_smooth_rgb(101, 203)), "JPEG", quality=90)
    assert decode_image(data, min_side=13).shape == (13, 26, 3)  # ceil(101/8), ceil(203/8)


def test_reduced_decode_matches_full_decode_resized() -> None:
    rgb = _smooth_rgb(600, 800)
    data = _save(Image.fromarray(rgb), "JPEG", quality=92)
    full = decode_image(data)
    for min_side, factor in ((300, 2), (150, 4), (75, 8)):
        reduced = decode_image(data, min_side=min_side)
        resized = cv2.resize(full, (800 // factor, 600 // factor), interpolation=cv2.INTER_AREA)
        assert np.abs(reduced.astype(int) - resized).mean() < 2.0, factor


def test_min_side_does_not_shrink_other_formats() -> None:
    rgb = _rgb(64, 96)
    assert decode_image(_save(Image.fromarray(rgb), "PNG"), min_side=16).shape == rgb.shape


def test_image_dimensions_reads_header_only() -> None:
    data = _save(Image.fromarray(_rgb(48, 64)), "PNG")
    assert image_dimensions(data[:100]) == (64, 48)


def test_empty_bytes() -> None:
    assert _reason(b"") == "empty"


@pytest.mark.parametrize(
    "data", [b"this is plain text, not an image at all", b"\x00" * 64, b"<html></html>"]
)
def test_unknown_format(data: bytes) -> None:
    assert _reason(data) == "unknown_format"


@pytest.mark.parametrize("keep", [0.02, 0.3, 0.6, 0.9, 0.99, -2])
def test_truncated_jpeg_is_an_error_not_a_grey_image(keep: float) -> None:
    data = _save(Image.fromarray(_rgb(200, 240)), "JPEG", quality=90)
    cut = data[: int(len(data) * keep)] if keep > 0 else data[:keep]
    assert _reason(cut) == "truncated"


@pytest.mark.parametrize("data", [b"\xff\xd8", b"\x89PN", b"GIF8"])
def test_data_ending_inside_the_signature_is_truncated(data: bytes) -> None:
    assert _reason(data) == "truncated"


def test_truncated_progressive_jpeg_is_an_error() -> None:
    data = _save(Image.fromarray(_rgb(200, 240)), "JPEG", quality=90, progressive=True)
    assert _reason(data[: len(data) * 2 // 3]) == "truncated"


def test_jpeg_with_exif_thumbnail_truncated_after_the_thumbnail_is_an_error() -> None:
    # The thumbnail's own end-of-image marker must not make a cut main image look complete.
    thumb = _save(Image.fromarray(_rgb(16, 16)), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 1
    app1 = b"Exif\x00\x00" + exif.tobytes() + thumb
    main = _save(Image.fromarray(_rgb(200, 240)), "JPEG", quality=90)
    data = main[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + main[2:]
    assert decode_image(data).shape == (200, 240, 3)
    assert _reason(data[: len(data) - 500]) == "truncated"


def test_truncated_png_is_an_error() -> None:
    data = _save(Image.fromarray(_rgb(64, 64)), "PNG")
    assert _reason(data[: len(data) // 2]) == "truncated"


def test_corrupt_png_data_is_an_error() -> None:
    data = bytearray(_save(Image.fromarray(_rgb(64, 64)), "PNG"))
    idat = data.index(b"IDAT")
    for i in range(idat + 8, idat + 40):
        data[i] ^= 0x5A
    assert _reason(bytes(data)) in {"corrupt", "truncated"}


@pytest.mark.parametrize(("w", "h"), [(1, 1), (15, 100), (100, 15)])
def test_tiny_images_are_too_small(w: int, h: int) -> None:
    data = _save(Image.new("RGB", (w, h), (10, 20, 30)), "PNG")
    assert _reason(data) == "too_small"


def test_sixteen_pixel_side_is_accepted() -> None:
    data = _save(Image.new("RGB", (16, 16), (10, 20, 30)), "PNG")
    assert decode_image(data).shape == (16, 16, 3)


def _png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR (with a correct CRC) claims another size."""
    data = bytearray(_save(Image.new("RGB", (16, 16)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def test_decompression_bomb_header_is_rejected() -> None:
    assert _reason(_png_claiming(30000, 30000)) == "too_large"


def test_pixel_limit_is_checked_before_any_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(codecs, "_decode_pil", boom)
    monkeypatch.setattr(codecs, "_decode_jpeg", boom)
    data = _png_claiming(9000, 9000)  # 81 MP: over our default, under Pillow's own limit
    assert image_dimensions(data) == (9000, 9000)
    assert _reason(data) == "too_large"
    jpeg = _save(Image.fromarray(_rgb(100, 100)), "JPEG")
    assert _reason(jpeg, max_pixels=9999) == "too_large"
    assert _reason(_save(Image.fromarray(_rgb(100, 100)), "PNG"), max_pixels=9999) == "too_large"


def test_decode_error_is_a_value_error_with_a_message() -> None:
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"")


def test_non_bytes_input_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]


def test_memoryview_and_bytearray_are_accepted() -> None:
    data = _save(Image.fromarray(_rgb()), "PNG")
    np.testing.assert_array_equal(decode_image(bytearray(data)), decode_image(memoryview(data)))


def test_encode_png_round_trips_and_is_deterministic() -> None:
    rgb = _rgb()
    data = encode_png(rgb)
    assert data == encode_png(rgb)
    assert Image.open(io.BytesIO(data)).mode == "RGB"
    np.testing.assert_array_equal(decode_image(data), rgb)


def test_encode_png_greyscale_is_a_one_channel_png() -> None:
    grey = _rgb()[..., 0]
    for arr in (grey, grey[..., None]):
        data = encode_png(arr)
        img = Image.open(io.BytesIO(data))
        assert img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), grey)


def test_encode_png_is_lossless_for_masks_rgba_and_non_contiguous_views() -> None:
    yy, xx = np.mgrid[0:70, 0:90]
    mask = (((xx - 45) ** 2 + (yy - 35) ** 2) < 900).astype(np.uint8) * 255
    rgb = _rgb(70, 90)
    rgba = np.dstack([rgb, mask])
    for arr, mode in ((mask, "L"), (rgba, "RGBA"), (rgb[::2, ::-1], "RGB"), (mask.T, "L")):
        img = Image.open(io.BytesIO(encode_png(arr)))
        assert img.mode == mode
        np.testing.assert_array_equal(np.asarray(img), arr)


def test_encode_png_compression_levels_are_lossless() -> None:
    rgb = _rgb()
    sizes = []
    for level in (0, 9):
        data = encode_png(rgb, compression=level)
        np.testing.assert_array_equal(decode_image(data), rgb)
        sizes.append(len(data))
    assert sizes[1] < sizes[0]


def test_encode_jpeg_quality_trades_size_for_fidelity() -> None:
    rgb = _smooth_rgb(120, 160)
    low, high = encode_jpeg(rgb, quality=30), encode_jpeg(rgb, quality=95)
    assert low[:3] == b"\xff\xd8\xff" and high == encode_jpeg(rgb, quality=95)
    assert len(low) < len(high)
    err_low = np.abs(decode_image(low).astype(int) - rgb).mean()
    err_high = np.abs(decode_image(high).astype(int) - rgb).mean()
    assert err_high < err_low and err_high < 2.0


def test_encode_jpeg_greyscale() -> None:
    grey = _smooth_rgb(64, 64)[..., 0]
    assert Image.open(io.BytesIO(encode_jpeg(grey))).mode == "L"


def test_encode_image_dispatches_on_format() -> None:
    rgb = _rgb()
    assert encode_image(rgb, "png") == encode_png(rgb)
    assert encode_image(rgb, "jpeg", quality=80) == encode_jpeg(rgb, quality=80)
    assert encode_image(rgb, "jpg", quality=80) == encode_jpeg(rgb, quality=80)
    with pytest.raises(ValueError):
        encode_image(rgb, "bmp")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arr", "error"),
    [
        (np.zeros((8, 8, 3), np.float32), TypeError),
        (np.zeros((8, 8, 2), np.uint8), ValueError),
        (np.zeros((0, 8, 3), np.uint8), ValueError),
        (np.zeros((2, 8, 8, 3), np.uint8), ValueError),
    ],
)
def test_encoders_reject_bad_arrays(arr: np.ndarray, error: type[Exception]) -> None:
    with pytest.raises(error):
        encode_png(arr)
    with pytest.raises(error):
        encode_jpeg(arr)


def test_encoders_reject_bad_parameters() -> None:
    rgb = _rgb()
    with pytest.raises(ValueError):
        encode_png(rgb, compression=10)
    with pytest.raises(ValueError):
        encode_jpeg(rgb, quality=0)
    with pytest.raises(ValueError):
        encode_jpeg(np.zeros((8, 8, 4), np.uint8))


def test_decode_errors_carry_no_memory_addresses_so_reruns_record_the_same_text():
    from fundus_batch.io.codecs import DecodeError

    err = DecodeError("corrupt", "cannot identify image file <_io.BytesIO object at 0x7f12ab34>")
    assert "0x" not in str(err) and err.reason == "corrupt"


def test_is_plain_rgb_accepts_only_8_bit_rgb_without_an_exif_turn() -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    assert codecs.is_plain_rgb(codecs.encode_png(rgb))
    assert codecs.is_plain_rgb(codecs.encode_jpeg(rgb))

    def pil(arr: np.ndarray, mode: str, fmt: str, **kw: object) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr, mode).save(buf, fmt, **kw)
        return buf.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    refused = {
        "16-bit RGB PNG": cv2.imencode(".png", rgb.astype(np.uint16))[1].tobytes(),
        "RGBA PNG": pil(np.zeros((16, 16, 4), np.uint8), "RGBA", "PNG"),
        "grey JPEG": pil(rgb[..., 0], "L", "JPEG"),
        "CMYK JPEG": pil(np.zeros((16, 16, 4), np.uint8), "CMYK", "JPEG"),
        "turned JPEG": pil(rgb, "RGB", "JPEG", exif=exif.tobytes()),
        "not an image": b"hello",
    }
    assert [name for name, data in refused.items() if codecs.is_plain_rgb(data)] == []
