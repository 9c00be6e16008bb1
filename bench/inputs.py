"""Benchmark inputs shared by the benches: raw-camera-like synthetic JPEGs and their manifest."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fundus_batch.io.codecs import encode_jpeg
from fundus_batch.synth import synth_fundus


def synthetic_manifest(folder: Path, n: int, size: int, distinct: int = 16) -> Path:
    """``n`` raw-camera-like synthetic JPEGs (``distinct`` eyes in a larger black frame,
    repeated under new ids) and ``folder/manifest.csv`` listing them."""
    folder.mkdir(parents=True, exist_ok=True)
    eyes = []
    for i in range(min(n, distinct)):
        s = synth_fundus(int(size * 1.5), seed=i, canvas=(int(size * 2), int(size * 1.6)))
        eyes.append(encode_jpeg(s.image, quality=90))
    rows = []
    for i in range(n):
        path = folder / f"img_{i:06d}.jpg"
        path.write_bytes(eyes[i % len(eyes)])
        rows.append({"image_id": f"img_{i:06d}", "uri": str(path)})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest
