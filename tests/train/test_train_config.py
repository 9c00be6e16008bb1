"""fundus_batch.train.config: a bad training config names the field and the value."""

from __future__ import annotations

import pytest

from fundus_batch.train import TrainConfig, TrainError
from tests.train.train_helpers import tiny_config


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
        tiny_config(**bad)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"variant": "nope"}, r"variant: unknown Cofe-Net variant 'nope'"),
        ({"width": 1.0}, r"residual: needs width < 1"),
        ({"field_size": 24}, r"field_size: needs width < 1 and residual: false"),
        ({"device": "gpu"}, r"device: unknown device 'gpu'"),
    ],
)
def test_settings_the_model_cannot_be_built_with_are_named_before_any_data_loads(
    bad: dict[str, object], message: str
) -> None:
    with pytest.raises(TrainError, match=message):
        TrainConfig.from_dict(bad)


def test_config_round_trips_through_a_dict_and_rejects_unknown_keys() -> None:
    config = tiny_config(betas=(0.9, 0.99))
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
    config = tiny_config()
    config.steps = 8
    assert config.steps == 8
    with pytest.raises(TrainError, match=r"lr: Input should be greater than 0"):
        config.lr = 0.0
    assert config.lr == 1e-3


def test_a_gate_without_the_field_head_is_a_config_error() -> None:
    with pytest.raises(TrainError, match=r"field_gate: .*needs field_size"):
        tiny_config(field_gate=True)
