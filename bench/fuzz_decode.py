"""Mutation fuzzer for the decode path: bytes -> decode_image -> FOV preprocess -> degrade.

Valid JPEG, PNG, TIFF, GIF and BMP files of a synthetic fundus photograph are mutated (bit flips,
overwritten bytes, boundary integers, truncation, insertion, deletion, duplication, splices,
JPEG segment lengths, PNG chunks with recomputed CRCs) and fed to the same calls the
``preprocess`` and ``degrade`` stages make. Each input runs in a worker process with a
per-input timeout and a memory cap, so a hang or a hard crash (segfault, abort) of a decoder is
caught and reported instead of killing the fuzzer. Expected outcomes are success,
``DecodeError`` and ``FOVError``; any other exception type, a crash or a hang is a finding.

Every input is reproducible from ``(--seed, index)``; findings are written to ``--out`` with the
recipe, the traceback and the input bytes.

    PYTHONPATH=. python bench/fuzz_decode.py [--seconds 60] [--timeout 5] [--seed 0]
        [--workers 1] [--out fuzz-findings] [--size 128] [--memory-mb 3072]

Exit status 1 when anything unexpected was found.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import zlib  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from multiprocessing.connection import Connection  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal  # noqa: E402

import numpy as np  # noqa: E402

Mutator = Callable[[np.random.Generator, bytes, list[bytes]], bytes]
INTERESTING_INTS = (0, 1, 2, 7, 8, 15, 16, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)


# --------------------------------------------------------------------------------- seeds


def seed_files(side: int = 200) -> dict[str, bytes]:
    """Valid files of one synthetic photograph in every container the decoder accepts."""
    import cv2
    from PIL import Image

    from fundus_batch.io.codecs import encode_jpeg, encode_png
    from fundus_batch.synth import synth_fundus

    rgb = synth_fundus(side - 40, seed=3, canvas=(side, side - 32)).image
    pil = Image.fromarray(rgb)

    def save(img: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    grey16 = cv2.imencode(".png", rgb.max(axis=2).astype(np.uint16) * 257)[1].tobytes()
    white = Image.new("RGB", pil.size, (255, 255, 255))
    return {
        "jpeg": encode_jpeg(rgb, quality=90),
        "jpeg_progressive": save(pil, "JPEG", quality=85, progressive=True),
        "jpeg_exif6": save(pil, "JPEG", quality=85, exif=exif.tobytes()),
        "jpeg_cmyk": save(pil.convert("CMYK"), "JPEG", quality=85),
        "png": encode_png(rgb),
        "png_grey16": grey16,
        "png_palette": save(pil.quantize(64), "PNG"),
        "tiff": save(pil, "TIFF"),
        "tiff_lzw_2pages": save(
            pil, "TIFF", compression="tiff_lzw", save_all=True, append_images=[white]
        ),
        "gif": save(pil.quantize(64), "GIF"),
        "bmp": save(pil, "BMP"),
    }


# ------------------------------------------------------------------------------ mutators


def _span(rng: np.random.Generator, n: int, most: int = 64) -> tuple[int, int]:
    start = int(rng.integers(0, max(n, 1)))
    return start, min(n, start + int(rng.integers(1, most + 1)))


def flip_bits(rng: np.random.Generator, data: bytes, _: list[bytes]) -> bytes:
    out = bytearray(data)
    for _repeat in range(int(rng.integers(1, 9))):
        i = int(rng.integers(0, len(out)))
        out[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def set_bytes(rng: np.random.Generator, data: bytes, _: list[bytes]) -> bytes:
    out = bytearray(data)
    choices = (0x00, 0xFF, 0x7F, 0x80, 0x01)
    for _repeat in range(int(rng.integers(1, 17))):
        i = int(rng.integers(0, len(out)))
        out[i] = int(rng.choice(choices)) if rng.random() < 0.5 else int(rng.integers(0, 256))
    return bytes(out)


def boundary_int(rng: np.random.Generator, data: bytes, _: list[bytes]) -> bytes:
    """Overwrite a 2- or 4-byte integer (either byte order), mostly in the headers."""
    width = 2 if rng.random() < 0.5 else 4
    limit = min(len(data), 512) if rng.random() < 0.8 else len(data)
    if limit <= width:
        return data
    i = int(rng.integers(0, limit - width))
    value = int(rng.choice(INTERESTING_INTS)) & ((1 << (8 * width)) - 1)
    order: Literal["big", "little"] = "big" if rng.random() < 0.5 else "little"
    return data[:i] + value.to_bytes(width, order) + data[i + width :]


def truncate(rng: np.random.Generator, data: bytes, _: list[bytes]) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def insert_random(rng: np.random.Generator, data: bytes, _: list[bytes]) -> bytes:
    i = int(rng.integers(0, len(data) + 1))
    chunk = rng.integers(0, 256, int(rng.integers(1, 257)), dtype=np.uint8).tobytes()
    return data[:i] + chunk + data[i:]


def delete_span(rng: np.random.Generator, data: bytes, _: list[bytes]) -> bytes:
    a, b = _span(rng, len(data), 256)
    return data[:a] + data[b:]


def duplicate_span(rng: np.random.Generator, data: bytes, _: list[bytes]) -> bytes:
    a, b = _span(rng, len(data), 512)
    i = int(rng.integers(0, len(data) + 1))
    return data[:i] + data[a:b] + data[i:]


def splice(rng: np.random.Generator, data: bytes, seeds: list[bytes]) -> bytes:
    other = seeds[int(rng.integers(0, len(seeds)))]
    return data[: int(rng.integers(0, len(data)))] + other[int(rng.integers(0, len(other))) :]


def jpeg_segment(rng: np.random.Generator, data: bytes, _: list[bytes]) -> bytes:
    """Corrupt the length or a field of a random JPEG marker segment before the scan."""
    if not data.startswith(b"\xff\xd8"):
        return flip_bits(rng, data, _)
    segments = []
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] != 0xDA:
        segments.append(pos)
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    if not segments:
        return flip_bits(rng, data, _)
    at = segments[int(rng.integers(0, len(segments)))]
    seglen = int.from_bytes(data[at + 2 : at + 4], "big")
    out = bytearray(data)
    if rng.random() < 0.4:
        out[at + 2 : at + 4] = int(rng.choice(INTERESTING_INTS) & 0xFFFF).to_bytes(2, "big")
    else:
        k = at + 4 + int(rng.integers(0, max(seglen - 2, 1)))
        if k < len(out):
            out[k] = int(rng.choice((0, 1, 0xFF, int(rng.integers(0, 256)))))
    return bytes(out)


def png_chunk(rng: np.random.Generator, data: bytes, _: list[bytes]) -> bytes:
    """Change a byte in a random PNG chunk and fix its CRC, so the decoder goes deeper."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return flip_bits(rng, data, _)
    chunks = []
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        if pos + 12 + length > len(data):
            break
        chunks.append((pos, length))
        pos += 12 + length
    chunks = [c for c in chunks if c[1] > 0]
    if not chunks:
        return flip_bits(rng, data, _)
    pos, length = chunks[int(rng.integers(0, len(chunks)))]
    out = bytearray(data)
    for _repeat in range(int(rng.integers(1, 4))):
        k = pos + 8 + int(rng.integers(0, length))
        out[k] = int(rng.choice((0, 1, 0xFF, int(rng.integers(0, 256)))))
    crc = zlib.crc32(bytes(out[pos + 4 : pos + 8 + length])) & 0xFFFFFFFF
    out[pos + 8 + length : pos + 12 + length] = struct.pack(">I", crc)
    return bytes(out)


