"""Field-of-view (FOV) detection and cropping for fundus photographs.

A fundus camera images the retina through a circular aperture, so a raw photograph is a bright disc
on a dark surround, often cut by the frame at the top and bottom (EyePACS) or by black bars in
already-cropped images, sometimes with a small notch marker on the rim. ``detect_fov`` finds that
circle on a downscaled copy:

1. luminance = per-pixel channel maximum, lightly smoothed;
2. threshold between the surround level (read in the frame corners) and the fundus level;
3. largest bright region, replaced by its convex hull (fills dark lesions and dark rims);
4. a circle is fitted to the hull's rim off the image border by a fixed-seed RANSAC (long
   straight runs along the rim's extreme rows/columns are black-bar edges and are left out;
   chords over dark regions and notches are outliers), refined by least squares, then each rim
   point is moved to the half-level crossing of its radial profile and the circle is refitted
   with points beyond 3 robust standard deviations cut (glare bleeding past the rim, notches);
5. plausibility checks (rim on the circle, angular coverage, no bar corner outside the circle,
   area outside the circle, size);
6. a photograph must look like one: a bright region without texture (interquartile range of
   R+G+B under 3.5 % of its contrast to the surround; every photograph in ../shared/data has
   >= 7 %) or >= 90 % white is ``mask_like``, and so is a grey line drawing on black (a vessel
   map) that fails the circle fit;
7. no circle, but no dark surround either (under 15 % of the frame-edge pixels darker than a
   tenth of the interior's median): a photograph that fills the frame (``full_frame``, the
   inscribed circle) if it is smooth, fundus-coloured, smooth in red and not flat in green.

Changes for issue 12: the ``mask_like`` check (a white disc on black used to pass as an ``ok``
photograph); bar edges out of the fit, so a clipped field inside a thin black frame no longer
fails as "not circular (19 % of its rim on a circle)"; the trimmed refit. All 297 photographs
in ../shared/data (six folders) preprocess, before and after.

Full frame used to need a bright region whose hull covered 98 % of the frame; a dark macula or
dark corners kept centre crops of real photographs under it (17 of 28 failed, 26 pass now). The
frame edge decides now; every photograph that was detected is detected identically.

Coordinates use pixel centres at integers. The returned mask is the circle intersected with the
image and with ``box``, the rectangle of valid pixels (smaller than the image when black bars cut
the circle).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "WORK_SIDE",
    "Circle",
    "FOVError",
    "FOVResult",
    "Preprocessed",
    "check_given_field",
    "check_not_blank",
    "circle_mask",
    "crop_to_fov",
    "detect_fov",
    "preprocess",
]

WORK_SIDE = 640
"""Longest side of the downscaled copy that detection runs on."""

_MIN_INPUT_SIDE = 16
_MIN_RADIUS_FRAC = 0.1  # of the shorter image side
_MIN_RADIUS_PX = 8.0  # at source resolution
_BLANK_RANGE = 12.0  # grey levels between the 1st and 99th percentile of a blank image
_THRESH_FRAC = 0.15  # threshold position between surround and fundus level
_THRESH_MIN_DELTA = 6.0
_MIN_INLIER_FRAC = 0.25  # of the rim points off the frame border
_MIN_COVERAGE_DEG = 90.0
_MIN_SPREAD_COVERAGE_DEG = 30.0  # enough when the arcs lie in at least three quadrants
_MAX_OUTSIDE_FRAC = 0.05  # of the bright region beyond the inlier tolerance (notches are smaller)
_MIN_COVERED_FRAC = 0.7  # of the fitted circle that must be bright
_RANSAC_TRIALS = 200
_RANSAC_SCORE_POINTS = 500
_RANSAC_SEED = 20210  # fixed: detection is deterministic
_REFINE_POINTS = 256
_REFINE_REACH = 5.0  # working pixels either side of the fitted rim
_REFINE_MIN_STEP = 6.0
_MIN_SHARP_FRAC = 0.5
_TRIM_ROUNDS = 3
_TRIM_SIGMAS = 3.0
_TRIM_MIN_PX = 0.5  # working pixels: never cut what sampling noise explains
_BAR_CORNER_REACH = 0.05  # of the radius a bar's end may lie outside the circle (glare)
_EDGE_LEVEL = 0.5  # edge = where the radial profile crosses this share of the local step
# Full frame (no rim). Frame-edge pixels under 10 % of the interior's median luminance (and
# always those under 3) are surround: photographs in ../shared/data have >= 24 % of their frame
# edge dark, centre crops of them <= 10 % (dark-shot MX images), most 0 %.
_SURROUND_LEVEL = 0.1
_SURROUND_MIN = 3.0
_MAX_DARK_FRAME = 0.15
_MIN_SMOOTHNESS = 0.9  # neighbour correlation: crops >= 0.96, iid noise after the blur ~0.76
# A rimless image must be at least this much redder than blue to pass as a colour fundus, and
# few pixels may have green or blue 16 levels above red (crops <= 7 %, a green/orange logo 47 %).
_FUNDUS_RED_OVER_BLUE = 1.3
_NOT_RED_MARGIN = 16
_MAX_NOT_RED = 0.2
# Fine detail of a channel: std of the channel minus its sigma-3 blur, over its mean. The retina
# is smooth in red light (crops: 99 % <= 0.064; astronaut, coffee, chelsea crops 0.087-0.135)
# and shows vessels in green (crops >= 0.011; a noiseless gradient 0.004).
_DETAIL_SIGMA = 3.0
_MAX_RED_DETAIL = 0.08
_MIN_GREEN_DETAIL = 0.006
# Mask-like images. Over the 297 photographs in ../shared/data the field's interquartile range
# is >= 7 % of its contrast to the surround and at most 3 % of the field is white; a binary
# mask (JPEG-compressed or not) has < 1 % and ~100 %.
_MIN_TEXTURE = 0.035
_MAX_WHITE_FRAC = 0.9
_WHITE_LEVEL = 250
# A binary line drawing (vessel map): grey, black surround, few pixels between the two levels.
_BINARY_MAX_CHROMA = 16
_BINARY_MAX_DARK = 12
_BINARY_MIN_RANGE = 96
_BINARY_MAX_MID = 0.3  # mid-grey pixels per bright pixel (anti-aliased and JPEG-rung edges)
_BINARY_MAX_BRIGHT = 0.35  # share of the frame; a white disc on black is caught by texture


class FOVError(ValueError):
    """No usable field of view; ``reason`` is a short stable code.

    Codes: ``invalid_input``, ``blank`` (uniform image), ``no_fov`` (no dark surround and not a
    photograph), ``no_circle`` (the bright region is not circular or has no sharp rim),
    ``mask_like`` (a binary image such as an FOV mask or a vessel map: a field without texture,
    over-exposed white, or grey lines on black), ``too_small``, ``no_overlap`` (``crop_to_fov``
    got a circle outside the image), ``mask_shape`` (a given FOV mask whose shape cannot be the
    photograph's).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Circle:
    """FOV circle in source pixels (pixel centres at integer coordinates)."""

    cx: float
    cy: float
    r: float

    def scaled(self, sx: float, sy: float | None = None) -> Circle:
        """The same circle in an image resized by ``sx`` horizontally and ``sy`` vertically."""
        sy = sx if sy is None else sy
        return Circle(
            (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5, self.r * (sx + sy) / 2.0
        )


Box = tuple[int, int, int, int]
"""(x0, y0, x1, y1): valid pixel rectangle, end-exclusive."""


@dataclass
class FOVResult:
    """Detected circle, binary mask (HxW uint8 0/255, source size), status and valid box.

    ``status`` is ``ok`` (whole circle inside the valid box), ``clipped`` (the frame or black bars
    cut the circle) or ``full_frame`` (the fundus fills the frame: either the fitted circle
    covers every corner, or no rim is visible at all and the circle is the inscribed one).
    """

    circle: Circle
    mask: np.ndarray
    status: str
    box: Box | None = None


@dataclass
class Preprocessed:
    """Working image (size x size x 3 uint8, zero outside the FOV), its mask and provenance."""

    image: np.ndarray
    mask: np.ndarray
    circle: Circle
    status: str
    box: Box | None = None


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
        raise FOVError("invalid_input", f"expected a uint8 array, got {getattr(rgb, 'dtype', rgb)}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise FOVError("invalid_input", f"expected an HxWx3 RGB image, got shape {rgb.shape}")
    if min(rgb.shape[:2]) < _MIN_INPUT_SIDE:
        raise FOVError("too_small", f"image {rgb.shape[1]}x{rgb.shape[0]} is too small")


def circle_mask(height: int, width: int, circle: Circle, box: Box | None = None) -> np.ndarray:
    """HxW uint8 mask, 255 where the pixel centre lies in the circle (and in ``box``)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    bx0, by0, bx1, by1 = box if box is not None else (0, 0, width, height)
    y_lo = max(by0, 0, int(np.ceil(circle.cy - circle.r)))
    y_hi = min(by1, height, int(np.floor(circle.cy + circle.r)) + 1)
    if y_hi <= y_lo:
        return mask
    ys = np.arange(y_lo, y_hi, dtype=np.float64)
    half = np.sqrt(np.maximum(circle.r**2 - (ys - circle.cy) ** 2, 0.0))
    x0 = np.clip(np.ceil(circle.cx - half).astype(np.int64), max(bx0, 0), None)
    x1 = np.clip(np.floor(circle.cx + half).astype(np.int64) + 1, None, min(bx1, width))
    # One run [x0, x1) per row, as the AND of two step rows cut out of a step template: far
    # cheaper than a 2-D distance test or a Python loop over rows.
    step = np.zeros(2 * width + 1, np.uint8)
    step[width:] = 255
    from_x = np.lib.stride_tricks.sliding_window_view(step, width)  # [k]: 255 where x >= w - k
    before_x = np.lib.stride_tricks.sliding_window_view(255 - step, width)  # 255 where x < w - k
    x0, x1 = np.clip(x0, 0, width), np.clip(x1, 0, width)
    np.bitwise_and(from_x[width - x0], before_x[width - x1], out=mask[y_lo:y_hi])
    return mask


def _luminance(small: np.ndarray) -> np.ndarray:
    r, g, b = cv2.split(small)
    lum = cv2.max(cv2.max(r, g), b)
    return cv2.GaussianBlur(lum, (5, 5), 1.0)


def _percentiles(hist: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """Percentiles (0-100) of uint8 data from its 256-bin histogram."""
    cdf = np.cumsum(hist)
    total = float(cdf[-1])
    return [float(np.searchsorted(cdf, q / 100.0 * total, side="left")) for q in qs]


def _smoothness(lum: np.ndarray) -> float:
    """Correlation of horizontally adjacent pixels: near 1 for photographs, near 0 for noise."""
    a = lum[::2, :-1].astype(np.float32).ravel()
    b = lum[::2, 1:].astype(np.float32).ravel()
    a -= a.mean()
    b -= b.mean()
    denom = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    return float(np.dot(a, b) / denom) if denom > 0 else 1.0


def _dark_frame_share(lum: np.ndarray) -> float:
    """Share of the frame-edge pixels dark enough to be surround, relative to the interior."""
    h, w = lum.shape
    interior = float(np.median(lum[h // 4 : h - h // 4, w // 4 : w - w // 4]))
    level = max(_SURROUND_LEVEL * interior, _SURROUND_MIN)
    edge = np.concatenate([lum[0], lum[-1], lum[1:-1, 0], lum[1:-1, -1]])
    return float(np.count_nonzero(edge < level)) / edge.size


def _detail(channel: np.ndarray) -> float:
    """Fine detail of one channel: std of the channel minus its blur, over its mean."""
    x = channel.astype(np.float32)
    fine = x - cv2.GaussianBlur(x, (0, 0), _DETAIL_SIGMA)
    return float(fine.std()) / max(float(x.mean()), 1.0)


def _surround_level(lum: np.ndarray) -> float:
    """Median of the darkest frame corner (one corner may hold a label or notch)."""
    h, w = lum.shape
    ch, cw = max(2, h // 16), max(2, w // 16)
    corners = (lum[:ch, :cw], lum[:ch, -cw:], lum[-ch:, :cw], lum[-ch:, -cw:])
    return float(min(np.median(c) for c in corners))


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Algebraic (Kasa) least-squares circle through points."""
    mx, my = x.mean(), y.mean()
    u, v = x - mx, y - my
    b = u * u + v * v
    # normal equations of [u v 1] (2cx, 2cy, c) = u^2 + v^2; u and v have zero mean, so the
    # constant decouples and a 2x2 system remains
    suu, svv, suv = float(u @ u), float(v @ v), float(u @ v)
    det = suu * svv - suv * suv
    if det > 1e-9 * max(suu * svv, 1e-300):
        sbu, sbv = float(b @ u), float(b @ v)
        sol = ((svv * sbu - suv * sbv) / det, (suu * sbv - suv * sbu) / det, float(b.mean()))
    else:  # (nearly) collinear points: minimum-norm least squares
        a = np.stack([u, v, np.ones_like(u)], axis=1)
        sol = tuple(np.linalg.lstsq(a, b, rcond=None)[0])
    cx, cy = sol[0] / 2.0, sol[1] / 2.0
    r = float(np.sqrt(max(sol[2] + cx * cx + cy * cy, 0.0)))
    return float(cx + mx), float(cy + my), r


def _inlier_tol(r: float) -> float:
    return max(1.5, 0.01 * r)


def _ransac_circle(
    x: np.ndarray, y: np.ndarray, width: int, height: int
) -> tuple[float, float, float] | None:
    """Circle with the most rim points within tolerance, over random point triplets.

    Frame edges, black-bar edges, hull chords over dark regions and notches are all outliers
    here. The generator is local and fixed-seed, so the result is deterministic.
    """
    n = x.size
    stride = max(1, n // _RANSAC_SCORE_POINTS)
    xs, ys = x[::stride], y[::stride]
    rng = np.random.default_rng(_RANSAC_SEED)
    idx = np.sort(rng.integers(0, n, size=(_RANSAC_TRIALS, 3)), axis=1)
    x1, x2, x3 = x[idx[:, 0]], x[idx[:, 1]], x[idx[:, 2]]
    y1, y2, y3 = y[idx[:, 0]], y[idx[:, 1]], y[idx[:, 2]]
    d = 2.0 * (x1 * (y2 - y3) + x2 * (y3 - y1) + x3 * (y1 - y2))
    ok = np.abs(d) > 1e-6 * (n + 1)
    if not ok.any():
        return None
    x1, x2, x3, y1, y2, y3, d = (v[ok] for v in (x1, x2, x3, y1, y2, y3, d))
    s1, s2, s3 = x1 * x1 + y1 * y1, x2 * x2 + y2 * y2, x3 * x3 + y3 * y3
    cx = (s1 * (y2 - y3) + s2 * (y3 - y1) + s3 * (y1 - y2)) / d
    cy = (s1 * (x3 - x2) + s2 * (x1 - x3) + s3 * (x2 - x1)) / d
    r = np.hypot(x1 - cx, y1 - cy)
    # Long straight edges fit huge circles; a FOV centre lies in the frame, its radius is bounded.
    plausible = (
        (cx >= 0)
        & (cx <= width - 1)
        & (cy >= 0)
        & (cy <= height - 1)
        & (r <= 0.75 * float(np.hypot(width, height)))
    )
    if not plausible.any():
        return None
    cx, cy, r = cx[plausible], cy[plausible], r[plausible]
    # A point is an inlier when |d - r| <= tol, i.e. when its squared distance d^2 lies within
    # [max(r - tol, 0)^2, (r + tol)^2]: |d^2 - mid| <= spread. d^2 - mid for every (candidate,
    # point) pair is one matrix product of the expanded square.
    tol = np.maximum(1.5, 0.01 * r)
    lo, hi = np.maximum(r - tol, 0.0) ** 2, (r + tol) ** 2
    mid, spread = (lo + hi) / 2.0, (hi - lo) / 2.0
    points = np.stack([xs, ys, np.ones_like(xs), xs * xs + ys * ys])
    coefs = np.stack([-2.0 * cx, -2.0 * cy, cx * cx + cy * cy - mid, np.ones_like(cx)], axis=1)
    offset = coefs @ points
    np.abs(offset, out=offset)
    best = int(np.argmax((offset <= spread[:, None]).sum(axis=1)))
    return float(cx[best]), float(cy[best]), float(r[best])


def _refine(
    x: np.ndarray, y: np.ndarray, circle: tuple[float, float, float]
) -> tuple[float, float, float, np.ndarray]:
    """Least-squares refit on the inliers of ``circle``, a few rounds."""
    cx, cy, r = circle
    inl = np.abs(np.hypot(x - cx, y - cy) - r) <= _inlier_tol(r)
    for _ in range(3):
        if inl.sum() < 3:
            break
        cx, cy, r = _fit_circle(x[inl], y[inl])
        new = np.abs(np.hypot(x - cx, y - cy) - r) <= _inlier_tol(r)
        if np.array_equal(new, inl):
            break
        inl = new
    return cx, cy, r, inl


def _edge_refine(
    lum: np.ndarray, x: np.ndarray, y: np.ndarray, circle: tuple[float, float, float]
) -> tuple[tuple[float, float, float], float]:
    """Move rim points radially onto the half-level crossing of the local edge, then refit.

    The threshold sits well below the rim brightness, so the thresholded rim lies slightly
    outside the true edge; the half-level point of each radial profile does not depend on it.
    Also returns the share of profiles that cross a sharp edge (an aperture rim is sharp,
    the iso-brightness line of vignetting is not).
    """
    cx, cy, r = circle
    h, w = lum.shape
    step = max(1, x.size // _REFINE_POINTS)
    x, y = x[::step], y[::step]
    ux, uy = x - cx, y - cy
    norm = np.hypot(ux, uy)
    ux, uy = ux / norm, uy / norm
    offsets = np.arange(-_REFINE_REACH, _REFINE_REACH + 0.25, 0.5)
    rad = r + offsets[None, :]
    sx = (cx + ux[:, None] * rad).astype(np.float32)
    sy = (cy + uy[:, None] * rad).astype(np.float32)
    valid = (sx.min(1) >= 0) & (sx.max(1) <= w - 1) & (sy.min(1) >= 0) & (sy.max(1) <= h - 1)
    if valid.sum() < 8:
        return circle, 1.0  # rim too close to the frame to judge; keep the fit
    sx, sy, ux, uy = sx[valid], sy[valid], ux[valid], uy[valid]
    prof = cv2.remap(lum.astype(np.float32), sx, sy, cv2.INTER_LINEAR)
    k = 4  # samples averaged at each end of the profile
    inner = prof[:, :k].mean(axis=1)
    outer = prof[:, -k:].mean(axis=1)
    level = outer + _EDGE_LEVEL * (inner - outer)
    below = prof < level[:, None]
    below[:, -1] = True
    j = np.argmax(below[:, 1:], axis=1) + 1  # first sample under the half level
    a, b = prof[np.arange(j.size), j - 1], prof[np.arange(j.size), j]
    frac = np.clip((a - level) / np.maximum(a - b, 1e-6), 0.0, 1.0)
    t = offsets[j - 1] + 0.5 * frac
    good = (inner - outer) >= _REFINE_MIN_STEP
    sharp = float(good.mean())
    if good.sum() < 8:
        return circle, sharp
    t = t[good]
    ex = cx + ux[good] * (r + t)
    ey = cy + uy[good] * (r + t)
    return _trimmed_fit(ex, ey), sharp


def _trimmed_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares circle, refitted without points far off it (rim glare bulging past the
    aperture, a notch): a few rounds of cutting at 3 robust standard deviations."""
    cx, cy, r = _fit_circle(x, y)
    keep = np.ones(x.size, dtype=bool)
    for _ in range(_TRIM_ROUNDS):
        res = np.hypot(x - cx, y - cy) - r
        scale = 1.4826 * float(np.median(np.abs(res[keep] - np.median(res[keep]))))
        new = np.abs(res) <= max(_TRIM_SIGMAS * scale, _TRIM_MIN_PX)
        if new.sum() < max(8, x.size // 2) or np.array_equal(new, keep):
            break
        keep = new
        cx, cy, r = _fit_circle(x[keep], y[keep])
    return cx, cy, r


def _angular_coverage(x: np.ndarray, y: np.ndarray, cx: float, cy: float) -> tuple[float, int]:
    """Degrees of the circle covered by points (10-degree bins) and quadrants touched."""
    angles = np.degrees(np.arctan2(y - cy, x - cx)) % 360.0
    bins = np.flatnonzero(np.bincount((angles // 10.0).astype(np.int64)))
    return 10.0 * bins.size, len(set((bins // 9).tolist()))


def _clip_box(hull: np.ndarray, circle: tuple[float, float, float]) -> tuple[int, int, int, int]:
    """Valid-pixel box: a side moves onto the hull's extreme row/column when the circle runs
    past it (black bars or a cut-off rim); a side at the image border stays there."""
    h, w = hull.shape
    cx, cy, r = circle
    tol = max(2.0, 0.02 * r)
    rows = np.flatnonzero(hull.any(axis=1))
    cols = np.flatnonzero(hull.any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    y0 = top if top > 1 and cy - r < top - tol else 0
    y1 = bottom + 1 if bottom < h - 2 and cy + r > bottom + tol else h
    x0 = left if left > 1 and cx - r < left - tol else 0
    x1 = right + 1 if right < w - 2 and cx + r > right + tol else w
    return x0, y0, x1, y1


def _detect_small(
    lum: np.ndarray, small: np.ndarray
) -> tuple[tuple[float, float, float] | None, Box, str]:
    """Circle (None when no rim is visible), valid box and status on the working image."""
    h, w = lum.shape
    hist = cv2.calcHist([lum], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    lo, hi = _percentiles(hist, (1.0, 99.9))
    if hi - lo < _BLANK_RANGE:
        raise FOVError("blank", f"image is uniform (grey levels {lo:.0f}..{hi:.0f})")

    bg = _surround_level(lum)
    start = min(255, int(bg + _THRESH_MIN_DELTA) + 1)
    if hist[start:].sum() == 0:
        raise FOVError("no_fov", "no region brighter than the surround")
    fg = start + _percentiles(hist[start:], (50.0,))[0]
    thresh = bg + max(_THRESH_MIN_DELTA, _THRESH_FRAC * (fg - bg))
    binary = cv2.threshold(lum, thresh, 1, cv2.THRESH_BINARY)[1]  # lum > thresh
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))

    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        raise FOVError("no_fov", "no region brighter than the surround")
    biggest = max(contours, key=cv2.contourArea)  # the largest bright region
    hull = np.zeros_like(binary)
    cv2.fillConvexPoly(hull, cv2.convexHull(biggest), 1)
    hull_area = int(np.count_nonzero(hull))
    min_r = _MIN_RADIUS_FRAC * min(h, w)
    try:
        if hull_area < np.pi * min_r**2:
            raise FOVError("too_small", f"bright region of {hull_area} px is too small for a FOV")
        (cx, cy, r), box = _fit_rim(lum, hull, hull_area)
    except FOVError:
        # Dark corners or a dark macula split the bright region of a photograph that fills the
        # frame, so its size and shape say nothing: only a dark frame edge shows a surround.
        if _dark_frame_share(lum) > _MAX_DARK_FRAME:
            raise
        _check_full_frame(lum, small)
        return None, (0, 0, w, h), "full_frame"
    _check_texture(small, binary)

    x0, y0, x1, y1 = box
    corners = np.array([[x0, y0], [x1 - 1, y0], [x0, y1 - 1], [x1 - 1, y1 - 1]], np.float64)
    if bool(np.all(np.hypot(corners[:, 0] - cx, corners[:, 1] - cy) <= r)):
        status = "full_frame"
    elif cx - r < x0 - 1 or cx + r > x1 or cy - r < y0 - 1 or cy + r > y1:
        status = "clipped"
    else:
        status = "ok"
    return (cx, cy, r), box, status


def _check_texture(small: np.ndarray, bright: np.ndarray) -> None:
    """Reject a bright region without texture or nearly all white: a mask, not a photograph.

    Texture is the interquartile range of R+G+B over the bright region (one pixel in from its
    edges, where anti-aliasing and JPEG ringing live) relative to its contrast to the surround,
    so it does not depend on exposure: a dim photograph has as much texture as a bright one.
    """
    inner = cv2.erode(bright, np.ones((3, 3), np.uint8))
    if cv2.countNonZero(inner) < 0.01 * inner.size:
        inner = bright
    r, g, b = cv2.split(small)
    total = cv2.add(cv2.add(r, g, dtype=cv2.CV_16U), b, dtype=cv2.CV_16U)
    # One histogram of R+G+B (0..765) per region, from a single pass over the 0/1 maps: region
    # 0 is outside the bright region, 1 its edge, 2 the inner part (two masked calcHist calls
    # cost twice as much; the counts are the same).
    region = bright.astype(np.uint16) + np.asarray(inner, dtype=np.uint16)
    region *= np.uint16(766)
    region += np.asarray(total, dtype=np.uint16)
    hist = cv2.calcHist([region], [0], None, [3 * 766], [0, 3 * 766]).ravel()
    hist_in, hist_out = hist[2 * 766 :], hist[:766]
    q25, median, q75 = _percentiles(hist_in, (25.0, 50.0, 75.0))
    surround = _percentiles(hist_out, (50.0,))[0] if hist_out.any() else 0.0
    white = cv2.compare(cv2.min(cv2.min(r, g), b), _WHITE_LEVEL, cv2.CMP_GE)  # type: ignore[call-overload]
    white_frac = cv2.countNonZero(cv2.bitwise_and(white, white, mask=inner)) / max(
        1, cv2.countNonZero(inner)
    )
    if white_frac >= _MAX_WHITE_FRAC:
        raise FOVError(
            "mask_like",
            f"image looks like a binary mask, not a photograph: {white_frac:.0%} of the field "
            "is white (over-exposed)",
        )
    texture = (q75 - q25) / max(median - surround, 1.0)
    if texture < _MIN_TEXTURE:
        raise FOVError(
            "mask_like",
            "image looks like a binary mask, not a photograph: the field has no texture "
            f"(interquartile range {texture:.1%} of its contrast, photographs have >= "
            f"{_MIN_TEXTURE:.1%})",
        )


def _binary_drawing(sample: np.ndarray) -> str | None:
    """Why a grey image looks like bright lines on black (a vessel map), or None.

    ``sample`` is a strided subsample, not a resized copy, so thin lines stay two-level.
    """
    r, g, b = cv2.split(np.ascontiguousarray(sample))
    top = cv2.max(cv2.max(r, g), b)
    chroma = cv2.subtract(top, cv2.min(cv2.min(r, g), b))
    hist_c = cv2.calcHist([chroma], [0], None, [256], [0, 256]).ravel()
    if _percentiles(hist_c, (99.0,))[0] > _BINARY_MAX_CHROMA:
        return None
    hist = cv2.calcHist([top], [0], None, [256], [0, 256]).ravel()
    dark, high = _percentiles(hist, (50.0, 99.5))
    span = high - dark
    if dark > _BINARY_MAX_DARK or span < _BINARY_MIN_RANGE:
        return None
    lo_cut, hi_cut = int(dark + 0.25 * span), int(np.ceil(high - 0.25 * span))
    n = float(hist.sum())
    bright = float(hist[hi_cut:].sum()) / n
    mid = float(hist[lo_cut + 1 : hi_cut].sum()) / n
    if not (0.0 < bright <= _BINARY_MAX_BRIGHT and mid <= _BINARY_MAX_MID * bright):
        return None
    return (
        f"image looks like a binary mask or vessel map, not a photograph: grey, {bright:.0%} "
        f"bright pixels on black and {mid / bright:.0%} as many in between"
    )


def _bar_edges(
    px: np.ndarray, py: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rim points on long straight runs along the rim's extreme rows and columns (black-bar
    edges), and the runs' ends that lie off the frame border (inside the circle).

    A circle's own extreme row is a run of about 2 sqrt(2 r) pixels; a bar edge is far longer.
    """
    bar = np.zeros(px.size, dtype=bool)
    ends: list[tuple[float, float]] = []
    if px.size == 0:
        return bar, np.zeros((0, 2))
    min_run = 3.0 * np.sqrt(2.0 * max(width, height))
    for along, across, extreme, limit in (
        (px, py, py.min(), width),
        (px, py, py.max(), width),
        (py, px, px.min(), height),
        (py, px, px.max(), height),
    ):
        on = across == extreme
        if on.sum() <= min_run:
            continue
        bar |= on
        for end in (along[on].min(), along[on].max()):
            if 2 <= end <= limit - 3:  # a run that reaches the frame border has no corner there
                ends.append((end, extreme) if across is py else (extreme, end))
    return bar, np.array(ends, dtype=np.float64).reshape(-1, 2)


def _fit_rim(
    lum: np.ndarray, hull: np.ndarray, hull_area: int
) -> tuple[tuple[float, float, float], Box]:
    """Circle and valid box from the hull's rim off the image border; raises FOVError."""
    h, w = hull.shape
    rim, _ = cv2.findContours(hull, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = np.concatenate(rim, axis=0).reshape(-1, 2).astype(np.float64)
    px, py = pts[:, 0], pts[:, 1]
    off_border = (px > 0) & (px < w - 1) & (py > 0) & (py < h - 1)
    px, py = px[off_border], py[off_border]
    # Straight edges of black bars (a thin black frame around a clipped field) are explained by
    # the valid box, not by the circle: leave them out of the fit and of the inlier share.
    bar, bar_ends = _bar_edges(px, py, w, h)
    px, py = px[~bar], py[~bar]
    guess = _ransac_circle(px, py, w, h) if px.size >= 12 else None
    if guess is None:
        raise FOVError("no_circle", "too few rim points off the frame border to fit a circle")
    cx, cy, r, inl = _refine(px, py, guess)
    (cx, cy, r), sharp = _edge_refine(lum, px[inl], py[inl], (cx, cy, r))
    if sharp < _MIN_SHARP_FRAC:
        raise FOVError("no_circle", f"only {sharp:.0%} of the rim is a sharp edge")

    coverage, quadrants = _angular_coverage(px[inl], py[inl], cx, cy)
    spread = coverage >= _MIN_COVERAGE_DEG or (
        quadrants >= 3 and coverage >= _MIN_SPREAD_COVERAGE_DEG
    )
    if inl.mean() < _MIN_INLIER_FRAC or not spread:
        raise FOVError(
            "no_circle",
            f"bright region is not circular ({inl.mean():.0%} of its rim on a circle, "
            f"{coverage:.0f} degrees in {quadrants} quadrants)",
        )
    # A bar cuts the field inside the circle, so its ends (where the rim turns onto the arc, or
    # onto a hull chord over a dark periphery) cannot lie outside it: a circle fitted to short
    # arcs alone that leaves a bar corner outside is a wrong circle.
    off = np.hypot(bar_ends[:, 0] - cx, bar_ends[:, 1] - cy) - r
    if off.size and float(off.max()) > max(3.0 * _inlier_tol(r), _BAR_CORNER_REACH * r):
        raise FOVError(
            "no_circle",
            f"a black-bar corner lies {off.max() / r:.0%} of the radius outside the circle "
            "fitted to the rim",
        )
    box = _clip_box(hull, (cx, cy, r))
    fitted = circle_mask(h, w, Circle(cx, cy, r), box)
    both = cv2.countNonZero(cv2.bitwise_and(hull, fitted))
    # The thresholded, smoothed hull lies 1-2 working pixels outside the half-level edge the
    # circle is fitted to: count as outside only what lies beyond the inlier tolerance (at
    # small radii that rim alone is over 5 % of the region, and clean thumbnails failed).
    grown = circle_mask(h, w, Circle(cx, cy, r + _inlier_tol(r)), box)
    outside = hull_area - cv2.countNonZero(cv2.bitwise_and(hull, grown))
    if outside > _MAX_OUTSIDE_FRAC * hull_area:
        raise FOVError(
            "no_circle", f"{outside / hull_area:.0%} of the bright region lies outside the circle"
        )
    covered = both / max(1, cv2.countNonZero(fitted))
    if covered < _MIN_COVERED_FRAC:
        raise FOVError("no_circle", f"only {covered:.0%} of the fitted circle is bright")
    return (cx, cy, r), box


def _check_full_frame(lum: np.ndarray, small: np.ndarray) -> None:
    """A frame-filling image has no rim to prove it is a fundus photograph, so ask for one:
    smooth (not noise), fundus-coloured (red above green above blue on average and nearly
    everywhere: retinal pigment and blood), smooth in red (not a scene) and with vessels or
    noise in green (not a drawing); raises ``no_fov``."""
    if _smoothness(lum) < _MIN_SMOOTHNESS:
        raise FOVError("no_fov", "image looks like noise, not a photograph")
    r, g, b = (float(c) for c in cv2.mean(small)[:3])
    if not (r >= g >= b and r >= _FUNDUS_RED_OVER_BLUE * max(b, 1.0)):
        raise FOVError(
            "no_fov",
            f"no field-of-view rim and not fundus-coloured (mean RGB {r:.0f}, {g:.0f}, {b:.0f})",
        )
    red, green, blue = cv2.split(small)
    over_red = cv2.subtract(cv2.max(green, blue), red)
    not_red = np.count_nonzero(over_red > _NOT_RED_MARGIN) / over_red.size
    if not_red > _MAX_NOT_RED:
        raise FOVError(
            "no_fov",
            f"no field-of-view rim and not fundus-coloured ({not_red:.0%} of the pixels are "
            "green or blue)",
        )
    red_detail, green_detail = _detail(red), _detail(green)
    if red_detail > _MAX_RED_DETAIL:
        raise FOVError(
            "no_fov",
            "no field-of-view rim and too much fine detail in red for a fundus "
            f"({red_detail:.3f}, fundus photographs have <= {_MAX_RED_DETAIL})",
        )
    if green_detail < _MIN_GREEN_DETAIL:
        raise FOVError(
            "no_fov",
            "no field-of-view rim and no fine detail in green (no vessels, no noise: "
            f"{green_detail:.4f}), not a photograph",
        )


def detect_fov(rgb: np.ndarray) -> FOVResult:
    """Find the circular field of view of an HxWx3 uint8 RGB photograph; raises FOVError."""
    circle, status, box = _detect(rgb)
    mask = circle_mask(rgb.shape[0], rgb.shape[1], circle, box)
    return FOVResult(circle=circle, mask=mask, status=status, box=box)


def _detect(rgb: np.ndarray) -> tuple[Circle, str, Box]:
    """Circle, status and valid box of :func:`detect_fov`, without the source-size mask."""
    _check_rgb(rgb)
    h, w = rgb.shape[:2]
    # An integer factor keeps INTER_AREA on its fast path and the coordinate mapping exact;
    # the last (w % f) columns and (h % f) rows are not looked at.
    f = max(1, round(max(h, w) / WORK_SIDE))
    sw, sh = w // f, h // f
    if f > 1:
        small = cv2.resize(rgb[: sh * f, : sw * f], (sw, sh), interpolation=cv2.INTER_AREA)
    else:
        small = rgb
    try:
        fit, (bx0, by0, bx1, by1), status = _detect_small(_luminance(small), small)
    except FOVError as exc:
        # A drawing fails the circle fit; name what it is rather than why it is not a circle.
        why = _binary_drawing(rgb[::f, ::f]) if exc.reason != "blank" else None
        if why is not None:
            raise FOVError("mask_like", why) from exc
        raise
    if fit is None:
        # No rim anywhere: use the inscribed circle, so the working image is a round FOV like
        # every other one and radius-relative parameters keep their meaning.
        circle = Circle((w - 1) / 2.0, (h - 1) / 2.0, min(w, h) / 2.0)
    else:
        circle = Circle(*fit).scaled(f)
    box = (bx0 * f, by0 * f, bx1 * f if bx1 < sw else w, by1 * f if by1 < sh else h)
    if circle.r < max(_MIN_RADIUS_PX, _MIN_RADIUS_FRAC * min(h, w)):
        raise FOVError("too_small", f"FOV radius {circle.r:.1f} px is too small for {w}x{h}")
    return circle, status, box


def check_given_field(circle: Circle, area: int, height: int, width: int) -> None:
    """Raise ``FOVError("too_small")`` for a field of view given by a mask (``circle`` fitted
    to it, ``area`` its pixels, in an image of ``height`` x ``width``) that detection would
    refuse as too small: a radius under 10 % of the shorter side (and 8 px), or fewer pixels
    than a circle of 10 % of it (a line, scattered dots)."""
    min_r = _MIN_RADIUS_FRAC * min(height, width)
    if circle.r < max(_MIN_RADIUS_PX, min_r):
        raise FOVError(
            "too_small",
            f"the given FOV mask's radius {circle.r:.1f} px is too small for {width}x{height}",
        )
    if area < np.pi * min_r**2:
        raise FOVError(
            "too_small", f"the given FOV mask's {area} px are too few for a FOV in {width}x{height}"
        )


def check_not_blank(rgb: np.ndarray, mask: np.ndarray) -> None:
    """Raise ``FOVError("blank")`` when the image inside ``mask`` is uniform: its luminance
    (channel maximum) spans under 12 grey levels between its 1st and 99.9th percentiles, the
    test detection applies to a whole photograph."""
    lum = np.ascontiguousarray(rgb.max(axis=2))
    hist = cv2.calcHist([lum], [0], mask, [256], [0, 256]).ravel().astype(np.int64)
    lo, hi = _percentiles(hist, (1.0, 99.9))
    if hi - lo < _BLANK_RANGE:
        raise FOVError(
            "blank",
            f"the image is uniform inside the given FOV mask (grey levels {lo:.0f}..{hi:.0f})",
        )


def crop_to_fov(
    rgb: np.ndarray, circle: Circle, size: int = 512, box: Box | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Crop the circle's bounding square (zero-padded where it leaves the image), resize to
    ``size`` with INTER_AREA and zero everything outside the circle (and ``box``).

    The circle ends up centred and inscribed in the output. Returns (image size x size x 3
    uint8, mask size x size uint8 0/255); the mask is computed geometrically, never resampled.
    """
    _check_rgb(rgb)
    if isinstance(size, np.integer):  # a size read from a DataFrame or an array
        size = int(size)
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not circle.r > 0:
        raise FOVError("too_small", f"circle radius must be positive, got {circle.r}")
    h, w = rgb.shape[:2]
    bx0, by0, bx1, by1 = box if box is not None else (0, 0, w, h)
    bx0, by0, bx1, by1 = max(bx0, 0), max(by0, 0), min(bx1, w), min(by1, h)
    side = max(1, round(2.0 * circle.r))
    ox = int(np.floor(circle.cx - (side - 1) / 2.0 + 0.5))
    oy = int(np.floor(circle.cy - (side - 1) / 2.0 + 0.5))
    sx0, sy0 = max(ox, bx0), max(oy, by0)
    sx1, sy1 = min(ox + side, bx1), min(oy + side, by1)
    if (sx0, sy0, sx1, sy1) == (ox, oy, ox + side, oy + side):
        square = rgb[oy : oy + side, ox : ox + side]
    else:
        square = np.zeros((side, side, 3), dtype=np.uint8)
        if sx1 > sx0 and sy1 > sy0:
            square[sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox] = rgb[sy0:sy1, sx0:sx1]
    if side != size:
        square = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
    # Output pixel j covers canvas pixels [j*k, (j+1)*k) with k = side/size.
    k = side / size
    centres = (np.arange(size, dtype=np.float64) + 0.5) * k - 0.5
    out_circle = Circle(
        (circle.cx - ox + 0.5) / k - 0.5, (circle.cy - oy + 0.5) / k - 0.5, circle.r / k
    )
    valid_x = np.flatnonzero((centres + ox >= sx0 - 0.5) & (centres + ox < sx1 - 0.5))
    valid_y = np.flatnonzero((centres + oy >= sy0 - 0.5) & (centres + oy < sy1 - 0.5))
    out_box: Box = (0, 0, 0, 0)
    if valid_x.size and valid_y.size:
        out_box = (int(valid_x[0]), int(valid_y[0]), int(valid_x[-1]) + 1, int(valid_y[-1]) + 1)
    mask = circle_mask(size, size, out_circle, out_box)
    if not mask.any():
        raise FOVError("no_overlap", f"{circle} does not overlap the image's valid pixels")
    image = cv2.bitwise_and(square, square, mask=mask)
    return image, mask


def preprocess(rgb: np.ndarray, size: int = 512) -> Preprocessed:
    """Detect the FOV and crop/resize to the ``size`` x ``size`` working image."""
    circle, status, box = _detect(rgb)
    image, mask = crop_to_fov(rgb, circle, size, box)
    return Preprocessed(image=image, mask=mask, circle=circle, status=status, box=box)
