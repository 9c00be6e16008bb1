"""Cofe-Net training: loss terms, determinism and resume, pairs datasets, the shipped model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fundus_batch.degrade import TYPE_CODES, degrade, sample_rng
from fundus_batch.fov import Circle, crop_to_fov
from fundus_batch.io.codecs import encode_png
from fundus_batch.models import CofeNet, build_cofenet, file_sha256, list_weights, load_registered
from fundus_batch.models.weights import PACKAGE_WEIGHTS_DIR
from fundus_batch.schema import output_schema, to_table
from fundus_batch.synth import synth_fundus
from fundus_batch.train import (
    CleanSample,
    DegradeSource,
    PairsSource,
    TrainConfig,
    TrainError,
    cofenet_loss,
    enhance_images,
    evaluate,
    fixup_init,
    load_checkpoint,
    load_clean_sample,
    make_batch,
    spot_mask,
    train,
)

SHIPPED = "fundus-cofenet-small"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _samples(n: int = 3, size: int = 224, disc: bool = True) -> list[CleanSample]:
    out = []
    for i in range(n):
        s = synth_fundus(size, seed=10 + i)
        box = (size // 2 - 20, size // 2 - 20, size // 2 + 20, size // 2 + 20) if disc else None
        out.append(CleanSample(f"synth-{i}", s.image, s.mask, s.vessels, box))
    return out


def _tiny(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        width=0.125, size=192, batch_size=2, steps=4, lr=1e-3, log_every=1, device="cpu"
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------ loss


def test_loss_has_every_term_and_ignores_pixels_outside_the_fov() -> None:
    source = DegradeSource(_samples(2, 192))
    items = [source.train_item(i, sample_rng(0, "t", i)) for i in range(2)]
    batch = make_batch(items)
    model = build_cofenet("cofe-net", 0.125, residual=True, generator=torch.Generator())
    config = _tiny(lambda_lqa=1.0)
    outputs = model(batch.degraded)
    total, terms = cofenet_loss(model, outputs, batch, config)
    assert set(terms) == {"l1", "l1_256", "disc", "vessel", "lqa"}
    assert all(np.isfinite(v) and v > 0 for v in terms.values())
    assert total.item() == pytest.approx(sum(terms.values()), rel=1e-5)

    # A perfect output: the image terms vanish; garbage outside the FOV changes nothing.
    out_512 = batch.clean + (1 - batch.mask) * 0.7
    out_256 = torch.nn.functional.avg_pool2d(batch.clean, 2)
    vessel, attention = outputs[2].detach(), outputs[3].detach()
    _, perfect = cofenet_loss(model, (out_512, out_256, vessel, attention), batch, config)
    assert perfect["l1"] == 0.0 and perfect["l1_256"] == 0.0 and perfect["disc"] == 0.0

    # Terms without ground truth are left out instead of being computed against zeros.
    bare_source = DegradeSource(
        [CleanSample(f"b{i}", it.clean, it.mask) for i, it in enumerate(items)]
    )
    bare = make_batch([bare_source.train_item(i, sample_rng(0, "b", i)) for i in range(2)])
    _, bare_terms = cofenet_loss(model, model(bare.degraded), bare, config)
    assert set(bare_terms) == {"l1", "l1_256", "lqa"}


def test_degraded_loss_scale_measures_the_fraction_of_error_left() -> None:
    source = DegradeSource(_samples(2, 192, disc=False), types=("001", "010"))
    batch = make_batch([source.train_item(i, sample_rng(5, "scale", i)) for i in range(2)])
    model = build_cofenet("cofe-net", 0.125, residual=True, generator=torch.Generator())
    # Each output removes half of its own pair's error, whatever that error's size.
    half_way = batch.clean + 0.5 * (batch.degraded - batch.clean)
    out_256 = torch.nn.functional.avg_pool2d(half_way, 2)
    vessel = torch.full_like(batch.mask, 0.5)
    outputs = (half_way, out_256, vessel, torch.zeros_like(out_256[:, :1]))
    eps = 0.01
    config = _tiny(loss_scale="degraded", loss_scale_eps=eps, lambda_vessel=0.0)
    _, terms = cofenet_loss(model, outputs, batch, config)
    errors = [
        float(((batch.degraded[i] - batch.clean[i]).abs() * batch.mask[i]).mean()) for i in range(2)
    ]
    assert errors[0] > 5 * errors[1]  # an illumination pair and a spots pair
    want = np.mean([0.5 * e / (e + eps) for e in errors])
    assert terms["l1"] == pytest.approx(want, rel=1e-4)
    _, plain = cofenet_loss(model, outputs, batch, _tiny(lambda_vessel=0.0))
    assert plain["l1"] == pytest.approx(0.5 * np.mean(errors), rel=1e-4)


def test_log_loss_counts_each_pair_in_decibels_of_its_own_error() -> None:
    source = DegradeSource(_samples(2, 192, disc=False), types=("001", "010"))
    batch = make_batch([source.train_item(i, sample_rng(5, "log", i)) for i in range(2)])
    model = build_cofenet("cofe-net", 0.125, residual=True, generator=torch.Generator())
    eps = 1e-6
    config = _tiny(pixel_loss="mse", loss_scale="log", loss_scale_eps=eps, lambda_vessel=0.0)

    def loss_of(out: torch.Tensor) -> float:
        outputs = (
            out,
            torch.nn.functional.avg_pool2d(out, 2),
            batch.mask,
            batch.mask[:, :, ::2, ::2],
        )
        return cofenet_loss(model, outputs, batch, config)[1]["l1"]

    mse = [
        float(((batch.degraded[i] - batch.clean[i]).square() * batch.mask[i]).mean())
        for i in range(2)
    ]
    assert loss_of(batch.degraded) == pytest.approx(
        np.mean([10 * np.log10(m + eps) for m in mse]), rel=1e-4
    )
    # Halving the error of either pair lowers the loss by the same ~6 dB / 2, however large
    # that pair's error was: a harmed good pair weighs what a mended bad pair does.
    for i in range(2):
        out = batch.degraded.clone()
        out[i] = batch.clean[i] + 0.5 * (batch.degraded[i] - batch.clean[i])
        drop = loss_of(batch.degraded) - loss_of(out)
        want = 0.5 * (10 * np.log10(mse[i] + eps) - 10 * np.log10(0.25 * mse[i] + eps))
        assert drop == pytest.approx(want, rel=1e-3)
        assert drop > 2.5


def test_keep_colour_targets_carry_the_colour_jitter_but_not_the_halo_or_hole() -> None:
    from fundus_batch.degrade.ops import color_jitter

    sample = _samples(1, 192, disc=False)[0]
    plain = DegradeSource([sample], types=("001",))
    kept = DegradeSource([sample], types=("001",), keep_colour=True)
    a = plain.train_item(0, sample_rng(3, "kc", 0))
    b = kept.train_item(0, sample_rng(3, "kc", 0))
    assert np.array_equal(a.degraded, b.degraded) and np.array_equal(a.clean, sample.image)
    _, record = degrade(sample.image, sample.mask, "001", sample_rng(3, "kc", 0))
    c = record.color
    jittered = color_jitter(sample.image, c.brightness, c.contrast, c.saturation)
    assert np.array_equal(b.clean, np.where(sample.mask[..., None] > 127, jittered, 0))
    assert not np.array_equal(b.clean, b.degraded)  # the halo and hole are still to undo
    # Validation always scores against the clean photograph itself.
    assert all(np.array_equal(v.clean, sample.image) for v in kept.val_items(0))


def test_field_model_warm_starts_from_weights_with_a_zeroed_output_conv(tmp_path: Path) -> None:
    donor = build_cofenet("cofe-net", 0.125, generator=torch.Generator().manual_seed(7))
    path = tmp_path / "donor.pt"
    torch.save(donor.state_dict(), path)
    config = _tiny(
        residual=False,
        field_size=192,
        init="fixup",
        init_weights=str(path),
        steps=1,
        head_lr_scale=0.1,
        val_at_end=False,
    )
    result = train(config, DegradeSource(_samples(2, 224, disc=False)))
    state = result.model.state_dict()
    # G's body is the donor's (the zeroed output conv passes no gradient back on step one);
    # the output conv was zeroed, then took one step of lr * head_lr_scale.
    assert torch.equal(state["G_conv1.weight"], donor.state_dict()["G_conv1.weight"])
    head = float(state["G_deconv1_0.weight"].abs().max())
    assert 0 < head <= 1e-3 * 0.1 * 1.01


def test_spot_mask_covers_where_the_spots_changed_the_image() -> None:
    s = synth_fundus(256, seed=4)
    degraded, record = degrade(s.image, s.mask, "010", sample_rng(1, "spots", 0))
    mask = spot_mask(record) > 0
    changed = np.abs(degraded.astype(int) - s.image.astype(int)).max(axis=2) > 8
    assert changed.sum() > 50
    assert mask[changed].mean() > 0.9
    assert mask.mean() < 0.5


# ---------------------------------------------------------------------------------- training


def test_training_end_to_end_lowers_the_loss_on_a_fixed_batch() -> None:
    samples = _samples(2, 192)
    source = DegradeSource(samples, types=("001", "011"))
    probe = make_batch([source.train_item(i, sample_rng(99, "probe", i)) for i in range(2)])
    config = _tiny(steps=20, lambda_lqa=0.5, lr=2e-3)

    def probe_loss(model: torch.nn.Module) -> float:
        model.train()
        with torch.no_grad():
            return cofenet_loss(model, model(probe.degraded), probe, config)[0].item()

    initial = build_cofenet(
        "cofe-net", 0.125, residual=True, generator=torch.Generator().manual_seed(config.seed)
    )
    result = train(config, source, DegradeSource(samples[:1]))
    assert result.step == 20 and len(result.history) == 20
    assert probe_loss(result.model) < 0.8 * probe_loss(initial)
    report = result.val[-1]
    assert set(report.per_type) == set(TYPE_CODES)
    assert all(m.n == 1 for m in report.per_type.values())


def test_fixup_init_starts_a_residual_model_at_the_identity() -> None:
    model = build_cofenet("cofe-net", 0.125, residual=True)
    fixup_init(model, torch.Generator().manual_seed(0))
    x = torch.rand(2, 3, 192, 192, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    with torch.no_grad():
        out = model.eval()(x)
    assert torch.allclose(model.enhanced(out), x, atol=1e-5)
    assert torch.allclose(
        model.coarse(out),
        torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bicubic", antialias=True).clamp(
            0, 1
        ),
        atol=1e-5,
    )
    assert model.G_conv1.weight.std() > 0.08  # He-normal, not the released N(0, 0.02)


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    source = DegradeSource(_samples(3, 224))
    full = train(_tiny(steps=4, decay_start=0.5), source)

    ckpt = tmp_path / "ckpt.pt"
    first = train(_tiny(steps=4, decay_start=0.5, checkpoint=str(ckpt), stop_at=2), source)
    assert first.step == 2
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["step"] == 2 and saved["config"]["width"] == 0.125
    second = train(_tiny(steps=4, decay_start=0.5, checkpoint=str(ckpt), resume=True), source)
    assert second.step == 4
    assert load_checkpoint(ckpt)["step"] == 4

    a, b = _state(full.model), _state(second.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(_state(first.model)["G_conv1.weight"], a["G_conv1.weight"])


def test_resume_refuses_a_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    source = DegradeSource(_samples(1, 192))
    ckpt = tmp_path / "ckpt.pt"
    train(_tiny(steps=1, checkpoint=str(ckpt)), source)
    with pytest.raises(TrainError, match="width"):
        train(_tiny(steps=2, width=0.25, checkpoint=str(ckpt), resume=True), source)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="cannot read checkpoint"):
        train(_tiny(steps=2, checkpoint=str(ckpt), resume=True), source)


def test_same_config_gives_identical_weights_and_another_seed_does_not() -> None:
    source = DegradeSource(_samples(2, 192))
    a = _state(train(_tiny(steps=2), source).model)
    b = _state(train(_tiny(steps=2), source).model)
    c = _state(train(_tiny(steps=2, seed=1), source).model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["G_conv1.weight"], c["G_conv1.weight"])


@pytest.mark.parametrize(
    "bad",
    [
        {"size": 200},
        {"size": 160},
        {"steps": 0},
        {"lr": 0.0},
        {"width": 1.5},
        {"lambda_vessel": -1.0},
        {"init": "xavier"},
        {"loss_scale": "ln"},
        {"pixel_loss": "l2"},
        {"head_lr_scale": 0.0},
        {"loss_scale_eps": 0.0},
        {"resume": True},
        {"decay_start": 2.0},
    ],
)
def test_invalid_config_raises_a_typed_error(bad: dict[str, object]) -> None:
    with pytest.raises(TrainError):
        _tiny(**bad)


def test_config_round_trips_through_a_dict_and_rejects_unknown_keys() -> None:
    config = _tiny(betas=(0.9, 0.99))
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TrainError, match="unknown"):
        TrainConfig.from_dict({"widht": 0.5})


def test_config_errors_name_every_bad_field_and_the_value_it_got() -> None:
    with pytest.raises(TrainError) as info:
        TrainConfig.from_dict({"widht": 0.5, "size": 200, "betas": [0.9], "steps": True})
    text = str(info.value)
    assert text.startswith("invalid TrainConfig: ")
    assert "size: must be a multiple of 32 and >= 192 (got 200)" in text
    assert "betas: expected [beta1, beta2] (got [0.9])" in text
    assert "steps: Input should be a valid integer (got True)" in text
    assert "widht: unknown field (got 0.5)" in text
    assert [p.field for p in info.value.problems] == ["size", "steps", "betas", "widht"]
    with pytest.raises(TrainError, match=r"resume: needs a checkpoint path"):
        TrainConfig(resume=True)


def test_config_assignment_is_validated() -> None:
    config = _tiny()
    config.steps = 8
    assert config.steps == 8
    with pytest.raises(TrainError, match=r"lr: Input should be greater than 0"):
        config.lr = 0.0
    assert config.lr == 1e-3


def test_bad_samples_raise_a_typed_error() -> None:
    s = synth_fundus(192, seed=0)
    with pytest.raises(TrainError, match="square"):
        DegradeSource([(s.image[:, :100], s.mask[:, :100])])
    with pytest.raises(TrainError, match="empty"):
        DegradeSource([(s.image, np.zeros_like(s.mask))])
    with pytest.raises(TrainError, match="at least one"):
        DegradeSource([])
    small = DegradeSource([(s.image, s.mask)])
    with pytest.raises(TrainError, match="smaller than the training size"):
        train(_tiny(size=224), small)


# ------------------------------------------------------------------------------- pairs data


def _write_pairs(root: Path, n_images: int = 3) -> None:
    """A pairs dataset like the pipeline's: PNGs under root/images, rows in root/pairs."""
    rows = []
    for i in range(n_images):
        s = synth_fundus(192, seed=30 + i)
        image_id = f"img{i}"
        folder = root / "images" / image_id
        folder.mkdir(parents=True)
        (folder / "clean.png").write_bytes(encode_png(s.image))
        (folder / "mask.png").write_bytes(encode_png(s.mask))
        for variant, type_code in enumerate(("001", "010")):
            degraded, record = degrade(s.image, s.mask, type_code, sample_rng(0, image_id, variant))
            path = folder / f"v{variant:03d}_{type_code}.png"
            path.write_bytes(encode_png(degraded))
            rows.append(
                {
                    "image_id": image_id,
                    "variant": variant,
                    "status": "ok",
                    "type_code": type_code,
                    "split": "val" if i == 0 else "train",
                    "clean_uri": str(folder / "clean.png"),
                    "mask_uri": str(folder / "mask.png"),
                    "degraded_uri": str(path),
                    "params_json": record.to_json(),
                }
            )
    rows.append(
        {
            "image_id": "broken",
            "variant": 0,
            "status": "failed",
            "split": "train",
            "type_code": "001",
            "error": "DecodeError: truncated",
        }
    )
    (root / "pairs").mkdir()
    import pyarrow.parquet as pq

    pq.write_table(to_table(rows, output_schema()), root / "pairs" / "part-0.parquet")


