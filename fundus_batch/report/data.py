"""What the report shows, as plain data: the output's rows loaded and aggregated per section.

:func:`load` reads ``OUT/run.json`` and the Parquet shards; :func:`aggregate` turns them into
the dataclasses below (numbers and plain text, never HTML), which the template renders.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import pandas as pd

from fundus_batch.fidelity import (
    FIDELITY_COLUMNS,
    common_rows,
    fidelity_losses,
    unchanged_counts,
    unchanged_lines,
    warning_lines,
)
from fundus_batch.io import storage
from fundus_batch.output import RUN_JSON, OutputStore
from fundus_batch.quality import GateCounts
from fundus_batch.report.formatting import NO_TYPE, Verbatim, duration, num, type_label
from fundus_batch.schema import IMAGE_ROLES, STAGES, STATUS_OK
from fundus_batch.shards import concat_tables, read_shard, shard_paths

__all__ = [
    "FULL_REFERENCE",
    "NOREF_PLOTTED",
    "NOREF_TABLE_ONLY",
    "PARAM_COLUMNS",
    "REPORT_COLUMNS",
    "BoxPlot",
    "Column",
    "Downstream",
    "Enhancement",
    "FailureGroup",
    "Failures",
    "LastRun",
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
    "this_run_rows",
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

PARAM_COLUMNS = (
    ("blur_sigma", "blur σ"),
    ("n_spots", "spots"),
    ("hole_strength", "hole"),
    ("brightness", "bright."),
    ("contrast", "contr."),
    ("saturation", "sat."),
)
"""Sampled degradation parameters shown in the contact-sheet captions, with their labels."""
VESSEL_SCORES = ("auc", "f1")
REPORT_COLUMNS: tuple[str, ...] = (
    "image_id",
    "variant",
    "status",
    "error",
    "failed_stage",
    "type_code",
    "vessel_gt_uri",
    *(f"{role}_uri" for role in IMAGE_ROLES),
    *(name for name, _ in PARAM_COLUMNS),
    "model_name",
    "enhance_device",
    "enhance_change",
    *(f"{key}_{role}" for key, _ in FULL_REFERENCE for role in ("degraded", "enhanced")),
    *(f"{key}_{role}" for key, _ in (*NOREF_PLOTTED, *NOREF_TABLE_ONLY) for role in IMAGE_ROLES),
    *(f"vessel_{m}_{role}" for m in VESSEL_SCORES for role in IMAGE_ROLES),
    "vessel_segmenter",
    "quality_ok",
    "quality_failed",
    *(f"seconds_{stage}" for stage in STAGES),
)
"""The only Parquet columns :func:`load` reads: checksums, provenance and manifest extras are
never shown, and reading them made a 200k-row report several times slower and larger."""
# Shards are named part-<UTC start of the run's writer>-<pid>-<seq>.parquet (output.ShardWriter).
_SHARD_NAME = re.compile(r"^part-(\d{8}T\d{6})-(\d+)-\d+\.parquet$")
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
    """run.json (None when absent) and every Parquet row (the :data:`REPORT_COLUMNS` the shards
    hold), with ``type_code`` filled in; ``shards`` gives each shard's file name and row count,
    in the order of the rows. Views of the rows are computed once, on first use: do not change
    ``frame`` after that."""

    out: str
    run: dict[str, Any] | None
    frame: pd.DataFrame
    shards: tuple[tuple[str, int], ...] = ()
    _numbers: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    @cached_property
    def ok_rows(self) -> np.ndarray:
        """Positions in ``frame`` of the ok rows."""
        return np.flatnonzero((self.frame["status"] == STATUS_OK).to_numpy(dtype=bool))

    @cached_property
    def ok(self) -> pd.DataFrame:
        """The ok rows, every column (a copy: :meth:`view` is cheaper)."""
        return self.frame.iloc[self.ok_rows]

    def view(self, *columns: str) -> pd.DataFrame:
        """The ok rows, only those of ``columns`` that ``frame`` has."""
        return self.frame[[c for c in columns if c in self.frame.columns]].iloc[self.ok_rows]

    @cached_property
    def _codes(self) -> np.ndarray:
        return self.frame["type_code"].astype(str).to_numpy()[self.ok_rows]

    @cached_property
    def types(self) -> list[str]:
        """Type codes of the ok rows, sorted, rows without a type last."""
        return sorted(set(self._codes.tolist()), key=lambda c: (c == NO_TYPE, c))

    @cached_property
    def groups(self) -> list[tuple[str, np.ndarray]]:
        """(type code, positions of its rows among the ok rows) per type, then ("all", every
        position)."""
        per_type = [(t, np.flatnonzero(self._codes == t)) for t in self.types]
        return [*per_type, ("all", np.arange(self.ok_rows.size))]

    @cached_property
    def first_of_image(self) -> np.ndarray:
        """Positions among the ok rows of each source image's first row (its clean values)."""
        ids = self.frame["image_id"].iloc[self.ok_rows]
        return np.flatnonzero(~ids.duplicated().to_numpy())

    def numbers(self, column: str) -> np.ndarray:
        """``column`` of the ok rows as floats: NaN where missing or not a number (all NaN when
        the column is absent), ±inf kept."""
        if column not in self._numbers:
            if column in self.frame.columns:
                arr = pd.to_numeric(self.frame[column], errors="coerce").to_numpy(
                    dtype=np.float64, na_value=np.nan
                )[self.ok_rows]
            else:
                arr = np.full(self.ok_rows.size, np.nan)
            self._numbers[column] = arr
        return self._numbers[column]

    def has(self, column: str) -> bool:
        """Whether any ok row holds a finite value of ``column``."""
        return bool(np.isfinite(self.numbers(column)).any())

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
    """Read run.json and the :data:`REPORT_COLUMNS` of the shards of output folder ``out``.

    Raises FileNotFoundError when ``out`` holds neither run.json nor any shard.
    """
    out = out.rstrip("/")
    options = storage_options or None
    store = OutputStore(out, storage_options or {})
    run = store.read_json(RUN_JSON)
    paths = shard_paths(out, options)
    tables = [read_shard(path, list(REPORT_COLUMNS), options) for path in paths]
    shards = tuple(
        (path.rsplit("/", 1)[-1], t.num_rows) for path, t in zip(paths, tables, strict=True)
    )
    table = concat_tables(tables)
    del tables
    if run is None and table is None:
        raise FileNotFoundError(
            f"nothing to report under {storage.redact(out)}: "
            f"no {RUN_JSON} and no Parquet shards in {storage.redact(store.pairs_uri)}"
        )
    if table is None:
        frame = pd.DataFrame({"image_id": [], "status": []})
    else:
        frame = table.select([c for c in REPORT_COLUMNS if c in table.column_names]).to_pandas()
    if "type_code" in frame.columns:
        frame["type_code"] = frame["type_code"].fillna(NO_TYPE)
    else:
        frame["type_code"] = NO_TYPE
    return Loaded(out, run, frame, shards)


