"""Cofe-Net networks: released keys/shapes/counts, oracle equivalence, shapes, sizes, init."""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fundus_batch.models import cofenet
from fundus_batch.models.cofenet import (
    DEFAULT_VARIANT,
    N_OUTPUTS,
    VARIANTS,
    CofeNet,
    build_cofenet,
    canonical_variant,
    default_x256,
)

RES, VESSEL, SHARE, ATTEN = VARIANTS

# Section 3.7 of cofe-net-architecture.md (counted on the authors' released classes).
RELEASED_COUNTS = {
    RES: (118, 8_891_139),
    VESSEL: (434, 38_508_632),
    SHARE: (436, 38_511_179),
    ATTEN: (456, 41_217_676),
}


@pytest.fixture(autouse=True)
def _few_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def netstate(oracle_dir: Path) -> Iterator[ModuleType]:
    """The oracle's stand-in weight generator, imported from ../shared (never copied)."""
    sys.path.insert(0, str(oracle_dir))
    try:
        yield importlib.import_module("netstate")
    finally:
        sys.path.remove(str(oracle_dir))


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text))


def _reference_lists(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Parse cofe-net-state-dict-keys.txt: the full atten list plus per-variant differences."""
    lines = path.read_text().splitlines()
    full: dict[str, tuple[int, ...]] = {}
    diffs: dict[str, list[str]] = {}
    current: str | None = None
    for line in lines:
        header = re.match(r"## (\S+)", line)
        if header:
            current = header.group(1)
            diffs[current] = []
        elif current == ATTEN and "\t" in line:
            key, shape = line.split("\t")
            full[key] = _shape(shape)
        elif current is not None and line.startswith("  "):
            diffs[current].append(line.strip())
    out = {ATTEN: full}
    for variant in (RES, VESSEL, SHARE):
        keys = dict(full)
        for diff in diffs[variant]:
            if diff.startswith("absent"):
                modules = [m.strip() for m in diff.split(":", 1)[1].split(",")]
                keys = {k: s for k, s in keys.items() if k.split(".")[0] not in modules}
            elif diff.startswith("shape differs:"):
                key, shape = diff.removeprefix("shape differs:").split(" (", 1)
                keys[key.strip()] = _shape(shape.split(")")[0])
        assert len(keys) == RELEASED_COUNTS[variant][0], f"parse error for {variant}"
        out[variant] = keys
    return out


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _lively(model: CofeNet, seed: int) -> CofeNet:
    """Fan-in scaled random weights: outputs then depend visibly on the input (unlike init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(r * (1.0 / math.prod(p.shape[1:])) ** 0.5)
            else:
                p.copy_(1.0 + 0.1 * r if name.endswith("weight") else 0.01 * r)
    return model


def _as_tuple(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


# ---------------------------------------------------------------------------- released layout


@pytest.mark.parametrize("variant", VARIANTS)
def test_key_and_parameter_counts_equal_released_models(variant: str) -> None:
    model = build_cofenet(variant, device="meta")
    n_keys, n_params = RELEASED_COUNTS[variant]
    assert len(model.state_dict()) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_parameter_split_of_cofe_net_equals_released_g_rsa_lqa_counts() -> None:
    model = build_cofenet("cofe-net", device="meta")
    parts = {"G": 0, "a": 0, "rsa": 0}
    for name, p in model.named_parameters():
        part = "G" if name.startswith("G_") else "a" if name.startswith("a_") else "rsa"
        parts[part] += p.numel()
    assert parts == {"G": 9_508_086, "rsa": 29_003_093, "a": 2_706_497}


@pytest.mark.shared
@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_and_shapes_equal_reference_list(variant: str, shared_dir: Path) -> None:
    path = shared_dir / "reference" / "cofe-net-state-dict-keys.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    expected = _reference_lists(path)[variant]
    ours = _shapes(build_cofenet(variant, device="meta"))
    assert list(ours) == list(expected)  # same keys in the released registration order
    assert ours == expected


@pytest.mark.shared
@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_equals_oracle_keys_file(variant: str, oracle_dir: Path) -> None:
    lines = (oracle_dir / "net" / variant / "keys.txt").read_text().splitlines()
    expected = [(k, _shape(s)) for k, s in (line.split("\t") for line in lines if line)]
    assert list(_shapes(build_cofenet(variant, device="meta")).items()) == expected


# ---------------------------------------------------------------------------- oracle


@pytest.mark.shared
@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_match_released_code_on_oracle_weights(
    variant: str, oracle_dir: Path, netstate: ModuleType
) -> None:
    model = build_cofenet(variant).eval()
    model.load_state_dict(netstate.fill(model, salt="visible-"), strict=True)
    x512, x256 = netstate.inputs(320, seed=777)
    with torch.inference_mode():
        outputs = _as_tuple(model(x512, x256) if model.two_scale else model(x512))
    files = sorted((oracle_dir / "net" / variant).glob("out_*.npy"))
    assert len(outputs) == len(files) == model.n_outputs
    for i, out in enumerate(outputs):
        ref = np.load(oracle_dir / "net" / variant / f"out_{i}.npy")
        assert out.shape == ref.shape
        rel = np.abs(out.numpy() - ref).max() / np.abs(ref - ref.mean()).max()
        assert rel <= 1e-4, f"{variant} output {i}: relative error {rel:.3g}"


@pytest.mark.shared
def test_default_coarse_input_equals_oracle_half_size_input(netstate: ModuleType) -> None:
    x512, x256 = netstate.inputs(320, seed=777)
    torch.testing.assert_close(default_x256(x512), x256, rtol=0, atol=1e-6)


def test_residual_block_keeps_relu_of_conv1_on_the_skip_path() -> None:
    gen = torch.Generator().manual_seed(0)
    block = cofenet.ResBlock(4)
    for p in block.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.3
    x = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        h = F.relu(block.conv1(x))
        released = F.relu(h + block.conv2(h))
        obvious = F.relu(block.conv1(x) + block.conv2(h))
        out = block(x)
    torch.testing.assert_close(out, released, rtol=0, atol=0)
    assert not torch.allclose(out, obvious)


# ---------------------------------------------------------------------------- forward


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_and_helpers_at_512_for_width_quarter(variant: str) -> None:
    gen = torch.Generator().manual_seed(1)
    model = build_cofenet(variant, 0.25, generator=gen).eval()
    x = torch.rand(2, 3, 512, 512, generator=gen)
    with torch.inference_mode():
        outputs = model(x)
    items = _as_tuple(outputs)
    assert len(items) == model.n_outputs == {RES: 1, VESSEL: 2, SHARE: 3, ATTEN: 4}[variant]
    assert model.enhanced(outputs).shape == (2, 3, 512, 512)
    assert model.enhanced(outputs) is items[0]
    assert 0.0 <= float(model.enhanced(outputs).min()) <= float(model.enhanced(outputs).max()) <= 1
    coarse = model.coarse(outputs)
    vessel = model.vessel(outputs)
    attention = model.attention(outputs)
    if variant == RES:
        assert coarse is None and vessel is None and attention is None
    if variant == VESSEL:
        assert coarse is None and attention is None and vessel is items[1]
    if variant in (SHARE, ATTEN):
        assert coarse is items[1] and coarse.shape == (2, 3, 256, 256)
        assert vessel is items[2]
    if variant == ATTEN:
        assert attention is items[3] and attention.shape == (2, 1, 256, 256)
    else:
        assert attention is None
    if vessel is not None:
        assert vessel.shape == (2, 1, 512, 512)


def test_full_width_cofe_net_forward_shapes_at_256() -> None:
    model = build_cofenet(generator=torch.Generator().manual_seed(2)).eval()
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        shapes = [tuple(t.shape) for t in model(x)]
    assert shapes == [(1, 3, 256, 256), (1, 3, 128, 128), (1, 1, 256, 256), (1, 1, 128, 128)]


def test_non_square_input_keeps_its_shape() -> None:
    model = build_cofenet("cofe-net", 0.125, generator=torch.Generator().manual_seed(4)).eval()
    with torch.inference_mode():
        out = model.enhanced(model(torch.rand(1, 3, 192, 256)))
    assert out.shape == (1, 3, 192, 256)


def test_inference_is_deterministic() -> None:
    model = _lively(build_cofenet("cofe-net", 0.25), seed=5).eval()
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        first = model(x)
        second = model(x)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_omitted_coarse_input_defaults_to_antialiased_bicubic_half() -> None:
    model = _lively(build_cofenet(SHARE, 0.125), seed=7).eval()
    x = torch.rand(1, 3, 192, 192, generator=torch.Generator().manual_seed(8))
    half = F.interpolate(x, size=(96, 96), mode="bicubic", antialias=True).clamp(0, 1)
    other = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        implicit = model(x)
        explicit = model(x, half)
        different = model(x, other)
    for a, b in zip(implicit, explicit, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert float((implicit[1] - different[1]).abs().max()) > 1e-3


def test_encode_decode_res_applies_the_same_generator_twice() -> None:
    model = _lively(build_cofenet(RES, 0.125), seed=10).eval()
    x = torch.rand(1, 3, 192, 192, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        once = model._g(x, x, None, None)
        twice = model._g(once, once, None, None)
        out = model(x)
    torch.testing.assert_close(out, twice, rtol=0, atol=0)
    assert float((out - once).abs().max()) > 1e-3


def test_training_mode_backward_reaches_every_parameter() -> None:
    model = build_cofenet("cofe-net", 0.125, generator=torch.Generator().manual_seed(12))
    x = torch.rand(2, 3, 192, 192, generator=torch.Generator().manual_seed(13))
    out_512, out_256, vessel, attention = model(x)
    (out_512.mean() + out_256.mean() + vessel.mean() + attention.mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("size", [(160, 160), (200, 200), (224, 96), (256, 250)])
def test_sizes_that_are_not_multiples_of_32_or_below_192_are_rejected(
    size: tuple[int, int],
) -> None:
    model = build_cofenet("cofe-net", 0.125)
    with pytest.raises(ValueError, match=r"multiple of 32 and >= 192"):
        model(torch.rand(1, 3, *size))


@pytest.mark.parametrize("width", [1.0, 0.125])
def test_192_is_the_real_minimum_size_for_the_vessel_branch(
    width: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cofenet, "check_size", lambda h, w: None)
    model = build_cofenet(VESSEL, width).eval()
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 192, 192))[0].shape == (1, 3, 192, 192)
        with pytest.raises(RuntimeError):
            model(torch.rand(1, 3, 160, 160))


def test_bad_inputs_raise_typed_errors() -> None:
    model = build_cofenet("cofe-net", 0.125)
    with pytest.raises(TypeError):
        model(np.zeros((1, 3, 192, 192), np.float32))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        model(torch.rand(1, 4, 192, 192))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        model(torch.rand(3, 192, 192))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        model(torch.zeros(1, 3, 192, 192, dtype=torch.uint8))
    with pytest.raises(ValueError, match="x256 must have shape"):
        model(torch.rand(1, 3, 192, 192), torch.rand(1, 3, 192, 192))


@pytest.mark.parametrize("width", [0.0, -0.5, 1.5, math.nan])
def test_width_outside_zero_to_one_is_rejected(width: float) -> None:
    with pytest.raises(ValueError, match="width"):
        build_cofenet("cofe-net", width, device="meta")


def test_residual_output_is_rejected_at_full_width() -> None:
    with pytest.raises(ValueError, match="width < 1"):
        build_cofenet("cofe-net", 1.0, residual=True, device="meta")


def test_variant_names_and_alias() -> None:
    assert canonical_variant("cofe-net") == DEFAULT_VARIANT == ATTEN
    assert build_cofenet(device="meta").variant == ATTEN
    for variant in VARIANTS:
        assert canonical_variant(variant) == variant
    with pytest.raises(ValueError, match="unknown Cofe-Net variant"):
        build_cofenet("encode_decode_vessel_2scale_share_res_atten_sum", device="meta")


# ---------------------------------------------------------------------------- width, init


@pytest.mark.parametrize("variant", VARIANTS)
def test_narrow_model_has_released_keys_and_scaled_channels(variant: str) -> None:
    full = _shapes(build_cofenet(variant, device="meta"))
    narrow = build_cofenet(variant, 0.25, device="meta")
    shapes = _shapes(narrow)
    assert list(shapes) == list(full)
    assert (narrow.variant, narrow.width) == (variant, 0.25)
    assert narrow.n_outputs == {RES: 1, VESSEL: 2, SHARE: 3, ATTEN: 4}[variant]
    assert shapes["G_conv1.weight"][0] == 8
    for key, shape in shapes.items():
        if len(shape) == 4 and full[key][0] >= 32 and full[key][0] % 4 == 0:
            assert shape[0] == full[key][0] // 4, key


def test_generator_seeds_initialisation_without_touching_global_rng() -> None:
    state = torch.random.get_rng_state()
    a = build_cofenet("cofe-net", 0.125, generator=torch.Generator().manual_seed(14))
    b = build_cofenet("cofe-net", 0.125, generator=torch.Generator().manual_seed(14))
    c = build_cofenet("cofe-net", 0.125, generator=torch.Generator().manual_seed(15))
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["G_conv1.weight"], sc["G_conv1.weight"])


def test_initialisation_follows_define_g() -> None:
    model = build_cofenet("cofe-net", 0.5, generator=torch.Generator().manual_seed(16))
    convs = [
        m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ]
    weights = torch.cat([m.weight.detach().flatten() for m in convs])
    assert abs(float(weights.std()) - 0.02) < 0.001
    assert abs(float(weights.mean())) < 0.001
    assert all(not m.bias.any() for m in convs if m.bias is not None)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bn_weights = torch.cat([m.weight.detach() for m in bns])
    assert abs(float(bn_weights.mean()) - 1.0) < 0.005
    assert 0.015 < float(bn_weights.std()) < 0.025
    assert all(not m.bias.any() for m in bns)
    assert all(not m.running_mean.any() for m in bns)
    assert all(bool((m.running_var == 1).all()) for m in bns)
    assert all(int(m.num_batches_tracked) == 0 for m in bns)


def test_without_generator_the_callers_torch_seed_decides_the_weights() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(19)
        a = build_cofenet(RES, 0.125).state_dict()
        torch.manual_seed(19)
        b = build_cofenet(RES, 0.125).state_dict()
        c = build_cofenet(RES, 0.125).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["G_conv1.weight"], c["G_conv1.weight"])


@pytest.mark.parametrize("variant", [RES, ATTEN])
def test_residual_model_returns_its_input_when_the_output_conv_is_zero(variant: str) -> None:
    model = build_cofenet(
        variant, 0.125, residual=True, generator=torch.Generator().manual_seed(17)
    )
    torch.nn.init.zeros_(model.G_deconv1_0.weight)
    model.eval()
    x = torch.rand(1, 3, 192, 192, generator=torch.Generator().manual_seed(18)) * 0.9 + 0.05
    with torch.inference_mode():
        outputs = model(x)
    torch.testing.assert_close(model.enhanced(outputs), x, rtol=0, atol=1e-5)
    if variant == ATTEN:
        torch.testing.assert_close(model.coarse(outputs), default_x256(x), rtol=0, atol=1e-5)
    plain = build_cofenet(variant, 0.125)
    torch.nn.init.zeros_(plain.G_deconv1_0.weight)
    with torch.inference_mode():
        flat = plain.eval().enhanced(plain(x))
    torch.testing.assert_close(flat, torch.full_like(x, 0.5))


def test_model_is_a_cofenet_module_with_its_settings_in_repr() -> None:
    model = build_cofenet("cofe-net", 0.25, residual=True, device="meta")
    assert isinstance(model, CofeNet)
    assert "width=0.25" in repr(model) and "residual=True" in repr(model)


# ------------------------------------------------------------------ smooth-correction head


def _field_model(seed: int = 0, field: int = 192) -> CofeNet:
    return build_cofenet(
        "cofe-net", 0.125, field=field, generator=torch.Generator().manual_seed(seed)
    ).eval()


def _assert_output_shapes(model, x: torch.Tensor) -> None:
    """Enhanced at the input's size, coarse at half of it, one vessel channel."""
    n, _, size, _ = x.shape
    with torch.no_grad():
        out = model(x)
    assert model.enhanced(out).shape == x.shape
    assert model.coarse(out).shape == (n, 3, size // 2, size // 2)
    assert model.vessel(out).shape == (n, 1, size, size)


@pytest.mark.parametrize("size", [192, 256, 384])
def test_field_model_keeps_the_input_size_for_every_output(size: int) -> None:
    model = _field_model()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    _assert_output_shapes(model, x)


@pytest.mark.parametrize("size", [64, 96, 128, 160])
def test_a_field_model_takes_working_sizes_below_192_that_a_plain_model_refuses(size: int) -> None:
    """The network sees only the 192 px copy; at the input's size the correction is resized,
    added and clamped, which any multiple of 32 allows."""
    model = build_cofenet(
        "cofe-net", 0.125, field=192, field_gate=True, generator=torch.Generator().manual_seed(5)
    ).eval()
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    _assert_output_shapes(model, x)
    torch.nn.init.zeros_(model.G_deconv1_0.weight)  # no correction: the input comes back
    torch.nn.init.zeros_(model.G_deconv1_0.bias)
    with torch.no_grad():
        assert torch.equal(model.enhanced(model(x)), x)
    with pytest.raises(ValueError, match="multiple of 32 px"):
        model.check_input_size(size + 4, size)
    plain = build_cofenet("cofe-net", 0.125)
    with pytest.raises(ValueError, match=r"multiple of 32 and >= 192"):
        plain.check_input_size(size, size)


def test_field_model_with_a_zero_output_conv_returns_its_input() -> None:
    model = _field_model()
    torch.nn.init.zeros_(model.G_deconv1_0.weight)
    torch.nn.init.zeros_(model.G_deconv1_0.bias)
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x)
    assert torch.equal(model.enhanced(out), x)
    assert torch.allclose(model.coarse(out), F.avg_pool2d(x, 2), atol=1e-6)


def test_field_model_keeps_the_input_detail_and_adds_only_a_smooth_correction() -> None:
    from fundus_batch.train import fixup_init

    model = _field_model(seed=3)
    fixup_init(model, torch.Generator().manual_seed(3))
    torch.nn.init.normal_(
        model.G_deconv1_0.weight, 0.0, 0.05, generator=torch.Generator().manual_seed(4)
    )
    x = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(5)) * 0.5 + 0.25
    with torch.no_grad():
        correction = model.enhanced(model(x)) - x
    assert correction.abs().mean() > 1e-3  # the head does change the image
    # What an 8x smaller copy cannot carry is fine detail; the correction has almost none.
    inner = (slice(None), slice(None), slice(32, -32), slice(32, -32))

    def fine_share(t: torch.Tensor) -> float:
        coarse = F.interpolate(F.avg_pool2d(t, 8), size=t.shape[2:], mode="bilinear")
        return float((t - coarse)[inner].abs().mean() / t[inner].abs().mean())

    assert fine_share(correction) < 0.25
    assert fine_share(x - 0.5) > 0.9  # the same measure on the input's own pixel noise


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 1.0}, "field is only allowed"),
        ({"width": 0.25, "residual": True}, "field is only allowed"),
        ({"width": 0.25, "field": 100}, "multiple of 32"),
    ],
)
def test_field_head_rejects_unsupported_settings(kwargs: dict, message: str) -> None:
    settings = {"field": 192, **kwargs}
    with pytest.raises(ValueError, match=message):
        CofeNet(DEFAULT_VARIANT, **settings)


