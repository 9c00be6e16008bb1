"""Tests for fundus_batch.io.storage: local, memory:// and S3 (moto) I/O, retries, redaction."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fundus_batch.io import storage
from fundus_batch.io.storage import (
    Backoff,
    StorageError,
    exists,
    filesystem,
    is_transient,
    join,
    list_files,
    read_bytes,
    redact,
    redact_uri,
    write_bytes,
    write_local_files,
)
from tests.s3_fixture import s3_bucket, s3_server  # noqa: F401


class _Sleeps:
    """Records requested sleeps instead of sleeping."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def _fast(sleeps: _Sleeps, base: float = 0.01) -> Backoff:
    return Backoff(base=base, cap=1.0, sleep=sleeps, rng=np.random.default_rng(0))


class _FlakyFS:
    """Stands in for an fsspec filesystem: fails ``failures`` times, then works."""

    def __init__(self, failures: int, exc: BaseException) -> None:
        self.failures = failures
        self.exc = exc
        self.calls = 0
        self.files: dict[str, bytes] = {}

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc

    def cat_file(self, path: str) -> bytes:
        self._maybe_fail()
        return self.files[path]

    def pipe_file(self, path: str, data: bytes) -> None:
        self._maybe_fail()
        self.files[path] = data

    def exists(self, path: str) -> bool:
        self._maybe_fail()
        return path in self.files


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(failures: int, exc: BaseException) -> _FlakyFS:
        fs = _FlakyFS(failures, exc)
        fs.files["bucket/key"] = b"payload"
        monkeypatch.setattr(
            storage,
            "filesystem",
            lambda uri, storage_options=None: (fs, uri.split("://", 1)[1].split("@")[-1]),
        )
        return fs

    return install


