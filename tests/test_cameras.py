"""Cameras: checked against real dataset annotations (RHD, InterHand2.6M), PIL's image resampling,
hand-written numpy and scipy rotations, never against the module's own output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.spatial.transform import Rotation

from hand3d_dataset.cameras import (
    backproject_depth,
    camera_to_world,
    crop_intrinsics,
    in_image,
    intrinsics_matrix,
    pixel_index,
    project,
    resize_intrinsics,
    visibility,
    world_to_camera,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
RHD = FIXTURES / "real" / "rhd" / "test_rhd.json"
INTERHAND = FIXTURES / "real" / "interhand2.6m"


def _k(fx=500.0, fy=480.0, cx=160.3, cy=119.7, s=0.0) -> np.ndarray:
    return np.array([[fx, s, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not RHD.exists(), reason=f"RHD fixture missing: {RHD}")
def test_rhd_projection_reproduces_stored_keypoints():
    data = json.loads(RHD.read_text())
    images = {im["id"]: im for im in data["images"]}
    assert len(data["annotations"]) == 3
    for ann in data["annotations"]:
        cam = images[ann["image_id"]]["cam_param"]
        K = intrinsics_matrix(cam["focal"], cam["princpt"])
        joints_mm = np.array(ann["joint_cam"])  # (21, 3) mm: projection is scale-free
        keypoints = np.array(ann["keypoints"])[:, :2]
        uv, in_front = project(joints_mm, K)
        assert in_front.all()
        np.testing.assert_array_less(np.abs(uv - keypoints), 0.1)
        # the same in metres, with the hand moved to a world frame and back through a known camera
        R = Rotation.from_euler("xyz", [0.3, -0.2, 0.5]).as_matrix()
        t = np.array([0.1, -0.2, 0.3])
        world = (joints_mm / 1000.0 - t) @ R  # hand-written inverse of x_c = R x_w + t
        uv_w, _ = project(world_to_camera(world, R, t), K)
        np.testing.assert_array_less(np.abs(uv_w - keypoints), 0.1)


def _interhand_samples():
    cams = json.loads((INTERHAND / "test_interhand2.6m_camera.json").read_text())
    joints = json.loads((INTERHAND / "test_interhand2.6m_joint_3d.json").read_text())
    data = json.loads((INTERHAND / "test_interhand2.6m_data.json").read_text())
    for im, ann in zip(data["images"], data["annotations"]):
        cap, cam_id = str(im["capture"]), im["camera"]
        cam = {
            k: np.array(cams[cap][k][cam_id], dtype=float) for k in ("campos", "camrot", "focal", "princpt")
        }
        j = joints[cap][str(im["frame_idx"])]
        world = np.array(j["world_coord"], dtype=float)  # (42, 3) mm
        valid = np.array(j["joint_valid"], dtype=bool)[:, 0] & np.array(ann["joint_valid"], dtype=bool)[:, 0]
        yield im, ann, cam, world, valid


@pytest.mark.skipif(not INTERHAND.exists(), reason=f"InterHand2.6M fixture missing: {INTERHAND}")
def test_interhand_joints_land_in_hand_box_at_expected_depth():
    n = 0
    for im, ann, cam, world, valid in _interhand_samples():
        R, campos = cam["camrot"], cam["campos"]
        t = -R @ campos
        cam_pts = world_to_camera(world, R, t)
        # the dataset's own formula, written out by hand
        np.testing.assert_allclose(cam_pts, (world - campos) @ R.T, atol=1e-9)
        K = intrinsics_matrix(cam["focal"], cam["princpt"])
        uv, vis = visibility(cam_pts, K, image_hw=(im["height"], im["width"]))
        bx, by, bw, bh = ann["bbox"]  # xywh
        u, v = uv[valid, 0], uv[valid, 1]
        assert valid.sum() >= 21
        assert np.all((u >= bx) & (u <= bx + bw) & (v >= by) & (v <= by + bh)), im["file_name"]
        z = cam_pts[valid, 2]
        assert np.all((z >= 950.0) & (z <= 1170.0)), (im["file_name"], z.min(), z.max())
        assert vis[valid].all()
        # camrot is stored in float32, orthonormal to ~1e-7 only: the round trip is exact to ~1e-5 mm
        np.testing.assert_allclose(camera_to_world(cam_pts, R, t), world, atol=1e-4)
        n += 1
    assert n == 4


# ---------------------------------------------------------------- projection and visibility


def test_project_matches_homogeneous_matrix_product_with_batched_intrinsics():
    rng = np.random.default_rng(0)
    pts = rng.uniform([-1, -1, 0.5], [1, 1, 3], size=(4, 7, 3))
    Ks = np.stack([_k(400 + 50 * i, 420 + 10 * i, 100 + i, 90 - i, s=0.5 * i) for i in range(4)])
    uv, in_front = project(pts, Ks)
    hom = np.einsum("tij,tnj->tni", Ks, pts)  # K x, then divide by the third row
    np.testing.assert_allclose(uv, hom[..., :2] / hom[..., 2:], rtol=1e-12)
    assert in_front.all() and uv.shape == (4, 7, 2)


def test_torch_tensors_are_accepted():
    import torch

    pts = torch.tensor([[0.1, -0.2, 2.0]], dtype=torch.float32)
    uv, _ = project(pts, torch.tensor(_k()))
    np.testing.assert_allclose(uv, [[500 * 0.05 + 160.3, 480 * -0.1 + 119.7]], rtol=1e-6)


def test_points_behind_camera_get_no_pixel():
    K = _k()
    pts = np.array([[0.1, 0.1, 1.0], [0.1, 0.1, 0.0], [0.0, 0.0, -2.0]])
    uv, in_front = project(pts, K)
    assert in_front.tolist() == [True, False, False]
    assert np.isfinite(uv[0]).all() and np.isnan(uv[1:]).all()
    assert in_image(uv, (240, 320)).tolist() == [True, False, False]
    rows, cols, inside = pixel_index(uv, (240, 320))
    assert inside.tolist() == [True, False, False]
    # a point behind the camera whose mirrored pixel would be in the middle of the image
    _, vis = visibility(np.array([[0.0, 0.0, -1.0]]), K, (240, 320))
    assert not vis[0]


def test_in_image_and_nearest_pixel_follow_integer_centre_convention():
    h, w = 4, 6
    uv = np.array(
        [
            [-0.5, 0.0],
            [-0.51, 0.0],
            [5.49, 3.49],
            [5.5, 0.0],
            [0.0, 3.5],
            [2.49, 1.51],
            [2.51, 1.49],
            [np.nan, 1],
        ]
    )
    assert in_image(uv, (h, w)).tolist() == [True, False, True, False, False, True, True, False]
    rows, cols, inside = pixel_index(uv, (h, w))
    assert (rows[inside].tolist(), cols[inside].tolist()) == ([0, 3, 2, 1], [0, 5, 2, 3])


# ---------------------------------------------------------------- intrinsics under resize / crop


def _blob(h, w, u, v, sigma=3.0) -> np.ndarray:
    """Gaussian spot sampled at pixel centres (j, i)."""
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    return np.exp(-((jj - u) ** 2 + (ii - v) ** 2) / (2 * sigma**2)).astype(np.float32)


def _centroid(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float64)
    jj, ii = np.meshgrid(np.arange(img.shape[1]), np.arange(img.shape[0]))
    return np.array([(img * jj).sum(), (img * ii).sum()]) / img.sum()


@pytest.mark.parametrize(
    "new_wh, resample", [((448, 448), Image.BILINEAR), ((160, 120), Image.BOX), ((500, 170), Image.BICUBIC)]
)
def test_resize_intrinsics_agree_with_pil_resampling(new_wh, resample):
    h, w = 240, 320
    K = _k(cx=157.3, cy=121.8)
    X = np.array([[0.05, -0.03, 0.9], [-0.1, 0.06, 1.3]])
    uv, _ = project(X, K)
    new_w, new_h = new_wh
    K2 = resize_intrinsics(K, (h, w), (new_h, new_w))
    uv2, _ = project(X, K2)
    sx, sy = new_w / w, new_h / h
    # by hand: pixel edges at -0.5 and W-0.5 map to -0.5 and W'-0.5
    np.testing.assert_allclose(uv2, np.stack([(uv[:, 0] + 0.5) * sx - 0.5, (uv[:, 1] + 0.5) * sy - 0.5], -1))
    for (u, v), expected in zip(uv, uv2):
        img = Image.fromarray(_blob(h, w, u, v, sigma=6.0), mode="F")
        resized = np.asarray(img.resize((new_w, new_h), resample=resample))
        np.testing.assert_allclose(
            _centroid(resized), expected, atol=0.01
        )  # a cx*s formula is off by >= 0.14 px


def test_crop_intrinsics_agree_with_array_slicing():
    h, w = 240, 320
    K = _k(cx=157.3, cy=121.8)
    X = np.array([[0.02, 0.01, 1.0]])
    u, v = project(X, K)[0][0]
    x0, y0 = 97, 51
    crop = _blob(h, w, u, v)[y0 : y0 + 120, x0 : x0 + 140]
    uc, vc = project(X, crop_intrinsics(K, x0, y0))[0][0]
    np.testing.assert_allclose([uc, vc], _centroid(crop), atol=1e-3)
    np.testing.assert_allclose([uc, vc], [u - x0, v - y0], atol=1e-12)


# ---------------------------------------------------------------- back-projection


def test_backprojected_plane_satisfies_plane_equation_and_reprojects_to_pixel_grid():
    h, w = 30, 40
    K = _k(fx=60, fy=55, cx=19.2, cy=14.9, s=1.5)
    n, d = np.array([0.2, -0.5, 1.0]), 1.4  # plane n . X = d
    # by hand: the ray through pixel centre (j, i) is K^-1 (j, i, 1), whose z is 1
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    rays = np.stack([jj, ii, np.ones_like(jj)], -1).astype(float) @ np.linalg.inv(K).T
    depth = d / (rays @ n)
    pm = backproject_depth(depth, K)
    assert pm.shape == (h, w, 3)
    np.testing.assert_allclose(pm @ n, d, rtol=1e-12)
    np.testing.assert_allclose(pm[..., 2], depth, rtol=1e-12)
    hom = pm @ K.T  # project by hand
    np.testing.assert_allclose(hom[..., 0] / hom[..., 2], jj, atol=1e-9)
    np.testing.assert_allclose(hom[..., 1] / hom[..., 2], ii, atol=1e-9)


def test_backprojected_sphere_and_holes():
    h, w = 48, 64
    K = _k(fx=70, fy=70, cx=31.5, cy=23.5)
    c, r = np.array([0.05, -0.02, 1.0]), 0.3
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    rays = np.stack([(jj - 31.5) / 70, (ii - 23.5) / 70, np.ones((h, w))], -1)
    # ray-sphere: |z ray - c|^2 = r^2, nearest root
    a, b, cc = (rays**2).sum(-1), -2 * rays @ c, c @ c - r**2
    disc = b**2 - 4 * a * cc
    depth = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.nan)
    depth[0, 0], depth[1, 1] = 0.0, -1.0  # sensor holes
    pm = backproject_depth(depth, K)
    hit = np.isfinite(depth) & (depth > 0)
    assert hit.sum() > 200
    np.testing.assert_allclose(np.linalg.norm(pm[hit] - c, axis=-1), r, rtol=1e-9)
    assert np.isnan(pm[~hit]).all()


@settings(max_examples=40, deadline=None)
@given(
    rotvec=st.lists(st.floats(-3, 3), min_size=3, max_size=3),
    t=st.lists(st.floats(-5, 5), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_world_camera_round_trip_and_project_backproject_identity(rotvec, t, seed):
    R = Rotation.from_rotvec(rotvec).as_matrix()
    pts = np.random.default_rng(seed).uniform(-2, 2, size=(5, 3))
    np.testing.assert_allclose(camera_to_world(world_to_camera(pts, R, t), R, t), pts, atol=1e-9)
    np.testing.assert_allclose(world_to_camera(pts, R, t), Rotation.from_matrix(R).apply(pts) + t, atol=1e-9)
    K = _k(fx=50, fy=45, cx=10.3, cy=8.1, s=0.7)
    depth = np.random.default_rng(seed).uniform(0.2, 5.0, size=(12, 16))
    uv, _ = project(backproject_depth(depth, K).reshape(-1, 3), K)
    jj, ii = np.meshgrid(np.arange(16), np.arange(12))
    np.testing.assert_allclose(uv, np.stack([jj.ravel(), ii.ravel()], -1), atol=1e-9)


# ---------------------------------------------------------------- bad input


R_OK, T_OK = np.eye(3), np.zeros(3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: project([[0.0, np.nan, 1.0]], _k()), "points_cam.*non-finite"),
        (lambda: project([[0.0, 0.0, 1.0, 1.0]], _k()), r"points_cam: expected shape \(\.\.\., \*, 3\)"),
        (lambda: project([[0.0, 0.0, 1.0]], _k(fx=np.inf)), "K.*non-finite"),
        (lambda: project([[0.0, 0.0, 1.0]], _k(fx=0.0)), "K: focal lengths must be > 0"),
        (lambda: project([[0.0, 0.0, 1.0]], np.ones((3, 3))), "K: not an upper-triangular"),
        (lambda: project([[0.0, 0.0, 1.0]], np.eye(2)), r"K: expected shape"),
        (lambda: world_to_camera([[0.0, 0.0, 1.0]], np.diag([1.0, 1.0, 1.1]), T_OK), "R: not orthonormal"),
        (lambda: world_to_camera([[0.0, 0.0, 1.0]], np.diag([1.0, 1.0, -1.0]), T_OK), "R: determinant"),
        (lambda: world_to_camera([[0.0, 0.0, 1.0]], R_OK, [0.0, 0.0]), r"t: expected shape"),
        (lambda: world_to_camera([[0.0, 0.0, np.inf]], R_OK, T_OK), "points_world.*non-finite"),
        (lambda: camera_to_world([[0.0, 0.0, 1.0]], R_OK, [np.nan, 0, 0]), "t.*non-finite"),
        (lambda: in_image([[0.0, 0.0]], (240,)), "image_hw: expected"),
        (lambda: in_image([[0.0, 0.0]], (0, 10)), "image_hw: expected positive"),
        (lambda: in_image([[np.inf, 0.0]], (10, 10)), "uv: contains inf"),
        (lambda: resize_intrinsics(_k(), (240, 320), (0, 5)), "new_hw"),
        (lambda: crop_intrinsics(_k(), np.nan, 0), "x0/y0"),
        (lambda: backproject_depth(np.ones(5), _k()), r"depth: expected shape"),
        (lambda: intrinsics_matrix([500.0], [1.0, 2.0]), "focal: expected shape"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
