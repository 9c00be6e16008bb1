"""`fundus-batch train`: pairs in object storage (a real S3 endpoint on loopback), the registry
it writes, resuming and the rows it trains on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from fundus_batch.cli import main
from tests.train.test_train_samples import _rewrite_rows, _write_pairs

TINY = ["--width", "0.125", "--size", "192", "--batch-size", "2", "--device", "cpu"]


def _train(pairs: Path, out: str | Path, *args: str) -> Result:
    """``fundus-batch train`` on ``pairs`` into ``out``, tiny, one step unless told."""
    argv = ["train", "--pairs", str(pairs), "--out", str(out), *TINY, "--steps", "1", *args]
    return CliRunner().invoke(main, argv)


def test_train_reads_pairs_from_s3_with_storage_options(
    tmp_path: Path, s3_server: dict, s3_bucket: str
) -> None:
    import fsspec
    import pyarrow.parquet as pq

    options = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **options)
    local = tmp_path / "local"
    _write_pairs(local)
    shard = local / "pairs" / "part-0.parquet"
    table = pq.read_table(shard)
    for name in ("clean_uri", "mask_uri", "degraded_uri"):  # relative to OUT, as the pipeline's
        uris = [u and u.removeprefix(f"{local}/") for u in table.column(name).to_pylist()]
        table = table.set_column(table.schema.get_field_index(name), name, [uris])
    pq.write_table(table, shard)
    fs.put(f"{local}/", f"{s3_bucket}/out/", recursive=True)
    # Only the bucket holds the images now.
    for png in local.rglob("*.png"):
        png.unlink()
    args = ["train", "--pairs", f"s3://{s3_bucket}/out", "--out", str(tmp_path / "model")]
    args += ["--width", "0.125", "--size", "192", "--batch-size", "2", "--steps", "1"]
    args += ["--device", "cpu", "--val-split", "val"]
    result = CliRunner().invoke(main, [*args, "--storage-options", json.dumps(options)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "trained 1 steps" in result.output and "validation at step 1" in result.output
    assert (tmp_path / "model" / "model.pt").is_file()


def test_train_into_the_current_folder_registers_it_by_name_at_the_pairs_working_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fundus_batch.models.weights import WeightsEntry, resolve_weights

    _write_pairs(tmp_path / "pairs", side=224)
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.chdir(model)
    result = _train(tmp_path / "pairs", ".")  # 192 px crops of 224 px pairs
    assert result.exit_code == 0, result.output + repr(result.exception)
    [entry] = json.loads((model / "registry.json").read_text())["weights"]
    assert entry["name"] == "model"
    assert entry["size"] == 224  # the working size the model is to run at, not the crop
    found = resolve_weights(model / "model.pt")  # the registry beside the weights loads
    assert isinstance(found, WeightsEntry) and found.name == "model" and found.size == 224


def test_trained_weights_carry_their_residual_output_without_the_registry(tmp_path: Path) -> None:
    """A width below 1 trains a residual network; model.pt copied alone must still build one
    (a bare state dict built a plain network that returns flat grey)."""
    from fundus_batch.models.weights import model_from_weights

    _write_pairs(tmp_path / "pairs")
    result = _train(tmp_path / "pairs", tmp_path / "model")
    assert result.exit_code == 0, result.output + repr(result.exception)
    alone = tmp_path / "alone.pt"
    alone.write_bytes((tmp_path / "model" / "model.pt").read_bytes())
    assert model_from_weights(alone).residual is True


def test_trained_weights_carry_their_head_settings_without_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.pt records the trained config's smooth-correction head (which has no parameters):
    copied alone it builds the registered model, not a network without the head."""
    import torch

    import fundus_batch.train as training
    from fundus_batch.models.weights import (
        WEIGHTS_FORMAT,
        WeightsEntry,
        model_for_entry,
        model_from_weights,
        resolve_weights,
    )

    real = training.TrainConfig
    head = {"residual": False, "field_size": 192, "field_deadzone": 0.01}
    monkeypatch.setattr(training, "TrainConfig", lambda **fields: real(**{**fields, **head}))
    _write_pairs(tmp_path / "pairs")
    result = _train(tmp_path / "pairs", tmp_path / "model")
    assert result.exit_code == 0, result.output + repr(result.exception)
    saved = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    assert saved["format"] == WEIGHTS_FORMAT
    assert {k: saved[k] for k in head} == head
    entry = resolve_weights(tmp_path / "model" / "model.pt")  # its registry.json beside it
    assert isinstance(entry, WeightsEntry) and entry.field_size == 192
    registered = model_for_entry(entry)  # the entry and the file agree
    alone = tmp_path / "alone.pt"
    alone.write_bytes((tmp_path / "model" / "model.pt").read_bytes())
    loaded = model_from_weights(alone)
    assert (loaded.field, loaded.field_deadzone, loaded.residual) == (192, 0.01, False)
    assert repr(loaded) == repr(registered)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2
    with torch.no_grad():
        assert torch.equal(loaded.enhanced(loaded(x)), registered.enhanced(registered(x)))