@pytest.fixture
def memory_root() -> Iterator[str]:
    root = f"memory://test-{uuid.uuid4().hex}"
    yield root
    fs, path = filesystem(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_local_round_trip_creates_parent_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.bin"
    write_bytes(str(target), b"\x00\x01hello")
    assert target.read_bytes() == b"\x00\x01hello"
    assert read_bytes(str(target)) == b"\x00\x01hello"
    assert exists(str(target)) and not exists(str(tmp_path / "missing.bin"))


def test_local_write_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    write_bytes(str(target), b"old")
    write_bytes(f"file://{target}", bytearray(b"new content"))
    assert target.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_local_write_respects_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_bytes(str(tmp_path / "f.bin"), b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


def test_failed_local_write_keeps_the_old_file_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "disk went away")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    sleeps = _Sleeps()
    with pytest.raises(StorageError) as info:
        write_bytes(str(target), b"new", retries=2, backoff=_fast(sleeps))
    assert info.value.attempts == 3 and len(sleeps.calls) == 2
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_write_local_files_writes_every_file_creating_folders(tmp_path: Path) -> None:
    first, second = tmp_path / "a.png", tmp_path / "new" / "deep" / "b.json"
    first.write_bytes(b"old")
    write_local_files([(first, b"image"), (str(second), b"{}")])
    assert (first.read_bytes(), second.read_bytes()) == (b"image", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "new"]


def test_write_local_files_replaces_no_file_when_one_cannot_be_written(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    first = tmp_path / "a.png"
    first.write_bytes(b"old")
    with pytest.raises(OSError):
        write_local_files([(first, b"new"), (tmp_path / "a_file" / "b.json", b"{}")])
    assert first.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_file"]


def test_write_local_files_leaves_no_temporary_file_when_interrupted_just_after_creating_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def open_then_interrupt(path: str, flags: int, mode: int = 0o777) -> int:
        os.close(real_open(path, flags, mode))
        raise KeyboardInterrupt  # Ctrl-C arriving as os.open returns

    monkeypatch.setattr(storage.os, "open", open_then_interrupt)
    target = tmp_path / "a.png"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        write_local_files([(target, b"new")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    assert target.read_bytes() == b"old"


def test_memory_round_trip(memory_root: str) -> None:
    uri = join(memory_root, "x", "y.bin")
    assert not exists(uri)
    write_bytes(uri, b"abc")
    assert exists(uri)
    assert read_bytes(uri) == b"abc"
    write_bytes(uri, b"def")
    assert read_bytes(uri) == b"def"


def test_missing_file_raises_file_not_found_without_retrying(tmp_path: Path) -> None:
    sleeps = _Sleeps()
    with pytest.raises(FileNotFoundError):
        read_bytes(str(tmp_path / "nope.bin"), backoff=_fast(sleeps))
    with pytest.raises(FileNotFoundError):
        read_bytes("memory://definitely/not/here.bin", backoff=_fast(sleeps))
    assert sleeps.calls == []


@pytest.mark.parametrize(
    "exc", [ConnectionError("reset"), TimeoutError("slow"), OSError(errno.EIO, "io error")]
)
def test_transient_read_errors_are_retried_until_success(flaky: Any, exc: BaseException) -> None:
    fs = flaky(3, exc)
    sleeps = _Sleeps()
    assert read_bytes("s3://bucket/key", retries=4, backoff=_fast(sleeps)) == b"payload"
    assert fs.calls == 4
    assert len(sleeps.calls) == 3


def test_backoff_grows_exponentially_with_bounded_jitter(flaky: Any) -> None:
    flaky(4, ConnectionError("reset"))
    sleeps = _Sleeps()
    read_bytes("s3://bucket/key", retries=4, backoff=_fast(sleeps, base=0.1))
    assert len(sleeps.calls) == 4
    for k, delay in enumerate(sleeps.calls):
        assert 0.5 * 0.1 * 2**k <= delay < 0.1 * 2**k


def test_backoff_is_capped() -> None:
    policy = Backoff(base=1.0, cap=2.0, rng=np.random.default_rng(1))
    assert all(policy.delay(k) < 2.0 for k in range(10))


def test_exhausted_retries_raise_storage_error_with_cause_and_redacted_uri(flaky: Any) -> None:
    fs = flaky(100, ConnectionError("connection reset by peer"))
    sleeps = _Sleeps()
    with pytest.raises(StorageError) as info:
        read_bytes("s3://AKIDUSER:hunter2secret@bucket/key", retries=2, backoff=_fast(sleeps))
    err = info.value
    assert isinstance(err, OSError)
    assert err.attempts == 3 and fs.calls == 3
    assert isinstance(err.__cause__, ConnectionError)
    assert "hunter2secret" not in str(err) and "bucket/key" in str(err)


@pytest.mark.parametrize(
    "exc",
    [
        PermissionError("denied"),
        FileNotFoundError("gone"),
        IsADirectoryError("dir"),
        ValueError("bad"),
    ],
)
def test_permanent_errors_are_not_retried(flaky: Any, exc: BaseException) -> None:
    fs = flaky(5, exc)
    sleeps = _Sleeps()
    with pytest.raises(type(exc)):
        read_bytes("s3://bucket/key", backoff=_fast(sleeps))
    assert fs.calls == 1 and sleeps.calls == []


def test_writes_and_exists_are_retried_too(flaky: Any) -> None:
    fs = flaky(2, TimeoutError("slow"))
    sleeps = _Sleeps()
    write_bytes("s3://bucket/other", b"zz", backoff=_fast(sleeps))
    assert fs.files["bucket/other"] == b"zz" and fs.calls == 3
    fs.calls, fs.failures = 0, 1
    assert exists("s3://bucket/key", backoff=_fast(sleeps)) and fs.calls == 2


def test_a_write_with_a_deadline_stops_retrying_where_the_next_would_start_past_it(
    flaky: Any,
) -> None:
    fs = flaky(100, TimeoutError("slow"))
    sleeps = _Sleeps()
    left = iter([10.0, 10.0, 0.01])  # seconds to the deadline before each retry
    with pytest.raises(StorageError, match="no time left for another before its deadline"):
        write_bytes("s3://bucket/late", b"zz", backoff=_fast(sleeps), time_left=lambda: next(left))
    assert fs.calls == 3 and len(sleeps.calls) == 2 and "bucket/late" not in fs.files


def test_zero_retries_means_one_attempt(flaky: Any) -> None:
    fs = flaky(1, ConnectionError("reset"))
    with pytest.raises(StorageError):
        read_bytes("s3://bucket/key", retries=0, backoff=_fast(_Sleeps()))
    assert fs.calls == 1


def test_negative_retries_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        read_bytes(str(tmp_path / "x"), retries=-1)


def _client_error(code: str, status: int) -> Exception:
    bce = pytest.importorskip("botocore.exceptions")
    response = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return bce.ClientError(response, "GetObject")


@pytest.mark.parametrize(
    ("code", "status", "transient"),
    [
        ("SlowDown", 503, True),
        ("InternalError", 500, True),
        ("ServiceUnavailable", 503, True),
        ("Throttling", 400, True),
        ("RequestTimeout", 400, True),
        ("NoSuchKey", 404, False),
        ("AccessDenied", 403, False),
        ("InvalidRequest", 400, False),
    ],
)
def test_botocore_client_errors_are_classified_by_status_and_code(
    code: str, status: int, transient: bool
) -> None:
    err = _client_error(code, status)
    assert is_transient(err) is transient
    wrapped = OSError(errno.EIO, "translated by s3fs")
    wrapped.__cause__ = err
    assert is_transient(wrapped) is transient


def test_botocore_connection_errors_are_transient() -> None:
    bce = pytest.importorskip("botocore.exceptions")
    assert is_transient(bce.EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(bce.ReadTimeoutError(endpoint_url="http://x"))


def test_aiohttp_errors_are_classified() -> None:
    aiohttp = pytest.importorskip("aiohttp")
    request_info = None
    server_error = aiohttp.ClientResponseError(request_info, (), status=502)  # type: ignore[arg-type]
    not_found = aiohttp.ClientResponseError(request_info, (), status=404)  # type: ignore[arg-type]
    assert is_transient(server_error)
    assert not is_transient(not_found)
    assert is_transient(aiohttp.ServerDisconnectedError())


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (OSError(errno.EIO, "io"), True),
        (OSError("no errno"), True),
        (OSError(errno.ENOSPC, "full"), False),
        (OSError(errno.EINVAL, "bad"), False),
        (FileNotFoundError(), False),
        (PermissionError(), False),
        (NotADirectoryError(), False),
        (KeyError("x"), False),
    ],
)
def test_builtin_errors_are_classified(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://bucket", ("k",), "s3://bucket/k"),
        ("s3://bucket/", ("/a/", "b.png"), "s3://bucket/a/b.png"),
        ("s3://bucket/pre", ("x/y", "z"), "s3://bucket/pre/x/y/z"),
        ("memory://", ("x",), "memory://x"),
        ("memory:///root", ("x",), "memory:///root/x"),
        ("file:///tmp/out", ("a",), "file:///tmp/out/a"),
        ("/tmp/out", ("a/b", "c.png"), "/tmp/out/a/b/c.png"),
        ("/tmp/out/", ("./a",), "/tmp/out/a"),
        ("rel", ("a",), "rel/a"),
        ("s3://bucket/k", (), "s3://bucket/k"),
    ],
)
def test_join(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert join(base, *parts) == expected


def test_join_refuses_parent_segments() -> None:
    with pytest.raises(ValueError):
        join("s3://bucket/out", "../../etc/passwd")
    with pytest.raises(ValueError):
        join("/data/out", "ok", "..")


def test_joined_local_path_round_trips(tmp_path: Path) -> None:
    uri = join(str(tmp_path), "sub", "f.bin")
    write_bytes(uri, b"1")
    assert (tmp_path / "sub" / "f.bin").read_bytes() == b"1"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("s3://AKIDUSER:wJalr/XUtnFEMI@bucket/key", "wJalr/XUtnFEMI"),
        ("https://alice:pa55word@example.org/data", "pa55word"),
        ("https://alice@example.org/data", "alice"),
        ("aws_secret_access_key=wJalrXUtnFEMIK7MDENG", "wJalrXUtnFEMIK7MDENG"),
        ("AWS_SESSION_TOKEN: FwoGZXIvYXdzEJr", "FwoGZXIvYXdzEJr"),
        ("{'key': 'id', 'secret': 'top secret value'}", "top secret value"),
        ('{"password": "hunter2"}', "hunter2"),
        ("https://acct.blob.core.windows.net/c/b?sv=2020&sig=abc%2Fdef&se=1", "abc%2Fdef"),
        ("GET /k?X-Amz-Credential=AKID%2F2024&X-Amz-Signature=deadbeef", "deadbeef"),
        ("key id AKIAIOSFODNN7EXAMPLE leaked", "AKIAIOSFODNN7EXAMPLE"),
        ("api_key=sk-123456 other", "sk-123456"),
    ],
)
def test_redact_removes_secrets(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out
    assert "***" in out


@pytest.mark.parametrize(
    "text",
    [
        "s3://bucket/images/a@2x.png",
        "reading /data/eyepacs/10_left.jpeg failed: key=images/a.png",
        "design=ok, signal=3, endpoint_url=http://127.0.0.1:5000",
    ],
)
def test_redact_leaves_ordinary_text_alone(text: str) -> None:
    assert redact(text) == text


@pytest.mark.parametrize(
    "uri",
    [
        "/data/lake/access_token=none/site=A/img.png",
        "s3://bucket/sig=1/ASIAABCDEFGHIJKLMNOP.png",
        "/data/pwd:home/a?b.png",
        "https://host.example/m/img.png?page=2",
    ],
)
def test_redact_uri_keeps_a_path_that_only_looks_secret(uri: str) -> None:
    assert redact_uri(uri) == uri


@pytest.mark.parametrize(
    ("uri", "kept"),
    [
        ("https://h.example/b/img.jpg?X-Amz-Signature=sekrit&x=1", "https://h.example/b/img.jpg?"),
        ("https://h.example/c/img.jpg?sv=1&sig=sekrit", "https://h.example/c/img.jpg?sv="),
        ("https://h.example/img.jpg?api_key=sekrit", "https://h.example/img.jpg?api_key="),
        ("s3://AKIDUSER:sekrit@bucket/key.png", "s3://***@bucket/key.png"),
        ("simplecache::https://h.example/x.png?X-Amz-Signature=sekrit", "simplecache::https://"),
        ("HTTPS://h.example/x.png?X-Amz-Signature=sekrit", "HTTPS://h.example/x.png?"),
    ],
)
def test_redact_uri_masks_user_info_and_signed_queries(uri: str, kept: str) -> None:
    assert "sekrit" not in redact_uri(uri) and redact_uri(uri).startswith(kept)


def test_a_local_path_with_a_double_colon_names_that_file(tmp_path: Path) -> None:
    (tmp_path / "eye").write_bytes(b"the wrong file")
    (tmp_path / "eye::L.png").write_bytes(b"left")
    assert storage.read_bytes(str(tmp_path / "eye::L.png")) == b"left"
    assert filesystem(str(tmp_path / "eye::L.png"))[1] == str(tmp_path / "eye::L.png")
    assert storage.read_bytes(f"file://{tmp_path}/eye::L.png") == b"left"


def test_filesystem_passes_storage_options_through() -> None:
    pytest.importorskip("s3fs")
    fs, path = filesystem(
        "s3://bucket/k.png", {"anon": True, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    )
    assert path == "bucket/k.png"
    assert fs.protocol[0] == "s3" or "s3" in fs.protocol
    assert fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:9"
    assert fs.anon is True


S3_OPTIONS = {"key": "K", "secret": "S", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}


def test_a_presigned_http_url_is_read_whatever_object_store_options_the_run_has(
    http_folder: tuple[Path, str],
) -> None:
    folder, base = http_folder
    (folder / "img.jpg").write_bytes(b"photo")
    url = f"{base}/img.jpg?X-Amz-Signature=abc"
    assert storage.read_bytes(url, storage_options=S3_OPTIONS, retries=0) == b"photo"
    # options meant for HTTP go under "http"; the object store never sees that key
    fs, _ = filesystem(url, {**S3_OPTIONS, "http": {"headers": {"X-Test": "1"}}})
    assert fs.kwargs["headers"] == {"X-Test": "1"}
    s3, _ = filesystem("s3://bucket/k", {**S3_OPTIONS, "http": {"headers": {}}})
    assert "http" not in s3.storage_options and s3.client_kwargs == S3_OPTIONS["client_kwargs"]


def test_filesystem_rejects_unknown_protocols_and_redacts() -> None:
    with pytest.raises(ValueError) as info:
        filesystem("nosuchproto://user:topsecret@host/x")
    assert "topsecret" not in str(info.value)


def _make_tree(root: Path) -> None:
    for rel in [
        "b/2.JPG",
        "b/1.jpeg",
        "a/x.png",
        "a/deep/er/y.PNG",
        "a/notes.txt",
        ".hidden/z.png",
        "a/.w.png.0123abcd.tmp",
        "a/.dot.png",
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")


def test_list_files_local_is_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    got = list_files(str(tmp_path), [".png", "jpg", ".JPEG"])
    rel = [os.path.relpath(p, tmp_path) for p in got]
    assert rel == ["a/deep/er/y.PNG", "a/x.png", "b/1.jpeg", "b/2.JPG"]
    assert all(os.path.isabs(p) for p in got)
    everything = list_files(str(tmp_path), include_hidden=True)
    assert len(everything) == 8 and everything == sorted(everything)


def test_list_files_single_extension_string(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    assert [os.path.basename(p) for p in list_files(str(tmp_path), "txt")] == ["notes.txt"]


def test_list_files_missing_prefix_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list_files(str(tmp_path / "absent"))


def test_list_files_empty_folder_is_empty(tmp_path: Path) -> None:
    assert list_files(str(tmp_path)) == []


def test_list_files_memory_returns_readable_uris(memory_root: str) -> None:
    for name in ("b.png", "a/c.png", "a/d.txt"):
        write_bytes(join(memory_root, name), name.encode())
    got = list_files(memory_root, [".png"])
    assert [u.rsplit("/", 1)[-1] for u in got] == ["c.png", "b.png"]
    assert all(u.startswith("memory://") for u in got)
    assert [read_bytes(u) for u in got] == [b"a/c.png", b"b.png"]


def test_s3_round_trip_against_moto(s3_server: dict[str, Any], s3_bucket: str) -> None:  # noqa: F811
    opts = s3_server["storage_options"]
    uri = join(f"s3://{s3_bucket}", "runs", "r1", "img.png")
    assert not exists(uri, storage_options=opts)
    write_bytes(uri, b"\x89PNG fake", storage_options=opts)
    assert exists(uri, storage_options=opts)
    assert read_bytes(uri, storage_options=opts) == b"\x89PNG fake"
    write_bytes(uri, b"replaced", storage_options=opts)
    assert read_bytes(uri, storage_options=opts) == b"replaced"
    write_bytes(join(f"s3://{s3_bucket}", "runs", "r1", "b.txt"), b"t", storage_options=opts)
    listed = list_files(f"s3://{s3_bucket}/runs", [".png"], storage_options=opts)
    assert listed == [uri]


def test_s3_missing_key_is_file_not_found_without_retry(
    s3_server: dict[str, Any],  # noqa: F811
    s3_bucket: str,  # noqa: F811
) -> None:
    sleeps = _Sleeps()
    with pytest.raises(FileNotFoundError):
        read_bytes(
            f"s3://{s3_bucket}/nope.png",
            storage_options=s3_server["storage_options"],
            backoff=_fast(sleeps),
        )
    assert sleeps.calls == []


def test_s3_objects_are_visible_to_a_plain_boto3_client(
    s3_server: dict[str, Any],  # noqa: F811
    s3_bucket: str,  # noqa: F811
) -> None:
    boto3 = pytest.importorskip("boto3")
    write_bytes(f"s3://{s3_bucket}/k.bin", b"hello", storage_options=s3_server["storage_options"])
    client = boto3.client("s3", endpoint_url=s3_server["endpoint_url"], region_name="us-east-1")
    assert client.get_object(Bucket=s3_bucket, Key="k.bin")["Body"].read() == b"hello"


@pytest.fixture
def without_gcsfs_and_adlfs(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsspec as it is when the [gcs] and [azure] extras are not installed."""
    import importlib

    registry = importlib.import_module("fsspec.registry")  # the module, not fsspec.registry
    for scheme in ("gs", "gcs", "az", "abfs"):
        monkeypatch.delitem(registry._registry, scheme, raising=False)
        entry = {"class": "no_such_backend.FileSystem", "err": "Please install the backend"}
        monkeypatch.setitem(registry.known_implementations, scheme, entry)


@pytest.mark.parametrize(("uri", "extra"), [("gs://b/out", "gcs"), ("az://c/out", "azure")])
def test_a_scheme_whose_extra_is_not_installed_names_the_extra(
    without_gcsfs_and_adlfs: None, uri: str, extra: str
) -> None:
    with pytest.raises(
        storage.MissingBackendError, match=rf"pip install 'fundus-batch\[{extra}\]'"
    ):
        storage.filesystem(uri)


@pytest.mark.parametrize(
    "args",
    [
        ["verify", "gs://b/out"],
        ["report", "az://c/out"],
        ["manifest", "from-dir", "gs://b/photos", "--out", "m.csv"],
        ["manifest", "validate", "gs://b/m.csv"],
    ],
)
def test_commands_on_a_scheme_whose_extra_is_missing_print_one_line_naming_it(
    without_gcsfs_and_adlfs: None, args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from fundus_batch.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    [line] = result.output.strip().splitlines()
    assert "storage is not installed: pip install 'fundus-batch[" in line, line
    assert "parse" not in line  # nothing was read
