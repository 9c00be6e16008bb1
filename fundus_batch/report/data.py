"""What the report shows, as plain data: the output's rows loaded and aggregated per section.

:func:`load` reads ``OUT/run.json`` and the Parquet shards; :func:`aggregate` turns them into
the dataclasses below (numbers and plain text, never HTML), which the template renders.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from fundus_batch.fidelity import fidelity_losses, unchanged_counts, unchanged_lines, warning_lines
from fundus_batch.io import storage
from fundus_batch.output import RUN_JSON, OutputStore
from fundus_batch.report.formatting import NO_TYPE, duration, num, type_label
from fundus_batch.schema import IMAGE_ROLES, STAGES, STATUS_OK
from fundus_batch.shards import read_frame

__all__ = [
    "FULL_REFERENCE",
    "NOREF_PLOTTED",
    "NOREF_TABLE_ONLY",
    "BoxPlot",
    "Column",
    "Downstream",
    "Enhancement",
    "FailureGroup",
    "Failures",
    "Loaded",
    "MeanRow",
    "MeanTable",
    "Metrics",
    "QualityGate",
    "ReportData",
    "Setting",
    "StageTime",
    "Summary",
    "Throughput",
    "VesselRow",
    "aggregate",
    "load",
    "values",
]

FULL_REFERENCE = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("ms_ssim", "MS-SSIM"))
NOREF_PLOTTED = (
    ("nr_luminance", "mean luma (0-255)"),
    ("nr_uniformity", "illumination non-uniformity"),
    ("nr_rms_contrast", "RMS contrast"),
    ("nr_laplacian_var", "Laplacian variance (sharpness)"),
    ("nr_blur_effect", "blur effect (0 sharp - 1 blurred)"),
)
NOREF_TABLE_ONLY = (
    ("nr_overexposed", "over-exposed pixels"),
    ("nr_underexposed", "under-exposed pixels"),
)
# Stages that run once per source image: their seconds are copied onto every variant row.
PER_IMAGE_STAGES = ("fetch", "preprocess")

SKIP_COLUMNS = frozenset(
    {"params_json", "id_hash", "model_sha256"} | {f"{r}_sha256" for r in (*IMAGE_ROLES, "mask")}
)
"""Bulky provenance columns the report never shows."""
_VESSEL_COLUMN = re.compile(r"^vessel_([a-z0-9]+)_(clean|degraded|enhanced)$")
# Config keys shown in the summary; anything else (storage options above all) is never shown.
_CONFIG_KEYS = (
    "mode",
    "manifest",
    "out",
    "size",
    "preset",
    "variants",
    "types",
    "type_mode",
    "seed",
    "image_format",
    "compute_metrics",
    "min_quality",
    "limit",
    "shard_rows",
)
# Config keys that only the degradation reads: not shown for enhance and score runs.
_PAIRS_ONLY_KEYS = frozenset({"preset", "variants", "types", "type_mode", "seed"})
_ENHANCE_KEYS = ("enhancer", "weights", "variant", "width", "device", "max_change")
_COFENET_ONLY_KEYS = frozenset({"weights", "variant", "width", "device", "max_change"})
_ERROR_KIND_MAX = 80
_MESSAGE_MAX = 300
_IDS_SHOWN = 5


# ---------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    """run.json (None when absent) and every Parquet row, with ``type_code`` filled in."""

    out: str
    run: dict[str, Any] | None
    frame: pd.DataFrame

    @property
    def ok(self) -> pd.DataFrame:
        return self.frame[self.frame["status"] == STATUS_OK]

    @property
    def types(self) -> list[str]:
        """Type codes of the ok rows, sorted, rows without a type last."""
        codes = self.ok["type_code"].unique().tolist()
        return sorted((str(c) for c in codes), key=lambda c: (c == NO_TYPE, c))

    @property
    def pairs(self) -> bool:
        """Whether the rows pair a clean image with degraded variants. In enhance and score
        runs the ``clean_*`` columns hold the input photograph itself, which may be poor."""
        mode = ((self.run or {}).get("config") or {}).get("mode")
        if isinstance(mode, str):
            return mode == "pairs"
        degraded = self.frame.get("degraded_uri")
        return degraded is not None and bool(degraded.notna().any())

    @property
    def input_label(self) -> str:
        """What the report calls the ``clean_*`` image: ``clean`` in pairs, else ``input``."""
        return "clean" if self.pairs else "input"


def load(out: str, storage_options: dict | None = None) -> Loaded:
    """Read run.json and the shards of output folder ``out``.

    Raises FileNotFoundError when ``out`` holds neither run.json nor any shard.
    """
    out = out.rstrip("/")
    store = OutputStore(out, storage_options or {})
    run = store.read_json(RUN_JSON)
    frame = read_frame(out, storage_options=storage_options or None, exclude=SKIP_COLUMNS)
    if run is None and frame is None:
        raise FileNotFoundError(
            f"nothing to report under {storage.redact(out)}: "
            f"no {RUN_JSON} and no Parquet shards in {storage.redact(store.pairs_uri)}"
        )
    if frame is None:
        frame = pd.DataFrame({"image_id": [], "status": []})
    if "type_code" in frame.columns:
        frame["type_code"] = frame["type_code"].fillna(NO_TYPE)
    else:
        frame["type_code"] = NO_TYPE
    return Loaded(out, run, frame)


def values(frame: pd.DataFrame, column: str) -> np.ndarray:
    """Finite float values of ``column`` (empty when absent)."""
    if column not in frame.columns:
        return np.empty(0)
    arr = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return arr[np.isfinite(arr)]


def _has(frame: pd.DataFrame, column: str) -> bool:
    return values(frame, column).size > 0


def _mean(frame: pd.DataFrame, column: str) -> float | None:
    vals = values(frame, column)
    return float(vals.mean()) if vals.size else None


def _roles_with(ok: pd.DataFrame, prefix: str) -> list[str]:
    return [r for r in ("degraded", "enhanced") if _has(ok, f"{prefix}_{r}")]


def _by_type(loaded: Loaded) -> list[tuple[str, pd.DataFrame]]:
    """(type code, its ok rows) per type, then ("all", every ok row)."""
    ok = loaded.ok
    return [*[(t, ok[ok["type_code"] == t]) for t in loaded.types], ("all", ok)]


# ---------------------------------------------------------------------------- structures


@dataclass(frozen=True)
class Setting:
    """One configuration line; ``code`` when the label is a config key."""

    label: str
    value: str
    code: bool = True


@dataclass(frozen=True)
class QualityGate:
    passed: int
    judged: int
    top_failed: list[tuple[str, int]]  # the rule terms most often broken, with counts


@dataclass(frozen=True)
class Enhancement:
    models: list[str]
    devices: list[tuple[str, int]]  # (device, rows); empty when the output did not record it
    warnings: list[str]  # one line per metric enhancement lowered, see fidelity.warning_lines
    notes: list[str]  # the types whose images came back unchanged, see fidelity.unchanged_lines


@dataclass(frozen=True)
class Summary:
    state: str
    when: str
    cards: list[tuple[str, str]]
    accounted: tuple[int, int, int] | None  # (rows_in, ok, failed) when run.json has all three
    disagreement: tuple[int, int, int, int] | None  # Parquet ok/failed vs run.json ok/failed
    quality: QualityGate | None
    enhancement: Enhancement | None
    run_json_missing: bool
    config: list[Setting]
    versions: list[tuple[str, str]]


@dataclass(frozen=True)
class BoxPlot:
    """Input of :func:`fundus_batch.report.plots.svg_boxplot`; ``key`` names the figure file."""

    key: str
    title: str
    groups: list[str]
    series: list[str]
    values: dict[tuple[str, str], list[float]]


@dataclass(frozen=True)
class Column:
    label: str
    sub: str  # second header line ("" for none)
    metric: str  # how values are formatted, see formatting.fmt


@dataclass(frozen=True)
class MeanRow:
    label: str
    n: int
    values: list[float | None]
    bold: bool = False
    suffix: str = ""


@dataclass(frozen=True)
class MeanTable:
    first: str  # head of the label column
    count: str  # head of the row-count column
    columns: list[Column]
    rows: list[MeanRow]


@dataclass(frozen=True)
class Metrics:
    has_rows: bool
    plots: list[BoxPlot] = field(default_factory=list)
    full_reference: MeanTable | None = None
    no_reference: MeanTable | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VesselRow:
    label: str
    n: int
    values: list[float | None]
    gain: float | None  # mean enhanced - degraded AUC, when both exist
    bold: bool = False


@dataclass(frozen=True)
class Downstream:
    status: Literal["no_columns", "empty", "table"]
    rows: int
    rows_with_gt: int
    columns: list[Column] = field(default_factory=list)
    delta: bool = False
    table: list[VesselRow] = field(default_factory=list)
    worse: list[str] = field(default_factory=list)  # types where enhanced AUC < degraded
    segmenters: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FailureGroup:
    stage: str
    kind: str
    rows: int
    images: int
    example_ids: str
    message: str


@dataclass(frozen=True)
class Failures:
    rows: int
    images: int
    by_stage: str
    groups: list[FailureGroup]


@dataclass(frozen=True)
class StageTime:
    stage: str
    timed: int
    seconds: float
    ms_per_row: float
    share: float  # of all worker seconds, 0-1


@dataclass(frozen=True)
class Throughput:
    facts: list[tuple[str, str]]
    stages: list[StageTime]
    total_seconds: float
    frame_rows: int
    per_image_stages: str


@dataclass(frozen=True)
class ReportData:
    out: str
    input_label: str  # see Loaded.input_label
    summary: Summary
    metrics: Metrics
    downstream: Downstream
    failures: Failures
    throughput: Throughput


def aggregate(loaded: Loaded) -> ReportData:
    """Every section's numbers and text."""
    warnings = warning_lines(fidelity_losses(loaded.ok))
    notes = unchanged_lines(unchanged_counts(loaded.ok))
    return ReportData(
        out=storage.redact(loaded.out),
        input_label=loaded.input_label,
        summary=summary(loaded, warnings, notes),
        metrics=metrics(loaded, warnings),
        downstream=downstream(loaded),
        failures=failures(loaded),
        throughput=throughput(loaded),
    )


