"""The job path: a local head started with `ray start`, a job submitted through the Jobs API."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fundus_batch import jobs, outpaths
from fundus_batch.config import build_config
from fundus_batch.io import storage
from tests.pipeline_inputs import write_inputs

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A head node started the way a user would, stopped afterwards."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    # The job's `python` must be this environment's, as in an activated virtualenv.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, agent = _free_port(), _free_port(), _free_port()
    start = [
        ray_bin,
        "start",
        "--head",
        f"--port={gcs}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        # The session's own Ray (conftest) holds the agent's default port 52365; a second
        # agent on it never registers and every submit answers "No available agent".
        f"--dashboard-agent-listen-port={agent}",
        "--disable-usage-stats",
    ]
    done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    try:
        yield ray_bin, f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_regenerate_pairs_job_submitted_through_the_jobs_api(ray_head, tmp_path):
    ray_bin, address, env = ray_head
    manifest = write_inputs(tmp_path / "in", n_good=3, broken=True, size=320)
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(
        f"manifest: {manifest}\nout: {out}\nvariants: 2\nsize: 256\n"
        "progress: true\nray: {rows_per_block: 2}\n"
    )
    runtime_env = {"excludes": [".venv", ".git", "out", "demo-out", "*.egg-info"]}
    submit = [
        ray_bin,
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "jobs/regenerate_pairs.py",
        "--config",
        str(config),
    ]
    # The job server answers, and its agent takes jobs, a little after `ray start` returns
    # (longer on a loaded machine).
    not_ready = ("Connection", "No available agent")
    deadline = time.time() + 120
    while True:
        done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
        waiting = any(s in done.stderr for s in not_ready)
        if done.returncode == 0 or time.time() > deadline or not waiting:
            break
        time.sleep(2)
    log = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, log
    assert "succeeded" in (done.stdout + done.stderr).lower(), log
    summary = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith('{"out"')))
    assert summary["complete"] and summary["rows_in"] == 10
    # The job log holds the run's progress lines; Ray's own lines went to a file, copied into
    # OUT/logs so that it outlives the head node.
    assert "rows 10/10 100%" in done.stdout, log
    assert "Connecting to existing Ray cluster" not in done.stdout, log
    ray_log = Path(summary["ray_log"])
    assert ray_log.parent == out / "logs", summary
    assert "Connecting to existing Ray cluster" in ray_log.read_text()
    assert (summary["ok"], summary["failed"]) == (6, 4)
    df = pq.read_table(str(out / "pairs")).to_pandas()
    assert len(df) == 10 and not df.duplicated(["image_id", "variant"]).any()
    assert json.loads((out / "run.json").read_text())["state"] == "complete"


def test_job_script_rejects_a_bad_config_before_any_work(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("manifest: m.csv\nout: o\nvariants: zero\n")
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "regenerate_pairs.py"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "variants" in done.stderr


def _log_file(tmp_path: Path) -> Path:
    log = tmp_path / "node-tmp" / "ray-20261201T000000-42.log"
    log.parent.mkdir()
    log.write_text(
        "(raylet) a line only Ray's log holds\n"
        "GET https://b.s3.amazonaws.com/k?X-Amz-Signature=deadbeefcafe&X-Amz-Expires=60\n"
    )
    return log


def test_ray_log_is_copied_into_out_logs_on_local_disk(tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = build_config({"manifest": "m.csv", "out": str(out)}, "test")
    uri = jobs.keep_ray_log(config, _log_file(tmp_path))
    assert Path(uri) == out / "logs" / "ray-20261201T000000-42.log"
    text = Path(uri).read_text()
    assert "a line only Ray's log holds" in text
    assert "deadbeefcafe" not in text and "X-Amz-Signature" in text  # redacted, as every log


def test_ray_log_is_copied_into_out_logs_on_s3(tmp_path: Path, s3_server, s3_bucket) -> None:
    so = s3_server["storage_options"]
    out = f"s3://{s3_bucket}/run"
    config = build_config({"manifest": "m.csv", "out": out, "storage_options": so}, "test")
    uri = jobs.keep_ray_log(config, _log_file(tmp_path))
    assert uri == f"{out}/logs/ray-20261201T000000-42.log"
    assert b"a line only Ray's log holds" in storage.read_bytes(uri, storage_options=so)


def test_ray_log_is_not_written_through_a_symlinked_logs_folder(tmp_path: Path) -> None:
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.mkdir()
    (out / "logs").symlink_to(victim, target_is_directory=True)
    config = build_config({"manifest": "m.csv", "out": str(out)}, "test")
    with pytest.raises(outpaths.OutsideOutError, match="symbolic link"):
        jobs.keep_ray_log(config, _log_file(tmp_path))
    assert list(victim.iterdir()) == []


def _job_config(tmp_path: Path) -> Path:
    config = tmp_path / "job.yaml"
    config.write_text(f"manifest: m.csv\nout: {tmp_path / 'out'}\nprogress: false\n")
    return config


def test_a_run_refused_before_any_work_exits_2_with_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fundus_batch import pipeline
    from fundus_batch.run_settings import SettingsMismatchError

    def refuse(config, progress=None):  # type: ignore[no-untyped-def]
        raise SettingsMismatchError(str(config.out), ["seed: 0 -> 1"])

    monkeypatch.setattr(pipeline, "run", refuse)
    assert jobs.job_main(["--config", str(_job_config(tmp_path))], "test") == 2
    err = capsys.readouterr().err
    assert "error: " in err and "seed: 0 -> 1" in err and "Traceback" not in err


def test_a_run_that_fails_after_ray_started_still_keeps_its_ray_log_in_out(
    tmp_path: Path,
) -> None:
    # A process of its own: Ray's output is sent to a log file only on real descriptors.
    script = f"""
