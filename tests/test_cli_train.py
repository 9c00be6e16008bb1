"""`fundus-batch train` on pairs in object storage (a real S3 endpoint on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from fundus_batch.cli import main
from tests.train.test_train_samples import _write_pairs


def test_train_reads_pairs_from_s3_with_storage_options(
    tmp_path: Path, s3_server: dict, s3_bucket: str
) -> None:
    import fsspec
    import pyarrow.parquet as pq

    options = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **options)
    local = tmp_path / "local"
    _write_pairs(local)
    shard = local / "pairs" / "part-0.parquet"
    table = pq.read_table(shard)
    for name in ("clean_uri", "mask_uri", "degraded_uri"):  # relative to OUT, as the pipeline's
        uris = [u and u.removeprefix(f"{local}/") for u in table.column(name).to_pylist()]
        table = table.set_column(table.schema.get_field_index(name), name, [uris])
    pq.write_table(table, shard)
    fs.put(f"{local}/", f"{s3_bucket}/out/", recursive=True)
    # Only the bucket holds the images now.
    for png in local.rglob("*.png"):
        png.unlink()
    args = ["train", "--pairs", f"s3://{s3_bucket}/out", "--out", str(tmp_path / "model")]
    args += ["--width", "0.125", "--size", "192", "--batch-size", "2", "--steps", "1"]
    args += ["--device", "cpu", "--val-split", "val"]
    result = CliRunner().invoke(main, [*args, "--storage-options", json.dumps(options)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "trained 1 steps" in result.output and "validation at step 1" in result.output
    assert (tmp_path / "model" / "model.pt").is_file()
