"""Hand-made output rows for the report tests: known numbers, no pipeline, no images."""

from __future__ import annotations

from typing import Any

import pandas as pd

from fundus_batch.report.data import Loaded

# Mean PSNR per type of the rows below: degraded 20 / 30 / 25, enhanced 24 / 29 / 25.5.
PSNR = {
    "001": ([18.0, 22.0], [23.0, 25.0]),
    "010": ([29.0, 31.0], [28.0, 30.0]),
    "111": ([24.0, 26.0], [25.0, 26.0]),
}


def ok_rows(device: str | None = "cuda") -> list[dict[str, Any]]:
    """Two ok rows per type (two source images), enhanced, with full-reference scores."""
    rows = []
    for code, (degraded, enhanced) in PSNR.items():
        for i, (d, e) in enumerate(zip(degraded, enhanced, strict=True)):
            rows.append(
                {
                    "image_id": f"img_{i}",
                    "variant": list(PSNR).index(code),
                    "status": "ok",
                    "type_code": code,
                    "clean_uri": f"images/img_{i}/clean.png",
                    "degraded_uri": f"images/img_{i}/v{code}.png",
                    "enhanced_uri": f"images/img_{i}/e{code}.png",
                    "psnr_degraded": d,
                    "psnr_enhanced": e,
                    "ssim_degraded": 0.8,
                    "ssim_enhanced": 0.85,
                    "nr_luminance_clean": 100.0 + i,
                    "nr_luminance_degraded": 90.0,
                    "model_name": "tiny-model",
                    "enhance_device": device,
                    "seconds_fetch": 1.0,
                    "seconds_degrade": 0.5,
                }
            )
    return rows


def failed_row(image_id: str, stage: str, error: str, variant: int = 0) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "variant": variant,
        "status": "failed",
        "failed_stage": stage,
        "error": error,
    }


def run_json(n_ok: int, n_failed: int, **extra: Any) -> dict[str, Any]:
    return {
        "state": "complete",
        "seconds": 4.0,
        "config": {"mode": "pairs", "variants": 3, "types": ["001", "010", "111"]},
        "counts": {
            "rows_in": n_ok + n_failed,
            "ok": n_ok,
            "failed": n_failed,
            "done_before": 0,
            "this_run": n_ok + n_failed,
        },
        **extra,
    }


def loaded(rows: list[dict[str, Any]], run: dict[str, Any] | None = None) -> Loaded:
    """What :func:`fundus_batch.report.data.load` returns for these rows."""
    frame = pd.DataFrame(rows)
    if "type_code" not in frame.columns:
        frame["type_code"] = None
    frame["type_code"] = frame["type_code"].fillna("none")
    return Loaded("/tmp/out", run, frame)


def enhance_rows() -> list[dict[str, Any]]:
    """Two ok rows of an enhance run: input photographs, no type, no degraded image; the
    enhancer left the first unchanged."""
    return [
        {
            "image_id": f"photo_{i}",
            "variant": 0,
            "status": "ok",
            "clean_uri": f"images/photo_{i}/clean.png",
            "enhanced_uri": f"images/photo_{i}/enhanced.png",
            "nr_luminance_clean": 60.0 + i,
            "nr_luminance_enhanced": 60.0 + 3 * i,
            "enhance_change": float(i),
            "model_name": "tiny-model",
            "enhance_device": "cpu",
        }
        for i in range(2)
    ]
