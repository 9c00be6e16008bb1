"""What a run shows on the console: a live progress bar, and Ray's own output kept in a log
file unless the user asks for it (``--verbose``)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
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
    elapsed time moves while Ray starts; elsewhere (a log file, CI) it prints one line every
    ``every`` seconds (5 by default). The rate counts from the first finished block, so Ray's
    start-up does not drag the ETA.
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
        self._last_print = 0.0
        self._width = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True) if ticker else None

    def update(self, done: int, total: int) -> None:
        """``done`` of ``total`` rows finished (called with 0 when the work starts)."""
        with self._lock:
            now = self.clock()
            if done > self.done and self._first is None:
                self._first = (now, done)
            self.done, self.total = done, total
            if self.started is None:
                self.started = now
                self._print(now)
                if self._ticker is not None:
                    self._ticker.start()
            elif self.tty:
                self._print(now)

    def rate(self, now: float) -> float | None:
        """Rows per second since the first finished block (None before the second)."""
        if self._first is None:
            return None
        t_first, rows_first = self._first
        if self.done > rows_first and now > t_first:
            return (self.done - rows_first) / (now - t_first)
        return None

    def line(self, now: float) -> str:
        """The bar as text at time ``now``."""
        total = max(self.total, 1)
        share = min(self.done / total, 1.0)
        filled = int(share * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        elapsed = now - (self.started if self.started is not None else now)
        rate = self.rate(now)
        speed = f"{rate:.1f} rows/s" if rate else "- rows/s"
        if self.done >= self.total:
            eta = "done"
        elif rate:
            eta = "ETA " + _clock_text((self.total - self.done) / rate)
        else:
            eta = "ETA -"
        return (
            f"rows {self.done}/{self.total} {share:4.0%} [{bar}] {speed}  "
            f"{eta}  elapsed {_clock_text(elapsed)}"
        )

    def _print(self, now: float) -> None:
        text = self.line(now)
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last_print = now

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                now = self.clock()
                if now - self._last_print >= self.every * 0.9:
                    self._print(now)

    def close(self) -> None:
        """The final line (nothing when the work never started)."""
        self._stop.set()
        if self._ticker is not None and self._ticker.is_alive():
            self._ticker.join()
        with self._lock:
            if self.started is not None:
                self._print(self.clock())
                if self.tty:
                    self.stream.write("\n")
                    self.stream.flush()


@dataclass
class Console:
    """Where a run's own messages go, and the file that holds Ray's output (None: the console)."""

    stream: TextIO
    log_path: Path | None = None


def _log_file() -> Path:
    folder = Path(tempfile.gettempdir()) / "fundus-batch-logs"
    folder.mkdir(mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return folder / f"ray-{stamp}-{os.getpid()}.log"


def _real_fd(stream: TextIO, expected: int) -> bool:
    try:
        return stream.fileno() == expected
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


@contextlib.contextmanager
def ray_output(verbose: bool) -> Iterator[Console]:
    """Within this block, everything written to the process's stdout and stderr file
    descriptors (Ray's C++ core worker, its Python loggers, Python warnings, workers' forwarded
    output) goes to a log file unless ``verbose``. The run's own lines (the bar, warnings of
    the ``fundus_batch`` loggers) go to ``Console.stream``, the terminal's stderr."""
    if verbose or not _real_fd(sys.stderr, 2):
        yield Console(sys.stderr)
        return
    path = _log_file()
    fds = [1, 2] if _real_fd(sys.stdout, 1) else [2]
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in fds}
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    console = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
    ours = logging.getLogger("fundus_batch")
    handler = logging.StreamHandler(console)
    handler.setLevel(logging.WARNING)
    try:
        for fd in fds:
            os.dup2(log_fd, fd)
        ours.addHandler(handler)  # with a handler in the chain, logging's last resort is silent
        yield Console(console, path)
    finally:
        ours.removeHandler(handler)
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(log_fd)
        console.close()


def run_on_console(
    run: Callable[[Progress | None], T],
    *,
    verbose: bool,
    progress: bool,
    say: Callable[[str], None],
    on_log: Callable[[Path], None] | None = None,
) -> tuple[T, Path | None]:
    """``run(progress)`` with Ray's output in a log file unless ``verbose`` and, if
    ``progress``, a live bar on the console. Returns ``run``'s result and the log file (None
    when verbose or when Ray wrote nothing: the empty file is removed). ``on_log`` gets the
    log file as soon as it exists. When ``run`` raises, ``say`` tells where Ray's output went
    first."""
    log_path: Path | None = None
    try:
        with ray_output(verbose) as console:
            log_path = console.log_path
            if log_path is not None and on_log is not None:
                on_log(log_path)
            bar = ProgressBar(console.stream) if progress else None
            try:
                result = run(bar.update if bar is not None else None)
            finally:
                if bar is not None:
                    bar.close()
    except BaseException:
        if log_path is not None and log_path.is_file() and log_path.stat().st_size:
            say(f"Ray's output: {log_path}")
        raise
    if log_path is not None and log_path.is_file() and not log_path.stat().st_size:
        log_path.unlink()
        log_path = None
    return result, log_path
