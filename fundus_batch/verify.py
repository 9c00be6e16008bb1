"""Check a finished output folder: every expected row present once, every image there and intact.

``verify(out, manifest)`` reads ``run.json`` (for the mode and number of variants), every Parquet
shard and, optionally, the manifest, then re-reads every image a row references: it must exist,
decode, have the working size and hash to the recorded ``*_sha256``. Each problem is one line
naming the image id, the variant and what is wrong.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from fundus_batch import shards
from fundus_batch.imaging import sha256_hex
from fundus_batch.io import codecs, storage
from fundus_batch.output import RUN_JSON, OutputStore
from fundus_batch.schema import STATUS_FAILED, STATUS_OK

if TYPE_CHECKING:
    from fundus_batch.degrade import Preset

__all__ = ["RepairReport", "VerifyReport", "repair", "verify"]

ROLES = ("clean", "mask", "degraded", "enhanced")
_MAX_LISTED = 1000  # problems kept verbatim; the rest are counted


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok`` is True when there is no problem at all; ``notes``
    are observations that are not damage (e.g. variants beyond the last run's count)."""

    out: str
    manifest: str | None = None
    mode: str | None = None
    variants: int | None = None
    rows: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    expected_rows: int | None = None
    missing_rows: int = 0
    duplicate_rows: int = 0
    unexpected_rows: int = 0
    files_checked: int = 0
    bad_files: int = 0
    deep_checked: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    problems_not_listed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.problems_not_listed

    def add(self, problem: str) -> None:
        if len(self.problems) < _MAX_LISTED:
            self.problems.append(problem)
        else:
            self.problems_not_listed += 1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def summary(self) -> str:
        """A few lines for a terminal: verdict, counts, then every problem."""
        expected = "?" if self.expected_rows is None else str(self.expected_rows)
        variants = "-" if self.variants is None else str(self.variants)
        lines = [
            f"verify {self.out}: {'OK' if self.ok else 'FAILED'}",
            f"mode {self.mode or '?'}, variants {variants}, shards {self.shards}",
            f"rows {self.rows} (ok {self.rows_ok}, failed {self.rows_failed}); expected {expected}",
            f"missing {self.missing_rows}, duplicated {self.duplicate_rows}, "
            f"unexpected {self.unexpected_rows}",
            f"files checked {self.files_checked}, bad {self.bad_files}",
        ]
        if self.deep_checked:
            lines.append(f"rows recomputed from their files (--deep): {self.deep_checked}")
        lines += [f"note: {n}" for n in self.notes]
        if self.problems:
            lines.append(f"problems ({len(self.problems) + self.problems_not_listed}):")
            lines += [f"  {p}" for p in self.problems]
        if self.problems_not_listed:
            lines.append(f"  ... and {self.problems_not_listed} more")
        return "\n".join(lines)


def _label(image_id: Any, variant: Any) -> str:
    v = "-" if variant is None else str(variant)
    return f"{image_id!r} variant {v}"


@dataclass
class _Scanned:
    """What one pass over the shards keeps: the columns the checks need, and where each of
    its rows lives (so that ``--deep`` re-reads only the shards of the rows it picks)."""

    table: pa.Table | None
    shard_rows: list[tuple[str, int]]  # (shard, rows) in table order

    def locate(self, index: int) -> tuple[str, int]:
        """The shard and the row within it of row ``index`` of ``table``."""
        for path, count in self.shard_rows:
            if index < count:
                return path, index
            index -= count
        raise IndexError(index)


_KEPT = ["image_id", "variant", "status", "failed_stage", "error", "size", "metric_version"] + [
    f"{role}_{key}" for role in ROLES for key in ("uri", "sha256")
]


