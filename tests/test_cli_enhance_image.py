"""``fundus-batch enhance-image`` (one photograph, no Ray) and ``--enhancer`` on the commands
that enhance."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from fundus_batch import cli, stages
from fundus_batch.classical import enhance_classical
from fundus_batch.cli import main
from fundus_batch.fov import preprocess
from fundus_batch.io.codecs import decode_image, encode_jpeg, encode_png
from fundus_batch.synth import synth_fundus


@pytest.fixture
def raw_photo(tmp_path: Path) -> Path:
    s = synth_fundus(400, seed=3, canvas=(520, 440))
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode_jpeg(s.image))
    (tmp_path / "photo_mask.png").write_bytes(encode_png(s.mask))
    return path


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def test_classical_output_is_the_library_result_on_the_preprocessed_photo(raw_photo, tmp_path):
    out = tmp_path / "sub" / "enhanced.png"
    args = ["enhance-image", str(raw_photo), str(out), "--enhancer", "classical", "--size", "256"]
    result = CliRunner().invoke(main, args)
    _ok(result)
    assert "classical-1" in result.output
    pre = preprocess(decode_image(raw_photo.read_bytes()), size=256)
    written = decode_image(out.read_bytes())
    assert np.array_equal(written, enhance_classical(pre.image, pre.mask))
    assert (written[pre.mask == 0] == 0).all()
    # A clean photograph: the classical dead zone leaves its gentle shading alone, and says so.
    assert np.array_equal(written[pre.mask > 0], pre.image[pre.mask > 0])
    assert "unchanged: the enhancer left every pixel of the FOV as it was" in result.output


@pytest.mark.parametrize("option", [["--weights", "no-such-model"], ["--device", "cuda"]])
def test_a_cofenet_option_with_the_classical_enhancer_is_refused(raw_photo, tmp_path, option):
    out = tmp_path / "o.png"
    args = ["enhance-image", str(raw_photo), str(out), "--enhancer", "classical", *option]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "is a Cofe-Net setting" in result.output
    assert not out.exists()


def test_a_changed_image_is_reported_with_its_mean_change(tmp_path):
    s = synth_fundus(256, seed=5)
    dark = s.image.copy()
    yy, xx = np.mgrid[:256, :256]
    hole = ((yy - 128) ** 2 + (xx - 128) ** 2 < 50**2) & (s.mask > 0)
    dark[hole] = (dark[hole] * 0.4).astype(np.uint8)  # a dark central disc to lift
    src, mask = tmp_path / "dark.png", tmp_path / "dark_mask.png"
    src.write_bytes(encode_png(dark))
    mask.write_bytes(encode_png(s.mask))
    out = tmp_path / "out.png"
    args = ["enhance-image", str(src), str(out), "--enhancer", "classical", "--preprocessed"]
    result = CliRunner().invoke(main, [*args, "--mask", str(mask)])
    _ok(result)
    written = decode_image(out.read_bytes())
    diff = np.abs(written.astype(int) - dark.astype(int))[s.mask > 0].mean()
    assert diff > 0.5
    assert f"mean change {diff:.2f} grey levels in the FOV" in result.output


def test_cofenet_with_the_shipped_weights_on_a_small_image(raw_photo, tmp_path):
    out = tmp_path / "enhanced.png"
    args = ["enhance-image", str(raw_photo), str(out), "--size", "256", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    _ok(result)
    assert "fundus-cofenet" in result.output
    written = decode_image(out.read_bytes())
    pre = preprocess(decode_image(raw_photo.read_bytes()), size=256)
    assert written.shape == (256, 256, 3)
    assert (written[pre.mask == 0] == 0).all() and written[pre.mask > 0].mean() > 10
    # A clean photograph: the shipped model's gate stays shut and says so.
    assert np.array_equal(written[pre.mask > 0], pre.image[pre.mask > 0])
    assert "unchanged: the enhancer left every pixel of the FOV as it was" in result.output


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_a_preprocessed_photo_left_unchanged_is_written_as_its_own_bytes(tmp_path, suffix):
    s = synth_fundus(256, seed=4)
    data = encode_jpeg(s.image) if suffix == ".jpg" else encode_png(s.image)
    src, mask, out = tmp_path / f"in{suffix}", tmp_path / "mask.png", tmp_path / f"out{suffix}"
    src.write_bytes(data)
    mask.write_bytes(encode_png(s.mask))
    args = ["enhance-image", str(src), str(out), "--preprocessed", "--mask", str(mask)]
    result = CliRunner().invoke(main, [*args, "--enhancer", "classical"])
    _ok(result)
    assert "unchanged" in result.output
    assert out.read_bytes() == data  # a JPEG encoded again would lose quality


def test_an_unchanged_jpeg_with_a_label_outside_the_fov_is_written_black_there(tmp_path):
    s = synth_fundus(256, seed=4)
    labelled = s.image.copy()
    labelled[2:14, 2:60] = 255  # a camera's label in a corner, outside the field
    src, mask, out = tmp_path / "in.jpg", tmp_path / "mask.png", tmp_path / "out.jpg"
    src.write_bytes(encode_jpeg(labelled))
    mask.write_bytes(encode_png(s.mask))
    args = ["enhance-image", str(src), str(out), "--preprocessed", "--mask", str(mask)]
    _ok(CliRunner().invoke(main, [*args, "--enhancer", "classical"]))
    assert out.read_bytes() != src.read_bytes()
    assert decode_image(out.read_bytes())[2:14, 2:60].max() < 40  # black, but for ringing


def test_an_unchanged_16_bit_png_is_written_as_8_bit_rgb(tmp_path):
    s = synth_fundus(256, seed=4)
    src, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    deep = cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257
    src.write_bytes(cv2.imencode(".png", deep)[1].tobytes())
    mask.write_bytes(encode_png(s.mask))
    args = ["enhance-image", str(src), str(out), "--preprocessed", "--mask", str(mask)]
    _ok(CliRunner().invoke(main, [*args, "--enhancer", "classical"]))
    assert out.read_bytes()[24:26] == b"\x08\x02"  # IHDR: 8-bit RGB
    assert np.array_equal(decode_image(out.read_bytes()), decode_image(src.read_bytes()))


def test_a_preprocessed_jpeg_written_as_png_is_encoded(tmp_path):
    s = synth_fundus(256, seed=4)
    src, mask, out = tmp_path / "in.jpg", tmp_path / "mask.png", tmp_path / "out.png"
    src.write_bytes(encode_jpeg(s.image))
    mask.write_bytes(encode_png(s.mask))
    args = ["enhance-image", str(src), str(out), "--preprocessed", "--mask", str(mask)]
    _ok(CliRunner().invoke(main, [*args, "--enhancer", "classical"]))
    assert out.read_bytes().startswith(b"\x89PNG")
    written, source = decode_image(out.read_bytes()), decode_image(src.read_bytes())
    assert np.array_equal(written[s.mask > 0], source[s.mask > 0])


def test_the_shipped_model_enhances_a_working_size_below_192(tmp_path):
    """Its correction is computed from a 192 px copy: any multiple of 32 works."""
    from fundus_batch.degrade import degrade, sample_rng

    s = synth_fundus(128, seed=2)
    dark, _ = degrade(s.image, s.mask, "001", sample_rng(0, "small", 0))
    (tmp_path / "in.png").write_bytes(encode_png(dark))
    (tmp_path / "mask.png").write_bytes(encode_png(s.mask))
    out = tmp_path / "out.png"
    args = ["enhance-image", str(tmp_path / "in.png"), str(out), "--preprocessed"]
    _ok(CliRunner().invoke(main, [*args, "--mask", str(tmp_path / "mask.png"), "--size", "128"]))
    assert decode_image(out.read_bytes()).shape == (128, 128, 3)


def test_a_size_the_weights_do_not_take_is_a_one_line_error_naming_them(raw_photo, tmp_path):
    from fundus_batch.models import build_cofenet, save_weights

    plain = tmp_path / "plain.pt"  # a bare width < 1 state dict is refused: say what it is
    save_weights(plain, build_cofenet("cofe-net", 0.125).state_dict(), residual=False)
    args = ["enhance-image", str(raw_photo), str(tmp_path / "o.png"), "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--weights", str(plain), "--size", "128"])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "a 128x128 px working image does not suit weights 'plain.pt'" in lines[0]
    assert not (tmp_path / "o.png").exists()


def test_max_change_bounds_every_pixel_of_a_photograph_the_model_corrects(tmp_path):
    from fundus_batch.degrade import degrade, sample_rng

    s = synth_fundus(256, seed=2)
    dark, _ = degrade(s.image, s.mask, "001", sample_rng(0, "bound", 0))
    (tmp_path / "in.png").write_bytes(encode_png(dark))
    (tmp_path / "mask.png").write_bytes(encode_png(s.mask))
    changes = {}
    for limit in (None, 6):
        out = tmp_path / f"out{limit}.png"
        args = ["enhance-image", str(tmp_path / "in.png"), str(out), "--preprocessed"]
        args += ["--mask", str(tmp_path / "mask.png"), "--device", "cpu"]
        args += [] if limit is None else ["--max-change", str(limit)]
        _ok(CliRunner().invoke(main, args))
        written = decode_image(out.read_bytes()).astype(int)
        changes[limit] = np.abs(written - dark.astype(int))[s.mask > 0].max()
    assert changes[None] > 6  # the shipped model lifts this hole by more than the bound
    assert 0 < changes[6] <= 6


def test_max_change_is_refused_for_the_classical_enhancer(raw_photo, tmp_path):
    args = ["enhance-image", str(raw_photo), str(tmp_path / "o.png"), "--enhancer", "classical"]
    result = CliRunner().invoke(main, [*args, "--max-change", "40"])
    assert result.exit_code == 2 and "limits the cofenet enhancer only" in result.output


def test_max_change_is_refused_for_a_jpeg_output_it_could_not_bound(raw_photo, tmp_path):
    out = tmp_path / "o.jpg"
    args = ["enhance-image", str(raw_photo), str(out), "--device", "cpu", "--max-change", "6"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--max-change needs a .png OUTPUT" in result.output
    assert not out.exists()


def test_device_cuda_on_a_machine_without_a_gpu_is_a_one_line_error(
    monkeypatch, raw_photo, tmp_path
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["enhance-image", str(raw_photo), str(tmp_path / "o.png"), "--device", "cuda"]
    result = CliRunner().invoke(main, [*args, "--size", "256"])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "no GPU" in lines[0], lines
    assert not (tmp_path / "o.png").exists()


def test_preprocessed_input_with_its_mask_writes_jpeg_by_extension(tmp_path):
    s = synth_fundus(128, seed=4)
    (tmp_path / "in.png").write_bytes(encode_png(s.image))
    (tmp_path / "mask.png").write_bytes(encode_png(s.mask))
    out = tmp_path / "out.jpg"
    args = ["enhance-image", str(tmp_path / "in.png"), str(out), "--enhancer", "classical"]
    _ok(CliRunner().invoke(main, [*args, "--preprocessed", "--mask", str(tmp_path / "mask.png")]))
    data = out.read_bytes()
    assert data[:2] == b"\xff\xd8"
    expected = enhance_classical(s.image, s.mask).astype(int)
    assert np.abs(decode_image(data).astype(int) - expected).mean() < 3  # JPEG loss only


def test_a_given_mask_replaces_fov_detection(raw_photo, tmp_path):
    out = tmp_path / "o.png"
    mask = tmp_path / "photo_mask.png"
    args = ["enhance-image", str(raw_photo), str(out), "--enhancer", "classical", "--size", "128"]
    _ok(CliRunner().invoke(main, [*args, "--mask", str(mask)]))
    written = decode_image(out.read_bytes())
    detected = preprocess(decode_image(raw_photo.read_bytes()), size=128)
    assert written.shape == (128, 128, 3)
    assert (written[detected.mask == 0] == 0).all() and written[64, 64].sum() > 0


def test_a_given_mask_at_another_resolution_is_resized_as_the_pipeline_does(tmp_path):
    # The authors' low-quality set: 512 px images with 800 px FOV masks.
    s = synth_fundus(512, seed=6)
    src, mask = tmp_path / "lq.png", tmp_path / "lq_mask.png"
    src.write_bytes(encode_png(s.image))
    mask.write_bytes(encode_png(cv2.resize(s.mask, (800, 800), interpolation=cv2.INTER_NEAREST)))
    out = tmp_path / "o.png"
    args = ["enhance-image", str(src), str(out), "--enhancer", "classical", "--size", "256"]
    _ok(CliRunner().invoke(main, [*args, "--mask", str(mask)]))
    item = stages.Item(
        {"image_id": "lq", "status": "ok"},
        encoded={"raw": src.read_bytes(), "mask": mask.read_bytes()},
    )
    [pre] = stages.Preprocess(size=256).process([item])
    assert pre.ok and pre.row["fov_status"] == "given_mask"
    expected = enhance_classical(pre.image("clean"), pre.image("mask"))
    assert np.array_equal(decode_image(out.read_bytes()), expected)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--preprocessed"], "--mask"),
        (["--mask", "nope.png"], "no such file"),
    ],
)
def test_bad_arguments_give_one_line_reasons(raw_photo, tmp_path, extra, needle):
    args = ["enhance-image", str(raw_photo), str(tmp_path / "o.png"), "--enhancer", "classical"]
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], result.output


def test_unknown_enhancer_is_a_usage_error(raw_photo, tmp_path):
    result = CliRunner().invoke(
        main, ["enhance-image", str(raw_photo), str(tmp_path / "o.png"), "--enhancer", "clahe"]
    )
    assert result.exit_code == 2 and "clahe" in result.output


@pytest.mark.parametrize(
    ("command", "extra"),
    [("degrade", ["--enhance"]), ("enhance", [])],
)
def test_enhancer_option_reaches_the_run_config(monkeypatch, tmp_path, command, extra):
    seen = []
    monkeypatch.setattr(cli, "_run", lambda config, **_: seen.append(config))
    base = [command, "--manifest", "m.csv", "--out", str(tmp_path / "o"), *extra]
    _ok(CliRunner().invoke(main, [*base, "--enhancer", "classical"]))
    _ok(CliRunner().invoke(main, base))
    assert [c.enhance.enhancer for c in seen] == ["classical", "cofenet"]
    assert all(c.enhance.enabled for c in seen)


def test_size_beside_preprocessed_is_refused_instead_of_ignored(tmp_path):
    s = synth_fundus(256, seed=2)
    src, mask, out = tmp_path / "w.png", tmp_path / "m.png", tmp_path / "o.png"
    src.write_bytes(encode_png(s.image))
    mask.write_bytes(encode_png(s.mask))
    args = ["enhance-image", str(src), str(out), "--enhancer", "classical", "--preprocessed"]
    result = CliRunner().invoke(main, [*args, "--mask", str(mask), "--size", "512"])
    assert result.exit_code == 2 and "--size 512 with --preprocessed" in result.output
    assert not out.exists()
    _ok(CliRunner().invoke(main, [*args, "--mask", str(mask)]))
    assert decode_image(out.read_bytes()).shape == (256, 256, 3)