# ---------------------------------------------------------------------------- summary


def _text(value: object) -> str:
    return storage.redact(str(value))


def summary(loaded: Loaded, warnings: list[str], notes: list[str]) -> Summary:
    run = loaded.run or {}
    counts = run.get("counts") or {}
    frame = loaded.frame
    n_rows = len(frame)
    n_ok = int((frame["status"] == STATUS_OK).sum())
    n_failed = n_rows - n_ok
    n_images = int(frame["image_id"].nunique()) if n_rows else 0
    rows_in = counts.get("rows_in")
    ok = counts.get("ok", n_ok if loaded.run is None else None)
    failed = counts.get("failed", n_failed if loaded.run is None else None)
    seconds = num(run.get("seconds"))
    cards = [
        ("rows planned", rows_in),
        ("ok", ok),
        ("failed", failed),
        ("source images", n_images),
        ("done before", counts.get("done_before")),
        ("written this run", counts.get("this_run")),
        ("wall time", duration(seconds) if seconds is not None else None),
    ]
    accounted = disagreement = None
    if isinstance(ok, int) and isinstance(failed, int):
        if isinstance(rows_in, int):
            accounted = (rows_in, ok, failed)
        if loaded.run is not None and (n_ok, n_failed) != (ok, failed):
            disagreement = (n_ok, n_failed, ok, failed)
    return Summary(
        state=_text(run.get("state", "unknown (no run.json)")),
        when=" → ".join(_text(run[k]) for k in ("started", "finished") if run.get(k)),
        cards=[(k, "–" if v is None else _text(v)) for k, v in cards],
        accounted=accounted,
        disagreement=disagreement,
        quality=_quality_gate(frame),
        enhancement=_enhancement(loaded.ok, warnings, notes),
        run_json_missing=loaded.run is None,
        config=_settings(run, pairs=loaded.pairs),
        versions=[(_text(k), _text(v)) for k, v in (run.get("versions") or {}).items()],
    )


