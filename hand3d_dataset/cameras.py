"""Pinhole cameras for the Hand3D pipeline: world → camera → pixels, visibility, intrinsics under
resize/crop, and back-projection of a depth map to a pointmap.

    >>> import numpy as np
    >>> from hand3d_dataset.cameras import intrinsics_matrix, project, in_image
    >>> K = intrinsics_matrix(focal=(500.0, 500.0), principal_point=(319.5, 239.5))
    >>> uv, in_front = project(np.array([[0.1, -0.05, 1.0], [0.0, 0.0, -1.0]]), K)
    >>> in_image(uv, image_hw=(480, 640)).tolist()
    [True, False]

Conventions (DESIGN.md §2), used by every function here and by `calibration.py`:

- Camera frame: OpenCV (x right, y down, z forward), metres. World → camera: ``x_c = R x_w + t``.
- Projection: ``(u, v) = (fx x/z + s y/z + cx, fy y/z + cy)`` with K = [[fx, s, cx], [0, fy, cy], [0, 0, 1]]
  (the skew s is 0 for every dataset we read, but K with skew is handled consistently).
- Pixel centres at integer coordinates (the OpenCV convention): the pixel in row i, column j of an
  (H, W) image is centred at (u, v) = (j, i) and covers [j − ½, j + ½) × [i − ½, i + ½). So the image
  spans u ∈ [−½, W − ½), v ∈ [−½, H − ½); the nearest pixel of (u, v) is (floor(v + ½), floor(u + ½));
  back-projection casts rays through (j, i); resizing maps u to (u + ½)·W'/W − ½. Datasets that
  put pixel centres at j + ½ (e.g. COLMAP) need cx − ½, cy − ½ when read.
- Points behind the camera (z ≤ 0) have no pixel: `project` returns NaN for them together with an
  `in_front` mask, so a wrong pixel can never be used by accident (NaN fails every comparison, and
  `in_image` / `pixel_index` report such points as outside). Non-finite inputs raise `ValueError`.

Arrays are numpy, float64 on output; torch tensors are accepted as input (converted to numpy).
"""

from __future__ import annotations

import math

import numpy as np

from hand3d_dataset._checks import as_array, check_intrinsics, check_rotation, check_shape

__all__ = [
    "intrinsics_matrix",
    "world_to_camera",
    "camera_to_world",
    "project",
    "in_image",
    "visibility",
    "pixel_index",
    "resize_intrinsics",
    "crop_intrinsics",
    "backproject_depth",
]


def _check_image_hw(name: str, image_hw) -> tuple[int, int]:
    """Validates an image size given as (height, width) positive integers."""
    try:
        h, w = image_hw
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected (height, width), got {image_hw!r}") from e
    if isinstance(h, float) and h.is_integer():
        h = int(h)
    if isinstance(w, float) and w.is_integer():
        w = int(w)
    if not (isinstance(h, (int, np.integer)) and isinstance(w, (int, np.integer))) or h <= 0 or w <= 0:
        raise ValueError(f"{name}: expected positive integer (height, width), got {image_hw!r}")
    return int(h), int(w)


def intrinsics_matrix(focal, principal_point, skew: float = 0.0) -> np.ndarray:
    """Builds K from focal lengths and principal point, in pixels.

    focal: (..., 2) (fx, fy); principal_point: (..., 2) (cx, cy) in the integer-centre convention.
    Returns K: (..., 3, 3).
    """
    f = check_shape("focal", as_array("focal", focal), (2,))
    c = check_shape("principal_point", as_array("principal_point", principal_point), (2,))
    lead = np.broadcast_shapes(f.shape[:-1], c.shape[:-1])
    K = np.zeros(lead + (3, 3))
    K[..., 0, 0], K[..., 1, 1] = f[..., 0], f[..., 1]
    K[..., 0, 1] = skew
    K[..., 0, 2], K[..., 1, 2] = c[..., 0], c[..., 1]
    K[..., 2, 2] = 1.0
    return check_intrinsics("focal/principal_point", K)


