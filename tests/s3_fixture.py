"""Session-wide S3 test server: moto's standalone server on loopback, with fake credentials.

Use from a test module (``from tests.s3_fixture import s3_bucket, s3_server  # noqa: F401``)
or once for the whole suite from ``tests/conftest.py``. The server process is shared by every
importer and stopped when the last one is torn down. Tests skip when moto is not installed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_STATE: dict[str, Any] = {"users": 0, "proc": None, "info": None}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _start(log_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    port = _free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    log = log_path.open("wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **_FAKE_ENV}
    )
    log.close()
    deadline = time.monotonic() + 30.0
    while not _answers(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=10)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"moto server did not start on port {port}:\n{tail}")
        time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    info = {
        "endpoint_url": endpoint,
        "storage_options": {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint},
        },
    }
    return proc, info


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate an emulator process, killing it if it does not exit within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A running moto S3 server: ``{"endpoint_url": ..., "storage_options": {...}}``.

    ``storage_options`` go straight to fsspec/s3fs. Fake AWS credentials are put in the
    environment for the session (and taken out afterwards), so boto3 clients work too.
    """
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _FAKE_ENV.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
        mp.setenv("NO_PROXY", no_proxy)
        mp.setenv("no_proxy", no_proxy)
        if _STATE["proc"] is None:
            log = tmp_path_factory.mktemp("moto") / "moto_server.log"
            _STATE["proc"], _STATE["info"] = _start(log)
        _STATE["users"] += 1
        try:
            yield _STATE["info"]
        finally:
            _STATE["users"] -= 1
            if _STATE["users"] == 0 and _STATE["proc"] is not None:
                stop_process(_STATE["proc"])
                _STATE["proc"] = _STATE["info"] = None


@pytest.fixture
def s3_bucket(s3_server: dict[str, Any]) -> str:
    """Name of a fresh, empty bucket on the test server (created with boto3)."""
    boto3 = pytest.importorskip("boto3")
    name = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    return name