def values(frame: pd.DataFrame, column: str) -> np.ndarray:
    """Finite float values of ``column`` (empty when absent)."""
    if column not in frame.columns:
        return np.empty(0)
    arr = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return arr[np.isfinite(arr)]


def _roles_with(loaded: Loaded, prefix: str) -> list[str]:
    return [r for r in ("degraded", "enhanced") if loaded.has(f"{prefix}_{r}")]


def _means(arrays: Sequence[np.ndarray], mask: np.ndarray) -> list[float | None]:
    """Mean of each array over ``mask`` (None when it selects no finite value)."""
    result: list[float | None] = []
    for arr in arrays:
        picked = arr[mask]
        picked = picked[np.isfinite(picked)]
        result.append(float(picked.mean()) if picked.size else None)
    return result


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
class LastRun:
    """What run.json records: the last run's counts, over that run's own scope (a ``--limit``
    run counts only its own rows), which need not be the whole output."""

    scope: str  # e.g. "limit 4, 4 manifest rows"; "" when run.json does not say
    facts: list[tuple[str, str]]  # rows planned, ok, failed, done before, written, wall time
    missing: int  # ok and failed rows run.json counts that the Parquet does not hold
    beyond: int  # rows the Parquet holds beyond run.json's ok and failed counts


@dataclass(frozen=True)
class Summary:
    state: str
    when: str
    cards: list[tuple[str, str]]  # what the Parquet holds
    last_run: LastRun | None  # None without run.json
    # (rows_in, ok, failed) of run.json, only when the Parquet holds exactly its ok and failed
    accounted: tuple[int, int, int] | None
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
    note: str = ""  # what the plot leaves out (rows with PSNR ∞), shown under it