def test_field_deadzone_drops_small_corrections_and_shrinks_large_ones() -> None:
    model = _field_model()
    model.field_deadzone = 2 / 255
    image = torch.full((1, 3, 64, 64), 0.5)
    small = torch.full((1, 3, 8, 8), 1.5 / 255)
    large = torch.full((1, 3, 8, 8), -10 / 255)
    assert torch.equal(model._add_correction(small, image), image)
    shrunk = model._add_correction(large, image)
    assert torch.allclose(shrunk, image - 8 / 255, atol=1e-6)


def test_field_scale_multiplies_the_correction_before_the_deadzone() -> None:
    model = _field_model()
    model.field_deadzone, model.field_scale = 2 / 255, 0.5
    image = torch.full((1, 3, 64, 64), 0.5)
    assert torch.equal(model._add_correction(torch.full((1, 3, 8, 8), 3 / 255), image), image)
    scaled = model._add_correction(torch.full((1, 3, 8, 8), -10 / 255), image)
    assert torch.allclose(scaled, image - 3 / 255, atol=1e-6)  # -10 * 0.5, then 2 levels off


@pytest.mark.parametrize("field", [192, None])
def test_max_change_keeps_every_output_pixel_within_the_bound_of_the_input(field: int | None):
    from fundus_batch.train import fixup_init

    model = build_cofenet(
        "cofe-net", 0.125, field=field, generator=torch.Generator().manual_seed(3)
    ).eval()
    if field is not None:  # the head starts as the identity: give it a large correction
        fixup_init(model, torch.Generator().manual_seed(3))
        torch.nn.init.normal_(
            model.G_deconv1_0.weight, 0.0, 0.5, generator=torch.Generator().manual_seed(4)
        )
    x = torch.rand(2, 3, 192, 192, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        free = model(x)
        model.max_change = 10 / 255
        limited = model(x)
    free_change = (model.enhanced(free) - x).abs()
    change = (model.enhanced(limited) - x).abs()
    assert free_change.max() > 30 / 255  # the bound has work to do
    assert change.max() <= 10 / 255 + 1e-6
    within = free_change <= 10 / 255
    assert torch.equal(model.enhanced(limited)[within], model.enhanced(free)[within])
    assert torch.equal(model.vessel(limited), model.vessel(free))  # the other outputs as they were


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_max_change_must_be_in_the_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match="max_change must be in"):
        CofeNet(DEFAULT_VARIANT, width=0.25, max_change=bad)


