"""pix2pix images hold the degraded image (A, the input) left of the clean one (B)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fundus_batch.export import export_pairs
from fundus_batch.io.codecs import decode_image, encode_png
from tests.test_export import _write_output


def test_pix2pix_puts_the_degraded_image_left_and_the_clean_one_right(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write_output(out, [("a", None)])
    clean, degraded = np.full((16, 16, 3), 200, np.uint8), np.full((16, 16, 3), 30, np.uint8)
    (out / "img" / "c0.png").write_bytes(encode_png(clean))
    (out / "img" / "d0.png").write_bytes(encode_png(degraded))
    export_pairs(str(out), "pix2pix", tmp_path / "d")
    pair = decode_image((tmp_path / "d" / "train" / "a_v000_001.png").read_bytes())
    assert np.array_equal(pair[:, :16], degraded) and np.array_equal(pair[:, 16:], clean)
