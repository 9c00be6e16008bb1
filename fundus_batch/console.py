"""What a run shows on the console: a live progress bar, and Ray's own output kept in a log
file unless the user asks for it (``--verbose``)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO, TypeVar

T = TypeVar("T")
Progress = Callable[[int, int], None]  # (rows done, rows in all)


def _clock_text(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """Rows done of the total, rows/s and ETA, from the moment the work starts.

    On a terminal the bar is redrawn in place every ``every`` seconds (0.5 by default), so the
    elapsed time moves while Ray starts, and is shortened to the terminal's width; elsewhere (a
    log file, CI) it prints one line every ``every`` seconds (5 by default). The rate counts
    from the first finished block to the latest, so neither Ray's start-up nor its shut-down
    drags it. Once every row is in, the line stays as it was at the last row.
    """

    WIDTH = 24

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        ticker: bool = True,
    ) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every = every if every is not None else (0.5 if self.tty else 5.0)
        self.clock = clock
        self.done = 0
        self.total = 0
        self.started: float | None = None
        self._first: tuple[float, int] | None = None  # (time, rows) of the first block
        self._changed = 0.0  # when ``done`` last changed
        self._last_print = 0.0
        self._last_text = ""
        self._width = 0  # of the line drawn on the terminal
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True) if ticker else None

    @property
    def finished(self) -> bool:
        """Whether the work started and every row is in."""
        return self.started is not None and self.done >= self.total

    def update(self, done: int, total: int) -> None:
        """``done`` of ``total`` rows finished (called with 0 when the work starts)."""
        with self._lock:
            now = self.clock()
            if done > self.done and self._first is None:
                self._first = (now, done)
            if done != self.done or self.started is None:
                self._changed = now
            self.done, self.total = done, total
            if self.started is None:
                self.started = now
                self._print(now)
                if self._ticker is not None:
                    self._ticker.start()
            elif self.tty:
                self._print(now)

    def rate(self) -> float | None:
        """Rows per second from the first finished block to the latest (None before the
        second)."""
        if self._first is None:
            return None
        t_first, rows_first = self._first
        if self.done > rows_first and self._changed > t_first:
            return (self.done - rows_first) / (self._changed - t_first)
        return None

    def line(self, now: float, *, bar_width: int = WIDTH, elapsed: bool = True) -> str:
        """The bar as text at time ``now`` (at the last row once every row is in)."""
        if self.finished:
            now = self._changed
        total = max(self.total, 1)
        share = min(self.done / total, 1.0)
        filled = int(share * bar_width)
        bar = f" [{'#' * filled}{'-' * (bar_width - filled)}]" if bar_width else ""
        rate = self.rate()
        speed = f"{rate:.1f} rows/s" if rate else "- rows/s"
        if self.done >= self.total:
            eta = "done"
        elif rate:
            eta = "ETA " + _clock_text((self.total - self.done) / rate)
        else:
            eta = "ETA -"
        text = f"rows {self.done}/{self.total} {share:4.0%}{bar} {speed}  {eta}"
        if elapsed:
            started = self.started if self.started is not None else now
            text += f"  elapsed {_clock_text(now - started)}"
        return text

    def _columns(self) -> int:
        """The terminal's width: $COLUMNS, else that of the terminal the bar is drawn on."""
        with contextlib.suppress(ValueError):
            columns = int(os.environ.get("COLUMNS", ""))
            if columns > 0:
                return columns
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        return columns or shutil.get_terminal_size().columns  # 0: a terminal without a size

    def _fitted(self, now: float, room: int) -> str:
        """The longest form of the line that fits in ``room`` characters."""
        text = ""
        for bar_width, elapsed in ((self.WIDTH, True), (10, True), (10, False), (0, False)):
            text = self.line(now, bar_width=bar_width, elapsed=elapsed)
            if len(text) <= room:
                return text
        return text[: max(room, 0)]

    def _print(self, now: float) -> None:
        if self.tty:
            room = self._columns() - 1  # a line as wide as the terminal wraps on some
            text = self._fitted(now, room)
            self.stream.write("\r" + text.ljust(min(self._width, room)))
            self._width = len(text)
        else:
            text = self.line(now)
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_print = now
        self._last_text = text

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                now = self.clock()
                if not self.finished and now - self._last_print >= self.every * 0.9:
                    self._print(now)

    @contextlib.contextmanager
    def above(self) -> Iterator[None]:
        """Hold the bar while a message is written to its stream: on a terminal its line is
        cleared first and the bar redrawn after, so the message gets a line of its own."""
        with self._lock:
            drawn = self.tty and self.started is not None and not self._closed
            if drawn:
                self.stream.write("\r" + " " * self._width + "\r")
                self._width = 0
            try:
                yield
            finally:
                if drawn:
                    self._print(self.clock())

    def close(self) -> None:
        """The final line (nothing when the work never started)."""
        self._stop.set()
        if self._ticker is not None and self._ticker.is_alive():
            self._ticker.join()
        with self._lock:
            if self.started is None or self._closed:
                return
            self._closed = True
            now = self.clock()
            if self.tty:
                self._print(now)
                self.stream.write("\n")
                self.stream.flush()
            elif self.line(now) != self._last_text:  # the final line once, not twice
                self._print(now)