def test_training_from_a_pairs_dataset(tmp_path: Path) -> None:
    _write_pairs(tmp_path)
    train_src = PairsSource(tmp_path, split="train")
    val_src = PairsSource(tmp_path, split="val")
    assert len(train_src) == 4 and len(val_src) == 2  # the failed row is not used
    assert len(PairsSource(tmp_path)) == 6
    result = train(_tiny(steps=2, lambda_lqa=1.0), train_src, val_src)
    assert result.step == 2
    assert set(result.val[-1].per_type) == {"001", "010"}
    item = train_src.train_item(1, sample_rng(0, "x", 0))
    assert item.spots is not None and item.vessels is None


def test_pairs_dataset_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="no Parquet"):
        PairsSource(tmp_path)
    _write_pairs(tmp_path, 2)
    with pytest.raises(TrainError, match="no usable rows"):
        PairsSource(tmp_path, split="test")


def test_pairs_source_reads_pairs_from_s3_with_uris_relative_to_out(
    tmp_path: Path, s3_server: dict, s3_bucket: str
) -> None:
    import io

    import fsspec
    import pyarrow.parquet as pq

    options = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **options)
    _write_pairs(tmp_path)
    table = pq.read_table(tmp_path / "pairs" / "part-0.parquet")
    prefix = f"{tmp_path}/"
    for name in ("clean_uri", "mask_uri", "degraded_uri"):  # as the pipeline records them
        uris = [u and u.removeprefix(prefix) for u in table.column(name).to_pylist()]
        table = table.set_column(table.schema.get_field_index(name), name, [uris])
    for path in (tmp_path / "images").rglob("*.png"):
        fs.pipe(f"{s3_bucket}/out/{path.relative_to(tmp_path)}", path.read_bytes())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe(f"{s3_bucket}/out/pairs/part-0.parquet", buf.getvalue())

    out = f"s3://{s3_bucket}/out"
    remote = PairsSource(out, split="train", storage_options=options)
    assert remote.out_root == out and len(remote) == 4
    assert len(PairsSource(out + "/pairs", storage_options=options)) == 6
    local = PairsSource(tmp_path, split="train")
    for index in (0, 3):
        rng = sample_rng(0, "x", 0)  # unused: the degradations are stored
        got, want = remote.train_item(index, rng), local.train_item(index, rng)
        assert got.image_id == want.image_id and got.type_code == want.type_code
        for name in ("clean", "degraded", "mask", "spots"):
            assert np.array_equal(getattr(got, name), getattr(want, name))


