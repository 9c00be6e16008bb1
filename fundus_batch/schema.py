"""The Arrow schema of pipeline rows: the Parquet output and the working columns between stages.

One schema for the whole flow keeps column types stable across blocks (a column that is null in
one block and a string in another would otherwise break concatenation). Stages build rows as
dicts; :func:`to_table` fills every missing column with null.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import pyarrow as pa

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STAGES = ("fetch", "preprocess", "degrade", "enhance", "score", "write")
IMAGE_ROLES = ("clean", "degraded", "enhanced")
# The column stems of the no-reference metrics (``metrics.noref.NOREF_METRICS``, kept equal by a
# test), named here so that the schema does not import the metrics.
NOREF_NAMES = (
    "nr_luminance",
    "nr_uniformity",
    "nr_rms_contrast",
    "nr_laplacian_var",
    "nr_blur_effect",
    "nr_overexposed",
    "nr_underexposed",
)
# sha256 of a canonical JSON of a row's other (non-null) columns; see row_checksum.
ROW_CHECKSUM = "row_sha256"


def _noref_fields() -> list[pa.Field]:
    return [
        pa.field(f"{name}_{role}", pa.float64()) for role in IMAGE_ROLES for name in NOREF_NAMES
    ]


_CORE_FIELDS: list[pa.Field] = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("variant", pa.int32()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("failed_stage", pa.string()),
    pa.field("source_uri", pa.string()),
    pa.field("split", pa.string()),
    pa.field("vessel_gt_uri", pa.string()),
    pa.field("source_width", pa.int32()),
    pa.field("source_height", pa.int32()),
    pa.field("fov_cx", pa.float64()),
    pa.field("fov_cy", pa.float64()),
    pa.field("fov_r", pa.float64()),
    pa.field("fov_status", pa.string()),
    pa.field("size", pa.int32()),
    pa.field("preset", pa.string()),
    pa.field("type_code", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("id_hash", pa.string()),
    pa.field("params_json", pa.string()),
    pa.field("blur_sigma", pa.float64()),
    pa.field("n_spots", pa.int32()),
    pa.field("hole_strength", pa.float64()),
    pa.field("brightness", pa.float64()),
    pa.field("contrast", pa.float64()),
    pa.field("saturation", pa.float64()),
    pa.field("clean_uri", pa.string()),
    pa.field("mask_uri", pa.string()),
    pa.field("degraded_uri", pa.string()),
    pa.field("enhanced_uri", pa.string()),
    pa.field("clean_sha256", pa.string()),
    pa.field("mask_sha256", pa.string()),
    pa.field("degraded_sha256", pa.string()),
    pa.field("enhanced_sha256", pa.string()),
    pa.field("model_name", pa.string()),
    pa.field("model_sha256", pa.string()),
    pa.field("enhance_device", pa.string()),
    pa.field("enhance_change", pa.float64()),
    pa.field("psnr_degraded", pa.float64()),
    pa.field("ssim_degraded", pa.float64()),
    pa.field("ms_ssim_degraded", pa.float64()),
    pa.field("psnr_enhanced", pa.float64()),
    pa.field("ssim_enhanced", pa.float64()),
    pa.field("ms_ssim_enhanced", pa.float64()),
    *_noref_fields(),
    *[pa.field(f"vessel_{m}_{role}", pa.float64()) for role in IMAGE_ROLES for m in ("auc", "f1")],
    pa.field("vessel_segmenter", pa.string()),
    pa.field("metric_version", pa.string()),
    pa.field("quality_ok", pa.bool_()),
    pa.field("quality_failed", pa.string()),
    *[pa.field(f"seconds_{stage}", pa.float64()) for stage in STAGES],
    pa.field("fundus_batch_version", pa.string()),
    pa.field(ROW_CHECKSUM, pa.string()),
]

# Columns that exist only between stages and never reach Parquet.
WORK_FIELDS: list[pa.Field] = [
    pa.field("source_mask_uri", pa.string()),
    pa.field("raw_bytes", pa.binary()),
    pa.field("clean_png", pa.binary()),
    pa.field("mask_png", pa.binary()),
    pa.field("degraded_png", pa.binary()),
    pa.field("enhanced_png", pa.binary()),
    pa.field("vessel_gt_png", pa.binary()),
    pa.field("pending_variants", pa.list_(pa.int32())),
]

OUTPUT_COLUMNS: tuple[str, ...] = tuple(f.name for f in _CORE_FIELDS)
WORK_COLUMNS: tuple[str, ...] = tuple(f.name for f in WORK_FIELDS)
# Every row key the stages use: a manifest column may not carry one of these names.
INTERNAL_COLUMNS: frozenset[str] = frozenset(OUTPUT_COLUMNS) | frozenset(WORK_COLUMNS)


def output_schema(passthrough: pa.Schema | None = None) -> pa.Schema:
    """Schema of the Parquet rows: core columns, then the manifest's pass-through columns."""
    extra = list(passthrough) if passthrough is not None else []
    return pa.schema(_CORE_FIELDS + extra)


def work_schema(passthrough: pa.Schema | None = None) -> pa.Schema:
    """Schema of rows travelling between stages (output columns plus working bytes)."""
    return pa.schema(list(output_schema(passthrough)) + WORK_FIELDS)


def row_checksum(row: Mapping[str, object]) -> str:
    """sha256 of a canonical JSON of ``row`` (as ``pa.Table.to_pylist`` gives it): every column
    but the checksum itself, null columns left out, keys sorted."""
    values = {k: v for k, v in row.items() if k != ROW_CHECKSUM and v is not None}
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def with_row_checksums(table: pa.Table) -> pa.Table:
    """``table`` with its ``row_sha256`` column (re)computed from every row's other values."""
    digests = pa.array([row_checksum(r) for r in table.to_pylist()], pa.string())
    if ROW_CHECKSUM in table.column_names:
        return table.set_column(table.schema.get_field_index(ROW_CHECKSUM), ROW_CHECKSUM, digests)
    return table.append_column(ROW_CHECKSUM, digests)


def to_table(rows: Iterable[Mapping[str, object]], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly ``schema``'s columns; absent keys become null."""
    names = schema.names
    columns: dict[str, list[object]] = {name: [] for name in names}
    for row in rows:
        for name in names:
            columns[name].append(row.get(name))
    return pa.table(columns, schema=schema)


def failed(row: dict, stage: str, exc: BaseException | str) -> dict:
    """Mark ``row`` failed at ``stage`` with a one-line reason (keeps the first failure)."""
    if row.get("status") == STATUS_FAILED:
        return row
    from fundus_batch.io.storage import redact

    message = redact(exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}")
    row["status"] = STATUS_FAILED
    row["failed_stage"] = stage
    row["error"] = " ".join(str(message).split())[:500]
    return row
