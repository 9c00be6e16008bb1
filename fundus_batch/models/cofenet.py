"""Cofe-Net (Shen et al., TMI 2021): the four released generator variants, plus a width multiplier.

At ``width=1.0`` the module attribute names, state-dict keys, shapes and forward semantics equal the
authors' released ``models/networks.py`` classes, so released checkpoints load strictly and give the
same outputs. At ``width < 1`` every channel count of G, LQA and the CE-Net branch is scaled (same
topology), which gives a model small enough to train and run on a CPU.

Inputs are RGB in [0, 1], NCHW, with height and width multiples of 32 and at least 192 (the 6x6
pyramid pool of the CE-Net branch needs a 6x6 map at 1/32 resolution).

``field=N`` (width < 1 only) selects the smooth-correction head used by the shipped model: the
network runs on the input resized to N x N and G's output is read as an additive correction
``tanh(G)``, smoothed inside a Gaussian window of ``field_sigma`` network pixels and resized to
the input size: ``enhanced = clamp(input + correction, 0, 1)``; ``field_deadzone`` (in [0, 1]
units) shrinks every correction by that much towards zero, so a photograph that needs only a
slight change is returned unchanged; ``field_scale`` multiplies the correction before that (1:
as trained; the model card measures smaller ones, which trade gain for fewer new errors). The
input's own detail passes through untouched, so the head can undo smooth illumination defects
(halo, dark disc, colour cast) but cannot paint speckle or blotches finer than the window, and any
working size that is a multiple of 32 works, below 192 px too (:meth:`CofeNet.check_input_size`:
only the N x N copy meets the network's own size limit).

``field_gate=True`` (with ``field``) adds a global gate to that head: a linear layer on the mean
and maximum of G's deepest features gives one logit per image and pass, and each pass's
correction is multiplied by its sigmoid. Each pixel of G sees only part of the photograph, but
whether it shows an illumination defect at all (a halo ring at the rim, a dark disc, a colour
shift) is a question about the whole field: the gate answers it once and closes on photographs
that need no correction. The logits come back as the last output (``gate_logits``), so training
can supervise them; ``forward(..., gate=y)`` uses ``y`` (N values in [0, 1]) in place of the
predicted gate (teacher forcing). ``field_gate_threshold=t`` makes the predicted gate a decision:
the correction is applied whole where the sigmoid reaches ``t`` and not at all below it. Training
teacher-forces 0 or 1, so a half-open gate applies a correction scaled as it never was in training.

``max_change=m`` (in [0, 1] units, any variant; an inference setting, None by default) moves the
full-resolution output back to within ``m`` of the input in every pixel and channel: a bound on
what the model may do to a photograph. A pixel then ends at most ``m`` further from any reference
than the input was, so at 40/255 no pixel can become more than 40 grey levels worse (the "new
error" of weights/MODEL_CARD.md), at the cost of not lifting the deepest defects all the way.

``spot_head=C`` (with ``field``) puts a full-resolution spot remover in front of that head: a
``SpotHead`` of C channels adds a correction to the input inside the FOV (the working image is
zero outside it, so the FOV is where any channel is above 0), and everything after it sees the
corrected image. The smooth field cannot remove the degradation's spots, which are finer than its
window; the spot head is trained on its own (``fundus_batch.train.spots``) to undo them and to
leave everything else, blur included, as it is. ``spot_deadzone`` shrinks its correction as
``field_deadzone`` does the field's. No registered model has one: the heads trained so far also
dim bright lesions such as hard exudates (weights/MODEL_CARD.md, "A spot head").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ALIASES",
    "DEFAULT_VARIANT",
    "MIN_SIZE",
    "N_OUTPUTS",
    "SIZE_MULTIPLE",
    "SPOT_DILATIONS",
    "VARIANTS",
    "CofeNet",
    "SpotHead",
    "build_cofenet",
    "canonical_variant",
    "check_max_change",
    "check_size",
    "default_x256",
    "limit_change",
    "scaled_channels",
]

VARIANTS: tuple[str, ...] = (
    "encode_decode_res",
    "encode_decode_vessel_res",
    "encode_decode_vessel_2scale_share_res",
    "encode_decode_vessel_2scale_share_res_atten",
)
DEFAULT_VARIANT = "encode_decode_vessel_2scale_share_res_atten"
ALIASES: dict[str, str] = {"cofe-net": DEFAULT_VARIANT, "cofenet": DEFAULT_VARIANT}
N_OUTPUTS: dict[str, int] = dict(zip(VARIANTS, (1, 2, 3, 4), strict=True))
SIZE_MULTIPLE = 32
MIN_SIZE = 192
SPOT_DILATIONS = (1, 2, 4, 8, 4, 2, 1)
_LOGIT_EPS = 1e-3

Outputs = Tensor | tuple[Tensor, ...]


class SpotHead(nn.Module):
    """A full-resolution residual network: the image plus a correction it computes.

    ``forward(x, fov)`` takes N x 3 x H x W images in [0, 1] and their FOV (N x 1 x H x W, 1
    inside) and returns ``x + correction``; the correction starts at zero (an identity). Residual
    3 x 3 convolutions dilated by ``SPOT_DILATIONS`` see a 49-pixel window at full resolution.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inp = nn.Conv2d(4, channels, 3, padding=1)
        self.body = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=d, dilation=d) for d in SPOT_DILATIONS
        )
        self.out = nn.Conv2d(channels, 3, 3, padding=1)
        self.zero_output()

    def zero_output(self) -> None:
        """Make the correction zero (the head then returns its input)."""
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)  # type: ignore[arg-type]

    def correction(self, x: Tensor, fov: Tensor) -> Tensor:
        h = F.relu(self.inp(torch.cat([x, fov], dim=1)))
        for conv in self.body:
            h = h + F.relu(conv(h))
        return self.out(h)

    def forward(self, x: Tensor, fov: Tensor) -> Tensor:
        return x + self.correction(x, fov)


