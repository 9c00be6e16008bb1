"""Settings are part of OUT: the settings that determine an output folder's bytes are recorded
in its ``run.json`` by the first run, and a later run on the same folder must agree with them.

A later run may only add consistent work: more variants (the new variant indices are done),
enhancement on a folder made without it (the rows that lack an enhanced image are redone with
it; degradation is seeded, so their clean and degraded images come out byte-identical), or
metrics on a folder made with ``compute_metrics: false`` (its rows are redone the same way, with
metrics). Any other difference (size, seed, preset, types, format, fewer variants, enhancement
or metrics removed, another model, another metric protocol, ...) is refused before any work,
listing every difference as ``field: old -> new``. A custom preset is recorded by its whole
definition, so the same name with other ranges is another setting. Fewer variants are refused
rather than read as "done": a run's variant count is what ``verify`` checks, so accepting it
would leave the folder claiming less than it holds. The manifest columns passed through to the
rows are fixed by the folder's first run, with their Arrow types (:func:`check_column_types`):
pyarrow and pandas read a folder's columns and types from its first shard, so a column added
later would be dropped and one whose type changed would fail to read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from fundus_batch.config import RunConfig
from fundus_batch.degrade.presets import PRESETS
from fundus_batch.quality import (
    NEUTRAL_PARAMETERS,
    QualityRuleError,
    canonical_rule,
    parse_rule,
)

__all__ = [
    "SettingsChange",
    "SettingsMismatchError",
    "check_column_types",
    "compare",
    "recorded",
    "resolve",
]


class SettingsMismatchError(ValueError):
    """A run's settings differ from those its output folder was made with."""

    def __init__(self, out: str, differences: list[str]) -> None:
        self.differences = differences
        super().__init__(
            f"output {out} was made with other settings; nothing was done. "
            f"Differences (field: recorded -> this run): {'; '.join(differences)}. "
            "Rerun with the recorded settings, or use another --out for the new ones."
        )


@dataclass
class SettingsChange:
    """What a run adds to a folder: ``settings`` to record, and the work it implies."""

    settings: dict[str, Any]
    more_variants: tuple[int, int] | None = None
    enhancement_added: bool = False
    metrics_added: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.more_variants is not None or self.enhancement_added or self.metrics_added


def _enhance_settings(enh: dict[str, Any], model: tuple[str, str] | None) -> dict[str, Any]:
    """What determines the enhanced images: the enhancer and, for Cofe-Net, the weights (by
    their resolved name and sha256: ``model``), variant, width and bound. The classical
    enhancer takes no weights, variant or bound, so they are not recorded for it."""
    name, sha256 = model if model is not None else (None, None)
    enhancer = enh.get("enhancer", "cofenet")
    if enhancer == "classical":
        return {"enhancer": enhancer, "model_name": name, "model_sha256": sha256}
    return {
        "enhancer": enhancer,
        "weights": enh.get("weights"),
        "model_name": name,
        "model_sha256": sha256,
        "variant": enh.get("variant"),
        "width": enh.get("width"),
        "max_change": enh.get("max_change"),
    }


def _from_config_dict(cfg: dict[str, Any], model: tuple[str, str] | None) -> dict[str, Any]:
    from fundus_batch.metrics import METRIC_VERSION

    mode = cfg.get("mode", "pairs")
    pairs = mode == "pairs"
    fmt = cfg.get("image_format", "png")
    enh = cfg.get("enhance") or {}
    enabled = bool(enh.get("enabled")) or mode == "enhance"
    metrics = bool(cfg.get("compute_metrics", True))
    settings: dict[str, Any] = {
        "mode": mode,
        "size": cfg.get("size"),
        "image_format": fmt,
        "jpeg_quality": cfg.get("jpeg_quality") if fmt == "jpeg" else None,
        "compute_metrics": metrics,
        "metric_version": METRIC_VERSION if metrics else None,
        "min_quality": _canonical_rule(cfg.get("min_quality")),
        "enhance": _enhance_settings(enh, model) if enabled else None,
    }
    if _names_a_parameter(cfg.get("min_quality")):
        settings["quality_nulls"] = QUALITY_NULLS
    if pairs:
        settings |= {
            "seed": cfg.get("seed"),
            "preset": _preset_setting(cfg),
            "types": cfg.get("types"),
            "type_mode": cfg.get("type_mode"),
            "variants": cfg.get("variants"),
        }
    return settings


