"""Fault injection on real components: a killed driver, a killed Ray worker, an S3 endpoint that
goes away mid-run, and half-written files left in the output folder.

After every fault the run (or a re-run) must end complete, duplicate-free and pass verify().
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest

from fundus_batch import pipeline
from fundus_batch.config import build_config
from fundus_batch.io.codecs import encode_jpeg
from fundus_batch.output import OutputStore
from fundus_batch.synth import synth_fundus
from fundus_batch.verify import verify
from tests.pipeline_inputs import write_inputs

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ helpers


class PausableProxy:
    """A threaded TCP proxy on loopback in front of ``upstream_port``.

    During an outage every open connection is reset and new ones are accepted and reset at
    once, so clients see connection errors (what a network partition or a restarting endpoint
    looks like) while the server behind keeps its state. ``outage_after(n, seconds, path)``
    starts an outage once ``n`` HTTP requests for ``path`` have gone through.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self.requests = 0
        self.refused = 0
        self.outage_started: float | None = None
        self.outage_ended: float | None = None
        self._down = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._trigger: tuple[int, float, bytes] | None = None
        self._matched = 0
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            sock.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._down.is_set():
                self.refused += 1
                self._reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                self._reset(client)
                continue
            with self._lock:
                self._open.update((client, server))
            for src, dst, counts in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, counts), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count_requests: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if count_requests and data[:4] in (b"GET ", b"PUT ", b"HEAD", b"POST", b"DELE"):
                    self._count_request(data.split(b"\r\n", 1)[0])
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                self._reset(sock)
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)

    def _count_request(self, request_line: bytes) -> None:
        with self._lock:
            self.requests += 1
            trigger = self._trigger
            if trigger is None or trigger[2] not in request_line:
                return
            self._matched += 1
            if self._matched < trigger[0]:
                return
            self._trigger = None
        threading.Thread(target=self.outage, args=(trigger[1],), daemon=True).start()

    def outage_after(self, requests: int, seconds: float, path: bytes = b"") -> None:
        """Start an outage of ``seconds`` once ``requests`` HTTP requests whose request line
        contains ``path`` have gone through."""
        self._matched = 0
        self._trigger = (requests, seconds, path)

    def outage(self, seconds: float) -> None:
        """Drop every connection and refuse new ones for ``seconds`` (blocks)."""
        self._down.set()
        self.outage_started = time.monotonic()
        with self._lock:
            victims = list(self._open)
        for sock in victims:
            self._reset(sock)
        time.sleep(seconds)
        self._down.clear()
        self.outage_ended = time.monotonic()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self._thread.join(timeout=5)
        with self._lock:
            victims = list(self._open)
        for sock in victims:
            self._reset(sock)


def _config(manifest: Path | str, out: Path | str, **extra: Any):
    data: dict[str, Any] = {
        "manifest": str(manifest),
        "out": str(out),
        "variants": 1,
        "size": 128,
        "progress": False,
        "compute_metrics": False,
        "ray": {"rows_per_block": 2},
    }
    data.update(extra)
    return build_config(data, "test")


def _rows(out: Path) -> pd.DataFrame:
    return OutputStore(str(out)).read_table().to_pandas()


def _assert_complete(out: Path | str, manifest: Path | str, n_rows: int, **kw: Any) -> None:
    report = verify(str(out), str(manifest), **kw)
    assert report.ok, report.summary()
    assert report.rows == report.expected_rows == report.rows_ok == n_rows


def _kill_tree(pid: int) -> None:
    """SIGKILL a process group leader and everything it started (its local Ray included)."""
    family = psutil.Process(pid).children(recursive=True)
    os.killpg(pid, signal.SIGKILL)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(family, timeout=10)


def _small_corpus(folder: Path, n: int) -> Path:
    """``n`` small, distinct JPEG photographs (8 rendered bases, a per-image pixel stamp)."""
    folder.mkdir(parents=True, exist_ok=True)
    bases = [synth_fundus(128, seed=s, canvas=(160, 136)).image for s in range(8)]
    rows = []
    for i in range(n):
        img = bases[i % len(bases)].copy()
        img[0, :8, 0] = np.frombuffer(i.to_bytes(8, "big"), np.uint8)
        path = folder / f"s{i:04d}.jpg"
        path.write_bytes(encode_jpeg(img, quality=90))
        rows.append({"image_id": f"s{i:04d}", "uri": str(path)})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


