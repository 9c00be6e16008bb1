"""Byte-level storage on any fsspec filesystem: local disk, ``s3://``, ``gs://``, ``memory://``.

Reads and writes retry transient failures (connection drops, timeouts, throttling, 5xx) with
exponential backoff and jitter; missing files and permission errors are raised at once. Local
writes are atomic (a temporary file in the target folder, then ``os.replace``), object-store
writes are a single PUT, so a reader never sees a half-written file. ``redact`` strips
credentials from anything that may end up in a log or an error message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "DEFAULT_BACKOFF",
    "Backoff",
    "MissingBackendError",
    "StorageError",
    "exists",
    "filesystem",
    "is_transient",
    "join",
    "list_files",
    "process_local",
    "read_bytes",
    "redact",
    "with_retries",
    "write_bytes",
    "write_local_files",
]

T = TypeVar("T")


class StorageError(OSError):
    """A storage operation still failed after all retries; ``attempts`` says how many ran."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class MissingBackendError(ValueError):
    """A URI whose scheme needs an fsspec backend (an optional extra) that is not installed."""


# Schemes whose fsspec backend comes with an optional extra of fundus-batch.
_EXTRAS = {
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "adl": "azure",
}


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt k sleeps ``min(cap, base * 2**k)`` times a
    uniform factor in [0.5, 1). ``sleep`` and ``rng`` are injectable for tests."""

    base: float = 0.5
    cap: float = 10.0
    sleep: Callable[[float], None] = time.sleep
    rng: np.random.Generator | None = field(default=None, compare=False)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        ceiling = min(self.cap, self.base * (2.0**attempt))
        rng = self.rng if self.rng is not None else np.random.default_rng()
        return ceiling * (0.5 + 0.5 * float(rng.random()))


DEFAULT_BACKOFF = Backoff()
# With the default backoff, 6 retries wait 13-25 s in all: enough to ride out an object store
# restart or a short network partition without stalling a run on a missing file.
DEFAULT_RETRIES = 6

_NEVER_RETRY = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_PERMANENT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.EEXIST,
        errno.EINVAL,
        errno.ENOSPC,
        errno.EROFS,
        errno.ENAMETOOLONG,
        errno.EDQUOT,
    }
)
_THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "SlowDown",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "ServiceUnavailable",
    }
)
_TRANSIENT_STATUS = frozenset({408, 429})


def _transient_client_types() -> tuple[type[BaseException], ...]:
    """Connection-level exception classes of the optional HTTP stacks that are installed."""
    found: list[type[BaseException]] = []
    try:
        from botocore import exceptions as bce

        found += [bce.ConnectionError, bce.HTTPClientError]
    except ImportError:
        pass
    try:
        import aiohttp

        found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    return tuple(found)


_CLIENT_TYPES: tuple[type[BaseException], ...] | None = None


def _http_verdict(exc: BaseException) -> bool | None:
    """Transient or not from an HTTP status / AWS error code, None when there is none."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _THROTTLE_CODES:
            return True
        if isinstance(status, int):
            return status >= 500 or status in _TRANSIENT_STATUS
        return None
    status = getattr(exc, "status", None)
    if (
        isinstance(status, int)
        and 100 <= status <= 599
        and type(exc).__module__.startswith("aiohttp")
    ):
        return status >= 500 or status in _TRANSIENT_STATUS
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` can help.

    Never: missing files, permission errors, directories where files were expected, client
    (4xx) errors other than timeouts and throttling, and errors that are not I/O at all.
    Always: connection errors, timeouts, throttling, 5xx, and other ``OSError``s.
    """
    global _CLIENT_TYPES
    if isinstance(exc, _NEVER_RETRY):
        return False
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:  # s3fs wraps botocore errors in OSError
        seen.add(id(link))
        verdict = _http_verdict(link)
        if verdict is not None:
            return verdict
        link = link.__cause__ or link.__context__
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if _CLIENT_TYPES is None:
        _CLIENT_TYPES = _transient_client_types()
    if _CLIENT_TYPES and isinstance(exc, _CLIENT_TYPES):
        return True
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS
    return False


_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)"
    r"(?:[^/\s@:]+:[^\s@]*|[^/\s@:]+)@"  # user:password (may hold '/') or user alone
)
_SECRET_KEY = (
    r"(?:[A-Za-z0-9_\-]*(?:secret|password|passwd|token|signature|credential|"
    r"api[_\-]?key|access[_\-]?key|account[_\-]?key|private[_\-]?key)[A-Za-z0-9_\-]*"
    r"|sig|sas|pwd)"
)
_KEY_VALUE = re.compile(
    r"(?P<key>[\"']?\b" + _SECRET_KEY + r"\b[\"']?\s*[=:]\s*)"
    r"(?:(?P<q>[\"'])(?P<quoted>.*?)(?P=q)|(?P<bare>(?:[^\s\"',;&}:]|:(?!\s|$))+))",
    re.IGNORECASE,
)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
# Query parameters of presigned / SAS URLs: AWS (SigV2 and X-Amz-*), GCS (X-Goog-*,
# GoogleAccessId), Azure SAS (sv, ss, srt, sp, se, st, spr, sr, si, sdd, sk*, sig), CloudFront.
_SIGNED_QUERY = re.compile(
    r"(?P<key>[?&](?:x-amz-[a-z0-9\-]+|x-goog-[a-z0-9\-]+|awsaccesskeyid|googleaccessid|"
    r"signature|expires|policy|key-pair-id|sv|ss|srt|sp|se|st|spr|sr|si|sdd|skoid|sktid|skt|ske|sks|skv|sig|"
    r"[a-z0-9_\-]*token)=)(?P<value>(?:[^&#\s\"'<>,;):]|:(?!\s|$))*)",
    re.IGNORECASE,
)
_MASK = "***"


def _mask_value(match: re.Match[str]) -> str:
    quote = match.group("q") or ""
    return f"{match.group('key')}{quote}{_MASK}{quote}"


def redact(text: str) -> str:
    """Remove credentials from URIs, query strings, config dumps and error messages.

    ``scheme://user:pass@host`` loses its user info; every parameter of a presigned or SAS
    query string (``X-Amz-*``, ``X-Goog-*``, ``AWSAccessKeyId``, ``Signature``, ``sv``/``se``/
    ``sp``/``sig``, ``*token``, ...) loses its value; values of keys that look secret
    (``aws_secret_access_key=...``, ``"secret": "..."``, ``X-Amz-Signature=...``, ``sig=...``,
    ``password: ...``) and AWS access key ids become ``***``.
    """
    text = _USERINFO.sub(lambda m: m.group("scheme") + _MASK + "@", str(text))
    text = _SIGNED_QUERY.sub(lambda m: m.group("key") + _MASK, text)
    text = _KEY_VALUE.sub(_mask_value, text)
    return _AWS_KEY_ID.sub(_MASK, text)


def redact_uri(uri: str) -> str:
    """A URI as a row stores it: without user info (``scheme://user:pass@``) and, for a URL
    (``scheme://``, chained or not), without the values of a presigned or SAS query string or
    of keys in it that look secret. The path is kept as given: a folder named
    ``access_token=none`` is a path, and :func:`redact`, meant for messages, would cut it."""
    text = _USERINFO.sub(lambda m: m.group("scheme") + _MASK + "@", str(uri))
    head, sep, query = text.partition("?")
    if not sep or "://" not in head:  # a local path: '?' is a character of its name
        return text
    query = _SIGNED_QUERY.sub(lambda m: m.group("key") + _MASK, "?" + query)[1:]
    query = _AWS_KEY_ID.sub(_MASK, _KEY_VALUE.sub(_mask_value, query))
    return f"{head}?{query}"


# http(s) URIs (presigned URLs carry their credentials in the query) take only the options
# under these keys; the object store's options would make their HTTP client refuse to start.
_HTTP_PROTOCOLS = ("http", "https")


def options_for(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The fsspec options that apply to ``uri``: for http(s) URIs those under the ``http`` (or
    ``https``) key, for others everything but those keys."""
    options = dict(storage_options or {})
    nested = {k: options.pop(k) for k in _HTTP_PROTOCOLS if k in options}
    protocol = fsspec.utils.get_protocol(uri)
    if protocol not in _HTTP_PROTOCOLS:
        return options
    chosen = nested.get(protocol, nested.get("http", {}))
    if not isinstance(chosen, dict):
        raise ValueError("storage options under 'http' or 'https' must be an object")
    return dict(chosen)


def filesystem(
    uri: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` (instances are cached by fsspec) and the path in it.

    A path without ``scheme://`` (or a ``file://`` URL) is a local path, taken literally: fsspec
    would read ``::`` in it as a chained URL (``a/eye::L.png`` opened ``a/eye``)."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"storage URI must be a non-empty string, got {uri!r}")
    try:
        if "://" not in uri or uri.startswith("file://"):
            local = fsspec.filesystem("file", **options_for(uri, storage_options))
            return local, local._strip_protocol(uri)
        fs, path = fsspec.core.url_to_fs(uri, **options_for(uri, storage_options))
    except ValueError as exc:
        raise ValueError(f"cannot open storage for {redact(uri)}: {redact(str(exc))}") from exc
    except ImportError as exc:  # the scheme's fsspec backend is not installed
        scheme = uri.split("://", 1)[0].lower()
        extra = _EXTRAS.get(scheme)
        hint = f"pip install 'fundus-batch[{extra}]'" if extra else str(exc)
        raise MissingBackendError(f"{scheme}:// storage is not installed: {hint}") from None
    return fs, path


