"""The console of a run: the progress bar, and Ray's output kept out of it unless verbose."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fundus_batch import console
from fundus_batch.console import Console, ProgressBar, _ConsoleHandler

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


def test_rate_and_final_line_stay_as_at_the_last_row_through_ray_shutdown():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(stream, tty=False, clock=clock, ticker=False)
    bar.update(0, 12)
    clock.now += 10.0
    bar.update(4, 12)
    clock.now += 0.5
    bar.update(12, 12)  # 8 rows in 0.5 s
    clock.now += 30.0  # Ray shutting down, the final count pass
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[-1].endswith("16.0 rows/s  done  elapsed 0:10")
    assert sum("done" in line for line in lines) == 1


def test_the_ticker_stops_redrawing_once_every_row_is_in():
    stream = io.StringIO()
    bar = ProgressBar(stream, tty=False, every=0.02)
    bar.update(0, 2)
    bar.update(2, 2)
    time.sleep(0.3)
    bar.close()
    assert sum("done" in line for line in stream.getvalue().splitlines()) == 1


def _screen(text: str) -> list[str]:
    """What a terminal shows after ``text``: each ``\r`` returns to the line's start."""
    lines = []
    for raw in text.split("\n"):
        shown = ""
        for part in raw.split("\r"):
            shown = part + shown[len(part) :]
        lines.append(shown.rstrip())
    return lines