# ------------------------------------------------------------------- driver killed (own Ray)


@pytest.mark.slow
def test_driver_killed_mid_run_at_1000_images_then_rerun_is_complete_and_verified(tmp_path):
    n = 1000
    manifest = _small_corpus(tmp_path / "in", n)
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"manifest: {manifest}\nout: {out}\nvariants: 1\nsize: 96\nshard_rows: 100\n"
        "compute_metrics: false\nprogress: false\nray: {num_cpus: 2, rows_per_block: 16}\n"
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "fundus_batch", "run", str(config)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "pairs").glob("*.parquet"))) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no shard committed within 120 s"
            time.sleep(0.1)
    finally:
        _kill_tree(proc.pid)
        proc.wait()
    partial = len(_rows(out))
    assert 0 < partial < n
    assert not verify(str(out), str(manifest)).ok  # the killed run is visibly incomplete
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    df = _rows(out)
    assert len(df) == n and not df.duplicated(["image_id", "variant"]).any()
    _assert_complete(out, manifest, n)


# ------------------------------------------------------------------ in-process, shared Ray


@pytest.mark.slow
def test_s3_endpoint_down_for_5_seconds_mid_run_loses_nothing(
    ray_cluster, tmp_path, s3_server, s3_bucket
):
    """Inputs and outputs on S3 behind a proxy that drops and refuses every connection for
    5 s once the workers are reading the images (from their second read on, so the outage
    falls within the run however long Ray takes to start); storage retries carry the run
    through."""
    import s3fs

    upstream = int(s3_server["endpoint_url"].rsplit(":", 1)[1])
    direct = s3fs.S3FileSystem(**s3_server["storage_options"], skip_instance_cache=True)
    local = _small_corpus(tmp_path / "in", 16)
    frame = pd.read_csv(local)
    for row in frame.itertuples():
        direct.put(row.uri, f"{s3_bucket}/raw/{Path(row.uri).name}")
    frame["uri"] = [f"s3://{s3_bucket}/raw/{Path(u).name}" for u in frame.uri]
    manifest = tmp_path / "manifest.csv"
    frame.to_csv(manifest, index=False)
    proxy = PausableProxy(upstream)
    try:
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": proxy.endpoint},
        }
        out = f"s3://{s3_bucket}/out"
        proxy.outage_after(requests=2, seconds=5.0, path=b"/raw/")
        summary = pipeline.run(_config(manifest, out, storage_options=options))
        finished = time.monotonic()
        assert proxy.outage_ended is not None and proxy.outage_ended < finished
        assert proxy.refused > 0, "no request hit the outage"
        assert summary.complete and summary.ok == 16, summary
        _assert_complete(out, manifest, 16, storage_options=options)
    finally:
        proxy.close()


def test_ray_worker_killed_mid_run_is_restarted_and_nothing_is_lost(ray_cluster, tmp_path):
    manifest = write_inputs(tmp_path / "in", n_good=12, broken=False, size=256)
    out = tmp_path / "out"
    killed: list[tuple[int, int, int]] = []

    def kill_a_stage_actor(seen: int, total: int) -> None:
        if killed:
            return
        workers = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            title = " ".join(proc.info["cmdline"] or [])
            if title.startswith("ray::MapWorker("):
                workers.append((".submit" not in title, proc.info["pid"]))  # busy ones first
        if workers:
            pid = min(workers)[1]
            os.kill(pid, signal.SIGKILL)
            killed.append((pid, seen, total))

    summary = pipeline.run(
        _config(manifest, out, variants=2, shard_rows=4), progress=kill_a_stage_actor
    )
    assert killed, "no stage actor was found to kill"
    pid, seen, total = killed[0]
    assert seen < total and not psutil.pid_exists(pid)
    assert summary.complete and summary.ok == 24 and summary.failed == 0
    df = _rows(out)
    assert len(df) == 24 and not df.duplicated(["image_id", "variant"]).any()
    _assert_complete(out, manifest, 24)