def test_field_scale_must_be_positive() -> None:
    with pytest.raises(ValueError, match="field_scale must be > 0"):
        CofeNet(DEFAULT_VARIANT, width=0.25, field=192, field_scale=0.0)


# ------------------------------------------------------------------ the field head's gate


def _gated_model(seed: int = 0) -> CofeNet:
    from fundus_batch.train import fixup_init

    model = build_cofenet(
        "cofe-net", 0.125, field=192, field_gate=True, generator=torch.Generator().manual_seed(seed)
    )
    fixup_init(model, torch.Generator().manual_seed(seed))
    torch.nn.init.normal_(
        model.G_deconv1_0.weight, 0.0, 0.05, generator=torch.Generator().manual_seed(seed + 1)
    )
    return model.eval()


def test_gate_logits_come_last_one_per_image_and_pass() -> None:
    model = _gated_model()
    assert model.n_outputs == N_OUTPUTS[DEFAULT_VARIANT] + 1
    assert "G_gate.weight" in model.state_dict() and "field_gate=True" in repr(model)
    with torch.no_grad():
        out = model(torch.rand(3, 3, 256, 256, generator=torch.Generator().manual_seed(1)))
    assert model.gate_logits(out).shape == (3, 2)  # the coarse pass, then the full one
    assert _field_model().gate_logits(_field_model()(torch.rand(1, 3, 192, 192))) is None