def world_to_camera(points_world, R, t) -> np.ndarray:
    """``x_c = R x_w + t``.

    points_world: (..., N, 3) world frame; R: (..., 3, 3) rotation; t: (..., 3) translation (same
    units as the points). Leading dims broadcast (e.g. joints (T, 21, 3) with R (T, 3, 3), t (T, 3)).
    Returns (..., N, 3) in the camera frame.
    """
    p = check_shape("points_world", as_array("points_world", points_world), (None, 3))
    R = check_rotation("R", R)
    t = check_shape("t", as_array("t", t), (3,))
    return p @ np.swapaxes(R, -1, -2) + t[..., None, :]


def camera_to_world(points_cam, R, t) -> np.ndarray:
    """Inverse of `world_to_camera`: ``x_w = Rᵀ (x_c − t)``; shapes as there."""
    p = check_shape("points_cam", as_array("points_cam", points_cam), (None, 3))
    R = check_rotation("R", R)
    t = check_shape("t", as_array("t", t), (3,))
    return (p - t[..., None, :]) @ R


def project(points_cam, K) -> tuple[np.ndarray, np.ndarray]:
    """Pinhole projection ``(u, v) = (fx x/z + s y/z + cx, fy y/z + cy)``.

    points_cam: (..., N, 3) camera frame; K: (..., 3, 3), leading dims broadcast with the points'.
    Returns uv: (..., N, 2) pixels (NaN where z ≤ 0) and in_front: (..., N) bool (z > 0).
    Points behind the camera are not an error (a hand can leave an egocentric view), but they have
    no pixel: use `in_front` (or `in_image`, which is False for them) before reading uv.
    """
    p = check_shape("points_cam", as_array("points_cam", points_cam), (None, 3))
    K = check_intrinsics("K", K)
    z = p[..., 2]
    in_front = z > 0
    # divide by 1 where z <= 0, then overwrite with NaN: no warnings and no finite garbage pixels
    inv_z = 1.0 / np.where(in_front, z, 1.0)
    xn, yn = p[..., 0] * inv_z, p[..., 1] * inv_z
    Kb = K[..., None, :, :]  # (..., 1, 3, 3) so K's leading dims line up with the points' leading dims
    u = Kb[..., 0, 0] * xn + Kb[..., 0, 1] * yn + Kb[..., 0, 2]
    v = Kb[..., 1, 1] * yn + Kb[..., 1, 2]
    uv = np.stack([u, v], axis=-1)
    uv[~in_front] = np.nan
    return uv, in_front


def in_image(uv, image_hw: tuple[int, int]) -> np.ndarray:
    """True where the pixel lies inside the image: u ∈ [−½, W − ½), v ∈ [−½, H − ½).

    uv: (..., 2) pixels, NaN allowed (NaN counts as outside, e.g. points behind the camera);
    image_hw: (height, width). Returns (...) bool.
    """
    h, w = _check_image_hw("image_hw", image_hw)
    uv = check_shape("uv", as_array("uv", uv, finite=False), (2,))
    if np.isinf(uv).any():
        raise ValueError("uv: contains inf; points behind the camera should be NaN (see project)")
    u, v = uv[..., 0], uv[..., 1]
    return (u >= -0.5) & (u < w - 0.5) & (v >= -0.5) & (v < h - 0.5)