MUTATORS: dict[str, Mutator] = {
    f.__name__: f
    for f in (
        flip_bits,
        set_bytes,
        boundary_int,
        truncate,
        insert_random,
        delete_span,
        duplicate_span,
        splice,
        jpeg_segment,
        png_chunk,
    )
}


def make_input(seed: int, index: int, seeds: dict[str, bytes]) -> tuple[bytes, dict]:
    """Input number ``index`` of a campaign and its recipe (same arguments, same bytes)."""
    rng = np.random.default_rng([seed, index])
    names = sorted(seeds)
    base = names[int(rng.integers(0, len(names)))]
    data = seeds[base]
    steps = []
    pool = [seeds[n] for n in names]
    for _repeat in range(int(rng.integers(1, 4))):
        name = str(rng.choice(sorted(MUTATORS)))
        data = MUTATORS[name](rng, data, pool)
        steps.append(name)
    return data, {"seed": seed, "index": index, "base": base, "mutators": steps}


# -------------------------------------------------------------------------------- worker


def _limit_memory(megabytes: int) -> None:
    try:
        import resource

        cap = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: run uncapped
        pass


def _target(data: bytes, size: int) -> str:
    from fundus_batch.degrade import degrade
    from fundus_batch.fov import preprocess
    from fundus_batch.io.codecs import decode_image, image_dimensions

    image_dimensions(data)
    rgb = decode_image(data, min_side=size)
    pre = preprocess(rgb, size=size)
    degrade(pre.image, pre.mask, "111", np.random.default_rng(0))
    return "ok"


def _worker(conn: Connection, size: int, memory_mb: int, quiet: bool) -> None:
    import warnings

    from fundus_batch.fov import FOVError
    from fundus_batch.io.codecs import DecodeError

    warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning and friends
    if quiet:  # libjpeg/libtiff print a line per corrupt input straight to fd 2
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    _limit_memory(memory_mb)
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        try:
            outcome = {"result": _target(data, size)}
        except (DecodeError, FOVError) as exc:
            outcome = {"result": "expected", "type": type(exc).__name__, "reason": exc.reason}
        except BaseException as exc:
            outcome = {
                "result": "unexpected",
                "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "message": str(exc)[:300],
                "traceback": traceback.format_exc(),
                "where": _innermost(exc),
            }
        conn.send(outcome)


