"""Write never overwrites an image's shared clean or mask file with other bytes, whichever
variant carries them."""

from __future__ import annotations

from pathlib import Path

from fundus_batch import stages
from tests.test_stages import _variant_row


def test_variant_0_with_a_changed_clean_fails_and_keeps_the_file_other_variants_wrote(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    [old] = stages.Write(out=str(out))([_variant_row(1, b"old clean")])
    # a later run adds variant 0 (its first try failed) after the source photograph changed
    [new] = stages.Write(out=str(out))([_variant_row(0, b"new clean")])
    assert new["status"] == "failed" and "already exists with other content" in new["error"]
    assert (out / old["clean_uri"]).read_bytes() == b"old clean"