def test_a_closed_gate_returns_the_input_and_an_open_one_corrects_it() -> None:
    model = _gated_model(seed=2)
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(3)) * 0.5 + 0.25
    with torch.no_grad():
        assert torch.equal(model.enhanced(model(x, gate=torch.zeros(2))), x)
        opened = model.enhanced(model(x, gate=torch.ones(2)))
        torch.nn.init.constant_(model.G_gate.bias, -30.0)  # predicted: closed
        closed = model.enhanced(model(x))
        torch.nn.init.constant_(model.G_gate.bias, 30.0)  # predicted: open
        predicted_open = model.enhanced(model(x))
    assert (opened - x).abs().mean() > 1e-3
    assert torch.allclose(closed, x, atol=1e-6)
    assert torch.allclose(predicted_open, opened, atol=1e-6)


def test_the_gate_starts_undecided_and_scales_the_correction_by_its_sigmoid() -> None:
    model = _gated_model(seed=4)
    assert not model.G_gate.weight.any() and not model.G_gate.bias.any()
    with torch.no_grad():  # small enough that nothing is clamped
        model.G_deconv1_0.weight.mul_(0.002)
    x = torch.rand(1, 3, 192, 192, generator=torch.Generator().manual_seed(5)) * 0.5 + 0.25
    with torch.no_grad():
        full = model(x, gate=torch.ones(1))[1] - F.avg_pool2d(x, 2)  # the coarse correction
        half = model(x)[1] - F.avg_pool2d(x, 2)
    assert torch.allclose(half, 0.5 * full, atol=1e-6)


def test_a_gate_threshold_applies_the_correction_whole_or_not_at_all() -> None:
    model = _gated_model(seed=6)
    decided = _gated_model(seed=6)
    decided.field_gate_threshold = 0.9
    x = torch.rand(1, 3, 192, 192, generator=torch.Generator().manual_seed(7)) * 0.5 + 0.25
    with torch.no_grad():
        whole = model.enhanced(model(x, gate=torch.ones(1)))
        for bias, expected in ((2.0, x), (2.3, whole)):  # sigmoid 0.881 and 0.909
            for m in (model, decided):
                torch.nn.init.constant_(m.G_gate.bias, bias)
            soft = model.enhanced(model(x))
            assert torch.equal(decided.enhanced(decided(x)), expected)
            assert not torch.equal(soft, x) and not torch.equal(soft, whole)  # scaled
        # Teacher forcing still wins over the threshold.
        assert torch.equal(decided.enhanced(decided(x, gate=torch.zeros(1))), x)
    assert "field_gate_threshold=0.9" in repr(decided)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"field": 192, "field_gate_threshold": 0.5}, "field_gate_threshold needs field_gate"),
        ({"field": 192, "field_gate": True, "field_gate_threshold": 1.0}, r"in \(0, 1\)"),
        ({"field": 192, "field_gate": True, "field_gate_threshold": 0.0}, r"in \(0, 1\)"),
    ],
)
def test_gate_thresholds_that_cannot_work_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CofeNet(DEFAULT_VARIANT, 0.125, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "gate", "message"),
    [
        ({"field_gate": True}, None, "field_gate needs the smooth-correction head"),
        ({"field": 192}, torch.ones(1), "gate needs a field_gate model"),
        ({"field": 192, "field_gate": True}, torch.ones(3), "one value per image"),
    ],
)
def test_gate_settings_that_cannot_work_are_rejected(
    kwargs: dict, gate: torch.Tensor | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        model = CofeNet(DEFAULT_VARIANT, 0.125, **kwargs)
        model(torch.rand(1, 3, 192, 192), gate=gate)


# ------------------------------------------------------------------ the spot head


def _spot_model(deadzone: float = 0.0) -> CofeNet:
    model = build_cofenet(
        "cofe-net",
        0.125,
        field=192,
        spot_head=4,
        spot_deadzone=deadzone,
        generator=torch.Generator().manual_seed(7),
    )
    return model.eval()


def _fundus_like(seed: int, size: int = 192) -> torch.Tensor:
    """Random colours inside a centred disc, zero outside (like a working image)."""
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.45 * size) ** 2
    return x * disc