# --------------------------------------------------------------------------- real images


def test_load_clean_sample_gives_vessels_the_same_crop_as_the_image(tmp_path: Path) -> None:
    raw = synth_fundus(240, seed=5, canvas=(352, 300))
    (tmp_path / "img.png").write_bytes(encode_png(raw.image))
    (tmp_path / "ves.png").write_bytes(encode_png(raw.vessels))
    (tmp_path / "fov.png").write_bytes(encode_png(raw.mask))
    s = load_clean_sample(
        "x",
        tmp_path / "img.png",
        256,
        vessels_path=tmp_path / "ves.png",
        mask_path=tmp_path / "fov.png",
    )
    assert s.image.shape == (256, 256, 3) and s.vessels is not None
    # What the true circle's crop gives for the image and for the vessel map.
    circle = Circle(*raw.circle)
    want_image = crop_to_fov(raw.image, circle, 256)[0]
    want = crop_to_fov(np.dstack([raw.vessels] * 3), circle, 256)[0][..., 0] > 127
    fov = s.mask > 0
    assert np.abs(s.image.astype(int) - want_image.astype(int))[fov].mean() < 4
    got = s.vessels > 127
    iou = (got & want).sum() / (got | want).sum()
    shifted = np.roll(want, 4, axis=1)
    assert iou > 0.7
    assert iou > 2 * (got & shifted).sum() / (got | shifted).sum()
    assert not s.image[~fov].any() and not s.vessels[~fov].any()


