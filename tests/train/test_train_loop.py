"""fundus_batch.train.loop: initialisation, determinism, resume and the gate in training."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fundus_batch.degrade import TYPE_CODES, sample_rng
from fundus_batch.models import CofeNet, build_cofenet
from fundus_batch.train import (
    DegradeSource,
    TrainError,
    cofenet_loss,
    fixup_init,
    load_checkpoint,
    loop,
    make_batch,
    train,
)
from fundus_batch.train.loop import check_checkpoint_target, decayed_lr
from tests.train.train_helpers import state_copy, synth_samples, tiny_config


def test_field_model_warm_starts_from_weights_with_a_zeroed_output_conv(tmp_path: Path) -> None:
    donor = build_cofenet("cofe-net", 0.125, generator=torch.Generator().manual_seed(7))
    path = tmp_path / "donor.pt"
    torch.save(donor.state_dict(), path)
    config = tiny_config(
        residual=False,
        field_size=192,
        init="fixup",
        init_weights=str(path),
        steps=1,
        head_lr_scale=0.1,
        val_at_end=False,
    )
    result = train(config, DegradeSource(synth_samples(2, 224, disc=False)))
    state = result.model.state_dict()
    # G's body is the donor's (the zeroed output conv passes no gradient back on step one);
    # the output conv was zeroed, then took one step of lr * head_lr_scale.
    assert torch.equal(state["G_conv1.weight"], donor.state_dict()["G_conv1.weight"])
    head = float(state["G_deconv1_0.weight"].abs().max())
    assert 0 < head <= 1e-3 * 0.1 * 1.01


def test_training_end_to_end_lowers_the_loss_on_a_fixed_batch() -> None:
    samples = synth_samples(2, 192)
    source = DegradeSource(samples, types=("001", "011"))
    probe = make_batch([source.train_item(i, sample_rng(99, "probe", i)) for i in range(2)])
    config = tiny_config(steps=20, lambda_lqa=0.5, lr=2e-3)

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
    source = DegradeSource(synth_samples(3, 224))
    full = train(tiny_config(steps=4, decay_start=0.5), source)

    ckpt = tmp_path / "ckpt.pt"
    first = train(tiny_config(steps=4, decay_start=0.5, checkpoint=str(ckpt), stop_at=2), source)
    assert first.step == 2
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["step"] == 2 and saved["config"]["width"] == 0.125
    second = train(tiny_config(steps=4, decay_start=0.5, checkpoint=str(ckpt), resume=True), source)
    assert second.step == 4
    assert load_checkpoint(ckpt)["step"] == 4

    a, b = state_copy(full.model), state_copy(second.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(state_copy(first.model)["G_conv1.weight"], a["G_conv1.weight"])


def test_prefetching_the_next_batch_in_a_thread_gives_the_same_weights() -> None:
    source = DegradeSource(synth_samples(3, 192))
    serial = state_copy(train(tiny_config(steps=3), source).model)
    ahead = state_copy(train(tiny_config(steps=3, prefetch=True), source).model)
    assert all(torch.equal(serial[k], ahead[k]) for k in serial)


class _FailingSource(DegradeSource):
    """A source whose ``fail_at``-th training item (counted from 0) raises."""

    def __init__(self, *args: Any, fail_at: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_at, self.calls = fail_at, 0

    def train_item(self, index: int, rng: np.random.Generator) -> Any:
        self.calls += 1
        if self.calls > self.fail_at:
            raise OSError("photograph unreadable")
        return super().train_item(index, rng)


def test_a_batch_that_fails_to_build_stops_training_and_its_prefetch_thread() -> None:
    source = _FailingSource(synth_samples(3, 192), fail_at=4)  # batch_size 2: the third batch
    with pytest.raises(OSError, match="unreadable"):
        train(tiny_config(steps=5, prefetch=True), source)
    assert not [t for t in threading.enumerate() if t.name.startswith("prefetch")]


def test_validation_during_training_applies_the_gate_decision_the_model_ships_with() -> None:
    gated = dict(residual=False, field_size=192, field_gate=True, steps=2)
    samples = synth_samples(2, 192, disc=False)
    source = DegradeSource(samples, types=("001", "010"))
    val = DegradeSource(samples, types=("001", "010"))
    soft = train(tiny_config(**gated, lr=1e-2), source, val).val[-1]
    # An untrained gate sits near 0.5: as a decision at 0.99 it never opens.
    shut = train(tiny_config(**gated, lr=1e-2, field_gate_threshold=0.99), source, val)
    assert any(m.psnr_gain != 0.0 for m in soft.per_type.values())
    assert all(m.psnr_gain == 0.0 for m in shut.val[-1].per_type.values())
    assert shut.model.field_gate_threshold is None  # training itself goes on with the soft gate


def test_training_only_the_decoder_keeps_every_other_weight_and_so_the_gate(
    tmp_path: Path,
) -> None:
    gated = dict(residual=False, field_size=192, field_gate=True, lr=1e-2, steps=3)
    source = DegradeSource(synth_samples(2, 192, disc=False), types=("001", "010"))
    ckpt = str(tmp_path / "ckpt.pt")
    before = state_copy(train(tiny_config(**gated, stop_at=1, checkpoint=ckpt), source).model)
    decoder = tiny_config(**gated, checkpoint=ckpt, resume=True, trainable=("G_deconv",))
    after = state_copy(train(decoder, source).model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # The gate reads only what comes before G's decoder (the vessel branch's BatchNorm
    # statistics included): it decides as before.
    assert changed and all(k.startswith("G_deconv") for k in changed)
    assert "G_deconv1_0.weight" in changed


@pytest.mark.parametrize("init_head", ["zero", "keep"])
def test_init_head_keeps_or_zeroes_the_output_conv_of_the_weights_started_from(
    tmp_path: Path, init_head: str
) -> None:
    """Starting a field model from weights of the same head: ``keep`` continues from their
    correction, ``zero`` (the default) starts from none (G's output conv frozen here, so what
    it holds after training is what it started with)."""
    field = dict(residual=False, field_size=192)
    source = DegradeSource(synth_samples(1, 192, disc=False), types=("001",))
    first = train(tiny_config(**field, lr=1e-2, steps=2), source).model
    weights = tmp_path / "first.pt"
    torch.save(first.state_dict(), weights)
    start = state_copy(first)["G_deconv1_0.weight"]
    assert start.abs().sum() > 0
    config = tiny_config(
        **field, steps=1, init_weights=str(weights), init_head=init_head, trainable=("G_conv1",)
    )
    after = state_copy(train(config, source).model)["G_deconv1_0.weight"]
    assert torch.equal(after, start) if init_head == "keep" else not after.any()


def test_keeping_the_init_head_without_init_weights_names_the_field() -> None:
    with pytest.raises(TrainError, match="init_head"):
        tiny_config(init_head="keep")


def test_trainable_prefixes_that_match_no_parameter_are_refused() -> None:
    with pytest.raises(TrainError, match="matches no parameter"):
        train(tiny_config(trainable=("G_nothing",)), DegradeSource(synth_samples(1, 192)))


def test_a_gate_threshold_without_a_gate_names_the_field() -> None:
    with pytest.raises(TrainError, match="field_gate_threshold"):
        tiny_config(field_gate_threshold=0.9)


def test_resume_refuses_a_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    source = DegradeSource(synth_samples(1, 192))
    ckpt = tmp_path / "ckpt.pt"
    train(tiny_config(steps=1, checkpoint=str(ckpt)), source)
    with pytest.raises(TrainError, match="width"):
        train(tiny_config(steps=2, width=0.25, checkpoint=str(ckpt), resume=True), source)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="cannot read checkpoint"):
        train(tiny_config(steps=2, checkpoint=str(ckpt), resume=True), source)


def test_same_config_gives_identical_weights_and_another_seed_does_not() -> None:
    source = DegradeSource(synth_samples(2, 192))
    a = state_copy(train(tiny_config(steps=2), source).model)
    b = state_copy(train(tiny_config(steps=2), source).model)
    c = state_copy(train(tiny_config(steps=2, seed=1), source).model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["G_conv1.weight"], c["G_conv1.weight"])


def test_gated_model_warm_starts_without_a_gate_and_its_loss_is_the_gate_bce(
    tmp_path: Path,
) -> None:
    donor = build_cofenet("cofe-net", 0.125, field=192)
    fixup_init(donor, torch.Generator().manual_seed(7))
    path = tmp_path / "donor.pt"
    torch.save(donor.state_dict(), path)  # no G_gate keys
    config = tiny_config(
        residual=False,
        field_size=192,
        field_gate=True,
        init="fixup",
        init_weights=str(path),
        steps=1,
        lambda_gate=2.0,
        val_at_end=False,
    )
    samples = synth_samples(2, 192, disc=False)
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
    config = tiny_config(residual=False, field_size=192, field_gate=True, init="fixup", steps=2)
    train(config, DegradeSource(synth_samples(2, 192, disc=False), types=("011", "110")))
    assert len(seen) == 2
    assert all(g is not None and set(g.tolist()) <= {0.0, 1.0} for g in seen)


def test_the_learning_rate_is_constant_then_falls_linearly_to_zero() -> None:
    rates = [decayed_lr(step, 10, 1.0, 0.6) for step in range(11)]
    assert rates[:6] == [1.0] * 6
    assert rates[6:] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert decayed_lr(5, 10, 2e-3, 1.0) == 2e-3  # decay_start 1: never decays


@pytest.mark.parametrize(
    ("change", "field"),
    [({"betas": (0.9, 0.99)}, "betas"), ({"head_lr_scale": 10.0}, "head_lr_scale")],
)
def test_resume_refuses_other_optimizer_settings_the_checkpoint_would_restore(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    """The optimizer's state carries its betas and learning-rate scales: a resumed run with
    other ones would silently keep the checkpoint's, so it is refused naming the field."""
    source = DegradeSource(synth_samples(1, 192))
    ckpt = str(tmp_path / "ckpt.pt")
    train(tiny_config(steps=2, stop_at=1, checkpoint=ckpt, val_at_end=False), source)
    with pytest.raises(TrainError, match=f"was trained with other \\['{field}'\\]"):
        train(tiny_config(steps=2, checkpoint=ckpt, resume=True, **change), source)
    assert load_checkpoint(ckpt)["step"] == 1