def _scan_shards(store: OutputStore, report: VerifyReport) -> _Scanned:
    """Read the shards one at a time: check each row against its ``row_sha256`` and keep only
    the columns the other checks need. An unreadable shard is a problem and is skipped; shards
    whose columns cannot be combined (a column's type changed between runs) are a problem."""
    kept: list[pa.Table] = []
    shard_rows: list[tuple[str, int]] = []
    schemas: list[pa.Schema] = []
    unchecked = legacy = 0
    paths = store.shard_paths()
    report.shards = len(paths)
    for path in paths:
        try:
            table = shards.read_shard(path, None, store.storage_options, retries=store.retries)
        except OSError as exc:  # corrupt, gone since the listing, or storage still failing
            if isinstance(exc, shards.CorruptShardError):
                reason = exc.reason
            else:
                reason = f"{type(exc).__name__}: {storage.redact(str(exc))}"
            report.add(f"shard {storage.redact(path)} is unreadable: {reason}")
            continue
        if _check_row_checksums(table, report):
            legacy += 1
            unchecked += table.num_rows
        schemas.append(table.schema)
        kept.append(table.select([c for c in _KEPT if c in table.column_names]))
        shard_rows.append((path, table.num_rows))
    if unchecked:
        report.notes.append(
            f"{unchecked} row(s) from {legacy} shard(s) written before row checksums: "
            "their values are not checked"
        )
    try:
        if schemas:
            pa.unify_schemas(schemas, promote_options="permissive")
        return _Scanned(shards.concat_tables(kept), shard_rows)
    except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:  # e.g. a manifest column's type changed
        report.add(f"the shards' columns do not agree: {exc}")
        return _Scanned(None, [])


def _manifest_ids(
    manifest: str, storage_options: dict | None, report: VerifyReport
) -> list[str] | None:
    """Every image id of the manifest in file order, or None (reported) if it cannot be read."""
    from fundus_batch.manifest import ManifestError
    from fundus_batch.manifest_stream import manifest_ids, scan_manifest

    try:
        scan_manifest(manifest, storage_options=storage_options)
        return manifest_ids(manifest, storage_options)
    except (ManifestError, OSError) as exc:
        report.add(f"manifest {storage.redact(manifest)} cannot be read: {exc}")
        return None


class _FileCheck:
    """Reads, hashes and decodes each referenced file once (clean/mask are shared by rows)."""

    def __init__(self, storage_options: dict | None, threads: int) -> None:
        self.storage_options = storage_options or {}
        self.threads = threads

    def _one(self, uri: str) -> tuple[str | None, tuple[int, ...] | None, str | None]:
        """(sha256, decoded shape, error) of one file."""
        try:
            data = storage.read_bytes(uri, storage_options=self.storage_options)
        except FileNotFoundError:
            return None, None, "is missing"
        except Exception as exc:
            return None, None, f"cannot be read: {type(exc).__name__}: {storage.redact(str(exc))}"
        digest = sha256_hex(data)
        try:
            shape = codecs.decode_image(data).shape
        except Exception as exc:
            return digest, None, f"does not decode: {type(exc).__name__}: {exc}"
        return digest, tuple(shape), None

    def run(self, uris: Iterable[str]) -> dict[str, tuple[str | None, tuple | None, str | None]]:
        unique = sorted(set(uris))
        if self.threads <= 1 or len(unique) <= 1:
            return {u: self._one(u) for u in unique}
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            return dict(zip(unique, pool.map(self._one, unique), strict=True))


