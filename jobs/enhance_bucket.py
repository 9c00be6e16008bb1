"""Ray job: enhance every image of a manifest (e.g. a bucket of real low-quality photographs)
with Cofe-Net: on GPU actors with ``jobs/configs/enhance_bucket.yaml`` (``enhance.device:
cuda``; they wait for GPU nodes an autoscaling cluster adds), on CPU actors with
``enhance_bucket_cpu.yaml``.

    ray job submit --working-dir . -- \
        python jobs/enhance_bucket.py --config jobs/configs/enhance_bucket.yaml
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
    sys.exit(job_main(sys.argv[1:], "Enhance a manifest of photographs.", mode="enhance"))