def _preset_setting(cfg: dict[str, Any]) -> Any:
    """A built-in preset by its name (as recorded before custom presets), a custom one by its
    whole definition (``Preset.to_dict()``): its name alone does not say what it draws."""
    custom = cfg.get("custom_preset")
    return custom if isinstance(custom, dict) else cfg.get("preset")


def _preset_difference(old: Any, new: Any) -> str:
    """``preset: old -> new`` by name; where either is a custom preset, followed by the ranges
    that differ (a custom one's from its definition, a built-in one's its own)."""

    def name(value: Any) -> Any:
        return value.get("name") if isinstance(value, dict) else value

    def definition(value: Any) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        builtin = PRESETS.get(value) if isinstance(value, str) else None
        return None if builtin is None else builtin.to_dict()

    text = f"preset: {_fmt(name(old))} -> {_fmt(name(new))}"
    a, b = definition(old), definition(new)
    if a is None or b is None or not (isinstance(old, dict) or isinstance(new, dict)):
        return text
    ranges = [
        f"{key} {a.get(key)!r} -> {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if key != "name" and a.get(key) != b.get(key)
    ]
    return f"{text} (other ranges: {'; '.join(ranges)})" if ranges else text


QUALITY_NULLS = "neutral"
"""How the gate judges a null degradation parameter (``quality.NEUTRAL_PARAMETERS``), recorded
when a rule names one: folders judged before it was recorded broke such terms instead."""


def _names_a_parameter(rule: Any) -> bool:
    """Whether a quality rule names a degradation parameter column (null where its operator
    did not run)."""
    if not isinstance(rule, str):
        return False
    try:
        return bool(parse_rule(rule).columns & set(NEUTRAL_PARAMETERS))
    except QualityRuleError:
        return False


def _canonical_rule(rule: Any) -> Any:
    """A quality rule in its canonical form (``quality.QualityRule.canonical``), so that the
    same rule spelled with other spacing is the same setting; folders written before rules were
    recorded so hold the text as given, and theirs is canonicalised on read. Text that does not
    parse (never accepted by a run) is kept as it is."""
    if not isinstance(rule, str):
        return rule
    try:
        return canonical_rule(rule)
    except QualityRuleError:
        return rule


# Enhancement settings added after folders were first written, with what their absence means.
_LATER_ENHANCE_DEFAULTS: dict[str, Any] = {"max_change": None}


def _with_later_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """Recorded ``settings`` with the enhancement settings added since filled in and the
    quality rule in its canonical form (older folders recorded the text as given)."""
    if "min_quality" in settings:
        settings = {**settings, "min_quality": _canonical_rule(settings["min_quality"])}
    enh = settings.get("enhance")
    if isinstance(enh, dict):
        return {**settings, "enhance": {**_LATER_ENHANCE_DEFAULTS, **enh}}
    return settings


def resolve(config: RunConfig) -> dict[str, Any]:
    """The settings of ``config`` that determine its outputs (the model's name and sha256
    included).

    With Cofe-Net enhancement on, the model is built here, on the CPU, as every Enhance stage
    will build it, and checked against the working size: weights that are missing, corrupt or
    not the registered ones, a variant or width that does not fit them (or that registered
    weights would ignore) and a size the model does not take raise a one-line WeightsError or
    ConfigError before any work, instead of failing every worker after Ray has started.
    """
    enh = config.enhance
    model: tuple[str, str] | None = None
    if enh.enabled and enh.enhancer == "classical":
        from fundus_batch.classical import ClassicalEnhancer

        classical = ClassicalEnhancer()
        model = (classical.model_name, classical.model_sha256)
    elif enh.enabled:
        from fundus_batch.enhance import check_model

        model = check_model(enh.weights, enh.variant, enh.width, config.size)
    return _from_config_dict(config.model_dump(mode="json"), model)