@pytest.mark.parametrize("columns", [40, 60, 80])
def test_on_a_terminal_the_bar_fits_its_width_so_redraws_never_wrap(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(stream, tty=True, clock=clock, ticker=False)
    bar.update(0, 246_519)
    for i in range(1, 4):
        clock.now += 60.0
        bar.update(1000 * i, 246_519)
    bar.close()
    drawn = stream.getvalue().replace("\n", "\r").split("\r")
    assert max(len(part) for part in drawn) <= columns - 1
    assert _screen(stream.getvalue())[0].startswith("rows 3000/246519 ")


class TerminalStream(io.StringIO):
    def fileno(self) -> int:
        return 2


def test_a_terminal_that_reports_no_width_gets_80_columns_not_an_empty_bar(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    size = os.terminal_size((0, 0))  # a pseudo-terminal nobody sized, as under `script`
    monkeypatch.setattr(os, "get_terminal_size", lambda *fd: size)
    stream, clock = TerminalStream(), FakeClock()
    bar = ProgressBar(stream, tty=True, clock=clock, ticker=False)
    bar.update(0, 10)
    bar.close()
    assert _screen(stream.getvalue())[0] == bar.line(clock.now)


def test_a_wide_terminal_gets_the_whole_bar(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(stream, tty=True, clock=clock, ticker=False)
    bar.update(0, 10)
    bar.close()
    assert _screen(stream.getvalue())[0] == bar.line(clock.now)


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_warning_logged_under_the_bar_gets_a_line_of_its_own_with_its_level():
    stream = TtyStream()
    handler = _ConsoleHandler(stream)
    bar = Console(stream, handler=handler).progress_bar()
    bar.update(0, 10)
    record = logging.LogRecord("fundus_batch.lease", logging.WARNING, "", 0, "lease lost", (), None)
    handler.handle(record)
    bar.update(5, 10)
    bar.close()
    screen = _screen(stream.getvalue())
    assert screen[0] == "WARNING lease lost"
    assert screen[1].startswith("rows 5/10 ") and screen[2:] == [""]


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
    assert said.startswith("ray log ") and raised == "raised the run failed"
    log = Path(said.removeprefix("ray log ").strip())
    assert log.read_text() == "ray noise\n"
    log.unlink()


def _python_in(tmp: Path, code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter whose temporary folder is ``tmp``."""
    env = {**os.environ, "TMPDIR": str(tmp)}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _our_folder(tmp: Path) -> Path:
    return tmp / f"fundus-batch-logs-{os.getuid()}"


def test_log_files_go_to_a_private_folder_of_this_user_and_are_private(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "fundus-batch-logs").mkdir(mode=0o700)  # another user's, in older versions
    os.chmod(tmp_path / "fundus-batch-logs", 0o500)
    fd, path = console._open_log()
    os.close(fd)
    assert path.parent == _our_folder(tmp_path)
    assert _our_folder(tmp_path).stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    fd, second = console._open_log()  # same process, same second: a new file all the same
    os.close(fd)
    assert second != path


@pytest.mark.parametrize("taken_by", ["file", "open folder", "link", "other user"])
def test_a_log_folder_name_taken_by_anything_else_is_refused(tmp_path, monkeypatch, taken_by):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = _our_folder(tmp_path)
    if taken_by == "file":
        folder.write_text("")
    elif taken_by == "open folder":
        folder.mkdir()
        os.chmod(folder, 0o755)
    elif taken_by == "link":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        folder.symlink_to(tmp_path / "elsewhere")
    else:
        if os.getuid() != 0:
            pytest.skip("making a folder of another user needs root")
        folder.mkdir(mode=0o700)
        os.chown(folder, 65534, 65534)
    with pytest.raises(PermissionError, match="only this user"):
        console._open_log()


def test_without_a_log_file_ray_output_stays_on_the_console_and_a_warning_says_so(tmp_path):
    _our_folder(tmp_path).write_text("")  # the name taken: no log file can be made
    proc = _python_in(tmp_path, SCRIPT.format(verbose=False))
    assert proc.returncode == 0, proc.stderr
    assert "WARNING Ray's output stays on the console" in proc.stderr
    for needle in (*NOISE, "our warning", "rows 0/4"):
        assert needle in proc.stderr, needle
    assert proc.stdout.strip().endswith("log: None")


ABRUPT_SCRIPT = """
import os
from fundus_batch.console import run_on_console

def run(progress):
    progress(0, 2)
    os.write(2, b"raylet died\\n")
    os._exit(1)  # as Ray's C++ core ends the process, no except or finally runs

run_on_console(run, verbose=False, progress={progress}, say=print)
"""


@pytest.mark.parametrize("progress", [True, False])
def test_the_log_is_named_when_the_work_starts_so_an_abrupt_exit_still_names_it(tmp_path, progress):
    proc = _python_in(tmp_path, ABRUPT_SCRIPT.format(progress=progress))
    assert proc.returncode == 1
    first = proc.stderr.splitlines()[0]
    assert first.startswith("ray log ")
    assert Path(first.removeprefix("ray log ").strip()).read_text() == "raylet died\n"


REFUSED_SCRIPT = """
from fundus_batch.console import run_on_console

def run(progress):
    raise ValueError("refused before Ray starts")

try:
    run_on_console(run, verbose=False, progress=True, say=print)
except ValueError as exc:
    print("raised", exc)
"""


def test_a_run_refused_before_ray_starts_leaves_no_empty_log_and_names_none(tmp_path):
    for _ in range(2):
        proc = _python_in(tmp_path, REFUSED_SCRIPT)
        assert proc.stdout.strip() == "raised refused before Ray starts"
        assert "ray log" not in proc.stderr
    assert list(tmp_path.rglob("*.log")) == []


SIGTERM_SCRIPT = """
import os, signal, time
from fundus_batch.console import interrupted_exit_code, sigterm_raises

before = signal.getsignal(signal.SIGTERM)
try:
    with sigterm_raises():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        finally:
            print("cleanup ran")
except SystemExit as exc:
    print("exit", interrupted_exit_code(exc))
print("handler restored", signal.getsignal(signal.SIGTERM) is before)
"""


def test_sigterm_within_sigterm_raises_runs_finally_blocks_and_means_exit_143(tmp_path):
    proc = _python_in(tmp_path, SIGTERM_SCRIPT)
    assert proc.stdout.splitlines() == ["cleanup ran", "exit 143", "handler restored True"]


def test_interrupted_exit_codes_are_130_for_ctrl_c_and_143_for_sigterm_also_ray_s():
    assert console.interrupted_exit_code(KeyboardInterrupt()) == 130
    assert console.interrupted_exit_code(SystemExit(143)) == 143
    assert console.interrupted_exit_code(SystemExit(15)) == 143  # ray.init's handler
    assert console.interrupted_exit_code(SystemExit(1)) is None
    assert console.interrupted_exit_code(RuntimeError()) is None
