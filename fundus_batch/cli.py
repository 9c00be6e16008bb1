"""The ``fundus-batch`` command line: a thin layer over the library API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from fundus_batch import __version__
from fundus_batch.cli_options import JsonObject, config_options, storage_options_option
from fundus_batch.degrade import PRESETS
from fundus_batch.io.storage import redact, write_local_files

if TYPE_CHECKING:
    from fundus_batch.fidelity import RowFilter
    from fundus_batch.imaging import ImageFormat


class _Fail(click.ClickException):
    """A one-line reason and a non-zero exit."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from fundus_batch.config import ConfigError
    from fundus_batch.degrade.params import RecordError
    from fundus_batch.fov import FOVError
    from fundus_batch.io.codecs import DecodeError
    from fundus_batch.lease import LeaseError
    from fundus_batch.manifest import ManifestError
    from fundus_batch.ray_adapter import RayStartError

    return (
        ConfigError,
        ManifestError,
        RayStartError,
        DecodeError,
        FOVError,
        RecordError,
        LeaseError,
        ValueError,
        OSError,
    )


class _Group(click.Group):
    """Turns the library's user-facing errors into a one-line reason and exit code 1, and an
    interrupted command into exit 130 (Ctrl-C) or 143 (SIGTERM) after its cleanup ran: every
    command's temporary files and staging folders are removed on either."""

    def invoke(self, ctx: click.Context) -> Any:
        from fundus_batch.console import interrupted_exit_code, sigterm_raises

        try:
            with sigterm_raises():
                return super().invoke(ctx)
        except (KeyboardInterrupt, SystemExit) as exc:
            code = interrupted_exit_code(exc)
            if code is None:
                raise
            click.echo(f"interrupted ({'Ctrl-C' if code == 130 else 'SIGTERM'})", err=True)
            raise click.exceptions.Exit(code) from None
        except _user_errors() as exc:
            message = redact(" ".join(str(exc).split()))
            reason = getattr(exc, "reason", None)
            if reason:
                message = f"{type(exc).__name__}: {message} ({reason})"
            raise _Fail(message) from None


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="fundus-batch")
def main() -> None:
    """Degradation synthesis and Cofe-Net enhancement of fundus photographs at scale."""


# ---------------------------------------------------------------------------------- images


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--count", default=8, show_default=True, type=click.IntRange(1, 100_000), help="photographs"
)
@click.option(
    "--size", default=512, show_default=True, type=click.IntRange(32, 8192), help="side in pixels"
)
@click.option(
    "--seed", default=0, show_default=True, type=click.IntRange(0), help="seed of the first image"
)
def synth(outdir: Path, count: int, size: int, seed: int) -> None:
    """Write synthetic fundus photographs with exact vessel maps and FOV masks, and
    OUTDIR/manifest.csv listing the photographs with their mask_uri and vessel_uri."""
    from fundus_batch.synth import write_synthetic_set

    manifest = write_synthetic_set(outdir, count=count, size=size, seed=seed)
    click.echo(f"wrote {count} synthetic images to {outdir}; manifest {manifest}")


# OUTPUT extensions of the single-image commands, and the format each is written in.
_OUTPUT_FORMATS: dict[str, ImageFormat] = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}


def _output_image(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    """OUTPUT, refused unless its extension names a format the command writes."""
    if value.suffix.lower() not in _OUTPUT_FORMATS:
        given = f"unsupported extension {value.suffix!r}" if value.suffix else "no extension"
        raise click.BadParameter(f"{given}; supported: {', '.join(_OUTPUT_FORMATS)}", ctx, param)
    return value


def _single_image_options(command: Any) -> Any:
    """The options ``degrade-image`` and ``enhance-image`` share (working size, mask, format)."""
    for option in reversed(
        (
            click.option(
                "--size",
                default=512,
                show_default=True,
                type=click.IntRange(64, 4096),
                help="side of the working image the FOV is cropped and resized to (a "
                "--preprocessed INPUT keeps its own)",
            ),
            click.option(
                "--mask",
                "mask_path",
                type=click.Path(dir_okay=False, path_type=Path),
                help="FOV mask of INPUT (any resolution; default: the FOV is detected)",
            ),
            click.option(
                "--preprocessed",
                is_flag=True,
                help="INPUT is already the working image (needs --mask)",
            ),
            click.option(
                "--quality",
                default=95,
                show_default=True,
                type=click.IntRange(1, 100),
                help="JPEG quality of a .jpg OUTPUT",
            ),
        )
    ):
        command = option(command)
    return command


def _device_option(what: str) -> Any:
    """``--device`` of the commands that run a network outside the pipeline."""
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        type=click.Choice(["auto", "cpu", "cuda"]),
        help=f"where {what} (auto: cuda when there is one)",
    )