def _settings(run: Mapping[str, Any], *, pairs: bool) -> list[Setting]:
    config = run.get("config") or {}
    rows = []
    for key in _CONFIG_KEYS:
        if key in config and (pairs or key not in _PAIRS_ONLY_KEYS):
            value = config[key]
            if isinstance(value, list):
                value = ", ".join(str(v) for v in value)
            rows.append(Setting(key, _text(value)))
    enhance = config.get("enhance")
    if isinstance(enhance, Mapping) and not enhance.get("enabled"):
        rows.append(Setting("enhance", "off"))
    elif isinstance(enhance, Mapping):
        classical = enhance.get("enhancer") == "classical"
        shown = ", ".join(
            f"{k}={enhance[k]}"
            for k in _ENHANCE_KEYS
            if enhance.get(k) is not None and not (classical and k in _COFENET_ONLY_KEYS)
        )
        rows.append(Setting("enhance", _text(shown)))
    if run and "manifest_rows" in run:
        rows.append(Setting("manifest rows", _text(run["manifest_rows"]), code=False))
    cluster = run.get("cluster")
    if isinstance(cluster, Mapping):
        rows.append(Setting("cluster", _cluster_text(cluster), code=False))
    return rows


def _cluster_text(cluster: Mapping[str, Any]) -> str:
    return _text(", ".join(f"{k}={v}" for k, v in cluster.items()))


