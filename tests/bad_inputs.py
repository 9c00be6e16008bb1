"""A corpus of awkward and broken inputs, generated on the fly, with the outcome each must have.

Every :class:`Case` is one manifest row. Good-but-awkward files (16-bit, grey, CMYK, palette,
multi-page, EXIF-rotated, huge) must come out ``ok``; broken ones must fail at the stage the
contracts name (``fetch`` for unreadable URIs, ``preprocess`` for bytes that are not a usable
image) with the typed error and reason code in the message. Expectations follow the contracts in
docs/architecture.md (DecodeError / FOVError reason codes), never the code's actual output.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from fundus_batch.io.codecs import DEFAULT_MAX_PIXELS, encode_jpeg, encode_png
from fundus_batch.synth import synth_fundus

OK = "ok"
FAILED = "failed"

HUGE_SIZE = (12000, 9000)
"""The issue's huge photograph; whether it must decode depends on DEFAULT_MAX_PIXELS."""

LARGE_SIZE = (8000, 6000)
"""A large photograph below the pixel limit: must succeed through reduced JPEG decoding."""

BOMB_SIDE = 30000

NO_FOV_REASONS = ("no_fov", "no_circle", "too_small")
"""FOVError codes that mean "this is not a fundus photograph" (blank has its own cases)."""


KINDS: tuple[str, ...] = (
    "good_jpeg",
    "zero_bytes",
    "wrong_magic",
    "jpeg_cut_in_signature",
    "jpeg_cut_in_header",
    "jpeg_cut_in_scan",
    "jpeg_missing_eoi",
    "png_bad_crc",
    "png_cut",
    "one_by_one",
    "bomb_png_header",
    "bomb_jpeg_header",
    "png_16bit_rgb",
    "png_16bit_grey",
    "grey_jpeg",
    "rgba_png",
    "cmyk_jpeg",
    "palette_gif",
    "multipage_tiff",
    "exif_rotated",
    "all_black",
    "all_white",
    "noise_photo",
    "gradient_photo",
    "checkerboard_photo",
    "huge_photo",
    "large_photo",
    "missing_uri",
    "directory_uri",
    "permission_denied",
    "unicode_id",
    "long_id",
)
"""Every kind :func:`build_corpus` can produce (``permission_denied`` only for non-root users,
the two ``*_photo`` giants only with ``huge=True``)."""


@dataclass(frozen=True)
class Case:
    """One corpus entry and its expected outcome.

    ``words`` must all appear in the error message, and at least one of ``reasons`` (when
    given) too; ``display_size`` is the (width, height) an ``ok`` row must report.
    """

    kind: str
    image_id: str
    uri: str
    status: str
    stage: str | None = None
    words: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    display_size: tuple[int, int] | None = None
    note: str = ""
    extra: dict = field(default_factory=dict, compare=False)


def _fundus(seed: int, canvas: tuple[int, int] = (256, 208), size: int = 192) -> np.ndarray:
    return synth_fundus(size, seed=seed, canvas=canvas).image


