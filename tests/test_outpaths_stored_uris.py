"""A recorded absolute URI is inside OUT only under OUT's folder, not a sibling that shares
its name as a prefix."""

from __future__ import annotations

from pathlib import Path

from fundus_batch import outpaths


def test_an_absolute_uri_in_a_sibling_folder_named_like_out_is_outside(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    assert outpaths.stored_uri_problem(out, str(tmp_path / "out2" / "images" / "a.png"))
    assert outpaths.stored_uri_problem(out, str(tmp_path / "out.old" / "a.png"))
    assert outpaths.stored_uri_problem(out, str(tmp_path / "out" / "images" / "a.png")) is None