def verify(
    out: str | os.PathLike[str],
    manifest: str | None = None,
    *,
    storage_options: dict | None = None,
    manifest_storage_options: dict | None = None,
    check_files: bool = True,
    threads: int = 8,
    deep: int = 0,
    deep_seed: int | None = None,
) -> VerifyReport:
    """Check the output folder ``out`` (local path or fsspec URL) and return a report; the
    manifest is read with ``manifest_storage_options`` when given, else ``storage_options``.

    Proves, problem by problem: ``run.json`` and at least one shard are readable; every row has
    status ``ok`` or ``failed`` (failed rows name their stage and error); no (image_id, variant)
    pair appears twice; in ``pairs`` mode each image has every variant ``0..variants-1`` (in
    ``enhance``/``score`` modes one row with a null variant); with ``manifest``, every manifest
    image is present and no other image is; every image URI a row records exists, decodes to
    the row's working size and has the recorded sha256. ``storage_options`` serve both the
    output and the manifest. Every row's values match its ``row_sha256``; every image URI lies
    inside ``out`` (relative URIs resolve against ``out``); where the folder's settings have
    metrics on, every ok row carries its ``metric_version``. With ``deep`` > 0, that many ok rows
    (chosen at random, ``deep_seed``) are recomputed from their files: params replayed and
    redrawn from the seed, metrics recomputed.
    """
    out = os.fspath(out)
    report = VerifyReport(out=out, manifest=manifest)
    store = OutputStore(out, storage_options)
    try:
        run_info = store.read_json(RUN_JSON)
    except (OSError, ValueError) as exc:
        report.add(f"{RUN_JSON} cannot be read: {type(exc).__name__}: {exc}")
        run_info = None
    if run_info is None and not report.problems:
        report.add(f"{RUN_JSON} is missing: not a fundus_batch output folder, or never started")
    config = (run_info or {}).get("config") or {}
    report.mode = config.get("mode")
    if run_info is not None and run_info.get("state") != "complete":
        report.add(f"{RUN_JSON} says the last run is {run_info.get('state')!r}, not 'complete'")

    scanned = _scan_shards(store, report)
    table = scanned.table
    if table is None:
        report.add(f"no readable Parquet shard under {storage.redact(store.pairs_uri)}")
        rows: list[dict[str, Any]] = []
    else:
        rows = table.to_pylist()
        _resolve_row_uris(rows, out, report)
    report.rows = len(rows)
    if report.mode is None:  # no run.json: rows with variants mean pairs mode
        pairs = any(r.get("variant") is not None for r in rows)
    else:
        pairs = report.mode == "pairs"
    if pairs and isinstance(config.get("variants"), int):
        report.variants = config["variants"]

    _check_rows(rows, report, pairs)
    unscored = 0
    if ((run_info or {}).get("settings") or {}).get("compute_metrics"):
        unscored = _check_scored(rows, report)
    manifest_options = (
        storage_options if manifest_storage_options is None else manifest_storage_options
    )
    covered = _widest_complete_run(run_info)
    _check_coverage(rows, report, pairs, manifest, manifest_options, config, covered)
    unenhanced = 0
    if check_files:
        enhance = bool((config.get("enhance") or {}).get("enabled")) or report.mode == "enhance"
        unenhanced = _check_files(
            rows, report, pairs, enhance, _FileCheck(storage_options, threads)
        )
    limit = config.get("limit")
    for missing, what in ((unenhanced, "enhancement"), (unscored, "metrics")):
        if missing and isinstance(limit, int):
            report.notes.append(
                f"the last run had --limit {limit}: rows of later images made by an earlier run "
                f"without {what} get it from a run without --limit"
            )
    if deep > 0 and table is not None:
        settings = (run_info or {}).get("settings") or {}
        _check_deep(scanned, rows, store, out, report, deep, deep_seed, settings)
    return report


def _check_rows(rows: list[dict[str, Any]], report: VerifyReport, pairs: bool) -> None:
    extra = 0
    counts = Counter((r.get("image_id"), r.get("variant")) for r in rows)
    for (image_id, variant), n in sorted(counts.items(), key=lambda kv: str(kv[0])):
        if n > 1:
            report.duplicate_rows += n - 1
            report.add(f"{_label(image_id, variant)}: {n} rows (duplicate)")
    for row in rows:
        label = _label(row.get("image_id"), row.get("variant"))
        status = row.get("status")
        if status == STATUS_OK:
            report.rows_ok += 1
        elif status == STATUS_FAILED:
            report.rows_failed += 1
            if not row.get("failed_stage") or not row.get("error"):
                report.add(f"{label}: failed without a failed_stage and an error message")
        else:
            report.add(f"{label}: status is {status!r}, not 'ok' or 'failed'")
        variant = row.get("variant")
        if pairs and variant is None:
            report.add(f"{label}: pairs-mode row without a variant")
        elif (
            pairs
            and report.variants is not None
            and variant is not None
            and not 0 <= variant < report.variants
        ):
            extra += 1
        elif not pairs and variant is not None:
            report.add(f"{label}: {report.mode}-mode row with a variant (expected null)")
    if extra:  # an earlier run asked for more variants: more data, not damage
        assert report.variants is not None  # extra counts only against a known variant count
        report.notes.append(
            f"{extra} row(s) have variants beyond the last run's 0..{report.variants - 1}"
        )