import os
from fundus_batch import jobs, pipeline

def fail(config, progress=None):
    os.write(2, b"(raylet) what went wrong\\n")  # lands in Ray's log file
    raise RuntimeError("worker died")

pipeline.run = fail
jobs.job_main(["--config", {str(_job_config(tmp_path))!r}], "test")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "RuntimeError: worker died" in done.stderr
    [kept] = (tmp_path / "out" / "logs").iterdir()
    assert "what went wrong" in kept.read_text()


@pytest.mark.parametrize("script", ["regenerate_pairs.py", "enhance_bucket.py"])
def test_ray_job_stop_exits_143_keeping_the_log_after_ray_took_over_sigterm(
    tmp_path: Path, script: str
) -> None:
    """``ray job stop`` sends SIGTERM; once ``ray.init`` has replaced the handler by
    ``sys.exit(15)`` the job exited 15 with a traceback. It exits 143 like the CLI, its run's
    cleanup done and its Ray log kept in OUT."""
    path = Path(__file__).resolve().parents[1] / "jobs" / script
    code = f"""
import os, runpy, signal, sys
from fundus_batch import pipeline

def run(config, progress=None):
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(15))  # what ray.init installs
    os.write(2, b"(raylet) started\\n")
    try:
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        open({str(tmp_path / "cleaned")!r}, "w").close()

pipeline.run = run
sys.argv = ["job", "--config", {str(_job_config(tmp_path))!r}]
runpy.run_path({str(path)!r}, run_name="__main__")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("interrupted (SIGTERM): ")
    assert "Traceback" not in done.stderr
    assert (tmp_path / "cleaned").exists()
    [kept] = (tmp_path / "out" / "logs").iterdir()
    assert "started" in kept.read_text()


def test_a_run_that_fails_before_ray_wrote_anything_warns_of_no_missing_log(tmp_path: Path) -> None:
    script = f"""
from fundus_batch import jobs, pipeline

def fail(config, progress=None):
    raise RuntimeError("worker died")  # before Ray wrote anything: its log is removed

pipeline.run = fail
jobs.job_main(["--config", {str(_job_config(tmp_path))!r}], "test")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "RuntimeError: worker died" in done.stderr
    assert "log stays at" not in done.stderr
    assert not (tmp_path / "out" / "logs").exists()


def test_the_json_summary_says_how_many_ok_rows_passed_the_quality_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fundus_batch import pipeline
    from fundus_batch.quality import GateCounts

    def run(config, progress=None):  # type: ignore[no-untyped-def]
        gate = GateCounts(1, 4, {"nr_luminance_clean >= 40": 3, "fov_r > 10": 1})
        return pipeline.RunSummary(str(config.out), 4, 0, 4, 0, quality=gate)

    monkeypatch.setattr(pipeline, "run", run)
    config = _job_config(tmp_path)
    config.write_text(config.read_text() + "min_quality: nr_luminance_clean >= 40\n")
    assert jobs.job_main(["--config", str(config)], "test") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["quality_gate"] == {
        "passed": 1,
        "judged": 4,
        "most_broken": {"term": "nr_luminance_clean >= 40", "rows": 3},
        "text": "quality gate: 1 of 4 ok rows passed "
        "(most broken: nr_luminance_clean >= 40, 3 rows)",
    }
    monkeypatch.setattr(
        pipeline, "run", lambda config, progress=None: pipeline.RunSummary("o", 1, 0, 1, 0)
    )
    assert jobs.job_main(["--config", str(_job_config(tmp_path))], "test") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["quality_gate"] is None