# ------------------------------------------------------------------------- shipped model


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


# ------------------------------------------------------------------------------ field gate


def test_gated_model_warm_starts_without_a_gate_and_its_loss_is_the_gate_bce(
    tmp_path: Path,
) -> None:
    donor = build_cofenet("cofe-net", 0.125, field=192)
    fixup_init(donor, torch.Generator().manual_seed(7))
    path = tmp_path / "donor.pt"
    torch.save(donor.state_dict(), path)  # no G_gate keys
    config = _tiny(
        residual=False,
        field_size=192,
        field_gate=True,
        init="fixup",
        init_weights=str(path),
        steps=1,
        lambda_gate=2.0,
        val_at_end=False,
    )
    samples = _samples(2, 192, disc=False)
    source = DegradeSource(samples, types=("001", "010"))
    items = [
        source._item(samples[0], t, sample_rng(5, "gate", i)) for i, t in enumerate(("001", "010"))
    ]
    batch = make_batch(items)
    assert batch.illumination.tolist() == [1.0, 0.0]
    model = train(config, source).model.eval()
    assert "G_gate.weight" in model.state_dict()
    with torch.no_grad():
        outputs = model(batch.degraded)
        _, terms = cofenet_loss(model, outputs, batch, config)
    logits = model.gate_logits(outputs)
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    expected = 2.0 * torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert terms["gate"] == pytest.approx(float(expected), rel=1e-5)


