"""A tiny H2O sequence in the layout of the H2O README (what h2oplayer reads), from synthetic MANO hands.

    from tests.source_fixtures.h2o import build_h2o
    truth = build_h2o(tmp_path / "h2o", tmp_path / "mano")

Written: `subject1/h1/0/cam{0,4}/` with `rgb/`, `depth/`, `cam_pose/`, `hand_pose/`, `hand_pose_MANO/`,
`obj_pose/`, `obj_pose_RT/`, `verb_label/` (+ `action_label/` in cam4) per frame `%06d`, and
`cam_intrinsics.txt`. cam4 (egocentric, the real cam4 intrinsics at 1280×720) moves with the head; cam0
is fixed. Both hands are posed in the world with h2oplayer's MANO convention (45 axis-angles,
flat_hand_mean True, manopth tips, translation added last) and written per camera in that camera's frame.
The left hand is not annotated on frame `absent_left` (flag 0, zeros).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
from scipy.spatial.transform import Rotation

from tests.source_fixtures._common import (
    camera_to_world,
    look_at,
    pose_mano,
    render_rgbd,
    write_depth_mm,
    write_mano_files,
)

SEQ = ("subject1", "h1", "0")
INTRINSICS = {"cam4": (636.6593, 636.2520, 635.2839, 366.8740), "cam0": (612.3, 611.9, 640.8, 361.2)}
HW = (720, 1280)
OBJECT_CLASS = 5  # milk
ACTION = 23  # pour milk
VERB = 5  # pour


def camera_pose(centre, target) -> np.ndarray:
    """4×4 camera→world of an OpenCV camera at `centre` looking at `target`, image y along world +y."""
    return camera_to_world(*look_at(centre, target, up=(0.0, -1.0, 0.0)))


def _write(path: Path, values) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(f"{v:.9g}" for v in np.ravel(values)) + "\n")


def _in_camera(T_wc, orient_w, root_rest, root_w):
    """MANO global orientation and translation re-expressed in a camera (MANO rotates about its rest root)."""
    R_cw, t_cw = T_wc[:3, :3].T, -T_wc[:3, :3].T @ T_wc[:3, 3]
    orient = (Rotation.from_matrix(R_cw) * Rotation.from_rotvec(orient_w)).as_rotvec()
    return orient, root_w @ R_cw.T + t_cw - root_rest


def build_h2o(root: Path, mano_dir: Path, num_frames: int = 31, absent_left: int = 30, seed: int = 0) -> dict:
    """Writes the fixture; returns the truth: world joints per side (F, 21, 3), cam poses, object centre."""
    rng = np.random.default_rng(seed)
    write_mano_files(mano_dir)
    seq = Path(root).joinpath(*SEQ)
    s = np.linspace(0, 1, num_frames)
    T_wc = {
        "cam4": np.stack(
            [
                camera_pose(np.array([0.02 * si, -0.05, 0.0]), np.array([0.0, 0.02 + 0.03 * si, 0.5]))
                for si in s
            ]
        ),
        "cam0": np.tile(
            camera_pose(np.array([0.45, -0.25, 0.35]), np.array([0.0, 0.0, 0.5])), (num_frames, 1, 1)
        ),
    }
    layer_kw = {"use_pca": False, "flat_hand_mean": True, "fingertips": "manopth"}
    truth = {"T_wc": T_wc, "joints": {}, "mano": {}, "absent_left": absent_left}
    for side, x in (("left", -0.09), ("right", 0.08)):
        orient = np.column_stack([np.full(num_frames, np.pi / 2), 0.2 * s, np.zeros(num_frames)])
        hand_pose = rng.normal(0, 0.15, (num_frames, 45))
        betas = np.tile(rng.normal(0, 0.5, 10), (num_frames, 1))
        transl = np.array([x, 0.04, 0.5]) + s[:, None] * np.array([0.03, -0.02, -0.04])
        joints = pose_mano(mano_dir, side, orient, hand_pose, betas, transl, **layer_kw)
        rest_root = pose_mano(mano_dir, side, orient, hand_pose, betas, 0 * transl, **layer_kw)[:, 0]
        truth["joints"][side] = joints
        truth["mano"][side] = {
            "orient": orient,
            "hand_pose": hand_pose,
            "betas": betas,
            "rest_root": rest_root,
        }
    obj_centre = np.array([0.0, 0.1, 0.6])
    half = np.array([0.035, 0.09, 0.035])
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * half
    edges = [(a, b) for a in range(8) for b in range(a + 1, 8) if np.sum(corners[a] != corners[b]) == 1]
    obj_points_w = obj_centre + np.vstack(
        [np.zeros(3), corners, [(corners[a] + corners[b]) / 2 for a, b in edges]]
    )

    for cam_name, (fx, fy, cx, cy) in INTRINSICS.items():
        cam = seq / cam_name
        K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
        _write(cam / "cam_intrinsics.txt", [fx, fy, cx, cy, HW[1], HW[0]])
        for f in range(num_frames):
            Twc = T_wc[cam_name][f]
            R_cw, t_cw = Twc[:3, :3].T, -Twc[:3, :3].T @ Twc[:3, 3]
            _write(cam / "cam_pose" / f"{f:06d}.txt", Twc)
            hand_rows, mano_rows, blobs = [], [], []
            for side in ("left", "right"):
                j_cam = truth["joints"][side][f] @ R_cw.T + t_cw
                m = truth["mano"][side]
                orient_c, transl_c = _in_camera(
                    Twc, m["orient"][f], m["rest_root"][f], truth["joints"][side][f, 0]
                )
                if side == "left" and f == absent_left:
                    hand_rows.append(np.zeros(64))
                    mano_rows.append(np.zeros(62))
                    continue
                hand_rows.append(np.concatenate([[1.0], j_cam.ravel()]))
                mano_rows.append(
                    np.concatenate([[1.0], transl_c, orient_c, m["hand_pose"][f], m["betas"][f]])
                )
                blobs.append((j_cam, 0.009, (230, 190, 170), 1))
            _write(cam / "hand_pose" / f"{f:06d}.txt", np.concatenate(hand_rows))
            _write(cam / "hand_pose_MANO" / f"{f:06d}.txt", np.concatenate(mano_rows))
            obj_cam = obj_points_w @ R_cw.T + t_cw
            _write(cam / "obj_pose" / f"{f:06d}.txt", np.concatenate([[OBJECT_CLASS], obj_cam.ravel()]))
            T_co = np.eye(4)
            T_co[:3, 3] = obj_cam[0]
            T_co[:3, :3] = R_cw
            _write(cam / "obj_pose_RT" / f"{f:06d}.txt", np.concatenate([[OBJECT_CLASS], T_co.ravel()]))
            _write(cam / "verb_label" / f"{f:06d}.txt", [VERB if f >= 5 else 0])
            if cam_name == "cam4":
                _write(cam / "action_label" / f"{f:06d}.txt", [ACTION if f >= 5 else 0])
            blobs.append((obj_cam[0], 0.04, (240, 240, 240), 2))
            rgb, depth, _ = render_rgbd(K, HW, blobs, background_z=1.2, seed=f)
            (cam / "rgb").mkdir(exist_ok=True)
            (cam / "depth").mkdir(exist_ok=True)
            PIL.Image.fromarray(rgb).save(cam / "rgb" / f"{f:06d}.png", compress_level=1)
            write_depth_mm(cam / "depth" / f"{f:06d}.png", depth)
    truth["object_centre"] = obj_centre
    return truth
