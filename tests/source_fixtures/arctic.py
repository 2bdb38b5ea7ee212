"""A tiny ARCTIC tree in the layout of `docs/data/data_doc.md` (zc-alexfan/arctic), with known answers.

    build_arctic(tmp / "arctic")  # → tmp/arctic/arctic_data/data/{raw_seqs,meta,images,processed_seqs},
                                  #   tmp/arctic/body_models/mano/MANO_{RIGHT,LEFT}.pkl (synthetic MANO)

Numbers: a synthetic MANO model (tests/test_mano.py), smooth random MANO parameters for both hands near the
world origin, an egocentric camera circling slowly and looking at them. The hand joints of the fixture
("ARCTIC's own joints") are posed with **smplx's MANO** (`use_pca=False, flat_hand_mean=False`, as ARCTIC's
`build_mano_aa` does), independently of `hand3d_dataset.mano`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import PIL.Image
from scipy.spatial.transform import Rotation

from tests.source_fixtures._common import (
    look_at,
    noise_image,
    project_world,
    random_hand_params,
    smplx_hand,
    write_mano_files,
)

SUBJECT = "s01"
SEQUENCE = "box_grab_01"  # ARCTIC names: <object>_<action>_<nn>
BROKEN = "laptop_use_01"  # a second sequence whose egocam file is missing
NUM_FRAMES = 61  # 2 s at 30 fps → sampled frames 0, 30, 60 at 1 fps
IMAGE_WH = (280, 200)  # the fixture's "egocentric" images (ARCTIC's are 2800 × 2000)
IOI_OFFSET = 1
K_EGO = np.array([[260.0, 0.0, 139.5], [0.0, 262.0, 99.5], [0.0, 0.0, 1.0]])


def _npy_dict(path: Path, obj: dict) -> None:
    """np.save of a dict, as ARCTIC writes its .npy files (a pickled 0-d object array)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.array(obj, dtype=object), allow_pickle=True)


def build_arctic(root: Path, images: bool = True) -> dict:
    """Writes the tree; returns the truth: world → ego cameras, ARCTIC-order joints, object centres."""
    data = root / "arctic_data" / "data"
    mano_dir = write_mano_files(root / "body_models" / "mano")
    T = NUM_FRAMES
    cams = [look_at((0.25 * np.cos(0.01 * k), -0.35 + 0.002 * k, 0.45), (0.0, 0.0, 0.0)) for k in range(T)]
    R = np.stack([c[0] for c in cams])
    t = np.stack([c[1] for c in cams])
    hands, joints_arctic = {}, {}
    for side, seed, x in (("right", 3, 0.08), ("left", 4, -0.08)):
        p = random_hand_params(T, seed, np.array([x, 0.0, 0.0]))
        hands[side] = p
        joints_arctic[side], _ = smplx_hand(
            mano_dir / f"MANO_{side.upper()}.pkl", side, p, flat_hand_mean=False
        )
    raw = data / "raw_seqs" / SUBJECT
    mano = {
        side: {
            "rot": p["global_orient"].astype(np.float32),
            "pose": p["hand_pose"].astype(np.float32),
            "trans": p["transl"].astype(np.float32),
            "shape": p["betas"][0].astype(np.float32),
            "fitting_err": np.full(T, 1e-3, np.float32),
        }
        for side, p in hands.items()
    }
    _npy_dict(raw / f"{SEQUENCE}.mano.npy", mano)
    _npy_dict(
        raw / f"{SEQUENCE}.egocam.dist.npy",
        {
            "R_k_cam_np": R.astype(np.float32),
            "T_k_cam_np": t[:, :, None].astype(np.float32),
            "intrinsics": K_EGO.astype(np.float32),
            "ego_markers.ref": np.zeros((4, 3), np.float32),
            "ego_markers.label": np.array(["a", "b", "c", "d"]),
            "R0": np.eye(3, dtype=np.float32),
            "T0": np.zeros((3, 1), np.float32),
            "dist8": np.zeros(8, np.float32),
        },
    )
    # object: articulation, axis-angle, translation in millimetres; the template's box centre is off-origin
    s = np.linspace(0, 1, T)
    obj = np.zeros((T, 7), np.float32)
    obj[:, 0] = 0.3 * s
    obj[:, 1:4] = np.stack([0.0 * s, 0.0 * s, 0.5 * s], axis=1)
    obj[:, 4:7] = np.stack([10.0 + 20 * s, 60.0 * np.ones(T), -30.0 * np.ones(T)], axis=1)
    np.save(raw / f"{SEQUENCE}.object.npy", obj)
    _npy_dict(raw / f"{SEQUENCE}.smplx.npy", {"transl": np.zeros((T, 3), np.float32)})
    # the broken sequence: MANO and object files, but no egocam file
    _npy_dict(raw / f"{BROKEN}.mano.npy", mano)
    np.save(raw / f"{BROKEN}.object.npy", obj)

    box_min, box_max = np.array([-40.0, -20.0, 0.0]), np.array([60.0, 40.0, 80.0])  # mm
    corners = np.array(list(itertools.product(*zip(box_min, box_max))))
    mesh = data / "meta" / "object_vtemplates" / "box" / "mesh.obj"
    mesh.parent.mkdir(parents=True, exist_ok=True)
    mesh.write_text("".join(f"v {a} {b} {c}\n" for a, b, c in corners) + "f 1 2 3\n")
    centre_m = (box_min + box_max) / 2000.0
    centres = Rotation.from_rotvec(obj[:, 1:4].astype(float)).apply(centre_m) + obj[:, 4:7] / 1000.0
    misc = {
        SUBJECT: {
            "gender": "male",
            "image_size": [list(IMAGE_WH)] + [[300, 200]] * 8,
            "ioi_offset": IOI_OFFSET,
            "world2cam": [np.eye(4).tolist()] * 8,
            "intris_mat": [K_EGO.tolist()] * 8,
        }
    }
    (data / "meta" / "misc.json").write_text(json.dumps(misc))
    if images:
        folder = data / "images" / SUBJECT / SEQUENCE / "0"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(T):
            PIL.Image.fromarray(noise_image(IMAGE_WH[1], IMAGE_WH[0], k)).save(
                folder / f"{k + IOI_OFFSET:05d}.jpg"
            )
    # processed_seqs: ARCTIC's own joints in the world and view-0 (undistorted ego) projections
    views = 10
    j2d = {f"joints.{side}": np.zeros((T, views, 21, 2), np.float32) for side in hands}
    cam = {f"joints.{side}": np.zeros((T, views, 21, 3), np.float32) for side in hands}
    for side in hands:
        for k in range(T):
            j2d[f"joints.{side}"][k, 0] = project_world(K_EGO, R[k], t[k], joints_arctic[side][k])
            cam[f"joints.{side}"][k, 0] = joints_arctic[side][k] @ R[k].T + t[k]
    processed = {
        "world_coord": {f"joints.{side}": joints_arctic[side].astype(np.float32) for side in hands},
        "cam_coord": cam,
        "2d": j2d,
        "bbox": np.zeros((T, views, 3), np.float32),
        "params": {"K_ego": np.tile(K_EGO, (T, 1, 1)).astype(np.float32)},
    }
    _npy_dict(data / "processed_seqs" / SUBJECT / f"{SEQUENCE}.npy", processed)
    return {
        "data": data,
        "mano_dir": mano_dir,
        "R": R,
        "t": t,
        "joints_arctic": joints_arctic,
        "params": hands,
        "object_centres": centres,
        "j2d_view0": {side: j2d[f"joints.{side}"][:, 0] for side in hands},
    }