def test_gated_training_passes_the_labels_as_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor | None] = []
    forward = CofeNet.forward

    def spy(self: CofeNet, x: torch.Tensor, x256: torch.Tensor | None = None, *, gate=None):  # type: ignore[no-untyped-def]
        seen.append(gate)
        return forward(self, x, x256, gate=gate)

    monkeypatch.setattr(CofeNet, "forward", spy)
    config = _tiny(residual=False, field_size=192, field_gate=True, init="fixup", steps=2)
    train(config, DegradeSource(_samples(2, 192, disc=False), types=("011", "110")))
    assert len(seen) == 2
    assert all(g is not None and set(g.tolist()) <= {0.0, 1.0} for g in seen)


def test_enhance_images_reports_the_gate_opening_of_the_pass_that_enhanced() -> None:
    gated = build_cofenet("cofe-net", 0.125, field=192, field_gate=True)
    fixup_init(gated, torch.Generator().manual_seed(3))
    with torch.no_grad():
        gated.G_gate.bias.fill_(0.7)  # a gate that is neither shut nor open
    images = [s.image for s in _samples(3, 192, disc=False)]
    gates: list[float] = []
    out = enhance_images(gated, images, batch_size=2, gates=gates)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0)
    with torch.no_grad():
        want = gated.gate_opening(gated(x))
    assert want is not None
    assert gates == pytest.approx(want.tolist(), abs=1e-6)
    assert min(gates) > 0.1 and max(gates) < 0.9
    assert all(
        np.array_equal(a, b) for a, b in zip(out, enhance_images(gated, images), strict=True)
    )
    plain: list[float] = []
    enhance_images(build_cofenet("cofe-net", 0.125), images[:1], gates=plain)
    assert len(plain) == 1 and np.isnan(plain[0])


