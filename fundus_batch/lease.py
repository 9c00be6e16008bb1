"""One writer per output folder: a lease file ``OUT/_lease.json`` held while a run lives.

The lease names its holder (a random owner token, host, pid, boot id and PID namespace, start
time) and an expiry. It is created atomically, renewed by a background thread (every
``renew_every`` seconds, valid for ``ttl`` seconds) and deleted when the run ends. A second writer
either waits for it or refuses with a message naming the holder. A lease whose expiry has passed
by more than ``max_clock_skew`` (its driver was killed) is taken over with an atomic
compare-and-swap, and so, at once, is one whose holder is provably dead: same host, same boot
id, same PID namespace, and its pid not alive (a lease from another container that shares the
hostname, or one that records no boot id or namespace, is never taken over early). Ownership is
read back after every acquisition, and a create or takeover whose answer was lost but whose
write landed (the lease read back is this run's own) counts as acquired.

How each storage makes the create and the compare-and-swap atomic:

- local disk: the lease is written to a temporary file and hard-linked to its name (``link``
  fails when the name exists, so the lease appears complete or not at all); takeover, renewal
  and release run under an exclusive ``flock`` on ``OUT/_lease.lock`` and compare the content.
- ``s3://``: a conditional PUT (``If-None-Match: *``) creates it, after a read that finds none;
  takeover and renewal are PUTs with ``If-Match: <ETag>`` of the lease they replace; release is
  a ``DeleteObject`` with ``If-Match: <ETag>``. A 409 ``ConditionalRequestConflict`` counts as a
  lost race (the lease is read again). Before taking a lease the run probes once, on
  ``OUT/_lease.probe`` (left in place), whether the store refuses an ``If-None-Match`` PUT over an
  existing object and an ``If-Match`` PUT with a wrong ETag. AWS S3 and moto do; a store that
  does not gets the best-effort path below, with a warning.
- other filesystems (``gs://``, ``az://``, ``memory://``, ...): write, then read back and
  compare the owner token, after a short settle delay. This is best effort: two writers racing
  inside that window can both believe they hold the lease. Use local disk or S3 where a strict
  guarantee matters.

Transient storage errors while taking or releasing the lease are retried with the storage retry
policy (:func:`fundus_batch.io.storage.with_retries`); a failed renewal is retried next round.

Timing and clocks. Expiry compares wall clocks, so the hosts sharing an output folder must have
clocks within ``max_clock_skew`` seconds (5 s by default) of each other. Two margins make a
commit that raced the expiry land before anyone else holds the lease:

- the holder: :meth:`OutLease.ensure` refuses to start a commit once less than
  ``commit_margin`` is left (``max(renew_every, ttl / 4)``, at most ``(ttl - renew_every) / 2``
  so a healthy renewal cycle never dips into it; 15 s with the defaults), and a commit must land
  by :meth:`OutLease.commit_deadline` (the expiry on this run's clock; :meth:`OutLease.remaining`
  gives the seconds left): its retries must stop there;
- a taker: waits ``max_clock_skew`` past the recorded expiry, on its own clock, which is then
  past the expiry on the holder's clock too.

Once the lease expired on this run's clock it is lost for good: renewal does not revive it
and release deletes nothing (another run may hold it by then; otherwise it just expires).
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
PROBE_FILE = "_lease.probe"
_NEVER_MATCHES = '"fundus-batch-lease-probe-never-matches"'
DEFAULT_CLOCK_SKEW = 5.0


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
    boot_id: str | None = None
    pid_namespace: str | None = None

    def to_bytes(self) -> bytes:
        data = {
            "owner": self.owner,
            "host": self.host,
            "pid": self.pid,
            "boot_id": self.boot_id,
            "pid_namespace": self.pid_namespace,
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
                boot_id=_optional_str(d.get("boot_id")),
                pid_namespace=_optional_str(d.get("pid_namespace")),
            )
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            return None

    def describe(self, now: float) -> str:
        left = self.expires - now
        when = f"expires in {left:.0f} s" if left >= 0 else f"expired {-left:.0f} s ago"
        return f"host {self.host}, pid {self.pid}, since {_utc(self.started)} (lease {when})"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _boot_id() -> str | None:
    """This machine's boot id (Linux); None where there is none."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _pid_namespace() -> str | None:
    """This process's PID namespace as ``pid:[inode]`` (Linux); None where there is none."""
    try:
        return f"pid:[{os.stat('/proc/self/ns/pid').st_ino}]"
    except OSError:
        return None


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