class _RecordingSource(DegradeSource):
    """A source that records the sample index of every training item drawn."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drawn: list[int] = []

    def train_item(self, index: int, rng: np.random.Generator) -> Any:
        self.drawn.append(index)
        return super().train_item(index, rng)


def test_the_sample_order_draws_one_permutation_per_epoch_not_per_sample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fundus_batch.train import loop

    made: list[tuple[int, ...]] = []
    real = loop._rng_for

    def spy(seed: int, *parts: int) -> np.random.Generator:
        made.append(parts)
        return real(seed, *parts)

    monkeypatch.setattr(loop, "_rng_for", spy)
    source = _RecordingSource(synth_samples(3, 192, disc=False))
    train(tiny_config(steps=4, seed=3, val_at_end=False, prefetch=True), source)  # 8 draws
    assert made == [(0x5EED, 0), (0x5EED, 1), (0x5EED, 2)]  # epochs of 3 samples
    # The same order as drawing each sample's epoch permutation afresh.
    want = [int(real(3, 0x5EED, k // 3).permutation(3)[k % 3]) for k in range(8)]
    assert source.drawn == want


def test_a_photograph_with_rows_in_both_the_training_and_validation_split_is_refused(
    tmp_path: Path,
) -> None:
    from fundus_batch.train import PairsSource
    from tests.train.test_train_samples import _rewrite_rows, _write_pairs

    _write_pairs(tmp_path)  # img0 is the val split; img1, img2 train

    def move(row: dict[str, Any]) -> dict[str, Any]:
        if row["image_id"] == "img1" and row["variant"] == 1:
            row["split"] = "val"  # as a resumed pipeline run with another manifest split
        return row

    _rewrite_rows(tmp_path, move)
    training = PairsSource(tmp_path, exclude_split="val")
    validation = PairsSource(tmp_path, split="val")
    with pytest.raises(TrainError, match="1 photographs have rows in both") as info:
        train(tiny_config(steps=1), training, validation)
    assert ": img1;" in str(info.value)


def test_resume_refuses_another_pairs_dataset_or_validation_split(tmp_path: Path) -> None:
    from fundus_batch.train import PairsSource
    from tests.train.test_train_samples import _write_pairs

    first, second = tmp_path / "pairs-a", tmp_path / "pairs-b"
    _write_pairs(first)
    _write_pairs(second)  # the same pairs, another dataset
    ckpt = str(tmp_path / "ckpt.pt")

    def run(pairs: Path, val_split: str | None, **kw: Any) -> Any:
        training = PairsSource(pairs, exclude_split=val_split)
        validation = PairsSource(pairs, split=val_split) if val_split else None
        config = tiny_config(steps=2, checkpoint=ckpt, val_at_end=False, **kw)
        return train(config, training, validation)

    run(first, "val", stop_at=1)
    with pytest.raises(TrainError, match=r"other \['train_pairs', 'val_pairs'\]"):
        run(second, "val", resume=True)
    with pytest.raises(TrainError, match=r"val_split: 'val' there, None now"):
        run(first, None, resume=True)
    assert run(first, "val", resume=True).step == 2


def test_a_fresh_run_refuses_to_overwrite_an_existing_checkpoint(tmp_path: Path) -> None:
    source = DegradeSource(synth_samples(1, 192))
    ckpt = tmp_path / "ckpt.pt"
    train(tiny_config(steps=1, checkpoint=str(ckpt), val_at_end=False), source)
    before = ckpt.read_bytes()
    with pytest.raises(TrainError, match=r"already holds a training run: resume it \(--resume\)"):
        train(tiny_config(steps=3, checkpoint=str(ckpt)), source)
    assert ckpt.read_bytes() == before


def test_a_checkpoint_folder_that_cannot_be_made_is_refused_before_any_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    under_file = tiny_config(steps=1, checkpoint=str(tmp_path / "a_file" / "m" / "ckpt.pt"))
    with pytest.raises(TrainError, match=r"a_file is not a folder"):
        check_checkpoint_target(under_file)
    read_only = tiny_config(steps=1, checkpoint=str(tmp_path / "ro" / "m" / "ckpt.pt"))
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(loop.os, "access", lambda path, mode: Path(path).name != "ro")
    with pytest.raises(TrainError, match=r"ro is not writable"):
        check_checkpoint_target(read_only)
    assert not (tmp_path / "ro" / "m").exists()