def _quality_gate(frame: pd.DataFrame) -> QualityGate | None:
    """The rows that passed the run's quality rule (when it had one)."""
    if "quality_ok" not in frame.columns or not frame["quality_ok"].notna().any():
        return None
    judged = frame["quality_ok"].dropna().astype(bool)
    top: list[tuple[str, int]] = []
    if "quality_failed" in frame.columns:
        terms = frame["quality_failed"].dropna().astype(str).str.split("; ").explode()
        counts = terms[terms != ""].value_counts().head(3)
        top = [(_text(term), int(n)) for term, n in counts.items()]
    return QualityGate(int(judged.sum()), len(judged), top)


def _enhancement(ok: pd.DataFrame, warnings: list[str], notes: list[str]) -> Enhancement | None:
    """Which model ran on which device(s), where it harmed and what it left alone; None when no
    row was enhanced."""
    if "enhanced_uri" not in ok.columns or not ok["enhanced_uri"].notna().any():
        return None
    enhanced = ok[ok["enhanced_uri"].notna()]
    models: list[str] = []
    if "model_name" in enhanced.columns:
        models = sorted(enhanced["model_name"].dropna().astype(str).unique().tolist())
    devices: list[tuple[str, int]] = []
    if "enhance_device" in enhanced.columns and enhanced["enhance_device"].notna().any():
        counts = enhanced["enhance_device"].fillna("not recorded").astype(str).value_counts()
        devices = [(_text(d), int(n)) for d, n in counts.items()]
    return Enhancement([_text(m) for m in models], devices, list(warnings), list(notes))


# ---------------------------------------------------------------------------- metrics


def metrics(loaded: Loaded, warnings: list[str]) -> Metrics:
    ok = loaded.ok
    if ok.empty:
        return Metrics(has_rows=False)
    types = loaded.types
    plots = []
    for key, label in FULL_REFERENCE:
        roles = _roles_with(ok, key)
        if roles:
            data = {
                (t, r): values(ok[ok["type_code"] == t], f"{key}_{r}").tolist()
                for t in types
                for r in roles
            }
            plots.append(BoxPlot(key, f"{label} vs clean, by degradation type", types, roles, data))
    clean_rows = ok.drop_duplicates("image_id")
    source = loaded.input_label
    for key, label in NOREF_PLOTTED:
        roles = _roles_with(ok, key)
        has_clean = _has(clean_rows, f"{key}_clean")
        if not roles and not has_clean:
            continue
        data = {(source, source): values(clean_rows, f"{key}_clean").tolist()}
        data.update(
            {
                (t, r): values(ok[ok["type_code"] == t], f"{key}_{r}").tolist()
                for t in types
                for r in roles
            }
        )
        clean = [source] if has_clean else []
        plots.append(BoxPlot(key, label, clean + types, clean + roles, data))
    return Metrics(
        has_rows=True,
        plots=plots,
        full_reference=_fr_table(loaded),
        no_reference=_nr_table(loaded, clean_rows),
        warnings=list(warnings),
    )


