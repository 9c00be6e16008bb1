"""Small input sets for pipeline tests: raw-camera-like synthetic JPEGs plus broken files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fundus_batch.io.codecs import encode_jpeg, encode_png
from fundus_batch.synth import synth_fundus


def write_inputs(
    folder: Path,
    n_good: int = 3,
    *,
    broken: bool = True,
    size: int = 640,
    seed: int = 100,
    vessels: bool = False,
) -> Path:
    """Write ``n_good`` synthetic photographs (and a corrupt and a missing one); return the
    manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_good):
        s = synth_fundus(size, seed=seed + i, canvas=(size + 160, size + 40))
        path = folder / f"img_{i:04d}.jpg"
        path.write_bytes(encode_jpeg(s.image, quality=90))
        row = {"image_id": f"img_{i:04d}", "uri": str(path), "grade": i % 5}
        if vessels:  # the generator's exact vessel map, as ground truth
            row["vessel_uri"] = str(folder / f"img_{i:04d}_vessel.png")
            Path(row["vessel_uri"]).write_bytes(encode_png(s.vessels))
        rows.append(row)
    if broken:
        good = (folder / "img_0000.jpg").read_bytes()
        (folder / "corrupt.jpg").write_bytes(good[: len(good) // 3])
        rows.append({"image_id": "corrupt", "uri": str(folder / "corrupt.jpg"), "grade": 0})
        rows.append({"image_id": "missing", "uri": str(folder / "does_not_exist.jpg"), "grade": 0})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def working_row(image_id: str, seed: int = 3) -> dict:
    """A preprocessed and degraded row as the Write stage receives it (64 px synthetic images)."""
    s = synth_fundus(64, seed=seed)
    png = encode_png(s.image)
    return {
        "image_id": image_id,
        "status": "ok",
        "variant": 0,
        "type_code": "001",
        "clean_png": png,
        "mask_png": encode_png(s.mask),
        "degraded_png": png,
    }


def folder_snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``out`` with its bytes and modification time: equal snapshots mean
    nothing was written."""
    return {
        str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }
