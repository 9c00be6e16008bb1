"""The bad-input corpus (tests/bad_inputs.py) through the real Ray pipeline, in one run.

Every row must come out with the status, failing stage and message words the contracts promise;
good-but-awkward files must produce decodable outputs; the run must account for every row.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fundus_batch import imaging, pipeline, stages
from fundus_batch.config import build_config
from fundus_batch.io.codecs import decode_image
from fundus_batch.manifest import MAX_ID_BYTES
from fundus_batch.output import OutputStore
from fundus_batch.verify import verify
from tests.bad_inputs import KINDS, OK, build_corpus, is_root, message_problems, write_manifest

SIZE = 128
RUN_BUDGET_S = 120.0

XFAIL: dict[str, str] = {}


@pytest.fixture(scope="module")
def corpus_run(ray_cluster, tmp_path_factory):
    """Build the corpus, run it through the pipeline once; (cases, summary, frame, out, s)."""
    root = tmp_path_factory.mktemp("corpus")
    cases = build_corpus(root / "in")
    manifest = write_manifest(cases, root / "manifest.csv")
    out = root / "out"
    config = build_config(
        {
            "manifest": str(manifest),
            "out": str(out),
            "variants": 1,
            "size": SIZE,
            "progress": False,
            "ray": {"rows_per_block": 4},
        },
        "test",
    )
    start = time.monotonic()
    summary = pipeline.run(config)
    seconds = time.monotonic() - start
    frame = OutputStore(str(out)).read_table().to_pandas()
    return cases, summary, frame, out, seconds


def test_corpus_covers_at_least_twenty_kinds_with_good_and_bad_rows(tmp_path: Path) -> None:
    cases = build_corpus(tmp_path, huge=False)
    assert len({c.kind for c in cases}) >= 20
    assert max(len(c.image_id.encode("utf-8")) for c in cases) == MAX_ID_BYTES
    assert len({c.image_id for c in cases}) == len(cases)
    assert {c.status for c in cases} == {"ok", "failed"}
    assert {c.stage for c in cases if c.status == "failed"} == {"fetch", "preprocess"}


def test_one_run_accounts_for_every_corpus_row_exactly_once(corpus_run) -> None:
    cases, summary, frame, out, seconds = corpus_run
    assert seconds < RUN_BUDGET_S, f"the corpus run took {seconds:.0f} s: something hung"
    assert summary.rows_in == len(cases) == len(frame)
    assert summary.complete and summary.rows_in == summary.ok + summary.failed
    assert sorted(frame.image_id) == sorted(c.image_id for c in cases)
    assert not frame.duplicated(["image_id", "variant"]).any()
    assert set(frame.status) == {"ok", "failed"}
    report = verify(str(out), None)
    assert report.ok, report.summary()


def test_preprocess_failures_are_only_typed_decode_or_fov_errors(corpus_run) -> None:
    """No decoder raised anything but DecodeError/FOVError (a crash or stray exception type
    would show up here as another message prefix)."""
    _, _, frame, _, _ = corpus_run
    pre = frame[frame.failed_stage == "preprocess"]
    assert len(pre) > 0
    assert pre.error.str.match(r"^(DecodeError|FOVError)\(\w+\): ").all(), pre.error.tolist()


def _row(frame: pd.DataFrame, image_id: str) -> pd.Series:
    rows = frame[frame.image_id == image_id]
    assert len(rows) == 1, f"{image_id!r}: {len(rows)} rows"
    return rows.iloc[0]


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=XFAIL[k])) if k in XFAIL else k
        for k in KINDS
    ],
)
def test_corpus_row_has_the_expected_outcome(corpus_run, kind: str) -> None:
    cases, _, frame, out, _ = corpus_run
    by_kind = {c.kind: c for c in cases}
    if kind not in by_kind:
        assert kind == "permission_denied" and is_root()
        pytest.skip("running as root: mode 000 does not stop reads (directory_uri covers fetch)")
    case = by_kind[kind]
    row = _row(frame, case.image_id)
    assert row.status == case.status, f"{kind}: {row.status} ({row.error})"
    if case.status != OK:
        assert row.failed_stage == case.stage, f"{kind}: {row.failed_stage} ({row.error})"
        assert message_problems(case, row.error) == [], f"{kind}: {row.error}"
        assert pd.isna(row.clean_uri) and pd.isna(row.degraded_uri)
        assert not (out / "images" / case.image_id).exists()
        return
    assert pd.isna(row.failed_stage) and pd.isna(row.error)
    assert (row.source_width, row.source_height) == case.display_size
    clean = decode_image((out / row.clean_uri).read_bytes())
    mask = imaging.decode_mask((out / row.mask_uri).read_bytes())
    degraded = decode_image((out / row.degraded_uri).read_bytes())
    assert clean.shape == degraded.shape == (SIZE, SIZE, 3)
    assert Path(row.clean_uri).parent == Path("images") / case.image_id
    if "mean_rgb" in case.extra:  # colours survive the CMYK round trip
        mean = clean[mask > 0].mean(axis=0)
        assert np.abs(mean - np.asarray(case.extra["mean_rgb"])).max() < 12, mean
    if "cx_max" in case.extra:  # the FOV is found where the displayed frame has it
        assert row.fov_cx < case.extra["cx_max"] and abs(row.fov_cy - 103.5) < 6


def test_fifo_uri_fails_at_fetch_instead_of_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result: dict[str, list[dict]] = {}
    row = {"image_id": "fifo", "source_uri": str(fifo), "status": "ok"}

    def fetch() -> None:
        result["rows"] = stages.Fetch(threads=1, retries=0)([row])

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(3.0)
    blocked = worker.is_alive()
    if blocked:  # open a writer and close it so the blocked reader sees EOF and the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5.0)
    assert not blocked, "Fetch was still blocked on the FIFO after 3 s"
    [fetched] = result["rows"]
    assert fetched["status"] == "failed" and fetched["failed_stage"] == "fetch"