def _innermost(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "fundus_batch" in f.filename] or frames
    if not ours:
        return "?"
    f = ours[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


class Runner:
    """One worker process fed input by input; replaced after a crash or a hang."""

    def __init__(self, size: int, memory_mb: int, quiet: bool = True) -> None:
        self.size = size
        self.memory_mb = memory_mb
        self.quiet = quiet
        self.ctx = mp.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(
            target=_worker, args=(child, self.size, self.memory_mb, self.quiet), daemon=True
        )
        self.proc.start()
        child.close()

    def submit(self, data: bytes) -> None:
        self.started = time.monotonic()
        with contextlib.suppress(OSError):  # a dead worker is reported by collect()
            self.conn.send_bytes(data)

    def collect(self, timeout: float) -> dict:
        """The outcome of the submitted input, waiting until ``timeout`` s after submit()."""
        try:
            left = max(0.0, timeout - (time.monotonic() - self.started))
            if self.conn.poll(left):
                return self.conn.recv()
            self._kill()
            return {"result": "hang", "type": "timeout", "message": f"no answer in {timeout} s"}
        except (EOFError, OSError):
            self.proc.join(timeout=5)
            code = self.proc.exitcode
            self._start()
            return {"result": "crash", "type": f"exit {code}", "message": _describe_exit(code)}

    def run(self, data: bytes, timeout: float) -> dict:
        self.submit(data)
        return self.collect(timeout)

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self._start()

    def close(self) -> None:
        self.conn.close()
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"worker exited with status {code}"


# ---------------------------------------------------------------------------------- main


@dataclass
class Campaign:
    seed: int
    executed: int = 0
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    findings: dict[str, dict] = field(default_factory=dict)
    finding_counts: Counter = field(default_factory=Counter)
    slowest: tuple[float, dict] = (0.0, {})

    def record(self, recipe: dict, outcome: dict, data: bytes, elapsed: float, out: Path) -> None:
        self.executed += 1
        result = outcome["result"]
        self.outcomes[result] += 1
        if result == "expected":
            self.reasons[f"{outcome['type']}({outcome['reason']})"] += 1
        if elapsed > self.slowest[0]:
            self.slowest = (elapsed, recipe)
        if result in ("unexpected", "crash", "hang"):
            key = f"{result}: {outcome['type']} at {outcome.get('where', '-')}"
            self.finding_counts[key] += 1
            if key not in self.findings:
                name = f"{result}_{recipe['index']:07d}.bin"
                out.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(data)
                self.findings[key] = {**outcome, "recipe": recipe, "input_file": str(out / name)}

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "executed": self.executed,
            "seconds": round(self.seconds, 1),
            "inputs_per_second": round(self.executed / max(self.seconds, 1e-9), 1),
            "outcomes": dict(self.outcomes),
            "expected_errors": dict(self.reasons.most_common()),
            "slowest_input_seconds": round(self.slowest[0], 3),
            "slowest_input_recipe": self.slowest[1],
            "findings": [
                {"key": k, "count": self.finding_counts[k], **v} for k, v in self.findings.items()
            ],
        }


def fuzz(
    seconds: float,
    timeout: float,
    seed: int,
    workers: int,
    out: Path,
    size: int,
    memory_mb: int,
    max_inputs: int | None = None,
) -> Campaign:
    """Run a campaign for ``seconds`` (or ``max_inputs`` inputs) and return its results."""
    seeds = seed_files()
    campaign = Campaign(seed=seed)
    runners = [Runner(size, memory_mb) for _ in range(max(1, workers))]
    start = time.monotonic()
    index = 0
    try:
        for runner in runners:  # warm-up: imports happen once, outside the per-input timeout
            runner.run(seeds["png"], timeout=120.0)
        while time.monotonic() - start < seconds and (max_inputs is None or index < max_inputs):
            batch = []
            for runner in runners:  # one input per worker, all in flight together
                data, recipe = make_input(seed, index, seeds)
                index += 1
                runner.submit(data)
                batch.append((runner, data, recipe))
            for runner, data, recipe in batch:
                outcome = runner.collect(timeout)
                elapsed = time.monotonic() - runner.started
                campaign.record(recipe, outcome, data, elapsed, out)
    finally:
        for runner in runners:
            runner.close()
    campaign.seconds = time.monotonic() - start
    return campaign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="campaign length")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-input limit (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"))
    parser.add_argument("--size", type=int, default=128, help="working size for preprocess")
    parser.add_argument("--memory-mb", type=int, default=3072, help="address-space cap per worker")
    parser.add_argument("--max-inputs", type=int, default=None)
    parser.add_argument("--replay", type=int, default=None, help="rebuild input INDEX and exit")
    args = parser.parse_args(argv)
    if args.replay is not None:
        data, recipe = make_input(args.seed, args.replay, seed_files())
        path = args.out / f"replay_{args.replay:07d}.bin"
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(json.dumps({**recipe, "file": str(path), "bytes": len(data)}))
        return 0
    campaign = fuzz(
        args.seconds,
        args.timeout,
        args.seed,
        args.workers,
        args.out,
        args.size,
        args.memory_mb,
        args.max_inputs,
    )
    report = campaign.to_dict()
    print(json.dumps(report, indent=2))
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
