"""Full-reference image quality inside the field of view: PSNR, SSIM and MS-SSIM.

All metrics take RGB uint8 images of equal shape and a FOV mask (HxW, bool or uint8 0/255) and
use only FOV pixels, so anything outside the FOV can change without changing the result. SSIM and
MS-SSIM average their quality maps over the FOV eroded by the Gaussian window radius, so that no
window used reaches outside the FOV.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import cv2
import numpy as np

__all__ = [
    "METRIC_VERSION",
    "MS_SSIM_WEIGHTS",
    "PSNR_CAP",
    "REFERENCE_METRICS",
    "SSIM_SIGMA",
    "SSIM_WIN_RADIUS",
    "FOVTooSmallError",
    "ReferenceContext",
    "check_image",
    "check_mask",
    "erode",
    "finite",
    "full_reference_metrics",
    "ms_ssim",
    "psnr",
    "reference_context",
    "ssim",
]

METRIC_VERSION = "fb-metrics-1"
"""Version of every metric definition in this package; bump when any value would change."""

DATA_RANGE = 255.0
PSNR_CAP = 100.0
"""Value that :func:`finite` writes in place of an infinite PSNR (identical images)."""

SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5  # scikit-image's default; gives an 11x11 window at sigma 1.5
SSIM_WIN_RADIUS = int(_SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
_K1, _K2 = 0.01, 0.03
_C1 = np.float32((_K1 * DATA_RANGE) ** 2)
_C2 = np.float32((_K2 * DATA_RANGE) ** 2)
# Both images are centred on the clean image's per-channel FOV mean (rounded, so subtracting it
# is exact) before float32 arithmetic: local variances (E[x^2] - mean^2) then lose little to
# cancellation; covariances are shift-invariant and the luminance term adds the offset back.

MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Per-scale exponents of Wang, Simoncelli and Bovik (2003), finest scale first."""


class FOVTooSmallError(ValueError):
    """The FOV is too small for a metric's window (nothing is left after erosion)."""


def check_image(image: object, name: str = "image") -> np.ndarray:
    """Return ``image`` if it is an HxWx3 uint8 array, else raise TypeError / ValueError."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be HxWx3 RGB, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty, shape {image.shape}")
    return image


def frozen_copy(array: np.ndarray) -> np.ndarray:
    """A read-only copy of ``array``."""
    copy = array.copy()
    copy.setflags(write=False)
    return copy


def check_mask(mask: object, shape: tuple[int, ...]) -> np.ndarray:
    """Validate a FOV mask (bool, or uint8 with values 0/255) of ``shape``; return it as bool."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a numpy array, got {type(mask).__name__}")
    if mask.shape != tuple(shape[:2]):
        raise ValueError(f"mask shape {mask.shape} does not match image shape {tuple(shape[:2])}")
    if mask.dtype == np.bool_:
        fov = mask
    elif mask.dtype == np.uint8:
        if np.any((mask != 0) & (mask != 255)):
            raise ValueError("uint8 mask must contain only 0 and 255")
        fov = mask == 255
    else:
        raise TypeError(f"mask must be bool or uint8 0/255, got {mask.dtype}")
    if not fov.any():
        raise ValueError("mask selects no pixels")
    return fov


def _check_pair(
    image: object, ref: object, mask: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = check_image(image, "image")
    b = check_image(ref, "ref")
    if a.shape != b.shape:
        raise ValueError(f"image shape {a.shape} does not match ref shape {b.shape}")
    return a, b, check_mask(mask, a.shape)


def erode(fov: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose (2*radius+1)^2 square neighbourhood lies inside ``fov`` (outside = not FOV)."""
    if radius <= 0:
        return fov
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    out = cv2.erode(fov.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return out.astype(bool)


def finite(value: float, cap: float = PSNR_CAP) -> float:
    """``value`` with +inf (and anything above ``cap``) replaced by ``cap``, e.g. for Parquet."""
    return min(float(value), cap)


def _psnr_from(a: np.ndarray, b: np.ndarray, fov8: np.ndarray, count: int) -> float:
    # OpenCV sums uint8 squared differences exactly in integers before the final division.
    sq = cv2.norm(a, b, cv2.NORM_L2SQR, mask=fov8)
    if sq == 0.0:
        return math.inf
    return 10.0 * math.log10(DATA_RANGE * DATA_RANGE / (sq / (3 * count)))


def _blur(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    size = 2 * SSIM_WIN_RADIUS + 1
    return cv2.GaussianBlur(x, (size, size), SSIM_SIGMA, dst=out, borderType=cv2.BORDER_REFLECT)


_Offset = tuple[float, float, float, float]  # an OpenCV scalar: per channel, then unused


def _centred(image: np.ndarray, offset: _Offset, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 image minus the per-channel ``offset`` as float32 (one pass)."""
    # OpenCV, not NumPy: broadcasting a 3-vector over the last axis is ~8x slower in NumPy.
    # OpenCV takes a scalar operand and dst=None; its stubs admit only arrays
    return cv2.subtract(image, offset, dst=out, dtype=cv2.CV_32F)  # type: ignore[call-overload]


def _pool(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray | None:
    """2x2 average pooling (an odd last row/column is dropped); None when nothing is left."""
    h, w = x.shape[0] // 2, x.shape[1] // 2
    if h == 0 or w == 0:
        return None
    # INTER_AREA at exactly half size is the mean of each 2x2 block.
    return cv2.resize(x[: 2 * h, : 2 * w], (w, h), dst=out, interpolation=cv2.INTER_AREA)


def _pool_fov(fov: np.ndarray) -> np.ndarray:
    """Coarse FOV: pooled pixels whose four parents are all inside ``fov``."""
    h, w = fov.shape[0] // 2 * 2, fov.shape[1] // 2 * 2
    f = fov[:h, :w]
    return f[0::2, 0::2] & f[1::2, 0::2] & f[0::2, 1::2] & f[1::2, 1::2]


def _masked_mean(arr: np.ndarray, mask8: np.ndarray) -> np.ndarray:
    """Per-channel mean (float64) of an HxWx3 array over the non-zero pixels of ``mask8``."""
    return np.asarray(cv2.mean(arr, mask=mask8)[:3], dtype=np.float64)


_LOCAL = threading.local()


def _work(shape: tuple[int, ...]) -> np.ndarray:
    """This thread's five float32 work images of ``shape`` (y, mu, var, cov, tmp), shared by
    every context: fresh multi-megabyte temporaries cost page faults that take longer than the
    arithmetic done in them."""
    pool: dict[tuple[int, ...], np.ndarray] | None = getattr(_LOCAL, "work", None)
    if pool is None:
        pool = _LOCAL.work = {}
    buf = pool.get(shape)
    if buf is None:
        if len(pool) > 32:  # many working sizes in one thread: start over
            pool.clear()
        buf = pool[shape] = np.empty((5, *shape), np.float32)
    return buf


class _Scale:
    """The clean image's terms at one MS-SSIM scale (float32, centred by ``offset``): the
    image ``x``, its local mean ``mu`` and variance ``var`` (both centred), twice and the
    square of its true local mean, and the eroded FOV (None when empty)."""

    __slots__ = ("inner", "mean2", "mu", "mu_sq", "shape", "var", "x")

    def __init__(self, block: np.ndarray, fov: np.ndarray, offset: _Offset) -> None:
        """``block`` is 5 x HxWx3 float32 holding the centred image in ``block[0]``."""
        self.x, self.mu, self.var, self.mean2, self.mu_sq = block
        self.shape = self.x.shape
        inner = erode(fov, SSIM_WIN_RADIUS)
        self.inner = inner.astype(np.uint8) if inner.any() else None
        if self.inner is None:
            return
        tmp = _work(self.shape)[4]
        _blur(self.x, self.mu)
        _blur(np.multiply(self.x, self.x, out=tmp), self.var)
        self.var -= np.multiply(self.mu, self.mu, out=tmp)
        # the true local mean, for the luminance term (OpenCV 5.0's stubs reject a scalar operand,
        # 5.1's accept it)
        cv2.add(self.mu, offset, dst=self.mean2)  # type: ignore[call-overload, unused-ignore]
        np.multiply(self.mean2, self.mean2, out=self.mu_sq)
        self.mean2 *= np.float32(2.0)


class ReferenceContext:
    """Everything about one clean image and its FOV that a comparison against it reuses.

    Build it once per clean image; :meth:`metrics` (or :meth:`psnr`, :meth:`ssim`,
    :meth:`ms_ssim`) then scores any number of images against it (every degraded variant and
    every enhanced output) without recomputing the clean image's local means and variances,
    its pooled scales or the eroded FOVs. ``scales`` is the number of MS-SSIM scales prepared.
    """

    def __init__(self, ref: np.ndarray, mask: np.ndarray, *, scales: int = 5) -> None:
        # Private read-only copies: a caller refilling its buffer in place must not change a
        # context built from it (PSNR would see the new image, SSIM the old one).
        self.ref = frozen_copy(check_image(ref, "ref"))
        self.fov = frozen_copy(check_mask(mask, self.ref.shape))
        if scales < 1:
            raise ValueError(f"scales must be >= 1, got {scales}")
        self.n_scales = scales
        self._fov8 = self.fov.astype(np.uint8)
        self._count = int(np.count_nonzero(self.fov))
        self.scales: list[_Scale] = []
        self.empty_scale: int | None = None
        """Index of the first scale whose eroded FOV is empty (None: all ``scales`` usable)."""
        means = cv2.mean(self.ref, mask=self._fov8)
        self._offset: _Offset = (round(means[0]), round(means[1]), round(means[2]), 0.0)
        fov = self.fov
        shape = self.ref.shape
        for index in range(scales):
            if index:
                shape = (shape[0] // 2, shape[1] // 2, 3)
                if shape[0] == 0 or shape[1] == 0:
                    self.empty_scale = index
                    break
                fov = _pool_fov(fov)
            block = np.empty((5, *shape), np.float32)
            if index:
                _pool(self.scales[-1].x, block[0])
            else:
                _centred(self.ref, self._offset, block[0])
            scale = _Scale(block, fov, self._offset)
            self.scales.append(scale)
            if scale.inner is None:
                self.empty_scale = index
                break

    def _image(self, image: object) -> np.ndarray:
        a = check_image(image, "image")
        if a.shape != self.ref.shape:
            raise ValueError(f"image shape {a.shape} does not match ref shape {self.ref.shape}")
        return a

    def matches(self, ref: np.ndarray, mask: np.ndarray) -> bool:
        """Whether this context was built from ``ref`` and ``mask`` (by value)."""
        if not isinstance(ref, np.ndarray) or ref.shape != self.ref.shape:
            return False
        same_ref = ref is self.ref or np.array_equal(ref, self.ref)
        return same_ref and np.array_equal(check_mask(mask, ref.shape), self.fov)

    def _need_scales(self, n: int) -> None:
        if n > self.n_scales:
            raise ValueError(f"context prepared {self.n_scales} scales, {n} needed")

    def psnr(self, image: np.ndarray) -> float:
        """PSNR of ``image`` against the clean image (see :func:`psnr`)."""
        return _psnr_from(self._image(image), self.ref, self._fov8, self._count)

    def _means(self, image: np.ndarray, n: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel FOV means over the first ``n`` scales: (the SSIM map at scale 1, an
        n x 3 array holding the contrast-structure term at every scale but the last and the
        full SSIM at the last). ``what`` names the metric in a FOVTooSmallError."""
        if self.empty_scale is not None and self.empty_scale < n:
            bad = self.empty_scale
            h, w = self.ref.shape[0] >> bad, self.ref.shape[1] >> bad
            if what == "ssim":
                raise FOVTooSmallError(f"FOV too small for SSIM at {w}x{h}: empty after erosion")
            raise FOVTooSmallError(
                f"FOV too small for {what}: empty after erosion at scale {bad + 1} ({w}x{h})"
            )
        y = _centred(image, self._offset, _work(self.scales[0].shape)[0])
        ssim0 = np.zeros(3)
        terms = np.empty((n, 3))
        for index in range(n):
            ctx = self.scales[index]
            if index:
                pooled = _pool(y, _work(ctx.shape)[0])
                assert pooled is not None
                y = pooled
            full, cs = _scale_terms(ctx, y, self._offset, need_full=index in (0, n - 1))
            if index == 0:
                ssim0 = full
            terms[index] = full if index == n - 1 else cs
        return ssim0, terms

    def ssim(self, image: np.ndarray) -> float:
        """SSIM of ``image`` against the clean image (see :func:`ssim`)."""
        return float(self._means(self._image(image), 1, "ssim")[0].mean())

    def ms_ssim(self, image: np.ndarray, weights: tuple[float, ...] = MS_SSIM_WEIGHTS) -> float:
        """MS-SSIM of ``image`` against the clean image (see :func:`ms_ssim`)."""
        a = self._image(image)
        _check_weights(weights)
        self._need_scales(len(weights))
        _, terms = self._means(a, len(weights), f"{len(weights)}-scale MS-SSIM")
        return _combine(terms, weights)

    def metrics(self, image: np.ndarray) -> dict[str, float]:
        """All full-reference metrics of ``image`` (see :func:`full_reference_metrics`)."""
        a = self._image(image)
        out = {"psnr": _psnr_from(a, self.ref, self._fov8, self._count)}
        n = len(MS_SSIM_WEIGHTS)
        self._need_scales(n)
        if self.empty_scale is not None:
            out["ssim"] = float(self._means(a, 1, "ssim")[0].mean())
            out["ms_ssim"] = math.nan
            return out
        ssim0, terms = self._means(a, n, f"{n}-scale MS-SSIM")
        out["ssim"] = float(ssim0.mean())
        out["ms_ssim"] = _combine(terms, MS_SSIM_WEIGHTS)
        return out


def _scale_terms(
    ctx: _Scale, y: np.ndarray, offset: _Offset, *, need_full: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel FOV means of the SSIM map (zeros unless ``need_full``) and of the
    contrast-structure map at one scale; ``y`` is the centred float32 image at that scale."""
    assert ctx.inner is not None
    _, mu, var, cov, tmp = _work(ctx.shape)
    _blur(y, mu)
    _blur(np.multiply(y, y, out=tmp), var)
    _blur(np.multiply(ctx.x, y, out=tmp), cov)
    cov -= np.multiply(ctx.mu, mu, out=tmp)
    var -= np.multiply(mu, mu, out=tmp)
    # Same association as the clean terms, so identical images give exactly 1.
    var += ctx.var
    var += _C2
    cov *= np.float32(2.0)
    cov += _C2
    cov /= var
    cs_mean = _masked_mean(cov, ctx.inner)
    if not need_full:
        return np.zeros(3), cs_mean
    cv2.add(mu, offset, dst=mu)  # type: ignore[call-overload, unused-ignore]  # as above
    num = np.multiply(ctx.mean2, mu, out=tmp)
    num += _C1
    mu *= mu
    mu += ctx.mu_sq
    mu += _C1
    num /= mu
    num *= cov
    return _masked_mean(num, ctx.inner), cs_mean


def _check_weights(weights: tuple[float, ...]) -> None:
    if not weights or any(w < 0 for w in weights):
        raise ValueError(f"weights must be a non-empty sequence of non-negative numbers: {weights}")


def _combine(terms: np.ndarray, weights: tuple[float, ...]) -> float:
    """Weighted geometric mean over scales (negative terms clipped to 0), then channel mean."""
    per_channel = np.ones(3)
    for term, weight in zip(terms, weights, strict=True):
        per_channel *= np.maximum(term, 0.0) ** weight
    return float(per_channel.mean())


def reference_context(ref: np.ndarray, mask: np.ndarray) -> ReferenceContext:
    """A :class:`ReferenceContext` for the standard metrics (five MS-SSIM scales)."""
    return ReferenceContext(ref, mask, scales=len(MS_SSIM_WEIGHTS))


def psnr(image: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over FOV pixels and all three channels (range 255).

    Identical images give ``+inf``; use :func:`finite` where a finite number is needed.
    """
    a, b, fov = _check_pair(image, ref, mask)
    return _psnr_from(a, b, fov.astype(np.uint8), int(np.count_nonzero(fov)))


def ssim(image: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004, Gaussian window sigma 1.5) inside the FOV.

    The SSIM map is computed per channel on the full image (OpenCV Gaussian filtering in
    float32; equal to scikit-image's ``structural_similarity`` with the same window to 1e-5,
    tested) and averaged over the channels and over the FOV eroded by the window radius (5 px).
    """
    a, _, _ = _check_pair(image, ref, mask)
    return ReferenceContext(ref, mask, scales=1).ssim(a)


def ms_ssim(
    image: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray,
    *,
    weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
) -> float:
    """Multi-scale SSIM (Wang, Simoncelli and Bovik 2003) inside the FOV.

    At each of ``len(weights)`` scales (2x2 average pooling between scales) the contrast-structure
    term is averaged over the FOV of that scale eroded by the window radius; the coarsest scale
    uses the full SSIM (luminance x contrast-structure). The FOV at a coarser scale keeps only
    pooled pixels whose four parents were all inside the FOV, so no value depends on pixels
    outside it. Negative per-scale terms are clipped to 0 before the weighted geometric mean.
    Each channel is scored separately and the three values are averaged. With
    ``weights=(1.0,)`` this equals :func:`ssim`. Five scales need a FOV diameter of about
    270 px or more; smaller FOVs raise :class:`FOVTooSmallError` (pass fewer ``weights``).
    """
    a, _, _ = _check_pair(image, ref, mask)
    _check_weights(weights)
    return ReferenceContext(ref, mask, scales=len(weights)).ms_ssim(a, weights)


def full_reference_metrics(
    image: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray,
    *,
    context: ReferenceContext | None = None,
) -> dict[str, float]:
    """All full-reference metrics by registry name: ``psnr``, ``ssim`` and ``ms_ssim``.

    ``ms_ssim`` is NaN (a missing value, not an error) when the FOV is too small for its five
    scales, so that small working sizes still get PSNR and SSIM; every other problem raises.
    ``context`` (from :func:`reference_context` on the same ``ref`` and ``mask``) reuses the
    clean image's terms; one built from other inputs raises ValueError. Scoring many images
    against one clean image, call ``context.metrics(image)`` directly to skip that check.
    """
    _check_pair(image, ref, mask)
    if context is None:
        context = reference_context(ref, mask)
    elif not context.matches(ref, mask):
        raise ValueError("context was built from a different ref or mask")
    return context.metrics(image)


REFERENCE_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "psnr": psnr,
    "ssim": ssim,
    "ms_ssim": ms_ssim,
}
"""Registry of full-reference metrics, ``name -> fn(image, ref, mask)``."""
