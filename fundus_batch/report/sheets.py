"""Contact sheets: a few rows per degradation type as thumbnails, captions and a PNG figure.

The images are read where the rows recorded them (relative to OUT, or under ``OUT/images/``
when the folder was moved); each thumbnail carries a link to the full-size file when the
report's folder and the image share a filesystem.
"""

from __future__ import annotations

import base64
import os
import posixpath
import re
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

from fundus_batch.io import codecs, storage
from fundus_batch.outpaths import resolve
from fundus_batch.report.data import PARAM_COLUMNS, Loaded
from fundus_batch.report.formatting import Verbatim, fmt, num, type_label

__all__ = [
    "PARAM_COLUMNS",
    "Caption",
    "ContactSheets",
    "ImageReader",
    "Thumb",
    "TypeSheet",
    "contact_sheets",
]

_GAP = 4
_MISSING_GREY = 235


@dataclass(frozen=True)
class Thumb:
    """One role's thumbnail: a PNG data URI, or the reason there is none."""

    role: str
    src: str | None
    missing: str | None
    link: str | None  # URL-quoted path from the report's folder to the full-size image


@dataclass(frozen=True)
class Caption:
    name: str
    lines: list[str]


@dataclass(frozen=True)
class Entry:
    thumbs: list[Thumb]
    caption: Caption


@dataclass(frozen=True)
class TypeSheet:
    code: str
    label: str
    total: int  # ok rows of this type
    entries: list[Entry]
    figure: str  # file name of the PNG sheet
    png: bytes


@dataclass(frozen=True)
class ContactSheets:
    has_rows: bool
    roles: list[str]
    thumb: int
    sheets: list[TypeSheet]


class ImageReader:
    """Reads and decodes the images rows point at, once each, remembering where each was."""

    def __init__(self, out: str, storage_options: dict | None, report_dir: str) -> None:
        self.out = out.rstrip("/")
        self.storage_options = storage_options or {}
        self.report_dir = report_dir
        self._images: dict[str, np.ndarray | str] = {}
        self._located: dict[str, str] = {}  # recorded image URI -> where it was read

    def image(self, uri: object) -> np.ndarray | str:
        """Decoded image, or a short reason why it could not be read."""
        if not isinstance(uri, str) or not uri:
            return "no image"
        if uri in self._images:
            return self._images[uri]
        result: np.ndarray | str
        try:
            result = codecs.decode_image(self._read(uri))
        except FileNotFoundError:
            result = "file missing"
        except Exception as exc:
            result = f"unreadable ({type(exc).__name__})"
        self._images[uri] = result
        return result

    def _read(self, recorded: str) -> bytes:
        uri = resolve(self.out, recorded)  # rows record paths relative to OUT
        try:
            data = storage.read_bytes(uri, storage_options=self.storage_options, retries=1)
        except FileNotFoundError:
            # An output folder that was moved still holds images/<id>/... relative to it.
            if "/images/" not in uri:
                raise
            uri = storage.join(self.out, "images", uri.rsplit("/images/", 1)[1])
            data = storage.read_bytes(uri, storage_options=self.storage_options, retries=1)
        self._located[recorded] = uri
        return data

    def link(self, recorded: object) -> Verbatim | None:
        """A URL-quoted path from the report's folder to an image that was read, or None when
        the two do not share a filesystem (a local report of a bucket, say)."""
        from urllib.parse import quote

        where = self._located.get(recorded) if isinstance(recorded, str) else None
        if where is None:
            return None
        if "://" in where or "://" in self.report_dir:
            image_root, _, image_path = where.partition("://")
            report_root, _, report_path = self.report_dir.partition("://")
            same_bucket = image_path.split("/", 1)[0] == report_path.split("/", 1)[0]
            if image_root != report_root or not same_bucket or not report_path:
                return None
            rel = posixpath.relpath(image_path, report_path)
        else:
            rel = os.path.relpath(os.path.abspath(where), os.path.abspath(self.report_dir))
            rel = rel.replace(os.sep, "/")
        return Verbatim(quote(rel, safe="/"))  # a path under OUT: never redacted


def thumbnail(rgb: np.ndarray, side: int) -> np.ndarray:
    """Fit ``rgb`` into a ``side`` x ``side`` black square (area resampling)."""
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    y0, x0 = (side - nh) // 2, (side - nw) // 2
    canvas[y0 : y0 + nh, x0 : x0 + nw] = small
    return canvas