def _check_scored(rows: list[dict[str, Any]], report: VerifyReport) -> int:
    """In a folder whose settings have metrics on, every ok row was scored; returns how many
    were not."""
    unscored = 0
    for row in rows:
        if row.get("status") == STATUS_OK and not row.get("metric_version"):
            unscored += 1
            label = _label(row.get("image_id"), row.get("variant"))
            report.add(f"{label}: ok row without metrics (no metric_version)")
    return unscored


def _widest_complete_run(run_info: dict[str, Any] | None) -> int:
    """Manifest images the widest complete run in ``run.json``'s history covered (0: none)."""
    widest = 0
    for entry in (run_info or {}).get("history") or []:
        if not isinstance(entry, dict) or entry.get("state") != "complete":
            continue
        rows_in = (entry.get("counts") or {}).get("rows_in")
        settings = entry.get("settings") or {}
        per_image = settings.get("variants") if settings.get("mode") == "pairs" else 1
        if isinstance(rows_in, int) and isinstance(per_image, int) and per_image > 0:
            widest = max(widest, rows_in // per_image)
    return widest


def _check_coverage(
    rows: list[dict[str, Any]],
    report: VerifyReport,
    pairs: bool,
    manifest: str | None,
    storage_options: dict | None,
    config: dict,
    covered: int = 0,
) -> None:
    """Every expected (image, variant) has a row: the manifest's images up to the last run's
    ``--limit``, or as far as the widest complete run in the history went (``covered``)."""
    present = {(r.get("image_id"), r.get("variant")) for r in rows}
    ids = sorted({str(r.get("image_id")) for r in rows})
    if manifest is not None:
        manifest_ids = _manifest_ids(manifest, storage_options, report)
        if manifest_ids is not None:
            known = set(manifest_ids)
            per_image = Counter(str(r.get("image_id")) for r in rows)
            for image_id in ids:
                if image_id not in known:
                    n = per_image[image_id]
                    report.unexpected_rows += n
                    report.add(f"{image_id!r}: {n} row(s) for an image not in the manifest")
            # The images after the last run's --limit need not be there yet, unless an
            # earlier complete run went further.
            limit = config.get("limit")
            if isinstance(limit, int) and max(limit, covered) < len(manifest_ids):
                upto = max(limit, covered)
                with_rows = {image_id for image_id, _ in present}
                absent = sum(1 for i in manifest_ids[upto:] if i not in with_rows)
                if absent:
                    report.notes.append(
                        f"{absent} manifest image(s) after the first {upto} (the widest "
                        "complete run; the last run had --limit "
                        f"{limit}) have no rows yet"
                    )
                manifest_ids = manifest_ids[:upto]
            ids = manifest_ids
    if pairs and report.variants is None:
        return  # without run.json the variants an image should have are unknown
    variants: list[int | None] = (
        list(range(report.variants)) if pairs and report.variants is not None else [None]
    )
    report.expected_rows = len(ids) * len(variants)
    for image_id in ids:
        for variant in variants:
            if (image_id, variant) not in present:
                report.missing_rows += 1
                report.add(f"{_label(image_id, variant)}: no row in the output")


def _check_files(
    rows: list[dict[str, Any]], report: VerifyReport, pairs: bool, enhance: bool, check: _FileCheck
) -> int:
    """Check every row's files; returns how many ok rows lack the enhanced image required."""
    required = {"clean", "mask"} | ({"degraded"} if pairs else set())
    if enhance:
        required.add("enhanced")
    uris = [r[f"{role}_uri"] for r in rows for role in ROLES if r.get(f"{role}_uri")]
    results = check.run(uris)
    report.files_checked = len(results)
    bad_uris: set[str] = set()
    unenhanced = 0
    for row in rows:
        label = _label(row.get("image_id"), row.get("variant"))
        for role in ROLES:
            uri = row.get(f"{role}_uri")
            if not uri:
                if row.get("status") == STATUS_OK and role in required:
                    report.add(f"{label}: ok row without {role}_uri")
                    unenhanced += role == "enhanced"
                continue
            digest, shape, error = results[uri]
            if error is not None:
                bad_uris.add(uri)
                report.add(f"{label}: {role} file {uri} {error}")
                if digest is None:
                    continue
            assert digest is not None  # a file without a digest always carries an error
            recorded = row.get(f"{role}_sha256")
            if digest != recorded:
                bad_uris.add(uri)
                report.add(
                    f"{label}: {role} file {uri} has sha256 {digest[:12]}..., "
                    f"the row records {str(recorded)[:12]}..."
                )
            size = row.get("size")
            if shape is not None and size and shape[:2] != (size, size):
                bad_uris.add(uri)
                report.add(f"{label}: {role} file {uri} is {shape[1]}x{shape[0]}, not {size}")
    report.bad_files = len(bad_uris)
    return unenhanced


def _resolve_row_uris(rows: list[dict[str, Any]], out: str, report: VerifyReport) -> None:
    """Turn every recorded image URI into a readable one (relative URIs resolve against
    ``out``, so a moved or copied OUT verifies) and report those that point outside ``out``."""
    from fundus_batch import outpaths

    real_dirs: dict[str, str] = {}
    # The variants of an image share its clean and mask files: one resolved string for all.
    seen: dict[str, tuple[str, str | None]] = {}
    for row in rows:
        for role in ROLES:
            stored = row.get(f"{role}_uri")
            if not stored:
                continue
            if stored not in seen:
                problem = outpaths.stored_uri_problem(out, stored)
                resolved = outpaths.resolve(out, stored) if problem is None else None
                if resolved is not None:
                    problem = outpaths.link_escape(out, resolved, real_dirs)
                if resolved is None and outpaths.is_relative(stored):
                    resolved = out.rstrip("/") + "/" + stored  # '..' inside: as a reader would
                seen[stored] = (resolved or stored, problem)
            row[f"{role}_uri"], problem = seen[stored]
            if problem is not None:
                label = _label(row.get("image_id"), row.get("variant"))
                report.add(f"{label}: {role}_uri {storage.redact(stored)} {problem}")


def _check_row_checksums(table: pa.Table, report: VerifyReport) -> bool:
    """Recompute the ``row_sha256`` of every row of one shard from its values: a changed
    metric, seed, ``params_json``, status or URI no longer matches the checksum written with
    the row. Returns True, checking nothing, for a shard written before checksums existed."""
    from fundus_batch.schema import ROW_CHECKSUM, row_checksum

    if ROW_CHECKSUM not in table.column_names:
        return True
    for batch in table.to_batches(4096):
        for row in batch.to_pylist():
            label = _label(row.get("image_id"), row.get("variant"))
            recorded = row.get(ROW_CHECKSUM)
            if recorded is None:
                report.add(f"{label}: row has no {ROW_CHECKSUM}")
            elif row_checksum(row) != recorded:
                report.add(
                    f"{label}: row values do not match their {ROW_CHECKSUM} "
                    "(a value was changed after the row was written)"
                )
    return False


def _close(stored: Any, fresh: float, rel_tol: float = 1e-5, abs_tol: float = 1e-8) -> bool:
    if stored is None:
        return False
    stored = float(stored)
    if math.isnan(stored) or math.isnan(fresh):
        return math.isnan(stored) and math.isnan(fresh)
    return math.isclose(stored, fresh, rel_tol=rel_tol, abs_tol=abs_tol)


def _same_record(drawn: Any, recorded: Any) -> bool:
    """Whether a redrawn degradation record equals the recorded one: numbers to 1e-9 relative
    when either is a float, since values computed from the image (a hole's ``fov_mean``) differ
    in the last bit between numpy and OpenCV builds; everything else exactly."""
    if isinstance(drawn, dict) and isinstance(recorded, dict):
        return drawn.keys() == recorded.keys() and all(
            _same_record(drawn[k], recorded[k]) for k in drawn
        )
    if isinstance(drawn, list | tuple) and isinstance(recorded, list | tuple):
        return len(drawn) == len(recorded) and all(
            _same_record(a, b) for a, b in zip(drawn, recorded, strict=True)
        )
    if isinstance(drawn, float) or isinstance(recorded, float):
        numbers = all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in (drawn, recorded)
        )
        return numbers and math.isclose(drawn, recorded, rel_tol=1e-9, abs_tol=1e-12)
    return bool(drawn == recorded)


