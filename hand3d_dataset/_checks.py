"""Argument checks shared by the geometry modules.

Every public geometry function validates its inputs with these helpers so that bad input raises a
`ValueError` naming the argument and what was seen, instead of returning a silently wrong number.

    >>> import numpy as np
    >>> from hand3d_dataset._checks import as_array, check_shape
    >>> x = check_shape("points", as_array("points", np.zeros((4, 3))), (None, 3))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def as_array(name: str, x, dtype=np.float64, finite: bool = True) -> np.ndarray:
    """Converts `x` to a numpy array of `dtype`; with `finite`, refuses NaN and inf.

    Torch tensors are accepted (detached and moved to CPU).
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected an array of numbers, got {type(x).__name__} ({e})") from e
    if finite and arr.size and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name}: contains {bad} non-finite value(s) (NaN or inf); clean or mask them first")
    return arr


def check_shape(name: str, arr: np.ndarray, trailing: Sequence[int | None]) -> np.ndarray:
    """Checks that the last dims of `arr` equal `trailing` (None matches any size).

    `arr` may carry any number of leading batch dims.
    """
    trailing = tuple(trailing)
    if arr.ndim < len(trailing) or any(
        t is not None and s != t for s, t in zip(arr.shape[arr.ndim - len(trailing) :], trailing)
    ):
        want = "(..., " + ", ".join("*" if t is None else str(t) for t in trailing) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(arr.shape)}")
    return arr


def check_intrinsics(name: str, K) -> np.ndarray:
    """Validates camera intrinsics of shape (..., 3, 3): finite, fx, fy > 0, last row (0, 0, 1)."""
    K = check_shape(name, as_array(name, K), (3, 3))
    if np.any(K[..., 0, 0] <= 0) or np.any(K[..., 1, 1] <= 0):
        raise ValueError(f"{name}: focal lengths must be > 0, got fx={K[..., 0, 0]}, fy={K[..., 1, 1]}")
    if not np.allclose(K[..., 2, :], [0.0, 0.0, 1.0]) or np.any(K[..., 1, 0] != 0):
        raise ValueError(f"{name}: not an upper-triangular intrinsics matrix with last row (0, 0, 1): {K}")
    return K


def check_rotation(name: str, R, atol: float = 1e-5) -> np.ndarray:
    """Validates rotation matrices of shape (..., 3, 3): orthonormal with determinant +1."""
    R = check_shape(name, as_array(name, R), (3, 3))
    err = np.abs(np.einsum("...ji,...jk->...ik", R, R) - np.eye(3)).max(initial=0.0)
    if err > atol:
        raise ValueError(
            f"{name}: not orthonormal (max |R^T R - I| = {err:.3g} > {atol}); pass a rotation matrix"
        )
    det = np.linalg.det(R)
    if np.any(det < 0):
        raise ValueError(f"{name}: determinant {det.min():.3g} < 0 (a reflection, not a rotation)")
    return R
