"""Stages are plain classes: called on lists of row dicts, without Ray."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from fundus_batch import imaging, stages
from fundus_batch.degrade import DegradationRecord, replay
from fundus_batch.io.codecs import decode_image, encode_jpeg, encode_png
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
    mask = imaging.decode_mask(row["mask_png"])
    assert img.shape == (256, 256, 3) and mask.shape == (256, 256)
    assert set(np.unique(mask)) <= {0, 255}
    assert (img[mask == 0] == 0).all()
    assert row["source_width"] == 900 and row["source_height"] == 720
    assert abs(row["fov_r"] - 350) < 15
    assert "raw_bytes" not in row


@pytest.mark.parametrize(
    ("name", "reason"), [("pixel", "too_small"), ("dots", "too_small"), ("grey", "blank")]
)
def test_a_given_fov_mask_that_detection_would_refuse_fails_the_row_at_preprocess(
    tmp_path: Path, name: str, reason: str
):
    """A 1-pixel mask, two far dots (a large bounding box, no field), and a whole-disc mask
    on a uniform image: no ``ok`` row of garbage, but the FOVError detection would give."""
    photo = synth_fundus(256, seed=1).image
    mask = np.zeros((256, 256), np.uint8)
    if name == "pixel":
        mask[128, 128] = 255
    elif name == "dots":
        mask[10, 10] = mask[240, 240] = 255
    else:
        photo = np.full_like(photo, 128)
        mask = synth_fundus(256, seed=1).mask
    (tmp_path / "photo.png").write_bytes(encode_png(photo))
    (tmp_path / "mask.png").write_bytes(encode_png(mask))
    row = {**_row(name, str(tmp_path / "photo.png")), "source_mask_uri": str(tmp_path / "mask.png")}
    [out] = _through_preprocess([row])
    assert (out["status"], out["failed_stage"]) == ("failed", "preprocess")
    assert out["error"].startswith(f"FOVError({reason}): "), out["error"]
    assert "clean_png" not in out and "mask_png" not in out


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
    again = deg([dict(pre)])
    assert [r["degraded_png"] for r in rows] == [r["degraded_png"] for r in again]
    image = decode_image(pre["clean_png"])
    mask = imaging.decode_mask(pre["mask_png"])
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
    rows = stages.Score(roles=("clean", "degraded"))(rows)
    for r in rows:
        assert 10 < r["psnr_degraded"] < 60 and 0 < r["ssim_degraded"] < 1
        assert r["metric_version"]
    out = str(tmp_path / "out")
    rows = stages.Write(out=out)(rows)
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        for role in ("clean", "mask", "degraded"):
            data = (Path(out) / r[f"{role}_uri"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == r[f"{role}_sha256"]
        assert "degraded_png" not in r and "clean_png" not in r
    assert rows[0]["degraded_uri"] == "images/a/v000_111.png"  # relative to OUT
    assert rows[1]["degraded_uri"] == "images/a/v001_011.png"


def test_score_reuses_the_clean_context_only_for_rows_of_the_same_clean_image(raw_jpeg: Path):
    from fundus_batch.io.codecs import encode_png
    from fundus_batch.metrics import full_reference_metrics, noref_metrics

    [pre_a] = _through_preprocess([_row("a", str(raw_jpeg))], size=320)  # MS-SSIM defined
    pre_b = dict(pre_a, image_id="b")  # a different clean image and mask: the mirror image
    pre_b["clean_png"] = encode_png(np.fliplr(decode_image(pre_a["clean_png"])).copy())
    pre_b["mask_png"] = encode_png(np.fliplr(imaging.decode_mask(pre_a["mask_png"])).copy())
    deg = stages.Degrade(seed=2, variants=3, types=["111", "100", "010"])
    rows_a = deg([dict(pre_a, pending_variants=[0, 1, 2])])
    rows_b = deg([dict(pre_b, pending_variants=[0, 1])])
    batch = [rows_a[0], rows_a[1], rows_b[0], rows_a[2], rows_b[1]]  # interleaved images
    scored = stages.Score(roles=("clean", "degraded"))([dict(r) for r in batch])
    for row in scored:
        assert row["status"] == "ok", row.get("error")
        clean = decode_image(row["clean_png"])
        mask = imaging.decode_mask(row["mask_png"])
        degraded = decode_image(row["degraded_png"])
        fr = full_reference_metrics(degraded, clean, mask)
        assert np.isfinite(row["ms_ssim_degraded"])
        assert [row[f"{k}_degraded"] for k in ("psnr", "ssim", "ms_ssim")] == list(fr.values())
        for role, img in (("clean", clean), ("degraded", degraded)):
            for name, value in noref_metrics(img, mask).items():
                assert row[f"{name}_{role}"] == value


def test_write_refuses_paths_outside_the_output_root(tmp_path: Path):
    w = stages.Write(out=str(tmp_path / "out"))
    row = {
        "image_id": "..",
        "status": "ok",
        "variant": 0,
        "type_code": "111",
        "degraded_png": b"x",
        "clean_png": b"y",
        "mask_png": b"z",
    }
    [res] = w([row])
    assert res["status"] == "failed" and res["failed_stage"] == "write"
    assert "'..'" in res["error"] or "outside" in res["error"]
    assert not any((tmp_path).glob("**/v000_111.png"))


def _variant_row(variant: int, clean: bytes) -> dict:
    return {
        "image_id": "a",
        "status": "ok",
        "variant": variant,
        "type_code": "001",
        "degraded_png": b"degraded %d" % variant,
        "clean_png": clean,
        "mask_png": b"mask",
    }


def test_the_shared_clean_and_mask_are_written_when_the_row_meant_to_carry_them_failed(
    tmp_path: Path,
):
    out = tmp_path / "out"
    # variant 0 failed before Write; variants 1 and 2 arrive in separate batches and actors
    [first] = stages.Write(out=str(out))([_variant_row(1, b"clean")])
    [second] = stages.Write(out=str(out))([_variant_row(2, b"clean")])
    assert first["status"] == second["status"] == "ok"
    for role, data in (("clean", b"clean"), ("mask", b"mask")):
        assert (out / first[f"{role}_uri"]).read_bytes() == data
        assert first[f"{role}_sha256"] == hashlib.sha256(data).hexdigest()


def test_a_shared_clean_file_with_other_bytes_fails_the_row_and_is_not_overwritten(
    tmp_path: Path,
):
    out = tmp_path / "out"
    [old] = stages.Write(out=str(out))([_variant_row(0, b"old clean")])
    clean = out / old["clean_uri"]
    # a later run (more variants) whose source photograph has changed since
    rows = stages.Write(out=str(out))(
        [_variant_row(1, b"new clean"), _variant_row(2, b"other!!!!")]  # the same size too
    )
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert all("already exists with other content" in r["error"] for r in rows)
    assert clean.read_bytes() == b"old clean"
    # the same bytes again (a resumed or extended run of an unchanged source) are fine
    [again] = stages.Write(out=str(out))([_variant_row(3, b"old clean")])
    assert again["status"] == "ok" and again["clean_sha256"] == old["clean_sha256"]


def _vessel_rows(tmp_path: Path, truth: np.ndarray | None = None) -> list[dict]:
    """One synthetic photograph with its exact vessel map, through fetch and preprocess."""
    from fundus_batch.io.codecs import encode_png

    s = synth_fundus(700, seed=5, canvas=(900, 720))
    (tmp_path / "img.jpg").write_bytes(encode_jpeg(s.image, quality=95))
    (tmp_path / "ves.png").write_bytes(encode_png(s.vessels if truth is None else truth))
    row = _row("v", str(tmp_path / "img.jpg"))
    row["vessel_gt_uri"] = str(tmp_path / "ves.png")
    return stages.Preprocess(size=256)(stages.Fetch(threads=1, vessels=True)([row]))


def test_score_segments_vessels_independently_on_clean_degraded_and_enhanced(tmp_path: Path):
    import cv2

    from fundus_batch.metrics.vessels import VESSEL_SEGMENTER, segment_and_score

    [pre] = _vessel_rows(tmp_path)
    pre = stages.Score(roles=("clean",))([pre])[0]
    [row] = stages.Degrade(seed=1, variants=1, types=["100"])([dict(pre, pending_variants=[0])])
    # A stand-in enhancer that blurs further: its vessel scores must drop below the input's.
    mask = imaging.decode_mask(row["mask_png"])
    worse = cv2.GaussianBlur(decode_image(row["degraded_png"]), (0, 0), 3)
    worse[mask == 0] = 0
    row["enhanced_png"] = imaging.encode_output(worse, "png", 95)
    [row] = stages.Score(roles=("degraded", "enhanced"))([row])
    assert row["status"] == "ok", row.get("error")
    assert row["vessel_segmenter"] == VESSEL_SEGMENTER
    truth = imaging.decode_mask(row["vessel_gt_png"])
    for role in ("clean", "degraded", "enhanced"):
        image = decode_image(row[f"{role}_png"])
        want = segment_and_score(image, truth, mask)
        assert row[f"vessel_auc_{role}"] == want["vessel_auc"]
        assert row[f"vessel_f1_{role}"] == want["vessel_f1"]
    assert row["vessel_auc_clean"] > 0.9
    assert row["vessel_auc_enhanced"] < row["vessel_auc_degraded"] - 0.02


def test_score_leaves_vessel_scores_null_when_the_truth_has_no_vessel(tmp_path: Path):
    [pre] = _vessel_rows(tmp_path, truth=np.zeros((720, 900), np.uint8))
    [row] = stages.Score(roles=("clean",))([pre])
    assert row["status"] == "ok", row.get("error")
    assert row.get("vessel_auc_clean") is None and row.get("vessel_segmenter") is None
    assert row["nr_luminance_clean"] > 0


# --- items: decoded images stay in the worker -------------------------------------------------


def _chain_specs(out: str, image_format: str, variants: int = 2) -> list[stages.StageSpec]:
    fmt = {"image_format": image_format, "jpeg_quality": 90}
    return [
        stages.StageSpec(stages.Preprocess, {"size": 256, **fmt}),
        stages.StageSpec(stages.Score, {"roles": ("clean",)}),
        stages.StageSpec(
            stages.Degrade, {"seed": 4, "variants": variants, "types": ["111", "010"], **fmt}
        ),
        stages.StageSpec(stages.Score, {"roles": ("degraded", "enhanced")}),
        stages.StageSpec(stages.Write, {"out": out, "image_format": image_format}),
    ]


def _fetched(raw_jpeg: Path, ids: tuple[str, ...] = ("a", "b")) -> list[dict]:
    return stages.Fetch(threads=1)([_row(i, str(raw_jpeg)) for i in ids])


@pytest.mark.parametrize(("image_format", "decodes"), [("png", 2), ("jpeg", 2 * 2 + 2 * 3)])
def test_chained_stages_decode_only_the_source_and_lossy_outputs(
    raw_jpeg: Path, tmp_path: Path, monkeypatch, image_format: str, decodes: int
):
    """Two images, three variants: PNG outputs are never decoded again; a JPEG output is
    decoded once, so that later stages see the stored pixels."""
    from fundus_batch.io import codecs

    rows = _fetched(raw_jpeg)
    calls: list[int] = []
    real = codecs.decode_image

    def counting(data: bytes, **kwargs) -> np.ndarray:
        calls.append(len(data))
        return real(data, **kwargs)

    monkeypatch.setattr(codecs, "decode_image", counting)
    chain = stages.Chain(_chain_specs(str(tmp_path / "out"), image_format, variants=3))
    out = chain(rows)
    assert [r["status"] for r in out] == ["ok"] * 6, [r.get("error") for r in out]
    assert len(calls) == decodes


def test_chained_score_stages_build_one_clean_metric_context_per_image(
    raw_jpeg: Path, tmp_path: Path, monkeypatch
):
    """Score(clean) before Degrade and Score(degraded) after it share the clean image's
    no-reference and full-reference contexts through the item: one of each per image."""
    from fundus_batch import metrics

    built: list[str] = []
    real_noref, real_reference = metrics.NorefContext, metrics.reference_context

    def noref(*args, **kwargs):
        built.append("noref")
        return real_noref(*args, **kwargs)

    def reference(*args, **kwargs):
        built.append("reference")
        return real_reference(*args, **kwargs)

    monkeypatch.setattr(metrics, "NorefContext", noref)
    monkeypatch.setattr(metrics, "reference_context", reference)
    other = tmp_path / "other.jpg"
    other.write_bytes(encode_jpeg(synth_fundus(600, seed=5, canvas=(700, 640)).image))
    rows = [_row("a", str(raw_jpeg)), _row("b", str(other))]
    chain = stages.Chain(_chain_specs(str(tmp_path / "out"), "png", variants=3))
    out = chain(stages.Fetch(threads=1)(rows))
    assert [r["status"] for r in out] == ["ok"] * 6, [r.get("error") for r in out]
    assert sorted(built) == ["noref", "noref", "reference", "reference"]
    # Up to Write the items hold their image's contexts; only the last image's full-reference
    # context is still alive (each is several image-sized float arrays).
    items = stages.Chain(_chain_specs("unused", "png", variants=3)[:-1]).process(
        stages.items_of(stages.Fetch(threads=1)(rows))
    )
    contexts = {id(i.clean_scoring): i.clean_scoring for i in items}
    assert len(contexts) == 2
    assert [c._reference is not None for c in contexts.values() if c is not None] == [False, True]


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_chained_stages_equal_stages_that_exchange_encoded_bytes(
    raw_jpeg: Path, tmp_path: Path, image_format: str
):
    """In one worker (decoded arrays) and across workers (bytes re-decoded at each stage): the
    same files, checksums and metric values."""
    specs = _chain_specs(str(tmp_path / "chained"), image_format)
    chained = stages.Chain(specs)(_fetched(raw_jpeg))
    rows = _fetched(raw_jpeg)
    specs[-1] = stages.StageSpec(
        stages.Write, {"out": str(tmp_path / "apart"), "image_format": image_format}
    )
    for spec in specs:
        built = spec.build()
        assert isinstance(built, stages.RowsCallable)
        rows = built([dict(r) for r in rows])  # every stage gets bytes only, as across workers
    assert len(chained) == len(rows) == 4
    for a, b in zip(chained, rows, strict=True):
        assert a["status"] == b["status"] == "ok"
        volatile = {k for k in a if k.startswith("seconds_")}
        assert {k: v for k, v in a.items() if k not in volatile} == {
            k: v for k, v in b.items() if k not in volatile
        }
        assert a["psnr_degraded"] > 10 and a["nr_luminance_clean"] > 0
    for path in (tmp_path / "chained").rglob("*.*"):
        twin = tmp_path / "apart" / path.relative_to(tmp_path / "chained")
        assert path.read_bytes() == twin.read_bytes(), path.name


def test_item_round_trips_rows_and_shares_read_only_images_between_variants(raw_jpeg: Path):
    [pre] = stages.Chain([stages.StageSpec(stages.Preprocess, {"size": 128})]).process(
        stages.items_of(_fetched(raw_jpeg, ("a",)))
    )
    assert set(pre.encoded) == {"clean", "mask"} and pre.row["size"] == 128
    assert np.array_equal(pre.image("clean"), decode_image(pre.encoded["clean"]))
    with pytest.raises(ValueError, match="read-only"):
        pre.image("clean")[0, 0, 0] = 1
    row = pre.to_row()
    assert row["clean_png"] is pre.encoded["clean"] and "images" not in row
    again = stages.Item.from_row(row)
    assert again.row == pre.row and again.encoded == pre.encoded and not again.images
    variants = stages.Degrade(seed=0, variants=2, types=["001"]).process([pre])
    assert variants[0].images["clean"] is variants[1].images["clean"] is pre.images["clean"]
    assert variants[0].encoded["degraded"] != variants[1].encoded["degraded"]


def test_a_stage_that_raises_fails_its_rows_and_the_chain_goes_on():
    class Broken(stages.RowsCallable):
        name = "broken"
        resources = stages.Resources()

        def process(self, batch: stages.Batch) -> stages.Batch:
            raise RuntimeError("boom")

    after = stages.QualityGate(rule="nr_luminance_clean > 1")
    out = stages.run_stages([Broken(), after], stages.items_of([_row("a", "x")]))
    assert [(i.row["status"], i.row["failed_stage"]) for i in out] == [("failed", "broken")]
    assert "RuntimeError: boom" in out[0].row["error"] and "quality_ok" not in out[0].row


def test_a_stage_that_cannot_be_built_names_itself_and_its_root_cause_in_one_line():
    from fundus_batch.enhance import Enhance

    specs = [
        stages.StageSpec(stages.Preprocess, {"size": 128}),
        stages.StageSpec(Enhance, {"weights": "no-such-weights", "device": "cpu"}),
    ]
    with pytest.raises(stages.StageBuildError) as err:
        stages.Chain(specs)
    message = str(err.value)
    assert message.startswith("the enhance stage could not start: WeightsError: 'no-such-weights'")
    assert "\n" not in message


def test_stages_take_keyword_arguments_only():
    with pytest.raises(TypeError):
        stages.Write("out")  # type: ignore[misc]
    with pytest.raises(TypeError):
        stages.Score(("clean",))  # type: ignore[misc]


def test_the_schema_names_the_noref_metrics_without_importing_them():
    import subprocess
    import sys

    from fundus_batch.metrics import NOREF_METRICS
    from fundus_batch.schema import NOREF_NAMES

    assert tuple(NOREF_METRICS) == NOREF_NAMES
    code = (
        "import sys, fundus_batch.schema; "
        "print(sorted(m for m in sys.modules if m.startswith(('skimage', 'fundus_batch.metrics'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