# ------------------------------------------------------------- half-written files on resume


@pytest.fixture(scope="module")
def pristine_run(ray_cluster, tmp_path_factory) -> tuple[Any, Path, Path, Path]:
    """(config, manifest, out, backup) of a complete 8-image run committed as 4 shards."""
    root = tmp_path_factory.mktemp("resume")
    manifest = _small_corpus(root / "in", 8)
    out = root / "out"
    config = _config(manifest, out, shard_rows=2)
    summary = pipeline.run(config)
    assert summary.complete and summary.ok == 8
    assert len(list((out / "pairs").glob("*.parquet"))) == 4
    backup = root / "backup"
    shutil.copytree(out, backup)
    return config, manifest, out, backup


@pytest.fixture
def finished_run(pristine_run) -> tuple[Any, Path, Path]:
    """(config, manifest, out) with ``out`` restored to the pristine run (its rows hold
    absolute URIs, so damage is done in place and undone here)."""
    config, manifest, out, backup = pristine_run
    shutil.rmtree(out)
    shutil.copytree(backup, out)
    return config, manifest, out


def test_tmp_shard_and_truncated_uncommitted_image_are_redone_on_resume(finished_run) -> None:
    """A killed driver leaves ``*.parquet.tmp`` and images of rows it never committed, maybe
    half-written by a killed writer: the resume deletes the tmp and overwrites the images."""
    config, manifest, out = finished_run
    first = sorted((out / "pairs").glob("*.parquet"))[0]
    uncommitted = pq.read_table(first).to_pandas()
    first.rename(first.with_name(first.name + ".tmp"))  # as if killed before the rename
    victim = out / uncommitted.degraded_uri.iloc[0]
    good_bytes = victim.read_bytes()
    victim.write_bytes(good_bytes[: len(good_bytes) // 3])
    before = verify(str(out), str(manifest))
    assert before.missing_rows == len(uncommitted)
    summary = pipeline.run(config)
    assert summary.done_before == 8 - len(uncommitted) and summary.complete
    assert not list((out / "pairs").glob("*.tmp"))
    assert victim.read_bytes() == good_bytes  # deterministic redo restores the exact bytes
    _assert_complete(out, manifest, 8)


def test_truncated_image_of_a_committed_row_fails_verify(finished_run) -> None:
    _, manifest, out = finished_run
    row = _rows(out).sort_values("image_id").iloc[3]
    path = out / row.degraded_uri
    path.write_bytes(path.read_bytes()[:100])
    report = verify(str(out), str(manifest))
    assert not report.ok and report.bad_files == 1
    named = [p for p in report.problems if repr(row.image_id) in p and "degraded" in p]
    assert named and any("decode" in p for p in named)


def _truncate_a_shard(out: Path) -> Path:
    shard = sorted((out / "pairs").glob("*.parquet"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return shard


def test_truncated_complete_named_shard_is_named_by_verify(finished_run) -> None:
    _, manifest, out = finished_run
    shard = _truncate_a_shard(out)
    report = verify(str(out), str(manifest))
    assert not report.ok
    assert any(shard.name in p and "unreadable" in p for p in report.problems)
    assert report.missing_rows == 2


def test_truncated_complete_named_shard_is_set_aside_and_redone_on_resume(finished_run) -> None:
    """Set aside hidden: pyarrow and pandas read every file of a folder not named .* or _*."""
    config, manifest, out = finished_run
    shard = _truncate_a_shard(out)
    (out / "pairs" / "part-0.parquet.corrupt").write_bytes(b"set aside by 0.1, unhidden")
    summary = pipeline.run(config)
    assert summary.complete and summary.done_before == 6
    _assert_complete(out, manifest, 8)
    assert (shard.parent / f".{shard.name}.corrupt").exists()
    assert (out / "pairs" / ".part-0.parquet.corrupt").exists()
    assert len(pq.read_table(out / "pairs")) == len(pd.read_parquet(out / "pairs")) == 8
