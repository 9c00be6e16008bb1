"""The degradation operators of Shen et al. as pure functions of (image, parameters).

Images are HxWx3 RGB. The colour jitter works on uint8 exactly like PIL's ``ImageEnhance``;
the other operators take a float image in [0, 1] and return a new one (or write into ``out``),
promoting float32 to float64 the way the released script does (its halo, hole and spot maps are
float64; only a lone blur works on float32). Every Gaussian is OpenCV's truncated kernel with
the recorded (width, height) and sigma and reflect-101 borders. The halo's ring and the hole's
disc are blurred exactly from their row runs (cumulative kernel sums horizontally, one small
matrix product over the distinct rows vertically; see ``_blurred_spans``), which matches
``cv2.GaussianBlur`` on float64 to about 1e-15 with the same exact zeros, several times
faster than a direct or DFT blur at these kernel sizes; a spot's blur is only computed in the
box it can reach.

Temporaries live in per-thread scratch buffers that are reused between calls: fresh
multi-megabyte arrays cost page faults that, on a VM, took as long as the arithmetic.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import cv2
import numpy as np

from .params import SpotRecord

__all__ = [
    "blur",
    "color_jitter",
    "disc",
    "fov_mean",
    "halo",
    "hole",
    "luma",
    "spots",
    "to_uint8",
    "to_unit_float",
]

_BORDER = cv2.BORDER_REFLECT_101
_FFT_MIN_KERNEL = 31  # from this kernel size up, blur 2-D maps through the DFT
_scratch_store = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: type = np.float64) -> np.ndarray:
    """A reusable, uninitialised, C-contiguous per-thread buffer (grown on demand)."""
    store: dict[tuple[str, str], np.ndarray] | None = getattr(_scratch_store, "buffers", None)
    if store is None:
        store = _scratch_store.buffers = {}
    key = (name, np.dtype(dtype).str)
    size = int(np.prod(shape))
    flat = store.get(key)
    if flat is None or flat.size < size:
        flat = store[key] = np.empty(size, dtype)
    return flat[:size].reshape(shape)


# ----------------------------------------------------------------------------------------------
# truncated Gaussian blur


def _gaussian(src: np.ndarray, k_w: int, k_h: int, sigma: float) -> np.ndarray:
    """``cv2.GaussianBlur(src, (k_w, k_h), sigma)`` with reflect-101 borders, as a new array.

    Large kernels on 2-D maps go through :func:`_gaussian_dft` (float64 result).
    """
    if max(k_w, k_h) >= _FFT_MIN_KERNEL and src.ndim == 2:
        return _gaussian_dft(src, k_w, k_h, sigma)
    return cv2.GaussianBlur(src, (k_w, k_h), sigma, sigmaY=sigma, borderType=_BORDER)


def _spectral_weights(kernel: np.ndarray, length: int) -> np.ndarray:
    """Per-slot multipliers that apply ``kernel`` to rows in OpenCV's packed (CCS) spectrum.

    Centred circularly, a symmetric kernel has a real spectrum, so multiplying a packed row
    spectrum by it is an elementwise product with each real value repeated for Re and Im.
    """
    half = len(kernel) // 2
    taps = np.zeros((1, length), np.float64)
    taps[0, : half + 1] = kernel[half:]
    if half:
        taps[0, length - half :] = kernel[:half]
    packed = cv2.dft(taps, flags=cv2.DFT_ROWS)[0]
    weights = packed.copy()
    weights[2::2] = packed[1::2][: len(weights[2::2])]  # Im slot takes its Re partner's value
    return weights


def _gaussian_dft(src: np.ndarray, k_w: int, k_h: int, sigma: float) -> np.ndarray:
    """Separable truncated Gaussian of a 2-D map, float64, via row DFTs.

    The map is reflect-101 padded by half a kernel (and further, to fast DFT lengths, with
    content that only reaches outputs that are dropped): a circular convolution longer than
    the padded row has no wrap-around in the kept part.
    """
    h, w = src.shape
    half_w, half_h = k_w // 2, k_h // 2
    len_x = cv2.getOptimalDFTSize(w + 2 * half_w)
    len_y = cv2.getOptimalDFTSize(h + 2 * half_h)
    kx = cv2.getGaussianKernel(k_w, sigma, cv2.CV_64F)[:, 0]
    ky = cv2.getGaussianKernel(k_h, sigma, cv2.CV_64F)[:, 0]
    inverse = cv2.DFT_ROWS | cv2.DFT_SCALE | cv2.DFT_REAL_OUTPUT
    padded = cv2.copyMakeBorder(
        src.astype(np.float64, copy=False),
        half_h,
        len_y - h - half_h,
        half_w,
        len_x - w - half_w,
        _BORDER,
        dst=_scratch("dft_a", (len_y, len_x)),
    )
    spectrum = cv2.dft(padded, flags=cv2.DFT_ROWS, dst=_scratch("dft_b", (len_y, len_x)))
    spectrum *= _spectral_weights(kx, len_x)
    rows = cv2.idft(spectrum, flags=inverse, dst=_scratch("dft_a", (len_y, len_x)))
    columns = cv2.transpose(rows[:, half_w : half_w + w], dst=_scratch("dft_c", (w, len_y)))
    spectrum = cv2.dft(columns, flags=cv2.DFT_ROWS, dst=_scratch("dft_b", (w, len_y)))
    spectrum *= _spectral_weights(ky, len_y)
    columns = cv2.idft(spectrum, flags=inverse, dst=_scratch("dft_c", (w, len_y)))
    out = cv2.transpose(columns[:, half_h : half_h + h])
    # DFT round-off leaves ~1e-17 where the exact result is 0 (OpenCV gives exact zeros
    # there, and a stray -1e-17 could flip a truncated uint8 level)
    magnitude = np.abs(out, out=_scratch("magnitude", out.shape))
    out[magnitude <= 1e-12 * float(np.abs(src).max(initial=0.0))] = 0.0
    return out


# ----------------------------------------------------------------------------------------------
# colour (uint8, PIL semantics)

_LUMA = np.array([[19595.0, 38470.0, 7471.0, 32768.0]], dtype=np.float32)
_UNIT32 = np.arange(256, dtype=np.float32) / np.float32(255.0)
_UNIT64 = _UNIT32.astype(np.float64)


def luma(image: np.ndarray) -> np.ndarray:
    """PIL's RGB -> L conversion: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as uint8."""
    # every intermediate is an integer below 2^24, so float32 arithmetic is exact
    h, w = image.shape[:2]
    as_float = _scratch("rgb32", (h, w, 3), np.float32)
    np.copyto(as_float, image)  # exact, and ~3x faster than a float lookup table
    out = _scratch("luma32", (h, w), np.float32)
    weighted: np.ndarray = cv2.transform(as_float, _LUMA, dst=out)
    weighted *= np.float32(1.0 / 65536.0)
    return weighted.astype(np.uint8)


