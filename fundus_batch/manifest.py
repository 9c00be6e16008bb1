"""Image manifests: schema, builders and validation (``manifest_stream`` reads them).

A manifest is a CSV or Parquet file (any fsspec URL) with one row per source image. Required
columns are ``image_id`` and ``uri``; ``mask_uri``, ``vessel_uri`` and ``split`` are optional and
every other column passes through to the output. Validation happens before any work starts and
names the offending row and field.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import unicodedata
from collections.abc import Collection
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


def _name_problems(value: str) -> list[str]:
    """Why ``value`` is unsafe as one path component (empty list: it is safe)."""
    problems = []
    if "/" in value or "\\" in value:
        problems.append("contains a path separator")
    if ".." in value or value in {".", ".."}:
        problems.append("contains '..'")
    if "::" in value:  # fsspec would cut an output path there, as a chained URL
        problems.append("contains '::'")
    if value != value.strip():
        problems.append("has leading or trailing whitespace")
    if any(unicodedata.category(ch) in _UNSAFE_CATEGORIES for ch in value):
        problems.append("contains control or unassigned characters")
    if value.startswith("-"):
        problems.append("starts with '-'")
    if len(value.encode("utf-8")) > MAX_ID_BYTES:
        problems.append(f"is longer than {MAX_ID_BYTES} bytes in UTF-8")
    return problems


_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})


def check_image_id(image_id: object, row: int | None = None) -> str:
    """Return ``image_id`` if it is safe to use as one path component, else raise."""
    if not isinstance(image_id, str) or image_id.strip() == "":
        raise ManifestError("image_id is empty", row=row, field="image_id")
    problems = _name_problems(image_id)
    if problems:
        raise ManifestError(
            f"unsafe image_id {image_id!r}: " + ", ".join(problems), row=row, field="image_id"
        )
    return image_id


def check_split(split: object, row: int | None = None) -> str | None:
    """Return ``split`` (None when missing) if it is safe as one folder name, else raise."""
    if _is_missing(split):
        return None
    text = str(split)
    if text.strip() == "":
        raise ManifestError("split is blank", row=row, field="split")
    if not _PLAIN_ID.fullmatch(text):
        problems = _name_problems(text)
        if problems:
            raise ManifestError(
                f"unsafe split {text!r}: " + ", ".join(problems), row=row, field="split"
            )
    return text


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
    row: int,
    image_id: object,
    uri: object,
    mask_uri: object = None,
    vessel_uri: object = None,
    split: object = None,
) -> str:
    """Validate one manifest row (``row`` is its 1-based data line); returns the image id."""
    if _is_missing(image_id):
        raise ManifestError("image_id is empty", row=row, field="image_id")
    image_id = str(image_id)
    if not _PLAIN_ID.fullmatch(image_id):
        check_image_id(image_id, row)
    if _is_missing(uri) or str(uri).strip() == "":
        raise ManifestError(f"uri is empty for image_id {image_id!r}", row=row, field="uri")
    for opt, value in (("uri", uri), ("mask_uri", mask_uri), ("vessel_uri", vessel_uri)):
        if _is_missing(value):
            continue
        text = str(value)
        if text.strip() == "":
            raise ManifestError(f"{opt} is blank", row=row, field=opt)
        if text != text.strip():  # e.g. a CSV written with ", " between fields
            raise ManifestError(
                f"{opt} {text!r} has leading or trailing whitespace", row=row, field=opt
            )
    check_split(split, row)
    return image_id


def validate_frame(frame: pd.DataFrame, source: str = "<frame>") -> Manifest:
    """Validate a manifest DataFrame and return it as a :class:`Manifest`."""
    check_columns(list(frame.columns), source)
    frame = frame.reset_index(drop=True)
    seen: dict[str, int] = {}
    masks = frame["mask_uri"] if "mask_uri" in frame.columns else [None] * len(frame)
    vessels = frame["vessel_uri"] if "vessel_uri" in frame.columns else [None] * len(frame)
    splits = frame["split"] if "split" in frame.columns else [None] * len(frame)
    rows = zip(frame["image_id"], frame["uri"], masks, vessels, splits, strict=True)
    for i, (image_id, uri, mask_uri, vessel_uri, split) in enumerate(rows):
        row = i + 1
        image_id = check_row(row, image_id, uri, mask_uri, vessel_uri, split)
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
    """Image id from a file name: the stem, made safe (see :func:`safe_id`)."""
    return safe_id(_stem(path))


def safe_id(text: str) -> str:
    """``text`` made into an id that :func:`check_image_id` accepts, changed only where needed:
    separators and control characters become '_', '..' and '::' become '_', surrounding
    whitespace goes, a leading '-' becomes '_', and an over-long id keeps its end plus a hash
    of the whole."""
    cleaned = "".join(
        "_" if (ch in "/\\" or unicodedata.category(ch) in _UNSAFE_CATEGORIES) else ch
        for ch in text
    )
    cleaned = cleaned.replace("..", "_").replace("::", "_").strip()
    if len(cleaned.encode("utf-8")) > MAX_ID_BYTES:
        tail = cleaned.encode("utf-8")[-(MAX_ID_BYTES - 9) :].decode("utf-8", errors="ignore")
        cleaned = f"{tail.strip()}-{_digest(text)}"
    if cleaned.startswith("-"):
        cleaned = "_" + cleaned[1:]
    return cleaned if cleaned not in {"", "."} else "_"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:8]


def _stem(path: str) -> str:
    return PurePosixPath(posixpath.basename(path.rstrip("/"))).stem


def _unique_ids(uris: list[str], rels: list[str], taken: Collection[str] = ()) -> list[str]:
    """Distinct, deterministic ids for files (``rels``: paths relative to the listed prefix),
    none of them in ``taken``.

    An id is the file stem; files whose stems clash try, in turn, the file name with its
    extension, the relative path without and with the extension ('/' as '__'), and that path
    with a hash. Of clashing files, the one whose name needed no cleaning keeps the plainer id.
    """
    raw_levels = [
        [_stem(r) for r in rels],
        [posixpath.basename(r) for r in rels],
        [posixpath.splitext(r)[0].replace("/", "__") for r in rels],
        [r.replace("/", "__") for r in rels],
    ]
    levels = [[(safe_id(t), safe_id(t) == t) for t in raw] for raw in raw_levels]
    hashed = [f"{t}-{_digest(r)}" for t, r in zip(raw_levels[3], rels, strict=True)]
    levels.append([(safe_id(t), False) for t in hashed])
    ids: dict[int, str] = {}
    taken = set(taken)
    pending = list(range(len(uris)))
    for level in levels:
        groups: dict[str, list[int]] = {}
        for i in pending:
            groups.setdefault(level[i][0], []).append(i)
        for candidate, members in groups.items():
            natural = [i for i in members if level[i][1]]
            winners = members if len(members) == 1 else natural
            if len(winners) == 1 and candidate not in taken:
                ids[winners[0]] = candidate
                taken.add(candidate)
        pending = [i for i in pending if i not in ids]
        if not pending:
            return [ids[i] for i in range(len(uris))]
    names = ", ".join(storage.redact(uris[i]) for i in pending)
    raise ManifestError(f"cannot give these files distinct image ids: {names}")


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
    previous: dict[str, str] | None = None,
) -> Manifest:
    """Manifest of every image under a local directory or bucket prefix (recursive, sorted).

    FOV masks and vessel maps beside the photographs (``*_mask.*``, ``*_vessel.*``) are skipped
    unless ``include_companions``. An id depends on the other files listed (a file whose stem
    another file shares gets a longer one), so listing a prefix again after files were added
    can rename files already processed; ``previous`` (URI -> image id, from an earlier manifest:
    :func:`manifest_uri_ids`) keeps their ids, and gives new files none of its ids.
    """
    uris = storage.list_files(prefix, extensions, storage_options=storage_options)
    if not include_companions:
        uris = [u for u in uris if not is_companion(u)]
    if not uris:
        raise ManifestError(
            f"no files with extensions {list(extensions)} under {storage.redact(prefix)}"
        )
    rels = _relative_paths(prefix, uris, storage_options)
    kept = previous or {}
    if kept and not any(u in kept for u in uris):
        raise ManifestError(
            f"the previous manifest lists none of the files under {storage.redact(prefix)}: "
            "list the same prefix, spelled as before"
        )
    new = [i for i, u in enumerate(uris) if u not in kept]
    new_ids = iter(_unique_ids([uris[i] for i in new], [rels[i] for i in new], kept.values()))
    ids = [kept[u] if u in kept else next(new_ids) for u in uris]
    frame = pd.DataFrame({"image_id": ids, "uri": uris})
    return validate_frame(frame, storage.redact(prefix))


def manifest_uri_ids(uri: str, storage_options: dict | None = None) -> dict[str, str]:
    """URI -> image id of every row of the manifest at ``uri`` (validated first)."""
    from fundus_batch.manifest_stream import iter_batches, scan_manifest

    scan_manifest(uri, storage_options=storage_options)
    pairs: dict[str, str] = {}
    for batch in iter_batches(uri, storage_options, ["image_id", "uri"]):
        ids, uris = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        pairs.update((str(u), str(i)) for i, u in zip(ids, uris, strict=True))
    return pairs


def _relative_paths(prefix: str, uris: list[str], storage_options: dict | None) -> list[str]:
    """Each listed URI relative to ``prefix`` however the prefix was spelled (relative,
    absolute, trailing slash, ``file://``); ``storage.list_files`` returns them resolved."""
    fs, root = storage.filesystem(prefix, storage_options)
    root = root.rstrip("/")
    base = (fs.unstrip_protocol(root) if "://" in prefix else root).rstrip("/") + "/"
    return [u[len(base) :] if u.startswith(base) else posixpath.basename(u) for u in uris]


def _join_images(images: str, name: str) -> str:
    """``images`` + ``name``; a local folder is made absolute first, as from_dir's listing is,
    so that the manifest means the same files from any working directory (a Ray worker's)."""
    if "://" not in images:
        images = os.path.abspath(images)
    return storage.join(images, name)


def from_kaggle(
    labels_csv: str, images: str, *, extension: str = ".jpeg", storage_options: dict | None = None
) -> Manifest:
    """Manifest from Kaggle EyePACS ``trainLabels.csv`` (columns ``image,level``)."""
    frame = _read_labels(labels_csv, ("image", "level"), storage_options)
    source = storage.redact(labels_csv)
    # As from_dir's --ext: a leading dot is optional. Case is kept: it is part of the file name.
    ext = extension.strip().lstrip(".")
    suffix = f".{ext}" if ext else ""
    out = pd.DataFrame(
        {
            "image_id": frame["image"].astype(str),
            "uri": [_join_images(images, f"{name}{suffix}") for name in frame["image"]],
            "dr_level": _labels(frame["level"], "level", DR_LEVELS, source),
        }
    )
    return validate_frame(out, source)


EYEQ_QUALITY = {0: "good", 1: "usable", 2: "reject"}
DR_LEVELS = range(5)


def from_eyeq(
    labels_csv: str, images: str, *, storage_options: dict | None = None, split: str | None = None
) -> Manifest:
    """Manifest from EyeQ ``Label_EyeQ_*.csv`` (columns ``,image,quality,DR_grade``)."""
    frame = _read_labels(labels_csv, ("image", "quality", "DR_grade"), storage_options)
    source = storage.redact(labels_csv)
    names = frame["image"].astype(str)
    quality = _labels(frame["quality"], "quality", EYEQ_QUALITY, source)
    out = pd.DataFrame(
        {
            "image_id": [PurePosixPath(n).stem for n in names],
            "uri": [_join_images(images, n) for n in names],
            "eyeq_quality": quality,
            "eyeq_quality_label": [
                EYEQ_QUALITY.get(int(q)) if pd.notna(q) else None for q in quality
            ],
            "dr_level": _labels(frame["DR_grade"], "DR_grade", DR_LEVELS, source),
        }
    )
    if split is not None:
        out["split"] = split
    return validate_frame(out, source)


def _labels(column: pd.Series, name: str, valid: Collection[int], source: str) -> pd.Series:
    """Integer labels of a label-file column; an empty cell stays empty (unlabelled), any other
    value outside ``valid`` raises naming the row and column."""
    values: list[int | None] = []
    for i, raw in enumerate(column):
        if _is_missing(raw) or str(raw).strip() == "":
            values.append(None)
            continue
        try:
            number = float(str(raw).strip())
        except ValueError:
            number = float("nan")
        if not number.is_integer() or int(number) not in valid:
            allowed = ", ".join(str(v) for v in sorted(valid))
            raise ManifestError(
                f"{name} {raw!r} in {source} is not one of {allowed}", row=i + 1, field=name
            )
        values.append(int(number))
    return pd.Series(values, dtype="Int64", index=column.index)


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
