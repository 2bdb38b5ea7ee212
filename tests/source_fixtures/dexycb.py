"""A tiny DexYCB root in the layout `dex_ycb_toolkit` reads, from a synthetic MANO hand and cameras we choose.

    from tests.source_fixtures.dexycb import build_dexycb
    truth = build_dexycb(tmp_path / "dexycb", tmp_path / "mano")   # root + synthetic MANO_{LEFT,RIGHT}.pkl

Layout written (one subject, one sequence, two cameras, `num_frames` frames):
    calibration/intrinsics/<serial>_640x480.yml       color: fx, fy, ppx, ppy
    calibration/extrinsics_<name>/extrinsics.yml      extrinsics: {serial: 12 floats, apriltag: ...}, master
    calibration/mano_<calib>/mano.yml                 betas: 10 floats
    <subject>/<sequence>/meta.yml                     serials, num_frames, ycb_ids, ycb_grasp_ind, mano_sides, ...
    <subject>/<sequence>/pose.npz                     pose_y (F, O, 7) quat xyzw + t, pose_m (F, 1, 51)
    <subject>/<sequence>/<serial>/color_%06d.jpg, aligned_depth_to_color_%06d.png, labels_%06d.npz

The hand is posed with the dex-ycb-toolkit convention (45 PCA comps, flat_hand_mean False, manopth
fingertips, translation added last) in each camera's frame; `joint_2d` is the K-projection of `joint_3d`;
frames in `absent` have no hand (pose_m zero, joints −1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import yaml
from scipy.spatial.transform import Rotation

from tests.source_fixtures._common import (
    pose_mano,
    project_cam,
    render_rgbd,
    write_depth_mm,
    write_mano_files,
)

SUBJECT, SEQUENCE = "20200709-subject-01", "20200709_141754"
SERIALS = ("836212060125", "839512060362")
INTRINSICS = {  # fx, fy, ppx, ppy of each colour camera at 640x480
    "836212060125": (615.2, 614.8, 322.1, 238.7),
    "839512060362": (609.9, 610.3, 316.4, 244.2),
}
YCB_IDS = (5, 14)  # mustard bottle, mug
HW = (480, 640)
# dex-ycb-toolkit's MANOLayer: 45 PCA components, the mean pose added, manopth fingertips
TOOLKIT_MANO = {"use_pca": True, "num_pca_comps": 45, "flat_hand_mean": False, "fingertips": "manopth"}


def build_dexycb(root: Path, mano_dir: Path, num_frames: int = 61, absent=(30,), seed: int = 0) -> dict:
    """Writes the fixture; returns the ground truth (per serial: K, joints (F, 21, 3), objects (F, O, 3))."""
    rng = np.random.default_rng(seed)
    write_mano_files(mano_dir)
    root = Path(root)
    seq = root / SUBJECT / SEQUENCE
    seq.mkdir(parents=True, exist_ok=True)
    (root / "calibration" / "intrinsics").mkdir(parents=True, exist_ok=True)
    for s, (fx, fy, cx, cy) in INTRINSICS.items():
        intr = {
            "color": {"fx": fx, "fy": fy, "ppx": cx, "ppy": cy},
            "depth": {"fx": fx, "fy": fy, "ppx": cx, "ppy": cy},
        }
        (root / "calibration" / "intrinsics" / f"{s}_640x480.yml").write_text(yaml.safe_dump(intr))
    betas = rng.normal(0, 0.5, 10)
    (root / "calibration" / "mano_20200709-subject-01_right").mkdir(parents=True, exist_ok=True)
    (root / "calibration" / "mano_20200709-subject-01_right" / "mano.yml").write_text(
        yaml.safe_dump({"betas": betas.tolist()})
    )
    # camera 2 sees the scene from a different pose; camera 1 is the master (identity)
    cam_R = {SERIALS[0]: np.eye(3), SERIALS[1]: Rotation.from_euler("y", 12, degrees=True).as_matrix()}
    cam_t = {SERIALS[0]: np.zeros(3), SERIALS[1]: np.array([-0.12, 0.02, 0.03])}
    extr = {"master": SERIALS[0], "extrinsics": {"apriltag": np.eye(3, 4).ravel().tolist()}}
    for s in SERIALS:  # camera → master, as 3x4 row-major
        Rm = cam_R[s].T
        extr["extrinsics"][s] = np.hstack([Rm, (-Rm @ cam_t[s])[:, None]]).ravel().tolist()
    (root / "calibration" / "extrinsics_20200702_151821").mkdir(parents=True, exist_ok=True)
    (root / "calibration" / "extrinsics_20200702_151821" / "extrinsics.yml").write_text(yaml.safe_dump(extr))
    meta = {
        "serials": list(SERIALS),
        "num_frames": num_frames,
        "ycb_ids": list(YCB_IDS),
        "ycb_grasp_ind": 0,
        "mano_sides": ["right"],
        "mano_calib": ["20200709-subject-01_right"],
        "extrinsics": "20200702_151821",
        "pcnn_init": "none",
    }
    (seq / "meta.yml").write_text(yaml.safe_dump(meta))

    # the hand in the master camera: palm towards the camera, drifting right and closer over the sequence
    s = np.linspace(0, 1, num_frames)[:, None]
    orient_m = np.column_stack([np.full(num_frames, -np.pi / 2), 0.3 * s[:, 0], np.zeros(num_frames)])
    pca = rng.normal(0, 0.4, (num_frames, 45))
    transl_m = np.array([-0.08, 0.02, 0.55]) + s * np.array([0.06, -0.02, -0.05])
    objects_m = np.array([[0.12, 0.08, 0.62], [-0.16, 0.10, 0.66]])  # (O, 3) centres in the master camera
    obj_R = Rotation.from_euler("z", [[20], [-35]], degrees=True)
    truth = {"betas": betas, "absent": list(absent), "K": {}, "joints": {}, "objects": {}, "pose_m": {}}
    pose_y_seq = np.zeros((num_frames, len(YCB_IDS), 7))
    pose_m_seq = np.zeros((num_frames, 1, 51))
    for serial in SERIALS:
        fx, fy, cx, cy = INTRINSICS[serial]
        K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
        Rc, tc = cam_R[serial], cam_t[serial]
        # pose the hand in this camera: rotate the global orientation, move the translation so that the
        # root joint (MANO rotates about it) lands where the camera sees it
        orient_c = (Rotation.from_matrix(Rc) * Rotation.from_rotvec(orient_m)).as_rotvec()
        betas_t = np.tile(betas, (num_frames, 1))
        root_m = pose_mano(mano_dir, "right", orient_m, pca, betas_t, transl_m, **TOOLKIT_MANO)[:, 0]
        zero = pose_mano(mano_dir, "right", orient_m, pca, betas_t, 0 * transl_m, **TOOLKIT_MANO)[:, 0]
        transl_c = root_m @ Rc.T + tc - zero  # the rest root is unmoved by the global rotation
        joints = pose_mano(mano_dir, "right", orient_c, pca, betas_t, transl_c, **TOOLKIT_MANO)
        pose_m = np.hstack([orient_c, pca, transl_c])
        objects = objects_m @ Rc.T + tc
        uv = project_cam(K, joints)
        assert (uv > 0).all() and (uv[..., 0] < HW[1]).all() and (uv[..., 1] < HW[0]).all(), (
            "hand leaves the view"
        )
        joints[list(absent)] = np.nan
        truth["K"][serial], truth["joints"][serial], truth["objects"][serial] = K, joints, objects
        truth["pose_m"][serial] = pose_m
        cam = seq / serial
        cam.mkdir(exist_ok=True)
        for f in range(num_frames):
            hand_here = f not in absent
            blobs = [(objects[o], 0.04, (200, 60 + 80 * o, 40), YCB_IDS[o]) for o in range(len(YCB_IDS))]
            if hand_here:
                blobs.append((joints[f], 0.009, (230, 190, 170), 255))
            rgb, depth, seg = render_rgbd(K, HW, blobs, seed=f)
            PIL.Image.fromarray(rgb).save(cam / f"color_{f:06d}.jpg", quality=92)
            write_depth_mm(cam / f"aligned_depth_to_color_{f:06d}.png", depth)
            pose_y = np.concatenate(
                [(Rc @ obj_R.as_matrix()), objects[:, :, None]], axis=2
            )  # (O, 3, 4) object → this camera
            label = {
                "seg": seg,
                "pose_y": pose_y.astype(np.float32),
                "pose_m": (pose_m[f : f + 1] if hand_here else np.zeros((1, 51))).astype(np.float32),
                "joint_3d": (joints[f : f + 1] if hand_here else -np.ones((1, 21, 3))).astype(np.float32),
                "joint_2d": (uv[f : f + 1] if hand_here else -np.ones((1, 21, 2))).astype(np.float32),
            }
            np.savez_compressed(cam / f"labels_{f:06d}.npz", **label)
            if serial == SERIALS[0]:
                q = obj_R.as_quat()
                pose_y_seq[f] = np.hstack([q, objects])
                pose_m_seq[f] = label["pose_m"]
    np.savez_compressed(
        seq / "pose.npz", pose_y=pose_y_seq.astype(np.float32), pose_m=pose_m_seq.astype(np.float32)
    )
    return truth