def check_max_change(max_change: float | None) -> float | None:
    """``max_change`` as a float, or ValueError unless it is None or in (0, 1]."""
    if max_change is None:
        return None
    value = float(max_change)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"max_change must be in (0, 1], got {max_change}")
    return value


def limit_change(out: Tensor, source: Tensor, max_change: float) -> Tensor:
    """``out`` moved back to within ``max_change`` of ``source`` in every pixel and channel."""
    return torch.minimum(torch.maximum(out, source - max_change), source + max_change)


def _shrink(correction: Tensor, deadzone: float) -> Tensor:
    """``correction`` moved ``deadzone`` towards zero (values inside the dead zone become 0)."""
    if deadzone <= 0:
        return correction
    return torch.sign(correction) * (correction.abs() - deadzone).clamp_min(0.0)


@dataclass
class _Gate:
    """One forward pass's gate: the teacher-forced values, if any, and the logits of each pass."""

    given: Tensor | None
    logits: list[Tensor] = field(default_factory=list)


def canonical_variant(name: str) -> str:
    """Return the released ``which_model_netG`` name for ``name`` (a variant name or alias)."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key in VARIANTS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    known = ", ".join([*VARIANTS, *ALIASES])
    raise ValueError(f"unknown Cofe-Net variant {name!r}; known: {known}")


def scaled_channels(channels: int, width: float) -> int:
    """Channels of a ``channels``-wide layer at ``width``: as is at 1.0, else a multiple of 4."""
    if width == 1.0:
        return channels
    return max(4, 4 * round(channels * width / 4))


def check_size(height: int, width: int) -> None:
    """Raise ValueError unless both sides are multiples of 32 and at least 192 px."""
    for side in (height, width):
        if side % SIZE_MULTIPLE or side < MIN_SIZE:
            raise ValueError(
                f"input size must be a multiple of {SIZE_MULTIPLE} and >= {MIN_SIZE} px "
                f"on both sides, got {height}x{width}"
            )


def check_input_size(height: int, width: int, field: int | None) -> None:
    """Raise ValueError unless a model with smooth-correction field size ``field`` (None: no
    field head) accepts an input of ``height`` x ``width`` (see ``CofeNet.check_input_size``)."""
    if field is None:
        check_size(height, width)
        return
    for side in (height, width):
        if side % SIZE_MULTIPLE or side < SIZE_MULTIPLE:
            raise ValueError(
                f"input size must be a multiple of {SIZE_MULTIPLE} px on both sides, "
                f"got {height}x{width}"
            )


def default_x256(x512: Tensor) -> Tensor:
    """The coarse-scale input: antialiased bicubic half-size of ``x512``, clamped to [0, 1]."""
    half = F.interpolate(
        x512, scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False
    )
    return half.clamp(0.0, 1.0)


def _conv(cin: int, cout: int, k: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)


def _up(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=True)


class ResBlock(nn.Module):
    """Released residual block: h = ReLU(conv1(x)); out = ReLU(h + conv2(h)).

    The released code applies an in-place ReLU to conv1's output before adding it back, so the
    block input itself is not on the skip path.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv(channels, channels, 5)
        self.conv2 = _conv(channels, channels, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x), inplace=True)
        return F.relu(h + self.conv2(h), inplace=True)


