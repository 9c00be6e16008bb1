"""The training loop: initialisation, checkpoints and :func:`train`."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fundus_batch.degrade import sample_rng
from fundus_batch.models.cofenet import CofeNet, ResBlock, build_cofenet
from fundus_batch.models.weights import save_torch
from fundus_batch.train.config import CHECKPOINT_FORMAT, TrainConfig, TrainError
from fundus_batch.train.evaluation import ValReport, evaluate, resolve_device, use_amp
from fundus_batch.train.loss import cofenet_loss
from fundus_batch.train.samples import Batch, TrainSource, flipped, make_batch, random_crop

log = logging.getLogger(__name__)


def fixup_init(model: CofeNet, generator: torch.Generator) -> None:
    """He-normal convs (zero bias), unit BatchNorm, and zeroed residual branches and heads."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)
            module.reset_running_stats()
    zeroed = [m.conv2 for m in model.modules() if isinstance(m, ResBlock)]
    zeroed.append(model.G_deconv1_0)
    if model.has_lqa:
        zeroed.append(model.a_spot_256)
    for conv in zeroed:
        torch.nn.init.zeros_(conv.weight)


def _rng_for(seed: int, *parts: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *parts])))


class _SampleOrder:
    """The k-th drawn sample: epoch-wise permutations seeded by (seed, epoch), each drawn once
    and kept while its epoch lasts (the prefetch thread and the loop share it)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()

    def __call__(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        with self._lock:
            if self._epoch is None or self._epoch[0] != epoch:
                self._epoch = (epoch, _rng_for(self.seed, 0x5EED, epoch).permutation(self.n))
            order = self._epoch[1]
        return int(order[pos])


def decayed_lr(step: int, total: int, lr: float, decay_start: float) -> float:
    """``lr`` until ``decay_start`` (a fraction of ``total`` steps), then linearly down to 0."""
    start = int(decay_start * total)
    if step < start or total <= start:
        return lr
    return lr * max(0.0, 1.0 - (step - start) / (total - start))


_ARCH_KEYS = ("variant", "width", "residual", "field_size", "field_gate")
# What a resumed run must share with its checkpoint: the architecture, what decides the samples,
# and what the optimizer's state restores (its param groups' betas and learning-rate scales).
_RESUME_KEYS = (*_ARCH_KEYS, "seed", "batch_size", "size", "betas", "head_lr_scale")
_SHOWN_IDS = 5


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint (weights_only=True); TrainError if it is not one."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise TrainError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a fundus_batch training checkpoint")
    return data


def check_checkpoint_target(config: TrainConfig) -> None:
    """TrainError when a fresh run (``resume`` off) would overwrite an existing checkpoint, or
    when the checkpoint's folder could not be written (checked now, not at the first
    checkpoint, and without creating anything)."""
    if not config.checkpoint:
        return
    target = Path(config.checkpoint)
    if not config.resume and target.exists():
        raise TrainError(
            f"{config.checkpoint} already holds a training run: resume it (--resume) or write "
            "to another folder (--out)"
        )
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise TrainError(f"cannot write {target.parent}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TrainError(f"cannot write {target.parent}: {folder} is not writable")


def data_record(train_source: TrainSource, val_source: TrainSource | None) -> dict[str, Any]:
    """What the sources read (their ``describe()``, for sources that have one, as
    ``train_*`` and ``val_*`` keys): saved in checkpoints, and a resumed run must match it."""
    record: dict[str, Any] = {}
    for role, source in (("train", train_source), ("val", val_source)):
        describe = getattr(source, "describe", None)
        if describe is not None:
            record.update({f"{role}_{k}": v for k, v in describe().items()})
    return record


def _check_disjoint(train_source: TrainSource, val_source: TrainSource | None) -> None:
    """TrainError naming the photographs both sources hold (sources with ``photo_ids``)."""
    ids = [getattr(source, "photo_ids", None) for source in (train_source, val_source)]
    if ids[0] is None or ids[1] is None:
        return
    shared = sorted(ids[0]() & ids[1]())
    if shared:
        more = f", ... ({len(shared)} in all)" if len(shared) > _SHOWN_IDS else ""
        raise TrainError(
            f"{len(shared)} photographs have rows in both the training and the validation "
            f"split, so validation would score images trained on: {', '.join(shared[:_SHOWN_IDS])}"
            f"{more}; all rows of a photograph must be in one split (was the manifest's split "
            "changed between runs into the pairs folder?)"
        )


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, as a checkpoint's config holds them."""
    return list(value) if isinstance(value, tuple) else value


