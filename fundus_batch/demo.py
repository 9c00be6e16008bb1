"""The embedded default run: inputs it makes itself, and the summary table it prints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from fundus_batch.io.codecs import encode_jpeg, encode_png
from fundus_batch.io.storage import write_local_files
from fundus_batch.synth import synth_fundus

if TYPE_CHECKING:
    from fundus_batch.fidelity import RowFilter


def retina_jpeg_path() -> Path:
    """scikit-image's bundled CC0 fundus photograph (no download)."""
    import skimage.data

    path = Path(skimage.data.__file__).parent / "retina.jpg"
    if not path.is_file():
        raise FileNotFoundError(f"scikit-image's retina.jpg is missing at {path}")
    return path


def make_demo_inputs(folder: Path, count: int = 6, seed: int = 2021) -> str:
    """Write ``count`` raw-camera-like synthetic photographs plus skimage's retina; return the
    manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str | None]] = []
    for i in range(count):
        # Like a raw camera frame: 4:3 canvas, black border, FOV clipped on some images.
        canvas = (1600, 1200) if i % 2 == 0 else (1400, 1050)
        s = synth_fundus(1100 if i % 3 else 1250, seed=seed + i, canvas=canvas)
        image_id = f"synth_{i:03d}"
        uri = folder / f"{image_id}.jpg"
        vessel_uri = folder / f"{image_id}_vessel.png"
        write_local_files(
            [(uri, encode_jpeg(s.image, quality=92)), (vessel_uri, encode_png(s.vessels))]
        )
        rows.append(
            {
                "image_id": image_id,
                "uri": str(uri),
                "vessel_uri": str(vessel_uri),
                "split": "val" if i == count - 1 else "train",
                "source": "synthetic",
            }
        )
    rows.append(
        {
            "image_id": "skimage_retina",
            "uri": str(retina_jpeg_path()),
            "vessel_uri": None,
            "split": "val",
            "source": "skimage.data.retina (CC0)",
        }
    )
    manifest = folder / "manifest.csv"
    write_local_files([(manifest, pd.DataFrame(rows).to_csv(index=False).encode())])
    return str(manifest)


def shipped_model_available() -> bool:
    """Whether the package ships enhancement weights that load without any download."""
    try:
        from fundus_batch.models.weights import resolve_weights

        resolve_weights("fundus-cofenet-small")
    except Exception:
        return False
    return True


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-type row counts and mean metrics of the ``ok`` rows (failed rows are counted apart,
    by :func:`print_demo_table`: they have no metrics to average)."""
    ok = frame[frame["status"] == "ok"]
    cols = [
        c
        for c in ("psnr_degraded", "ssim_degraded", "psnr_enhanced", "ssim_enhanced")
        if c in ok and ok[c].notna().any()
    ]
    return ok.groupby("type_code").agg(rows=("image_id", "size"), **{c: (c, "mean") for c in cols})


def print_demo_table(out: str, within: RowFilter | None = None) -> None:
    """Print the per-type table, the failed-row count, a WARNING line for every type on
    which enhancement lowered PSNR or SSIM and a NOTE naming the images it left unchanged, of
    the rows ``within`` keeps (the run's pairs; all rows when None)."""
    from fundus_batch.fidelity import read_output, summary_lines

    frame = read_output(out, within=within)
    if frame is None:
        raise FileNotFoundError(f"no Parquet shards under {Path(out) / 'pairs'}")
    n_failed = int((frame["status"] != "ok").sum())
    print("")
    if n_failed < len(frame):
        print(summary_table(frame).round(3).to_string())
    else:
        print("no ok rows: no metrics to show")
    print(f"failed rows: {n_failed} of {len(frame)}")
    for line in summary_lines(frame):
        print(line)
    print("")
    print(f"images:  {Path(out) / 'images'}")
    print(f"parquet: {Path(out) / 'pairs'}")
    print(f"run:     {Path(out) / 'run.json'}")