def _fr_table(loaded: Loaded) -> MeanTable | None:
    ok = loaded.ok
    cols = [Column(lab, r, k) for k, lab in FULL_REFERENCE for r in _roles_with(ok, k)]
    if not cols:
        return None
    rows = [
        MeanRow(
            "all types" if group == "all" else type_label(group),
            len(sub),
            [_mean(sub, f"{c.metric}_{c.sub}") for c in cols],
            bold=group == "all",
        )
        for group, sub in _by_type(loaded)
    ]
    return MeanTable("type", "rows", cols, rows)


def _nr_table(loaded: Loaded, clean_rows: pd.DataFrame) -> MeanTable | None:
    ok = loaded.ok
    metric_cols = [
        Column(lab, "", k)
        for k, lab in (*NOREF_PLOTTED, *NOREF_TABLE_ONLY)
        if any(_has(ok, f"{k}_{r}") for r in IMAGE_ROLES)
    ]
    if not metric_cols:
        return None
    rows = []
    if any(_has(clean_rows, f"{c.metric}_clean") for c in metric_cols):
        rows.append(
            MeanRow(
                loaded.input_label,
                len(clean_rows),
                [_mean(clean_rows, f"{c.metric}_clean") for c in metric_cols],
                bold=True,
                suffix=" (per source image)",
            )
        )
    for role in ("degraded", "enhanced"):
        if not any(_has(ok, f"{c.metric}_{role}") for c in metric_cols):
            continue
        for t in loaded.types:
            sub = ok[ok["type_code"] == t]
            rows.append(
                MeanRow(
                    f"{role} · {type_label(t)}",
                    len(sub),
                    [_mean(sub, f"{c.metric}_{role}") for c in metric_cols],
                )
            )
    return MeanTable("images", "n", metric_cols, rows)


# ---------------------------------------------------------------------------- downstream


def downstream(loaded: Loaded) -> Downstream:
    """Mean vessel-segmentation scores per type, and the types where enhancement lowered AUC."""
    frame, ok = loaded.frame, loaded.ok
    found = {c: m.groups() for c in frame.columns if (m := _VESSEL_COLUMN.match(c))}
    with_gt = 0
    if "vessel_gt_uri" in frame.columns:
        with_gt = int(frame["vessel_gt_uri"].notna().sum())
    if not found:
        return Downstream("no_columns", len(frame), with_gt)
    if not any(_has(ok, c) for c in found):
        return Downstream("empty", len(frame), with_gt)
    kinds = sorted({m for m, _ in found.values()}, key=lambda m: (m != "auc", m))
    cols = [
        Column(m.upper(), r, f"vessel_{m}_{r}")
        for m in kinds
        for r in IMAGE_ROLES
        if f"vessel_{m}_{r}" in found and _has(ok, f"vessel_{m}_{r}")
    ]
    delta = _has(ok, "vessel_auc_degraded") and _has(ok, "vessel_auc_enhanced")
    table = []
    worse = []
    for group, sub in _by_type(loaded):
        gain = None
        if delta:
            diff = pd.to_numeric(sub["vessel_auc_enhanced"], errors="coerce") - pd.to_numeric(
                sub["vessel_auc_degraded"], errors="coerce"
            )
            gain = _mean(pd.DataFrame({"gain": diff}), "gain")
            if gain is not None and gain < 0 and group != "all":
                worse.append(group)
        table.append(
            VesselRow(
                "all types" if group == "all" else type_label(group),
                len(sub),
                [_mean(sub, c.metric) for c in cols],
                gain,
                bold=group == "all",
            )
        )
    segmenters: list[str] = []
    if "vessel_segmenter" in ok.columns:
        segmenters = sorted(ok["vessel_segmenter"].dropna().astype(str).unique().tolist())
    return Downstream(
        "table", len(frame), with_gt, cols, delta, table, worse, [_text(s) for s in segmenters]
    )


