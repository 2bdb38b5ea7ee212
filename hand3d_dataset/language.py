"""Spatial language: displacements and camera motions in the words of Hand3D (paper §3.2.1).

A displacement `v` (camera frame of the reference frame, metres) becomes per-axis direction labels
plus its length; a pair of camera poses becomes an axis-angle rotation in words plus a translation.

    >>> import numpy as np
    >>> from hand3d_dataset.language import describe_displacement, relative_camera_motion
    >>> describe_displacement([-0.3, 0.2, 0.2]).text
    'left and down and forward, 0.41 m'
    >>> c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    >>> R2 = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])  # rows: camera-2 axes in camera-1 coordinates
    >>> relative_camera_motion(np.eye(3), np.zeros(3), R2, np.zeros(3)).text
    'turn left, 10.0 degrees'

Conventions (DESIGN.md §2; OpenCV camera: x right, y down, z forward):

- Direction labels. With `v̂ = v / |v|`, axis x reads `right` (+) / `left` (−), axis y reads `down` (+) /
  `up` (−) because image up is −y, axis z reads `forward` (+, away from the camera) / `backward`
  (−, towards the camera). An axis gets a label only where `|v̂_axis| > gamma` (strictly).
- Camera motion. Poses are world→camera, `x_c = R_i x_w + t_i`, so the camera centre is
  `c_i = −R_iᵀ t_i`. Camera 2 expressed in camera 1's frame is the rotation `R_12 = R_1 R_2ᵀ` (its
  columns are camera 2's axes in camera-1 coordinates) and the translation `R_1 (c_2 − c_1)`.
  The axis-angle of `R_12` (right-hand rule, axis in camera-1 coordinates) is read as:
  * yaw, about y: a positive rotation about the camera's up axis (−y) swings forward (+z) toward −x,
    so `rotvec_y < 0` is `turn left` and `rotvec_y > 0` is `turn right`;
  * pitch, about x: a positive rotation about +x swings forward toward −y (image up), so
    `rotvec_x > 0` is `tilt up` and `rotvec_x < 0` is `tilt down`;
  * roll, about z: clockwise is defined as seen from behind the camera, looking forward (the way the
    image is viewed). A positive rotation about +z (pointing away from that viewer) swings right (+x)
    toward down (+y), which on the image plane is clockwise, so `rotvec_z > 0` is `roll clockwise`.
    The scene content in the image then turns counterclockwise.
  The words come from the component of the axis-angle vector with the largest magnitude; the
  degrees are the total rotation angle `phi = |rotvec|` (the paper's "rotation degree").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import as_array, check_rotation

AXES: tuple[str, str, str] = ("x", "y", "z")
# (label for a positive component, label for a negative component), camera frame, OpenCV axes.
AXIS_LABELS: dict[str, tuple[str, str]] = {
    "x": ("right", "left"),
    "y": ("down", "up"),
    "z": ("forward", "backward"),
}
# Reverse look-up: label -> axis.
LABEL_AXIS: dict[str, str] = {lab: ax for ax, pair in AXIS_LABELS.items() for lab in pair}
# (words for a positive axis-angle component, words for a negative one); see the module docstring.
ROTATION_LABELS: dict[str, tuple[str, str]] = {
    "x": ("tilt up", "tilt down"),
    "y": ("turn right", "turn left"),
    "z": ("roll clockwise", "roll counterclockwise"),
}
# Reverse look-up: rotation words -> axis.
ROTATION_AXIS: dict[str, str] = {lab: ax for ax, pair in ROTATION_LABELS.items() for lab in pair}
NO_MOVEMENT_TEXT = "no significant movement"
NO_ROTATION_TEXT = "no significant rotation"
DEFAULT_GAMMA = 0.3
# Vectors shorter than this (metres) have no direction; one nanometre is far below any annotation noise.
ZERO_LENGTH_M = 1e-9
DISTANCE_DECIMALS = 2
ANGLE_DECIMALS = 1


@dataclass(frozen=True)
class DisplacementDescription:
    """A displacement in Hand3D language.

    labels: axis ("x", "y", "z") -> label from `AXIS_LABELS`, or None where `|v̂_axis| <= gamma`
    distance_m: Euclidean length |v|, metres
    text: canonical answer, e.g. "left and down and forward, 0.44 m" or "no significant movement"
    unit_vector: (3,) float, v / |v|; zeros for a (near-)zero vector, whose direction is undefined
    """

    labels: dict[str, str | None]
    distance_m: float
    text: str
    unit_vector: np.ndarray


@dataclass(frozen=True)
class CameraMotion:
    """Motion of camera 2 relative to camera 1, expressed in camera 1's frame.

    axis: (3,) unit rotation axis in camera-1 coordinates; zeros when the angle is 0
    angle_deg: total rotation angle phi = |rotvec|, degrees, in [0, 180]
    rotvec_deg: (3,) axis-angle vector axis * angle_deg, degrees
    translation_dir: (3,) unit direction of R_1 (c_2 - c_1); zeros when the cameras share a centre
    translation_m: |c_2 - c_1|, metres
    text: rotation in words, e.g. "turn left, 12.4 degrees" or "no significant rotation"
    rotation_label: the words of `text` without the degrees (a `ROTATION_LABELS` entry) or None
    translation: the translation described as a displacement (labels, distance, text)
    """

    axis: np.ndarray
    angle_deg: float
    rotvec_deg: np.ndarray
    translation_dir: np.ndarray
    translation_m: float
    text: str
    rotation_label: str | None
    translation: DisplacementDescription


def _check_gamma(gamma: float) -> float:
    g = float(gamma)
    if not np.isfinite(g) or not 0.0 < g < 1.0:
        raise ValueError(f"gamma: must lie in the open interval (0, 1), got {gamma!r}")
    return g


def _check_vector(name: str, v) -> np.ndarray:
    arr = as_array(name, v)
    if arr.shape != (3,):
        raise ValueError(f"{name}: expected shape (3,), got {tuple(arr.shape)}")
    return arr


def direction_labels(v, gamma: float = DEFAULT_GAMMA) -> dict[str, str | None]:
    """Per-axis direction labels of a displacement.

    v: (3,) float, camera frame (x right, y down, z forward), any unit
    Returns {"x": "right"|"left"|None, "y": "down"|"up"|None, "z": "forward"|"backward"|None}.
    """
    v = _check_vector("v", v)
    gamma = _check_gamma(gamma)
    n = float(np.linalg.norm(v))
    labels: dict[str, str | None] = dict.fromkeys(AXES)
    if n < ZERO_LENGTH_M:
        return labels
    for i, ax in enumerate(AXES):
        c = v[i] / n
        if abs(c) > gamma:
            labels[ax] = AXIS_LABELS[ax][0 if c > 0 else 1]
    return labels


def format_displacement(labels: dict[str, str | None], distance_m: float) -> str:
    """Canonical answer text from labels and a distance: "left and down and forward, 0.44 m".

    Labels are joined in x, y, z order; no label at all gives `NO_MOVEMENT_TEXT`.
    """
    words = []
    for ax in AXES:
        lab = labels.get(ax)
        if lab is None:
            continue
        if lab not in AXIS_LABELS[ax]:
            raise ValueError(
                f"labels: {lab!r} is not a label of axis {ax} (expected one of {AXIS_LABELS[ax]})"
            )
        words.append(lab)
    d = float(distance_m)
    if not np.isfinite(d) or d < 0:
        raise ValueError(f"distance_m: must be finite and >= 0, got {distance_m!r}")
    if not words:
        return NO_MOVEMENT_TEXT
    return f"{' and '.join(words)}, {d:.{DISTANCE_DECIMALS}f} m"


def describe_displacement(
    v, gamma: float = DEFAULT_GAMMA, min_distance_m: float = 0.0
) -> DisplacementDescription:
    """Describes a displacement in words (paper §3.2.1, the direction set D and dist(v) = |v|).

    v: (3,) float, camera frame of the reference frame, metres
    gamma: component threshold on the unit vector, in (0, 1)
    min_distance_m: displacements shorter than this read as `NO_MOVEMENT_TEXT` with no labels
        (0 keeps the paper's rule; QA builders may pass e.g. 0.01 to silence jitter)
    """
    v = _check_vector("v", v)
    gamma = _check_gamma(gamma)
    if not np.isfinite(min_distance_m) or min_distance_m < 0:
        raise ValueError(f"min_distance_m: must be finite and >= 0, got {min_distance_m!r}")
    n = float(np.linalg.norm(v))
    unit = v / n if n >= ZERO_LENGTH_M else np.zeros(3)
    if n < max(min_distance_m, ZERO_LENGTH_M):
        labels: dict[str, str | None] = dict.fromkeys(AXES)
    else:
        labels = direction_labels(v, gamma)
    return DisplacementDescription(labels, n, format_displacement(labels, n), unit)


def rotation_log(R) -> np.ndarray:
    """Axis-angle vector (radians) of a rotation matrix, the inverse of Rodrigues' formula.

    R: (3, 3) rotation matrix. Returns (3,) rotvec with |rotvec| in [0, pi].
    """
    R = check_rotation("R", R)
    if R.shape != (3, 3):
        raise ValueError(f"R: expected shape (3, 3), got {tuple(R.shape)}")
    # w = sin(phi) * axis; atan2 keeps phi accurate at both small angles and near pi.
    w = 0.5 * np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    s = float(np.linalg.norm(w))
    c = float(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))
    phi = float(np.arctan2(s, c))
    if c >= 0.0:
        # phi <= 90 deg: sin(phi) is well conditioned; phi/sin(phi) -> 1 as phi -> 0.
        return w * (phi / s) if s > 1e-15 else w
    # phi > 90 deg: sin(phi) vanishes toward pi, so take the axis from the symmetric part
    # (R + R^T)/2 = cos(phi) I + (1 - cos(phi)) u u^T and its sign from w.
    uu = (0.5 * (R + R.T) - c * np.eye(3)) / (1.0 - c)
    j = int(np.argmax(np.diag(uu)))
    u = uu[:, j] / np.sqrt(max(uu[j, j], 1e-300))
    if float(u @ w) < 0.0:
        u = -u
    return u * phi


def format_rotation(rotvec_deg, min_angle_deg: float = 1.0) -> tuple[str, str | None]:
    """Rotation words and canonical text from an axis-angle vector in degrees (camera frame).

    rotvec_deg: (3,) float, axis * angle, degrees
    Returns (text, label): e.g. ("turn left, 12.4 degrees", "turn left"), or
    (`NO_ROTATION_TEXT`, None) below `min_angle_deg`.
    """
    r = _check_vector("rotvec_deg", rotvec_deg)
    angle = float(np.linalg.norm(r))
    if angle < min_angle_deg or angle == 0.0:
        return NO_ROTATION_TEXT, None
    i = int(np.argmax(np.abs(r)))
    label = ROTATION_LABELS[AXES[i]][0 if r[i] > 0 else 1]
    return f"{label}, {angle:.{ANGLE_DECIMALS}f} degrees", label


def relative_camera_motion(
    R1, t1, R2, t2, gamma: float = DEFAULT_GAMMA, min_angle_deg: float = 1.0
) -> CameraMotion:
    """Relative motion of camera 2 with respect to camera 1, in camera 1's frame (paper §3.2.1).

    R1, R2: (3, 3) world->camera rotations; t1, t2: (3,) world->camera translations, metres
    (x_c = R_i x_w + t_i). gamma: threshold for the translation's direction labels.
    min_angle_deg: rotations smaller than this read as `NO_ROTATION_TEXT` (the axis of a tiny
    rotation is noise); the numbers in the result are kept exact regardless.
    """
    R1 = check_rotation("R1", R1)
    R2 = check_rotation("R2", R2)
    for name, R in (("R1", R1), ("R2", R2)):
        if R.shape != (3, 3):
            raise ValueError(f"{name}: expected shape (3, 3), got {tuple(R.shape)}")
    t1 = _check_vector("t1", t1)
    t2 = _check_vector("t2", t2)
    gamma = _check_gamma(gamma)
    if not np.isfinite(min_angle_deg) or min_angle_deg < 0:
        raise ValueError(f"min_angle_deg: must be finite and >= 0, got {min_angle_deg!r}")

    R12 = R1 @ R2.T
    # Re-orthonormalise: the product of two rotations that passed check_rotation's tolerance
    # may drift slightly; the log map below assumes an exact rotation.
    U, _, Vt = np.linalg.svd(R12)
    R12 = U @ np.diag([1.0, 1.0, np.linalg.det(U @ Vt)]) @ Vt
    rotvec_deg = np.degrees(rotation_log(R12))
    angle = float(np.linalg.norm(rotvec_deg))
    axis = rotvec_deg / angle if angle > 0 else np.zeros(3)
    text, label = format_rotation(rotvec_deg, min_angle_deg)

    c1 = -R1.T @ t1
    c2 = -R2.T @ t2
    trans = R1 @ (c2 - c1)
    tdesc = describe_displacement(trans, gamma)
    return CameraMotion(
        axis=axis,
        angle_deg=angle,
        rotvec_deg=rotvec_deg,
        translation_dir=tdesc.unit_vector,
        translation_m=tdesc.distance_m,
        text=text,
        rotation_label=label,
        translation=tdesc,
    )
