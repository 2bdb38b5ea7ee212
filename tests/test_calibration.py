"""Scale calibration and object localisation, on scenes ray-cast here by hand-written numpy: known
scale, known sphere on a table, corrupted pixels; expected values come from the scene, not the code."""

from __future__ import annotations

import numpy as np
import pytest

from hand3d_dataset.calibration import (
    LocalizationConfig,
    ObjectLocation,
    ScaleResult,
    calibrate_scale,
    localize_object,
    localize_objects,
    sample_pointmap,
)

H, W = 120, 160
SURFACE = LocalizationConfig(estimate="surface")  # the visible-surface centre (the default is the centre)
K = np.array([[150.0, 0.0, 79.3], [0.0, 150.0, 60.2], [0.0, 0.0, 1.0]])


def _rays(h=H, w=W, K=K) -> np.ndarray:
    """(H, W, 3) rays through pixel centres (j, i) with z = 1, by hand."""
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    return np.stack([(jj - K[0, 2]) / K[0, 0], (ii - K[1, 2]) / K[1, 1], np.ones((h, w))], -1)


def _nearest_pixel(X: np.ndarray, K=K) -> tuple[np.ndarray, np.ndarray]:
    hom = X @ K.T
    u, v = hom[..., 0] / hom[..., 2], hom[..., 1] / hom[..., 2]
    return np.floor(v + 0.5).astype(int), np.floor(u + 0.5).astype(int)


def _hands(rng, n_hands=2) -> np.ndarray:
    """(n_hands, 21, 3) joints in front of the camera and inside the image, on distinct pixels."""
    while True:
        z = rng.uniform(0.4, 0.8, size=(n_hands, 21))
        u, v = rng.uniform(3, W - 4, size=(n_hands, 21)), rng.uniform(3, H - 4, size=(n_hands, 21))
        X = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], -1)
        rows, cols = _nearest_pixel(X)
        if len(set(zip(rows.ravel(), cols.ravel()))) == rows.size:
            return X


def _scaled_cloud(rng, joints, s_true, corrupt=0.3):
    """Cloud at 1/s_true of metric scale: background at 1.5 m, each joint's pixel at the joint's depth
    (x 0.2 % noise), then a fraction `corrupt` of all pixels replaced by junk. Returns the cloud and
    the (H, W) mask of pixels left intact."""
    depth = np.full((H, W), 1.5)
    rows, cols = _nearest_pixel(joints)
    depth[rows, cols] = joints[..., 2] * (1 + 0.002 * rng.standard_normal(joints.shape[:-1]))
    pm = _rays() * depth[..., None] / s_true
    bad = rng.random((H, W)) < corrupt
    kind = rng.integers(0, 5, size=(H, W))
    z = pm[..., 2]
    z[bad & (kind == 0)] = np.nan
    z[bad & (kind == 1)] = 0.0
    z[bad & (kind == 2)] = -rng.uniform(0.01, 3, size=(bad & (kind == 2)).sum())
    z[bad & (kind == 3)] *= rng.uniform(0.01, 100, size=(bad & (kind == 3)).sum())  # outliers
    pm[bad & (kind == 4)] = np.inf
    return pm.astype(np.float32), ~bad


# ---------------------------------------------------------------- scale calibration


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_scale_recovered_within_one_percent_despite_30_percent_junk(seed):
    rng = np.random.default_rng(seed)
    joints = _hands(rng)
    s_true = rng.uniform(0.2, 5.0)
    pm, _ = _scaled_cloud(rng, joints, s_true)
    res = calibrate_scale(joints, pm, K)
    assert isinstance(res, ScaleResult) and res.reason is None
    assert abs(res.scale / s_true - 1) < 0.01, (res.scale, s_true)
    # Ω by hand: the joint's own pixel holds a finite point with z > 0
    rows, cols = _nearest_pixel(joints)
    zc = pm[rows, cols, 2].astype(float)
    omega = np.isfinite(pm[rows, cols]).all(-1) & (zc > 0)
    assert res.num_valid == omega.sum()
    assert res.scale == pytest.approx(np.median(joints[..., 2][omega] / zc[omega]), rel=1e-12)


def test_scale_pools_frames_of_a_clip_and_respects_joint_valid():
    rng = np.random.default_rng(7)
    s_true = 0.37
    joints = np.stack([_hands(rng) for _ in range(3)])  # (T, 2, 21, 3)
    clouds = np.stack([_scaled_cloud(rng, j, s_true, corrupt=0.0)[0] for j in joints])  # (T, H, W, 3)
    Ks = np.stack([K] * 3)
    res = calibrate_scale(joints, clouds, Ks)
    assert res.num_valid == 3 * 42 and abs(res.scale / s_true - 1) < 0.005
    # flags from the dataset remove joints from Ω; a (..., J, 1) layout is accepted as stored
    valid = np.zeros((3, 2, 21, 1), dtype=bool)
    valid[1, 0, :4] = True
    res = calibrate_scale(joints, clouds, Ks, joint_valid=valid)
    assert res.num_valid == 4 and abs(res.scale / s_true - 1) < 0.01
    # frames are not mixed up: joints of frame 0 read against the cloud of frame 1 give no stable scale
    wrong = calibrate_scale(joints[[1, 0, 2]], clouds, Ks)
    assert abs(wrong.scale / s_true - 1) > 0.05