def recorded(run_info: dict[str, Any] | None) -> dict[str, Any] | None:
    """The settings a folder's ``run.json`` records; for folders written before settings were
    recorded, those derived from its resolved config (fields it cannot tell are left out)."""
    if not run_info:
        return None
    if isinstance(run_info.get("settings"), dict):
        return _with_later_defaults(run_info["settings"])
    cfg = run_info.get("config")
    if not isinstance(cfg, dict):
        return None
    settings = _from_config_dict(cfg, None)
    settings.pop("metric_version", None)  # not recorded then
    if settings.get("enhance"):
        settings["enhance"].pop("model_name", None)
        settings["enhance"].pop("model_sha256", None)
    return settings


def _fmt(value: Any) -> str:
    return "off" if value is None else repr(value)


def _canonical(variant: Any) -> Any:
    """A recorded variant by its released name (runs before variants were checked recorded
    aliases such as ``cofe-net`` as given)."""
    if not isinstance(variant, str):
        return variant
    from fundus_batch.models.cofenet import canonical_variant

    try:
        return canonical_variant(variant)
    except ValueError:
        return variant


def _enhance_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``enhance.field: old -> new`` for every enhancement setting both records hold and that
    differs. The weights are compared by what they resolve to (``model_sha256`` and
    ``model_name``) where both records have it: the same file by another path, or by its
    registered name, is the same model. Its variant and width then agree too: a file loads
    strictly into one network only, and registered weights refuse them."""
    same_file = a.get("model_sha256") is not None and a.get("model_sha256") == b.get("model_sha256")
    diffs = []
    for sub in sorted(set(a) & set(b)):
        old, new = a[sub], b[sub]
        if same_file and sub in ("weights", "variant", "width"):
            continue
        if sub == "variant":
            old, new = _canonical(old), _canonical(new)
        if old != new:
            diffs.append(f"enhance.{sub}: {_fmt(a[sub])} -> {_fmt(b[sub])}")
            if sub == "model_sha256" and isinstance(old, str):
                diffs[-1] += f" ({_recorded_weights_hint(old)})"
    return diffs


def _recorded_weights_hint(sha256: str) -> str:
    """How to run with the weights a folder recorded: a name may now mean other weights."""
    from fundus_batch.models.weights import WeightsError, list_weights

    try:
        names = sorted(n for n, e in list_weights().items() if e.sha256 == sha256)
    except WeightsError:
        names = []
    if names:
        return f"the recorded weights are registered as {names[0]!r}: --weights {names[0]}"
    return (
        "the recorded weights are not registered here: give their file with --weights PATH "
        "(a name can mean other weights in another version)"
    )


def _metrics_added(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether ``new`` turns metrics on for a folder whose rows were made without them."""
    return old.get("compute_metrics") is False and new.get("compute_metrics") is True


