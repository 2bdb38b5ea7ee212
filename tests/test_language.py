"""Spatial language against hand-made cameras, scipy and the real HOT3D headset trajectory."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from hand3d_dataset.language import (
    AXIS_LABELS,
    NO_MOVEMENT_TEXT,
    NO_ROTATION_TEXT,
    describe_displacement,
    direction_labels,
    relative_camera_motion,
    rotation_log,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def _camera(axes_in_world: np.ndarray, centre) -> tuple[np.ndarray, np.ndarray]:
    """World->camera (R, t) of a camera whose x, y, z axes (rows) and centre are given in world coords."""
    R = np.asarray(axes_in_world, dtype=float)
    return R, -R @ np.asarray(centre, dtype=float)


# ---- displacement ---------------------------------------------------------------------------------------


def test_canonical_text_hand_computed():
    # |v| = sqrt(0.17) = 0.4123; v̂ = (-0.728, 0.485, 0.485): every axis beyond 0.3
    d = describe_displacement([-0.3, 0.2, 0.2])
    assert d.text == "left and down and forward, 0.41 m"
    assert d.labels == {"x": "left", "y": "down", "z": "forward"}
    assert d.distance_m == pytest.approx(np.sqrt(0.17))
    np.testing.assert_allclose(d.unit_vector, np.array([-0.3, 0.2, 0.2]) / np.sqrt(0.17))


def test_image_up_is_negative_y_and_backward_is_towards_camera():
    d = describe_displacement([0.0, -0.1, -0.05])  # v̂ = (0, -0.894, -0.447)
    assert d.text == "up and backward, 0.11 m"


def test_small_components_are_dropped():
    # v̂_x = 0.1/|v| = 0.099 < 0.3: only forward
    assert describe_displacement([0.1, 0.0, 1.0]).text == "forward, 1.00 m"
    assert direction_labels([0.1, 0.0, 1.0], gamma=0.05)["x"] == "right"


def test_zero_vector_and_min_distance():
    d = describe_displacement(np.zeros(3))
    assert d.text == NO_MOVEMENT_TEXT and d.distance_m == 0.0
    assert d.labels == {"x": None, "y": None, "z": None}
    np.testing.assert_array_equal(d.unit_vector, np.zeros(3))
    d = describe_displacement([0.004, 0.0, 0.0], min_distance_m=0.01)
    assert d.text == NO_MOVEMENT_TEXT and d.distance_m == pytest.approx(0.004)


finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(st.tuples(finite, finite, finite), st.floats(0.02, 0.98))
def test_labels_agree_with_signs(v, gamma):
    v = np.array(v)
    n = np.linalg.norm(v)
    assume(n > 1e-6)
    labels = direction_labels(v, gamma)
    for i, ax in enumerate("xyz"):
        c = v[i] / n
        if abs(c) > gamma + 1e-9:
            # sign by hand: x right, y down, z forward are positive (OpenCV camera)
            assert labels[ax] == AXIS_LABELS[ax][0 if v[i] > 0 else 1]
        elif abs(c) < gamma - 1e-9:
            assert labels[ax] is None
    assert {"right": 1, "left": -1, None: 0}[labels["x"]] * v[0] >= 0
    assert {"down": 1, "up": -1, None: 0}[labels["y"]] * v[1] >= 0
    assert {"forward": 1, "backward": -1, None: 0}[labels["z"]] * v[2] >= 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"v": [np.nan, 0, 0]}, "v"),
        ({"v": [np.inf, 0, 0]}, "v"),
        ({"v": [1.0, 0.0]}, "v"),
        ({"v": [[1.0, 0.0, 0.0]]}, "v"),
        ({"v": [1.0, 0.0, 0.0], "gamma": 0.0}, "gamma"),
        ({"v": [1.0, 0.0, 0.0], "gamma": 1.0}, "gamma"),
        ({"v": [1.0, 0.0, 0.0], "gamma": float("nan")}, "gamma"),
        ({"v": [1.0, 0.0, 0.0], "min_distance_m": -1.0}, "min_distance_m"),
    ],
)
def test_displacement_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        describe_displacement(**kwargs)


# ---- camera motion: hand-made cameras --------------------------------------------------------------------

c10, s10 = np.cos(np.radians(10)), np.sin(np.radians(10))


def test_yaw_left_10_degrees():
    # camera 2's forward swings toward -x (left); its axes written by hand in camera-1 (= world) coords
    R1, t1 = _camera(np.eye(3), [0, 0, 0])
    R2, t2 = _camera([[c10, 0, s10], [0, 1, 0], [-s10, 0, c10]], [0, 0, 0])
    m = relative_camera_motion(R1, t1, R2, t2)
    assert m.text == "turn left, 10.0 degrees"
    assert m.rotation_label == "turn left"
    assert m.angle_deg == pytest.approx(10.0)
    np.testing.assert_allclose(m.axis, [0, -1, 0], atol=1e-12)  # about the camera's up axis
    mirrored = relative_camera_motion(R1, t1, *_camera([[c10, 0, -s10], [0, 1, 0], [s10, 0, c10]], [0, 0, 0]))
    assert mirrored.text == "turn right, 10.0 degrees"


def test_tilt_up_10_degrees():
    # forward swings toward -y (image up)
    R1, t1 = _camera(np.eye(3), [0, 0, 0])
    R2, t2 = _camera([[1, 0, 0], [0, c10, s10], [0, -s10, c10]], [0, 0, 0])
    m = relative_camera_motion(R1, t1, R2, t2)
    assert m.text == "tilt up, 10.0 degrees"
    R2d, t2d = _camera([[1, 0, 0], [0, c10, -s10], [0, s10, c10]], [0, 0, 0])
    assert relative_camera_motion(R1, t1, R2d, t2d).text == "tilt down, 10.0 degrees"


def test_roll_clockwise_seen_from_behind():
    # Looking forward through the camera (x right, y down on the page), its right axis swings toward
    # down: on the page that is a clockwise turn of the camera.
    R1, t1 = _camera(np.eye(3), [0, 0, 0])
    R2, t2 = _camera([[c10, s10, 0], [-s10, c10, 0], [0, 0, 1]], [0, 0, 0])
    m = relative_camera_motion(R1, t1, R2, t2)
    assert m.text == "roll clockwise, 10.0 degrees"
    # a world point straight to the camera's right appears, in the rolled camera, up-right:
    # the scene turns counterclockwise in the image, as it must when the camera turns clockwise
    p_cam2 = R2 @ np.array([1.0, 0.0, 1.0]) + t2
    assert p_cam2[0] > 0 and p_cam2[1] < 0
    R2c, t2c = _camera([[c10, -s10, 0], [s10, c10, 0], [0, 0, 1]], [0, 0, 0])
    assert relative_camera_motion(R1, t1, R2c, t2c).text == "roll counterclockwise, 10.0 degrees"


def test_result_is_independent_of_the_world_frame():
    # the same yaw-left pair, with both cameras re-expressed in a rotated and shifted world
    Q = Rotation.from_rotvec([0.3, -1.2, 0.7]).as_matrix()
    shift = np.array([1.0, -2.0, 0.5])
    axes1, c1 = np.eye(3), np.zeros(3)
    axes2, c2 = np.array([[c10, 0, s10], [0, 1, 0], [-s10, 0, c10]]), np.array([0.0, 0.0, 0.3])
    # world' = Q world + shift: axes rows become rows @ Q^T, centres Q c + shift
    R1, t1 = _camera(axes1 @ Q.T, Q @ c1 + shift)
    R2, t2 = _camera(axes2 @ Q.T, Q @ c2 + shift)
    m = relative_camera_motion(R1, t1, R2, t2)
    assert m.text == "turn left, 10.0 degrees"
    np.testing.assert_allclose(m.translation_dir, [0, 0, 1], atol=1e-12)
    assert m.translation_m == pytest.approx(0.3)


def test_pure_forward_translation():
    rng = np.random.default_rng(0)
    axes = Rotation.random(random_state=rng).as_matrix()  # rows: camera axes in world
    c1 = rng.normal(size=3)
    c2 = c1 + 0.5 * axes[2]  # half a metre along camera 1's forward axis
    R1, t1 = _camera(axes, c1)
    R2, t2 = _camera(axes, c2)
    m = relative_camera_motion(R1, t1, R2, t2)
    np.testing.assert_allclose(m.translation_dir, [0, 0, 1], atol=1e-12)
    assert m.translation_m == pytest.approx(0.5)
    assert m.angle_deg == pytest.approx(0.0, abs=1e-9)
    assert m.text == NO_ROTATION_TEXT and m.rotation_label is None
    assert m.translation.text == "forward, 0.50 m"


# ---- camera motion: scipy ------------------------------------------------------------------------------


@pytest.mark.parametrize("angle_deg", [1e-5, 0.5, 12.4, 90.0, 135.0, 179.0, 179.99])
def test_rotvec_matches_scipy(angle_deg):
    rng = np.random.default_rng(int(angle_deg * 100))
    for _ in range(20):
        r1 = Rotation.random(random_state=rng)
        axis = rng.normal(size=3)
        rel = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.radians(angle_deg))
        r2 = rel.inv() * r1  # so that R1 R2^T = rel
        m = relative_camera_motion(r1.as_matrix(), rng.normal(size=3), r2.as_matrix(), rng.normal(size=3))
        expected = Rotation.from_matrix(r1.as_matrix() @ r2.as_matrix().T).as_rotvec(degrees=True)
        np.testing.assert_allclose(m.rotvec_deg, expected, atol=1e-6)
        assert m.angle_deg == pytest.approx(angle_deg, abs=1e-6)


def test_rotation_log_matches_scipy_on_random_matrices():
    rots = Rotation.random(200, random_state=1)
    for r in rots:
        np.testing.assert_allclose(rotation_log(r.as_matrix()), r.as_rotvec(), atol=1e-9)


def _read_hot3d(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    t = np.array([[float(r[f"t_wo_{a}[m]"]) for a in "xyz"] for r in rows])
    q = np.array([[float(r[f"q_wo_{a}"]) for a in "wxyz"] for r in rows])
    ts = np.array([int(r["timestamp[ns]"]) for r in rows])
    return ts, t, q


def _quat_wxyz_to_matrix(q: np.ndarray) -> np.ndarray:
    """Hamilton quaternion (w, x, y, z) -> rotation matrix, written out by hand."""
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


HOT3D = sorted((FIXTURES / "real" / "hot3d").glob("*/*/headset_trajectory.csv"))


@pytest.mark.skipif(not HOT3D, reason=f"HOT3D headset trajectories not found under {FIXTURES}")
@pytest.mark.parametrize("path", HOT3D, ids=[p.parent.parent.name for p in HOT3D])
def test_hot3d_headset_relative_motion_matches_scipy(path):
    # The CSV stores T_world_device (device -> world): x_w = R_wo x_d + t_wo, quaternion (w, x, y, z).
    ts, t_wo, q_wo = _read_hot3d(path)
    assert np.all(np.diff(ts) >= 0)
    n = 5
    checked = 0
    for k in range(len(ts) - n):
        R_wo1, R_wo2 = _quat_wxyz_to_matrix(q_wo[k]), _quat_wxyz_to_matrix(q_wo[k + n])
        # world -> camera (device frame used as the camera): R = R_wo^T, t = -R_wo^T t_wo
        m = relative_camera_motion(R_wo1.T, -R_wo1.T @ t_wo[k], R_wo2.T, -R_wo2.T @ t_wo[k + n])
        # independently: scipy straight from the raw quaternions (scalar last in scipy)
        r1 = Rotation.from_quat(q_wo[k][[1, 2, 3, 0]])
        r2 = Rotation.from_quat(q_wo[k + n][[1, 2, 3, 0]])
        rel = r1.inv() * r2  # = R_wo1^T R_wo2 = R_1 R_2^T
        np.testing.assert_allclose(m.rotvec_deg, rel.as_rotvec(degrees=True), atol=1e-6)
        assert m.angle_deg == pytest.approx(rel.magnitude() * 180 / np.pi, abs=1e-6)
        trans = r1.inv().apply(t_wo[k + n] - t_wo[k])  # R_1 (c_2 - c_1), c_i = t_wo
        np.testing.assert_allclose(m.translation_m, np.linalg.norm(trans), atol=1e-9)
        if np.linalg.norm(trans) > 1e-6:
            np.testing.assert_allclose(m.translation_dir, trans / np.linalg.norm(trans), atol=1e-6)
        checked += 1
    assert checked > 5


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.eye(3) * 2, np.zeros(3), np.eye(3), np.zeros(3)), "R1"),
        ((np.eye(3), np.zeros(3), np.diag([1.0, 1.0, -1.0]), np.zeros(3)), "R2"),
        ((np.full((3, 3), np.nan), np.zeros(3), np.eye(3), np.zeros(3)), "R1"),
        ((np.eye(4), np.zeros(3), np.eye(3), np.zeros(3)), "R1"),
        ((np.eye(3), np.zeros(2), np.eye(3), np.zeros(3)), "t1"),
        ((np.eye(3), np.zeros(3), np.eye(3), [0.0, np.inf, 0.0]), "t2"),
    ],
)
def test_camera_motion_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        relative_camera_motion(*args)


def test_camera_motion_bad_gamma_and_angle():
    with pytest.raises(ValueError, match="gamma"):
        relative_camera_motion(np.eye(3), np.zeros(3), np.eye(3), np.zeros(3), gamma=1.5)
    with pytest.raises(ValueError, match="min_angle_deg"):
        relative_camera_motion(np.eye(3), np.zeros(3), np.eye(3), np.zeros(3), min_angle_deg=-1)