def _http_error(exc: BaseException) -> tuple[int | None, str]:
    """(HTTP status, error code) of an S3 error, looked up along its causes (s3fs wraps
    botocore's ``ClientError`` in an ``OSError``)."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        response = getattr(link, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(response.get("Error", {}).get("Code", ""))
            return (status if isinstance(status, int) else None), code
        link = link.__cause__ or link.__context__
    return None, ""


def _lost_race(exc: BaseException) -> bool:
    """A refused conditional request: 412 (the precondition failed) or 409 (AWS: a concurrent
    conditional write to the same key was in flight)."""
    status, code = _http_error(exc)
    if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
        return True
    return getattr(exc, "errno", None) == errno.EINVAL and "Precondition" in str(exc)


def _unsupported(exc: BaseException) -> bool:
    """The store refused a request for a feature it does not implement (501)."""
    status, code = _http_error(exc)
    return status == 501 or code == "NotImplemented"


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
    """S3: conditional PUTs (``If-None-Match: *`` to create, ``If-Match: ETag`` to swap) and a
    conditional DELETE (``If-Match: ETag``)."""

    settle = 0.0

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path
        self.probe_path = f"{path.rsplit('/', 1)[0]}/{PROBE_FILE}"

    def honours_conditions(self) -> bool:
        """Whether the store refuses an ``If-None-Match: *`` PUT over an existing object and an
        ``If-Match`` PUT with a wrong ETag (on the probe object, which is left in place so that
        concurrent probes cannot fool each other)."""
        self.fs.pipe_file(self.probe_path, b"probe")
        attempts: tuple[dict[str, Any], ...] = ({"mode": "create"}, {"IfMatch": _NEVER_MATCHES})
        for condition in attempts:
            try:
                self.fs.pipe_file(self.probe_path, b"probe", **condition)
            except FileExistsError:
                continue
            except OSError as exc:
                if _unsupported(exc):
                    return False
                if _lost_race(exc):
                    continue
                raise
            return False  # the write went through: the condition was ignored
        return True

    def create(self, data: bytes) -> bool:
        if self.read() is not None:
            return False
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as exc:
            if _lost_race(exc):
                return False
            raise
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
            if _lost_race(exc):
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
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _lost_race(exc):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path)
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
    renewals (must be below ``ttl``); ``retries``/``backoff``: the storage retry policy for
    taking and releasing the lease (pass the run's ``storage_retries``); ``max_clock_skew``: the
    most the clocks of hosts sharing the folder may differ, waited past an expiry before a
    takeover. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        root: str,
        storage_options: dict | None = None,
        *,
        ttl: float = 60.0,
        renew_every: float = 10.0,
        clock: Callable[[], float] = time.time,
        retries: int = storage.DEFAULT_RETRIES,
        backoff: storage.Backoff | None = None,
        max_clock_skew: float = DEFAULT_CLOCK_SKEW,
    ) -> None:
        if not 0 < renew_every < ttl:
            raise ValueError(f"need 0 < renew_every < ttl, got {renew_every} and {ttl}")
        if retries < 0 or max_clock_skew < 0:
            raise ValueError("retries and max_clock_skew must be >= 0")
        self.root = root.rstrip("/")
        self.uri = storage.join(self.root, LEASE_FILE)
        self.ttl = ttl
        self.renew_every = renew_every
        self.clock = clock
        self.retries = retries
        self.backoff = backoff
        self.max_clock_skew = max_clock_skew
        # Commits start only with this much of the lease left (see the module docstring).
        self.commit_margin = min(max(renew_every, ttl / 4), (ttl - renew_every) / 2)
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.boot_id = _boot_id()
        self.pid_namespace = _pid_namespace()
        self._backend = _backend(self.root, storage_options)
        self._probed = False
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

    def commit_deadline(self) -> float:
        """The time (on ``clock``) by which a commit started now must have landed, retries
        included: this run's lease expiry, after which another run may hold the lease. 0.0
        when no lease is held. It moves forward with each renewal."""
        return self._expires if self.held else 0.0

    def remaining(self) -> float:
        """Seconds left until :meth:`commit_deadline` (0.0 when none is held or it passed)."""
        return max(0.0, self.commit_deadline() - self.clock()) if self.held else 0.0

    def _payload(self, now: float) -> bytes:
        return LeaseInfo(
            owner=self.token,
            host=self.host,
            pid=self.pid,
            started=self._started,
            renewed=now,
            expires=now + self.ttl,
            boot_id=self.boot_id,
            pid_namespace=self.pid_namespace,
        ).to_bytes()

    def _same_process_space(self, info: LeaseInfo) -> bool:
        """Whether ``info``'s pid names a process this one can see: same host, same boot and
        same PID namespace, each known."""
        return (
            info.host == self.host
            and self.boot_id is not None
            and info.boot_id == self.boot_id
            and self.pid_namespace is not None
            and info.pid_namespace == self.pid_namespace
        )

    def _stale(self, info: LeaseInfo | None, now: float) -> bool:
        if info is None or info.expires + self.max_clock_skew <= now:
            return True
        # A holder provably gone (its pid, in this very namespace, is free) never renews.
        return self._same_process_space(info) and info.pid != self.pid and not _pid_alive(info.pid)

    def _confirm(self) -> bool:
        """Read the lease back: this run's own (its token) means it is held."""
        if self._backend.settle:
            time.sleep(self._backend.settle)
        current = self._backend.read()
        info = None if current is None else LeaseInfo.from_bytes(current[0])
        if current is None or info is None or info.owner != self.token:
            return False
        self._version = current[1]
        self._expires = info.expires
        return True

    # ------------------------------------------------------------------------------ acquire

    def _prepare(self) -> None:
        """Once: on S3, check that the store honours conditional writes, else fall back."""
        backend = self._backend
        if self._probed or not isinstance(backend, _S3Backend):
            self._probed = True
            return
        honoured = storage.with_retries(
            "probing conditional writes next to",
            self.uri,
            backend.honours_conditions,
            retries=self.retries,
            backoff=self.backoff,
        )
        if not honoured:
            log.warning(
                "the object store of %s does not honour conditional writes (If-None-Match / "
                "If-Match): its lease falls back to write-and-read-back, which is best effort "
                "(two runs starting within a second of each other may both write)",
                storage.redact(self.root),
            )
            self._backend = _GenericBackend(backend.fs, backend.path)
        self._probed = True

    def _try_once(self) -> tuple[bool, LeaseInfo | None]:
        """One attempt: (acquired, the holder seen when not)."""
        now = self.clock()
        self._started = self._started or now
        payload = self._payload(now)
        if self._backend.create(payload):
            return self._confirm(), None
        current = self._backend.read()
        if current is None:  # released between our create and read: try again
            return False, None
        info = LeaseInfo.from_bytes(current[0])
        if info is not None and info.owner == self.token:
            # Our own write landed but its answer was lost (or an old lease of this object is
            # still there): refresh it by compare-and-swap, the read-back decides.
            self._backend.replace(payload, current[1])
            return self._confirm(), None
        if not self._stale(info, now):
            return False, info
        self._backend.replace(payload, current[1])
        # None from replace is a lost race or a lost answer: the read-back tells which.
        if not self._confirm():
            return False, None
        self.took_over = info
        what = "an unreadable lease" if info is None else f"the lease of {info.describe(now)}"
        log.warning("took over %s on %s", what, storage.redact(self.root))
        return True, None

    def acquire(self, wait: float = 0.0, poll: float = 1.0) -> None:
        """Take the lease, waiting up to ``wait`` seconds for a live holder to finish.

        Raises :class:`LeaseHeldError` naming the holder when it is still held after ``wait``,
        :class:`LeaseError` when storage fails for good (after retries, and after ``wait``).
        """
        if self.held:
            return
        deadline = self.clock() + max(0.0, wait)
        holder: LeaseInfo | None = None
        quick = 0
        while True:
            try:
                self._prepare()
                acquired, seen = storage.with_retries(
                    "taking the lease",
                    self.uri,
                    self._try_once,
                    retries=self.retries,
                    backoff=self.backoff,
                )
            except OSError as exc:  # no such bucket, credentials refused, retries exhausted
                left = deadline - self.clock()
                if isinstance(exc, storage.StorageError) and left > 0:
                    log.warning("lease: %s (will retry)", storage.redact(str(exc)))
                    time.sleep(min(poll, left))
                    continue
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
        now = self.clock()
        who = holder.describe(now) if holder else "another run"
        if holder is not None and holder.expires <= now:
            who += f"; taken over {self.max_clock_skew:.0f} s after its expiry (clock skew)"
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
            if now >= self._expires:  # another run may hold it by now: never revive it
                current = self._backend.read()
                info = None if current is None else LeaseInfo.from_bytes(current[0])
                where = storage.redact(self.root)
                if info is None or info.owner == self.token:
                    self._lost = f"the lease on {where} expired before it could be renewed"
                else:
                    self._lost = f"the lease on {where} is now held by {info.describe(now)}"
                log.error("%s; this run stops writing", self._lost)
                return
            payload = self._payload(now)
            version = self._backend.replace(payload, self._version)
            if version is not None:
                self._version = version
                self._expires = now + self.ttl
                return
            current = self._backend.read()
            info = None if current is None else LeaseInfo.from_bytes(current[0])
            if info is not None and info.owner == self.token and current is not None:
                self._version = current[1]  # ours, another version tag (a lost answer?)
                self._expires = max(self._expires, info.expires)
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
        """Raise :class:`LeaseLostError` unless this run may start a commit: it holds the
        lease and at least ``commit_margin`` seconds of it are left."""
        if self._lost is not None:
            raise LeaseLostError(self._lost)
        if self._version is None:
            raise LeaseLostError(f"no lease held on {storage.redact(self.root)}")
        left = self._expires - self.clock()
        if left <= 0:
            raise LeaseLostError(
                f"the lease on {storage.redact(self.root)} expired before it could be renewed"
            )
        if left < self.commit_margin:
            raise LeaseLostError(
                f"the lease on {storage.redact(self.root)} is too close to its expiry to start "
                f"a commit ({left:.1f} s left, margin {self.commit_margin:.1f} s): its "
                "renewals are failing"
            )

    # ------------------------------------------------------------------------------ release

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours and has not expired on this
        run's clock (an expired one may be another run's by now: it is left to expire)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.renew_every))
            self._thread = None
        with self._mutex:
            version, self._version = self._version, None
            if version is None or self._lost is not None:
                return

            def delete() -> bool:
                if self.clock() >= self._expires:
                    log.warning(
                        "the lease on %s expired before the run ended: left to expire",
                        storage.redact(self.root),
                    )
                    return False
                return self._backend.delete(version)

            try:
                storage.with_retries(
                    "releasing the lease",
                    self.uri,
                    delete,
                    retries=self.retries,
                    backoff=self.backoff,
                )
            except Exception as exc:  # it expires on its own
                log.warning("could not delete the lease: %s", storage.redact(str(exc)))

    def __enter__(self) -> OutLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