def sheet_image(grid: list[list[np.ndarray]], side: int) -> np.ndarray:
    """The thumbnails of ``grid`` (rows of equal squares) on a white sheet."""
    n_rows = max(len(grid), 1)
    n_cols = max((len(r) for r in grid), default=1)
    sheet = np.full(
        (n_rows * (side + _GAP) + _GAP, n_cols * (side + _GAP) + _GAP, 3), 255, np.uint8
    )
    for i, row in enumerate(grid):
        for j, thumb in enumerate(row):
            y, x = _GAP + i * (side + _GAP), _GAP + j * (side + _GAP)
            sheet[y : y + side, x : x + side] = thumb
    return sheet


def pick_rows(rows: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to ``n`` rows, from as many different images as possible."""
    rows = rows.sort_values(["image_id", "variant"] if "variant" in rows else ["image_id"])
    picked = rows.drop_duplicates("image_id").head(n)
    if len(picked) < n:
        rest = rows.drop(index=picked.index).head(n - len(picked))
        picked = pd.concat([picked, rest])
    return picked


def caption(row: pd.Series) -> Caption:
    """Image id and variant, sampled parameters, fidelity to the clean image, model."""
    variant = num(row.get("variant"))
    name = str(row["image_id"]) + (f" · v{int(variant)}" if variant is not None else "")
    params = [
        f"{label} {fmt(row.get(col), 'n' if col == 'n_spots' else col)}"
        for col, label in PARAM_COLUMNS
        if num(row.get(col)) is not None
    ]
    lines = [", ".join(params)] if params else []
    for role in ("degraded", "enhanced"):
        raw_psnr = row.get(f"psnr_{role}")
        psnr, ssim = num(raw_psnr), num(row.get(f"ssim_{role}"))
        if _is_posinf(raw_psnr):
            lines.append(f"{role}: identical to clean (PSNR ∞), SSIM {fmt(ssim, 'ssim')}")
        elif psnr is not None or ssim is not None:
            lines.append(f"{role}: PSNR {fmt(psnr, 'psnr')} dB, SSIM {fmt(ssim, 'ssim')}")
    model = row.get("model_name")
    if isinstance(model, str) and model:
        device = row.get("enhance_device")
        lines.append(
            f"model {model}" + (f" on {device}" if isinstance(device, str) and device else "")
        )
    # The id is shown as it is (an id is no credential); the lines may name a model's URI.
    return Caption(Verbatim(name), [storage.redact(line) for line in lines])


def _is_posinf(value: object) -> bool:
    return isinstance(value, float) and value == float("inf")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def contact_sheets(
    loaded: Loaded, reader: ImageReader, rows_per_type: int, thumb: int
) -> ContactSheets:
    """Up to ``rows_per_type`` rows of each type: thumbnails per role, captions, a PNG sheet."""
    if not loaded.ok_rows.size:
        return ContactSheets(False, [], thumb, [])
    uris = loaded.view("degraded_uri", "enhanced_uri")
    roles = ["clean"] + [
        r for r in ("degraded", "enhanced") if f"{r}_uri" in uris and uris[f"{r}_uri"].notna().any()
    ]
    # Rows are picked on their keys alone, labelled by position in ok.
    keys = loaded.view("image_id", "variant").reset_index(drop=True)
    sheets = []
    for code, idx in loaded.groups[:-1]:
        picked = pick_rows(keys.iloc[idx], rows_per_type).index.to_numpy()
        grid: list[list[np.ndarray]] = []
        entries = []
        for _, row in loaded.frame.iloc[loaded.ok_rows[picked]].iterrows():
            thumbs, squares = [], []
            for role in roles:
                recorded = row.get(f"{role}_uri")
                img = reader.image(recorded)
                label = loaded.input_label if role == "clean" else role
                if isinstance(img, str):
                    squares.append(np.full((thumb, thumb, 3), _MISSING_GREY, np.uint8))
                    thumbs.append(Thumb(label, None, img, None))
                else:
                    small = thumbnail(img, thumb)
                    squares.append(small)
                    src = _data_uri(codecs.encode_png(small))
                    thumbs.append(Thumb(label, src, None, reader.link(recorded)))
            grid.append(squares)
            entries.append(Entry(thumbs, caption(row)))
        figure = f"contact_{re.sub(r'[^A-Za-z0-9_-]', '_', code)}.png"
        png = codecs.encode_png(sheet_image(grid, thumb))
        sheets.append(TypeSheet(code, type_label(code), int(idx.size), entries, figure, png))
    return ContactSheets(True, roles, thumb, sheets)