def _redraw_preset(name: Any, recorded: Any) -> Preset | str:
    """The preset a row named ``name`` was drawn from: the custom preset the folder's settings
    record (``recorded``: its definition) when it has that name, else the built-in one. A
    problem (str) when it is neither, or the recorded definition is not a valid preset."""
    from fundus_batch.degrade import PRESETS, Preset, PresetError

    if isinstance(recorded, dict) and recorded.get("name") == name:
        try:
            return Preset.from_dict(recorded)
        except PresetError as exc:
            return f"deep check: run.json's definition of preset {name!r} is invalid ({exc})"
    if isinstance(name, str) and name in PRESETS:
        return PRESETS[name]
    return (
        f"deep check: preset {name!r} is neither built-in nor recorded in run.json: "
        "the row cannot be redrawn from its seed"
    )


def _deep_row(
    row: dict[str, Any], storage_options: dict | None, recorded_preset: Any = None
) -> list[str]:
    """Recompute one ok row from its files: replay ``params_json`` and redraw it from the seed
    with its preset (``recorded_preset``: the folder's recorded setting, a custom preset's
    definition or a built-in name), and recompute its metrics (same metric version only).
    Returns problems."""
    from fundus_batch.degrade import DegradationRecord, degrade, replay, sample_rng
    from fundus_batch.imaging import decode_mask
    from fundus_batch.metrics import METRIC_VERSION, full_reference_metrics, noref_metrics

    def read(role: str) -> bytes | None:
        uri = row.get(f"{role}_uri")
        return None if not uri else storage.read_bytes(uri, storage_options=storage_options)

    problems: list[str] = []
    clean_bytes, mask_bytes = read("clean"), read("mask")
    if clean_bytes is None or mask_bytes is None:
        return ["deep check: no clean image or mask to recompute from"]
    clean = codecs.decode_image(clean_bytes)
    mask = decode_mask(mask_bytes)
    images: dict[str, Any] = {"clean": clean}
    for role in ("degraded", "enhanced"):
        data = read(role)
        if data is not None:
            images[role] = codecs.decode_image(data)
    if row.get("variant") is not None and row.get("params_json") and "degraded" in images:
        lossless = not str(row.get("degraded_uri")).lower().endswith((".jpg", ".jpeg"))
        record = DegradationRecord.from_json(row["params_json"])
        replayed = replay(clean, mask, record)
        diff = float(abs(replayed.astype(int) - images["degraded"].astype(int)).mean())
        if (diff != 0.0) if lossless else (diff > 2.0):
            problems.append(
                f"deep check: params_json replayed on the clean image does not give the degraded "
                f"image (mean difference {diff:.3g} grey levels)"
            )
        if row.get("seed") is not None and row.get("type_code"):
            rng = sample_rng(int(row["seed"]), str(row["image_id"]), int(row["variant"]))
            preset = _redraw_preset(row.get("preset"), recorded_preset)
            if isinstance(preset, str):
                problems.append(preset)
            else:
                _, drawn = degrade(clean, mask, row["type_code"], rng, preset=preset)
                if not _same_record(drawn.to_dict(), record.to_dict()):
                    problems.append(
                        "deep check: seed, image id and variant do not draw the recorded "
                        "params_json"
                    )
    if row.get("metric_version") != METRIC_VERSION:
        return problems  # another metric protocol: its values cannot be recomputed here
    wrong: list[str] = []
    for role, image in images.items():
        for name, value in noref_metrics(image, mask).items():
            column = f"{name}_{role}"
            if column in row and not _close(row[column], float(value)):
                wrong.append(f"{column} {row[column]!r} (recomputed {float(value):.6g})")
        if role != "clean" and row.get(f"psnr_{role}") is not None:
            fr = full_reference_metrics(image, clean, mask)
            for key in ("psnr", "ssim", "ms_ssim"):
                column = f"{key}_{role}"
                if column in row and not _close(row[column], float(fr[key])):
                    wrong.append(f"{column} {row[column]!r} (recomputed {float(fr[key]):.6g})")
    if wrong:
        problems.append("deep check: stored metrics differ from the files: " + ", ".join(wrong))
    return problems


