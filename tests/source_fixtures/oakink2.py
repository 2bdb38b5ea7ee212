"""A tiny OakInk2 tree in the layout of the OakInk2 README / toolkit, with known answers.

    build_oakink2(tmp / "o")  # → tmp/o/OakInk-v2/{anno_preview,data,object_raw,program}, tmp/o/mano_v1_2/models

The annotation pickle holds torch tensors in `raw_mano` (as the real files do) and is written with
`pickle.dump`. Hands: 16 unit quaternions (w, x, y, z) per frame; the truth joints are posed with smplx's MANO
(`flat_hand_mean=True`, axis-angle from the quaternions by scipy, manopth fingertips), centred on the wrist
and moved to `tsl`, as manotorch's `ManoLayer(rot_mode="quat", center_idx=0)` + tsl does.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from scipy.spatial.transform import Rotation

from tests.source_fixtures._common import (
    MANOPTH_TIPS,
    look_at,
    noise_image,
    project_world,
    smplx_hand,
    write_mano_files,
)

SEQ_KEY = "scene_03__A004/seq__97c7b9ff5e4d__2023-04-25-15-58-26"
TOKEN = SEQ_KEY.replace("/", "++")
EGO_SERIAL, ALLO_SERIAL = "130000000000", "140000000000"
NUM_COLOR = 61  # 2 s of colour at 30 fps; mocap ids step by 4 (120 Hz)
FIRST_FID = 100
IMAGE_HW = (120, 212)
K_EGO = np.array([[150.0, 0.0, 105.5], [0.0, 151.0, 59.5], [0.0, 0.0, 1.0]])
OBJECTS = {"O02@0007@00001": "teapot", "O02@0039@00003": "cup"}
SEGMENTS = {  # str(((lh range) | None, (rh range) | None)) → seg_desc, mocap frame ids
    str(((100, 200), (100, 210))): "grasp the teapot and lift it",
    str((None, (210, 341))): "pour water from the teapot into the cup",
}


def fids() -> list[int]:
    return [FIRST_FID + 4 * i for i in range(NUM_COLOR)]


def build_oakink2(base: Path, images: bool = True) -> dict:
    root = base / "OakInk-v2"
    mano_dir = write_mano_files(base / "mano_v1_2" / "models")
    mocap = list(range(FIRST_FID, fids()[-1] + 1))
    rng = np.random.default_rng(7)
    n = len(mocap)
    s = np.linspace(0, 1, n)
    quats, tsl, betas, joints = {}, {}, {}, {}
    for side, x, seed in (("lh", -0.1, 11), ("rh", 0.1, 12)):
        r0, r1 = Rotation.random(random_state=seed), Rotation.random(random_state=seed + 1)
        glob = r0 * Rotation.from_rotvec(s[:, None] * (r0.inv() * r1).as_rotvec())
        fingers = Rotation.from_rotvec((rng.normal(size=(15, 3)) * 0.3)[None] * (0.5 + s[:, None, None]))
        q = np.zeros((n, 16, 4))
        q[:, 0] = glob.as_quat()[:, [3, 0, 1, 2]]
        q[:, 1:] = fingers.as_quat().reshape(n, 15, 4)[..., [3, 0, 1, 2]]
        quats[side] = q
        tsl[side] = np.stack([x + 0.05 * s, 0.4 + 0.0 * s, 0.02 * s], axis=1)
        betas[side] = rng.normal(size=10) * 0.5
        full = Rotation.from_quat(q.reshape(-1, 4)[:, [1, 2, 3, 0]]).as_rotvec().reshape(n, 16, 3)
        params = {
            "global_orient": full[:, 0],
            "hand_pose": full[:, 1:].reshape(n, 45),
            "betas": np.tile(betas[side], (n, 1)),
        }
        mano_side = "left" if side == "lh" else "right"
        j, _ = smplx_hand(mano_dir / f"MANO_{mano_side.upper()}.pkl", mano_side, params, True, MANOPTH_TIPS)
        joints[mano_side] = j - j[:, :1] + tsl[side][:, None]  # MANO order + tips, wrist at tsl
    raw_mano = {
        f: {
            f"{h}__{k}": torch.tensor(v, dtype=torch.float32).unsqueeze(0)
            for h in ("lh", "rh")
            for k, v in (("pose_coeffs", quats[h][i]), ("tsl", tsl[h][i]), ("betas", betas[h]))
        }
        for i, f in enumerate(mocap)
    }
    color = fids()
    cam_extr, cam_intr = {"egocentric": {}, "allocentric_top": {}}, {"egocentric": {}, "allocentric_top": {}}
    for i, f in enumerate(color):
        R, t = look_at((0.05 * np.sin(0.02 * i), -0.2, 0.25), (0.0, 0.4, 0.001 * i), up=(0, 0, 1))
        E = np.eye(4)
        E[:3, :3], E[:3, 3] = R, t
        cam_extr["egocentric"][f] = E.astype(np.float32)
        cam_intr["egocentric"][f] = K_EGO.astype(np.float32)
        Ra, ta = look_at((0.0, 0.4, 1.0), (0.0, 0.4, 0.0), up=(0, 1, 0))
        A = np.eye(4)
        A[:3, :3], A[:3, 3] = Ra, ta
        cam_extr["allocentric_top"][f] = A.astype(np.float32)
        cam_intr["allocentric_top"][f] = K_EGO.astype(np.float32)
    obj_transf = {}
    obj_pos = {}
    for o, (oid, x) in enumerate(zip(OBJECTS, (-0.05, 0.08))):
        T = np.tile(np.eye(4), (n, 1, 1))
        T[:, :3, :3] = Rotation.from_rotvec(np.outer(s, [0, 0, 0.4 * (o + 1)])).as_matrix()
        T[:, :3, 3] = np.stack([x + 0.03 * s, 0.45 + 0.0 * s, -0.05 + 0.1 * s * (o == 0)], axis=1)
        obj_transf[oid] = {f: T[i].astype(np.float32) for i, f in enumerate(mocap)}
        obj_pos[oid] = T[:, :3, 3]
    anno = {
        "cam_def": {EGO_SERIAL: "egocentric", ALLO_SERIAL: "allocentric_top"},
        "cam_selection": ["allocentric_top", "egocentric"],
        "frame_id_list": color,
        "cam_intr": cam_intr,
        "cam_extr": cam_extr,
        "mocap_frame_id_list": mocap,
        "obj_list": list(OBJECTS),
        "obj_transf": obj_transf,
        "raw_mano": raw_mano,
        "raw_smplx": {f: {"body_pose": torch.zeros(1, 63)} for f in mocap},
    }
    (root / "anno_preview").mkdir(parents=True, exist_ok=True)
    with open(root / "anno_preview" / f"{TOKEN}.pkl", "wb") as fh:
        pickle.dump(anno, fh)
    if images:
        for serial in (EGO_SERIAL, ALLO_SERIAL):
            folder = root / "data" / TOKEN / serial
            folder.mkdir(parents=True, exist_ok=True)
            for i, f in enumerate(color):
                PIL.Image.fromarray(noise_image(*IMAGE_HW, i + (0 if serial == EGO_SERIAL else 100))).save(
                    folder / f"{f:06d}.png"
                )
    (root / "object_raw").mkdir(parents=True, exist_ok=True)
    (root / "object_raw" / "obj_desc.json").write_text(
        json.dumps({k: {"obj_name": v} for k, v in OBJECTS.items()})
    )
    prog = root / "program"
    for sub in ("desc_info", "program_info", "pdg", "initial_condition_info"):
        (prog / sub).mkdir(parents=True, exist_ok=True)
    (prog / "task_target.json").write_text(json.dumps({SEQ_KEY: "make a cup of tea"}))
    (prog / "desc_info" / f"{TOKEN}.json").write_text(
        json.dumps({k: {"seg_desc": v} for k, v in SEGMENTS.items()})
    )
    (prog / "program_info" / f"{TOKEN}.json").write_text(
        json.dumps({k: {"primitive": "pour", "obj_list": list(OBJECTS)} for k in SEGMENTS})
    )
    (prog / "pdg" / f"{TOKEN}.json").write_text(
        json.dumps({"id_map": {k: i for i, k in enumerate(SEGMENTS)}, "e": [[0, 1]]})
    )
    index = {f: mocap.index(f) for f in color}
    uv = {
        side: np.stack(
            [
                project_world(
                    K_EGO,
                    cam_extr["egocentric"][f][:3, :3],
                    cam_extr["egocentric"][f][:3, 3],
                    joints[side][index[f]],
                )
                for f in color
            ]
        )
        for side in joints
    }
    return {
        "root": root,
        "mano_dir": mano_dir,
        "uv_mano_order": uv,  # (61, 21, 2) per side: MANO 16 + tips order, per colour frame
        "joints_mano_order": {side: joints[side][[index[f] for f in color]] for side in joints},
        "tsl": {"left": tsl["lh"][[index[f] for f in color]], "right": tsl["rh"][[index[f] for f in color]]},
        "quats": quats,
        "obj_pos": {OBJECTS[k]: v[[index[f] for f in color]] for k, v in obj_pos.items()},
    }
