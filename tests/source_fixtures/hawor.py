"""A tiny HaWoR output tree, as `demo.py --video_path <root>/kitchen/video_0.mp4` writes it, with known answers.

    build_hawor(tmp / "hawor")  # → kitchen/video_0/{extracted_images/%04d.jpg, SLAM/hawor_slam_w_scale_0_61.npz,
                                #   world_space_res.pth}, tasks.json, _DATA/data/mano, _DATA/data_left/mano_left

`world_space_res.pth` is written with `joblib.dump` of the list of torch tensors (and the numpy validity
mask) that `hawor_infiller` saves. The SLAM file stores camera → world translation / scale and an (x, y, z, w)
quaternion. Truth joints: smplx MANO with no mean pose, smplx tips, the left model's shapedirs x flipped
(HaWoR's `run_mano_left(fix_shapedirs=True)`), then projected by the fixture's own cameras.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import joblib
import numpy as np
import PIL.Image
import torch
from scipy.spatial.transform import Rotation

from tests.source_fixtures._common import (
    noise_image,
    project_world,
    random_hand_params,
    smplx_hand,
    write_mano_files,
)

VIDEO = "kitchen/video_0"
NUM_FRAMES = 61
IMAGE_HW = (120, 212)
FOCAL = 212.0  # HaWoR's default guess: max(h, w)
SCALE = 0.37  # SLAM units → metres
TASK = "pick up the cup and put it on the plate"
LEFT_INVALID = range(20, 40)  # frames where HaWoR found no left hand (pred_valid = 0)


def build_hawor(root: Path, images: bool = True) -> dict:
    mano = write_mano_files(root / "_DATA" / "data" / "mano")
    left_dir = root / "_DATA" / "data_left" / "mano_left"
    left_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(mano / "MANO_LEFT.pkl", left_dir / "MANO_LEFT.pkl")  # HaWoR keeps the left model apart
    T = NUM_FRAMES
    s = np.linspace(0, 1, T)
    # camera → world: the first camera is the SLAM world; the head turns and moves a little
    R_c2w = Rotation.from_rotvec(np.stack([0.2 * s, -0.25 * s, 0.05 * s], 1)).as_matrix()
    t_c2w = np.stack([0.06 * s, 0.02 * s, -0.03 * s], 1)
    K = np.array([[FOCAL, 0.0, IMAGE_HW[1] / 2], [0.0, FOCAL, IMAGE_HW[0] / 2], [0.0, 0.0, 1.0]])
    folder = root / VIDEO
    (folder / "SLAM").mkdir(parents=True, exist_ok=True)
    traj = np.concatenate([t_c2w / SCALE, Rotation.from_matrix(R_c2w).as_quat()], axis=1)  # (x, y, z, w)
    np.savez(
        folder / "SLAM" / f"hawor_slam_w_scale_0_{T}.npz",
        tstamp=np.arange(T),
        disps=np.ones((T, 4, 4)),
        traj=traj,
        img_focal=FOCAL,
        img_center=K[:2, 2],
        scale=SCALE,
    )
    params, uv, joints = {}, {}, {}
    # hands in front of the first camera (SLAM world = first camera frame, OpenCV axes: z forward)
    for side, seed, x in (("left", 41, -0.05), ("right", 42, 0.07)):
        p = random_hand_params(T, seed, np.array([x, 0.05, 0.45]))
        mano_file = (left_dir if side == "left" else mano) / f"MANO_{side.upper()}.pkl"
        j, _ = smplx_hand(mano_file, side, p, flat_hand_mean=True, flip_shapedirs=side == "left")
        params[side], joints[side] = p, j
        uv[side] = np.stack([project_world(K, R_c2w[k].T, -R_c2w[k].T @ t_c2w[k], j[k]) for k in range(T)])
    order = ("left", "right")  # hand 0 = left, 1 = right
    valid = np.ones((2, T), bool)
    valid[0, list(LEFT_INVALID)] = False
    result = [
        torch.tensor(np.stack([params[h]["transl"] for h in order]), dtype=torch.float32),
        torch.tensor(np.stack([params[h]["global_orient"] for h in order]), dtype=torch.float32),
        torch.tensor(np.stack([params[h]["hand_pose"] for h in order]), dtype=torch.float32),
        torch.tensor(np.stack([params[h]["betas"] for h in order]), dtype=torch.float32),
        valid,
    ]
    joblib.dump(result, folder / "world_space_res.pth")
    if images:
        (folder / "extracted_images").mkdir(parents=True, exist_ok=True)
        for k in range(T):
            PIL.Image.fromarray(noise_image(*IMAGE_HW, k)).save(folder / "extracted_images" / f"{k:04d}.jpg")
    (root / "tasks.json").write_text(json.dumps({VIDEO: TASK}))
    return {
        "root": root,
        "uv_mano_order": uv,
        "joints_mano_order": joints,
        "R_c2w": R_c2w,
        "t_c2w": t_c2w,
        "K": K,
    }
