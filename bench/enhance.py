"""Cofe-Net enhancement throughput: batched inference against the released test.py style loop.

Fast paths: ``torch.inference_mode``, eval mode, torch threads = cores, batch 4 (and 1), each
with NCHW and with channels_last inputs and weights; the fastest one is compared.
Naive path, as the released test.py runs: batch 1, autograd on (the graph is built and dropped),
fp32, NCHW. Same model, same 512 x 512 inputs, same process; the rounds alternate so that a
neighbour's load hits all paths alike, and each path's best round is reported.

    PYTHONPATH=. python bench/enhance.py [--images 8] [--rounds 3] [--batch 4,1] [--threads N]

The model is the shipped ``fundus-cofenet-small`` when it is registered, else a width-0.25
residual model with random weights. Prints images/s of each path, the speed-up (target >= 2x on
CPU) and the largest output difference between the paths.

GPU sweep (``--device cuda``; ``--sweep`` runs the same sweep on the CPU, for testing): the
shipped small model and the full-width Cofe-Net (random weights) at ``--size`` in fp32, bf16
and fp16 autocast, NCHW and channels_last, over ``--batch`` sizes; CUDA-synchronised timing,
images/s, peak GPU memory and max |output - fp32 NCHW| per configuration; ``--compile`` then
times torch.compile on each model's fastest eager configuration (compile seconds apart).

    python bench/enhance.py --device cuda --batch 1,4,8,16,32,64 --compile --json out.json

``--json PATH`` writes every result, machine-readable (rewritten after each configuration, so
a run cut short by a time limit still leaves what it measured).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fundus_batch

import numpy as np
import torch

from fundus_batch.degrade import TYPE_CODES, degrade, sample_rng
from fundus_batch.models import CofeNet, WeightsError, build_cofenet, load_registered
from fundus_batch.synth import synth_fundus


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _model(name: str) -> tuple[CofeNet, str]:
    try:
        return load_registered(name), name
    except WeightsError as exc:
        print(f"({exc}; using random width-0.25 weights)", file=sys.stderr)
        model = build_cofenet("cofe-net", 0.25, residual=True, generator=torch.Generator())
        return model.eval(), "random width-0.25"


def _inputs(n: int, size: int) -> torch.Tensor:
    """Degraded synthetic fundus images, N x 3 x size x size in [0, 1]."""
    images = []
    for i in range(n):
        s = synth_fundus(size, seed=i)
        code = TYPE_CODES[i % len(TYPE_CODES)]
        degraded, _ = degrade(s.image, s.mask, code, sample_rng(0, f"bench-{i}", 0))
        images.append(degraded)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x.float().div_(255.0)


def _channels_last(model: CofeNet) -> CofeNet:
    # Module.to accepts memory_format at run time; torch's stubs do not declare it.
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def naive(model: CofeNet, x: torch.Tensor) -> torch.Tensor:
    """Batch 1, autograd on (parameters require grad, so every forward records a graph)."""
    outs = []
    for i in range(x.shape[0]):
        out = model.enhanced(model(x[i : i + 1]))
        outs.append(out.detach())
    return torch.cat(outs)


def fast(model: CofeNet, x: torch.Tensor, batch: int, channels_last: bool) -> torch.Tensor:
    """Batches of ``batch`` under inference_mode, optionally channels_last."""
    outs = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch):
            chunk = x[start : start + batch]
            if channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            outs.append(model.enhanced(model(chunk)).contiguous())
    return torch.cat(outs)


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """The CPU comparison: the naive released loop against the fast batched paths."""
    model, label = _model(args.weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)  # as a freshly built released model
    model_cl = _channels_last(copy.deepcopy(model))
    x = _inputs(args.images, args.size)

    batches = _batches(args.batch)
    paths: dict[str, Callable[[], torch.Tensor]] = {
        "naive (batch 1, autograd, fp32)": lambda: naive(model, x)
    }
    for b in batches:
        paths[f"fast (inference_mode, batch {b}, NCHW)"] = partial(fast, model, x, b, False)
        paths[f"fast (inference_mode, batch {b}, channels_last)"] = partial(
            fast, model_cl, x, b, True
        )
    naive(model, x[:1])  # warm-up: allocator, oneDNN primitive caches
    for b in batches:
        fast(model, x[:b], b, False)
        fast(model_cl, x[:b], b, True)

    times: dict[str, list[float]] = {name: [] for name in paths}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            seconds, out = _timed(fn)
            times[name].append(seconds)
            outputs[name] = out

    print(
        f"model: {label}; {args.images} images of {args.size}x{args.size}, "
        f"{args.rounds} rounds, torch threads {args.threads} (cores {_cores()})"
    )
    # Best of the rounds: on a shared machine the slower rounds measure the neighbours.
    rate = {name: args.images / min(t) for name, t in times.items()}
    for name, r in rate.items():
        median = statistics.median(times[name]) / args.images
        print(f"  {name:<52} {r:6.2f} images/s  ({1.0 / r:.3f} s/image; median {median:.3f})")
    naive_name = next(iter(paths))
    fast_name = max((n for n in paths if n != naive_name), key=lambda n: rate[n])
    reference = outputs[naive_name]
    diffs: dict[str, float] = {}
    for name, out in outputs.items():
        if name != naive_name:
            diffs[name] = (out - reference).abs().max().item()
            print(f"  max |output - naive| for {name}: {diffs[name]:.2e}")
    ratio = rate[fast_name] / rate[naive_name]
    print(f"speed-up of '{fast_name}' over the naive loop: {ratio:.2f}x (target >= 2x)")
    return {
        "mode": "cpu-compare",
        "model": label,
        "paths": [
            {
                "name": name,
                "images_per_s": rate[name],
                "median_s_per_image": statistics.median(times[name]) / args.images,
                "max_abs_diff_vs_naive": diffs.get(name, 0.0),
            }
            for name in paths
        ],
        "fastest": fast_name,
        "speedup_vs_naive": ratio,
    }


# --- the device sweep -------------------------------------------------------------------------

DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def _batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError as exc:
        raise SystemExit(f"--batch: expected comma-separated integers, got {text!r}") from exc
    if not batches or min(batches) < 1:
        raise SystemExit(f"--batch: expected integers >= 1, got {text!r}")
    return batches


def _choices(text: str, allowed: Any, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: {bad or text!r} not in {sorted(allowed)}")
    return items


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sweep_models(names: list[str], weights: str) -> dict[str, tuple[CofeNet, str]]:
    """``small``: the shipped model (or its random stand-in); ``full``: width 1.0, random."""
    models: dict[str, tuple[CofeNet, str]] = {}
    for name in names:
        if name == "small":
            models[name] = _model(weights)
        else:
            full = build_cofenet("cofe-net", 1.0, generator=torch.Generator().manual_seed(0))
            models[name] = (full.eval(), "cofe-net width 1.0, random weights")
    return models


class _Runner:
    """One forward function per (model, layout, compiled), built once and reused."""

    def __init__(self, model: CofeNet, channels_last: bool) -> None:
        self.model = model
        self.channels_last = channels_last
        self.fn: Callable[[torch.Tensor], torch.Tensor] = self._forward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.enhanced(self.model(x))

    def __call__(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), _autocast(x.device, dtype):
            return self.fn(x)


def _measure(
    runner: _Runner,
    x: torch.Tensor,
    dtype: torch.dtype | None,
    reference: torch.Tensor,
    images: int,
    rounds: int,
    warmup: int,
) -> dict[str, Any]:
    """Time ``runner`` on batch ``x``: warm-up (its first call timed apart), then the rounds."""
    device = x.device
    batch = x.shape[0]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = runner(x, dtype)
    _sync(device)
    first_call_s = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        runner(x, dtype)
    _sync(device)
    iters = max(1, math.ceil(images / batch))
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            out = runner(x, dtype)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    k = min(batch, reference.shape[0])
    diff = (out[:k].float() - reference[:k].float()).abs().max().item()
    result: dict[str, Any] = {
        "status": "ok",
        "images_per_round": iters * batch,
        "images_per_s": iters * batch / min(seconds),
        "median_images_per_s": iters * batch / statistics.median(seconds),
        "first_call_s": first_call_s,
        "max_abs_diff_vs_fp32": diff,
        "finite": bool(torch.isfinite(out).all().item()),
        "peak_gpu_mib": None,
    }
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def _environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "device": str(device),
        "cores": _cores(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return env


def _reference(model: CofeNet, pool: torch.Tensor) -> torch.Tensor:
    """Plain fp32 NCHW output; TF32 off, so the fp32 rows show TF32's error too."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            return model.enhanced(model(pool)).float()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def sweep(args: argparse.Namespace, report: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every (model, dtype, layout, batch); then torch.compile on each model's fastest one."""
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
        torch.backends.cudnn.benchmark = True
    deadline = time.monotonic() + args.budget_s
    dtypes = _choices(args.dtypes, DTYPES, "--dtypes")
    layouts = _choices(args.layouts, ("nchw", "channels_last"), "--layouts")
    batches = _batches(args.batch)
    models = sweep_models(_choices(args.models, ("small", "full"), "--models"), args.weights)
    pool = _inputs(args.distinct, args.size).to(device)
    doc: dict[str, Any] = {
        "mode": "sweep",
        "environment": _environment(device),
        "settings": {
            "size": args.size,
            "images_per_round": args.images,
            "rounds": args.rounds,
            "batches": batches,
            "dtypes": dtypes,
            "layouts": layouts,
            "compile": args.compile,
            "budget_s": args.budget_s,
            "timing": "model forward only; inputs already on the device; best of the rounds",
            "reference": "fp32 NCHW with cuDNN TF32 off; fp32 rows use torch defaults",
        },
        "models": {},
        "results": [],
        "compiled": [],
        "complete": False,
    }
    print(f"sweep on {device}: {doc['environment']}")
    kept: dict[str, tuple[dict[str, _Runner], torch.Tensor]] = {}
    for key, (model, label) in models.items():
        model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        doc["models"][key] = {
            "label": label,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        reference = _reference(model, pool)
        runners = {
            "nchw": _Runner(model, False),
            "channels_last": _Runner(_channels_last(copy.deepcopy(model)), True),
        }
        for dtype_name in dtypes:
            for layout in layouts:
                for batch in batches:
                    row: dict[str, Any] = {
                        "model": key,
                        "dtype": dtype_name,
                        "layout": layout,
                        "batch": batch,
                        "compiled": False,
                    }
                    if time.monotonic() > deadline:
                        row["status"] = "skipped (time budget)"
                    else:
                        x = pool[torch.arange(batch) % pool.shape[0]].contiguous()
                        row.update(
                            _run_one(runners[layout], x, DTYPES[dtype_name], reference, args)
                        )
                    doc["results"].append(row)
                    _print_row(row)
                    report(doc)
        kept[key] = (runners, reference)
    # Compiling is slow and its time hard to bound: only after every eager configuration ran.
    for key, (runners, reference) in kept.items() if args.compile else ():
        _compile_best(doc, key, runners, pool, reference, args, deadline, report)
    doc["complete"] = True
    report(doc)
    return doc


def _run_one(
    runner: _Runner,
    x: torch.Tensor,
    dtype: torch.dtype | None,
    reference: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, Any]:
    try:
        return _measure(runner, x, dtype, reference, args.images, args.rounds, args.warmup)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "out of memory"}
    except RuntimeError as exc:  # e.g. an op without a half-precision kernel on this device
        return {"status": f"error: {str(exc).splitlines()[0][:200]}"}


def _print_row(row: dict[str, Any]) -> None:
    head = (
        f"  {row['model']:<5} {row['dtype']:<4} {row['layout']:<13} batch {row['batch']:>3}"
        f"{' compiled' if row['compiled'] else ''}"
    )
    if row.get("status") != "ok":
        print(f"{head}: {row.get('status')}", flush=True)
        return
    peak = row["peak_gpu_mib"]
    print(
        f"{head}: {row['images_per_s']:8.1f} images/s, first call {row['first_call_s']:.2f} s, "
        f"peak {'n/a' if peak is None else f'{peak:.0f} MiB'}, "
        f"max|d| vs fp32 {row['max_abs_diff_vs_fp32']:.2e}",
        flush=True,
    )


def _compile_best(
    doc: dict[str, Any],
    key: str,
    runners: dict[str, _Runner],
    pool: torch.Tensor,
    reference: torch.Tensor,
    args: argparse.Namespace,
    deadline: float,
    report: Callable[[dict[str, Any]], None],
) -> None:
    """torch.compile the model's fastest eager configuration; compile time is the first call."""
    ok = [r for r in doc["results"] if r["model"] == key and r.get("status") == "ok"]
    if not ok:
        return
    best = max(ok, key=lambda r: r["images_per_s"])
    entry: dict[str, Any] = {
        "model": key,
        "dtype": best["dtype"],
        "layout": best["layout"],
        "batch": best["batch"],
        "compiled": True,
        "eager_images_per_s": best["images_per_s"],
    }
    if time.monotonic() > deadline:
        entry["status"] = "skipped (time budget)"
    else:
        runner = runners[best["layout"]]
        compiled = _Runner(runner.model, runner.channels_last)
        compiled.fn = torch.compile(compiled._forward, dynamic=False)
        x = pool[torch.arange(best["batch"]) % pool.shape[0]].contiguous()
        entry.update(_run_one(compiled, x, DTYPES[best["dtype"]], reference, args))
        if entry.get("status") == "ok":
            entry["compile_s"] = entry["first_call_s"]
            entry["speedup_vs_eager"] = entry["images_per_s"] / best["images_per_s"]
            entry["helps"] = entry["speedup_vs_eager"] > 1.05
            print(
                f"  torch.compile {key}: compile {entry['compile_s']:.1f} s, "
                f"{entry['speedup_vs_eager']:.2f}x eager",
                flush=True,
            )
    doc["compiled"].append(entry)
    _print_row(entry)
    report(doc)