def _without_spot_head(model: CofeNet) -> CofeNet:
    """The same field model with ``model``'s weights and no spot head."""
    without = build_cofenet("cofe-net", 0.125, field=192, generator=torch.Generator())
    without.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("spot.")}
    )
    return without.eval()


def test_a_new_spot_head_is_an_identity_and_leaves_the_field_model_unchanged() -> None:
    model = _spot_model()
    assert model.spot is not None
    without = _without_spot_head(model)
    x = _fundus_like(1)
    with torch.no_grad():
        assert torch.equal(model.remove_spots(x), x)
        assert torch.equal(model.enhanced(model(x)), without.enhanced(without(x)))


def test_the_spot_heads_correction_stays_inside_the_fov_and_feeds_the_field() -> None:
    model = _spot_model()
    assert model.spot is not None
    torch.nn.init.constant_(model.spot.out.bias, 0.05)
    x = _fundus_like(2)
    inside = x.amax(dim=1, keepdim=True) > 0
    with torch.no_grad():
        out = model.remove_spots(x)
        corrected = model.enhanced(model(x))
        field_only = _without_spot_head(model)
        expected = field_only.enhanced(field_only(out))
    assert torch.allclose(out, (x + 0.05).clamp(0, 1) * inside, atol=1e-6)
    assert torch.allclose(corrected, expected, atol=1e-6)


