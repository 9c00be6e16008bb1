"""Fixtures for the training tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Torch on one thread, as the training jobs here run (``--threads 1``)."""
    torch.set_num_threads(1)