def test_clean_jitter_recolours_the_photograph_that_is_both_target_and_input() -> None:
    samples = _samples(1, 192, disc=False)
    plain = DegradeSource(samples, types=("010",))
    jittered = DegradeSource(samples, types=("010",), clean_jitter=1.0)
    a = plain.train_item(0, sample_rng(2, "cj", 0))
    b = jittered.train_item(0, sample_rng(2, "cj", 0))
    assert np.array_equal(a.clean, samples[0].image)
    fov = samples[0].mask > 127
    assert not np.array_equal(b.clean[fov], samples[0].image[fov])  # recoloured
    assert not b.clean[~fov].any()  # and still black outside the FOV

    # The spots were added to the recoloured photograph, not to the original.
    def gap(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.abs(x.astype(int) - y.astype(int))[fov].mean())

    assert gap(b.degraded, b.clean) < 0.5 * gap(b.degraded, samples[0].image)
    with pytest.raises(TrainError, match="clean_jitter"):
        DegradeSource(samples, clean_jitter=1.5)


def test_overshoot_term_charges_only_error_added_beyond_the_degraded_input() -> None:
    source = DegradeSource(_samples(2, 192, disc=False), types=("001",))
    batch = make_batch([source.train_item(i, sample_rng(4, "os", i)) for i in range(2)])
    model = build_cofenet("cofe-net", 0.125, field=192)
    fixup_init(model, torch.Generator().manual_seed(0))  # the identity: output = input
    config = _tiny(residual=False, field_size=192, lambda_overshoot=2.0)
    _, terms = cofenet_loss(model, model(batch.degraded), batch, config)
    assert terms["overshoot"] == 0.0  # left as degraded: nothing added
    assert "overshoot" not in cofenet_loss(model, model(batch.degraded), batch, _tiny())[1]

    from fundus_batch.train.loss import _overshoot

    clean, degraded, mask = batch.clean, batch.degraded, batch.mask
    assert _overshoot(clean, batch, config).item() == 0.0  # mended
    twice = clean + 2 * (degraded - clean)  # twice the degraded error, same direction
    count = mask.sum(dim=(1, 2, 3)) * 3
    err = ((degraded - clean) * mask).square().sum(dim=(1, 2, 3)) / count
    want = (10 / np.log(10)) * (err / (4 * err + config.loss_scale_eps)).mean()
    assert _overshoot(twice, batch, config).item() == pytest.approx(want.item(), rel=1e-4)