def process_local(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``uri`` names storage that only this process sees (fsspec's ``memory://``): Ray's
    workers, each in a process of its own, would read and write a private copy of it."""
    from fsspec.implementations.memory import MemoryFileSystem

    fs, _ = filesystem(uri, storage_options)
    return isinstance(fs, MemoryFileSystem)


def _with_retries(
    what: str,
    uri: str,
    fn: Callable[[], T],
    retries: int,
    backoff: Backoff | None,
    time_left: Callable[[], float] | None = None,
) -> T:
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    policy = backoff if backoff is not None else DEFAULT_BACKOFF
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = policy.delay(attempt)
            out_of_time = time_left is not None and delay >= time_left()
            if attempt == retries or out_of_time:
                why = " (no time left for another before its deadline)" if out_of_time else ""
                raise StorageError(
                    f"{what} {redact(uri)} failed after {attempt + 1} attempts{why}: "
                    f"{type(exc).__name__}: {redact(str(exc))}",
                    attempts=attempt + 1,
                ) from exc
            policy.sleep(delay)
    raise AssertionError("unreachable")


def with_retries(
    what: str,
    uri: str,
    fn: Callable[[], T],
    *,
    retries: int = DEFAULT_RETRIES,
    backoff: Backoff | None = None,
) -> T:
    """Run ``fn`` (a storage operation on ``uri``), retrying transient failures with backoff;
    ``what`` names the operation in the final error ("listing", "reading", ...)."""
    return _with_retries(what, uri, fn, retries, backoff)


def read_bytes(
    uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: Backoff | None = None,
) -> bytes:
    """Whole content of ``uri``. FileNotFoundError at once; StorageError after ``retries``
    retries of transient failures."""
    fs, path = filesystem(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        return _with_retries("reading", uri, lambda: _read_local(path), retries, backoff)
    return _with_retries("reading", uri, lambda: bytes(fs.cat_file(path)), retries, backoff)


def _read_local(path: str) -> bytes:
    """Read a regular file; FIFOs, devices and folders are refused instead of blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        # Checked before fdopen, which would refuse a folder naming only the descriptor.
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", path)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file (FIFO, socket or device)", path)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def write_local_files(files: Sequence[tuple[str | os.PathLike[str], bytes]]) -> None:
    """Write each ``(path, data)`` on local disk, creating folders, so that a failure leaves no
    partial file and every existing one as it was: all go to temporary files beside their
    targets first, which then replace the targets in order."""
    staged: list[tuple[str, str]] = []
    replaced = 0
    try:
        for target, data in files:
            path = os.fspath(target)
            folder = os.path.dirname(path) or "."
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
            # O_EXCL: never follow or reuse a stale name; 0o666 lets the umask decide, as open().
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            staged.append((tmp, path))  # first: a Ctrl-C just after the open still removes it
            try:
                fd = os.open(tmp, flags, 0o666)
            except OSError:
                staged.pop()  # not created: never unlink a name this call did not make
                raise
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        for tmp, path in staged:
            os.replace(tmp, path)
            replaced += 1
    finally:
        for tmp, _ in staged[replaced:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_bytes(
    uri: str,
    data: bytes,
    *,
    storage_options: dict[str, Any] | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: Backoff | None = None,
    time_left: Callable[[], float] | None = None,
) -> None:
    """Store ``data`` at ``uri``, replacing any existing file, never leaving a partial one.

    Local disk: parent folders are created, then a temporary file in the same folder is renamed
    over the target. Other filesystems: one ``pipe_file`` (a single PUT on object stores).
    ``time_left`` (seconds until a deadline) stops the retries where the next would start past it.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    payload = bytes(data)
    fs, path = filesystem(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        write = [(path, payload)]
        _with_retries("writing", uri, lambda: write_local_files(write), retries, backoff, time_left)
    else:
        _with_retries(
            "writing", uri, lambda: fs.pipe_file(path, payload), retries, backoff, time_left
        )


def exists(
    uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: Backoff | None = None,
) -> bool:
    """Whether a file or folder exists at ``uri``."""
    fs, path = filesystem(uri, storage_options)
    return bool(_with_retries("checking", uri, lambda: fs.exists(path), retries, backoff))


def file_size(
    uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: Backoff | None = None,
) -> int | None:
    """Size in bytes of the file at ``uri`` as the store has it now (no cached listing), or
    None when there is none."""
    fs, path = filesystem(uri, storage_options)

    def size() -> int | None:
        fs.invalidate_cache(path)
        try:
            return int(fs.size(path))
        except FileNotFoundError:
            return None

    return _with_retries("checking", uri, size, retries, backoff)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI (``s3://b`` + ``k`` -> ``s3://b/k``).

    Slashes between parts are normalised; ``..`` segments are refused so that ids taken
    from a manifest cannot escape the output root.
    """
    segments: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"path parts must be strings, got {type(part).__name__}")
        pieces = [p for p in part.replace("\\", "/").split("/") if p not in ("", ".")]
        if ".." in pieces:
            raise ValueError(f"path part {part!r} contains '..'")
        segments.extend(pieces)
    if "://" in base:
        scheme, rest = base.split("://", 1)
        lead = "/" if rest.startswith("/") else ""
        head = rest.strip("/")
        return f"{scheme}://{lead}" + "/".join(([head] if head else []) + segments)
    if not segments:
        return base
    return posixpath.join(base, *segments) if base else "/".join(segments)


def _normalise_exts(exts: Iterable[str] | None) -> tuple[str, ...] | None:
    if exts is None:
        return None
    if isinstance(exts, str):
        exts = [exts]
    out = tuple("." + e.lower().lstrip(".") for e in exts)
    if not out:
        raise ValueError("exts must name at least one extension (or be None for all files)")
    return out


def list_files(
    prefix: str,
    exts: Iterable[str] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    include_hidden: bool = False,
    retries: int = DEFAULT_RETRIES,
    backoff: Backoff | None = None,
) -> list[str]:
    """All files under ``prefix`` (recursive), sorted, as URIs in the style of ``prefix``.

    ``exts`` filters by case-insensitive suffix (``[".jpg", "jpeg"]``). Names starting with
    ``.`` (including this module's temporary files) are skipped unless ``include_hidden``.
    Raises FileNotFoundError when nothing exists at ``prefix``.
    """
    wanted = _normalise_exts(exts)
    fs, path = filesystem(prefix, storage_options)
    found = _with_retries("listing", prefix, lambda: fs.find(path), retries, backoff)
    if not found and not _with_retries(
        "checking", prefix, lambda: fs.exists(path), retries, backoff
    ):
        raise FileNotFoundError(f"nothing found at {redact(prefix)}")
    root = path.rstrip("/")
    keep_protocol = "://" in prefix
    out: list[str] = []
    for item in found:
        rel = item[len(root) :] if item.startswith(root) else item
        if not include_hidden and any(seg.startswith(".") for seg in rel.split("/") if seg):
            continue
        if wanted is not None and not item.lower().endswith(wanted):
            continue
        out.append(fs.unstrip_protocol(item) if keep_protocol else item)
    return sorted(out)
