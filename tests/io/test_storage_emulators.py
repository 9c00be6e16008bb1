"""gs:// and az:// through fundus_batch.io.storage, against emulators started on loopback.

GCS: ``gcp-storage-emulator`` (PyPI) with ``gcsfs``; Azure Blob: Azurite (npm ``azurite``,
its ``azurite-blob`` command) with ``adlfs``. Each test skips, naming what is missing, when the
emulator or the fsspec backend is not installed. The Azurite account key is random per run.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fundus_batch.io import storage
from tests.s3_fixture import stop_process

START_TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"emulator exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"emulator did not listen on 127.0.0.1:{port} within {START_TIMEOUT} s")


def _start(
    cmd: list[str], port: int, tmp: Path, env: dict[str, str] | None = None
) -> Iterator[None]:
    log = tmp / "emulator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp, env={**os.environ, **(env or {})}
        )
    try:
        _wait_for_port(port, proc, log)
        yield
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def gcs_options(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """storage_options for gs:// URIs served by gcp-storage-emulator."""
    if "gcsfs" not in sys.modules:
        # gcsfs's default (experimental) filesystem first asks the gRPC control plane for the
        # bucket type, which the emulator lacks: every call would wait 60 s for it.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    pytest.importorskip("gcsfs", reason="gcsfs (fsspec's gs:// backend) is not installed")
    emulator = shutil.which("gcp-storage-emulator") or shutil.which(
        "gcp-storage-emulator", path=os.path.dirname(sys.executable)
    )
    if emulator is None:
        pytest.skip("gcp-storage-emulator (PyPI) is not installed")
    port = _free_port()
    tmp = tmp_path_factory.mktemp("gcs")
    cmd = [emulator, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"]
    for _ in _start(cmd, port, tmp):
        yield {"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon", "project": "test"}


@pytest.fixture(scope="module")
def azure_options(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """storage_options for az:// URIs served by Azurite, with a random account key."""
    pytest.importorskip("adlfs", reason="adlfs (fsspec's az:// backend) is not installed")
    emulator = shutil.which("azurite-blob")
    if emulator is None:
        pytest.skip("Azurite is not installed (npm install -g azurite)")
    port = _free_port()
    tmp = tmp_path_factory.mktemp("azurite")
    account, key = "fundusbatch", base64.b64encode(os.urandom(32)).decode()
    cmd = [
        emulator,
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--inMemoryPersistence",
        "--silent",
        "--skipApiVersionCheck",
        "--loose",
    ]
    for _ in _start(cmd, port, tmp, env={"AZURITE_ACCOUNTS": f"{account}:{key}"}):
        yield {
            "connection_string": (
                f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey={key};"
                f"BlobEndpoint=http://127.0.0.1:{port}/{account};"
            )
        }


def _bucket(scheme: str, options: dict[str, Any]) -> str:
    """A new, empty bucket (container) on the emulator, as ``scheme://name``."""
    name = f"fb-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.filesystem(f"{scheme}://{name}", options)
    fs.mkdir(name)
    return f"{scheme}://{name}"


def _round_trip(root: str, options: dict[str, Any]) -> None:
    image = storage.join(root, "images", "a b", "clean.png")
    payload = os.urandom(300_000) + b"\x00end"
    assert not storage.exists(image, storage_options=options, retries=0)
    storage.write_bytes(image, payload, storage_options=options)
    assert storage.exists(image, storage_options=options)
    assert storage.read_bytes(image, storage_options=options) == payload
    storage.write_bytes(image, b"replaced", storage_options=options)
    assert storage.read_bytes(image, storage_options=options) == b"replaced"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "images", "missing.png"), storage_options=options)


def test_gs_round_trip_against_the_gcs_emulator(gcs_options: dict[str, Any]) -> None:
    _round_trip(_bucket("gs", gcs_options), gcs_options)


def test_az_round_trip_against_azurite(azure_options: dict[str, Any]) -> None:
    _round_trip(_bucket("az", azure_options), azure_options)


def test_gs_and_az_listing_finds_written_images(
    gcs_options: dict[str, Any], azure_options: dict[str, Any]
) -> None:
    for scheme, options in (("gs", gcs_options), ("az", azure_options)):
        root = _bucket(scheme, options)
        for name in ("b.png", "a.jpeg", "notes.txt"):
            storage.write_bytes(storage.join(root, "photos", name), b"x", storage_options=options)
        listed = storage.list_files(
            storage.join(root, "photos"), [".png", ".jpeg"], storage_options=options
        )
        assert [uri.rsplit("/", 1)[-1] for uri in listed] == ["a.jpeg", "b.png"], (scheme, listed)
