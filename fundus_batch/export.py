"""Export a pairs output to the folder layouts that common trainers read.

What is exported: the ``ok`` rows that have a degraded image, less those that failed the run's
quality gate (``quality_ok`` false) unless ``include_quality_failed``. Before anything is written
every exported row is checked: safe ``image_id`` and ``split`` names, image URIs inside OUT, no
photograph under two splits (train/val leakage), BasicSR file names without whitespace; an
export that would hold no pair is refused.

``dest`` is a local folder that does not exist or is empty (``overwrite`` replaces a non-empty
one). The export is written into a temporary folder beside ``dest`` and renamed into place at the
end, so a failed export leaves no partial tree and whatever ``dest`` held before.

Layouts (``split`` null counts as ``train``):

- ``basicsr``: ``GT/`` and ``LQ/`` with identical names and ``meta_info.txt`` listing them, flat
  in ``dest`` when the rows have one split, else one such tree per split (``dest/<split>/``).
- ``pix2pix``: ``dest/<split>/<name>``, each image degraded (A) and clean (B) side by side.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fundus_batch import outpaths, shards
from fundus_batch.io import codecs, storage
from fundus_batch.manifest import ManifestError, check_image_id, check_split

__all__ = ["DEFAULT_SPLIT", "FORMATS", "ExportError", "ExportSummary", "export_pairs"]

FORMATS = ("basicsr", "pix2pix")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_THREADS = 8
_CHUNK = 256
_T = TypeVar("_T")
DEFAULT_SPLIT = "train"  # the split of rows that record none
_COLUMNS = [
    "image_id",
    "variant",
    "type_code",
    "status",
    "clean_uri",
    "degraded_uri",
    "split",
    "quality_ok",
    "quality_failed",
]
_NAMED = 5  # rows or ids an error message names before "and N more"


class ExportError(ValueError):
    """An export refused before anything was written; the message says why."""


@dataclass(frozen=True)
class ExportSummary:
    """What one export wrote and what it left out."""

    fmt: str
    dest: Path
    pairs: int
    splits: tuple[str, ...]  # split folders under dest; () for the flat BasicSR layout
    quality_failed: int  # pairs that failed the quality gate (left out unless included)
    quality_included: bool
    quality_terms: tuple[str, ...]  # the gate's terms those pairs broke
    failed_rows: int  # rows with status failed (never exported)

    def message(self) -> str:
        """One line for the console."""
        layout = f", one tree per split: {', '.join(self.splits)}" if self.fmt == "basicsr" else ""
        if self.fmt == "basicsr" and not self.splits:
            layout = ", flat: one split"
        parts = [f"exported {self.pairs} pairs to {self.dest} ({self.fmt}{layout})"]
        if self.quality_failed:
            broke = f"broke {'; '.join(self.quality_terms)}" if self.quality_terms else ""
            if self.quality_included:
                parts.append(
                    f"including {self.quality_failed} that failed the run's quality gate"
                    + (f" ({broke})" if broke else "")
                )
            else:
                parts.append(
                    f"left out {self.quality_failed} pairs that failed the run's quality gate "
                    f"(min_quality{': ' + broke if broke else ''}; "
                    "--include-quality-failed exports them)"
                )
        if self.failed_rows:
            parts.append(f"left out {self.failed_rows} failed rows")
        return "; ".join(parts)


def export_pairs(
    out: str,
    fmt: str,
    dest: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    include_quality_failed: bool = False,
) -> ExportSummary:
    """Write ``dest`` in ``fmt`` ('basicsr' or 'pix2pix') from the pairs under ``out`` (an
    output root or its ``pairs/`` folder, any fsspec URL read with ``storage_options``)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use {' or '.join(FORMATS)}")
    shown, target = _local_dest(dest)
    _check_dest(shown, target, overwrite)
    root = shards.output_root(out, storage_options)
    _check_dest_outside(shown, target, root)
    table = shards.read_table(out, _COLUMNS, storage_options)
    if table is None:
        raise FileNotFoundError(
            f"no Parquet shards under {storage.redact(shards.pairs_dir(out, storage_options))}"
        )
    all_rows = table.to_pylist()
    failed = sum(1 for r in all_rows if r.get("status") != "ok")
    pairs = [r for r in all_rows if r.get("status") == "ok" and r.get("degraded_uri")]
    gated = [r for r in pairs if r.get("quality_ok") is False]
    rows = (
        pairs if include_quality_failed else [r for r in pairs if r.get("quality_ok") is not False]
    )
    if not rows:
        raise ExportError(_nothing_to_export(out, len(all_rows), failed, len(pairs), len(gated)))
    for row in rows:
        _check_names(row)
    _resolve_uris(rows, root)
    _check_one_split_per_image(rows)
    if fmt == "basicsr":
        _check_basicsr_names(rows)
    rows.sort(key=lambda r: (r["image_id"], r["variant"]))
    splits = sorted({_split(r) for r in rows})
    writer = _basicsr if fmt == "basicsr" else _pix2pix
    _write_into_place(target, overwrite, lambda folder: writer(rows, folder, storage_options))
    terms = sorted({t for r in gated for t in (r.get("quality_failed") or "").split("; ") if t})
    return ExportSummary(
        fmt=fmt,
        dest=shown,
        pairs=len(rows),
        splits=() if fmt == "basicsr" and len(splits) == 1 else tuple(splits),
        quality_failed=len(gated),
        quality_included=include_quality_failed,
        quality_terms=tuple(terms),
        failed_rows=failed,
    )


