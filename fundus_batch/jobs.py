"""Shared entry point of the Ray job scripts in ``jobs/`` (argument parsing and exit codes)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fundus_batch import outpaths, pipeline
from fundus_batch.config import ConfigError, RunConfig, load_config
from fundus_batch.console import interrupted_exit_code, run_on_console, sigterm_raises
from fundus_batch.io import storage
from fundus_batch.lease import LeaseError
from fundus_batch.manifest import ManifestError
from fundus_batch.outpaths import OutsideOutError
from fundus_batch.output import OutputStore
from fundus_batch.quality import GateCounts
from fundus_batch.run_settings import SettingsMismatchError


def keep_ray_log(config: RunConfig, log_path: Path) -> str:
    """Copy Ray's log file of the run to ``OUT/logs/`` (credentials redacted, as in every log
    the project writes) and return its URI there.

    A job's driver writes it to the head node's temporary folder, which goes with the node (a
    KubeRay head pod); in OUT it stays beside the rows it explains.
    """
    store = OutputStore(config.out, config.out_storage_options, retries=config.storage_retries)
    text = storage.redact(log_path.read_text(encoding="utf-8", errors="replace"))
    return store.write_file(f"{outpaths.LOGS_DIR}/{log_path.name}", text.encode())


def job_main(argv: list[str] | None, description: str, mode: str | None = None) -> int:
    """Parse ``--config`` (+ overrides), run the pipeline, print a JSON summary.

    As in the CLI, Ray's own output goes to a log file on the driver's node unless
    ``--verbose``; after the run it is copied to ``OUT/logs/`` (:func:`keep_ray_log`; the
    summary's ``ray_log`` names the copy, or the node's file when copying failed). The config's
    ``progress`` prints a progress line every few seconds to the job log.

    Exit codes: 0 when every manifest row is accounted for, 1 when the run is incomplete,
    2 when it is refused before any work starts (the config, the manifest, settings that differ
    from OUT's, another run holding OUT's lease), 130 on Ctrl-C and 143 on SIGTERM (``ray job
    stop``; OUT's lease released, the rows written kept for a resume). A run that fails or is
    stopped after Ray started still gets its Ray log copied to ``OUT/logs/``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML run config")
    fields = RunConfig.model_fields
    for name in ("manifest", "out"):
        parser.add_argument(f"--{name}", help=f"overrides the config: {fields[name].description}")
    limit = fields["limit"].description
    parser.add_argument("--limit", type=int, help=f"overrides the config: {limit}")
    parser.add_argument(
        "--verbose", action="store_true", help="Ray's own output in the job log, not a file"
    )
    args = parser.parse_args(argv)
    overrides = {"manifest": args.manifest, "out": args.out, "limit": args.limit, "mode": mode}
    log_paths: list[Path] = []

    def say(line: str) -> None:
        print(line, file=sys.stderr)

    try:
        with sigterm_raises():
            config = load_config(args.config, overrides)
            summary, log_path = run_on_console(
                lambda progress: pipeline.run(config, progress=progress),
                verbose=args.verbose,
                progress=config.progress,
                say=say,
                on_log=log_paths.append,
            )
    except (ConfigError, ManifestError, SettingsMismatchError, LeaseError, OutsideOutError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # refused before any work
        return 2
    except BaseException as exc:
        # A failed run's log matters most: keep it where it outlives the node (an empty log
        # is removed before this: nothing to keep).
        if log_paths and log_paths[0].exists():
            _keep_log(config, log_paths[0])
        code = interrupted_exit_code(exc)
        if code is None:
            raise
        kept = f": {storage.redact(config.out)} keeps the rows written so far" if log_paths else ""
        say(f"interrupted ({'Ctrl-C' if code == 130 else 'SIGTERM'}){kept}")
        return code
    ray_log = None if log_path is None else _keep_log(config, log_path)
    print(
        json.dumps(
            {
                "out": summary.out,
                "mode": config.mode,
                "rows_in": summary.rows_in,
                "ok": summary.ok,
                "failed": summary.failed,
                "done_before": summary.done_before,
                "complete": summary.complete,
                "not_redone": summary.not_redone,
                "seconds": round(summary.seconds, 1),
                "quality_gate": _quality_gate(summary.quality),
                "ray_log": ray_log,
            }
        )
    )
    return 0 if summary.complete else 1


def _quality_gate(gate: GateCounts | None) -> dict[str, Any] | None:
    """The summary's quality gate: how many ok rows passed of how many, the term most rows
    broke, and the line the CLI prints; None when the run had no rule."""
    if gate is None:
        return None
    most = gate.most_broken
    return {
        "passed": gate.passed,
        "judged": gate.judged,
        "most_broken": None if most is None else {"term": most[0], "rows": most[1]},
        "text": gate.line(),
    }


def _keep_log(config: RunConfig, log_path: Path) -> str:
    """Copy Ray's log to OUT/logs; the copy's URI, or the node's path when copying failed."""
    try:
        return keep_ray_log(config, log_path)
    except Exception as exc:  # the run's result stands; only its log stays on the node
        reason = storage.redact(f"{type(exc).__name__}: {exc}")
        print(f"warning: Ray's log stays at {log_path}: {reason}", file=sys.stderr)
        return str(log_path)
