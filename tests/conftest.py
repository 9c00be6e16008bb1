"""Shared pytest fixtures: the optional ../shared folder and small synthetic inputs."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.s3_fixture import s3_bucket, s3_server  # noqa: F401  (suite-wide fixtures)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FUNDUS_BATCH_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="module")
def job() -> ModuleType:
    """jobs/train_cofenet.py imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        "train_cofenet", REPO / "jobs" / "train_cofenet.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_cofenet", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder; tests that need it skip cleanly when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def oracle_dir(shared_dir: Path) -> Path:
    path = shared_dir / "reference" / "oracle"
    if not path.is_dir():
        pytest.skip(f"oracle outputs not found at {path}")
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    """A private local Ray instance per test module: 2 CPUs and one declared GPU, so that GPU
    actors schedule and must fall back to the CPU themselves."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    # "local": a private instance even while a `ray start` cluster runs on this machine.
    ray.init(
        address="local", num_cpus=2, num_gpus=1, include_dashboard=False, ignore_reinit_error=True
    )
    yield
    ray.shutdown()


@pytest.fixture
def http_folder(tmp_path: Path):
    """(folder, base URL): a local HTTP server over ``folder`` (query strings ignored)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
