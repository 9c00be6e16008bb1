"""Stages are plain classes: called on lists of row dicts, without Ray."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from fundus_batch import stages
from fundus_batch.degrade import DegradationRecord, replay
from fundus_batch.io.codecs import decode_image, encode_jpeg
from fundus_batch.synth import synth_fundus


@pytest.fixture(scope="module")
def raw_jpeg(tmp_path_factory) -> Path:
    s = synth_fundus(700, seed=11, canvas=(900, 720))
    path = tmp_path_factory.mktemp("raw") / "img.jpg"
    path.write_bytes(encode_jpeg(s.image, quality=95))
    return path


def _row(image_id: str, uri: str) -> dict:
    return {"image_id": image_id, "source_uri": uri, "status": "ok"}


def _through_preprocess(rows: list[dict], size: int = 256) -> list[dict]:
    return stages.Preprocess(size=size)(stages.Fetch(threads=2)(rows))


def test_fetch_and_preprocess_produce_working_image_and_binary_mask(raw_jpeg: Path):
    [row] = _through_preprocess([_row("a", str(raw_jpeg))])
    assert row["status"] == "ok", row.get("error")
    img = decode_image(row["clean_png"])
    mask = stages.decode_mask(row["mask_png"])
    assert img.shape == (256, 256, 3) and mask.shape == (256, 256)
    assert set(np.unique(mask)) <= {0, 255}
    assert (img[mask == 0] == 0).all()
    assert row["source_width"] == 900 and row["source_height"] == 720
    assert abs(row["fov_r"] - 350) < 15
    assert "raw_bytes" not in row


def test_missing_and_corrupt_inputs_become_failed_rows_not_exceptions(tmp_path: Path, raw_jpeg):
    corrupt = tmp_path / "bad.jpg"
    corrupt.write_bytes(raw_jpeg.read_bytes()[:500])
    rows = _through_preprocess(
        [
            _row("missing", str(tmp_path / "nope.jpg")),
            _row("corrupt", str(corrupt)),
            _row("good", str(raw_jpeg)),
        ]
    )
    by_id = {r["image_id"]: r for r in rows}
    assert by_id["missing"]["status"] == "failed" and by_id["missing"]["failed_stage"] == "fetch"
    assert by_id["corrupt"]["status"] == "failed"
    assert by_id["corrupt"]["failed_stage"] == "preprocess"
    assert "truncated" in by_id["corrupt"]["error"] or "corrupt" in by_id["corrupt"]["error"]
    assert by_id["good"]["status"] == "ok"


def test_degrade_expands_pending_variants_deterministically_and_replays(raw_jpeg: Path):
    [pre] = _through_preprocess([_row("a", str(raw_jpeg))])
    pre["pending_variants"] = [0, 2, 5]
    deg = stages.Degrade(seed=7, variants=7, types=["001", "010", "111"])
    rows = deg([dict(pre)])
    assert [r["variant"] for r in rows] == [0, 2, 5]
    assert [r["type_code"] for r in rows] == ["001", "111", "111"]
    assert [r["carries_clean"] for r in rows] == [True, False, False]
    again = deg([dict(pre)])
    assert [r["degraded_png"] for r in rows] == [r["degraded_png"] for r in again]
    image = decode_image(pre["clean_png"])
    mask = stages.decode_mask(pre["mask_png"])
    for r in rows:
        record = DegradationRecord.from_json(r["params_json"])
        assert np.array_equal(replay(image, mask, record), decode_image(r["degraded_png"]))


def test_sampled_types_stay_within_the_configured_list():
    picks = {
        stages.choose_type(["010", "100"], "sample", 3, f"id{i}", v)
        for i in range(20)
        for v in range(3)
    }
    assert picks == {"010", "100"}


def test_failed_image_expands_into_one_failed_row_per_variant():
    row = {
        "image_id": "x",
        "status": "failed",
        "failed_stage": "fetch",
        "error": "gone",
        "pending_variants": [0, 1, 2],
    }
    rows = stages.Degrade(seed=0, variants=3, types=["111"])([row])
    assert len(rows) == 3
    assert all(r["status"] == "failed" and r["error"] == "gone" for r in rows)


def test_score_then_write_records_metrics_uris_and_checksums(raw_jpeg: Path, tmp_path: Path):
    [pre] = _through_preprocess([_row("a", str(raw_jpeg))])
    pre["pending_variants"] = [0, 1]
    rows = stages.Degrade(seed=1, variants=2, types=["111", "011"])([pre])
    rows = stages.Score(("clean", "degraded"))(rows)
    for r in rows:
        assert 10 < r["psnr_degraded"] < 60 and 0 < r["ssim_degraded"] < 1
        assert r["metric_version"]
    out = str(tmp_path / "out")
    rows = stages.Write(out)(rows)
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        for role in ("clean", "mask", "degraded"):
            data = Path(r[f"{role}_uri"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == r[f"{role}_sha256"]
        assert "degraded_png" not in r and "clean_png" not in r
    assert rows[0]["degraded_uri"].endswith("images/a/v000_111.png")
    assert rows[1]["degraded_uri"].endswith("images/a/v001_011.png")


def test_write_refuses_paths_outside_the_output_root(tmp_path: Path):
    w = stages.Write(str(tmp_path / "out"))
    row = {
        "image_id": "..",
        "status": "ok",
        "variant": 0,
        "type_code": "111",
        "degraded_png": b"x",
        "clean_png": b"y",
        "mask_png": b"z",
        "carries_clean": True,
    }
    [res] = w([row])
    assert res["status"] == "failed" and res["failed_stage"] == "write"
    assert "'..'" in res["error"] or "outside" in res["error"]
    assert not any((tmp_path).glob("**/v000_111.png"))
