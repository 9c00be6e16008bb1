"""`fundus-batch degrade-image --replay`: records it cannot replay faithfully are refused."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from fundus_batch.cli import main
from fundus_batch.io.codecs import encode_jpeg, encode_png
from fundus_batch.synth import synth_fundus

RELEASED_BLUR = {
    "name": "x.png",
    "type": "100",
    "params": {"blur": {"sigma": 9.0, "rad_w": 7, "rad_h": 7}},
}


def _photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode_jpeg(synth_fundus(600, seed=5, canvas=(800, 640)).image))
    return path


def test_a_released_json_is_replayed_at_512_and_refused_at_another_size(tmp_path: Path) -> None:
    """The released schema's coordinates are for a 512 px image; at --size 1024 they would land
    in the wrong place with no error."""
    photo, record = _photo(tmp_path), tmp_path / "p.json"
    record.write_text(json.dumps(RELEASED_BLUR))
    args = ["degrade-image", str(photo), str(tmp_path / "o.png"), "--replay", str(record)]
    ok = CliRunner().invoke(main, args)
    assert ok.exit_code == 0, ok.output
    refused = CliRunner().invoke(main, [*args, "--size", "1024"])
    assert refused.exit_code == 1
    assert "record is for 512 px, image is 1024 px" in refused.output


def test_a_record_that_is_not_json_is_named_with_its_file(tmp_path: Path) -> None:
    record = tmp_path / "cut.json"
    record.write_text('{"type_code": "111", "pre')
    args = ["degrade-image", str(_photo(tmp_path)), str(tmp_path / "o.png"), "--replay"]
    result = CliRunner().invoke(main, [*args, str(record)])
    assert result.exit_code == 1 and result.exception is not None
    assert f"record: {record}: invalid JSON" in result.output


def test_size_beside_preprocessed_is_refused_instead_of_ignored(tmp_path: Path) -> None:
    s = synth_fundus(256, seed=2)
    src, mask, out = tmp_path / "w.png", tmp_path / "m.png", tmp_path / "o.png"
    src.write_bytes(encode_png(s.image))
    mask.write_bytes(encode_png(s.mask))
    args = ["degrade-image", str(src), str(out), "--preprocessed", "--mask", str(mask)]
    result = CliRunner().invoke(main, [*args, "--size", "512"])
    assert result.exit_code == 2 and "--size 512 with --preprocessed" in result.output
    assert not out.exists()
    assert CliRunner().invoke(main, args).exit_code == 0 and out.exists()