class BasicBlock(nn.Module):
    """ResNet-34 basic block (torchvision attribute names: conv1, bn1, conv2, bn2, downsample)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity, inplace=True)


def _resnet_layer(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(cin, cout, stride)]
    layers += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class DACBlock(nn.Module):
    """CE-Net dense atrous convolution block with a shared 1x1 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dilate1 = nn.Conv2d(channels, channels, 3, dilation=1, padding=1)
        self.dilate2 = nn.Conv2d(channels, channels, 3, dilation=3, padding=3)
        self.dilate3 = nn.Conv2d(channels, channels, 3, dilation=5, padding=5)
        self.conv1x1 = nn.Conv2d(channels, channels, 1)
        for conv in (self.dilate1, self.dilate2, self.dilate3, self.conv1x1):
            assert conv.bias is not None  # built with a bias
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        a = self.dilate1(x)
        b = self.dilate2(a)
        c = self.conv1x1
        return (
            x + F.relu(a) + F.relu(c(self.dilate2(x))) + F.relu(c(b)) + F.relu(c(self.dilate3(b)))
        )


class SPPBlock(nn.Module):
    """CE-Net residual multi-kernel pooling: 4 pooled maps (shared 1x1 conv to 1 channel), input."""

    kernels = (2, 3, 5, 6)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        size = (x.shape[2], x.shape[3])
        pooled = [
            F.interpolate(
                self.conv(F.max_pool2d(x, k, stride=k)),
                size=size,
                mode="bilinear",
                align_corners=False,
            )
            for k in self.kernels
        ]
        return torch.cat([*pooled, x], dim=1)