class _ConsoleHandler(logging.StreamHandler):
    """Warnings of our loggers on the console, each on a line of its own above the bar."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.bar: ProgressBar | None = None
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self.bar is None:
            super().emit(record)
            return
        with self.bar.above():
            super().emit(record)


@dataclass
class Console:
    """Where a run's own messages go, and the file that holds Ray's output (None: the console)."""

    stream: TextIO
    log_path: Path | None = None
    handler: _ConsoleHandler | None = field(default=None, repr=False)

    def progress_bar(self) -> ProgressBar:
        """A bar on this console; warnings logged while it is drawn are printed above it."""
        bar = ProgressBar(self.stream)
        if self.handler is not None:
            self.handler.bar = bar
        return bar


def log_line(path: Path) -> str:
    """The line that names Ray's log file, at the start of a run and in its summary."""
    return f"ray log           {path}"


def _log_folder() -> Path:
    """This user's folder of Ray logs in the temporary folder, which only this user may use
    (PermissionError when the name is taken by anything else)."""
    uid = os.getuid()
    folder = Path(tempfile.gettempdir()) / f"fundus-batch-logs-{uid}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        raise PermissionError(f"{folder} is not a folder that only this user can use")
    return folder


def _open_log() -> tuple[int, Path]:
    """A new log file (O_EXCL, O_NOFOLLOW, mode 0600) and its path."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    prefix = f"ray-{stamp}-{os.getpid()}-"
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".log", dir=_log_folder())
    return fd, Path(name)


def _real_fd(stream: TextIO, expected: int) -> bool:
    try:
        return stream.fileno() == expected
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


def _restore(saved: dict[int, int]) -> None:
    with contextlib.suppress(ValueError, OSError):
        sys.stdout.flush()
        sys.stderr.flush()
    for fd, copy in saved.items():
        os.dup2(copy, fd)


@contextlib.contextmanager
def ray_output(verbose: bool) -> Iterator[Console]:
    """Within this block, everything written to the process's stdout and stderr file
    descriptors (Ray's C++ core worker, its Python loggers, Python warnings, workers' forwarded
    output) goes to a log file unless ``verbose``. The run's own lines (the bar, warnings of
    the ``fundus_batch`` loggers) go to ``Console.stream``, the terminal's stderr. When the log
    file cannot be made, a warning says so and Ray's output stays on the console."""
    if verbose or not _real_fd(sys.stderr, 2):
        yield Console(sys.stderr)
        return
    try:
        log_fd, path = _open_log()
    except OSError as exc:
        print(f"WARNING Ray's output stays on the console: no log file ({exc})", file=sys.stderr)
        yield Console(sys.stderr)
        return
    fds = [1, 2] if _real_fd(sys.stdout, 1) else [2]
    sys.stdout.flush()
    sys.stderr.flush()
    # Closed in reverse order of registration: the descriptors are restored before any closes.
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, log_fd)
        saved: dict[int, int] = {}
        for fd in fds:
            saved[fd] = os.dup(fd)
            stack.callback(os.close, saved[fd])
        console = stack.enter_context(
            os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
        )
        stack.callback(_restore, saved)
        for fd in fds:
            os.dup2(log_fd, fd)
        handler = _ConsoleHandler(console)
        ours = logging.getLogger("fundus_batch")
        ours.addHandler(handler)  # with a handler in the chain, logging's last resort is silent
        stack.callback(ours.removeHandler, handler)
        yield Console(console, path, handler)


def _has_text(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def run_on_console(
    run: Callable[[Progress | None], T],
    *,
    verbose: bool,
    progress: bool,
    say: Callable[[str], None],
    on_log: Callable[[Path], None] | None = None,
) -> tuple[T, Path | None]:
    """``run(progress)`` with Ray's output in a log file unless ``verbose`` and, if
    ``progress``, a live bar on the console. The log file is named on the console when the
    work starts (the first ``progress`` call, before Ray starts), so a run that Ray's core ends
    abruptly still says where its output went. Returns ``run``'s result and the log file
    (None when verbose or when Ray wrote nothing: the empty file is removed, also when ``run``
    raises). ``on_log`` gets the log file as soon as it exists. When ``run`` raises, ``say``
    names the log file again (when Ray wrote to it)."""
    log_path: Path | None = None
    try:
        with ray_output(verbose) as console:
            log_path = console.log_path
            if log_path is not None and on_log is not None:
                on_log(log_path)
            bar = console.progress_bar() if progress else None
            named = log_path is None

            def started(done: int, total: int) -> None:
                nonlocal named
                if not named and log_path is not None:
                    named = True
                    console.stream.write(log_line(log_path) + "\n")
                    console.stream.flush()
                if bar is not None:
                    bar.update(done, total)

            try:
                result = run(started if bar is not None or not named else None)
            finally:
                if bar is not None:
                    bar.close()
    except BaseException:
        if log_path is not None and _has_text(log_path):
            say(log_line(log_path))
        elif log_path is not None:
            log_path.unlink(missing_ok=True)
        raise
    if log_path is not None and not _has_text(log_path):
        log_path.unlink(missing_ok=True)
        log_path = None
    return result, log_path


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within this block SIGTERM raises SystemExit(143) in the main thread, so that a run
    stopped by ``kill`` or a scheduler closes its bar, releases OUT's lease and names its log
    as a failed one does; the previous handler comes back after. Elsewhere than in the main
    thread, nothing changes (signal handlers belong to it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def interrupted_exit_code(exc: BaseException) -> int | None:
    """The exit status of a run stopped by Ctrl-C (130) or SIGTERM (143); None for any other
    exception. ``ray.init`` replaces the SIGTERM handler by ``sys.exit(15)``: that is SIGTERM
    too."""
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if isinstance(exc, SystemExit) and exc.code in (signal.SIGTERM, 128 + signal.SIGTERM):
        return 128 + signal.SIGTERM
    return None
