"""An unsigned manifest column goes into a folder's signed column only when every value fits."""

from __future__ import annotations

import pyarrow as pa
import pytest

from fundus_batch.run_settings import SettingsMismatchError, check_column_types


@pytest.mark.parametrize(("new", "held"), [(pa.uint32(), pa.int64()), (pa.uint8(), pa.int16())])
def test_an_unsigned_column_narrower_than_the_signed_one_held_is_written_as_it(
    new: pa.DataType, held: pa.DataType
) -> None:
    written = check_column_types({"grade": [held]}, pa.schema([("grade", new)]))
    assert written.field("grade").type == held


@pytest.mark.parametrize(("new", "held"), [(pa.uint64(), pa.int64()), (pa.uint32(), pa.int32())])
def test_an_unsigned_column_as_wide_as_the_signed_one_held_is_refused(
    new: pa.DataType, held: pa.DataType
) -> None:
    with pytest.raises(SettingsMismatchError, match=f"{held} -> {new}"):
        check_column_types({"grade": [held]}, pa.schema([("grade", new)]))