# ------------------------------------------------------------------------------ checks


def _local_dest(dest: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(``dest`` as given, its absolute path); a URL other than ``file://`` is refused."""
    text = os.fspath(dest)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise ExportError(
            f"--dest must be a local folder, not {storage.redact(text)!r}; "
            "export locally, then copy the folder to object storage"
        )
    if not text:
        raise ExportError("--dest must be a local folder, got an empty path")
    return Path(text), Path(os.path.abspath(os.path.expanduser(text)))


def _check_dest(shown: Path, target: Path, overwrite: bool) -> None:
    """Refuse a destination the export cannot replace as a whole."""
    if target.parent == target:
        raise ExportError(f"--dest {shown} is a filesystem root; give a folder inside it")
    if target.is_symlink():
        raise ExportError(f"--dest {shown} is a symbolic link; give the folder it points to")
    if target.exists() and not target.is_dir():
        raise ExportError(f"--dest {shown} exists and is not a folder")
    if target.is_dir() and not overwrite and any(target.iterdir()):
        raise ExportError(
            f"--dest {shown} is not empty; give a new or empty folder, or --overwrite to "
            "replace it (an export is never mixed with an older one)"
        )


def _check_dest_outside(shown: Path, target: Path, root: str) -> None:
    """Refuse a destination that is or holds the output folder, or lies in one of the entries
    a run writes there (``images/``, ``pairs/``, ...): replacing it would delete the run."""
    if "://" in root and not root.startswith("file://"):
        return
    real_root = os.path.realpath(root.removeprefix("file://"))
    real_dest = os.path.realpath(target)
    if os.path.commonpath([real_root, real_dest]) == real_dest:
        raise ExportError(f"--dest {shown} holds the output folder {root}; export elsewhere")
    for entry in outpaths.TOP_LEVEL:
        inside = os.path.join(real_root, entry)
        if os.path.commonpath([inside, real_dest]) == inside:
            raise ExportError(f"--dest {shown} lies in {entry}/ of the output folder {root}")


def _nothing_to_export(out: str, total: int, failed: int, pairs: int, gated: int) -> str:
    """Why an export would hold no pair."""
    where = storage.redact(out)
    if total == 0:
        return f"nothing to export: {where} has no rows"
    reasons = []
    if failed:
        reasons.append(f"{failed} failed")
    if total - failed - pairs:
        reasons.append(
            f"{total - failed - pairs} ok without a degraded image (an enhance or score run "
            "makes no pairs; export needs a pairs run)"
        )
    if gated:
        reasons.append(
            f"{gated} failed the run's quality gate (--include-quality-failed exports them)"
        )
    return f"nothing to export: no pair in {where}; of its {total} rows " + ", ".join(reasons)


def _check_names(row: dict[str, Any]) -> None:
    """Refuse a row whose image_id or split (used as file and folder names under the export
    folder) is unsafe: shards written before the manifest check could hold one."""
    try:
        check_image_id(row["image_id"])
        check_split(row.get("split"))
    except ManifestError as exc:
        raise ExportError(
            f"cannot export image_id {row['image_id']!r}: {exc.detail} in the output rows"
        ) from None


def _resolve_uris(rows: list[dict[str, Any]], root: str) -> None:
    """Turn the rows' stored image URIs into readable ones (relative to ``root``, the folder
    holding ``pairs/``); refuse any that points outside ``root``, as verify reports them."""
    problems: list[str] = []
    real_dirs: dict[str, str] = {}
    for row in rows:
        for key in ("clean_uri", "degraded_uri"):
            stored = row.get(key)
            if not stored:
                problems.append(f"{_label(row)} {key} is missing")
                continue
            problem = outpaths.stored_uri_problem(root, stored)
            if problem is None:
                row[key] = outpaths.resolve(root, stored)
                problem = outpaths.link_escape(root, row[key], real_dirs)
            if problem is not None:
                problems.append(f"{_label(row)} {key} {storage.redact(stored)} {problem}")
    if problems:
        raise ExportError(
            f"cannot export from {storage.redact(root)}: rows whose images are missing or "
            f"outside it (nothing was read or written): {_listed(problems)}"
        )


def _split(row: dict[str, Any]) -> str:
    return row.get("split") or DEFAULT_SPLIT


def _check_one_split_per_image(rows: list[dict[str, Any]]) -> None:
    """Refuse rows that would put one photograph in two splits (train/val leakage)."""
    seen: dict[str, set[str]] = {}
    for row in rows:
        seen.setdefault(row["image_id"], set()).add(_split(row))
    leaked = [f"{i!r} ({', '.join(sorted(s))})" for i, s in sorted(seen.items()) if len(s) > 1]
    if leaked:
        raise ExportError(
            f"{_count(len(leaked), 'photograph has', 'photographs have')} rows under more than "
            f"one split, which would leak them between splits: {_listed(leaked)}; their rows come "
            "from runs with different manifest splits: regenerate them in an OUT made with one "
            "manifest"
        )


def _check_basicsr_names(rows: list[dict[str, Any]]) -> None:
    """Refuse image ids with whitespace: BasicSR reads a meta_info.txt name up to the first
    space, so such a pair could not be found."""
    spaced = sorted({r["image_id"] for r in rows if any(c.isspace() for c in r["image_id"])})
    if spaced:
        raise ExportError(
            f"{_count(len(spaced), 'image id holds', 'image ids hold')} whitespace, which "
            "BasicSR's meta_info.txt cannot name (it splits each line at the first space): "
            f"{_listed([repr(i) for i in spaced])}; use --format pix2pix, or ids without "
            "whitespace in the manifest"
        )


def _label(row: dict[str, Any]) -> str:
    return f"image_id {row.get('image_id')!r} variant {row.get('variant')}:"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - _NAMED} more" if len(items) > _NAMED else ""
    return "; ".join(items[:_NAMED]) + more