@dataclass(frozen=True)
class Column:
    label: str
    sub: str  # second header line ("" for none)
    metric: str  # how values are formatted, see formatting.fmt


@dataclass(frozen=True)
class MeanRow:
    """Means over one set of rows (``n`` of the group's ``rows``), the same for every column."""

    label: str
    rows: int  # rows in the group
    n: int  # rows averaged: finite in every column (degraded and enhanced paired)
    values: list[float | None]
    identical: int = 0  # rows left out because an image is identical to clean (PSNR ∞)
    bold: bool = False
    suffix: str = ""


@dataclass(frozen=True)
class MeanTable:
    first: str  # head of the label column
    count: str  # head of the row-count column
    columns: list[Column]
    rows: list[MeanRow]
    note: str = ""  # which rows the means are over

    @property
    def partial(self) -> bool:
        """Whether some row's means leave rows out (the table then shows ``n``)."""
        return any(r.n != r.rows for r in self.rows)

    @property
    def identical(self) -> bool:
        """Whether some row leaves out identical images (the table then counts them)."""
        return any(r.identical for r in self.rows)


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
    rows: int  # rows in the group
    n: int  # rows averaged: scored in every column
    values: list[float | None]
    gain: float | None  # mean enhanced - degraded AUC over those rows, when both exist
    bold: bool = False


