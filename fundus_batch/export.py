"""Export a pairs output to the folder layouts that common trainers read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fundus_batch.io import codecs, storage
from fundus_batch.manifest import ManifestError, check_image_id, check_split
from fundus_batch.outpaths import resolve
from fundus_batch.shards import read_table


def _ok_rows(out: str, storage_options: dict | None) -> list[dict]:
    columns = ["image_id", "variant", "type_code", "status", "clean_uri", "degraded_uri", "split"]
    table = read_table(out, columns, storage_options)
    if table is None:
        raise FileNotFoundError(f"no Parquet shards under {out}/pairs")
    rows = [r for r in table.to_pylist() if r["status"] == "ok" and r["degraded_uri"]]
    for row in rows:
        _check_names(row)
    for row in rows:  # rows record paths relative to OUT
        row["clean_uri"] = resolve(out, row["clean_uri"])
        row["degraded_uri"] = resolve(out, row["degraded_uri"])
    return sorted(rows, key=lambda r: (r["image_id"], r["variant"]))


def _check_names(row: dict) -> None:
    """Refuse a row whose image_id or split (used as file and folder names under the export
    folder) is unsafe: shards written before the manifest check could hold one."""
    try:
        check_image_id(row["image_id"])
        check_split(row.get("split"))
    except ManifestError as exc:
        raise ValueError(
            f"cannot export image_id {row['image_id']!r}: {exc.detail} in the output rows"
        ) from None


def export_pairs(out: str, fmt: str, dest: Path, *, storage_options: dict | None = None) -> int:
    """Write ``dest`` in ``fmt`` ('basicsr' or 'pix2pix') from the pairs under ``out`` (any
    fsspec URL, read with ``storage_options``); returns the number of pairs."""
    rows = _ok_rows(out, storage_options)
    dest.mkdir(parents=True, exist_ok=True)
    if fmt == "basicsr":
        return _basicsr(rows, dest, storage_options)
    if fmt == "pix2pix":
        return _pix2pix(rows, dest, storage_options)
    raise ValueError(f"unknown export format {fmt!r}; use basicsr or pix2pix")


def _name(row: dict) -> str:
    return f"{row['image_id']}_v{row['variant']:03d}_{row['type_code']}.png"


def _pair(row: dict, storage_options: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """(clean, degraded) pixels of a row."""
    clean, degraded = (
        codecs.decode_image(storage.read_bytes(row[key], storage_options=storage_options))
        for key in ("clean_uri", "degraded_uri")
    )
    return clean, degraded


def _basicsr(rows: list[dict], dest: Path, storage_options: dict | None) -> int:
    """BasicSR paired layout: GT/ and LQ/ with identical names, meta_info.txt listing GT."""
    gt, lq = dest / "GT", dest / "LQ"
    gt.mkdir(exist_ok=True)
    lq.mkdir(exist_ok=True)
    lines = []
    for row in rows:
        name = _name(row)
        clean, degraded = _pair(row, storage_options)
        (gt / name).write_bytes(codecs.encode_png(clean))
        (lq / name).write_bytes(codecs.encode_png(degraded))
        h, w = clean.shape[:2]
        lines.append(f"{name} ({h},{w},3)")
    (dest / "meta_info.txt").write_text("\n".join(lines) + "\n")
    return len(rows)


def _pix2pix(rows: list[dict], dest: Path, storage_options: dict | None) -> int:
    """pix2pix aligned layout: <split>/<name> holding A (degraded) | B (clean) side by side."""
    for row in rows:
        split = row.get("split") or "train"
        folder = dest / split
        folder.mkdir(exist_ok=True)
        clean, degraded = _pair(row, storage_options)
        (folder / _name(row)).write_bytes(
            codecs.encode_png(np.concatenate([degraded, clean], axis=1))
        )
    return len(rows)
