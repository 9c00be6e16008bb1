"""Which committed rows a run redoes when enhancement or metrics are added, and what settling
the redo leaves: rows are never lost or miscounted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fundus_batch.manifest_stream import KeySet, pair_keys
from fundus_batch.output import OutputStore
from tests.test_out_lease import _shard


def _everything(table: pa.Table) -> np.ndarray:
    return np.ones(table.num_rows, dtype=bool)


def test_ok_rows_of_a_shard_written_without_the_column_are_redone(tmp_path: Path) -> None:
    """A shard from a version that had no ``metric_version`` column lacks it in every row."""
    _shard(tmp_path / "out" / "pairs" / "part-a.parquet", ["x", "y"], [0, 0], ["ok", "failed"])
    store = OutputStore(str(tmp_path / "out"))
    redo, counts = store.rows_lacking({"metric_version": "metrics"}, _everything)
    assert len(redo) == 1 and counts == {"metrics": 1}
    assert redo.contains(pair_keys(["x"], [0])).all()


def test_a_redo_pair_the_run_did_not_reach_keeps_its_row_and_is_not_counted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "out" / "pairs" / "part-a.parquet"
    _shard(path, ["x"], [0], ["ok"])
    pq.write_table(
        pq.read_table(path).append_column("enhanced_uri", pa.nulls(1, pa.string())), path
    )
    store = OutputStore(str(tmp_path / "out"))
    settled = store.settle_redone(KeySet.of([pair_keys(["x"], [0])]), ["enhanced_uri"])
    assert (settled.replaced, settled.kept, settled.first_error) == (0, 0, None)
    assert store.read_table(["image_id"]).column("image_id").to_pylist() == ["x"]
