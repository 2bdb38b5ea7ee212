"""Scale calibration of an estimated point cloud against hand joints, and 3D object localisation from
a 2D box in the calibrated cloud (paper §3.2.1, "3D aware annotations").

    >>> import numpy as np
    >>> from hand3d_dataset.cameras import backproject_depth, intrinsics_matrix
    >>> from hand3d_dataset.calibration import calibrate_scale, localize_object
    >>> K = intrinsics_matrix((100.0, 100.0), (31.5, 31.5))
    >>> pointmap = backproject_depth(np.full((64, 64), 0.25), K)  # cloud at 1/4 of metric scale
    >>> joints = np.array([[0.0, 0.0, 1.0], [0.1, 0.0, 1.0], [0.0, 0.1, 1.0]])
    >>> calibrate_scale(joints, pointmap, K).scale
    4.0
    >>> localize_object([20, 20, 40, 40], pointmap, scale=4.0).xyz.round(3).tolist()
    [-0.02, -0.02, 1.0]

Scale (paper eq. in §3.2.1): ``s = median_{k∈Ω}(z_joint_k / z_cloud_k)`` where z_cloud_k is the z of the
pointmap at the joint's projected pixel and Ω are the joints that are in front of the camera, inside
the image, flagged valid by the caller, and whose cloud point is finite with z > 0. The pixel is read
by nearest lookup (pixel centres at integers, see `cameras.py`): bilinear reads would blend the hand
with the background at silhouette edges, exactly where joints project, and the median already
absorbs the ≤ ½-pixel quantisation.

Object position: see `localize_object`. By default (`LocalizationConfig.estimate="centre"`) the
result is an estimate of the object's volumetric centre: the visible-surface centre pushed back along
its viewing ray by the thickness of the visible shell (`_shell_depth`); `estimate="surface"` gives the
visible-surface centre itself. A hand–object relation is about the object, not its front face: on
`synth` clips of unseen seeds (benchmarks/bench_object_centre.py) the centre estimate lies a median
~1 cm from the rendered centres, the surface ~3 cm in front of them.

Only the pixels that are read are validated (a 448×448 pointmap is never scanned whole), so these
functions cost O(joints + box area), not O(H·W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hand3d_dataset._checks import as_array, check_intrinsics, check_shape
from hand3d_dataset.cameras import pixel_index, project

__all__ = [
    "ESTIMATES",
    "ScaleResult",
    "ObjectLocation",
    "LocalizationConfig",
    "sample_pointmap",
    "calibrate_scale",
    "localize_object",
    "localize_objects",
]


@dataclass(frozen=True)
class ScaleResult:
    """Outcome of scale calibration; `scale` is None (never NaN) when it could not be estimated."""

    scale: float | None  # metric / cloud units, multiply the pointmap by it; None when |Ω| < min_valid
    num_valid: int  # |Ω|: joints that contributed a ratio
    reason: str | None  # why there is no scale; None when there is one


@dataclass(frozen=True)
class ObjectLocation:
    """Outcome of object localisation; `xyz` is None (never NaN) when the box gives no position."""

    xyz: np.ndarray | None  # (3,) object position (centre or visible surface, see config), camera frame
    num_pixels: int  # pixels whose points entered the final median
    reason: str | None  # why there is no position; None when there is one
    depth_offset: float = 0.0  # how far xyz lies behind the visible surface along its ray (0 for "surface")


ESTIMATES = ("centre", "surface")  # LocalizationConfig.estimate: what point of the object is returned


@dataclass(frozen=True)
class LocalizationConfig:
    """Knobs of `localize_object`; defaults suit detector boxes around table-top objects."""

    inner_fraction: float = 0.5  # keep the central part of the box (per side) to drop background corners
    min_pixels: int = 5  # fewer finite points than this in the selection: no position
    bin_fraction: float = 0.01  # depth-histogram bin width as a fraction of the median depth (scale-free)
    seed_fraction: float = (
        0.4  # central part of the inner box (per side) whose median depth seeds the cluster
    )
    floor_fraction: float = 0.2  # the chosen cluster extends while the density stays above this x peak
    max_bins: int = 2048  # depths beyond this many bins share the last bin (outliers far behind)
    estimate: str = "centre"  # "centre": volumetric centre (surface + shell depth); "surface": visible face
    shell_quantile: float = 0.05  # shell thickness = range between this quantile and 1 - it (thinnest axis)

    def __post_init__(self) -> None:
        if not (0.0 < self.inner_fraction <= 1.0):
            raise ValueError(f"inner_fraction: expected a value in (0, 1], got {self.inner_fraction}")
        if self.min_pixels < 1:
            raise ValueError(f"min_pixels: expected >= 1, got {self.min_pixels}")
        if not (0.0 < self.bin_fraction < 1.0):
            raise ValueError(f"bin_fraction: expected a value in (0, 1), got {self.bin_fraction}")
        if not (0.0 < self.seed_fraction <= 1.0):
            raise ValueError(f"seed_fraction: expected a value in (0, 1], got {self.seed_fraction}")
        if not (0.0 <= self.floor_fraction < 1.0):
            raise ValueError(f"floor_fraction: expected a value in [0, 1), got {self.floor_fraction}")
        if self.max_bins < 8:
            raise ValueError(f"max_bins: expected >= 8, got {self.max_bins}")
        if self.estimate not in ESTIMATES:
            raise ValueError(f"estimate: expected one of {ESTIMATES}, got {self.estimate!r}")
        if not (0.0 <= self.shell_quantile < 0.5):
            raise ValueError(f"shell_quantile: expected a value in [0, 0.5), got {self.shell_quantile}")


def _check_pointmap(pointmap, batched: bool = False) -> np.ndarray:
    """Shape/dtype check only: values are validated where they are read, not over all H·W pixels."""
    if hasattr(pointmap, "detach") and hasattr(pointmap, "cpu"):
        pointmap = pointmap.detach().cpu().numpy()
    pm = np.asarray(pointmap)
    ok_ndim = pm.ndim in (3, 4) if batched else pm.ndim == 3
    if not ok_ndim or pm.shape[-1] != 3 or pm.shape[-2] == 0 or pm.shape[-3] == 0:
        want = "(H, W, 3) or (T, H, W, 3)" if batched else "(H, W, 3)"
        raise ValueError(f"pointmap: expected shape {want}, got {tuple(pm.shape)}")
    if pm.dtype.kind != "f":
        raise ValueError(f"pointmap: expected a floating-point array, got dtype {pm.dtype}")
    return pm


def _check_scale(scale: float) -> float:
    if scale is None or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite number > 0, got {scale}")
    return float(scale)


def sample_pointmap(pointmap, uv) -> np.ndarray:
    """Nearest-pixel lookup of a pointmap at sub-pixel positions.

    pointmap: (H, W, 3) float; uv: (..., 2) pixels (NaN allowed).
    Returns (..., 3): the point at the nearest pixel centre, NaN where uv is outside the image
    (or NaN). Only the looked-up pixels are read.
    """
    pm = _check_pointmap(pointmap)
    rows, cols, inside = pixel_index(uv, pm.shape[:2])
    out = pm[rows, cols].astype(np.float64)
    out[~inside] = np.nan
    return out


def calibrate_scale(joints_cam, pointmap, K, *, joint_valid=None, min_valid: int = 3) -> ScaleResult:
    """Scale s that brings the cloud to metric: ``s = median_{k∈Ω}(z_joint_k / z_cloud_k)``.

    joints_cam: (..., J, 3) metric joints in the camera frame. With one pointmap (H, W, 3), any
    leading dims are pooled (e.g. both hands (2, 21, 3)); with a clip of pointmaps (T, H, W, 3)
    sharing one scale, joints are (T, ..., J, 3) and all frames are pooled. For one scale per frame,
    call once per frame.
    pointmap: (H, W, 3) or (T, H, W, 3), camera frame of the same camera, in the cloud's own units.
    K: (3, 3) or (T, 3, 3), intrinsics of the pointmap's pixel grid (use `resize_intrinsics` when the
    estimator ran at another resolution than the annotation).
    joint_valid: optional (..., J) bool, the dataset's own validity flags (e.g. InterHand
    `joint_valid`); joints behind the camera or outside the image are dropped automatically.
    min_valid: the smallest |Ω| that yields a scale.
    Returns ScaleResult(scale, num_valid, reason); scale is None with a reason when |Ω| < min_valid.
    """
    if isinstance(min_valid, bool) or not isinstance(min_valid, (int, np.integer)) or min_valid < 1:
        raise ValueError(f"min_valid: expected an integer >= 1, got {min_valid!r}")
    pm = _check_pointmap(pointmap, batched=True)
    joints = check_shape("joints_cam", as_array("joints_cam", joints_cam), (None, 3))
    if joint_valid is None:
        valid = np.ones(joints.shape[:-1], dtype=bool)
    else:
        valid = np.asarray(joint_valid)
        if valid.ndim == joints.ndim and valid.shape[-1] == 1:
            valid = valid[..., 0]  # datasets store flags as (J, 1)
        if valid.shape != joints.shape[:-1]:
            raise ValueError(f"joint_valid: expected shape {joints.shape[:-1]}, got {tuple(valid.shape)}")
        valid = valid.astype(bool)

    if pm.ndim == 4:
        t = pm.shape[0]
        if joints.ndim < 3 or joints.shape[0] != t:
            raise ValueError(
                f"joints_cam: with pointmap of {t} frames expected shape ({t}, ..., J, 3), got {joints.shape}"
            )
        joints = joints.reshape(t, -1, 3)
        valid = valid.reshape(t, -1)
        frame = np.broadcast_to(np.arange(t)[:, None], valid.shape)
    else:
        joints = joints.reshape(-1, 3)
        valid = valid.reshape(-1)
        frame = None

    K = check_intrinsics("K", K)
    if K.shape not in ((3, 3), pm.shape[:1] + (3, 3)):
        want = "(3, 3)" if pm.ndim == 3 else f"(3, 3) or ({pm.shape[0]}, 3, 3)"
        raise ValueError(f"K: expected shape {want} for pointmap of shape {pm.shape}, got {K.shape}")
    uv, _ = project(joints, K)  # K (T, 3, 3) lines up with joints (T, M, 3)
    rows, cols, inside = pixel_index(uv, pm.shape[-3:-1])
    cloud = pm[frame, rows, cols] if frame is not None else pm[rows, cols]
    z_cloud = cloud[..., 2].astype(np.float64)
    n_seen = int(np.count_nonzero(valid & inside))
    with np.errstate(invalid="ignore"):  # NaN z_cloud compares False, which is what Ω needs
        omega = valid & inside & np.isfinite(z_cloud) & (z_cloud > 0)
    n = int(np.count_nonzero(omega))
    if n < min_valid:
        reason = (
            f"only {n} valid joint(s) (< min_valid={min_valid}): {n_seen} of {valid.size} joints are "
            f"flagged valid and visible, {n_seen - n} of those have no finite positive cloud depth"
        )
        return ScaleResult(scale=None, num_valid=n, reason=reason)
    ratios = joints[..., 2][omega] / z_cloud[omega]
    return ScaleResult(scale=float(np.median(ratios)), num_valid=n, reason=None)


def _depth_cluster(z: np.ndarray, seed_z: float, cfg: LocalizationConfig) -> np.ndarray:
    """Mask of the points in the depth cluster that contains `seed_z`.

    z: (N,) positive finite depths; seed_z: depth at the box centre. A histogram with bins of
    `bin_fraction` x seed depth is smoothed with a [1, 2, 1] kernel; from the seed's bin we climb to
    the local density peak (1D mean shift), then grow the cluster on both sides while the density stays
    above `floor_fraction` of that peak. Flying pixels spread thinly between the object and the
    background, so they fall below the floor; background further back is a separate hill.
    """
    width = cfg.bin_fraction * seed_z
    z0 = float(z.min())
    idx = np.minimum(((z - z0) / width).astype(np.int64), cfg.max_bins - 1)
    hist = np.bincount(idx).astype(np.float64)
    padded = np.concatenate([[0.0], hist, [0.0]])
    smooth = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    n = smooth.size
    peak = int(
        idx[np.argmin(np.abs(z - seed_z))]
    )  # the seed's bin is non-empty even if seed_z is not a sample
    while True:
        left = smooth[peak - 1] if peak > 0 else -1.0
        right = smooth[peak + 1] if peak < n - 1 else -1.0
        if max(left, right) <= smooth[peak]:
            break
        peak = peak - 1 if left > right else peak + 1
    below = np.flatnonzero(smooth <= cfg.floor_fraction * smooth[peak])
    k = np.searchsorted(below, peak)  # below[k - 1] < peak < below[k]; peak itself is above the floor
    lo = below[k - 1] + 1 if k > 0 else 0
    hi = below[k] - 1 if k < below.size else n - 1
    return (idx >= lo) & (idx <= hi)


def _shell_depth(
    pts: np.ndarray, rows: np.ndarray, cols: np.ndarray, box_width_px: float, z_surface: float, q: float
) -> float:
    """How far the object's centre lies behind its visible surface, along the viewing ray (cloud units).

    pts: (N, 3) the object's depth cluster over the whole box (camera frame, cloud units); rows, cols:
    (N,) their pixels; box_width_px: the box's width; z_surface: depth of the visible-surface centre.

    The visible part of a convex object is a shell: its front. Its thickness along its thinnest
    direction (the smallest principal axis of the points, between quantiles q and 1 − q, so stray
    flying pixels do not count) measures how deep the object reaches behind its front face:
    - a sphere of radius r shows a cap reaching from its front point back to its rim, which lies at
      the centre's depth (minus r²/d for a camera at distance d): thickness r, the exact offset. The
      quantiles cut it: pixel-uniform cap points lie r·sqrt(1 − u) behind the front (u uniform), so
      the 5–95 % range is 0.75 r and a sphere's centre comes out ~r/4–r/3 short. Not corrected on
      purpose: stretching the range by 1/0.75 moves upright cylinders and boxes (the common objects)
      too far back (measured on `synth`: median error 1.3 cm against 1.1 cm);
    - a flat face (a plate or a book seen from above, a box side facing the camera) shows a plane:
      thickness ~0, and the offset stays small, which is right for thin objects and errs short (never
      long) for a box's face;
    - an upright cylinder or box seen obliquely shows its top and its front side: the shell's
      thinnest extent is about its radius, close to the true offset (measured on `synth`: median error
      ~1 cm against ~3 cm for the surface, benchmarks/bench_object_centre.py).
    The offset is capped by the box's metric half-width: a roughly compact object reaches no deeper
    behind its front than half its width, and a shell thickened by table pixels around a base or by a
    hand's pixels cannot push the estimate through the object. The metric width is the box's width in
    pixels times the cloud's ray spacing per pixel (the slope of x/z against the column, read from the
    cloud itself, so no intrinsics are needed) times the surface depth.
    Fewer than 4 points, or points on one line, give 0 (the surface).
    """
    if len(pts) < 4:
        return 0.0
    centred = pts - pts.mean(axis=0)
    _, vecs = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues: column 0 is the thinnest axis
    proj = centred @ vecs[:, 0]
    lo, hi = np.quantile(proj, [q, 1.0 - q])
    thickness = float(hi - lo)
    # ray spacing per pixel: least-squares slope of x/z against the column (rows if one column)
    for idx, coord in ((cols, pts[:, 0] / pts[:, 2]), (rows, pts[:, 1] / pts[:, 2])):
        d = idx - idx.mean()
        if float(d @ d) > 0:
            per_px = abs(float(d @ (coord - coord.mean())) / float(d @ d))
            return min(thickness, 0.5 * box_width_px * per_px * z_surface)
    return 0.0


def localize_object(
    box_xyxy, pointmap, *, scale: float = 1.0, config: LocalizationConfig | None = None
) -> ObjectLocation:
    """3D position of an object from its 2D box and a pointmap.

    box_xyxy: (4,) (x0, y0, x1, y1) pixels in the integer-centre convention of `cameras.py`; a pixel
    belongs to the box when its centre (j, i) satisfies x0 ≤ j < x1, y0 ≤ i < y1.
    pointmap: (H, W, 3) camera frame, cloud units; scale: multiplies the result (pass the
    `ScaleResult.scale`, so the full pointmap never has to be rescaled).
    Returns ObjectLocation(xyz (3,), num_pixels, reason).

    Steps, each against a known failure of reading depth in a box: (1) clip the box to the image; (2) keep its
    central `inner_fraction` per side, since box corners are mostly table and background; (3) keep
    finite points with z > 0; (4) keep the depth cluster of the box centre (`_depth_cluster`, seeded by
    the median depth of the central `seed_fraction` of the inner box): flying pixels at depth edges
    are sparse in depth, and the background is a separate cluster. Not "the nearest cluster": the
    table in front of an object's base and a hand holding the object are nearer than the object;
    (5) medians, not means (leftover flying pixels are outliers): the direction is the median ray
    (x/z, y/z) of the cluster, the depth the median z of the cluster's points in the central patch.
    That point is the visible-surface centre: the point of the object's visible surface on the
    viewing ray through its image centre (for a sphere, its point nearest the camera). It lies in
    front of the object's volumetric centre by about half the object's depth extent (the radius, for a
    sphere); `estimate="surface"` returns it as is.
    `num_pixels` is the size of the depth cluster.
    With `estimate="centre"` (the default), the visible-surface point is then pushed back along its
    viewing ray by the depth of the object behind its front (`_shell_depth`, read from the depth cluster
    of the whole box, seeded like step (4)): `depth_offset` says by how much (metres after scaling).
    Zero-area or inverted boxes, boxes outside the image, and boxes without enough finite points give
    xyz=None with a reason; a non-finite box or a wrong shape raises ValueError.
    """
    cfg = config or LocalizationConfig()
    scale = _check_scale(scale)
    pm = _check_pointmap(pointmap)
    box = check_shape("box_xyxy", as_array("box_xyxy", box_xyxy), (4,))
    if box.ndim != 1:
        raise ValueError(f"box_xyxy: expected shape (4,), got {tuple(box.shape)}; use localize_objects")
    h, w = pm.shape[:2]
    x0, y0, x1, y1 = (float(b) for b in box)
    if not (x1 > x0 and y1 > y0):
        return ObjectLocation(None, 0, f"degenerate box {box.tolist()}: zero or negative area")
    x0, x1 = max(x0, -0.5), min(x1, w - 0.5)
    y0, y1 = max(y0, -0.5), min(y1, h - 0.5)
    if not (x1 > x0 and y1 > y0):
        return ObjectLocation(None, 0, f"box {box.tolist()} lies outside the {h}x{w} image")

    def inner_range(a: float, b: float, n: int) -> tuple[int, int]:
        mid, half = 0.5 * (a + b), 0.5 * (b - a) * cfg.inner_fraction
        lo, hi = math.ceil(mid - half), math.ceil(mid + half)  # centres in [mid - half, mid + half)
        if hi <= lo:  # thinner than a pixel: take the pixel under the box centre
            lo = math.floor(mid + 0.5)
            hi = lo + 1
        return max(lo, 0), min(hi, n)

    j0, j1 = inner_range(x0, x1, w)
    i0, i1 = inner_range(y0, y1, h)
    crop = pm[i0:i1, j0:j1]  # (h', w', 3) view: only the inner box is ever read
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(crop).all(axis=-1) & (crop[..., 2] > 0)
    pts = crop[ok].astype(np.float64)
    if len(pts) < cfg.min_pixels:
        return ObjectLocation(
            None,
            len(pts),
            f"only {len(pts)} finite point(s) with z > 0 in the inner box (< min_pixels={cfg.min_pixels})",
        )
    # seed depth: median over the central patch, which an object centred in its box covers
    hh, ww = ok.shape
    si, sj = max(round(hh * cfg.seed_fraction), 1), max(round(ww * cfg.seed_fraction), 1)
    ci, cj = (hh - si) // 2, (ww - sj) // 2
    central = np.zeros_like(ok)
    central[ci : ci + si, cj : cj + sj] = True
    central = central[ok]  # (N,) aligned with pts
    seed_z = float(np.median(pts[central, 2] if central.any() else pts[:, 2]))
    keep = _depth_cluster(pts[:, 2], seed_z, cfg)
    pts, central = pts[keep], central[keep]
    if len(pts) < cfg.min_pixels:
        return ObjectLocation(
            None, len(pts), f"only {len(pts)} point(s) in the object's depth cluster (< {cfg.min_pixels})"
        )
    # direction: median ray over the whole cluster; depth: median over its central part only, since
    # the visible surface curves away from the camera: its overall median sits ~r/4 deeper (sphere)
    z_c = float(np.median(pts[central, 2] if central.any() else pts[:, 2]))
    xn, yn = np.median(pts[:, :2] / pts[:, 2:], axis=0)
    surface = np.array([xn * z_c, yn * z_c, z_c])
    if cfg.estimate == "surface":
        return ObjectLocation(surface * scale, len(pts), None)
    # the whole box this time: the shell's rim lies outside the inner box that was enough for the face
    fj0, fj1 = max(math.ceil(x0), 0), min(math.ceil(x1), w)
    fi0, fi1 = max(math.ceil(y0), 0), min(math.ceil(y1), h)
    full = pm[fi0:fi1, fj0:fj1]
    with np.errstate(invalid="ignore"):
        ok_full = np.isfinite(full).all(axis=-1) & (full[..., 2] > 0)
    rr, cc = np.nonzero(ok_full)
    shell = full[ok_full].astype(np.float64)
    offset = 0.0
    if len(shell) >= 4:  # a sub-pixel box has no full-box pixels: its one point is all there is
        keep = _depth_cluster(shell[:, 2], seed_z, cfg)
        offset = _shell_depth(shell[keep], rr[keep], cc[keep], x1 - x0, z_c, cfg.shell_quantile)
    centre = surface * (1.0 + offset / float(np.linalg.norm(surface)))
    return ObjectLocation(centre * scale, len(pts), None, depth_offset=offset * scale)


def localize_objects(
    boxes_xyxy, pointmap, *, scale: float = 1.0, config: LocalizationConfig | None = None
) -> list[ObjectLocation]:
    """`localize_object` for several boxes of one frame: boxes_xyxy (B, 4) → B results."""
    boxes = check_shape("boxes_xyxy", as_array("boxes_xyxy", boxes_xyxy), (4,))
    if boxes.ndim != 2:
        raise ValueError(f"boxes_xyxy: expected shape (B, 4), got {tuple(boxes.shape)}")
    return [localize_object(b, pointmap, scale=scale, config=config) for b in boxes]