class DecoderBlock(nn.Module):
    """CE-Net decoder: 1x1 (in -> in//4), stride-2 3x3 transposed conv, 1x1 (-> out); BN + ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = max(1, cin // 4)
        self.conv1 = nn.Conv2d(cin, mid, 1)
        self.norm1 = nn.BatchNorm2d(mid)
        self.deconv2 = nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1, output_padding=1)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1)
        self.norm3 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm1(self.conv1(x)), inplace=True)
        x = F.relu(self.norm2(self.deconv2(x)), inplace=True)
        return F.relu(self.norm3(self.conv3(x)), inplace=True)


class CofeNet(nn.Module):
    """One of the four released Cofe-Net generators (see ``build_cofenet``).

    ``forward(x512, x256=None)`` returns the released output for the variant:
    ``encode_decode_res`` -> ``out``; ``encode_decode_vessel_res`` -> ``(out_512, vessel)``;
    ``encode_decode_vessel_2scale_share_res`` -> ``(out_512, out_256, vessel)``;
    ``encode_decode_vessel_2scale_share_res_atten`` -> ``(out_512, out_256, vessel, attention)``.
    """

    weights_entry: object | None = None  # set by weights.load_registered, for provenance

    def __init__(
        self,
        variant: str = DEFAULT_VARIANT,
        width: float = 1.0,
        residual: bool = False,
        field: int | None = None,
        field_sigma: float = 2.0,
        field_deadzone: float = 0.0,
        field_gate: bool = False,
        field_gate_threshold: float | None = None,
        field_scale: float = 1.0,
        spot_head: int | None = None,
        spot_deadzone: float = 0.0,
        max_change: float | None = None,
    ) -> None:
        super().__init__()
        variant = canonical_variant(variant)
        width = float(width)
        if not (math.isfinite(width) and 0.0 < width <= 1.0):
            raise ValueError(f"width must be in (0, 1], got {width}")
        if residual and width == 1.0:
            raise ValueError(
                "residual=True is only allowed for width < 1 models; the released full-width "
                "variants keep their exact output formulation"
            )
        if field is not None:
            if width == 1.0 or residual:
                raise ValueError("field is only allowed for width < 1 models without residual")
            check_size(field, field)
            if not (math.isfinite(field_sigma) and field_sigma > 0):
                raise ValueError(f"field_sigma must be > 0, got {field_sigma}")
            if not (math.isfinite(field_deadzone) and 0.0 <= field_deadzone < 0.5):
                raise ValueError(f"field_deadzone must be in [0, 0.5), got {field_deadzone}")
            if not (math.isfinite(field_scale) and field_scale > 0):
                raise ValueError(f"field_scale must be > 0, got {field_scale}")
        if field_gate and field is None:
            raise ValueError("field_gate needs the smooth-correction head (field)")
        if spot_head is not None:
            if field is None:
                raise ValueError("spot_head needs the smooth-correction head (field)")
            if isinstance(spot_head, bool) or not isinstance(spot_head, int) or spot_head < 1:
                raise ValueError(f"spot_head must be a channel count >= 1, got {spot_head!r}")
        if not (math.isfinite(spot_deadzone) and 0.0 <= spot_deadzone < 0.5):
            raise ValueError(f"spot_deadzone must be in [0, 0.5), got {spot_deadzone}")
        if field_gate_threshold is not None:
            if not field_gate:
                raise ValueError("field_gate_threshold needs field_gate")
            if not (math.isfinite(field_gate_threshold) and 0.0 < field_gate_threshold < 1.0):
                raise ValueError(
                    f"field_gate_threshold must be in (0, 1), got {field_gate_threshold}"
                )
        self.variant = variant
        self.width = width
        self.residual = bool(residual)
        self.field = None if field is None else int(field)
        self.field_sigma = float(field_sigma)
        self.field_deadzone = float(field_deadzone)
        self.field_scale = float(field_scale)
        self.field_gate = bool(field_gate)
        self.field_gate_threshold = (
            None if field_gate_threshold is None else float(field_gate_threshold)
        )
        self.spot_deadzone = float(spot_deadzone)
        self.max_change = check_max_change(max_change)
        self.n_outputs = N_OUTPUTS[variant] + int(self.field_gate)
        self.has_rsa = variant != "encode_decode_res"
        self.two_scale = "2scale" in variant
        self.has_lqa = variant.endswith("_atten")

        def ch(c: int) -> int:
            return scaled_channels(c, width)

        g1, g2, g3 = ch(32), ch(64), ch(128)
        e1, e2, e3, e4 = ch(64), ch(128), ch(256), ch(512)
        # RSA features injected into G: d1 (decoder1 out), d2 (decoder2 out), d3 (decoder3 out).
        r1, r2, r3 = (e1, e1, e2) if self.has_rsa else (0, 0, 0)

        # Enhancement generator G (registration order gives the released key order).
        self.G_conv1 = _conv(6 if self.two_scale else 3, g1, 5)
        self._add_res("G_conv1", (1, 2, 3), g1)
        self.G_conv2_0 = _conv(g1, g2, 5, stride=2)
        self.G_conv2 = _conv(g2 + r1, g2, 5)
        self._add_res("G_conv2", (1, 2, 3), g2)
        self.G_conv3_0 = _conv(g2, g2, 5, stride=2)
        self.G_conv3 = _conv(g2 + r2, g2, 5)
        self._add_res("G_conv3", (1, 2, 3), g2)
        self.G_conv4_0 = _conv(g2, g3, 5, stride=2)
        self.G_conv4 = _conv(g3 + r3, g3, 5)
        self._add_res("G_conv4", (1, 2, 3), g3)
        self._add_res("G_deconv4", (3, 2, 1), g3)
        self.G_deconv4_0 = _up(g3, g2)
        self._add_res("G_deconv3", (3, 2, 1), g2)
        self.G_deconv3_0 = _up(g2, g2)
        self._add_res("G_deconv2", (3, 2, 1), g2)
        self.G_deconv2_0 = _up(g2, g1)
        self._add_res("G_deconv1", (3, 2, 1), g1)
        self.G_deconv1_0 = _conv(g1, 3, 5)
        if self.two_scale:
            self.G_input_2 = _up(3, 3)
        if self.field_gate:
            self.G_gate = nn.Linear(2 * g3, 1)
        self.spot = None if spot_head is None else SpotHead(spot_head)

        if self.has_rsa:  # CE-Net vessel segmenter, inline (Gu et al. attribute names)
            self.firstconv = nn.Conv2d(3, e1, 7, stride=2, padding=3, bias=False)
            self.firstbn = nn.BatchNorm2d(e1)
            self.encoder1 = _resnet_layer(e1, e1, 3, 1)
            self.encoder2 = _resnet_layer(e1, e2, 4, 2)
            self.encoder3 = _resnet_layer(e2, e3, 6, 2)
            self.encoder4 = _resnet_layer(e3, e4, 3, 2)
            self.dblock = DACBlock(e4)
            self.spp = SPPBlock(e4)
            self.decoder4 = DecoderBlock(e4 + len(SPPBlock.kernels), e3)
            self.decoder3 = DecoderBlock(e3, e2)
            self.decoder2 = DecoderBlock(e2, e1)
            self.decoder1 = DecoderBlock(e1, e1)
            self.finaldeconv1 = nn.ConvTranspose2d(e1, ch(32), 4, stride=2, padding=1)
            self.finalconv2 = nn.Conv2d(ch(32), ch(32), 3, padding=1)
            self.finalconv3 = nn.Conv2d(ch(32), 1, 3, padding=1)

        if self.has_lqa:  # low-quality activation (attention) module
            a1, a2, a3 = ch(64), ch(128), ch(256)
            self.a_en_conv1 = _conv(3, a1, 3)
            self.a_en_conv2 = _conv(a1, a2, 3)
            self.a_en_conv3 = _conv(a2, a3, 3)
            self.a_de_conv3 = _conv(a3, a3, 3)
            self.a_de_deconv3 = _up(a3, a3)
            self.a_de_conv2 = _conv(a3, a2, 3)
            self.a_de_deconv2 = _up(a2, a2)
            self.a_de_conv1 = _conv(a2, a1, 3)
            self.a_de_deconv1 = _up(a1, a1)
            self.a_spot_256 = _conv(a1, 1, 1)

    def _add_res(self, stem: str, indices: Sequence[int], channels: int) -> None:
        for i in indices:
            self.add_module(f"{stem}_{i}", ResBlock(channels))

    def _res(self, stem: str, indices: Sequence[int], x: Tensor) -> Tensor:
        for i in indices:
            x = getattr(self, f"{stem}_{i}")(x)
        return x

    # ------------------------------------------------------------------ sub-networks

    def _rsa(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """CE-Net on the full-size image: (d1, d2, d3, vessel map)."""
        x = x * 3.2 - 1.6
        x = F.relu(self.firstbn(self.firstconv(x)), inplace=True)
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        e1 = self.encoder1(x)
        e2 = self.encoder2(e1)
        e3 = self.encoder3(e2)
        e4 = self.spp(self.dblock(self.encoder4(e3)))
        d4 = self.decoder4(e4) + e3
        d3 = self.decoder3(d4) + e2
        d2 = self.decoder2(d3) + e1
        d1 = self.decoder1(d2)
        v = F.relu(self.finaldeconv1(d1), inplace=True)
        v = F.relu(self.finalconv2(v), inplace=True)
        return d1, d2, d3, torch.sigmoid(self.finalconv3(v))

    def _lqa(self, x: Tensor) -> Tensor:
        """Attention map at half the input resolution (linear head, unbounded)."""
        x = F.max_pool2d(x, 2)
        for conv in (self.a_en_conv1, self.a_en_conv2, self.a_en_conv3):
            x = F.max_pool2d(F.relu(conv(x), inplace=True), 2)
        for conv, up in (
            (self.a_de_conv3, self.a_de_deconv3),
            (self.a_de_conv2, self.a_de_deconv2),
            (self.a_de_conv1, self.a_de_deconv1),
        ):
            x = F.relu(up(F.relu(conv(x), inplace=True)), inplace=True)
        return self.a_spot_256(x)

    def _g(
        self,
        inp: Tensor,
        image: Tensor,
        feats: tuple[Tensor, Tensor, Tensor] | None,
        attention: Tensor | None,
        gate: _Gate | None = None,
    ) -> Tensor:
        """One pass of G; ``image`` is the 3-channel picture the residual formulation refines."""
        x = F.relu(self.G_conv1(inp), inplace=True)
        x_full = self._res("G_conv1", (1, 2, 3), x)

        x = F.relu(self.G_conv2_0(x_full), inplace=True)
        if attention is not None:
            x = x * attention + x
        if feats is not None:
            x = torch.cat([x, feats[0]], dim=1)
        x = F.relu(self.G_conv2(x), inplace=True)
        x_half = self._res("G_conv2", (1, 2, 3), x)

        x = F.relu(self.G_conv3_0(x_half), inplace=True)
        if feats is not None:
            x = torch.cat([x, feats[1]], dim=1)
        x = F.relu(self.G_conv3(x), inplace=True)
        x_quarter = self._res("G_conv3", (1, 2, 3), x)

        x = F.relu(self.G_conv4_0(x_quarter), inplace=True)
        if feats is not None:
            x = torch.cat([x, feats[2]], dim=1)
        x = F.relu(self.G_conv4(x), inplace=True)
        x = self._res("G_conv4", (1, 2, 3), x)
        scale = None
        if gate is not None:
            logit = self.G_gate(torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1))
            gate.logits.append(logit)
            given = gate.given
            if given is not None:
                scale = given.to(logit).view(-1, 1)
            elif self.field_gate_threshold is not None:
                scale = (torch.sigmoid(logit) >= self.field_gate_threshold).to(logit)
            else:
                scale = torch.sigmoid(logit)
            scale = scale.view(-1, 1, 1, 1)

        x = self.G_deconv4_0(self._res("G_deconv4", (3, 2, 1), x)) + x_quarter
        x = self.G_deconv3_0(self._res("G_deconv3", (3, 2, 1), x)) + x_half
        x = self.G_deconv2_0(self._res("G_deconv2", (3, 2, 1), x)) + x_full
        x = self.G_deconv1_0(self._res("G_deconv1", (3, 2, 1), x))
        if self.field is not None:  # unclamped: the caller takes the correction back out
            correction = self._smooth(torch.tanh(x))
            return image + (correction if scale is None else scale * correction)
        if self.residual:
            x = torch.logit(image.clamp(_LOGIT_EPS, 1.0 - _LOGIT_EPS)) + x
        return torch.sigmoid(x)

    def _smooth(self, correction: Tensor) -> Tensor:
        """Gaussian low-pass of a correction map (separable, reflect padding)."""
        radius = max(1, math.ceil(3.0 * self.field_sigma))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=correction.device)
        kernel = torch.exp(-0.5 * (taps / self.field_sigma) ** 2)
        kernel = (kernel / kernel.sum()).to(correction.dtype)
        channels = correction.shape[1]
        x = F.pad(correction, (radius, radius, radius, radius), mode="reflect")
        x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)

    # ------------------------------------------------------------------ forward

    def forward(
        self, x512: Tensor, x256: Tensor | None = None, *, gate: Tensor | None = None
    ) -> Outputs:
        """Enhance ``x512`` (N,3,H,W in [0,1]); ``x256`` is the half-size copy (2-scale only);
        ``gate`` (N values, ``field_gate`` models only) replaces the predicted gate."""
        if not isinstance(x512, Tensor):
            raise TypeError(f"x512 must be a torch.Tensor, got {type(x512).__name__}")
        if x512.ndim != 4 or x512.shape[1] != 3 or not x512.is_floating_point():
            raise ValueError(
                f"x512 must be a float N x 3 x H x W tensor, got {x512.dtype} {tuple(x512.shape)}"
            )
        height, width = x512.shape[2], x512.shape[3]
        self.check_input_size(height, width)
        if x256 is not None:
            want = (x512.shape[0], 3, height // 2, width // 2)
            if not isinstance(x256, Tensor) or tuple(x256.shape) != want:
                got = tuple(x256.shape) if isinstance(x256, Tensor) else type(x256).__name__
                raise ValueError(f"x256 must have shape {want}, got {got}")
        if gate is not None and (
            not self.field_gate or not isinstance(gate, Tensor) or gate.numel() != x512.shape[0]
        ):
            raise ValueError("gate needs a field_gate model and one value per image")
        source = x512
        if self.field is None:
            return self._limited(self._forward_net(x512, x256), source)
        if self.spot is not None:  # the coarse image is then the corrected one's
            x512, x256 = self.remove_spots(x512), None
        small = F.interpolate(x512, size=(self.field, self.field), mode="area")
        small_half = default_x256(small)
        passes = _Gate(gate) if self.field_gate else None
        items = list(self._as_tuple(self._forward_net(small, small_half, passes)))
        # Outputs at the network's size become corrections (output - input), resized and
        # added to the full-size input; the vessel map is resized.
        items[0] = self._add_correction(items[0] - small, x512)
        if self.two_scale:
            half = F.avg_pool2d(x512, 2) if x256 is None else x256
            items[1] = self._add_correction(items[1] - small_half, half)
        if self.has_rsa:
            v = 2 if self.two_scale else 1
            items[v] = F.interpolate(
                items[v], size=(height, width), mode="bilinear", align_corners=False
            )
        if passes is not None:  # N x passes (the coarse pass first)
            items.append(torch.cat(passes.logits, dim=1))
        return self._limited(items[0] if len(items) == 1 else tuple(items), source)

    def check_input_size(self, height: int, width: int) -> None:
        """Raise ValueError unless this model accepts an input of ``height`` x ``width``.

        Both sides must be multiples of 32. The network itself needs at least 192 px
        (:func:`check_size`); a smooth-correction model (``field``) runs it on an N x N copy and
        only resizes, adds and clamps at the input's own size, so it takes smaller inputs too.
        """
        check_input_size(height, width, self.field)

    def _limited(self, outputs: Outputs, source: Tensor) -> Outputs:
        """``outputs`` with the full-resolution image kept within ``max_change`` of ``source``."""
        if self.max_change is None:
            return outputs
        items = list(self._as_tuple(outputs))
        items[0] = limit_change(items[0], source, self.max_change)
        return items[0] if len(items) == 1 else tuple(items)

    def remove_spots(self, x: Tensor) -> Tensor:
        """The spot head's output for ``x`` (``spot_head`` models): corrected inside the FOV."""
        if self.spot is None:
            raise ValueError("this model has no spot head")
        fov = (x.amax(dim=1, keepdim=True) > 0).to(x)
        correction = _shrink(self.spot.correction(x, fov), self.spot_deadzone)
        return (x + correction * fov).clamp(0.0, 1.0)

    @staticmethod
    def _as_tuple(outputs: Outputs) -> tuple[Tensor, ...]:
        return (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)

    def _add_correction(self, correction: Tensor, image: Tensor) -> Tensor:
        up = F.interpolate(correction, size=image.shape[2:], mode="bilinear", align_corners=False)
        if self.field_scale != 1.0:
            up = up * self.field_scale
        # corrections smaller than the dead zone are shading, not a defect
        return (image + _shrink(up, self.field_deadzone)).clamp(0.0, 1.0)

    def _forward_net(self, x512: Tensor, x256: Tensor | None, gate: _Gate | None = None) -> Outputs:
        """The released forward pass at the network's input size."""
        if not self.has_rsa:
            first = self._g(x512, x512, None, None, gate)
            return self._g(first, first, None, None, gate)

        d1, d2, d3, vessel = self._rsa(x512)
        if not self.two_scale:
            return self._g(x512, x512, (d1, d2, d3), None, gate), vessel

        if x256 is None:
            x256 = default_x256(x512)
        attention = self._lqa(x512) if self.has_lqa else None
        coarse_feats = (F.max_pool2d(d1, 2), F.max_pool2d(d2, 2), F.max_pool2d(d3, 2))
        coarse_att = F.max_pool2d(attention, 2) if attention is not None else None
        out_256 = self._g(torch.cat([x256, x256], dim=1), x256, coarse_feats, coarse_att, gate)
        up = self.G_input_2(out_256)
        out_512 = self._g(torch.cat([x512, up], dim=1), x512, (d1, d2, d3), attention, gate)
        if attention is None:
            return out_512, out_256, vessel
        return out_512, out_256, vessel, attention

    # ------------------------------------------------------------------ output helpers

    def _check_outputs(self, outputs: Outputs) -> tuple[Tensor, ...]:
        items = (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)
        if len(items) != self.n_outputs:
            raise ValueError(f"{self.variant} returns {self.n_outputs} output(s), got {len(items)}")
        return items

    def enhanced(self, outputs: Outputs) -> Tensor:
        """The full-resolution enhanced image (out_512) from this model's outputs."""
        return self._check_outputs(outputs)[0]

    def coarse(self, outputs: Outputs) -> Tensor | None:
        """The half-resolution enhanced image (out_256), or None for single-scale variants."""
        return self._check_outputs(outputs)[1] if self.two_scale else None

    def vessel(self, outputs: Outputs) -> Tensor | None:
        """The CE-Net vessel probability map, or None for ``encode_decode_res``."""
        items = self._check_outputs(outputs)
        return items[2 if self.two_scale else 1] if self.has_rsa else None

    def attention(self, outputs: Outputs) -> Tensor | None:
        """The LQA attention map (half resolution, linear), or None without LQA."""
        return self._check_outputs(outputs)[3] if self.has_lqa else None

    def gate_logits(self, outputs: Outputs) -> Tensor | None:
        """The gate's logits (N x passes, the last pass's last), or None without a gate."""
        return self._check_outputs(outputs)[-1] if self.field_gate else None

    def gate_opening(self, outputs: Outputs) -> Tensor | None:
        """How far the gate opened for each image (sigmoid of the last pass's logit), or None."""
        logits = self.gate_logits(outputs)
        return None if logits is None else torch.sigmoid(logits[:, -1])

    def extra_repr(self) -> str:
        extra = (
            "" if self.field is None else f", field={self.field}, field_sigma={self.field_sigma}"
        )
        if self.field_gate:
            extra += ", field_gate=True"
        if self.field_gate_threshold is not None:
            extra += f", field_gate_threshold={self.field_gate_threshold}"
        if self.spot is not None:
            extra += f", spot_head={self.spot.out.in_channels}"
        return f"variant={self.variant!r}, width={self.width}, residual={self.residual}{extra}"


