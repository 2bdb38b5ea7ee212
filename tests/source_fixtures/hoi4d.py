"""A tiny HOI4D tree in the layout of the HOI4D-Instructions README, with known answers.

    build_hoi4d(tmp / "hoi4d")  # → HOI4D_release/<vid>/align_{rgb,depth}/, HOI4D_annotations/<vid>/{3Dseg,objpose},
                                #   handpose/refinehandpose_{right,left}/<vid>/<t>.pickle, camera_params/, mano/

One video of 300 frames (15 fps). Hands are posed in the camera frame as the README's snippet does (smplx
MANO with `flat_hand_mean=True`, manopth tips, no centring, `+ trans`); `kps2D` is their K-projection in
manopth's (OpenPose) joint order. The left hand is annotated on frames 100-199 only. `output.log` holds the
camera → world poses of a slowly turning head camera.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from tests.source_fixtures._common import (
    MANO21_TO_OPENPOSE,
    MANOPTH_TIPS,
    noise_image,
    project_cam,
    random_hand_params,
    smplx_hand,
    write_mano_files,
    write_video,
)

VID = "ZY20210800001/H1/C2/N19/S100/s02/T2"  # C2 mug, T2 "Put it in the drawer"
NUM_FRAMES = 300
IMAGE_HW = (120, 212)
K = np.array([[160.0, 0.0, 105.0], [0.0, 160.0, 61.0], [0.0, 0.0, 1.0]])
LEFT_FRAMES = range(100, 200)


def camera_poses(T: int) -> np.ndarray:
    """(T, 4, 4) camera → world: the head turns by up to 0.3 rad and moves 10 cm."""
    s = np.linspace(0, 1, T)
    c2w = np.tile(np.eye(4), (T, 1, 1))
    c2w[:, :3, :3] = Rotation.from_rotvec(np.stack([0.1 * s, 0.3 * s, 0.0 * s], 1)).as_matrix()
    c2w[:, :3, 3] = np.stack([0.1 * s, -0.05 * s, 0.02 * s], 1) + [1.0, 2.0, 1.5]
    return c2w


def build_hoi4d(root: Path, videos: bool = True) -> dict:
    mano_dir = write_mano_files(root / "mano")
    T = NUM_FRAMES
    c2w = camera_poses(T)
    log = root / "HOI4D_annotations" / VID / "3Dseg" / "output.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(
        "".join(
            f"{k} {k} {k + 1}\n" + "".join(" ".join(f"{v:.17g}" for v in row) + "\n" for row in c2w[k])
            for k in range(T)
        )
    )
    cam_params = root / "camera_params" / VID.split("/")[0]
    cam_params.mkdir(parents=True, exist_ok=True)
    np.save(cam_params / "intrin.npy", K)
    kps2d, joints_cam, trans = {}, {}, {}
    for side, seed, x, y in (("right", 31, 0.03, 0.02), ("left", 32, -0.06, -0.07)):
        p = random_hand_params(T, seed, np.array([x, y, 0.55]))
        j, _ = smplx_hand(
            mano_dir / f"MANO_{side.upper()}.pkl",
            side,
            {k: v for k, v in p.items() if k != "transl"},
            True,
            MANOPTH_TIPS,
        )
        # manopth's output order is OpenPose; README: joints / 1000 + trans (metres here)
        cam = j[:, MANO21_TO_OPENPOSE] + p["transl"][:, None]
        uv = project_cam(K, cam)
        folder = root / "handpose" / f"refinehandpose_{side}" / VID
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(T) if side == "right" else LEFT_FRAMES:
            rec = {
                "poseCoeff": np.concatenate([p["global_orient"][k], p["hand_pose"][k]]).astype(np.float32),
                "beta": p["betas"][k].astype(np.float32),
                "trans": p["transl"][k].astype(np.float32),
                "kps2D": uv[k].astype(np.float32),
            }
            (folder / f"{k}.pickle").write_bytes(pickle.dumps(rec, protocol=2))
        kps2d[side], joints_cam[side], trans[side] = uv, cam, p["transl"]
    objpose = root / "HOI4D_annotations" / VID / "objpose"
    objpose.mkdir(parents=True, exist_ok=True)
    s = np.linspace(0, 1, T)
    obj_cam = np.stack([-0.02 + 0.05 * s, 0.06 + 0.0 * s, 0.5 - 0.05 * s], 1)
    for k in range(T):
        if k == 150:
            continue  # a frame without an object pose
        part = {
            "label": "mug",
            "center": dict(zip("xyz", obj_cam[k].tolist())),
            "rotation": {"x": 0.0, "y": 0.0, "z": 0.2 * s[k]},
            "dimensions": {"length": 0.08, "width": 0.08, "height": 0.1},
        }
        (objpose / f"{k}.json").write_text(json.dumps({"dataList": [part]}))
    (root / "HOI4D_annotations" / VID / "action").mkdir(parents=True, exist_ok=True)
    (root / "HOI4D_annotations" / VID / "action" / "color.json").write_text(
        json.dumps({"duration": 20.0, "events": [{"event": "Reach", "startTime": 0.0, "endTime": 20.0}]})
    )
    if videos:
        rgb = np.stack([noise_image(*IMAGE_HW, k) for k in range(T)])
        write_video(root / "HOI4D_release" / VID / "align_rgb" / "image.mp4", rgb, "libx264", fps=15)
        depth = (
            np.full((T, *IMAGE_HW), 600, np.uint16) + np.arange(T, dtype=np.uint16)[:, None, None]
        ).astype(np.uint16)
        depth[:, :10] = 0
        write_video(root / "HOI4D_release" / VID / "align_depth" / "depth_video.avi", depth, "ffv1", fps=15)
    obj_world = np.einsum("tij,tj->ti", c2w[:, :3, :3], obj_cam) + c2w[:, :3, 3]
    obj_world[150] = np.nan
    return {
        "root": root,
        "mano_dir": mano_dir,
        "kps2d": kps2d,
        "c2w": c2w,
        "obj_world": obj_world,
        "trans": trans,
    }
