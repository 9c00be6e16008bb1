"""Image manifests: schema, builders and validation (``manifest_stream`` reads them).

A manifest is a CSV or Parquet file (any fsspec URL) with one row per source image. Required
columns are ``image_id`` and ``uri``; ``mask_uri``, ``vessel_uri`` and ``split`` are optional and
every other column passes through to the output. Validation happens before any work starts and
names the offending row and field.
"""

from __future__ import annotations

import io
import posixpath
import re
import unicodedata
from dataclasses import dataclass
from pathlib import PurePosixPath

import pandas as pd

from fundus_batch.io import storage

REQUIRED_COLUMNS = ("image_id", "uri")
OPTIONAL_COLUMNS = ("mask_uri", "vessel_uri", "split")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".ppm")
MAX_ID_BYTES = 200
# Output columns that a pass-through manifest column may not shadow.
RESERVED_PREFIXES = ("seconds_", "nr_", "psnr_", "ssim_", "ms_ssim_", "vessel_")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the row (1-based data row), the line
    of the file where it starts (CSV, when known) and the field."""

    def __init__(
        self,
        message: str,
        *,
        row: int | None = None,
        field: str | None = None,
        line: int | None = None,
    ):
        where = []
        if row is not None:
            where.append(f"row {row}" + (f" (line {line})" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = f"manifest {', '.join(where)}: " if where else "manifest: "
        super().__init__(prefix + message)
        self.detail = message
        self.row = row
        self.field = field
        self.line = line

    def at_line(self, line: int | None) -> ManifestError:
        """The same error, naming the file line as well."""
        return ManifestError(self.detail, row=self.row, field=self.field, line=line)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: a DataFrame with string ``image_id`` and ``uri`` columns."""

    frame: pd.DataFrame
    source: str

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def passthrough_columns(self) -> list[str]:
        known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
        return [c for c in self.frame.columns if c not in known]


