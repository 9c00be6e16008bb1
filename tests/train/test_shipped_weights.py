"""The shipped weights: they load, match their record and reproduce the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fundus_batch.degrade import TYPE_CODES
from fundus_batch.models import file_sha256, list_weights, load_registered
from fundus_batch.models.weights import PACKAGE_WEIGHTS_DIR
from fundus_batch.train import DegradeSource, evaluate, load_clean_sample

SHIPPED = "fundus-cofenet-small"


def _eval_doc() -> dict:
    path = PACKAGE_WEIGHTS_DIR / f"{SHIPPED}.eval.json"
    assert path.is_file(), f"{path} is missing"
    return json.loads(path.read_text(encoding="utf-8"))


def test_shipped_weights_load_by_name_and_match_their_sha256() -> None:
    entry = list_weights()[SHIPPED]
    assert entry.registry == PACKAGE_WEIGHTS_DIR / "registry.json"
    assert file_sha256(entry.path) == entry.sha256
    assert entry.path.stat().st_size < 16 * 2**20
    model = load_registered(SHIPPED)
    assert not model.training and model.width == entry.width
    assert model.residual == entry.residual
    state = torch.load(entry.path, map_location="cpu", weights_only=True)
    assert set(state) == set(model.state_dict())


def test_registry_metrics_are_the_evaluation_record() -> None:
    entry, doc = list_weights()[SHIPPED], _eval_doc()
    assert entry.metrics["val_psnr_gain_mean"] == pytest.approx(doc["mean_psnr_gain"], abs=1e-3)
    for t in TYPE_CODES:
        gain = doc["per_type"][t]["psnr_gain"]
        assert entry.metrics[f"val_psnr_gain_{t}"] == pytest.approx(gain, abs=1e-3)
    per_image = doc["per_image"]
    assert len(per_image) == 7 * len(doc["holdout"])
    card = (PACKAGE_WEIGHTS_DIR / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert f"{doc['mean_psnr_gain']:+.2f}" in card


@pytest.mark.shared
def test_shipped_model_reproduces_the_card_on_two_held_out_images(shared_dir: Path) -> None:
    doc = _eval_doc()
    data = shared_dir / "data"
    # One held-out photograph with vessel maps (HRF) and one raw camera JPEG (EyePACS).
    picked = [
        next(e for e in doc["holdout"] if e["image_id"].startswith(prefix))
        for prefix in ("hrf/", "eyepacs/")
    ]
    if not all((data / e["image"]).is_file() for e in picked):
        pytest.skip("held-out photographs are not in the shared data folder")
    samples = [
        load_clean_sample(
            e["image_id"],
            data / e["image"],
            doc["protocol"]["working_size"],
            vessels_path=data / e["vessels"] if "vessels" in e else None,
            mask_path=data / e["mask"] if "mask" in e else None,
        )
        for e in picked
    ]
    items = DegradeSource(samples, preset=doc["protocol"]["preset"]).val_items(
        doc["protocol"]["seed"]
    )
    report = evaluate(load_registered(SHIPPED), items)
    recorded = {(r["image_id"], r["type_code"]): r for r in doc["per_image"]}
    for row in report.per_image:
        want = recorded[(row["image_id"], row["type_code"])]
        assert row["psnr_degraded"] == pytest.approx(want["psnr_degraded"], abs=1e-6)
        assert row["psnr_enhanced"] == pytest.approx(want["psnr_enhanced"], abs=0.05)
        assert row["ssim_enhanced"] == pytest.approx(want["ssim_enhanced"], abs=1e-3)