def _summary(doc: dict[str, Any]) -> None:
    """The fastest configuration of each model, and half-precision paths that broke."""
    for key in doc["models"]:
        ok = [r for r in doc["results"] if r["model"] == key and r.get("status") == "ok"]
        if ok:
            best = max(ok, key=lambda r: r["images_per_s"])
            print(
                f"fastest {key}: {best['images_per_s']:.1f} images/s "
                f"({best['dtype']}, {best['layout']}, batch {best['batch']})"
            )
        broken = [r for r in ok if not r["finite"] or r["max_abs_diff_vs_fp32"] > 0.05]
        for r in broken:
            print(
                f"  WARNING {key} {r['dtype']} {r['layout']} batch {r['batch']}: "
                f"max|d| {r['max_abs_diff_vs_fp32']:.3f}, finite {r['finite']}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", default=None, help="batch sizes (CPU: 4,1; sweep: 1,4,...,64)")
    parser.add_argument("--threads", type=int, default=_cores())
    parser.add_argument("--weights", default="fundus-cofenet-small")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--sweep", action="store_true", help="run the device sweep on the CPU too")
    parser.add_argument("--models", default="small,full", help="sweep: small and/or full")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="sweep: autocast dtypes")
    parser.add_argument("--layouts", default="nchw,channels_last", help="sweep: memory layouts")
    parser.add_argument("--distinct", type=int, default=4, help="sweep: distinct input images")
    parser.add_argument("--warmup", type=int, default=3, help="sweep: warm-up calls per config")
    parser.add_argument("--compile", action="store_true", help="sweep: also try torch.compile")
    parser.add_argument("--budget-s", type=float, default=1e9, help="sweep: skip configs after")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("images", "rounds", "distinct", "warmup"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}: must be >= 1, got {getattr(args, name)}")

    def report(doc: dict[str, Any]) -> None:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_suffix(args.json.suffix + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            tmp.replace(args.json)

    if args.sweep or args.device != "cpu":
        args.batch = args.batch or "1,4,8,16,32,64"
        doc = sweep(args, report)
        _summary(doc)
    else:
        args.batch = args.batch or "4,1"
        report(compare(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
