"""Security properties: ids cannot escape the output root, checkpoints and YAML never run code,
credentials never reach outputs or logs.

Unsafe checkpoints through ``models.load_weights`` itself are covered by
tests/models/test_weights.py::test_pickle_that_would_run_code_is_refused_without_running; here
the same attack goes through the enhancement stage's loader.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from fundus_batch import stages
from fundus_batch.config import ConfigError, load_config
from fundus_batch.manifest import ManifestError, validate_frame
from tests.pipeline_inputs import working_row, write_inputs

REPO = Path(__file__).resolve().parents[1]

ESCAPING_IDS = [
    "..",
    ".",
    "../evil",
    "..\\evil",
    "a/../../evil",
    "sub/dir",
    "/etc/passwd",
    "C:\\Windows\\evil",
    "ok\x00.png",
    "line\nbreak",
    "\u202egnp.exe",  # right-to-left override (format character)
    " padded",
    "-rf",
    "x" * 201,
]


@pytest.mark.parametrize("bad_id", ESCAPING_IDS)
def test_unsafe_ids_are_rejected_at_manifest_validation_naming_row_and_field(bad_id: str) -> None:
    frame = pd.DataFrame({"image_id": ["fine_1", bad_id], "uri": ["a.jpg", "b.jpg"]})
    with pytest.raises(ManifestError) as info:
        validate_frame(frame, "test.csv")
    assert info.value.row == 2 and info.value.field == "image_id"


def test_ids_at_the_limit_of_safety_are_accepted() -> None:
    ids = ["a.b", "網膜é_ü" * 10, "x" * 200, "with space", "v1.2_final"]
    manifest = validate_frame(pd.DataFrame({"image_id": ids, "uri": ["u"] * len(ids)}))
    assert list(manifest.frame.image_id) == ids


def _working_row(image_id: str) -> dict:
    return working_row(image_id, seed=1)


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("bad_id", ["..", "../escape", "a/../../escape", "..\\..\\escape"])
def test_write_stage_refuses_ids_that_bypassed_validation(tmp_path: Path, bad_id: str) -> None:
    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    before = _files_under(tmp_path)
    [row] = stages.Write(out=str(out))([_working_row(bad_id)])
    assert row["status"] == "failed" and row["failed_stage"] == "write"
    assert "clean_png" not in row and row.get("clean_uri") is None
    assert _files_under(tmp_path) == before  # nothing written anywhere


def test_write_stage_keeps_absolute_looking_ids_inside_the_output_root(tmp_path: Path) -> None:
    out = tmp_path / "out"
    [row] = stages.Write(out=str(out))([_working_row("/abs/path")])
    written = _files_under(tmp_path)
    assert written and all(out in p.parents for p in written)
    if row["status"] == "ok":
        assert (out / row["clean_uri"]).resolve().is_relative_to(out.resolve())


class _RunsCode:
    """Unpickles to a call of os.system that would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("variant", [None, "cofe-net"])