# ------------------------------------------------------------------------------ writing


def _write_into_place(target: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Run ``write`` into a new folder beside ``target``, then rename it to ``target`` (a
    previous ``target`` is replaced only with ``overwrite``). On any failure the new folder,
    and the parent folders this call made, are removed; ``target`` is left as it was."""
    made = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
    except BaseException:
        _remove_empty(made)
        raise
    try:
        write(staging)
        _rename_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(made)
        raise


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _rename_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``target``; with ``overwrite`` an existing ``target`` is moved
    aside first and deleted once the new one is in place (one left by an export interrupted
    during that deletion is deleted by the next overwrite)."""
    if not (overwrite and target.exists()):
        try:
            os.replace(staging, target)  # replaces an empty folder, never a non-empty one
        except OSError as exc:
            raise ExportError(f"--dest {target} could not be replaced: {exc.strerror}") from None
        return
    # An export interrupted while it deleted the one it replaced left it here: delete it now.
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _name(row: dict[str, Any]) -> str:
    return f"{row['image_id']}_v{row['variant']:03d}_{row['type_code']}.png"


def _pair(row: dict[str, Any], storage_options: dict[str, Any] | None) -> tuple[np.ndarray, ...]:
    """(clean, degraded) pixels of a row."""
    return tuple(
        codecs.decode_image(storage.read_bytes(row[key], storage_options=storage_options))
        for key in ("clean_uri", "degraded_uri")
    )


def _basicsr(
    rows: list[dict[str, Any]], dest: Path, storage_options: dict[str, Any] | None
) -> None:
    """BasicSR paired layout, flat for one split, else one tree per split."""
    splits = sorted({_split(r) for r in rows})
    for split in splits:
        tree = dest if len(splits) == 1 else dest / split
        _basicsr_tree([r for r in rows if _split(r) == split], tree, storage_options)


def _basicsr_tree(
    rows: list[dict[str, Any]], tree: Path, storage_options: dict[str, Any] | None
) -> None:
    """GT/ and LQ/ with identical names, meta_info.txt listing GT."""
    gt, lq = tree / "GT", tree / "LQ"
    gt.mkdir(parents=True)
    lq.mkdir()

    def export_row(row: dict[str, Any]) -> str:
        name = _name(row)
        clean, shape = _as_png(
            storage.read_bytes(row["clean_uri"], storage_options=storage_options)
        )
        degraded, _ = _as_png(
            storage.read_bytes(row["degraded_uri"], storage_options=storage_options)
        )
        (gt / name).write_bytes(clean)
        (lq / name).write_bytes(degraded)
        return f"{name} ({shape[0]},{shape[1]},3)"

    lines = _in_threads(export_row, rows)
    (tree / "meta_info.txt").write_text("\n".join(lines) + "\n")


def _as_png(data: bytes) -> tuple[bytes, tuple[int, int]]:
    """``data`` as an 8-bit RGB PNG and its (height, width): a PNG the pipeline wrote is kept
    byte for byte (decoding and encoding it again gives the same pixels at 40 times the
    cost); anything else (a ``--format jpeg`` run's images) is decoded and encoded."""
    if data.startswith(_PNG_SIGNATURE) and codecs.is_plain_rgb(data):
        width, height = struct.unpack(">II", data[16:24])  # IHDR, the first chunk
        return data, (height, width)
    pixels = codecs.decode_image(data)
    return codecs.encode_png(pixels), (pixels.shape[0], pixels.shape[1])


def _pix2pix(
    rows: list[dict[str, Any]], dest: Path, storage_options: dict[str, Any] | None
) -> None:
    """pix2pix aligned layout: <split>/<name> holding A (degraded) | B (clean) side by side."""
    for split in {_split(row) for row in rows}:
        (dest / split).mkdir()

    def export_row(row: dict[str, Any]) -> None:
        clean, degraded = _pair(row, storage_options)
        (dest / _split(row) / _name(row)).write_bytes(
            codecs.encode_png(np.concatenate([degraded, clean], axis=1))
        )

    _in_threads(export_row, rows)


def _in_threads(work: Callable[[dict[str, Any]], _T], rows: list[dict[str, Any]]) -> list[_T]:
    """``work`` on every row, in ``_THREADS`` threads (reads wait on storage, and OpenCV's
    codecs release the GIL), results in row order; the first failure stops the rest."""
    results: list[_T] = []
    pool = ThreadPoolExecutor(max_workers=_THREADS)
    try:
        for start in range(0, len(rows), _CHUNK):  # a bounded number of futures at a time
            results += pool.map(work, rows[start : start + _CHUNK])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results
