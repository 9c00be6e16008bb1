"""jobs/train_cofenet.py --pairs: the registry it writes and the checkpoints it keeps."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.train.test_train_samples import _write_pairs

TINY = ["--width", "0.125", "--size", "192", "--batch-size", "2", "--threads", "1"]


def _argv(pairs: Path, out: Path, *args: str) -> list[str]:
    return ["--pairs", str(pairs), "--out", str(out), *TINY, "--device", "cpu", *args]


def test_the_job_on_pairs_registers_the_pairs_working_size(job: ModuleType, tmp_path: Path) -> None:
    _write_pairs(tmp_path / "pairs", side=224)
    out = tmp_path / "run"
    assert job.main(_argv(tmp_path / "pairs", out, "--steps", "1")) == 0
    [entry] = json.loads((out / "registry.json").read_text())["weights"]
    assert entry["size"] == 224  # the pairs' working size, not the job's default 512
    doc = json.loads((out / f"{entry['name']}.eval.json").read_text())
    assert doc["protocol"]["working_size"] == 224


def test_the_job_refuses_to_overwrite_a_checkpoint_and_stop_at_continues_with_resume(
    job: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_pairs(tmp_path / "pairs")
    out = tmp_path / "run"
    argv = _argv(tmp_path / "pairs", out, "--steps", "2")
    assert job.main([*argv, "--stop-at", "1"]) == 0
    capsys.readouterr()
    assert job.main(argv) == 2  # --stop-at did not turn --resume on, nor does a rerun
    assert "already holds a training run: resume it (--resume)" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    assert job.main([*argv, "--resume"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