def test_enhance_loader_refuses_a_checkpoint_that_would_run_code(
    tmp_path: Path, variant: str | None
) -> None:
    import torch

    from fundus_batch.enhance import load_model
    from fundus_batch.models import WeightsError

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"G_conv1.weight": torch.zeros(1), "hook": _RunsCode(marker)}, evil)
    plain = tmp_path / "evil.pkl.pt"
    plain.write_bytes(pickle.dumps({"hook": _RunsCode(marker)}))
    for path in (evil, plain):
        with pytest.raises(WeightsError):
            load_model(str(path), variant=variant)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:os.system ['touch {marker}']",
        "!!python/object:fundus_batch.config.RunConfig {{manifest: m, out: o}}",
        "!!python/name:os.system",
    ],
)
def test_yaml_config_with_python_tags_is_rejected_without_running(tmp_path, payload) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "run.yaml"
    path.write_text(f"manifest: m.csv\nout: o\nseed: {payload.format(marker=marker)}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    top = tmp_path / "top.yaml"
    top.write_text(payload.format(marker=marker) + "\n")
    with pytest.raises(ConfigError):
        load_config(top)
    assert not marker.exists()


# ------------------------------------------------------------------------- credential leaks

KEY = "AKIAFUNDUSTESTKEY123"
SECRET = "fundus-secret-DO-NOT-LEAK"


def _leaks(blob: bytes) -> list[str]:
    return [s for s in (KEY, SECRET) if s.encode() in blob]


def test_leak_check_finds_the_credentials_in_plain_text_and_parquet() -> None:
    """The scanner below would see a leak (guards against a check that cannot fail)."""
    assert _leaks(f"x {KEY} y {SECRET}".encode()) == [KEY, SECRET]
    table = pd.DataFrame({"error": [f"boom {SECRET}"]})
    buf = io.BytesIO()
    table.to_parquet(buf, compression="zstd")
    assert _parquet_text_leaks(buf.getvalue()) == [SECRET]


def _parquet_text_leaks(data: bytes) -> list[str]:
    """Leaks in a Parquet file's decoded values and metadata (its pages are compressed)."""
    parquet = pq.ParquetFile(io.BytesIO(data))
    text = parquet.read().to_pandas().to_csv().encode()
    meta = str(parquet.metadata.metadata or {}).encode() + str(parquet.schema_arrow).encode()
    return _leaks(text + meta + data)


@pytest.mark.slow
def test_credentials_never_reach_parquet_run_json_images_report_stdout_or_ray_logs(
    tmp_path, s3_server, s3_bucket
) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server["storage_options"], skip_instance_cache=True)
    local = write_inputs(tmp_path / "in", n_good=2, size=256)  # plus a corrupt and a missing row
    frame = pd.read_csv(local)
    for row in frame.itertuples():
        if Path(row.uri).exists():
            fs.put(row.uri, f"{s3_bucket}/raw/{Path(row.uri).name}")
    frame["uri"] = [f"s3://{s3_bucket}/raw/{Path(u).name}" for u in frame.uri]
    fs.pipe(f"{s3_bucket}/manifest.csv", frame.to_csv(index=False).encode())
    out = f"s3://{s3_bucket}/out"
    endpoint = s3_server["endpoint_url"]
    config = tmp_path / "run.yaml"
    config.write_text(
        f"manifest: s3://{s3_bucket}/manifest.csv\nout: {out}\n"
        "variants: 1\nsize: 128\nprogress: true\n"
        f"storage_options:\n  key: {KEY}\n  secret: {SECRET}\n"
        f"  client_kwargs: {{endpoint_url: '{endpoint}'}}\n"
        "ray: {num_cpus: 2, rows_per_block: 2}\n"
    )
    assert _leaks(config.read_bytes()) == [KEY, SECRET]  # the only place they may be
    ray_tmp = tempfile.mkdtemp(prefix="fbsec", dir="/tmp")  # short: Ray's socket paths
    try:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp}
        env["PYTHONPATH"] = str(REPO)
        done = subprocess.run(
            [sys.executable, "-m", "fundus_batch", "run", str(config)],
            env=env,
            capture_output=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert b"rows_in" in done.stdout
        options = json.dumps(
            {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint}}
        )
        report = subprocess.run(
            [sys.executable, "-m", "fundus_batch", "report", out, "--storage-options", options],
            env=env,
            capture_output=True,
            timeout=300,
        )
        assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
        for stream in (done.stdout, done.stderr, report.stdout, report.stderr):
            assert _leaks(stream) == []
        logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file()]
        assert any(p.suffix in (".log", ".out", ".err") for p in logs), "no Ray logs found"
        leaked = {str(p): _leaks(p.read_bytes()) for p in logs}
        assert not {p: v for p, v in leaked.items() if v}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    outputs = fs.find(f"{s3_bucket}/out")
    shards = [p for p in outputs if p.endswith(".parquet")]
    assert shards and any(p.endswith("run.json") for p in outputs)
    assert any(p.endswith("report.html") for p in outputs)
    for path in outputs:
        data = fs.cat(path)
        found = _parquet_text_leaks(data) if path.endswith(".parquet") else _leaks(data)
        assert found == [], path
    table = pd.concat(pq.read_table(io.BytesIO(fs.cat(p))).to_pandas() for p in shards)
    assert (table.status == "failed").sum() == 2 and table.error.str.len().min() > 10
    run_json = fs.cat(f"{s3_bucket}/out/run.json").decode()
    assert '"key": "***"' in run_json and '"secret": "***"' in run_json


