"""Every 5xx answer is transient, 500 included, whatever error code the store gives with it."""

from __future__ import annotations

import pytest

from fundus_batch.io.storage import is_transient
from tests.io.test_storage import _client_error


@pytest.mark.parametrize("status", [500, 501, 502, 599])
def test_a_server_error_without_a_throttling_code_is_retried(status: int) -> None:
    assert is_transient(_client_error("SomeServerFault", status))


def test_an_aiohttp_500_is_retried() -> None:
    aiohttp = pytest.importorskip("aiohttp")
    error = aiohttp.ClientResponseError(None, (), status=500)  # type: ignore[arg-type]
    assert is_transient(error)