def test_leave_alone_photographs_are_drawn_only_for_types_without_illumination() -> None:
    target, poor = _samples(2, 192, disc=False)
    poor = replace(poor, image_id="poor-0")
    source = DegradeSource([target], leave_alone=[poor])
    assert len(source) == 1 and source.image_id(0) == target.image_id
    drawn: dict[str, set[str]] = {}
    for k in range(120):
        item = source.train_item(0, sample_rng(3, "la", k))
        drawn.setdefault(item.image_id, set()).add(item.type_code)
    assert all(t[2] == "0" for t in drawn[poor.image_id])  # never given a halo or a hole
    assert {t for t in drawn[target.image_id] if t[2] == "1"} == {"001", "011", "101", "111"}
    assert {t for t in drawn[target.image_id] if t[2] == "0"}  # still drawn without one too
    # A draw with an illumination defect is the one it would be without leave-alone photographs.
    plain = DegradeSource([target])
    for k in range(6):
        a, b = (src.train_item(0, sample_rng(3, "la", k)) for src in (plain, source))
        if a.type_code[2] == "1":
            assert b.type_code == a.type_code and np.array_equal(a.degraded, b.degraded)
    with pytest.raises(TrainError, match="unique"):
        DegradeSource([target], leave_alone=[replace(poor, image_id=target.image_id)])


def test_a_gate_without_the_field_head_is_a_config_error() -> None:
    with pytest.raises(TrainError, match=r"field_gate: .*needs field_size"):
        _tiny(field_gate=True)