def test_train_again_into_an_out_with_a_checkpoint_needs_resume(tmp_path: Path) -> None:
    _write_pairs(tmp_path / "pairs")
    out = tmp_path / "model"
    assert _train(tmp_path / "pairs", out).exit_code == 0
    before = (out / "checkpoint.pt").read_bytes()
    again = _train(tmp_path / "pairs", out)
    assert again.exit_code == 1
    assert "already holds a training run: resume it (--resume)" in again.output
    assert (out / "checkpoint.pt").read_bytes() == before  # not restarted from step 0
    resumed = _train(tmp_path / "pairs", out, "--steps", "2", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "trained 2 steps" in resumed.output


def test_train_resumed_with_another_val_split_is_refused_naming_it(tmp_path: Path) -> None:
    _write_pairs(tmp_path / "pairs")
    out = tmp_path / "model"
    first = _train(tmp_path / "pairs", out, "--steps", "2", "--val-split", "val")
    assert first.exit_code == 0, first.output
    changed = _train(tmp_path / "pairs", out, "--steps", "3", "--resume", "--val-split", "train")
    assert changed.exit_code == 1
    assert "val_split: 'val' there, 'train' now" in changed.output


def test_train_leaves_out_rows_that_failed_the_quality_gate_and_says_how_many(
    tmp_path: Path,
) -> None:
    _write_pairs(tmp_path / "pairs")

    def gate(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "quality_ok": row["image_id"] != "img1"}  # img1 failed --min-quality

    _rewrite_rows(tmp_path / "pairs", gate)
    left_out = _train(tmp_path / "pairs", tmp_path / "a", "--val-split", "val")
    assert left_out.exit_code == 0, left_out.output
    assert "training: left out 2 rows that failed the run's --min-quality gate" in left_out.output
    included = _train(
        tmp_path / "pairs", tmp_path / "b", "--val-split", "val", "--include-quality-failed"
    )
    assert included.exit_code == 0, included.output
    assert "left out" not in included.output


@pytest.mark.parametrize(
    "splits",
    [["--val-split", "no-such-split"], ["--train-split", "train", "--val-split", "train"]],
)
def test_train_refused_for_its_data_leaves_no_out_folder(tmp_path: Path, splits) -> None:
    _write_pairs(tmp_path / "pairs")
    out = tmp_path / "model"
    refused = _train(tmp_path / "pairs", out, *splits)
    assert refused.exit_code == 1, refused.output
    assert not out.exists()


def test_an_out_under_a_file_is_refused_before_the_pairs_are_read(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    result = _train(tmp_path / "no_pairs_here", tmp_path / "a_file" / "model")
    assert result.exit_code == 1
    assert f"cannot write {tmp_path / 'a_file' / 'model'}: " in result.output
    assert "is not a folder" in result.output