def test_spot_deadzone_drops_small_corrections_and_shrinks_large_ones() -> None:
    x = _fundus_like(3)
    inside = x.amax(dim=1, keepdim=True) > 0
    for bias, expected in ((1.5 / 255, 0.0), (10 / 255, 8 / 255)):
        model = _spot_model(deadzone=2 / 255)
        assert model.spot is not None
        torch.nn.init.constant_(model.spot.out.bias, bias)
        with torch.no_grad():
            out = model.remove_spots(x)
        assert torch.allclose(out, (x + expected).clamp(0, 1) * inside, atol=1e-6)


def test_the_spot_heads_weights_are_saved_under_spot() -> None:
    keys = [k for k in _spot_model().state_dict() if k.startswith("spot.")]
    assert keys[:2] == ["spot.inp.weight", "spot.inp.bias"]
    assert keys[-2:] == ["spot.out.weight", "spot.out.bias"]
    assert len(keys) == 2 * (2 + len(cofenet.SPOT_DILATIONS))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spot_head": 4}, "spot_head needs the smooth-correction head"),
        ({"field": 192, "spot_head": 0}, "channel count >= 1"),
        ({"field": 192, "spot_head": True}, "channel count >= 1"),
        ({"field": 192, "spot_head": 4, "spot_deadzone": 0.5}, r"in \[0, 0\.5\)"),
    ],
)
def test_spot_head_settings_that_cannot_work_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CofeNet(DEFAULT_VARIANT, 0.125, **kwargs)


def test_remove_spots_needs_a_spot_head() -> None:
    with pytest.raises(ValueError, match="no spot head"):
        _field_model().remove_spots(torch.zeros(1, 3, 192, 192))