def _pil_bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(ctype + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", crc)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` RGB pixels (a decompression bomb
    header: the pixel data is a few bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its SOF frame header patched to claim ``width`` x ``height``."""
    data = bytearray(jpeg)
    pos = 2
    while pos + 4 <= len(data):
        marker = data[pos + 1]
        seglen = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            data[pos + 5 : pos + 7] = height.to_bytes(2, "big")
            data[pos + 7 : pos + 9] = width.to_bytes(2, "big")
            return bytes(data)
        pos += 2 + seglen
    raise ValueError("no SOF marker found")


def png_with_bad_ihdr_crc(png: bytes) -> bytes:
    """``png`` with one bit of its IHDR checksum flipped (IHDR is the first chunk)."""
    data = bytearray(png)
    crc_at = 8 + 8 + 13  # signature, IHDR length+type, IHDR payload
    data[crc_at] ^= 0x01
    return bytes(data)


def exif_rotated_jpeg(display: np.ndarray) -> bytes:
    """A JPEG whose stored pixels are ``display`` turned 90 degrees counter-clockwise, tagged
    with EXIF orientation 6 (rotate 90 degrees clockwise to display)."""
    stored = np.ascontiguousarray(np.rot90(display, 1))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _pil_bytes(Image.fromarray(stored), "JPEG", quality=92, exif=exif.tobytes())


def rgba_png(rgb: np.ndarray, fov: np.ndarray) -> bytes:
    """RGBA PNG: opaque inside ``fov``, fully transparent bright grey outside it, so the
    surround is dark only when alpha is honoured."""
    rgba = np.dstack([rgb, np.where(fov > 0, 255, 0).astype(np.uint8)])
    rgba[fov == 0, :3] = 200
    return encode_png(rgba)


def _write(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def _huge_jpeg(base: np.ndarray, size: tuple[int, int]) -> bytes:
    big = cv2.resize(base, size, interpolation=cv2.INTER_NEAREST)
    return encode_jpeg(big, quality=80)


def long_id(n_bytes: int = 200) -> str:
    """A valid id of exactly ``n_bytes`` UTF-8 bytes mixing 1-, 2- and 3-byte characters."""
    stem = "網é" * (n_bytes // 5)  # 3 + 2 bytes per repeat
    pad = n_bytes - len(stem.encode("utf-8"))
    return stem + "x" * pad


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def build_corpus(folder: Path, *, huge: bool = True) -> list[Case]:
    """Write every corpus file under ``folder`` and return the cases (one per manifest row).

    ``huge=False`` leaves out the two multi-megapixel photographs (for quick local runs).
    """
    folder.mkdir(parents=True, exist_ok=True)
    s = synth_fundus(192, seed=5, canvas=(256, 208))
    good, fov = s.image, s.mask
    good_jpeg = encode_jpeg(good, quality=92)
    good_png = encode_png(good)
    frame = (256, 208)
    cases: list[Case] = []

    def file_case(kind: str, data: bytes, ext: str, status: str, **kw) -> None:
        uri = _write(folder, f"{kind}.{ext}", data)
        cases.append(
            Case(kind=kind, image_id=kw.pop("image_id", kind), uri=uri, status=status, **kw)
        )

    def good_case(kind: str, data: bytes, ext: str, size: tuple[int, int] = frame, **kw) -> None:
        file_case(kind, data, ext, OK, display_size=size, **kw)

    def decode_fail(kind: str, data: bytes, ext: str, reasons: tuple[str, ...]) -> None:
        file_case(
            kind, data, ext, FAILED, stage="preprocess", words=("DecodeError",), reasons=reasons
        )

    def fov_fail(kind: str, data: bytes, ext: str, reasons: tuple[str, ...]) -> None:
        file_case(kind, data, ext, FAILED, stage="preprocess", words=("FOVError",), reasons=reasons)

    def fetch_fail(kind: str, uri: str, error_type: str) -> None:
        cases.append(Case(kind, kind, uri, FAILED, stage="fetch", words=(error_type,)))

    good_case("good_jpeg", good_jpeg, "jpg")  # the control row

    # Bytes that are not a decodable image.
    html = b"<html><body>404 Not Found</body></html>\n" * 4
    decode_fail("zero_bytes", b"", "jpg", ("empty",))
    decode_fail("wrong_magic", html, "jpg", ("unknown_format",))
    decode_fail("jpeg_cut_in_signature", good_jpeg[:2], "jpg", ("truncated",))
    decode_fail("jpeg_cut_in_header", good_jpeg[:40], "jpg", ("truncated", "corrupt"))
    decode_fail("jpeg_cut_in_scan", good_jpeg[: len(good_jpeg) // 2], "jpg", ("truncated",))
    decode_fail("jpeg_missing_eoi", good_jpeg[:-2], "jpg", ("truncated",))
    decode_fail("png_bad_crc", png_with_bad_ihdr_crc(good_png), "png", ("corrupt",))
    decode_fail("png_cut", good_png[: len(good_png) * 2 // 3], "png", ("truncated", "corrupt"))
    tiny = encode_png(np.full((1, 1, 3), 128, np.uint8))
    decode_fail("one_by_one", tiny, "png", ("too_small",))
    decode_fail("bomb_png_header", png_claiming(BOMB_SIDE, BOMB_SIDE), "png", ("too_large",))
    bomb_jpeg = jpeg_claiming(good_jpeg, BOMB_SIDE, BOMB_SIDE)
    decode_fail("bomb_jpeg_header", bomb_jpeg, "jpg", ("too_large",))

    # Unusual but valid encodings of the same photograph.
    grey = cv2.cvtColor(good, cv2.COLOR_RGB2GRAY)
    good_case("png_16bit_rgb", encode_png_16(good.astype(np.uint16) * 257), "png")
    good_case("png_16bit_grey", encode_png_16(grey.astype(np.uint16) * 257), "png")
    good_case("grey_jpeg", encode_jpeg(grey, quality=92), "jpg")
    good_case("rgba_png", rgba_png(good, fov), "png")
    cmyk = _pil_bytes(Image.fromarray(good).convert("CMYK"), "JPEG", quality=92)
    good_case("cmyk_jpeg", cmyk, "jpg", extra={"mean_rgb": good[fov > 0].mean(axis=0).tolist()})
    good_case("palette_gif", _pil_bytes(Image.fromarray(good).quantize(256), "GIF"), "gif")
    # Page 2 is blank white: the row only succeeds if page 1 (the fundus) is used.
    white = Image.fromarray(np.full((208, 256, 3), 255, np.uint8))
    tiff = _pil_bytes(Image.fromarray(good), "TIFF", save_all=True, append_images=[white])
    good_case("multipage_tiff", tiff, "tif")
    # The FOV sits in the left part of a landscape frame stored portrait with orientation 6.
    shifted = np.zeros((208, 320, 3), np.uint8)
    shifted[:, :256] = good
    good_case("exif_rotated", exif_rotated_jpeg(shifted), "jpg", (320, 208), extra={"cx_max": 160})

    # Images without a field of view.
    fov_fail("all_black", encode_jpeg(np.zeros((208, 256, 3), np.uint8)), "jpg", ("blank",))
    fov_fail("all_white", encode_jpeg(np.full((208, 256, 3), 255, np.uint8)), "jpg", ("blank",))
    noise = np.random.default_rng(0).integers(0, 256, (208, 256, 3), dtype=np.uint8)
    fov_fail("noise_photo", encode_png(noise), "png", NO_FOV_REASONS)
    ramp = np.linspace(0, 255, 256, dtype=np.float64)[None, :, None]
    gradient = np.broadcast_to(ramp, (208, 256, 3)).astype(np.uint8)
    fov_fail("gradient_photo", encode_jpeg(gradient), "jpg", NO_FOV_REASONS)
    yy, xx = np.mgrid[:208, :256]
    checker = np.where(((yy // 16) + (xx // 16)) % 2 == 0, 230, 20).astype(np.uint8)
    fov_fail("checkerboard_photo", encode_png(np.dstack([checker] * 3)), "png", NO_FOV_REASONS)

    if huge:
        base = synth_fundus(768, seed=6, canvas=(1024, 768)).image
        for kind, size in (("huge_photo", HUGE_SIZE), ("large_photo", LARGE_SIZE)):
            data = _huge_jpeg(base, size)
            if size[0] * size[1] > DEFAULT_MAX_PIXELS:
                decode_fail(kind, data, "jpg", ("too_large",))
            else:
                good_case(kind, data, "jpg", size)

    # URIs that cannot be read.
    fetch_fail("missing_uri", str(folder / "no_such_file.jpg"), "FileNotFoundError")
    (folder / "a_directory.jpg").mkdir(exist_ok=True)
    fetch_fail("directory_uri", str(folder / "a_directory.jpg"), "IsADirectoryError")
    if not is_root():  # root reads mode-000 files, so this case only exists for other users
        locked = _write(folder, "locked.jpg", good_jpeg)
        os.chmod(locked, 0)
        fetch_fail("permission_denied", locked, "PermissionError")

    # Awkward but valid ids (the unicode one is in the file name too).
    uid = "眼底_ünïcödé_фундус 01"
    cases.append(
        Case("unicode_id", uid, _write(folder, f"{uid}.jpg", good_jpeg), OK, display_size=frame)
    )
    cases.append(
        Case("long_id", long_id(), _write(folder, "long.jpg", good_jpeg), OK, display_size=frame)
    )
    unknown = {c.kind for c in cases} - set(KINDS)
    if unknown:
        raise AssertionError(f"corpus kinds missing from KINDS: {sorted(unknown)}")
    return cases


def encode_png_16(arr: np.ndarray) -> bytes:
    """16-bit PNG of an HxW or HxWx3 (RGB) uint16 array."""
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise ValueError("cv2 could not encode a 16-bit PNG")
    return buf.tobytes()


def write_manifest(cases: list[Case], path: Path) -> Path:
    """A CSV manifest with one row per case (the ``kind`` column passes through)."""
    frame = pd.DataFrame([{"image_id": c.image_id, "uri": c.uri, "kind": c.kind} for c in cases])
    frame.to_csv(path, index=False)
    return path


def message_problems(case: Case, error: str | None) -> list[str]:
    """What is wrong with ``error`` for a failed ``case`` (empty when it is as expected)."""
    text = error or ""
    missing = [w for w in case.words if w not in text]
    problems = [f"message lacks {missing!r}"] if missing else []
    if case.reasons and not any(r in text for r in case.reasons):
        problems.append(f"message names none of the reasons {case.reasons!r}")
    return problems