@dataclass(frozen=True)
class Downstream:
    status: Literal["no_columns", "empty", "table"]
    rows: int
    rows_with_gt: int
    columns: list[Column] = field(default_factory=list)
    delta: bool = False
    table: list[VesselRow] = field(default_factory=list)
    partial: bool = False  # whether some row averages fewer rows than it has
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
    fidelity = loaded.view(*FIDELITY_COLUMNS)
    warnings = warning_lines(fidelity_losses(fidelity))
    notes = unchanged_lines(unchanged_counts(fidelity))
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
    """The headline counts (what the Parquet holds), run.json's record of the last run beside
    them, and whether the two agree."""
    run = loaded.run or {}
    frame = loaded.frame
    n_rows = len(frame)
    n_ok = int((frame["status"] == STATUS_OK).sum())
    n_failed = n_rows - n_ok
    n_images = int(frame["image_id"].nunique()) if n_rows else 0
    cards = [("rows", n_rows), ("ok", n_ok), ("failed", n_failed), ("source images", n_images)]
    last = _last_run(run, n_ok, n_failed) if loaded.run is not None else None
    counts = run.get("counts") or {}
    rows_in, ok, failed = (_count(counts.get(k)) for k in ("rows_in", "ok", "failed"))
    accounted = disagreement = None
    if ok is not None and failed is not None:
        if (n_ok, n_failed) != (ok, failed):
            disagreement = (n_ok, n_failed, ok, failed)
        elif rows_in is not None:
            accounted = (rows_in, ok, failed)
    return Summary(
        state=_text(run.get("state", "unknown (no run.json)")),
        when=" → ".join(_text(run[k]) for k in ("started", "finished") if run.get(k)),
        cards=[(k, _text(v)) for k, v in cards],
        last_run=last,
        accounted=accounted,
        disagreement=disagreement,
        quality=_quality_gate(frame),
        enhancement=_enhancement(
            loaded.view("enhanced_uri", "model_name", "enhance_device"), warnings, notes
        ),
        run_json_missing=loaded.run is None,
        config=_settings(run, pairs=loaded.pairs),
        versions=[(_text(k), _text(v)) for k, v in (run.get("versions") or {}).items()],
    )


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _last_run(run: Mapping[str, Any], n_ok: int, n_failed: int) -> LastRun:
    """run.json's counts and scope, and what they miss of (or leave beyond) the Parquet's
    ``n_ok`` and ``n_failed`` rows."""
    counts = run.get("counts") or {}
    config = run.get("config") or {}
    rows_in, ok, failed = (_count(counts.get(k)) for k in ("rows_in", "ok", "failed"))
    scope = []
    if _count(config.get("limit")):
        scope.append(f"limit {config['limit']}")
    if _count(run.get("manifest_rows")) is not None:
        scope.append(f"{run['manifest_rows']} manifest rows")
    seconds = num(run.get("seconds"))
    facts = [
        ("rows planned", rows_in),
        ("ok", ok),
        ("failed", failed),
        ("done before", _count(counts.get("done_before"))),
        ("written", _count(counts.get("this_run"))),
        ("wall time", duration(seconds) if seconds is not None else None),
    ]
    missing = beyond = 0
    if ok is not None and failed is not None:
        missing = max(ok - n_ok, 0) + max(failed - n_failed, 0)
        beyond = max(n_ok - ok, 0) + max(n_failed - failed, 0)
    return LastRun(
        scope=_text(", ".join(scope)),
        facts=[(k, _text(v)) for k, v in facts if v is not None],
        missing=missing,
        beyond=beyond,
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
    """The ok rows that passed the run's quality rule (when it had one): a row the gate passed
    that failed later (at Write) is not counted, nor are the terms it broke."""
    if "quality_ok" not in frame.columns or not frame["quality_ok"].notna().any():
        return None
    frame = frame[frame["status"] == STATUS_OK]
    counts = GateCounts()
    failed = frame["quality_failed"] if "quality_failed" in frame.columns else None
    counts.add(
        [None if pd.isna(v) else bool(v) for v in frame["quality_ok"]],
        [None] * len(frame) if failed is None else [None if pd.isna(t) else str(t) for t in failed],
    )
    top = [(_text(term), n) for term, n in counts.top(3)]
    return QualityGate(counts.passed, counts.judged, top)


def _enhancement(ok: pd.DataFrame, warnings: list[str], notes: list[str]) -> Enhancement | None:
    """Which model ran on which device(s), where it harmed and what it left alone; None when no
    row was enhanced."""
    if "enhanced_uri" not in ok.columns or not ok["enhanced_uri"].notna().any():
        return None
    enhanced = ok[ok["enhanced_uri"].notna()]
    models = _model_labels(enhanced)
    devices: list[tuple[str, int]] = []
    if "enhance_device" in enhanced.columns and enhanced["enhance_device"].notna().any():
        counts = enhanced["enhance_device"].fillna("not recorded").astype(str).value_counts()
        devices = [(_text(d), int(n)) for d, n in counts.items()]
    return Enhancement([_text(m) for m in models], devices, list(warnings), list(notes))


def _model_labels(enhanced: pd.DataFrame) -> list[str]:
    """One label per model that ran, told apart by its weights' sha256: a folder enhanced
    under a name that later meant other weights (or by one file under two names) shows which
    rows share weights, ``name (sha256 prefix)``; a single model is shown by its name."""
    if "model_name" not in enhanced.columns:
        return []
    names = enhanced["model_name"].astype("string")
    if "model_sha256" not in enhanced.columns:
        return sorted(names.dropna().unique().tolist())
    shas = enhanced["model_sha256"].astype("string").fillna("")
    groups: dict[str, set[str]] = {}
    for name, sha in zip(names, shas, strict=True):
        if not pd.isna(name):
            groups.setdefault(str(sha), set()).add(str(name))
    if len(groups) == 1 and all(len(g) == 1 for g in groups.values()):
        return sorted(next(iter(groups.values())))
    return sorted(f"{', '.join(sorted(g))} ({sha[:8] or 'no sha256'})" for sha, g in groups.items())


# ---------------------------------------------------------------------------- metrics


def metrics(loaded: Loaded, warnings: list[str]) -> Metrics:
    if not loaded.ok_rows.size:
        return Metrics(has_rows=False)
    plots = []
    for key, label in FULL_REFERENCE:
        roles = _roles_with(loaded, key)
        if not roles:
            continue
        data: dict[tuple[str, str], list[float]] = {}
        infinite = 0
        for group, idx in loaded.groups[:-1]:
            for role in roles:
                arr = loaded.numbers(f"{key}_{role}")[idx]
                data[(group, role)] = arr[np.isfinite(arr)].tolist()
                infinite += int(np.isinf(arr).sum())
        note = ""
        if infinite:
            note = f"{infinite} values of ∞ (image identical to clean) not drawn"
        title = f"{label} vs clean, by degradation type"
        plots.append(BoxPlot(key, title, loaded.types, roles, data, note))
    source = loaded.input_label
    first = loaded.first_of_image
    for key, label in NOREF_PLOTTED:
        roles = _roles_with(loaded, key)
        clean = loaded.numbers(f"{key}_clean")[first]
        clean = clean[np.isfinite(clean)]
        if not roles and not clean.size:
            continue
        data = {(source, source): clean.tolist()}
        for group, idx in loaded.groups[:-1]:
            for role in roles:
                arr = loaded.numbers(f"{key}_{role}")[idx]
                data[(group, role)] = arr[np.isfinite(arr)].tolist()
        # A type slot only when it has a box (score runs have no degraded or enhanced images).
        groups = [t for t in loaded.types if any(data.get((t, r)) for r in roles)]
        lead = [source] if clean.size else []
        plots.append(BoxPlot(key, label, lead + groups, lead + roles, data))
    return Metrics(
        has_rows=True,
        plots=plots,
        full_reference=_fr_table(loaded),
        no_reference=_nr_table(loaded),
        warnings=list(warnings),
    )


def _fr_table(loaded: Loaded) -> MeanTable | None:
    """Mean PSNR/SSIM/MS-SSIM per type over one set of rows per type: those with every score
    finite, so degraded and enhanced are paired and rows with PSNR ∞ are counted, not averaged."""
    cols = [
        Column(lab, r, k)
        for k, lab in FULL_REFERENCE
        for r in ("degraded", "enhanced")
        if not np.isnan(loaded.numbers(f"{k}_{r}")).all()  # all ∞ still counts its rows
    ]
    if not cols:
        return None
    psnr = [loaded.numbers(f"psnr_{r}") for r in ("degraded", "enhanced")]
    rows = []
    for group, idx in loaded.groups:
        arrays = [loaded.numbers(f"{c.metric}_{c.sub}")[idx] for c in cols]
        mask = common_rows(arrays, idx.size)
        identical = np.zeros(idx.size, dtype=bool)
        for arr in psnr:
            identical |= np.isposinf(arr[idx])
        rows.append(
            MeanRow(
                "all types" if group == "all" else type_label(group),
                int(idx.size),
                int(mask.sum()),
                _means(arrays, mask),
                identical=int((identical & ~mask).sum()),
                bold=group == "all",
            )
        )
    note = (
        "Each row's means are over the same rows: those with every score in the table "
        "(degraded and enhanced of the same rows, so the two compare like with like). A row "
        "whose image is identical to its clean image has PSNR ∞; it is counted under "
        "“PSNR ∞”, not averaged."
    )
    return MeanTable("type", "rows", cols, rows, note)


def _nr_table(loaded: Loaded) -> MeanTable | None:
    """Mean no-reference metrics: the clean (input) image once per source image, then each
    role per type, degraded and enhanced over the same rows of that type."""
    metric_cols = [
        Column(lab, "", k)
        for k, lab in (*NOREF_PLOTTED, *NOREF_TABLE_ONLY)
        if any(loaded.has(f"{k}_{r}") for r in IMAGE_ROLES)
    ]
    if not metric_cols:
        return None
    rows = []
    first = loaded.first_of_image
    if any(loaded.has(f"{c.metric}_clean") for c in metric_cols):
        arrays = [loaded.numbers(f"{c.metric}_clean")[first] for c in metric_cols]
        mask = common_rows(arrays, first.size)
        rows.append(
            MeanRow(
                loaded.input_label,
                int(first.size),
                int(mask.sum()),
                _means(arrays, mask),
                bold=True,
                suffix=" (per source image)",
            )
        )
    roles = [
        r
        for r in ("degraded", "enhanced")
        if any(loaded.has(f"{c.metric}_{r}") for c in metric_cols)
    ]
    per_type: dict[str, list[MeanRow]] = {r: [] for r in roles}
    for group, idx in loaded.groups[:-1]:
        by_role = {r: [loaded.numbers(f"{c.metric}_{r}")[idx] for c in metric_cols] for r in roles}
        mask = common_rows([a for r in roles for a in by_role[r]], idx.size)
        for role in roles:
            label = f"{role} · {type_label(group)}"
            per_type[role].append(
                MeanRow(label, int(idx.size), int(mask.sum()), _means(by_role[role], mask))
            )
    for role in roles:
        rows.extend(per_type[role])
    note = (
        f"The {loaded.input_label} row holds one value per source image. Degraded and enhanced "
        "rows of a type are averaged over the same rows: those with every metric of both."
        if len(roles) > 1
        else ""
    )
    return MeanTable("images", "rows", metric_cols, rows, note)


# ---------------------------------------------------------------------------- downstream


def downstream(loaded: Loaded) -> Downstream:
    """Mean vessel-segmentation scores per type over the rows scored in every column, and the
    types where enhancement lowered AUC."""
    frame = loaded.frame
    found = {c: m.groups() for c in frame.columns if (m := _VESSEL_COLUMN.match(c))}
    with_gt = 0
    if "vessel_gt_uri" in frame.columns:
        with_gt = int(frame["vessel_gt_uri"].notna().sum())
    if not found:
        return Downstream("no_columns", len(frame), with_gt)
    if not any(loaded.has(c) for c in found):
        return Downstream("empty", len(frame), with_gt)
    kinds = sorted({m for m, _ in found.values()}, key=lambda m: (m != "auc", m))
    cols = [
        Column(m.upper(), loaded.input_label if r == "clean" else r, f"vessel_{m}_{r}")
        for m in kinds
        for r in IMAGE_ROLES
        if f"vessel_{m}_{r}" in found and loaded.has(f"vessel_{m}_{r}")
    ]
    delta = loaded.has("vessel_auc_degraded") and loaded.has("vessel_auc_enhanced")
    table = []
    worse = []
    for group, idx in loaded.groups:
        arrays = [loaded.numbers(c.metric)[idx] for c in cols]
        mask = common_rows(arrays, idx.size)
        gain = None
        if delta:
            enh = loaded.numbers("vessel_auc_enhanced")[idx][mask]
            deg = loaded.numbers("vessel_auc_degraded")[idx][mask]
            both = np.isfinite(enh) & np.isfinite(deg)
            gain = float((enh[both] - deg[both]).mean()) if both.any() else None
            if gain is not None and gain < 0 and group != "all":
                worse.append(group)
        table.append(
            VesselRow(
                "all types" if group == "all" else type_label(group),
                int(idx.size),
                int(mask.sum()),
                _means(arrays, mask),
                gain,
                bold=group == "all",
            )
        )
    segmenters: list[str] = []
    if "vessel_segmenter" in frame.columns:
        named = loaded.view("vessel_segmenter")["vessel_segmenter"].dropna()
        segmenters = sorted(named.astype(str).unique().tolist())
    return Downstream(
        "table",
        len(frame),
        with_gt,
        cols,
        delta,
        table,
        partial=any(r.n != r.rows for r in table),
        worse=worse,
        segmenters=[_text(s) for s in segmenters],
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
    wanted = [c for c in ("image_id", "status", "failed_stage", "error") if c in frame.columns]
    bad = frame[wanted][frame["status"] != STATUS_OK]
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
        # Ids are shown as they are: only the message can carry credentials.
        rows.append(FailureGroup(_text(stg), _text(kind), n, len(ids), Verbatim(shown), _text(msg)))
    per_stage = bad.groupby(stage.fillna("unknown")).size().to_dict()
    by_stage = ", ".join(
        f"{k}: {v}" for k, v in sorted(per_stage.items(), key=lambda kv: order.get(kv[0], 99))
    )
    return Failures(len(bad), int(bad["image_id"].nunique()), _text(by_stage), rows)


# ---------------------------------------------------------------------------- throughput


def throughput(loaded: Loaded) -> Throughput:
    """The run's rates from run.json and this run's rows, and the worker seconds of each stage
    from all rows."""
    run = loaded.run or {}
    counts = run.get("counts") or {}
    seconds = num(run.get("seconds"))
    this_run = _count(counts.get("this_run"))
    facts = []
    if seconds and this_run is not None:
        facts.append(("rows written this run", str(this_run)))
        facts.append(("wall time", duration(seconds)))
        facts.append(("rows / s", f"{this_run / seconds:.2f}"))
        rows = this_run_rows(loaded)
        if rows is None:
            facts.append(
                (
                    "source images / s",
                    "not shown: the shards do not tell which rows this run wrote "
                    "(renamed, removed or rewritten since), and earlier runs wrote some",
                )
            )
        else:
            images = int(loaded.frame["image_id"][rows].nunique())
            facts.append(("source images / s", f"{images / seconds:.2f}"))
            if images and this_run != images:
                facts.append(("variants per image", _ratio(this_run / images)))
    cluster = run.get("cluster")
    if isinstance(cluster, Mapping):
        facts.append(("cluster", _cluster_text(cluster)))
    frame = loaded.frame
    first = ~frame["image_id"].duplicated().to_numpy(dtype=bool)
    totals = {}
    for stage_name in STAGES:
        col = f"seconds_{stage_name}"
        if col not in frame.columns:
            continue
        src = frame[[col]]  # one column: never a copy of the whole frame
        vals = values(src[first] if stage_name in PER_IMAGE_STAGES else src, col)
        if vals.size:
            totals[stage_name] = (float(vals.sum()), int(vals.size))
    grand = sum(t for t, _ in totals.values()) or 1.0
    n_rows = max(len(frame), 1)
    stages = [
        StageTime(name, n, total, total / n_rows * 1000, total / grand)
        for name, (total, n) in totals.items()
    ]
    return Throughput(facts, stages, grand, len(frame), ", ".join(PER_IMAGE_STAGES))


def _ratio(value: float) -> str:
    return str(round(value)) if abs(value - round(value)) < 1e-9 else f"{value:.2f}"


def _stamp(value: object) -> str | None:
    """A run.json time (``2026-12-02T10:06:37Z``) as a shard-name stamp (``20261202T100637``)."""
    if not isinstance(value, str):
        return None
    stamp = value.replace("-", "").replace(":", "").removesuffix("Z")
    return stamp if re.fullmatch(r"\d{8}T\d{6}", stamp) else None


def this_run_rows(loaded: Loaded) -> np.ndarray | None:
    """Which rows of ``frame`` the last run wrote (a boolean mask), or None when that cannot be
    told.

    A run writes its shards as ``part-<stamp>-<pid>-<seq>.parquet`` with one stamp and pid, taken
    after the ``started`` time run.json records; earlier runs' shards have earlier stamps. So the
    run's rows are those of the one writer stamped between ``started`` and ``finished``, when
    they number ``counts.this_run``. Failing that, a run with nothing done before wrote every
    row when the Parquet holds exactly ``this_run`` rows.
    """
    run = loaded.run or {}
    counts = run.get("counts") or {}
    this_run = _count(counts.get("this_run"))
    if this_run is None:
        return None
    n_rows = len(loaded.frame)
    if this_run == 0:
        return np.zeros(n_rows, dtype=bool)
    started, finished = _stamp(run.get("started")), _stamp(run.get("finished"))
    if started is not None and sum(n for _, n in loaded.shards) == n_rows:
        writers = {}
        for name, _ in loaded.shards:
            m = _SHARD_NAME.match(name)
            if m and started <= m.group(1) and (finished is None or m.group(1) <= finished):
                writers[name] = (m.group(1), m.group(2))
        if len(set(writers.values())) == 1:
            mask = np.repeat(
                [name in writers for name, _ in loaded.shards], [n for _, n in loaded.shards]
            )
            if int(mask.sum()) == this_run:
                return mask
    if counts.get("done_before") == 0 and n_rows == this_run:
        return np.ones(n_rows, dtype=bool)
    return None