def compare(old: dict[str, Any] | None, new: dict[str, Any], out: str = "OUT") -> SettingsChange:
    """Check ``new`` against the recorded ``old``; raise :class:`SettingsMismatchError` listing
    every difference that is not a consistent addition."""
    if old is None:
        return SettingsChange(settings=new)
    diffs: list[str] = []
    change = SettingsChange(settings=new)
    for key in sorted(set(old) | set(new)):
        if key == "quality_nulls" and key not in old and old.get("min_quality") is not None:
            diffs.append(
                f"quality_nulls: off -> {new[key]!r} (this folder's rows were judged when a null "
                "degradation parameter broke its term, new rows would pass it; use another "
                "--out)"
            )
            continue
        if key not in old:  # recorded by an older version: nothing to compare against
            continue
        a, b = old.get(key), new.get(key)
        if key == "variants" and isinstance(a, int) and isinstance(b, int):
            if b > a:
                change.more_variants = (a, b)
                change.notes.append(f"variants {a} -> {b}: variants {a}..{b - 1} are added")
            elif b < a:
                diffs.append(
                    f"variants: {a} -> {b} (an output folder never loses variants; "
                    f"use --variants {a} or more)"
                )
            continue
        if key in ("compute_metrics", "metric_version") and _metrics_added(old, new):
            if key == "compute_metrics":
                change.metrics_added = True
                change.notes.append("metrics added: ok rows without them are redone with them")
            continue
        if key == "enhance":
            if a is None and b is not None:
                change.enhancement_added = True
                change.notes.append("enhancement added: ok rows without it are redone with it")
            elif a is not None and b is None:
                diffs.append(
                    "enhance: on -> off (rows are enhanced; add --enhance, or use another --out)"
                )
            elif a is not None and b is not None:
                diffs += _enhance_differences(a, b)
            continue
        if key == "preset" and a != b:
            diffs.append(_preset_difference(a, b))
        elif a != b:
            diffs.append(f"{key}: {_fmt(a)} -> {_fmt(b)}")
    if diffs:
        raise SettingsMismatchError(out, diffs)
    return change


def check_column_types(
    stored: Mapping[str, Sequence[pa.DataType]] | None, passthrough: pa.Schema, out: str = "OUT"
) -> pa.Schema:
    """The pass-through columns this run writes: those of ``passthrough`` (this run's manifest),
    each in the type the folder's shards hold it as (``stored``, in shard order, see
    ``OutputStore.column_types``; None for a folder without shards). Raise
    :class:`SettingsMismatchError` naming every column a folder with shards does not hold, or
    whose values the folder's type cannot hold (a column empty in every row so far has type
    null, which holds no value). A null-typed column of this run takes the folder's type, and
    so does a type its values cast to without loss (int32 into int64, string into
    large_string)."""
    if stored is None:
        return passthrough
    diffs: list[str] = []
    fields: list[pa.Field] = []
    for column in passthrough:
        types = stored.get(column.name)
        if not types:
            diffs.append(
                f"manifest column {column.name!r} is new (the folder's rows do not have it, "
                "and readers of the folder take its columns from its first shard: join it on "
                "image_id, or use another --out)"
            )
            continue
        held = next((t for t in types if not pa.types.is_null(t)), types[0])
        if pa.types.is_null(column.type) or _casts_without_loss(column.type, held):
            fields.append(column.with_type(held))
        elif pa.types.is_null(held):
            diffs.append(
                f"manifest column {column.name!r}: empty in every row so far (type null) -> "
                f"{column.type} (the folder cannot hold its values: use another --out)"
            )
        else:
            diffs.append(
                f"manifest column {column.name!r}: {held} -> {column.type} (the folder's rows "
                "would no longer read as one table; give the column its recorded type)"
            )
    if diffs:
        raise SettingsMismatchError(out, diffs)
    return pa.schema(fields)


def _casts_without_loss(new: pa.DataType, held: pa.DataType) -> bool:
    """Whether every value of type ``new`` casts to type ``held`` unchanged."""
    if new == held:
        return True
    if pa.types.is_integer(new) and pa.types.is_integer(held):
        if pa.types.is_signed_integer(held):
            signed = pa.types.is_signed_integer(new)
            return new.bit_width <= held.bit_width if signed else new.bit_width < held.bit_width
        return pa.types.is_unsigned_integer(new) and new.bit_width <= held.bit_width
    if pa.types.is_floating(new) and pa.types.is_floating(held):
        return new.bit_width <= held.bit_width
    return any(kind(new) and kind(held) for kind in _WIDTHS)


# Two widths of one kind of value: every value of either casts to the other.
_WIDTHS = (
    lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
)
