"""`fundus-batch enhance` on the Cofe-Net authors' real low-quality photographs (../shared)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fundus_batch.cli import main
from fundus_batch.io.codecs import decode_image


def cofenet_lq_manifest(shared: Path, dest: Path, limit: int | None = None) -> Path:
    """Manifest of the authors' 100 real low-quality images with their FOV masks."""
    folder = shared / "data" / "cofenet_lq"
    images = sorted((folder / "image").glob("*.png"))[:limit]
    if not images:
        pytest.skip(f"no images in {folder}")
    pd.DataFrame(
        {
            "image_id": [p.stem for p in images],
            "uri": [str(p) for p in images],
            "mask_uri": [str(folder / "mask" / p.name) for p in images],
        }
    ).to_csv(dest, index=False)
    return dest


@pytest.mark.slow
def test_enhance_writes_an_enhanced_image_and_a_row_per_real_photograph(shared_dir, tmp_path):
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        manifest = cofenet_lq_manifest(shared_dir, tmp_path / "m.csv", limit=4)
        out = tmp_path / "out"
        result = CliRunner().invoke(
            main, ["enhance", "--manifest", str(manifest), "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
    finally:
        ray.shutdown()
    df = pq.read_table(str(out / "pairs")).to_pandas()
    assert len(df) == 4 and (df.status == "ok").all(), df.error.tolist()
    assert (df.model_name == "fundus-cofenet-small").all() and df.model_sha256.notna().all()
    assert (df.fov_status == "given_mask").all()
    for row in df.itertuples():
        assert decode_image((out / row.enhanced_uri).read_bytes()).shape == (512, 512, 3)
    assert df.nr_luminance_enhanced.notna().all() and df.nr_luminance_clean.notna().all()
