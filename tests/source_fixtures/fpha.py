"""A tiny FPHA sequence in the README's layout (what load_example.py reads), from a synthetic MANO hand.

    from tests.source_fixtures.fpha import build_fpha
    truth = build_fpha(tmp_path / "fpha", tmp_path / "mano")

Written: `Video_files/Subject_1/put_salt/1/{color/color_%04d.jpeg (1920×1080), depth/depth_%04d.png
(640×480 uint16 mm)}`, `Hand_pose_annotation_v1/Subject_1/put_salt/1/skeleton.txt` (t + 21×3 mm in FPHA's
joint order, depth-camera frame) and `Object_6D_pose_annotation_v1/.../object_pose.txt` (t + the 4×4
object→world matrix column by column, mm). The numbers are written here from the README's camera values,
independently of the adapter's constants. Frame `absent` has an all-zero skeleton line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
from scipy.spatial.transform import Rotation

from tests.source_fixtures._common import pose_mano, render_rgbd, write_depth_mm, write_mano_files

REL = ("Subject_1", "put_salt", "1")
# README: RGB intrinsics, depth intrinsics, depth → colour extrinsic (t in mm)
COLOR = (1395.749023, 1395.749268, 935.732544, 540.681030)
DEPTH = (475.065948, 475.065857, 315.944855, 245.287079)
EXTR_R = np.array(
    [
        [0.999988496304, -0.00468848412856, 0.000982563360594],
        [0.00469115935266, 0.999985218048, -0.00273845880292],
        [-0.000969709653873, 0.00274303671904, 0.99999576807],
    ]
)
EXTR_T_MM = np.array([25.7, 1.22, 3.902])
# FPHA joint j is OpenPose joint OPENPOSE_OF_FPHA[j]: [Wrist, TMCP, IMCP, MMCP, RMCP, PMCP, TPIP, TDIP, TTIP,
# IPIP, IDIP, ITIP, MPIP, MDIP, MTIP, RPIP, RDIP, RTIP, PPIP, PDIP, PTIP] in OpenPose numbering
OPENPOSE_OF_FPHA = [0, 1, 5, 9, 13, 17, 2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 16, 18, 19, 20]


def K_of(fx, fy, cx, cy) -> np.ndarray:
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])


def build_fpha(root: Path, mano_dir: Path, num_frames: int = 61, absent: int = 30, seed: int = 0) -> dict:
    """Writes the fixture; returns the truth: joints (F, 21, 3) in OpenPose order, depth-camera metres."""
    rng = np.random.default_rng(seed)
    write_mano_files(mano_dir)
    s = np.linspace(0, 1, num_frames)
    orient = np.column_stack([np.full(num_frames, np.pi / 2), 0.3 * s, 0.1 * s])
    joints = pose_mano(
        mano_dir,
        "right",
        orient,
        rng.normal(0, 0.15, (num_frames, 45)),
        np.tile(rng.normal(0, 0.5, 10), (num_frames, 1)),
        np.array([-0.06, 0.03, 0.42]) + s[:, None] * np.array([0.04, -0.02, 0.03]),
        fingertips="manopth",
    )
    obj_t = np.array([0.12, 0.08, 0.5]) + s[:, None] * np.array([-0.05, 0.0, 0.0])  # metres, depth camera
    obj_R = Rotation.from_euler("xz", [[20 * si, 10] for si in s], degrees=True).as_matrix()

    video = Path(root) / "Video_files" / Path(*REL)
    (video / "color").mkdir(parents=True, exist_ok=True)
    (video / "depth").mkdir(parents=True, exist_ok=True)
    skel_lines, obj_lines = [], []
    Kc, Kd = K_of(*COLOR), K_of(*DEPTH)
    for f in range(num_frames):
        j = joints[f]
        fpha = np.zeros((21, 3)) if f == absent else j[OPENPOSE_OF_FPHA] * 1000.0
        skel_lines.append(" ".join([str(f)] + [f"{v:.6f}" for v in fpha.ravel()]))
        M = np.eye(4)
        M[:3, :3], M[:3, 3] = obj_R[f], obj_t[f] * 1000.0
        obj_lines.append(" ".join([str(f)] + [f"{v:.9g}" for v in M.T.ravel()]))  # M11 M21 M31 M41 M12 ...
        hand = [] if f == absent else [(j, 0.009, (230, 190, 170), 1)]
        blobs = hand + [(obj_t[f], 0.03, (250, 250, 250), 2)]
        _, depth, _ = render_rgbd(Kd, (480, 640), blobs, background_z=0.8, seed=f)
        write_depth_mm(video / "depth" / f"depth_{f:04d}.png", depth)
        cam = lambda p: np.asarray(p) @ EXTR_R.T + EXTR_T_MM / 1000.0  # noqa: E731
        rgb, _, _ = render_rgbd(
            Kc, (1080, 1920), [(cam(b[0]), *b[1:]) for b in blobs], background_z=0.8, seed=f
        )
        PIL.Image.fromarray(rgb).save(video / "color" / f"color_{f:04d}.jpeg", quality=90)
    skel = Path(root) / "Hand_pose_annotation_v1" / Path(*REL) / "skeleton.txt"
    skel.parent.mkdir(parents=True, exist_ok=True)
    skel.write_text("\n".join(skel_lines) + "\n")
    obj = Path(root) / "Object_6D_pose_annotation_v1" / Path(*REL) / "object_pose.txt"
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_text("\n".join(obj_lines) + "\n")
    return {"joints": joints, "absent": absent, "object_t": obj_t}