# ---------------------------------------------------------------------------- failures


def error_kind(error: str) -> str:
    """The stable head of an error message: ``DecodeError(truncated)``, ``FileNotFoundError``."""
    text = error.strip()
    if not text:
        return "(no message)"
    head = text.split(":", 1)[0].strip()
    return head if len(head) <= _ERROR_KIND_MAX else head[:_ERROR_KIND_MAX] + "…"


def failures(loaded: Loaded) -> Failures:
    """Failed rows grouped by the stage that failed and the kind of error, largest first."""
    frame = loaded.frame
    bad = frame[frame["status"] != STATUS_OK]
    if bad.empty:
        return Failures(0, 0, "", [])
    stage = bad["failed_stage"] if "failed_stage" in bad else pd.Series(index=bad.index)
    error = bad["error"] if "error" in bad else pd.Series(index=bad.index)
    groups = pd.DataFrame(
        {
            "stage": stage.fillna("unknown").astype(str),
            "kind": error.fillna("").astype(str).map(error_kind),
            "error": error.fillna("").astype(str),
            "image_id": bad["image_id"].astype(str),
        }
    )
    order = {s: i for i, s in enumerate(STAGES)}
    found = []
    for (stg, kind), sub in groups.groupby(["stage", "kind"], sort=False):
        ids = list(dict.fromkeys(sub["image_id"]))
        found.append((str(stg), str(kind), len(sub), ids, str(sub["error"].iloc[0])))
    found.sort(key=lambda s: (order.get(s[0], len(order)), -s[2], s[1]))
    rows = []
    for stg, kind, n, ids, example in found:
        shown = ", ".join(ids[:_IDS_SHOWN])
        if len(ids) > _IDS_SHOWN:
            shown += f" … (+{len(ids) - _IDS_SHOWN})"
        msg = example if len(example) <= _MESSAGE_MAX else example[:_MESSAGE_MAX] + "…"
        rows.append(FailureGroup(_text(stg), _text(kind), n, len(ids), _text(shown), _text(msg)))
    per_stage = bad.groupby(stage.fillna("unknown")).size().to_dict()
    by_stage = ", ".join(
        f"{k}: {v}" for k, v in sorted(per_stage.items(), key=lambda kv: order.get(kv[0], 99))
    )
    return Failures(len(bad), int(bad["image_id"].nunique()), _text(by_stage), rows)


# ---------------------------------------------------------------------------- throughput


def throughput(loaded: Loaded) -> Throughput:
    """The run's rates from run.json and the worker seconds of each stage from the rows."""
    run = loaded.run or {}
    counts = run.get("counts") or {}
    config = run.get("config") or {}
    seconds = num(run.get("seconds"))
    this_run = counts.get("this_run")
    facts = []
    if seconds and isinstance(this_run, int):
        facts.append(("rows written this run", str(this_run)))
        facts.append(("wall time", duration(seconds)))
        facts.append(("rows / s", f"{this_run / seconds:.2f}"))
        per_image = int(config.get("variants") or 1) if config.get("mode") == "pairs" else 1
        facts.append(("source images / s", f"{this_run / per_image / seconds:.2f}"))
        if per_image > 1:
            facts.append(("variants per image", str(per_image)))
    cluster = run.get("cluster")
    if isinstance(cluster, Mapping):
        facts.append(("cluster", _cluster_text(cluster)))
    frame = loaded.frame
    totals = {}
    for stage_name in STAGES:
        col = f"seconds_{stage_name}"
        if col not in frame.columns:
            continue
        src = frame.drop_duplicates("image_id") if stage_name in PER_IMAGE_STAGES else frame
        vals = values(src, col)
        if vals.size:
            totals[stage_name] = (float(vals.sum()), int(vals.size))
    grand = sum(t for t, _ in totals.values()) or 1.0
    n_rows = max(len(frame), 1)
    stages = [
        StageTime(name, n, total, total / n_rows * 1000, total / grand)
        for name, (total, n) in totals.items()
    ]
    return Throughput(facts, stages, grand, len(frame), ", ".join(PER_IMAGE_STAGES))