# ------------------------------------------------------------- presigned and SAS query strings

SIGNED_QUERIES = {
    "aws-v2": "AWSAccessKeyId=AKIAFUNDUSPRESIGN123&Signature=sigV2-DO-NOT-LEAK&Expires=1900000000",
    "aws-v4": (
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=credV4-DO-NOT-LEAK%2F20300101"
        "&X-Amz-Security-Token=tokV4-DO-NOT-LEAK&X-Amz-Signature=sigV4-DO-NOT-LEAK"
    ),
    "azure-sas": "sv=2022-11-02&sp=r&se=2030-01-01T00%3A00%3A00Z&sig=sas-DO-NOT-LEAK",
    "gcs-v4": "X-Goog-Credential=gcred-DO-NOT-LEAK&X-Goog-Signature=gsig-DO-NOT-LEAK",
    "gcs-v2": "GoogleAccessId=gid-DO-NOT-LEAK&Signature=gv2sig-DO-NOT-LEAK",
    "token": "access_token=tok-DO-NOT-LEAK&page=2",
}


@pytest.mark.parametrize("kind", sorted(SIGNED_QUERIES))
def test_redact_masks_every_value_of_a_presigned_or_sas_query_string(kind: str) -> None:
    from fundus_batch.io.storage import redact

    url = f"https://host.example/bucket/manifest.csv?{SIGNED_QUERIES[kind]}"
    text = redact(f"cannot read {url}: denied")
    assert "DO-NOT-LEAK" not in text and "AKIA" not in text
    assert text.startswith("cannot read https://host.example/bucket/manifest.csv?")
    assert text.endswith(": denied")


def test_redact_leaves_ordinary_query_strings_alone() -> None:
    from fundus_batch.io.storage import redact

    url = "https://host.example/m.csv?page=2&skip=10&format=csv"
    assert redact(url) == url


def test_presigned_manifest_and_image_urls_leave_no_secret_in_run_json_rows_or_report(
    ray_cluster, http_folder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fundus_batch import pipeline
    from fundus_batch.config import build_config
    from fundus_batch.report import write_report

    folder, base = http_folder
    local = write_inputs(tmp_path / "in", n_good=1, broken=False, size=256, vessels=True)
    frame = pd.read_csv(local)
    shutil.copy(frame.uri[0], folder / "img.jpg")
    shutil.copy(frame.vessel_uri[0], folder / "vessel.png")
    frame["uri"] = [f"{base}/img.jpg?{SIGNED_QUERIES['aws-v4']}"]
    frame["vessel_uri"] = [f"{base}/vessel.png?{SIGNED_QUERIES['azure-sas']}"]
    frame.to_csv(folder / "manifest.csv", index=False)
    manifest = f"{base}/manifest.csv?{SIGNED_QUERIES['aws-v2']}"
    out = tmp_path / "out"
    config = build_config(
        {"manifest": manifest, "out": str(out), "variants": 1, "size": 128, "progress": False},
        "test",
    )
    summary = pipeline.run(config)
    errors = pq.read_table(str(out / "pairs")).column("error").to_pylist()
    assert (summary.ok, summary.failed) == (1, 0), errors
    report = Path(write_report(str(out)))
    blobs = {"run.json": (out / "run.json").read_bytes(), "report": report.read_bytes()}
    blobs["log"] = caplog.text.encode()
    for shard in (out / "pairs").glob("*.parquet"):
        blobs[shard.name] = pq.read_table(shard).to_pandas().to_csv().encode()
    for name, blob in blobs.items():
        assert b"DO-NOT-LEAK" not in blob and b"AKIAFUNDUS" not in blob, name
    run = json.loads(blobs["run.json"])
    assert run["config"]["manifest"].startswith(f"{base}/manifest.csv?AWSAccessKeyId=***")
