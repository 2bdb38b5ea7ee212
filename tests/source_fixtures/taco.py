"""A tiny TACO tree in the layout of the TACO-Instructions README, with known answers.

    build_taco(tmp / "taco")  # → Hand_Poses/, Object_Poses/, Object_Models/, Egocentric_Camera_Parameters/,
                              #   Egocentric_RGB_Videos/ (H.264 mp4), Egocentric_Depth_Videos/ (16-bit FFV1 avi),
                              #   mano/MANO_{RIGHT,LEFT}.pkl (synthetic)

Hand pose files are `pickle.dump`s of dicts of **torch tensors**, as TACO's are. Truth joints: smplx's MANO
with `flat_hand_mean=True` and manopth fingertips, centred on the wrist and moved to `hand_trans` (what
manopth's `ManoLayer(center_idx=0)` + `hand_trans` gives in `hand_pose_loader.py`).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from tests.source_fixtures._common import (
    MANOPTH_TIPS,
    look_at,
    noise_image,
    project_world,
    random_hand_params,
    smplx_hand,
    write_mano_files,
    write_video,
)

TRIPLET = "(stir, spoon, bowl)"
SEQ = "20231105_019"
TOOL_ID, TARGET_ID = "047", "102"
NUM_FRAMES = 61
IMAGE_HW = (120, 212)  # TACO's videos are 1080 × 1920
K = np.array([[140.0, 0.0, 106.0], [0.0, 140.0, 60.0], [0.0, 0.0, 1.0]])
DEPTH_UNITS = 4000.0  # per metre


def build_taco(root: Path, videos: bool = True) -> dict:
    mano_dir = write_mano_files(root / "mano")
    T = NUM_FRAMES
    cams = [look_at((0.1 * np.sin(0.03 * k), -0.3, 0.35), (0.0, 0.0, 0.0)) for k in range(T)]
    extr = np.tile(np.eye(4), (T, 1, 1))
    extr[:, :3, :3] = [c[0] for c in cams]
    extr[:, :3, 3] = [c[1] for c in cams]
    hands_dir = root / "Hand_Poses" / TRIPLET / SEQ
    hands_dir.mkdir(parents=True, exist_ok=True)
    truth_joints, trans = {}, {}
    for side, seed, x in (("right", 21, 0.07), ("left", 22, -0.07)):
        p = random_hand_params(T, seed, np.array([x, 0.0, 0.02]))
        j, _ = smplx_hand(
            mano_dir / f"MANO_{side.upper()}.pkl", side, p, flat_hand_mean=True, tips=MANOPTH_TIPS
        )
        truth_joints[side] = j - j[:, :1] + p["transl"][:, None]
        trans[side] = p["transl"]
        theta = np.concatenate([p["global_orient"], p["hand_pose"]], axis=1)
        poses = {
            f"{k:05d}": {
                "hand_pose": torch.tensor(theta[k], dtype=torch.float32, requires_grad=side == "right"),
                "hand_trans": torch.tensor(p["transl"][k], dtype=torch.float32),
            }
            for k in range(T)
        }
        (hands_dir / f"{side}_hand.pkl").write_bytes(pickle.dumps(poses))
        shape = {"hand_shape": torch.tensor(p["betas"][:1], dtype=torch.float32)}
        (hands_dir / f"{side}_hand_shape.pkl").write_bytes(pickle.dumps(shape))
    obj_dir = root / "Object_Poses" / TRIPLET / SEQ
    obj_dir.mkdir(parents=True, exist_ok=True)
    models = root / "Object_Models"
    models.mkdir(parents=True, exist_ok=True)
    s = np.linspace(0, 1, T)
    centres = {}
    for role, oid, x, box in (
        ("tool", TOOL_ID, 0.05, (1.0, 1.0, 16.0)),
        ("target", TARGET_ID, -0.02, (14.0, 14.0, 7.0)),
    ):
        poses = np.tile(np.eye(4), (T, 1, 1))
        ang = 0.8 * s
        poses[:, 0, 0], poses[:, 0, 1], poses[:, 1, 0], poses[:, 1, 1] = (
            np.cos(ang),
            -np.sin(ang),
            np.sin(ang),
            np.cos(ang),
        )
        poses[:, :3, 3] = np.stack([x + 0.02 * s, 0.05 * s, 0.0 * s], axis=1)
        np.save(obj_dir / f"{role}_{oid}.npy", poses)
        lo, hi = np.array([-box[0] / 2, -box[1] / 2, 0.0]), np.array([box[0] / 2, box[1] / 2, box[2]])  # cm
        corners = np.array(
            [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
        )
        (models / f"{oid}_cm.obj").write_text("".join(f"v {a} {b} {c}\n" for a, b, c in corners))
        c_m = (lo + hi) / 2 / 100.0
        centres[role] = np.einsum("tij,j->ti", poses[:, :3, :3], c_m) + poses[:, :3, 3]
    cam_dir = root / "Egocentric_Camera_Parameters" / TRIPLET / SEQ
    cam_dir.mkdir(parents=True, exist_ok=True)
    np.savetxt(cam_dir / "egocentric_intrinsic.txt", K)
    np.save(cam_dir / "egocentric_frame_extrinsic.npy", extr)
    if videos:
        rgb = np.stack([noise_image(*IMAGE_HW, k) for k in range(T)])
        write_video(root / "Egocentric_RGB_Videos" / TRIPLET / SEQ / "color.mp4", rgb, "libx264")
        depth = (
            np.full((T, *IMAGE_HW), 0.5 * DEPTH_UNITS, np.uint16)
            + np.arange(T, dtype=np.uint16)[:, None, None]
        )
        depth[:, :, :20] = 0  # no return on the left edge
        write_video(root / "Egocentric_Depth_Videos" / TRIPLET / SEQ / "egocentric_depth.avi", depth, "ffv1")
    uv = {
        side: np.stack(
            [project_world(K, extr[k, :3, :3], extr[k, :3, 3], truth_joints[side][k]) for k in range(T)]
        )
        for side in truth_joints
    }
    return {
        "root": root,
        "mano_dir": mano_dir,
        "uv_mano_order": uv,
        "trans": trans,
        "extr": extr,
        "centres": centres,
    }