def visibility(points_cam, K, image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Projects and tests visibility in one call: in front of the camera (z > 0) and inside the image.

    points_cam: (..., N, 3); K: (..., 3, 3); image_hw: (height, width).
    Returns uv: (..., N, 2) (NaN behind the camera) and visible: (..., N) bool.
    Occlusion is not modelled: a joint hidden behind an object still counts as visible here.
    """
    uv, _ = project(points_cam, K)
    return uv, in_image(uv, image_hw)


def pixel_index(uv, image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest pixel of each uv: row ``floor(v + ½)``, column ``floor(u + ½)``.

    uv: (..., 2), NaN allowed; image_hw: (height, width).
    Returns rows, cols: (...) int64 (0 where outside, so they are always safe to index with) and
    inside: (...) bool, which the caller must apply to whatever it reads.
    """
    inside = in_image(uv, image_hw)
    uv = np.asarray(uv, dtype=np.float64)
    safe = np.where(inside[..., None], uv, 0.0)
    cols = np.floor(safe[..., 0] + 0.5).astype(np.int64)
    rows = np.floor(safe[..., 1] + 0.5).astype(np.int64)
    return rows, cols, inside


def resize_intrinsics(K, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> np.ndarray:
    """Intrinsics of the same camera after resizing the image from old_hw to new_hw (height, width).

    With pixel centres at integers, a pixel coordinate maps as u' = (u + ½)·sx − ½ (sx = W'/W), so
    fx' = sx·fx, s' = sx·s, cx' = (cx + ½)·sx − ½ (and likewise for y). K: (..., 3, 3) → (..., 3, 3).
    """
    K = check_intrinsics("K", K)
    h0, w0 = _check_image_hw("old_hw", old_hw)
    h1, w1 = _check_image_hw("new_hw", new_hw)
    sx, sy = w1 / w0, h1 / h0
    out = K.copy()
    out[..., 0, 0] *= sx
    out[..., 0, 1] *= sx
    out[..., 0, 2] = (K[..., 0, 2] + 0.5) * sx - 0.5
    out[..., 1, 1] *= sy
    out[..., 1, 2] = (K[..., 1, 2] + 0.5) * sy - 0.5
    return out


def crop_intrinsics(K, x0: float, y0: float) -> np.ndarray:
    """Intrinsics after cropping the image so that old pixel (row y0, column x0) becomes pixel (0, 0).

    For a crop ``image[y0:y1, x0:x1]`` pass its integer start; K: (..., 3, 3) → (..., 3, 3).
    """
    K = check_intrinsics("K", K)
    if not (math.isfinite(x0) and math.isfinite(y0)):
        raise ValueError(f"x0/y0: crop offsets must be finite, got ({x0}, {y0})")
    out = K.copy()
    out[..., 0, 2] -= x0
    out[..., 1, 2] -= y0
    return out


def backproject_depth(depth, K) -> np.ndarray:
    """Pointmap of a depth map: the ray through each pixel centre (j, i) scaled to its z-depth.

    depth: (..., H, W) z-depth (not ray length) along the optical axis, e.g. metres; K: (..., 3, 3),
    leading dims broadcast with depth's. Returns pointmap: (..., H, W, 3) in the camera frame.
    Holes in the depth map (NaN, inf or ≤ 0, as sensors and estimators produce) become NaN points
    rather than an error: downstream code (scale calibration, localisation) skips them.
    """
    d = as_array("depth", depth, finite=False)
    if d.ndim < 2:
        raise ValueError(f"depth: expected shape (..., H, W), got {tuple(d.shape)}")
    K = check_intrinsics("K", K)
    h, w = d.shape[-2:]
    valid = np.isfinite(d) & (d > 0)
    z = np.where(valid, d, np.nan)
    Kb = K[..., None, None, :, :]  # (..., 1, 1, 3, 3) against the (..., H, W) grid
    fx, s, cx = Kb[..., 0, 0], Kb[..., 0, 1], Kb[..., 0, 2]
    fy, cy = Kb[..., 1, 1], Kb[..., 1, 2]
    v = np.arange(h, dtype=np.float64)[:, None]
    u = np.arange(w, dtype=np.float64)[None, :]
    yn = (v - cy) / fy
    xn = (u - cx - s * yn) / fx
    xn, yn, z = np.broadcast_arrays(xn, yn, z)
    return np.stack([xn * z, yn * z, z], axis=-1)
