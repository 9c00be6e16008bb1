"""The OUT lease on S3 under faults: moto's server on loopback behind an HTTP proxy that strips
conditional headers, answers chosen requests with an error, loses answers after the write or
delays requests (what AWS and S3-compatible stores do under load or a flaky network)."""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fundus_batch.io.storage import Backoff
from fundus_batch.lease import LeaseHeldError, OutLease

FAST = Backoff(base=0.01, cap=0.05)


@dataclass
class Rule:
    """What to do with the next ``count`` requests of ``method`` whose path holds ``path``
    (and that carry ``header``, when given): ``status`` (answer ``code``/``error`` without
    forwarding), ``drop`` (forward, then reset the connection: the write happened, the
    client never hears) or ``delay`` (wait ``seconds``, then forward)."""

    method: str
    path: str
    action: str
    count: int = 1
    header: str | None = None
    code: int = 503
    error: str = "ServiceUnavailable"
    seconds: float = 0.0
    hits: int = 0

    def take(self, method: str, path: str, headers: Any) -> bool:
        if self.count <= 0 or method != self.method or self.path not in path:
            return False
        if self.header is not None and self.header not in headers:
            return False
        self.count -= 1
        self.hits += 1
        return True


class FaultProxy:
    """An HTTP/1.1 proxy on loopback in front of the S3 server at ``upstream_port``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.rules: list[Rule] = []
        self.strip_conditional = False
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reset(self) -> None:
                with contextlib.suppress(OSError):
                    linger = struct.pack("ii", 1, 0)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.close()

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                rule = proxy.match(self.command, self.path, self.headers)
                if rule is not None and rule.action == "status":
                    msg = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{rule.error}'
                        f"</Code><Message>injected</Message><RequestId>x</RequestId></Error>"
                    ).encode()
                    self.send_response(rule.code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if rule is not None and rule.action == "delay":
                    time.sleep(rule.seconds)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                if proxy.strip_conditional:
                    drop = ("if-none-match", "if-match")
                    headers = {k: v for k, v in headers.items() if k.lower() not in drop}
                headers["Host"] = f"127.0.0.1:{proxy.upstream}"
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if rule is not None and rule.action == "drop":
                    self._reset()
                    return
                self.send_response(resp.status)
                skip = ("transfer-encoding", "connection", "content-length", "server", "date")
                for key, value in resp.getheaders():
                    if key.lower() not in skip:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def match(self, method: str, path: str, headers: Any) -> Rule | None:
        with self.lock:
            return next((r for r in self.rules if r.take(method, path, headers)), None)

    def add(self, rule: Rule) -> Rule:
        with self.lock:
            self.rules.append(rule)
        return rule

    def options(self, **extra: Any) -> dict[str, Any]:
        """fsspec storage options that reach the S3 server through this proxy."""
        endpoint = f"http://127.0.0.1:{self.port}"
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint},
            "skip_instance_cache": True,
            **extra,
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# botocore's own retries off: every injected error reaches the lease code
NO_CLIENT_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


@pytest.fixture
def proxy(s3_server: dict[str, Any]) -> Iterator[FaultProxy]:
    upstream = int(s3_server["endpoint_url"].rsplit(":", 1)[1])
    p = FaultProxy(upstream)
    yield p
    p.close()


def _direct(s3_server: dict[str, Any]) -> dict[str, Any]:
    return {**s3_server["storage_options"], "skip_instance_cache": True}


# ------------------------------------------------------------- 1. no conditional PUTs


def test_store_ignoring_conditional_puts_still_refuses_a_second_writer(
    proxy: FaultProxy, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.strip_conditional = True
    root = f"s3://{s3_bucket}/out"
    first = OutLease(root, proxy.options(), backoff=FAST)
    with caplog.at_level(logging.WARNING, logger="fundus_batch.lease"):
        first.acquire()
    try:
        second = OutLease(root, proxy.options(), backoff=FAST)
        with pytest.raises(LeaseHeldError):
            second.acquire(wait=0)
        assert "does not honour conditional writes" in caplog.text
        first.ensure()
        assert first.holder() is not None and first.holder().owner == first.token
    finally:
        first.release()


def test_store_honouring_conditional_puts_keeps_the_strict_path(
    s3_server: dict[str, Any], s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = f"s3://{s3_bucket}/out"
    lease = OutLease(root, _direct(s3_server), backoff=FAST)
    with caplog.at_level(logging.WARNING, logger="fundus_batch.lease"):
        lease.acquire()
    lease.release()
    assert "conditional" not in caplog.text


# ------------------------------------------------------------- 3. answer of a PUT lost


def test_create_whose_answer_was_lost_is_recognised_as_this_runs_own_lease(
    proxy: FaultProxy, s3_bucket: str
) -> None:
    root = f"s3://{s3_bucket}/out"
    rule = proxy.add(Rule("PUT", "/out/_lease.json", "drop"))
    lease = OutLease(root, proxy.options(), backoff=FAST)
    lease.acquire(wait=0)  # the retried conditional PUT gets 412: its own lease
    try:
        assert rule.hits == 1 and lease.held
        lease.ensure()
        assert lease.holder() is not None and lease.holder().owner == lease.token
    finally:
        lease.release()
    assert lease.holder() is None


def test_takeover_whose_answer_was_lost_is_recognised_as_this_runs_own_lease(
    proxy: FaultProxy, s3_bucket: str
) -> None:
    root = f"s3://{s3_bucket}/out"
    now = [1000.0]
    old = OutLease(root, proxy.options(), clock=lambda: now[0], backoff=FAST)
    old.acquire()
    old._stop.set()
    now[0] += 100
    rule = proxy.add(Rule("PUT", "/out/_lease.json", "drop", header="If-Match"))
    new = OutLease(root, proxy.options(), clock=lambda: now[0], backoff=FAST)
    new.acquire(wait=0)
    try:
        assert rule.hits == 1 and new.held
        assert new.took_over is not None and new.took_over.owner == old.token
        new.ensure()
    finally:
        new.release()


# --------------------------------------------------- 4. 409 conflicts and transient errors


def _conflict_409(header: str) -> Rule:
    """AWS's answer to a conditional PUT (``header``) racing another: 409, retry."""
    return Rule(
        "PUT", "/out/_lease.json", "status", header=header, code=409,
        error="ConditionalRequestConflict",
    )  # fmt: skip


