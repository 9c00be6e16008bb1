"""One writer per OUT: the lease file, its refusal message, expiry, takeover and renewal;
two runs started at once write each (image, variant) once; duplicates are repaired."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fundus_batch.cli import main
from fundus_batch.lease import LEASE_FILE, LeaseHeldError, LeaseInfo, LeaseLostError, OutLease
from fundus_batch.output import OutputStore
from fundus_batch.verify import verify
from tests.pipeline_inputs import write_inputs

REPO = Path(__file__).resolve().parents[1]


def _lease_json(out: Path) -> dict:
    return json.loads((out / LEASE_FILE).read_text())


# ------------------------------------------------------------------------------ local disk


def test_lease_is_created_exclusively_and_a_second_writer_is_refused_naming_the_holder(tmp_path):
    first = OutLease(str(tmp_path / "out"))
    first.acquire()
    try:
        assert _lease_json(tmp_path / "out")["owner"] == first.token
        second = OutLease(str(tmp_path / "out"))
        with pytest.raises(LeaseHeldError) as err:
            second.acquire(wait=0)
        message = str(err.value)
        assert f"host {socket.gethostname()}" in message and f"pid {os.getpid()}" in message
        assert "since 20" in message and "--wait-for-lease" in message
        assert err.value.holder is not None and err.value.holder.owner == first.token
        assert _lease_json(tmp_path / "out")["owner"] == first.token  # untouched
    finally:
        first.release()
    assert not (tmp_path / "out" / LEASE_FILE).exists()


def test_release_lets_the_next_writer_in_and_a_waiting_writer_gets_it(tmp_path):
    out = str(tmp_path / "out")
    first = OutLease(out)
    first.acquire()
    threading.Timer(0.5, first.release).start()
    second = OutLease(out)
    t0 = time.monotonic()
    second.acquire(wait=10, poll=0.1)
    assert 0.4 < time.monotonic() - t0 < 5
    assert _lease_json(tmp_path / "out")["owner"] == second.token
    second.release()


def test_expired_lease_is_taken_over_and_its_old_holder_stops_writing(tmp_path):
    out = str(tmp_path / "out")
    now = [1000.0]
    old = OutLease(out, ttl=60, renew_every=10, clock=lambda: now[0])
    old.acquire()
    old._stop.set()  # a killed driver renews nothing
    now[0] += 60 + 5.5  # past the expiry and the takeover grace (5 s of clock skew)
    new = OutLease(out, ttl=60, renew_every=10, clock=lambda: now[0])
    new.acquire(wait=0)
    try:
        assert new.took_over is not None and new.took_over.owner == old.token
        assert _lease_json(tmp_path / "out")["owner"] == new.token
        with pytest.raises(LeaseLostError):
            old.ensure()  # its own expiry has passed
        old.renew()  # finds another owner: marked lost, never overwrites
        with pytest.raises(LeaseLostError, match="held by host"):
            old.ensure()
        old.release()  # must not delete the new holder's lease
        assert _lease_json(tmp_path / "out")["owner"] == new.token
        new.ensure()
    finally:
        new.release()


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    out = tmp_path / "out"
    code = (
        "import os, sys; from fundus_batch.lease import OutLease; "
        "OutLease(sys.argv[1]).acquire(); print(os.getpid(), flush=True); os._exit(0)"
    )  # a driver killed while it held the lease
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    dead_pid = int(proc.stdout)
    assert _lease_json(out)["pid"] == dead_pid
    lease = OutLease(str(out))
    lease.acquire(wait=0)
    assert lease.took_over is not None and lease.took_over.pid == dead_pid
    lease.release()


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="Linux PID namespaces only")
def test_a_same_host_lease_of_another_pid_namespace_is_not_taken_over_early(tmp_path):
    """A container sharing this hostname (host networking) records a pid of its own PID
    namespace: that it is not alive here proves nothing."""
    out = tmp_path / "out"
    out.mkdir()
    now = time.time()
    info = LeaseInfo(
        "other-container", socket.gethostname(), _dead_pid(), now, now, now + 3600,
        boot_id=_boot_id(), pid_namespace="pid:[1]",
    )  # fmt: skip
    (out / LEASE_FILE).write_bytes(info.to_bytes())
    with pytest.raises(LeaseHeldError):
        OutLease(str(out)).acquire(wait=0)
    assert _lease_json(out)["owner"] == "other-container"


def test_a_same_host_lease_that_records_no_namespace_is_not_taken_over_early(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    now = time.time()
    info = LeaseInfo("old-format", socket.gethostname(), _dead_pid(), now, now, now + 3600)
    (out / LEASE_FILE).write_bytes(info.to_bytes())
    with pytest.raises(LeaseHeldError):
        OutLease(str(out)).acquire(wait=0)


def _free_pid() -> int:
    """A pid no process has here (high, so that nothing takes it in the meantime)."""
    top = int(Path("/proc/sys/kernel/pid_max").read_text())
    return next(n for n in range(top - 1, 300, -1) if not os.path.exists(f"/proc/{n}"))


@pytest.mark.skipif(
    shutil.which("unshare") is None
    or subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True
    ).returncode,
    reason="cannot create a PID namespace here",
)
def test_a_live_holder_in_another_pid_namespace_keeps_its_lease(tmp_path):
    """A real holder in its own PID namespace, same hostname, with a pid that no process has
    in this namespace: it is alive and its lease must stay."""
    out = tmp_path / "out"
    pid = _free_pid()
    holder = (
        "import sys; from fundus_batch.lease import OutLease; "
        "lease = OutLease(sys.argv[1]); lease.acquire(); print(lease.pid, flush=True); "
        "sys.stdin.read(); lease.release()"
    )
    # the holder gets the pid after ns_last_pid in its namespace: one that is free out here
    script = (
        f"echo {pid - 1} > /proc/sys/kernel/ns_last_pid && "
        f'{shlex.quote(sys.executable)} -c "{holder}" {shlex.quote(str(out))}'
    )
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        if not line:
            pytest.skip("the holder could not start in its own PID namespace")
        inner_pid = int(line)
        if os.path.exists(f"/proc/{inner_pid}"):
            pytest.skip(f"pid {inner_pid} happens to be alive here too")
        info = LeaseInfo.from_bytes((out / LEASE_FILE).read_bytes())
        assert info is not None and info.host == socket.gethostname() and info.pid == inner_pid
        with pytest.raises(LeaseHeldError):
            OutLease(str(out)).acquire(wait=0)
        assert _lease_json(out)["pid"] == inner_pid
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)
    assert not (out / LEASE_FILE).exists()  # the holder released it


def test_a_live_lease_of_another_host_is_not_taken_over_before_it_expires(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    now = time.time()
    info = LeaseInfo("other", "another-host", 1, now, now, now + 3600)
    (out / LEASE_FILE).write_bytes(info.to_bytes())
    with pytest.raises(LeaseHeldError, match="host another-host, pid 1"):
        OutLease(str(out)).acquire(wait=0.3, poll=0.1)
    assert _lease_json(out)["owner"] == "other"


def test_renewal_keeps_the_lease_alive_past_its_ttl(tmp_path):
    out = str(tmp_path / "out")
    lease = OutLease(out, ttl=1.0, renew_every=0.2)
    lease.acquire()
    try:
        first_expiry = _lease_json(tmp_path / "out")["expires"]
        time.sleep(1.6)
        lease.ensure()
        info = _lease_json(tmp_path / "out")
        assert info["owner"] == lease.token and info["expires"] > first_expiry + 1.0
        assert info["expires"] > time.time()
        with pytest.raises(LeaseHeldError):
            OutLease(out, ttl=1.0, renew_every=0.2).acquire(wait=0)
    finally:
        lease.release()


def test_commits_are_refused_once_less_than_the_safety_margin_is_left(tmp_path):
    now = [1000.0]
    lease = OutLease(str(tmp_path / "out"), ttl=60, renew_every=10, clock=lambda: now[0])
    lease.acquire()
    lease._stop.set()  # renewals failing
    try:
        now[0] = 1044.0
        lease.ensure()
        now[0] = 1046.0  # the lease is valid for 14 s more: too little for a commit
        with pytest.raises(LeaseLostError, match="too close to its expiry"):
            lease.ensure()
        assert lease.commit_margin == 15.0  # max(renew_every, ttl / 4)
        assert lease.commit_deadline() == 1060.0  # a commit must land by the expiry
        assert lease.remaining() == pytest.approx(14.0)
    finally:
        lease.release()


def test_a_taker_waits_a_clock_skew_grace_after_the_expiry(tmp_path):
    out = str(tmp_path / "out")
    now = [1000.0]
    old = OutLease(out, ttl=60, renew_every=10, clock=lambda: now[0])
    old.acquire()
    old._stop.set()
    new = OutLease(out, ttl=60, renew_every=10, clock=lambda: now[0], max_clock_skew=5.0)
    now[0] = 1061.0  # expired 1 s ago on this clock; the old holder's may be behind
    with pytest.raises(LeaseHeldError, match="expired 1 s ago"):
        new.acquire(wait=0)
    assert _lease_json(tmp_path / "out")["owner"] == old.token
    now[0] = 1065.5
    new.acquire(wait=0)
    try:
        assert new.took_over is not None and new.took_over.owner == old.token
    finally:
        new.release()


def test_renewal_never_revives_a_lease_that_expired_on_this_clock(tmp_path):
    """Renewals failed until past the expiry (an outage): a taker may hold it by now, so a
    late renewal must not extend it even though nobody replaced it yet."""
    now = [1000.0]
    lease = OutLease(str(tmp_path / "out"), ttl=60, renew_every=10, clock=lambda: now[0])
    lease.acquire()
    lease._stop.set()
    now[0] = 1061.0
    lease.renew()
    assert _lease_json(tmp_path / "out")["expires"] == 1060.0
    with pytest.raises(LeaseLostError, match="expired before it could be renewed"):
        lease.ensure()
    now[0] = 1000.0  # even once the clock looks fine again
    with pytest.raises(LeaseLostError):
        lease.ensure()
    lease.release()


def test_release_after_the_lease_expired_locally_leaves_it_alone(tmp_path):
    """Once its own clock is past the expiry a run may no longer own the lease: it does not
    delete it (it expires on its own)."""
    now = [1000.0]
    lease = OutLease(str(tmp_path / "out"), ttl=60, renew_every=10, clock=lambda: now[0])
    lease.acquire()
    lease._stop.set()
    now[0] += 61
    lease.release()
    assert _lease_json(tmp_path / "out")["owner"] == lease.token
    assert not lease.held


def _race(out: str, start: float, queue: mp.Queue, done: threading.Event) -> None:
    lease = OutLease(out, ttl=60, renew_every=10)
    while time.time() < start:
        time.sleep(0.001)
    try:
        lease.acquire(wait=0)
    except LeaseHeldError:
        queue.put(None)
        return
    queue.put(lease.token)
    done.wait(60)  # hold it until every process has tried
    lease.release()


@pytest.mark.parametrize("takeover", [False, True], ids=["fresh", "expired"])
def test_exactly_one_of_many_processes_racing_for_the_lease_wins(tmp_path, takeover):
    out = tmp_path / "out"
    out.mkdir()
    if takeover:
        info = LeaseInfo("expired-owner", "another-host", 1, 0.0, 0.0, 1.0)
        (out / LEASE_FILE).write_bytes(info.to_bytes())
    ctx = mp.get_context("fork")
    queue, done = ctx.Queue(), ctx.Event()
    start = time.time() + 1.5
    procs = [ctx.Process(target=_race, args=(str(out), start, queue, done)) for _ in range(6)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    done.set()
    for p in procs:
        p.join(timeout=30)
    winners = [r for r in results if r is not None]
    assert len(winners) == 1, results


def _leased_writer(out: Path, shard_rows: int):
    """A shard writer bound to a held lease of ``out`` that is never renewed, and the clock
    (a one-item list of seconds) its lease reads."""
    from fundus_batch.output import ShardWriter

    now = [1000.0]
    lease = OutLease(str(out), clock=lambda: now[0])
    lease.acquire()
    lease._stop.set()
    writer = ShardWriter(OutputStore(str(out)), pa.schema([("image_id", pa.string())]), shard_rows)
    writer.before_commit = lease.ensure
    return writer, now


def test_a_lost_lease_stops_the_shard_writer_before_it_commits(tmp_path):
    writer, now = _leased_writer(tmp_path / "out", shard_rows=1)
    now[0] += 120
    with pytest.raises(LeaseLostError):
        writer.add(pa.table({"image_id": ["a"]}))
    assert not list((tmp_path / "out").glob("pairs/*.parquet"))


def test_salvage_commits_buffered_rows_but_never_after_a_commit_failed(tmp_path):
    """A stop may keep the rows a writer buffers; a writer whose lease is gone must not try."""
    writer, now = _leased_writer(tmp_path / "out", shard_rows=2)
    writer.add(pa.table({"image_id": ["a"]}))
    assert writer.salvage() == 1 and len(writer.shards) == 1
    now[0] += 120
    with pytest.raises(LeaseLostError):
        writer.add(pa.table({"image_id": ["b", "c", "d"]}))
    writer.before_commit = None  # even a writer that could commit now does not try
    assert writer.salvage() == 0 and len(writer.shards) == 1


def test_generic_filesystems_refuse_a_second_writer_too():
    root = f"memory://lease-test-{os.getpid()}-{time.monotonic_ns()}/out"
    first = OutLease(root)
    first.acquire()
    try:
        with pytest.raises(LeaseHeldError, match="pid"):
            OutLease(root).acquire(wait=0)
    finally:
        first.release()
    again = OutLease(root)
    again.acquire()
    again.release()


def test_s3_lease_uses_conditional_puts(s3_server, s3_bucket):
    so = s3_server["storage_options"]
    root = f"s3://{s3_bucket}/out"
    now = [1000.0]
    first = OutLease(root, so, clock=lambda: now[0])
    first.acquire()
    first._stop.set()
    with pytest.raises(LeaseHeldError, match="host"):
        OutLease(root, so, clock=lambda: now[0]).acquire(wait=0)
    first.renew()  # If-Match on its own ETag succeeds
    first.ensure()
    now[0] += 60 + 5.5  # past the expiry and the takeover grace
    second = OutLease(root, so, clock=lambda: now[0])
    second.acquire(wait=0)  # If-Match on the expired lease's ETag
    assert second.took_over is not None and second.took_over.owner == first.token
    first.renew()  # its ETag is stale now: the PUT is refused and it knows it lost
    with pytest.raises(LeaseLostError):
        first.ensure()
    assert second.holder() is not None and second.holder().owner == second.token
    second.release()
    assert second.holder() is None


def test_an_output_bucket_that_does_not_exist_is_named_as_the_output(s3_server):
    from fundus_batch.lease import LeaseError

    root = "s3://no-such-bucket-fb/out"
    with pytest.raises(
        LeaseError, match=r"cannot take the lease on output s3://no-such-bucket-fb/out"
    ):
        OutLease(root, s3_server["storage_options"]).acquire(wait=0)


# ---------------------------------------------------------------------------- duplicates


def _shard(path: Path, ids: list[str], variants: list[int], status: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "image_id": ids,
            "variant": pa.array(variants, pa.int32()),
            "status": status,
            "failed_stage": [None if s == "ok" else "fetch" for s in status],
            "tag": [path.stem] * len(ids),
        }
    )
    pq.write_table(table, path)


def test_drop_duplicates_keeps_one_row_per_pair_preferring_ok(tmp_path):
    pairs = tmp_path / "out" / "pairs"
    _shard(pairs / "part-a.parquet", ["x", "y", "z"], [0, 0, 0], ["failed", "ok", "ok"])
    _shard(pairs / "part-b.parquet", ["x", "y"], [0, 0], ["ok", "ok"])
    _shard(pairs / "part-c.parquet", ["z"], [0], ["ok"])
    store = OutputStore(str(tmp_path / "out"))
    assert store.drop_duplicates() == 3
    df = store.read_table().to_pandas().set_index("image_id")
    assert sorted(df.index) == ["x", "y", "z"]
    assert df.loc["x", "status"] == "ok" and df.loc["x", "tag"] == "part-b"
    assert df.loc["y", "tag"] == "part-a" and df.loc["z", "tag"] == "part-a"
    assert not (pairs / "part-c.parquet").exists()  # emptied shards are removed
    assert store.drop_duplicates() == 0


@pytest.mark.parametrize("intact_status", ["ok", "failed"])
def test_drop_duplicates_keeps_the_copy_whose_checksum_holds(tmp_path, intact_status):
    """An ok copy edited after its checksum was taken cannot be trusted as ok: the intact copy
    is kept, a failed one too."""
    from fundus_batch.schema import with_row_checksums

    pairs = tmp_path / "out" / "pairs"
    for name, status in (("part-a", "ok"), ("part-b", intact_status)):
        path = pairs / f"{name}.parquet"
        _shard(path, ["x"], [0], [status])
        pq.write_table(with_row_checksums(pq.read_table(path)), path)
    # the copy that sorts first was edited after its checksum was taken
    first = pq.read_table(pairs / "part-a.parquet")
    edited = first.set_column(first.schema.get_field_index("tag"), "tag", pa.array(["edited"]))
    pq.write_table(edited, pairs / "part-a.parquet")
    store = OutputStore(str(tmp_path / "out"))
    assert store.drop_duplicates() == 1
    kept = store.read_table().to_pylist()
    assert [(r["tag"], r["status"]) for r in kept] == [("part-b", intact_status)]


def test_drop_duplicates_keeps_the_row_a_redo_completed(tmp_path):
    """A run that redid a pair with metrics added, stopped before it dropped the old row:
    the next run keeps the row with the metrics, not the older one that sorts first."""
    from fundus_batch.schema import with_row_checksums

    pairs = tmp_path / "out" / "pairs"
    for name, version in (("part-a", None), ("part-b", "fb-metrics-1")):
        path = pairs / f"{name}.parquet"
        _shard(path, ["x"], [0], ["ok"])
        table = pq.read_table(path).append_column(
            "metric_version", pa.array([version], pa.string())
        )
        pq.write_table(with_row_checksums(table), path)
    store = OutputStore(str(tmp_path / "out"))
    assert store.drop_duplicates() == 1
    assert [r["tag"] for r in store.read_table().to_pylist()] == ["part-b"]


# ------------------------------------------------------------------- two runs at once


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fundus_batch", *args]


@pytest.fixture(scope="module")
def concurrent_runs(tmp_path_factory):
    """The same `degrade` command started twice at once on one OUT, as a resubmitted job."""
    base = tmp_path_factory.mktemp("concurrent")
    manifest = write_inputs(base / "in", n_good=3, broken=True)
    out = base / "out"
    args = _cli(
        "degrade",
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--variants",
        "2",
        "--size",
        "128",
        "--seed",
        "5",
        "--wait-for-lease",
        "600",
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    procs = [
        subprocess.Popen(args, cwd=base, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    return manifest, out, [p.returncode for p in procs], outputs


def test_two_runs_started_at_once_write_every_pair_exactly_once(concurrent_runs):
    manifest, out, codes, outputs = concurrent_runs
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    df = pq.read_table(str(out / "pairs")).to_pandas()
    assert len(df) == 5 * 2 and not df.duplicated(["image_id", "variant"]).any()
    assert sorted(df.groupby("status").size().items()) == [("failed", 4), ("ok", 6)]
    # one did the work, the other waited and found nothing left
    assert sorted(o.count("done before     10") for o in outputs) == [0, 1]
    report = verify(str(out), str(manifest))
    assert report.ok, report.summary()
    history = json.loads((out / "run.json").read_text())["history"]
    assert len(history) == 1 and history[0]["state"] == "complete"
    assert not (out / LEASE_FILE).exists()


def _inject_duplicates(out: Path) -> int:
    """Copy every row into a second shard, the copies of ok rows marked failed, under a name
    that sorts first, as two unleased runs left them."""
    table = pq.read_table(str(out / "pairs"))
    status = pa.array(["failed"] * table.num_rows)
    dup = table.set_column(table.schema.get_field_index("status"), "status", status)
    pq.write_table(dup, out / "pairs" / "part-00000000T000000-1-00000.parquet")
    return table.num_rows


def test_verify_repair_removes_duplicates_keeping_ok_rows(concurrent_runs):
    manifest, out, codes, _ = concurrent_runs
    assert codes == [0, 0]
    before = pq.read_table(str(out / "pairs")).to_pandas().set_index(["image_id", "variant"])
    n = _inject_duplicates(out)
    assert verify(str(out), str(manifest)).duplicate_rows == n
    result = CliRunner().invoke(main, ["verify", str(out), "--manifest", str(manifest), "--repair"])
    assert result.exit_code == 0, result.output
    assert f"removed {n} duplicate row(s)" in result.output and "verify" in result.output
    after = pq.read_table(str(out / "pairs")).to_pandas().set_index(["image_id", "variant"])
    assert len(after) == n and after.status.sort_index().equals(before.status.sort_index())
    assert verify(str(out), str(manifest)).ok


def test_the_next_run_repairs_duplicates_instead_of_staying_incomplete(concurrent_runs):
    manifest, out, codes, _ = concurrent_runs
    assert codes == [0, 0]
    n = _inject_duplicates(out)
    result = CliRunner().invoke(
        main,
        [
            "degrade",
            "--manifest",
            str(manifest),
            "--out",
            str(out),
            "--variants",
            "2",
            "--size",
            "128",
            "--seed",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    df = pd.concat(pq.read_table(p).to_pandas() for p in (out / "pairs").glob("*.parquet"))
    assert len(df) == n and not df.duplicated(["image_id", "variant"]).any()
    assert verify(str(out), str(manifest)).ok


def test_a_shard_that_lands_after_the_lease_ended_is_removed_and_the_run_stops(tmp_path):
    """Another run may hold OUT by then: the late shard would duplicate its rows."""
    from fundus_batch.output import LateCommitError, ShardWriter
    from fundus_batch.schema import output_schema, to_table

    writer = ShardWriter(OutputStore(str(tmp_path)), output_schema(), shard_rows=1)
    writer.time_left = lambda: 0.0  # asked once the write is done: it finished past the deadline
    with pytest.raises(LateCommitError, match="landed after this run's lease ended"):
        writer.add(to_table([{"image_id": "a", "variant": 0, "status": "ok"}], output_schema()))
    assert writer.shards == [] and not list((tmp_path / "pairs").glob("*.parquet"))