def _resume_clash(ckpt: dict[str, Any], config: TrainConfig, data: dict[str, Any]) -> str:
    """The settings ``config`` and ``data`` change from the checkpoint's ('' when none)."""
    saved = ckpt["config"]
    clash: dict[str, tuple[Any, Any]] = {}
    for k in _RESUME_KEYS:
        was = _plain(saved.get(k, TrainConfig.model_fields[k].default))
        now = _plain(getattr(config, k))
        if was != now:
            clash[k] = (was, now)
    saved_data = ckpt.get("data")
    if saved_data is not None:  # older checkpoints did not record their data
        for k in sorted({*saved_data, *data}):
            if saved_data.get(k) != data.get(k):
                clash[k] = (saved_data.get(k), data.get(k))
    if not clash:
        return ""
    detail = "; ".join(f"{k}: {was!r} there, {now!r} now" for k, (was, now) in clash.items())
    return f"{list(clash)} ({detail})"


def _save_checkpoint(
    path: str,
    model: CofeNet,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: TrainConfig,
    history: list[list[float]],
    data_read: dict[str, Any],
) -> None:
    data = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": step,
        "config": config.to_dict(),
        "history": history,
        "data": data_read,
    }
    save_torch(path, data)


@dataclass
class TrainResult:
    """What a training run produced."""

    model: CofeNet
    step: int
    total_steps: int
    history: list[list[float]]  # [step, loss] per logged step
    val: list[ValReport] = field(default_factory=list)
    seconds: float = 0.0  # training time of this call, validation excluded
    seconds_per_step: float = 0.0
    checkpoint: str | None = None

    @property
    def final_loss(self) -> float:
        """Loss at the last logged step (nan if none)."""
        return self.history[-1][1] if self.history else float("nan")


def registry_entry(
    name: str,
    weights: Path,
    config: TrainConfig,
    *,
    size: int,
    training_data: str,
    metrics: dict[str, float] | None = None,
    notes: str = "",
) -> dict[str, Any]:
    """A weights-registry entry (``fundus_batch.models.WeightsEntry`` fields) for ``weights``
    trained with ``config``: what a checkpoint does not carry (residual output, the heads'
    settings) for ``--weights`` to build the same model; ``size`` is the working size."""
    from fundus_batch.models.weights import file_sha256

    return {
        "name": name,
        "file": weights.name,
        "sha256": file_sha256(weights),
        "variant": build_cofenet(config.variant, config.width, device="meta").variant,
        "width": config.width,
        "residual": config.residual,
        "field_size": config.field_size,
        "field_deadzone": config.field_deadzone,
        "field_gate": config.field_gate,
        "field_gate_threshold": config.field_gate_threshold,
        "size": size,
        "training_data": training_data,
        "metrics": dict(metrics or {}),
        "notes": notes,
    }


