"""One writer per output folder: a lease file ``OUT/_lease.json`` held while a run lives.

The lease names its holder (a random owner token, host, pid, start time) and an expiry. It is
created atomically, renewed by a background thread (every ``renew_every`` seconds, valid for
``ttl`` seconds) and deleted when the run ends. A second writer either waits for it or refuses
with a message naming the holder. A lease whose expiry has passed (its driver was killed) or
whose holder is a dead process on this same host is taken over with an atomic compare-and-swap,
and ownership is read back after every acquisition.

How each storage makes the create and the compare-and-swap atomic:

- local disk: the lease is written to a temporary file and hard-linked to its name (``link``
  fails when the name exists, so the lease appears complete or not at all); takeover, renewal
  and release run under an exclusive ``flock`` on ``OUT/_lease.lock`` and compare the content.
- ``s3://``: a conditional PUT (``If-None-Match: *``) creates it; takeover and renewal are PUTs
  with ``If-Match: <ETag>`` of the lease they replace. Both are honoured by AWS S3 and by moto;
  an S3-compatible store that ignores them degrades to the read-back check below.
- other filesystems (``gs://``, ``az://``, ``memory://``, ...): write, then read back and
  compare the owner token, after a short settle delay. This is best effort: two writers racing
  inside that window can both believe they hold the lease. Use local disk or S3 where a strict
  guarantee matters.

Expiry compares wall clocks, so hosts sharing an output folder need clocks within a few seconds
of each other (the TTL is 60 s by default).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from fsspec.implementations.local import LocalFileSystem

from fundus_batch.io import storage

__all__ = [
    "LEASE_FILE",
    "LeaseError",
    "LeaseHeldError",
    "LeaseInfo",
    "LeaseLostError",
    "OutLease",
]

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
LOCK_FILE = "_lease.lock"


class LeaseError(RuntimeError):
    """The output folder's lease could not be taken or was lost."""


class LeaseHeldError(LeaseError):
    """Another live run holds the lease; ``holder`` describes it."""

    def __init__(self, message: str, holder: LeaseInfo | None) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLostError(LeaseError):
    """This run's lease expired or was taken over: it must stop writing."""


