"""A folder enhanced with a max_change bound keeps it: a rerun must give the same bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fundus_batch.run_settings import SettingsMismatchError, compare, recorded, resolve
from tests.test_out_settings import _config


def test_a_recorded_bound_reads_back_and_dropping_it_is_refused(tmp_path: Path) -> None:
    enhance = {"enabled": True, "max_change": 40}
    bounded = resolve(_config(tmp_path / "m.csv", tmp_path / "out", enhance=enhance))
    unbounded = {**bounded, "enhance": {**bounded["enhance"], "max_change": None}}
    old = recorded(json.loads(json.dumps({"settings": bounded})))  # as run.json holds it
    assert old is not None and old["enhance"]["max_change"] == 40
    compare(old, bounded)  # the same run again: accepted
    with pytest.raises(SettingsMismatchError) as err:
        compare(old, unbounded)
    assert "enhance.max_change: 40 -> off" in err.value.differences