def train(
    config: TrainConfig,
    train_source: TrainSource,
    val_source: TrainSource | None = None,
    *,
    on_val: Callable[[ValReport], None] | None = None,
) -> TrainResult:
    """Train a Cofe-Net generator; see the module docstring for the loss and the data flow."""
    if len(train_source) == 0:
        raise TrainError("the training source is empty")
    check_checkpoint_target(config)
    _check_disjoint(train_source, val_source)
    data = data_record(train_source, val_source)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    amp = use_amp(config.amp, device)
    total = config.steps
    if config.epochs is not None:
        total = max(1, math.ceil(config.epochs * len(train_source) / config.batch_size))
    end = total if config.stop_at is None else min(total, config.stop_at)

    model = build_cofenet(
        config.variant,
        config.width,
        residual=config.residual,
        field=config.field_size,
        field_gate=config.field_gate,
        generator=torch.Generator().manual_seed(config.seed),
    )
    if config.init == "fixup":
        fixup_init(model, torch.Generator().manual_seed(config.seed))
    if config.init_weights:
        from fundus_batch.models import load_weights
        from fundus_batch.models.weights import read_state_dict

        state = dict(read_state_dict(config.init_weights))
        if config.field_gate:  # weights from a model without the gate: keep the gate's init
            for key, value in model.state_dict().items():
                if key.startswith("G_gate."):
                    state.setdefault(key, value)
        load_weights(model, state)
        model.train()
        if config.field_size is not None and config.init_head == "zero":
            torch.nn.init.zeros_(model.G_deconv1_0.weight)
            assert model.G_deconv1_0.bias is not None  # built with a bias
            torch.nn.init.zeros_(model.G_deconv1_0.bias)
    model = model.to(device)
    # Frozen modules keep their normalisation statistics too (BatchNorm would update them).
    frozen: list[torch.nn.Module] = []
    if config.trainable is not None:
        names = [n for n, _ in model.named_parameters() if n.startswith(config.trainable)]
        if not names:
            raise TrainError(f"trainable {list(config.trainable)} matches no parameter")
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
        frozen = [
            m
            for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and not any(p.requires_grad for p in m.parameters())
        ]

    def train_mode() -> None:
        model.train()
        for m in frozen:
            m.eval()

    head = list(model.G_deconv1_0.parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    optimizer = torch.optim.Adam(
        [
            {"params": body, "lr_scale": 1.0},
            {"params": head, "lr_scale": config.head_lr_scale},
        ],
        lr=config.lr,
        betas=config.betas,
    )
    step = 0
    history: list[list[float]] = []
    if config.resume and config.checkpoint and Path(config.checkpoint).is_file():
        ckpt = load_checkpoint(config.checkpoint)
        clash = _resume_clash(ckpt, config, data)
        if clash:
            raise TrainError(f"checkpoint {config.checkpoint} was trained with other {clash}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        history = [list(h) for h in ckpt["history"]]
        log.info("resumed from %s at step %d", config.checkpoint, step)
    elif config.resume:
        log.info("no checkpoint at %s yet: starting from step 0", config.checkpoint)

    val_items = val_source.val_items(config.seed) if val_source is not None else []
    reports: list[ValReport] = []
    val_seconds = [0.0]

    def validate(at: int) -> None:
        # Scored as it will ship: the dead zone, and the gate as a decision.
        trained = (model.field_deadzone, model.field_gate_threshold)
        model.field_deadzone = config.field_deadzone
        model.field_gate_threshold = config.field_gate_threshold
        try:
            report = evaluate(
                model, val_items, step=at, batch_size=config.val_batch_size, device=device, amp=amp
            )
        finally:
            model.field_deadzone, model.field_gate_threshold = trained
            train_mode()
        val_seconds[0] += report.seconds
        reports.append(report)
        log.info("step %d: validation (%.1fs)\n%s", at, report.seconds, report.table())
        if on_val is not None:
            on_val(report)

    sample_index = _SampleOrder(len(train_source), config.seed)
    train_mode()
    start_time = time.perf_counter()
    first_step = step
    running: list[float] = []

    def batch_at(at: int) -> Batch:
        items = []
        for slot in range(config.batch_size):
            k = at * config.batch_size + slot
            index = sample_index(k)
            rng = sample_rng(config.seed, train_source.image_id(index), k)
            item = train_source.train_item(index, rng)
            if config.flip and rng.integers(2):
                item = flipped(item)
            items.append(random_crop(item, config.size, rng))
        return make_batch(items)

    pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if config.prefetch else None
    ahead: Future[Batch] | None = None
    try:
        while step < end:
            lr = decayed_lr(step, total, config.lr, config.decay_start)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            if pool is None:
                batch = batch_at(step).to(device)
            else:
                batch = (ahead.result() if ahead is not None else batch_at(step)).to(device)
                ahead = pool.submit(batch_at, step + 1) if step + 1 < end else None
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                teacher = batch.illumination if config.field_gate else None
                outputs = model(batch.degraded, gate=teacher)
            loss, terms = cofenet_loss(model, outputs, batch, config)
            if not torch.isfinite(loss):
                raise TrainError(f"loss is not finite at step {step}: {terms}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            running.append(float(loss.detach()))
            if step % config.log_every == 0 or step == end:
                mean = float(np.mean(running))
                history.append([float(step), mean])
                running = []
                elapsed = time.perf_counter() - start_time - val_seconds[0]
                log.info(
                    "step %d/%d loss %.5f (%s) lr %.2e %.2fs/step",
                    step,
                    total,
                    mean,
                    ", ".join(f"{k} {v:.4f}" for k, v in terms.items()),
                    optimizer.param_groups[0]["lr"],
                    elapsed / (step - first_step),
                )
            if (
                config.checkpoint
                and config.checkpoint_every
                and step % config.checkpoint_every == 0
            ):
                _save_checkpoint(config.checkpoint, model, optimizer, step, config, history, data)
            if val_items and config.val_every and step % config.val_every == 0 and step < end:
                validate(step)
    finally:  # a failed step leaves no batch being built behind it
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    seconds = time.perf_counter() - start_time - val_seconds[0]
    if config.checkpoint:
        _save_checkpoint(config.checkpoint, model, optimizer, step, config, history, data)
    if val_items and config.val_at_end and (not reports or reports[-1].step != step):
        validate(step)
    model.eval()
    done = step - first_step
    return TrainResult(
        model=model,
        step=step,
        total_steps=total,
        history=history,
        val=reports,
        seconds=seconds,
        seconds_per_step=seconds / done if done else 0.0,
        checkpoint=config.checkpoint,
    )