def init_weights(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """``define_G`` initialisation of every parameter and buffer (also after ``to_empty``).

    Convs N(0, 0.02) with zero bias; BatchNorm weight N(1, 0.02), zero bias, fresh running stats.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, 0.0, 0.02, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02, generator=generator)
            nn.init.zeros_(module.bias)
            module.reset_running_stats()
        elif isinstance(module, nn.Linear):  # the field gate: starts undecided (sigmoid 0.5)
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        elif next(module.parameters(recurse=False), None) is not None:
            raise TypeError(f"no initialisation rule for {type(module).__name__}")
    for module in model.modules():
        if isinstance(module, SpotHead):  # starts as an identity
            module.zero_output()


def build_cofenet(
    variant: str = "cofe-net",
    width: float = 1.0,
    *,
    residual: bool = False,
    field: int | None = None,
    field_deadzone: float = 0.0,
    field_gate: bool = False,
    field_gate_threshold: float | None = None,
    spot_head: int | None = None,
    spot_deadzone: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> CofeNet:
    """Build a Cofe-Net variant with ``define_G`` initialisation; no download, no global RNG.

    ``variant`` is a released ``which_model_netG`` name or ``"cofe-net"``; ``width`` in (0, 1]
    scales every channel count; ``residual`` (width < 1 only) outputs
    ``sigmoid(logit(input) + G)`` instead of ``sigmoid(G)``; ``field`` (width < 1 only) selects
    the smooth-correction head, ``field_gate`` its gate, ``field_gate_threshold`` the gate's
    decision threshold and ``spot_head`` / ``spot_deadzone`` the spot remover in front of the
    head (module docstring). Randomness comes from ``generator`` (a CPU generator)
    or, when it is None, from the caller's torch seed. ``device="meta"`` builds a shape-only
    model. The model is returned in training mode, on ``device`` (default: CPU).
    """
    target = torch.device("cpu" if device is None else device)
    with torch.device("meta"):  # allocate once, skip PyTorch's default (global-RNG) init
        model = CofeNet(
            variant,
            width,
            residual,
            field,
            field_deadzone=field_deadzone,
            field_gate=field_gate,
            field_gate_threshold=field_gate_threshold,
            spot_head=spot_head,
            spot_deadzone=spot_deadzone,
        )
    if target.type == "meta":
        return model
    model = model.to_empty(device="cpu")
    init_weights(model, generator)
    return model if target.type == "cpu" else model.to(target)
