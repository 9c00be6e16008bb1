"""Ray job: regenerate a paired (clean, degraded) training set from a manifest.

    ray job submit --working-dir . -- \
        python jobs/regenerate_pairs.py --config jobs/configs/eyepacs_pairs.yaml

Connects to the cluster the job runs on (RAY_ADDRESS is set by the job server), validates the
config and manifest before any work, resumes whatever the output already holds, and exits
non-zero unless every manifest row is accounted for.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import fundus_batch  # noqa: F401  (installed in the cluster image)
except ImportError:  # running from a checkout uploaded with --working-dir
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fundus_batch import pipeline
from fundus_batch.config import ConfigError, load_config
from fundus_batch.manifest import ManifestError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--manifest", help="override the config's manifest")
    parser.add_argument("--out", help="override the config's output root")
    parser.add_argument("--limit", type=int, help="process only the first N manifest rows")
    args = parser.parse_args(argv)
    overrides = {"manifest": args.manifest, "out": args.out, "limit": args.limit}
    try:
        config = load_config(args.config, overrides)
        summary = pipeline.run(config)
    except (ConfigError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "out": summary.out,
                "rows_in": summary.rows_in,
                "ok": summary.ok,
                "failed": summary.failed,
                "done_before": summary.done_before,
                "complete": summary.complete,
                "seconds": round(summary.seconds, 1),
            }
        )
    )
    return 0 if summary.complete else 1


if __name__ == "__main__":
    sys.exit(main())