@dataclass(frozen=True)
class LeaseInfo:
    """The content of a lease file."""

    owner: str
    host: str
    pid: int
    started: float
    renewed: float
    expires: float

    def to_bytes(self) -> bytes:
        data = {
            "owner": self.owner,
            "host": self.host,
            "pid": self.pid,
            "started": self.started,
            "started_utc": _utc(self.started),
            "renewed": self.renewed,
            "expires": self.expires,
            "expires_utc": _utc(self.expires),
        }
        return json.dumps(data, indent=2, sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseInfo | None:
        """The lease in ``data``; None when it is not a readable lease (treated as expired)."""
        try:
            d = json.loads(data.decode("utf-8"))
            return cls(
                owner=str(d["owner"]),
                host=str(d["host"]),
                pid=int(d["pid"]),
                started=float(d["started"]),
                renewed=float(d["renewed"]),
                expires=float(d["expires"]),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None

    def describe(self, now: float) -> str:
        left = self.expires - now
        when = f"expires in {left:.0f} s" if left >= 0 else f"expired {-left:.0f} s ago"
        return f"host {self.host}, pid {self.pid}, since {_utc(self.started)} (lease {when})"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class _Backend(Protocol):
    """Atomic primitives on one lease file. ``version`` identifies one content of the file."""

    settle: float

    def create(self, data: bytes) -> bool: ...
    def read(self) -> tuple[bytes, str] | None: ...
    def replace(self, data: bytes, version: str) -> str | None: ...
    def delete(self, version: str) -> bool: ...


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _LocalBackend:
    """Local disk: hard-link create, flock-guarded compare-and-swap."""

    settle = 0.0

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LEASE_FILE)
        self.lock_path = os.path.join(folder, LOCK_FILE)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _tmp(self, data: bytes) -> str:
        tmp = os.path.join(self.folder, f".{LEASE_FILE}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def _read_unlocked(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def create(self, data: bytes) -> bool:
        with self._locked():
            tmp = self._tmp(data)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True

    def read(self) -> tuple[bytes, str] | None:
        return self._read_unlocked()

    def replace(self, data: bytes, version: str) -> str | None:
        with self._locked():
            current = self._read_unlocked()
            if current is None or current[1] != version:
                return None
            tmp = self._tmp(data)
            try:
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            return _digest(data)

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self._read_unlocked()
            if current is None or current[1] != version:
                return False
            os.unlink(self.path)
            return True


class _S3Backend:
    """S3: conditional PUTs (``If-None-Match: *`` to create, ``If-Match: ETag`` to swap)."""

    settle = 0.0

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path

    def create(self, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def read(self) -> tuple[bytes, str] | None:
        self.fs.invalidate_cache(self.path)
        try:
            etag = str(self.fs.info(self.path)["ETag"])
            data = bytes(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        return data, etag

    def replace(self, data: bytes, version: str) -> str | None:
        try:
            out = self.fs.pipe_file(self.path, data, IfMatch=version)
        except (FileNotFoundError, FileExistsError):
            return None
        except OSError as exc:  # 412 Precondition Failed arrives as OSError(EINVAL)
            if getattr(exc, "errno", None) == errno.EINVAL or "Precondition" in str(exc):
                return None
            raise
        if isinstance(out, dict) and out.get("ETag"):
            return str(out["ETag"])
        current = self.read()
        return current[1] if current is not None and current[0] == data else None

    def delete(self, version: str) -> bool:
        current = self.read()
        if current is None or current[1] != version:
            return False
        self.fs.rm_file(self.path)
        return True


class _GenericBackend:
    """Any other fsspec filesystem: write, then read back and compare (best effort)."""

    settle = 0.5

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path

    def _write(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def create(self, data: bytes) -> bool:
        if self.read() is not None:
            return False
        self._write(data)
        current = self.read()
        return current is not None and current[0] == data

    def read(self) -> tuple[bytes, str] | None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.path)
        try:
            data = bytes(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def replace(self, data: bytes, version: str) -> str | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        self._write(data)
        current = self.read()
        return current[1] if current is not None and current[0] == data else None

    def delete(self, version: str) -> bool:
        current = self.read()
        if current is None or current[1] != version:
            return False
        self.fs.rm_file(self.path)
        return True


def _backend(root: str, storage_options: dict | None) -> _Backend:
    fs, path = storage.filesystem(root, storage_options)
    if isinstance(fs, LocalFileSystem):
        return _LocalBackend(path)
    lease_path = f"{path.rstrip('/')}/{LEASE_FILE}"
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if any(p in ("s3", "s3a") for p in protocols):
        return _S3Backend(fs, lease_path)
    return _GenericBackend(fs, lease_path)


class OutLease:
    """The lease on one output root. Use as a context manager or acquire()/release().

    ``ttl``: seconds a lease stays valid without renewal; ``renew_every``: seconds between
    renewals (must be below ``ttl``). ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        root: str,
        storage_options: dict | None = None,
        *,
        ttl: float = 60.0,
        renew_every: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < renew_every < ttl:
            raise ValueError(f"need 0 < renew_every < ttl, got {renew_every} and {ttl}")
        self.root = root.rstrip("/")
        self.uri = storage.join(self.root, LEASE_FILE)
        self.ttl = ttl
        self.renew_every = renew_every
        self.clock = clock
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._backend = _backend(self.root, storage_options)
        self._version: str | None = None
        self._expires = 0.0
        self._started = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()
        self.took_over: LeaseInfo | None = None

    # -------------------------------------------------------------------------------- state

    @property
    def held(self) -> bool:
        return self._version is not None and self._lost is None

    def holder(self) -> LeaseInfo | None:
        """Whoever holds (or last held) the lease, read from storage."""
        current = self._backend.read()
        return None if current is None else LeaseInfo.from_bytes(current[0])

    def _payload(self, now: float) -> bytes:
        return LeaseInfo(
            owner=self.token,
            host=self.host,
            pid=self.pid,
            started=self._started,
            renewed=now,
            expires=now + self.ttl,
        ).to_bytes()

    def _stale(self, info: LeaseInfo | None, now: float) -> bool:
        if info is None or info.expires <= now:
            return True
        # A holder on this host whose process is gone will never renew: no need to wait.
        return info.host == self.host and info.pid != self.pid and not _pid_alive(info.pid)

    def _confirm(self, now: float) -> bool:
        if self._backend.settle:
            time.sleep(self._backend.settle)
        current = self._backend.read()
        info = None if current is None else LeaseInfo.from_bytes(current[0])
        if info is None or info.owner != self.token:
            return False
        self._version = current[1] if current is not None else None
        self._expires = now + self.ttl
        return True

    # ------------------------------------------------------------------------------ acquire

    def _try_once(self) -> tuple[bool, LeaseInfo | None]:
        """One attempt: (acquired, the holder seen when not)."""
        now = self.clock()
        self._started = self._started or now
        payload = self._payload(now)
        if self._backend.create(payload):
            return self._confirm(now), None
        current = self._backend.read()
        if current is None:  # released between our create and read: try again
            return False, None
        info = LeaseInfo.from_bytes(current[0])
        if not self._stale(info, now):
            return False, info
        if self._backend.replace(payload, current[1]) is not None and self._confirm(now):
            self.took_over = info
            what = "an unreadable lease" if info is None else f"the lease of {info.describe(now)}"
            log.warning("took over %s on %s", what, storage.redact(self.root))
            return True, None
        return False, None

    def acquire(self, wait: float = 0.0, poll: float = 1.0) -> None:
        """Take the lease, waiting up to ``wait`` seconds for a live holder to finish.

        Raises :class:`LeaseHeldError` naming the holder when it is still held after ``wait``.
        """
        if self.held:
            return
        deadline = self.clock() + max(0.0, wait)
        holder: LeaseInfo | None = None
        quick = 0
        while True:
            try:
                acquired, seen = self._try_once()
            except OSError as exc:  # no such bucket, credentials refused, ...
                raise LeaseError(
                    f"cannot take the lease on output {storage.redact(self.root)}: "
                    f"{type(exc).__name__}: {storage.redact(str(exc))}"
                ) from exc
            if acquired:
                self._lost = None
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._renew_loop, name="fundus-batch-lease", daemon=True
                )
                self._thread.start()
                return
            now = self.clock()
            if seen is None and quick < 20:  # lost a race: look again at once
                quick += 1
                time.sleep(0.01 * quick)
                continue
            holder = seen or holder
            if now >= deadline:
                break
            time.sleep(min(poll, max(0.0, deadline - now)))
        where = storage.redact(self.root)
        who = holder.describe(self.clock()) if holder else "another run"
        waited = f"waited {wait:.0f} s; " if wait > 0 else ""
        raise LeaseHeldError(
            f"output {where} is being written by another run: {who}; {waited}"
            "wait for it with --wait-for-lease SECONDS, or stop that run",
            holder,
        )

    # ------------------------------------------------------------------------------ renewal

    def renew(self) -> None:
        """Extend the lease now; marks it lost when another owner holds it."""
        with self._mutex:
            if self._version is None or self._lost is not None:
                return
            now = self.clock()
            payload = self._payload(now)
            version = self._backend.replace(payload, self._version)
            if version is not None:
                self._version = version
                self._expires = now + self.ttl
                return
            current = self._backend.read()
            info = None if current is None else LeaseInfo.from_bytes(current[0])
            if info is not None and info.owner == self.token and current is not None:
                self._version = current[1]  # same content, another version tag: retry later
                return
            holder = "nobody" if info is None else info.describe(now)
            self._lost = f"the lease on {storage.redact(self.root)} is now held by {holder}"
            log.error("%s; this run stops writing", self._lost)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self.renew()
            except Exception as exc:  # transient storage errors: try again next round
                log.warning("lease renewal failed (will retry): %s", storage.redact(str(exc)))
            if self._lost is not None:
                return

    def ensure(self) -> None:
        """Raise :class:`LeaseLostError` unless this run still holds a valid lease."""
        if self._lost is not None:
            raise LeaseLostError(self._lost)
        if self._version is None:
            raise LeaseLostError(f"no lease held on {storage.redact(self.root)}")
        if self.clock() >= self._expires:
            raise LeaseLostError(
                f"the lease on {storage.redact(self.root)} expired before it could be renewed"
            )

    # ------------------------------------------------------------------------------ release

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.renew_every))
            self._thread = None
        with self._mutex:
            version, self._version = self._version, None
            if version is None or self._lost is not None:
                return
            try:
                self._backend.delete(version)
            except Exception as exc:  # it expires on its own
                log.warning("could not delete the lease: %s", storage.redact(str(exc)))

    def __enter__(self) -> OutLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