def test_nearest_lookup_reads_the_pixel_under_the_joint():
    pm = np.zeros((4, 6, 3))
    pm[..., 2] = np.arange(24).reshape(4, 6) + 1.0
    uv = np.array([[2.49, 1.51], [2.51, 1.49], [-0.5, -0.5], [5.6, 0.0], [np.nan, 0.0]])
    out = sample_pointmap(pm, uv)
    assert out[:3, 2].tolist() == [2 * 6 + 2 + 1.0, 1 * 6 + 3 + 1.0, 1.0]
    assert np.isnan(out[3:]).all()


def test_too_few_valid_joints_gives_no_scale_and_a_reason():
    rng = np.random.default_rng(3)
    joints = _hands(rng, n_hands=1)[0]  # (21, 3)
    pm, _ = _scaled_cloud(rng, joints, 1.0, corrupt=0.0)
    moved = joints.copy()
    moved[2:10, 2] *= -1  # behind the camera
    moved[10:, 0] += 10.0  # far right, outside the image
    res = calibrate_scale(moved, pm, K)
    assert res.scale is None and res.num_valid == 2 and "min_valid=3" in res.reason
    assert calibrate_scale(moved, pm, K, min_valid=2).scale == pytest.approx(1.0, rel=0.01)
    # the joints are visible but the cloud has nothing there
    res = calibrate_scale(joints, np.full((H, W, 3), np.nan, dtype=np.float32), K)
    assert res.scale is None and res.num_valid == 0 and "no finite positive cloud depth" in res.reason


# ---------------------------------------------------------------- object localisation


def _look_at(C, target) -> tuple[np.ndarray, np.ndarray]:
    z = (target - C) / np.linalg.norm(target - C)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(z, x), z])  # rows: camera x (right), y (down), z (forward) in world
    return R, -R @ C


def _table_scene(rng, radius=0.04, flying=0.1, margin=6):
    """Sphere resting on a table (world z = 0 plane), seen obliquely from 0.6 m. Returns the depth
    map, the detector-like box around the sphere, the analytic nearest visible sphere point in the
    camera frame, and the sphere's centre."""
    R, t = _look_at(np.array([0.0, -0.45, 0.4]), np.array([0.0, 0.0, 0.0]))
    centre = R @ np.array([0.03, 0.02, radius]) + t
    n, d = R[:, 2], R[:, 2] @ t  # table: n . X = d in the camera frame
    rays = _rays()
    plane = d / (rays @ n)
    plane = np.where(plane > 0, plane, np.inf)
    b = -2 * rays @ centre
    disc = b**2 - 4 * (rays**2).sum(-1) * (centre @ centre - radius**2)
    sphere = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * (rays**2).sum(-1)), np.inf)
    obj = sphere < plane
    depth = np.where(obj, sphere, plane)
    ii, jj = np.nonzero(obj)
    box = np.array(
        [jj.min() - 0.5 - margin, ii.min() - 0.5 - margin, jj.max() + 0.5 + margin, ii.max() + 0.5 + margin]
    )
    # flying pixels: depths anywhere between the front of the object and the back of the box
    r0, r1, c0, c1 = ii.min() - margin, ii.max() + margin + 1, jj.min() - margin, jj.max() + margin + 1
    sub = depth[r0:r1, c0:c1]
    fly = rng.random(sub.shape) < flying
    sub[fly] = rng.uniform(sub.min(), sub.max(), size=fly.sum())
    visible_centre = centre - radius * centre / np.linalg.norm(centre)
    return depth, box, visible_centre, centre, obj


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_localised_sphere_on_table_within_1cm_of_visible_surface_centre(seed):
    rng = np.random.default_rng(seed)
    depth, box, visible_centre, centre, obj = _table_scene(rng)
    s_true = 3.1
    pm = (_rays() * depth[..., None] / s_true).astype(np.float32)  # unscaled cloud
    loc = localize_object(box, pm, scale=s_true, config=SURFACE)
    assert isinstance(loc, ObjectLocation) and loc.reason is None
    assert np.linalg.norm(loc.xyz - visible_centre) < 0.005, (loc.xyz, visible_centre)  # ~1.5 mm seen
    assert loc.num_pixels > 30
    # the scene is not trivial: a plain median over the box lands on the table, centimetres away
    crop = pm[int(box[1] + 1) : int(box[3]), int(box[0] + 1) : int(box[2])].reshape(-1, 3) * s_true
    assert np.linalg.norm(np.median(crop, 0) - visible_centre) > 0.02
    # and the result is the visible surface, about one radius in front of the centre
    assert 0.02 < np.linalg.norm(loc.xyz - centre) < 0.05


