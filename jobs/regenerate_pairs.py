"""Ray job: regenerate a paired (clean, degraded) training set from a manifest.

    ray job submit --working-dir . -- \
        python jobs/regenerate_pairs.py --config jobs/configs/eyepacs_pairs.yaml

Connects to the cluster the job runs on (RAY_ADDRESS is set by the job server), validates the
config and manifest before any work, resumes whatever the output already holds, and exits
non-zero unless every manifest row is accounted for.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import fundus_batch  # noqa: F401  (installed in the cluster image)
except ImportError:  # running from a checkout uploaded with --working-dir
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fundus_batch.jobs import job_main

if __name__ == "__main__":
    sys.exit(job_main(sys.argv[1:], "Regenerate paired training data.", mode="pairs"))
