"""Export reads and writes its rows in bounded chunks and loses none at a chunk's edge."""

from __future__ import annotations

from pathlib import Path

import pytest

from fundus_batch import export
from tests.test_export import _files, _write_output


@pytest.mark.parametrize("fmt", ["basicsr", "pix2pix"])
def test_every_pair_is_exported_when_the_rows_span_several_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    monkeypatch.setattr(export, "_CHUNK", 2)  # 5 rows: chunks of 2, 2 and 1
    ids = [f"id{n}" for n in range(5)]
    _write_output(tmp_path / "out", [(i, None) for i in ids])
    summary = export.export_pairs(str(tmp_path / "out"), fmt, tmp_path / "d")
    names = [f"{i}_v000_001.png" for i in ids]
    written = _files(tmp_path / "d")
    if fmt == "basicsr":
        assert written == [f"GT/{n}" for n in names] + [f"LQ/{n}" for n in names] + [
            "meta_info.txt"
        ]
        meta = (tmp_path / "d" / "meta_info.txt").read_text().splitlines()
        assert [line.split()[0] for line in meta] == names
    else:
        assert written == [f"train/{n}" for n in names]
    assert summary.pairs == 5