def check_image_id(image_id: object, row: int | None = None) -> str:
    """Return ``image_id`` if it is safe to use as one path component, else raise."""
    if not isinstance(image_id, str) or image_id.strip() == "":
        raise ManifestError("image_id is empty", row=row, field="image_id")
    problems = []
    if "/" in image_id or "\\" in image_id:
        problems.append("contains a path separator")
    if ".." in image_id or image_id in {".", ".."}:
        problems.append("contains '..'")
    if image_id != image_id.strip():
        problems.append("has leading or trailing whitespace")
    if any(unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Co", "Cn"} for ch in image_id):
        problems.append("contains control or unassigned characters")
    if image_id.startswith("-"):
        problems.append("starts with '-'")
    if len(image_id.encode("utf-8")) > MAX_ID_BYTES:
        problems.append(f"is longer than {MAX_ID_BYTES} bytes in UTF-8")
    if problems:
        raise ManifestError(
            f"unsafe image_id {image_id!r}: " + ", ".join(problems), row=row, field="image_id"
        )
    return image_id


def check_columns(columns: list[object], source: str = "<frame>") -> None:
    """Raise unless the column names make a usable manifest (required ones present, none that
    shadows an output or internal column)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(
            f"missing required column(s) {missing} in {source}; found {list(columns)}",
            field=missing[0],
        )
    for col in columns:
        if not isinstance(col, str) or col.strip() == "":
            raise ManifestError(f"column name {col!r} is empty or not a string", field=str(col))
        if col in OPTIONAL_COLUMNS:
            continue
        if col.startswith(RESERVED_PREFIXES) or col in _reserved_output_columns():
            raise ManifestError(
                f"column '{col}' clashes with an output column; rename it", field=col
            )
        if col in _internal_columns():
            raise ManifestError(
                f"column '{col}' is a name the pipeline uses internally; rename it", field=col
            )


# Ids made only of these characters pass check_image_id; any other id gets the full check.
_PLAIN_ID = re.compile(r"(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,199}")


def check_row(
    row: int, image_id: object, uri: object, mask_uri: object = None, vessel_uri: object = None
) -> str:
    """Validate one manifest row (``row`` is its 1-based data line); returns the image id."""
    if _is_missing(image_id):
        raise ManifestError("image_id is empty", row=row, field="image_id")
    image_id = str(image_id)
    if not _PLAIN_ID.fullmatch(image_id):
        check_image_id(image_id, row)
    if _is_missing(uri) or str(uri).strip() == "":
        raise ManifestError(f"uri is empty for image_id {image_id!r}", row=row, field="uri")
    for opt, value in (("mask_uri", mask_uri), ("vessel_uri", vessel_uri)):
        if not _is_missing(value) and str(value).strip() == "":
            raise ManifestError(f"{opt} is blank", row=row, field=opt)
    return image_id


def validate_frame(frame: pd.DataFrame, source: str = "<frame>") -> Manifest:
    """Validate a manifest DataFrame and return it as a :class:`Manifest`."""
    check_columns(list(frame.columns), source)
    frame = frame.reset_index(drop=True)
    seen: dict[str, int] = {}
    masks = frame["mask_uri"] if "mask_uri" in frame.columns else [None] * len(frame)
    vessels = frame["vessel_uri"] if "vessel_uri" in frame.columns else [None] * len(frame)
    rows = zip(frame["image_id"], frame["uri"], masks, vessels, strict=True)
    for i, (image_id, uri, mask_uri, vessel_uri) in enumerate(rows):
        row = i + 1
        image_id = check_row(row, image_id, uri, mask_uri, vessel_uri)
        if image_id in seen:
            raise ManifestError(
                f"duplicate image_id {image_id!r} (first seen in row {seen[image_id]})",
                row=row,
                field="image_id",
            )
        seen[image_id] = row
    out = frame.copy()
    out["image_id"] = out["image_id"].astype(str)
    out["uri"] = out["uri"].astype(str)
    for opt in OPTIONAL_COLUMNS:
        if opt in out.columns:
            out[opt] = pd.Series(
                [None if _is_missing(v) else str(v) for v in out[opt]],
                dtype=object,
                index=out.index,
            )
    return Manifest(out, source)


def write_manifest(
    manifest: Manifest | pd.DataFrame, uri: str, *, storage_options: dict | None = None
) -> None:
    """Write a manifest as CSV or Parquet (by extension)."""
    frame = manifest.frame if isinstance(manifest, Manifest) else manifest
    if uri.lower().endswith((".parquet", ".pq")):
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        data = buf.getvalue()
    else:
        data = frame.to_csv(index=False).encode("utf-8")
    storage.write_bytes(uri, data, storage_options=storage_options)


def id_from_path(path: str) -> str:
    """Image id from a file name: the stem, with characters unsafe in ids replaced."""
    stem = PurePosixPath(posixpath.basename(path.rstrip("/"))).stem
    cleaned = "".join(
        "_" if (ch in "/\\" or unicodedata.category(ch) == "Cc") else ch for ch in stem
    )
    return cleaned.replace("..", "_")


# Stems of the companion files that ``synth`` (and many datasets) write beside photographs.
COMPANION_SUFFIXES = ("_mask", "_vessel")


def is_companion(uri: str) -> bool:
    """Whether ``uri`` names a FOV mask or vessel map (``*_mask.*``, ``*_vessel.*``)."""
    stem = PurePosixPath(posixpath.basename(uri.rstrip("/"))).stem.lower()
    return stem.endswith(COMPANION_SUFFIXES)


def from_dir(
    prefix: str,
    *,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    storage_options: dict | None = None,
    include_companions: bool = False,
) -> Manifest:
    """Manifest of every image under a local directory or bucket prefix (recursive, sorted).

    FOV masks and vessel maps beside the photographs (``*_mask.*``, ``*_vessel.*``) are skipped
    unless ``include_companions``.
    """
    uris = storage.list_files(prefix, extensions, storage_options=storage_options)
    if not include_companions:
        uris = [u for u in uris if not is_companion(u)]
    if not uris:
        raise ManifestError(
            f"no files with extensions {list(extensions)} under {storage.redact(prefix)}"
        )
    ids = [id_from_path(u) for u in uris]
    frame = pd.DataFrame({"image_id": ids, "uri": uris})
    dup = frame["image_id"].duplicated(keep=False)
    if dup.any():
        # Same stem in several folders: qualify by the path relative to the prefix.
        base = prefix.rstrip("/") + "/"
        rel = [u[len(base) :] if u.startswith(base) else u for u in uris]
        qualified = [id_from_path(r.replace("/", "__")) for r in rel]
        frame.loc[dup, "image_id"] = [q for q, d in zip(qualified, dup, strict=True) if d]
    return validate_frame(frame, storage.redact(prefix))


def _join_images(images: str, name: str) -> str:
    return storage.join(images, name)


def from_kaggle(
    labels_csv: str, images: str, *, extension: str = ".jpeg", storage_options: dict | None = None
) -> Manifest:
    """Manifest from Kaggle EyePACS ``trainLabels.csv`` (columns ``image,level``)."""
    frame = _read_labels(labels_csv, ("image", "level"), storage_options)
    out = pd.DataFrame(
        {
            "image_id": frame["image"].astype(str),
            "uri": [_join_images(images, f"{name}{extension}") for name in frame["image"]],
            "dr_level": pd.to_numeric(frame["level"], errors="coerce").astype("Int64"),
        }
    )
    return validate_frame(out, storage.redact(labels_csv))


EYEQ_QUALITY = {0: "good", 1: "usable", 2: "reject"}


def from_eyeq(
    labels_csv: str, images: str, *, storage_options: dict | None = None, split: str | None = None
) -> Manifest:
    """Manifest from EyeQ ``Label_EyeQ_*.csv`` (columns ``,image,quality,DR_grade``)."""
    frame = _read_labels(labels_csv, ("image", "quality", "DR_grade"), storage_options)
    names = frame["image"].astype(str)
    quality = pd.to_numeric(frame["quality"], errors="coerce").astype("Int64")
    out = pd.DataFrame(
        {
            "image_id": [PurePosixPath(n).stem for n in names],
            "uri": [_join_images(images, n) for n in names],
            "eyeq_quality": quality,
            "eyeq_quality_label": [
                EYEQ_QUALITY.get(int(q)) if pd.notna(q) else None for q in quality
            ],
            "dr_level": pd.to_numeric(frame["DR_grade"], errors="coerce").astype("Int64"),
        }
    )
    if split is not None:
        out["split"] = split
    return validate_frame(out, storage.redact(labels_csv))


def _read_labels(uri: str, columns: tuple[str, ...], storage_options: dict | None) -> pd.DataFrame:
    try:
        data = storage.read_bytes(uri, storage_options=storage_options)
        frame = pd.read_csv(io.BytesIO(data), dtype=str)
    except FileNotFoundError as exc:
        raise ManifestError(f"cannot read {storage.redact(uri)}: file not found") from exc
    except Exception as exc:
        raise ManifestError(f"cannot read {storage.redact(uri)}: {exc}") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ManifestError(
            f"{storage.redact(uri)} lacks column(s) {missing}; found {list(frame.columns)}",
            field=missing[0],
        )
    for i, value in enumerate(frame[columns[0]]):
        if _is_missing(value) or str(value).strip() == "":
            raise ManifestError("empty image name", row=i + 1, field=columns[0])
    return frame


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _internal_columns() -> frozenset[str]:
    from fundus_batch.schema import INTERNAL_COLUMNS

    return INTERNAL_COLUMNS - set(REQUIRED_COLUMNS) - set(OPTIONAL_COLUMNS)


def _reserved_output_columns() -> frozenset[str]:
    from fundus_batch.schema import OUTPUT_COLUMNS

    return frozenset(OUTPUT_COLUMNS) - set(REQUIRED_COLUMNS) - set(OPTIONAL_COLUMNS)