def test_conflict_409_on_create_is_a_lost_race_not_a_fatal_error(
    proxy: FaultProxy, s3_bucket: str
) -> None:
    root = f"s3://{s3_bucket}/out"
    conflict = _conflict_409("If-None-Match")
    proxy.add(conflict)
    lease = OutLease(root, proxy.options(**NO_CLIENT_RETRIES), backoff=FAST)
    lease.acquire(wait=0)
    try:
        assert conflict.hits == 1 and lease.held
    finally:
        lease.release()


def test_conflict_409_on_takeover_is_a_lost_race_not_a_fatal_error(
    proxy: FaultProxy, s3_bucket: str
) -> None:
    root = f"s3://{s3_bucket}/out"
    now = [1000.0]
    opts = proxy.options(**NO_CLIENT_RETRIES)
    old = OutLease(root, opts, clock=lambda: now[0], backoff=FAST)
    old.acquire()
    old._stop.set()
    now[0] += 100
    conflict = _conflict_409("If-Match")
    proxy.add(conflict)
    new = OutLease(root, opts, clock=lambda: now[0], backoff=FAST)
    new.acquire(wait=0)
    try:
        assert conflict.hits == 1 and new.took_over is not None
    finally:
        new.release()


@pytest.mark.parametrize("code,error", [(503, "ServiceUnavailable"), (500, "InternalError")])
def test_transient_errors_while_acquiring_are_retried(
    proxy: FaultProxy, s3_bucket: str, code: int, error: str
) -> None:
    root = f"s3://{s3_bucket}/out"
    burst = proxy.add(Rule("PUT", "/out/_lease.json", "status", count=3, code=code, error=error))
    lease = OutLease(root, proxy.options(**NO_CLIENT_RETRIES), backoff=FAST, retries=6)
    lease.acquire(wait=0)
    try:
        assert burst.hits == 3 and lease.held
    finally:
        lease.release()


# --------------------------------------------------------------- 5. conditional release


def test_release_never_deletes_a_lease_another_run_took_over_meanwhile(
    proxy: FaultProxy, s3_server: dict[str, Any], s3_bucket: str
) -> None:
    """A's DELETE is slow to arrive; B takes the lease over in between (B's clock is past A's
    expiry): the DELETE, conditional on A's ETag, must leave B's lease alone."""
    root = f"s3://{s3_bucket}/out"
    a = OutLease(root, proxy.options(), clock=time.time, backoff=FAST)
    a.acquire()
    slow_delete = Rule("DELETE", "/out/_lease.json", "delay", seconds=5.0)
    proxy.add(slow_delete)
    releasing = threading.Thread(target=a.release)
    releasing.start()
    deadline = time.monotonic() + 20
    while slow_delete.hits == 0 and time.monotonic() < deadline:  # A's DELETE is in flight
        time.sleep(0.05)
    assert slow_delete.hits == 1
    b = OutLease(root, _direct(s3_server), clock=lambda: time.time() + 1000, backoff=FAST)
    b.acquire(wait=0)
    releasing.join(timeout=30)
    try:
        assert b.took_over is not None and b.took_over.owner == a.token
        assert b.holder() is not None and b.holder().owner == b.token
        b.renew()
        b.ensure()
    finally:
        b.release()