def _blend(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
    """PIL ``Image.blend``: float32 ``d + f * (i - d)``, clipped, then truncated to uint8."""
    base = np.asarray(degenerate, dtype=np.float32)
    mixed = image.astype(np.float32)
    mixed -= base  # exact: small integers
    mixed *= np.float32(factor)
    mixed += base
    np.clip(mixed, 0.0, 255.0, out=mixed)
    return mixed.astype(np.uint8)


def _blend_table(degenerate: int, factor: float) -> np.ndarray:
    """``_blend`` with a constant degenerate value, as a 256-entry lookup table."""
    return _blend(np.full(256, degenerate, dtype=np.uint8), np.arange(256, dtype=np.uint8), factor)


def _blend_with_grey(image: np.ndarray, factor: float) -> np.ndarray:
    """``_blend(L image replicated to RGB, image, factor)`` without full-size temporaries."""
    h, w = image.shape[:2]
    grey = luma(image)
    base = cv2.merge([grey, grey, grey])
    base32 = _scratch("base32", (h, w, 3), np.float32)
    np.copyto(base32, base)
    mixed = _scratch("rgb32", (h, w, 3), np.float32)
    np.copyto(mixed, image)
    np.subtract(mixed, base32, out=mixed)
    np.multiply(mixed, np.float32(factor), out=mixed)
    np.add(mixed, base32, out=mixed)
    np.clip(mixed, 0.0, 255.0, out=mixed)
    return mixed.astype(np.uint8)


def color_jitter(
    image: np.ndarray, brightness: float, contrast: float, saturation: float
) -> np.ndarray:
    """Brightness, contrast then saturation, each exactly as PIL ``ImageEnhance`` on uint8.

    Brightness blends with black, contrast with the rounded mean of the L image, saturation
    with the L image; PIL truncates each blend to uint8 before the next step.
    """
    out = cv2.LUT(image, _blend_table(0, brightness))
    grey = luma(out)
    mean = int(float(grey.sum(dtype=np.int64)) / grey.size + 0.5)
    out = cv2.LUT(out, _blend_table(mean, contrast))
    return _blend_with_grey(out, saturation)


def to_unit_float(
    image: np.ndarray, dtype: type = np.float32, *, out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 -> [0, 1] as torchvision ``ToTensor`` does (x / 255 in float32), then ``dtype``.

    Written to ``out`` when given (same shape as ``image``, dtype ``dtype``).
    """
    if dtype is np.float64:
        return cv2.LUT(image, _UNIT64, dst=out)
    if out is None:
        out = np.empty(image.shape, np.float32)
    # IEEE division is correctly rounded, so this equals the table of x / 255 (and is faster)
    return np.divide(image, np.float32(255.0), out=out, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# geometry helpers


def _near_center(shape: tuple[int, int], center: tuple[int, int], radius: int) -> tuple[int, int]:
    """``center`` clamped to [-radius - 1, side + radius + 1] on each axis.

    A disc whose centre lies further out covers no pixel in that axis either way; clamping
    keeps the squares of coordinate differences small (no int64 overflow or wrap-around).
    """
    h, w = shape
    reach = max(int(radius), 0) + 1
    cx = min(max(int(center[0]), -reach), w + reach)
    cy = min(max(int(center[1]), -reach), h + reach)
    return cx, cy


def disc(shape: tuple[int, int], center: tuple[int, int], radius: int) -> np.ndarray:
    """Boolean filled disc: (x - cx)^2 + (y - cy)^2 <= radius^2, x = column, y = row."""
    h, w = shape
    cx, cy = _near_center(shape, center, radius)
    ys = (np.arange(h, dtype=np.int64) - cy) ** 2
    xs = (np.arange(w, dtype=np.int64) - cx) ** 2
    limit = radius * radius
    if limit < 2**31 and max(int(ys.max(initial=0)), int(xs.max(initial=0))) < 2**30:
        ys, xs = ys.astype(np.int32), xs.astype(np.int32)
    return ys[:, None] + xs[None, :] <= limit


def _box(
    center: tuple[int, int], radius: int, k_w: int, k_h: int, shape: tuple[int, int]
) -> tuple[slice, slice, slice, slice]:
    """Where blurring a disc can change pixels, and the larger box that blur has to read.

    Returns (rows, cols) of the output box (disc box grown by half a kernel) and (rows, cols)
    of the input box (grown by another half kernel, so reflect-101 at the input box edge never
    reaches the output box unless that edge is the image edge, where the reflection is the
    same as for the whole image). Falls back to the whole image for tiny boxes.
    """
    h, w = shape
    cx, cy = center
    half_w, half_h = k_w // 2, k_h // 2
    ox0, ox1 = max(cx - radius - half_w, 0), min(cx + radius + half_w + 1, w)
    oy0, oy1 = max(cy - radius - half_h, 0), min(cy + radius + half_h + 1, h)
    ix0, ix1 = max(ox0 - half_w, 0), min(ox1 + half_w, w)
    iy0, iy1 = max(oy0 - half_h, 0), min(oy1 + half_h, h)
    if ox0 >= ox1 or oy0 >= oy1 or ix1 - ix0 <= half_w or iy1 - iy0 <= half_h:
        ox0, ox1, oy0, oy1, ix0, ix1, iy0, iy1 = 0, w, 0, h, 0, w, 0, h
    return slice(oy0, oy1), slice(ox0, ox1), slice(iy0, iy1), slice(ix0, ix1)


def _blurred_disc(
    shape: tuple[int, int],
    center: tuple[int, int],
    radius: int,
    value: float,
    k_w: int,
    k_h: int,
    sigma: float,
) -> tuple[np.ndarray, slice, slice]:
    """GaussianBlur(value * disc) restricted to the box it can reach: (patch, rows, cols)."""
    rows, cols, in_rows, in_cols = _box(center, radius, k_w, k_h, shape)
    local_center = (center[0] - in_cols.start, center[1] - in_rows.start)
    local_shape = (in_rows.stop - in_rows.start, in_cols.stop - in_cols.start)
    local = disc(local_shape, local_center, radius).astype(np.float64)
    if value != 1.0:
        local *= value
    spread = _gaussian(local, k_w, k_h, sigma)
    patch = spread[
        rows.start - in_rows.start : rows.stop - in_rows.start,
        cols.start - in_cols.start : cols.stop - in_cols.start,
    ]
    return patch, rows, cols


def _disc_spans(
    shape: tuple[int, int], center: tuple[int, int], radius: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the columns [a, b) that :func:`disc` sets (a == b == 0 where the row is empty)."""
    h, w = shape
    cx, cy = _near_center(shape, center, radius)
    dy = np.arange(h, dtype=np.int64) - cy
    rest = radius * radius - dy * dy
    inside = rest >= 0
    rest = np.maximum(rest, 0)
    half = np.sqrt(rest.astype(np.float64)).astype(np.int64)
    half -= half * half > rest  # integer square root, exact whatever the float rounding
    half += (half + 1) * (half + 1) <= rest
    a = np.clip(cx - half, 0, w)
    b = np.clip(cx + half + 1, 0, w)
    empty = ~inside | (b <= a)
    a[empty] = 0
    b[empty] = 0
    return a, b


def _normalise_spans(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs [a, b) with every empty run written as [0, 0)."""
    empty = b <= a
    return np.where(empty, 0, a), np.where(empty, 0, b)


def _run_responses(
    lo: np.ndarray, hi: np.ndarray, n: int, kernel: np.ndarray, out_range: slice, name: str
) -> np.ndarray:
    """Outputs ``out_range`` of a reflect-101 filter along an axis of length ``n`` applied to
    the 0/1 signals that are 1 on [lo[r], hi[r]) (0 <= lo <= hi <= n): shape (R, outputs).

    A run's response is a difference of the kernel's cumulative sum; the borders mirror a run
    into at most two more runs (needs ``len(kernel) // 2 <= n - 1``). An output out of the
    kernel's reach of every run is exactly 0. The result lives in scratch buffer ``name``.
    """
    k = len(kernel)
    half = k // 2
    start, stop = out_range.start, out_range.stop
    m = stop - start
    # table[p + half, i - start]: taps of output i that read padded positions < p, for
    # p in [-half, n + half]; a sliding window over the cumulative sum, extended by 0 and 1
    lead = stop - 1
    ext = np.empty(lead + n - start + k)
    ext[:lead] = 0.0
    ext[lead] = 0.0
    np.cumsum(kernel, out=ext[lead + 1 : lead + k + 1])
    ext[lead + k + 1 :] = ext[lead + k]
    table = np.lib.stride_tricks.sliding_window_view(ext, m)[:, ::-1]
    # each run [lo, hi), its mirror image left of position 0 and right of position n - 1,
    # clipped to the padded positions [-half, n + half] an output can read
    pieces_lo = np.stack([lo, 1 - hi, np.maximum(2 * n - 1 - hi, n)])
    pieces_hi = np.stack([hi, np.minimum(1 - lo, 0), 2 * n - 1 - lo])
    np.minimum(np.maximum(pieces_lo, -half, out=pieces_lo), n + half, out=pieces_lo)
    np.minimum(np.maximum(pieces_hi, pieces_lo, out=pieces_hi), n + half, out=pieces_hi)
    pieces_lo += half
    pieces_hi += half
    out = _scratch(name, (len(lo), m))
    # (fancy indexing reads the rows straight from the view; np.take would first copy it)
    np.subtract(table[pieces_hi[0]], table[pieces_lo[0]], out=out)
    for piece in (1, 2):
        if (pieces_hi[piece] > pieces_lo[piece]).any():
            out += table[pieces_hi[piece]] - table[pieces_lo[piece]]
    return out


def _blurred_spans(
    shape: tuple[int, int],
    spans: Sequence[tuple[np.ndarray, np.ndarray]],
    k_w: int,
    k_h: int,
    sigma: float,
) -> tuple[np.ndarray, slice, slice] | None:
    """GaussianBlur (reflect-101) of a 0/1 map given as column runs, in the box it can reach.

    ``spans`` holds one or two (a, b) arrays: row y of the map is 1 on columns [a[y], b[y])
    of each pair (rows of a disc or a ring). Each distinct row is blurred horizontally through
    :func:`_run_responses`; the rows that share a pattern form a few vertical runs, so the
    vertical weights come from the same cumulative sums, and the vertical pass is one small
    matrix product (distinct rows instead of all rows). Sums run in another order than
    OpenCV's (differences ~1e-15), but a pixel out of the kernel's reach is exactly 0 as in
    OpenCV. Returns (patch, rows, cols), the patch in a scratch buffer (empty for an empty
    map), or None when a kernel is wider than the image.
    """
    h, w = shape
    if k_w // 2 > w - 1 or k_h // 2 > h - 1:
        return None
    a = np.stack([s[0] for s in spans], axis=1)
    b = np.stack([s[1] for s in spans], axis=1)
    used = b > a
    filled = used.any(axis=1)
    if not filled.any():
        return np.zeros((0, 0)), slice(0, 0), slice(0, 0)
    ys = np.flatnonzero(filled)
    rows = slice(max(int(ys[0]) - k_h // 2, 0), min(int(ys[-1]) + 1 + k_h // 2, h))
    cols = slice(max(int(a[used].min()) - k_w // 2, 0), min(int(b[used].max()) + k_w // 2, w))
    key = a[ys, 0] * (w + 1) + b[ys, 0]
    for j in range(1, a.shape[1]):
        key = (key * (w + 1) + a[ys, j]) * (w + 1) + b[ys, j]
    _, first, group = np.unique(key, return_index=True, return_inverse=True)
    group = group.ravel()
    n_groups = len(first)
    # horizontal pass of each distinct row: the sum of its runs' responses
    kx = cv2.getGaussianKernel(k_w, sigma, cv2.CV_64F)[:, 0]
    horizontal = _scratch("horizontal", (n_groups, cols.stop - cols.start))
    for j in range(a.shape[1]):
        response = _run_responses(a[ys[first], j], b[ys[first], j], w, kx, cols, "run_sum")
        if j == 0:
            horizontal[...] = response
        else:
            horizontal += response
    # vertical weights: the rows of one pattern form runs of consecutive rows
    breaks = np.flatnonzero((np.diff(ys) != 1) | (np.diff(group) != 0)) + 1
    run_lo = ys[np.concatenate(([0], breaks))]
    run_hi = ys[np.concatenate((breaks - 1, [len(ys) - 1]))] + 1
    run_group = group[np.concatenate(([0], breaks))]
    ky = kx if k_h == k_w else cv2.getGaussianKernel(k_h, sigma, cv2.CV_64F)[:, 0]
    responses = _run_responses(run_lo, run_hi, h, ky, rows, "run_sum")
    weights = _scratch("vertical", (n_groups, rows.stop - rows.start))
    order = np.argsort(run_group, kind="stable")
    sorted_group = run_group[order]
    level = np.arange(len(order)) - np.searchsorted(sorted_group, sorted_group)
    for k in range(int(level.max()) + 1):  # k-th run of each pattern (a disc has two)
        pick = order[level == k]
        if k == 0:
            weights[run_group[pick]] = responses[pick]
        else:
            weights[run_group[pick]] += responses[pick]
    # cv2.gemm, not numpy's BLAS: it keeps to OpenCV's thread setting like every other step
    # (and its transposed-operand flag is far slower than transposing first)
    weights_t = cv2.transpose(weights, dst=_scratch("vertical_t", weights.shape[::-1]))
    patch = _scratch("patch", (rows.stop - rows.start, cols.stop - cols.start))
    # OpenCV takes src3=None (no addend); its stubs require an array
    cv2.gemm(weights_t, horizontal, 1.0, None, 0.0, dst=patch)  # type: ignore[call-overload]
    return patch, rows, cols


def _add_to_channels(region: np.ndarray, plane: np.ndarray) -> None:
    """region[..., c] += plane for every channel, in place (float64)."""
    h, w = plane.shape
    delta = cv2.merge([plane, plane, plane], dst=_scratch("delta", (h, w, 3)))
    if region.flags.c_contiguous:
        cv2.add(region, delta, dst=region)
    else:
        region += delta


def _clip(image: np.ndarray) -> None:
    """Clip to [0, 1] in place."""
    np.clip(image, 0.0, 1.0, out=image)


def _check_out(image: np.ndarray, out: np.ndarray | None) -> None:
    if out is not None and (
        out.dtype != np.float64 or out.shape != image.shape or not out.flags.c_contiguous
    ):
        raise ValueError(f"out must be a C-contiguous float64 array of shape {image.shape}")


def _float64_output(image: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``image`` as float64 in ``out`` (a new array when None; ``out`` may be ``image``)."""
    _check_out(image, out)
    if out is None:
        return image.astype(np.float64)
    if out is not image:
        np.copyto(out, image)
    return out


# ----------------------------------------------------------------------------------------------
# illumination


def halo(
    image: np.ndarray,
    center: tuple[int, int],
    dia_a: float,
    dia_b: float,
    kernel: int,
    sigma: float,
    color: tuple[int, int, int],
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Add a blurred ring of height mean(image) between diameters ``dia_a`` and ``dia_b``
    (in either order: the released ``|mask_a - mask_b|``).

    Channel c gets ``color[c] / 255`` times the blurred ring; the result (float64) is clipped
    to [0, 1]. It is written to ``out`` when given (which may be ``image`` itself).
    """
    _check_out(image, out)
    h, w = image.shape[:2]
    mean = float(image.sum(dtype=np.float64)) / image.size
    inner_r, outer_r = sorted((int(dia_a // 2), int(dia_b // 2)))
    outer = _disc_spans((h, w), center, outer_r)
    inner = _disc_spans((h, w), center, inner_r)
    # the ring's runs in a row: the outer run left of the inner one and right of it
    left = _normalise_spans(outer[0], np.minimum(outer[1], inner[0]))
    right = _normalise_spans(np.maximum(outer[0], inner[1]), outer[1])
    blurred = _blurred_spans((h, w), (left, right), kernel, kernel, sigma)
    if blurred is None:
        ring = disc((h, w), center, outer_r) & ~disc((h, w), center, inner_r)
        ring_blur = _gaussian(ring.astype(np.float64), kernel, kernel, sigma)
        blurred = (ring_blur, slice(0, h), slice(0, w))
    spread, rows, cols = blurred
    if not spread.size:
        result = _float64_output(image, out)
    else:
        spread *= mean
        delta = cv2.merge(
            [
                np.multiply(spread, c / 255.0, out=_scratch(f"halo{i}", spread.shape))
                for i, c in enumerate(color)
            ],
            dst=_scratch("delta", (*spread.shape, 3)),
        )
        if spread.shape == (h, w) and image.dtype == np.float64:
            result = cv2.add(image, delta, dst=out)
        else:
            result = _float64_output(image, out)
            region = result[rows, cols]
            region += delta
    _clip(result)
    return result


def hole(
    image: np.ndarray,
    center: tuple[int, int],
    diameter: int,
    strength: float,
    k_w: int,
    k_h: int,
    sigma: float,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Add ``strength`` times a blurred disc of radius ``diameter // 2`` to every channel.

    The result (float64) is clipped to [0, 1] where the disc's blur reaches. It is written to
    ``out`` when given (which may be ``image`` itself).
    """
    result = _float64_output(image, out)
    if strength == 0.0:
        return result
    shape = result.shape[:2]
    spans = _disc_spans(shape, center, diameter // 2)
    blurred = _blurred_spans(shape, (spans,), k_w, k_h, sigma)
    if blurred is None:
        blurred = _blurred_disc(shape, center, diameter // 2, 1.0, k_w, k_h, sigma)
    patch, rows, cols = blurred
    if not patch.size:
        return result
    patch *= strength
    region = result[rows, cols]
    _add_to_channels(region, patch)
    _clip(region)
    return result


def fov_mean(image: np.ndarray, mask: np.ndarray) -> float:
    """The released script's "FOV mean" mu = sum(I) / (3 sum(M)) for a boolean mask M.

    The numerator sums the whole image, background included (where the contrast jitter and
    the halo lift the black surround): every hole strength in the oracle records fits this
    mu and not the masked mean.
    """
    count = int(np.count_nonzero(mask))
    if count == 0:
        raise ValueError("the FOV mask is empty")
    return float(image.sum(dtype=np.float64)) / (3 * count)


# ----------------------------------------------------------------------------------------------
# artefacts and blur


def spots(
    image: np.ndarray, params: Sequence[SpotRecord], *, out: np.ndarray | None = None
) -> np.ndarray:
    """Add the spots one after another, clipping to [0, 1] after each (float64 result).

    A spot adds GaussianBlur(amplitude * disc(center, radius // 2)) to every channel. Only the
    box that blur can reach is computed, which equals blurring the whole map because the map
    is zero elsewhere. The result is written to ``out`` when given (may be ``image``).
    """
    result = _float64_output(image, out)
    for spot in params:
        patch, rows, cols = _blurred_disc(
            result.shape[:2],
            spot.center,
            spot.radius // 2,
            spot.amplitude,
            spot.k_w,
            spot.k_h,
            spot.sigma,
        )
        region = result[rows, cols]
        region += patch[..., None]
        _clip(region)
    return result


def blur(
    image: np.ndarray, k_w: int, k_h: int, sigma: float, *, out: np.ndarray | None = None
) -> np.ndarray:
    """Truncated Gaussian blur of the whole image (dtype kept), clipped to [0, 1].

    Written to ``out`` when given (same shape and dtype as ``image``, not ``image`` itself).
    """
    if out is None:
        result = _gaussian(image, k_w, k_h, sigma)
    elif out is image or out.dtype != image.dtype or out.shape != image.shape:
        raise ValueError("out must be a separate array of the image's shape and dtype")
    else:
        result = cv2.GaussianBlur(
            image, (k_w, k_h), sigma, dst=out, sigmaY=sigma, borderType=_BORDER
        )
    _clip(result)
    return result


def to_uint8(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """uint8(255 * I * M), truncated (not rounded), like the released script's output.

    ``mask`` is boolean HxW (None: no FOV multiplication). The product is taken in float64.
    """
    scaled = _scratch("scaled", image.shape)
    np.multiply(image, 255.0, out=scaled, dtype=np.float64)
    if mask is None:
        return scaled.astype(np.uint8)
    truncated = _scratch("truncated", image.shape, np.uint8)
    np.copyto(truncated, scaled, casting="unsafe")
    # M is 0 or 1, so the product is a copy inside the FOV and 0 outside
    return cv2.bitwise_and(truncated, truncated, mask=np.ascontiguousarray(mask).view(np.uint8))