def _against_settings(row: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """What a row's own record says that the folder's recorded settings contradict (or leave
    out): a row that rewrites its seed, type or record would otherwise be recomputed from them
    and agree with itself."""
    from fundus_batch.stages import choose_type

    problems: list[str] = []
    pairs = row.get("variant") is not None
    needed: tuple[str, ...] = ("params_json", "seed", "type_code", "preset") if pairs else ()
    if settings.get("metric_version"):
        needed += ("metric_version",)
    missing = [k for k in needed if row.get(k) in (None, "")]
    if missing:
        problems.append(f"deep check: an ok row without {', '.join(missing)}")
    for key in ("seed", "preset", "metric_version"):
        recorded, own = settings.get(key), row.get(key)
        if key == "preset" and isinstance(recorded, dict):  # a custom preset's definition
            recorded = recorded.get("name")
        if key in needed and None not in (recorded, own) and own != recorded:
            problems.append(f"deep check: {key} {own!r}, the folder's is {recorded!r}")
    types, mode, seed = settings.get("types"), settings.get("type_mode"), settings.get("seed")
    if pairs and types and mode and isinstance(seed, int) and row.get("type_code"):
        expected = choose_type(types, mode, seed, str(row["image_id"]), int(row["variant"]))
        if row["type_code"] != expected:
            problems.append(
                f"deep check: type_code {row['type_code']!r}, the folder's settings draw "
                f"{expected!r}"
            )
    return problems


def _check_deep(
    scanned: _Scanned,
    keys: list[dict[str, Any]],
    store: OutputStore,
    out: str,
    report: VerifyReport,
    sample: int,
    seed: int | None = None,
    settings: dict[str, Any] | None = None,
) -> None:
    """Recompute ``sample`` randomly chosen ok rows (of ``keys``, the rows of ``scanned.table``)
    from their files (see :func:`_deep_row`), after checking that what they are recomputed from
    agrees with the folder's ``settings``."""
    import random

    from fundus_batch import outpaths

    order = [i for i, r in enumerate(keys) if r.get("status") == STATUS_OK]
    order.sort(key=lambda i: (str(keys[i].get("image_id")), keys[i].get("variant") or 0))
    picked = random.Random(seed).sample(order, min(sample, len(order)))
    try:
        chosen = _reread_rows(scanned, store, picked)
    except OSError as exc:
        report.add(f"deep check could not re-read its rows: {type(exc).__name__}: {exc}")
        return
    storage_options = store.storage_options
    for row in chosen:
        label = _label(row.get("image_id"), row.get("variant"))
        stored = [row[f"{role}_uri"] for role in ROLES if row.get(f"{role}_uri")]
        if any(outpaths.stored_uri_problem(out, uri) for uri in stored) or any(
            outpaths.link_escape(out, outpaths.resolve(out, uri)) for uri in stored
        ):
            continue  # already reported; never recompute from files outside OUT
        for role in ROLES:
            if row.get(f"{role}_uri"):
                row[f"{role}_uri"] = outpaths.resolve(out, row[f"{role}_uri"])
        problems = _against_settings(row, settings or {})
        try:
            problems += _deep_row(row, storage_options, (settings or {}).get("preset"))
        except Exception as exc:
            reason = f"{type(exc).__name__}: {storage.redact(str(exc))}"
            problems.append(f"deep check could not run: {reason}")
        for problem in problems:
            report.add(f"{label}: {problem}")
    report.deep_checked = len(chosen)


def _reread_rows(scanned: _Scanned, store: OutputStore, picked: list[int]) -> list[dict[str, Any]]:
    """Rows ``picked`` (indices into ``scanned.table``) with all their columns, in that order,
    each shard read once."""
    located = [scanned.locate(i) for i in picked]
    by_shard: dict[str, pa.Table] = {}
    for path in dict.fromkeys(path for path, _ in located):
        by_shard[path] = shards.read_shard(path, None, store.storage_options, retries=store.retries)
    return [by_shard[path].slice(row, 1).to_pylist()[0] for path, row in located]


@dataclass
class RepairReport:
    """What :func:`repair` changed in an output folder."""

    out: str
    duplicates_removed: int = 0
    state_before: str | None = None
    state_after: str | None = None

    def summary(self) -> str:
        state = (
            f"run.json state {self.state_before!r} -> {self.state_after!r}"
            if self.state_before != self.state_after
            else f"run.json state {self.state_after!r} (unchanged)"
        )
        return f"repair {self.out}: removed {self.duplicates_removed} duplicate row(s); {state}"


def repair(out: str, *, storage_options: dict | None = None, wait: float = 0.0) -> RepairReport:
    """Remove duplicate (image_id, variant) rows from ``out`` (keeping an ``ok`` row over a
    failed one), rewriting each affected shard atomically, then recount the rows into
    ``run.json``. Holds the folder's lease while it works, so it never races a run."""
    import time

    from fundus_batch.lease import OutLease
    from fundus_batch.outpaths import check_out_root
    from fundus_batch.output import Counts

    check_out_root(out)  # shards are rewritten and removed: never through a link out of OUT
    store = OutputStore(out, storage_options)
    report = RepairReport(out=storage.redact(out))
    lease = OutLease(out, storage_options)
    lease.acquire(wait=wait)
    try:
        report.duplicates_removed = store.drop_duplicates()
        run_info = store.read_json(RUN_JSON)
        if run_info is None or not report.duplicates_removed:
            return report  # nothing removed: run.json stays as it was
        report.state_before = report.state_after = run_info.get("state")
        counts = dict(run_info.get("counts") or {})
        rows_in = counts.get("rows_in")
        table = store.read_table(columns=["status", "failed_stage"])
        final = Counts(rows_in=rows_in or 0)
        if table is not None:
            final.add(table)
        if isinstance(rows_in, int) and report.state_before != "running":
            report.state_after = "complete" if rows_in == final.written else "incomplete"
        counts.update({"ok": final.ok, "failed": final.failed})
        counts["failed_by_stage"] = final.failed_by_stage
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        history = list(run_info.get("history") or [])
        history.append(
            {
                "repair": {"duplicates_removed": report.duplicates_removed},
                "finished": stamp,
                "state": report.state_after,
                "counts": counts,
            }
        )
        run_info.update({"state": report.state_after, "counts": counts, "history": history})
        store.write_json(RUN_JSON, run_info)
    finally:
        lease.release()
    return report