INPUT_IMAGE = click.argument(
    "input_path", metavar="INPUT", type=click.Path(dir_okay=False, path_type=Path)
)
OUTPUT_IMAGE = click.argument(
    "output", type=click.Path(dir_okay=False, path_type=Path), callback=_output_image
)


@main.command("degrade-image")
@INPUT_IMAGE
@OUTPUT_IMAGE
@click.option(
    "--type",
    "type_code",
    default="111",
    show_default=True,
    help="degradation type: three bits, blur / spots / illumination, e.g. 001",
)
@click.option(
    "--preset",
    default="cofe-release",
    show_default=True,
    type=click.Choice(sorted(PRESETS)),
    help="built-in preset (a row of a custom preset: --replay its params_json)",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="run seed")
@click.option("--id", "image_id", default=None, help="image id for seeding [default: file stem]")
@click.option(
    "--variant", default=0, show_default=True, type=click.IntRange(0), help="variant index"
)
@click.option(
    "--params-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="also write the drawn parameters as JSON (what --replay reads)",
)
@click.option(
    "--replay",
    "replay_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="replay a recorded parameter set (ours or the released script's JSON)",
)
@click.option(
    "--jpeg-clean",
    is_flag=True,
    help="degrade the working image as a --format jpeg run stores it (JPEG at --quality, "
    "decoded), so that a .jpg OUTPUT is that run's degraded image byte for byte",
)
@_single_image_options
def degrade_image(
    input_path: Path,
    output: Path,
    type_code: str,
    preset: str,
    seed: int,
    image_id: str | None,
    variant: int,
    size: int,
    params_out: Path | None,
    replay_path: Path | None,
    jpeg_clean: bool,
    mask_path: Path | None,
    preprocessed: bool,
    quality: int,
) -> None:
    """Degrade one image (FOV preprocessing first unless --preprocessed).

    To regenerate a run's row from its source photograph, give the run's --size and preset and
    the row's seed, id, variant and type (or --replay its params_json), and --mask with the
    mask_uri its manifest row gave, if any; for a --format jpeg run, also --jpeg-clean and
    --quality set to the run's jpeg_quality (in its run.json settings).
    """
    from fundus_batch.degrade import DegradationRecord, degrade, replay, sample_rng
    from fundus_batch.degrade.params import RecordError
    from fundus_batch.imaging import as_stored, encode_output

    if params_out is not None and params_out.resolve() == output.resolve():
        raise click.UsageError("--params-out and OUTPUT are the same file")
    if jpeg_clean and _OUTPUT_FORMATS[output.suffix.lower()] != "jpeg":
        raise click.UsageError(
            "--jpeg-clean needs a .jpg or .jpeg OUTPUT: a --format jpeg run stores its degraded "
            "images as JPEG"
        )
    if jpeg_clean and preprocessed:
        raise click.UsageError(
            "--jpeg-clean with --preprocessed: INPUT is already a working image (a run's stored "
            "clean image is degraded as it is), so it must not be JPEG-encoded again"
        )
    if replay_path is not None:
        ctx = click.get_current_context()
        sampling = {
            "type_code": "--type",
            "preset": "--preset",
            "seed": "--seed",
            "image_id": "--id",
            "variant": "--variant",
        }
        given = [
            flag
            for name, flag in sampling.items()
            if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
        ]
        if given:
            raise click.UsageError(
                f"--replay takes every parameter from its record; {', '.join(given)} would be "
                "ignored"
            )
    image, mask = _working_image(_read(input_path), mask_path, preprocessed, size)
    if jpeg_clean:
        image = as_stored(image, encode_output(image, "jpeg", quality), "jpeg")
    if replay_path is not None:
        try:
            data = json.loads(_read(replay_path))
        except json.JSONDecodeError as exc:
            raise RecordError("record", f"{replay_path}: invalid JSON: {exc}") from None
        # The released schema's geometry is for 512 px: replay refuses another image size.
        record = DegradationRecord.from_any(data)
        out = replay(image, mask, record)
    else:
        rng = sample_rng(seed, image_id or input_path.stem, variant)
        out, record = degrade(image, mask, type_code, rng, preset=preset)
    files = [(output, _encode(output, out, quality))]
    if params_out is not None:
        files.insert(0, (params_out, record.to_json().encode()))
    write_local_files(files)
    click.echo(f"{output}: type {record.type_code}, preset {record.preset}")


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path.read_bytes()


def _working_image(
    raw: bytes, mask_path: Path | None, preprocessed: bool, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """INPUT (its bytes ``raw``) as a working image and its FOV mask: as it is with
    ``--preprocessed`` (which needs ``--mask``; a ``--size`` given must be its size), else
    decoded and FOV-cropped to ``size`` as the pipeline's Preprocess stage does (around the
    ``--mask`` given, at any resolution, else around the detected FOV)."""
    from fundus_batch.imaging import decode_mask, source_working_image
    from fundus_batch.io.codecs import decode_image

    mask_bytes = None if mask_path is None else _read(mask_path)
    if not preprocessed:
        pre = source_working_image(raw, size, mask_bytes).pre
        return pre.image, pre.mask
    if mask_bytes is None:
        raise ValueError("--preprocessed needs --mask MASK (the FOV mask of INPUT)")
    image, mask = decode_image(raw).copy(), decode_mask(mask_bytes)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    source = click.get_current_context().get_parameter_source("size")
    if source is click.core.ParameterSource.COMMANDLINE and image.shape[:2] != (size, size):
        raise click.UsageError(
            f"--size {size} with --preprocessed: INPUT is a {image.shape[1]}x{image.shape[0]} "
            "working image, kept as it is"
        )
    return image, mask


def _encode(output: Path, image: np.ndarray, quality: int) -> bytes:
    """``image`` encoded in the format of OUTPUT's extension."""
    from fundus_batch.io.codecs import encode_image

    return encode_image(image, _OUTPUT_FORMATS[output.suffix.lower()], quality)


@main.command("enhance-image")
@INPUT_IMAGE
@OUTPUT_IMAGE
@click.option(
    "--enhancer",
    default="cofenet",
    show_default=True,
    type=click.Choice(["cofenet", "classical"]),
    help="Cofe-Net or the weight-free FOV background normalisation",
)
@click.option("--weights", default="fundus-cofenet-small", show_default=True, help="NAME or PATH")
@_device_option("Cofe-Net runs")
@click.option(
    "--max-change",
    type=click.IntRange(1, 255),
    default=None,
    help="grey levels Cofe-Net may change any pixel by, at most [default: no limit]",
)
@_single_image_options
def enhance_image_cmd(
    input_path: Path,
    output: Path,
    enhancer: str,
    weights: str,
    device: str,
    max_change: int | None,
    size: int,
    mask_path: Path | None,
    preprocessed: bool,
    quality: int,
) -> None:
    """Enhance one photograph without Ray (FOV preprocessing first unless --preprocessed)."""
    from fundus_batch.config import EnhanceOptions
    from fundus_batch.enhance import enhance_image, stores_as_source
    from fundus_batch.validation import FieldProblem, validate

    # The options given are checked by the pipeline's own rules (enhance.* in a run config).
    ctx = click.get_current_context()
    options = {"weights": weights, "device": device, "max_change": max_change}
    given = {
        n: v
        for n, v in options.items()
        if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE
    }

    def refuse(problems: list[FieldProblem]) -> click.UsageError:
        return click.UsageError("; ".join(p.problem for p in problems))  # they name enhance.*

    validate(EnhanceOptions, {"enabled": True, "enhancer": enhancer, **given}, refuse)
    if max_change is not None and _OUTPUT_FORMATS[output.suffix.lower()] != "png":
        raise click.UsageError(
            "--max-change needs a .png OUTPUT: JPEG re-encoding moves pixels by more than the bound"
        )
    raw = _read(input_path)
    image, mask = _working_image(raw, mask_path, preprocessed, size)
    # A working image given as it is may come back unchanged: then its own bytes are written.
    as_given = (raw, image.copy()) if preprocessed else None
    image[mask == 0] = 0
    result = enhance_image(
        image, mask, enhancer=enhancer, weights=weights, device=device, max_change=max_change
    )
    fmt = _OUTPUT_FORMATS[output.suffix.lower()]
    if as_given is not None and stores_as_source(*as_given, result.image, mask, fmt):
        data = as_given[0]
    else:
        data = _encode(output, result.image, quality)
    write_local_files([(output, data)])
    if result.change == 0:
        what = "unchanged: the enhancer left every pixel of the FOV as it was"
    else:
        what = f"mean change {result.change:.2f} grey levels in the FOV"
    click.echo(f"{output}: {result.model_name} ({result.seconds:.2f} s), {what}")


# -------------------------------------------------------------------------------- manifests


@main.group()
def manifest() -> None:
    """Build manifests (CSV/Parquet of image URIs) from folders, buckets and label files."""


@manifest.command("from-dir")
@click.argument("prefix")
@click.option("--out", "out_uri", required=True, help="manifest to write (.csv or .parquet)")
@click.option(
    "--ext",
    "exts",
    multiple=True,
    help="extension to list, repeatable, any case, e.g. --ext .jpeg [default: .jpg .jpeg .png "
    ".tif .tiff .bmp .ppm]",
)
@storage_options_option("fsspec options as JSON")
@click.option(
    "--include-masks",
    is_flag=True,
    help="also list *_mask.* and *_vessel.* files (skipped by default)",
)
@click.option(
    "--previous",
    help="an earlier manifest of PREFIX: the files it lists keep their image_id, and new files "
    "get none of its ids (listing again after files were added can rename files a run already "
    "processed, which it would then do again under the new id)",
)
def manifest_from_dir(
    prefix: str,
    out_uri: str,
    exts: tuple[str, ...],
    storage_options: dict[str, Any] | None,
    include_masks: bool,
    previous: str | None,
) -> None:
    """Every image under a local folder or bucket prefix, except files named *_mask.* or
    *_vessel.* (other label images, such as HRF's 1st_manual/*.png, are listed: give --ext or
    a narrower PREFIX). An image_id is the file's stem, longer where two files share a stem;
    to list a growing prefix again for a run to resume, give --previous."""
    from fundus_batch import manifest as mf

    extensions = tuple(e if e.startswith(".") else f".{e}" for e in exts) or mf.IMAGE_EXTENSIONS
    m = mf.from_dir(
        prefix,
        extensions=extensions,
        storage_options=storage_options,
        include_companions=include_masks,
        previous=None if previous is None else mf.manifest_uri_ids(previous, storage_options),
    )
    mf.write_manifest(m, out_uri, storage_options=storage_options)
    click.echo(f"wrote {len(m)} rows to {redact(out_uri)}")


@manifest.command("from-kaggle")
@click.argument("labels")
@click.option("--images", required=True, help="folder or prefix holding <image>.jpeg")
@click.option("--out", "out_uri", required=True, help="manifest to write (.csv or .parquet)")
@click.option("--ext", default=".jpeg", show_default=True, help="extension of the image files")
@storage_options_option("fsspec options for LABELS and --out, as JSON")
def manifest_from_kaggle(
    labels: str, images: str, out_uri: str, ext: str, storage_options: dict[str, Any] | None
) -> None:
    """From Kaggle EyePACS trainLabels.csv (columns image,level)."""
    from fundus_batch import manifest as mf

    m = mf.from_kaggle(labels, images, extension=ext, storage_options=storage_options)
    mf.write_manifest(m, out_uri, storage_options=storage_options)
    click.echo(f"wrote {len(m)} rows to {redact(out_uri)}")


@manifest.command("from-eyeq")
@click.argument("labels")
@click.option("--images", required=True, help="folder or prefix holding the images LABELS names")
@click.option("--out", "out_uri", required=True, help="manifest to write (.csv or .parquet)")
@click.option("--split", default=None, help="value for the split column, e.g. train")
@storage_options_option("fsspec options for LABELS and --out, as JSON")
def manifest_from_eyeq(
    labels: str,
    images: str,
    out_uri: str,
    split: str | None,
    storage_options: dict[str, Any] | None,
) -> None:
    """From EyeQ Label_EyeQ_*.csv (columns ,image,quality,DR_grade)."""
    from fundus_batch import manifest as mf

    m = mf.from_eyeq(labels, images, split=split, storage_options=storage_options)
    mf.write_manifest(m, out_uri, storage_options=storage_options)
    click.echo(f"wrote {len(m)} rows to {redact(out_uri)}")


@manifest.command("validate")
@click.argument("uri")
@storage_options_option("fsspec options for URI, as JSON")
def manifest_validate(uri: str, storage_options: dict[str, Any] | None) -> None:
    """Check a manifest without running anything, with the reader and checks of a run."""
    from fundus_batch.manifest_stream import scan_manifest

    scan = scan_manifest(uri, storage_options=storage_options)
    click.echo(f"{redact(uri)}: {scan.rows} rows, pass-through columns {scan.passthrough.names}")


# -------------------------------------------------------------------------------- pipeline


def _run(config: Any, *, fidelity: bool = True, verbose: bool = False) -> Any:
    """Run the pipeline with a live progress bar; Ray's own output goes to a log file unless
    ``verbose``. Ctrl-C exits 130 and SIGTERM 143, after the run's cleanup, with a line saying
    that the output folder can be resumed."""
    from fundus_batch import pipeline
    from fundus_batch.console import (
        interrupted_exit_code,
        log_line,
        run_on_console,
        sigterm_raises,
    )

    try:
        with sigterm_raises():
            summary, log_path = run_on_console(
                lambda progress: pipeline.run(config, progress=progress),
                verbose=verbose,
                progress=config.progress,
                say=lambda line: click.echo(line, err=True),
            )
    except (KeyboardInterrupt, SystemExit) as exc:
        code = interrupted_exit_code(exc)
        if code is None:
            raise
        click.echo(
            f"interrupted ({'Ctrl-C' if code == 130 else 'SIGTERM'}): {redact(config.out)} keeps "
            "the rows written so far; run the same command again to resume",
            err=True,
        )
        raise click.exceptions.Exit(code) from None
    _print_summary(summary)
    if log_path is not None:
        click.echo(log_line(log_path))
    if fidelity:
        _print_fidelity(config, summary.pairs)
    if summary.not_redone:
        raise _Fail(
            f"run incomplete: {summary.not_redone} rows could not be redone with what this run "
            f"adds and keep their earlier rows without it (first error: "
            f"{summary.not_redone_error})"
        )
    if not summary.complete:
        raise _Fail(f"run incomplete: {summary.ok + summary.failed} of {summary.rows_in} rows")
    return summary


def _print_summary(summary: Any) -> None:
    click.echo("")
    click.echo(f"output            {redact(summary.out)}")
    click.echo(f"rows_in           {summary.rows_in}")
    click.echo(f"  done before     {summary.done_before}")
    click.echo(f"ok                {summary.ok}")
    click.echo(f"failed            {summary.failed}")
    for stage, n in sorted(summary.failed_by_stage.items()):
        click.echo(f"  at {stage:<13} {n}")
    if summary.quality is not None:
        click.echo(summary.quality.line())
    click.echo(f"rows_in == ok + failed: {summary.complete}")
    click.echo(f"seconds           {summary.seconds:.1f}")


def _print_fidelity(config: Any, pairs: RowFilter | None) -> None:
    """A WARNING line for every degradation type on which enhancement lowered PSNR or SSIM, and
    a NOTE naming the images it left unchanged, over the run's ``pairs`` (as its summary
    counts)."""
    from fundus_batch.fidelity import output_summary_lines

    for line in output_summary_lines(config.out, config.out_storage_options, within=pairs):
        click.echo(line)


# Options of the pipeline commands that are not RunConfig fields.
VERBOSE = click.option(
    "--verbose",
    is_flag=True,
    help="show Ray's own output (logs, warnings) on the console instead of a log file",
)


def _command_config(mode: str, overrides: dict[str, Any]) -> Any:
    """The RunConfig of a pipeline command from its options (the model's defaults elsewhere)."""
    from fundus_batch.config import build_config, merge_overrides

    return build_config(merge_overrides({"mode": mode}, overrides), "command line")


@main.command("run")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@config_options(
    "manifest",
    "out",
    "seed",
    "variants",
    "ray.address",
    "limit",
    "retry_failed",
    "lease.wait",
    defaults_from="CONFIG",
)
@VERBOSE
def run_cmd(config_path: Path, overrides: dict[str, Any], verbose: bool) -> None:
    """Run a typed YAML config; flags override its fields."""
    from fundus_batch.config import load_config

    _run(load_config(config_path, overrides), verbose=verbose)


@main.command()
@config_options(
    "manifest",
    "out",
    "variants",
    "types",
    "type_mode",
    "seed",
    "size",
    "preset",
    "image_format",
    "ray.address",
    "enhance.enabled",
    "enhance.enhancer",
    "enhance.weights",
    "enhance.max_change",
    "min_quality",
    "limit",
    "retry_failed",
    "lease.wait",
    required=("manifest", "out"),
)
@VERBOSE
def degrade(overrides: dict[str, Any], verbose: bool) -> None:
    """Degrade every manifest image into K variants; write images and Parquet."""
    _run(_command_config("pairs", overrides), verbose=verbose)


@main.command()
@config_options(
    "manifest",
    "out",
    "enhance.enhancer",
    "enhance.weights",
    "enhance.variant",
    "enhance.width",
    "size",
    "enhance.batch_size",
    "enhance.device",
    "enhance.max_change",
    "ray.address",
    "min_quality",
    "limit",
    "retry_failed",
    "lease.wait",
    required=("manifest", "out"),
)
@VERBOSE
def enhance(overrides: dict[str, Any], verbose: bool) -> None:
    """Enhance every manifest image (Cofe-Net or classical; no clean pair needed)."""
    _run(_command_config("enhance", overrides), verbose=verbose)


@main.command()
@config_options(
    "manifest",
    "out",
    "size",
    "ray.address",
    "limit",
    "min_quality",
    "retry_failed",
    "lease.wait",
    required=("manifest", "out"),
)
@VERBOSE
def score(overrides: dict[str, Any], verbose: bool) -> None:
    """Score an archive (FOV, no-reference quality metrics) without degrading or enhancing."""
    _run(_command_config("score", overrides), verbose=verbose)


@main.command()
@click.argument("out")
@click.option("--dest", default=None, help="HTML file to write [default: OUT/report.html]")
@storage_options_option("fsspec options for OUT, as JSON")
@click.option(
    "--rows-per-type",
    default=3,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="contact-sheet rows shown per degradation type",
)
def report(
    out: str, dest: str | None, storage_options: dict[str, Any] | None, rows_per_type: int
) -> None:
    """Write a self-contained HTML report (contact sheets, metrics, failures, throughput)."""
    from fundus_batch.report import write_report

    path = write_report(out, dest, storage_options=storage_options, rows_per_type=rows_per_type)
    click.echo(f"report: {path}")


@main.command("verify")
@click.argument("out")
@click.option("--manifest", default=None, help="prove every manifest row is present")
@storage_options_option("fsspec options for OUT, as JSON")
@click.option(
    "--manifest-storage-options",
    type=JsonObject(),
    default=None,
    help="fsspec options for --manifest, as JSON [default: --storage-options]",
)
@click.option("--no-files", is_flag=True, help="check rows only, not the image files")
@click.option("--deep", is_flag=True, help="recompute a random sample of rows from their files")
@click.option(
    "--deep-rows",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="how many random ok rows --deep recomputes",
)
@click.option(
    "--repair",
    "do_repair",
    is_flag=True,
    help="first remove duplicate rows (one kept per image and variant, ok over failed)",
)
def verify_cmd(
    out: str,
    manifest: str | None,
    storage_options: dict[str, Any] | None,
    manifest_storage_options: dict[str, Any] | None,
    no_files: bool,
    deep: bool,
    deep_rows: int,
    do_repair: bool,
) -> None:
    """Prove every row is present exactly once and every output file matches its checksum."""
    from fundus_batch.verify import repair, verify

    if do_repair:
        click.echo(repair(out, storage_options=storage_options).summary())
    result = verify(
        out,
        manifest,
        storage_options=storage_options,
        manifest_storage_options=manifest_storage_options,
        check_files=not no_files,
        deep=deep_rows if deep else 0,
    )
    click.echo(result.summary())
    if not result.ok:
        sys.exit(1)


@main.command("train")
@click.option("--pairs", required=True, help="a pairs output (OUT or OUT/pairs) of the pipeline")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="folder for checkpoint.pt, model.pt and its registry.json",
)
@click.option(
    "--variant",
    default="cofe-net",
    show_default=True,
    help="Cofe-Net variant: a released which_model_netG name or an alias",
)
@click.option(
    "--width", default=0.25, show_default=True, type=float, help="channel width, 0 < x <= 1"
)
@click.option(
    "--size",
    default=256,
    show_default=True,
    type=int,
    help="training crop size, a multiple of 32, at least 192",
)
@click.option("--steps", default=1000, show_default=True, type=int, help="optimiser steps, >= 1")
@click.option("--batch-size", default=4, show_default=True, type=int, help="pairs a step, >= 1")
@click.option("--lr", default=1e-4, show_default=True, type=float, help="learning rate, > 0")
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="seed of the initial weights, sample order and crops",
)
@click.option(
    "--train-split", default=None, help="use only rows of this split [all but --val-split's]"
)
@click.option(
    "--val-split",
    default=None,
    help="validate on rows of this split (every --val-every steps, else at the end)",
)
@click.option("--val-every", default=0, show_default=True, type=int, help="steps; 0: at the end")
@_device_option("training runs")
@click.option(
    "--resume",
    is_flag=True,
    help="continue from OUT/checkpoint.pt (without it, an OUT that has one is refused)",
)
@click.option(
    "--include-quality-failed",
    is_flag=True,
    help="also train on rows that failed the run's --min-quality gate (quality_ok false)",
)
@storage_options_option("fsspec options (JSON) for --pairs in object storage")
def train_cmd(
    pairs: str,
    out_dir: Path,
    variant: str,
    width: float,
    size: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    train_split: str | None,
    val_split: str | None,
    val_every: int,
    device: str,
    resume: bool,
    include_quality_failed: bool,
    storage_options: dict[str, Any] | None,
) -> None:
    """Train a Cofe-Net variant on pairs the pipeline generated (a local folder or any fsspec
    URL); checkpoints and resumes."""
    from fundus_batch.models.weights import build_settings, save_weights
    from fundus_batch.train import (
        PairsSource,
        TrainConfig,
        check_checkpoint_target,
        registry_entry,
        train,
    )

    config = TrainConfig(
        variant=variant,
        width=width,
        residual=width < 1.0,
        size=size,
        batch_size=batch_size,
        steps=steps,
        lr=lr,
        seed=seed,
        val_every=val_every,
        checkpoint=str(out_dir / "checkpoint.pt"),
        checkpoint_every=max(1, steps // 10),
        resume=resume,
        device=device,
    )
    check_checkpoint_target(config)  # before the dataset is read
    # Rows of the validation split are held out of training unless a training split is named.
    held_out = val_split if train_split is None else None
    train_source = PairsSource(
        pairs,
        split=train_split,
        storage_options=storage_options,
        exclude_split=held_out,
        include_quality_failed=include_quality_failed,
    )
    val_source = (
        PairsSource(
            pairs,
            split=val_split,
            storage_options=storage_options,
            include_quality_failed=include_quality_failed,
        )
        if val_split
        else None
    )
    for role, source in (("training", train_source), ("validation", val_source)):
        if source is not None and source.quality_left_out:
            click.echo(
                f"{role}: left out {source.quality_left_out} rows that failed the run's "
                "--min-quality gate (--include-quality-failed uses them)"
            )

    def report(val) -> None:
        click.echo(f"validation at step {val.step} (FOV PSNR degraded -> enhanced):")
        for code, m in sorted(val.per_type.items()):
            click.echo(
                f"  {code}: {m.psnr_degraded:6.2f} -> {m.psnr_enhanced:6.2f} dB, "
                f"SSIM {m.ssim_degraded:.4f} -> {m.ssim_enhanced:.4f}"
            )

    # No folder before train() has checked the data: its checkpoints create it.
    result = train(config, train_source, val_source, on_val=report)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.pt"
    # The file carries the build settings (residual, heads), so --weights model.pt works
    # without registry.json.
    save_weights(weights, result.model.state_dict(), **build_settings(config))
    # The registry entry names the model after the folder (--out . too); its size is the pairs'
    # working size, not the training crop.
    entry = registry_entry(
        out_dir.resolve().name or "model",
        weights,
        config,
        size=train_source.working_size,
        training_data=f"pairs {redact(pairs)}",
    )
    registry = json.dumps({"weights": [entry]}, indent=2) + "\n"
    write_local_files([(out_dir / "registry.json", registry.encode())])
    click.echo(
        f"trained {result.step} steps in {result.seconds:.0f} s "
        f"(loss {result.final_loss:.4f}); weights: {weights} (registry.json beside it)"
    )


@main.command()
@click.option(
    "--out",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="folder for the demo's inputs, outputs and report",
)
@click.option(
    "--count",
    default=6,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="synthetic images besides skimage's retina photograph",
)
@click.option(
    "--enhance/--no-enhance",
    "with_enhance",
    default=None,
    help="enhance with the shipped model [default: when it is installed]",
)
@config_options("variants")
@VERBOSE
def demo(
    out: Path, count: int, with_enhance: bool | None, overrides: dict[str, Any], verbose: bool
) -> None:
    """The embedded default: synthetic images plus a real photograph, degraded locally."""
    from fundus_batch.config import build_config, merge_overrides
    from fundus_batch.demo import make_demo_inputs, shipped_model_available

    out = out.resolve()
    manifest_uri = make_demo_inputs(out / "inputs", count=count)
    enhance = shipped_model_available() if with_enhance is None else with_enhance
    data = {"manifest": manifest_uri, "out": str(out / "run"), "enhance": {"enabled": enhance}}
    config = build_config(merge_overrides(data, overrides), "demo")
    # the demo's table prints the fidelity warnings beside it
    summary = _run(config, fidelity=False, verbose=verbose)
    from fundus_batch.demo import print_demo_table

    print_demo_table(str(out / "run"), within=summary.pairs)
    from fundus_batch.report import write_report

    click.echo(f"report:  {write_report(str(out / 'run'))}")


@main.command()
@click.argument("out")
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(["basicsr", "pix2pix"]),
    help="trainer layout: BasicSR's GT/LQ folders and meta_info, or pix2pix's side-by-side pairs",
)
@click.option("--dest", required=True, metavar="FOLDER", help="a new or empty local folder")
@click.option("--overwrite", is_flag=True, help="replace --dest when it is not empty")
@click.option(
    "--include-quality-failed",
    is_flag=True,
    help="also export pairs that failed the run's --min-quality gate",
)
@storage_options_option("fsspec options for OUT, as JSON")
def export(
    out: str,
    fmt: str,
    dest: str,
    overwrite: bool,
    include_quality_failed: bool,
    storage_options: dict[str, Any] | None,
) -> None:
    """Write a trainer layout (BasicSR GT/LQ + meta_info.txt, one tree per split when there
    are several, or pix2pix aligned A|B per split) from OUT's ok pairs; written beside --dest
    and renamed into place when complete."""
    from fundus_batch.export import export_pairs

    summary = export_pairs(
        out,
        fmt,
        dest,
        storage_options=storage_options,
        overwrite=overwrite,
        include_quality_failed=include_quality_failed,
    )
    click.echo(summary.message())


def entry() -> None:  # pragma: no cover - console script shim
    sys.exit(main())