def test_localisation_with_background_filling_most_of_a_loose_box():
    rng = np.random.default_rng(5)
    depth, box, visible_centre, _, obj = _table_scene(rng, radius=0.04, margin=14)
    pm = _rays() * depth[..., None]
    assert obj[int(box[1] + 1) : int(box[3]), int(box[0] + 1) : int(box[2])].mean() < 0.2  # mostly table
    loc = localize_object(box, pm, config=SURFACE)
    assert np.linalg.norm(loc.xyz - visible_centre) < 0.01
    # keeping too much of the box lets the table in front of the object's base pull the result off
    loose = localize_object(
        box, pm, config=LocalizationConfig(inner_fraction=1.0, seed_fraction=1.0, estimate="surface")
    )
    assert np.linalg.norm(loose.xyz - visible_centre) > 0.01


@pytest.mark.parametrize("radius", [0.03, 0.04, 0.06])
def test_centre_estimate_of_a_sphere_on_a_table(radius):
    """The default estimate against the sphere's analytic centre. Pixel-uniform points on a sphere's
    visible cap lie r·sqrt(1 - u) behind its front point, u uniform in [0, 1) (CDF x^2), so the cap's
    5 %-95 % depth range is (sqrt(0.95) - sqrt(0.05)) r = 0.751 r: the estimate is pushed back by at
    most that, and lands within 0.45 r of the centre where the surface is ~r away."""
    depth, box, visible_centre, centre, _ = _table_scene(np.random.default_rng(0), radius, 0.0, margin=1)
    s_true = 0.8
    pm = (_rays() * depth[..., None] / s_true).astype(np.float32)
    loc = localize_object(box, pm, scale=s_true)
    surf = localize_object(box, pm, scale=s_true, config=SURFACE)
    assert loc.reason is None and surf.depth_offset == 0.0
    cap_range = (np.sqrt(0.95) - np.sqrt(0.05)) * radius
    assert 0.5 * radius < loc.depth_offset <= cap_range + 1e-3, (loc.depth_offset, cap_range)
    assert np.linalg.norm(loc.xyz - centre) < 0.45 * radius, (loc.xyz, centre)
    assert np.linalg.norm(surf.xyz - centre) > 0.9 * radius
    # the centre lies on the surface point's viewing ray, depth_offset behind it
    ray = surf.xyz / np.linalg.norm(surf.xyz)
    np.testing.assert_allclose(loc.xyz, surf.xyz + loc.depth_offset * ray, atol=1e-6)


def test_centre_estimate_of_a_box_standing_on_a_table():
    """A 7 x 7 x 6 cm box (axis-aligned, standing on the table) ray-cast by the slab method: the camera
    sees its top and front faces; the estimate must lie nearer the box's centre than its surface does."""
    R, t = _look_at(np.array([0.02, -0.5, 0.45]), np.array([0.0, 0.0, 0.0]))
    lo_w, hi_w = np.array([-0.035, -0.035, 0.0]), np.array([0.035, 0.035, 0.06])
    centre = R @ ((lo_w + hi_w) / 2) + t
    C = -R.T @ t  # camera centre in the world
    dirs = _rays() @ R  # (H, W, 3) world directions of the pixel rays (z = 1 in the camera)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo_w - C) / dirs, (hi_w - C) / dirs
    t_near = np.minimum(t1, t2).max(-1)
    t_far = np.maximum(t1, t2).min(-1)
    hit = (t_near <= t_far) & (t_far > 0)
    plane = (
        -C[2] / dirs[..., 2]
    )  # the table z = 0; depth = ray parameter since the camera-frame ray has z = 1
    plane = np.where(plane > 0, plane, np.inf)
    depth = np.where(hit & (t_near < plane), t_near, plane)
    ii, jj = np.nonzero(hit)
    box = [jj.min() - 0.5, ii.min() - 0.5, jj.max() + 0.5, ii.max() + 0.5]
    pm = _rays() * depth[..., None]
    loc = localize_object(box, pm)
    surf = localize_object(box, pm, config=SURFACE)
    err, err_surface = np.linalg.norm(loc.xyz - centre), np.linalg.norm(surf.xyz - centre)
    assert err_surface > 0.03 and err < 0.015 and err < 0.5 * err_surface, (err, err_surface)


