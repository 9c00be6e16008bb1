"""The console of a run: the progress bar, and Ray's output kept out of it unless verbose."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

from fundus_batch.console import ProgressBar

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bar_shows_zero_of_total_as_soon_as_the_work_starts():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(stream, tty=False, clock=clock, ticker=False)
    bar.update(0, 80)
    assert stream.getvalue().startswith("rows 0/80 ")
    assert "ETA -" in stream.getvalue()


def test_rate_and_eta_count_from_the_first_block_not_from_ray_start_up():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(stream, tty=False, clock=clock, ticker=False)
    bar.update(0, 80)
    clock.now += 10.0  # Ray starting, the first block in flight
    bar.update(16, 80)
    clock.now += 4.0
    bar.update(48, 80)
    line = bar.line(clock.now)
    assert "rows 48/80" in line and " 60% " in line
    assert "8.0 rows/s" in line  # 32 rows in the 4 s after the first block
    assert "ETA 0:04" in line and "elapsed 0:14" in line
    bar.close()
    assert stream.getvalue().splitlines()[-1].startswith("rows 48/80")


def test_bar_says_done_when_every_row_is_in():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(stream, tty=False, clock=clock, ticker=False)
    bar.update(0, 4)
    clock.now += 1
    bar.update(4, 4)
    bar.close()
    assert stream.getvalue().splitlines()[-1].startswith("rows 4/4 100% [" + "#" * 24 + "]")
    assert "done" in stream.getvalue().splitlines()[-1]


def test_on_a_terminal_the_bar_redraws_one_line_in_place():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(stream, tty=True, clock=clock, ticker=False)
    bar.update(0, 10)
    bar.update(5, 10)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\n")


def test_elsewhere_the_bar_prints_a_line_every_few_seconds_while_waiting():
    stream = io.StringIO()
    bar = ProgressBar(stream, tty=False, every=0.05)
    bar.update(0, 10)
    deadline = time.monotonic() + 10
    while stream.getvalue().count("\n") < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 4 and all(line.startswith("rows 0/10") for line in lines)


def test_nothing_is_printed_when_the_work_never_starts():
    stream = io.StringIO()
    ProgressBar(stream, tty=False).close()
    assert stream.getvalue() == ""


SCRIPT = """
import logging, os, sys, warnings
from fundus_batch.console import ray_output

with ray_output(verbose={verbose}) as console:
    os.write(2, b"E core_worker.cc: native noise\\n")
    os.write(1, b"(MapWorker pid=1) forwarded worker output\\n")
    print("python noise", file=sys.stderr)
    warnings.warn("deprecated noise")
    logging.getLogger("ray.data").warning("ray data noise")
    logging.getLogger("fundus_batch.pipeline").warning("our warning")
    console.stream.write("rows 0/4\\n")
    path = console.log_path
print("after the run; log:", path)
"""
NOISE = ("native noise", "python noise", "deprecated noise", "ray data noise")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter whose stdout and stderr are real file descriptors."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def _run_script(verbose: bool) -> subprocess.CompletedProcess[str]:
    return _python(SCRIPT.format(verbose=verbose))


def test_ray_output_goes_to_a_log_file_and_ours_to_the_console():
    proc = _run_script(verbose=False)
    assert "rows 0/4" in proc.stderr and "our warning" in proc.stderr
    assert "noise" not in proc.stdout + proc.stderr
    assert "forwarded" not in proc.stdout + proc.stderr
    after = proc.stdout.strip().splitlines()[-1]
    assert after.startswith("after the run; log: ")  # the descriptors are restored
    log = Path(after.split("log: ", 1)[1])
    log_text = log.read_text()
    log.unlink()
    for needle in (*NOISE, "forwarded worker output"):
        assert needle in log_text, needle
    assert "our warning" not in log_text and "rows 0/4" not in log_text


def test_verbose_leaves_ray_output_on_the_console():
    proc = _run_script(verbose=True)
    for needle in (*NOISE, "our warning", "rows 0/4"):
        assert needle in proc.stderr, needle
    assert "forwarded worker output" in proc.stdout
    assert proc.stdout.strip().endswith("log: None")


RUN_SCRIPT = """
import os, sys
from fundus_batch.console import run_on_console

def run(progress):
    if {noisy}:
        os.write(2, b"ray noise\\n")
    progress(0, 2)
    progress(2, 2)
    if {fail}:
        raise RuntimeError("the run failed")
    return "result"

try:
    result, log = run_on_console(run, verbose=False, progress=True, say=print)
    print("returned", result, log)
except RuntimeError as exc:
    print("raised", exc)
"""


def _run_on_console(*, noisy: bool, fail: bool) -> subprocess.CompletedProcess[str]:
    return _python(RUN_SCRIPT.format(noisy=noisy, fail=fail))


def test_run_on_console_shows_the_bar_and_names_the_log_only_when_ray_wrote_one():
    noisy = _run_on_console(noisy=True, fail=False)
    assert "rows 2/2 100%" in noisy.stderr and "ray noise" not in noisy.stderr
    log = Path(noisy.stdout.split("returned result ", 1)[1].strip())
    assert log.read_text() == "ray noise\n"
    log.unlink()
    quiet = _run_on_console(noisy=False, fail=False)
    assert quiet.stdout.strip() == "returned result None"  # the empty log file is removed


def test_run_on_console_says_where_ray_output_went_when_the_run_fails():
    proc = _run_on_console(noisy=True, fail=True)
    said, raised = proc.stdout.strip().splitlines()[-2:]
    assert said.startswith("Ray's output: ") and raised == "raised the run failed"
    log = Path(said.removeprefix("Ray's output: "))
    assert log.read_text() == "ray noise\n"
    log.unlink()