def test_centre_estimate_of_a_flat_face_stays_on_it():
    """A camera-facing plane (a box's front face at 0.7 m): the visible shell has no depth, so the
    centre estimate does not move behind the face."""
    pm = _rays() * 1.5
    pm[40:80, 60:100] = _rays()[40:80, 60:100] * 0.7
    loc = localize_object([55.5, 35.5, 104.5, 84.5], pm)
    assert loc.depth_offset < 1e-9 and loc.xyz[2] == pytest.approx(0.7)


def test_empty_and_degenerate_boxes_give_reasons_not_numbers():
    pm = (_rays() * 0.8).astype(np.float32)
    pm[10:30, 10:30] = np.nan
    pm[40:60, 40:60, 2] = -1.0
    cases = {
        "zero or negative area": [50, 50, 50, 70],
        "negative area": [60, 50, 40, 70],
        "outside": [-40, -40, -1, -1],
        "outside ": [W + 2, 10, W + 20, 30],
        "finite point": [10, 10, 29, 29],
        "z > 0": [40, 40, 59, 59],
    }
    for key, box in cases.items():
        loc = localize_object(box, pm)
        assert loc.xyz is None and key.strip() in loc.reason and isinstance(loc.reason, str), (box, loc)
    # a sub-pixel box reads the one pixel under it: too few for the default, fine when allowed
    assert "only 1 finite point" in localize_object([30.2, 70.1, 30.6, 70.3], pm).reason
    loc = localize_object([30.2, 70.1, 30.6, 70.3], pm, config=LocalizationConfig(min_pixels=1))
    np.testing.assert_allclose(loc.xyz, pm[70, 30], rtol=1e-6)
    # a box half outside the image is clipped
    locs = localize_objects(np.array([[-20.0, -20.0, 20.0, 8.0], [0, 0, 0, 0]]), pm)
    assert locs[0].xyz is not None and locs[0].xyz[0] < 0 and locs[1].xyz is None


def test_seed_in_a_depth_gap_and_an_occluding_finger():
    pm = _rays() * 1.0
    pm[:, 80:] *= 2.0  # left half of the box at 1 m, right half at 2 m: the centre median falls in the gap
    loc = localize_object([60, 40, 100, 80], pm, config=LocalizationConfig(inner_fraction=1.0))
    assert loc.xyz is not None and loc.xyz[2] in (1.0, 2.0)
    # a finger (3 columns, 0.3 m nearer) across the middle of a box around a flat object at 0.9 m
    pm = _rays() * 0.9
    pm[:, 78:81] *= 0.6 / 0.9
    loc = localize_object([50, 30, 110, 90], pm)
    assert loc.xyz[2] == pytest.approx(0.9)


# ---------------------------------------------------------------- bad input

PM = np.ones((H, W, 3), dtype=np.float32)
J = np.array([[0.0, 0.0, 1.0]] * 3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: calibrate_scale([[0.0, np.nan, 1.0]], PM, K), "joints_cam.*non-finite"),
        (lambda: calibrate_scale(J[:, :2], PM, K), "joints_cam: expected shape"),
        (lambda: calibrate_scale(J, PM[..., :2], K), "pointmap: expected shape"),
        (lambda: calibrate_scale(J, PM.astype(int), K), "pointmap: expected a floating-point"),
        (lambda: calibrate_scale(J, PM, K * 0), "K: focal lengths"),
        (lambda: calibrate_scale(J, PM, K, min_valid=0), "min_valid"),
        (lambda: calibrate_scale(J, PM, K, joint_valid=np.ones(4, bool)), "joint_valid: expected shape"),
        (lambda: calibrate_scale(J, np.stack([PM, PM]), K), r"joints_cam: with pointmap of 2 frames"),
        (lambda: calibrate_scale(J, PM, np.stack([K, K])), r"K: expected shape \(3, 3\) for pointmap"),
        (lambda: localize_object([0, 0, np.nan, 5], PM), "box_xyxy.*non-finite"),
        (lambda: localize_object([0, 0, 5], PM), "box_xyxy: expected shape"),
        (lambda: localize_object([0, 0, 5, 5], PM[0]), "pointmap: expected shape"),
        (lambda: localize_object([0, 0, 5, 5], PM, scale=0.0), "scale: expected a finite number > 0"),
        (lambda: localize_object([0, 0, 5, 5], PM, scale=float("nan")), "scale"),
        (lambda: localize_object([0, 0, 5, 5], PM, scale=None), "scale"),
        (lambda: localize_objects([0, 0, 5, 5], PM), r"boxes_xyxy: expected shape \(B, 4\)"),
        (lambda: LocalizationConfig(inner_fraction=0.0), "inner_fraction"),
        (lambda: LocalizationConfig(min_pixels=0), "min_pixels"),
        (lambda: LocalizationConfig(estimate="middle"), "estimate: expected one of"),
        (lambda: LocalizationConfig(shell_quantile=0.5), "shell_quantile"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
