"""A tiny EgoDex episode in the README's layout (`<part>/<task>/<i>.hdf5` + `<i>.mp4`), from synthetic MANO hands.

    from tests.source_fixtures.egodex import build_egodex
    truth = build_egodex(tmp_path / "egodex", tmp_path / "mano")            # ARKit camera axes
    truth = build_egodex(tmp_path / "cv", tmp_path / "mano", axes="opencv")  # the other convention

The HDF5 holds `camera/intrinsic` (fx = fy = 736.6339, cx 960, cy 540), `transforms/<name>` (N, 4, 4) world
poses in ARKit's y-up world (the camera, `hip`, the forearms and the 25 joints per hand: wrist `<side>Hand`,
thumb Knuckle/IntermediateBase/IntermediateTip/Tip, each finger Metacarpal/Knuckle/IntermediateBase/
IntermediateTip/Tip), `confidences/<name>` (N,) and the LLM description attributes. The hand joints are a
synthetic MANO hand's 21 joints (OpenPose order) plus a metacarpal joint 35 % of the way from the wrist to
each finger's knuckle. The MP4 (1920×1080, 30 fps, mpeg4) shows the joints as discs. The left hand has
confidence 0.1 on frame `absent_left`.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from tests.source_fixtures._common import (
    camera_to_world,
    look_at,
    pose_mano,
    render_rgbd,
    write_mano_files,
    write_video,
)

PART, TASK = "part1", "add_remove_lid"
K = np.array([[736.6339, 0.0, 960.0], [0.0, 736.6339, 540.0], [0.0, 0.0, 1.0]])
HW = (1080, 1920)
FINGERS = ("Index", "Middle", "Ring", "Little")
DESCRIPTION = "Remove the lid from the pot."


def gl_look_at(centre, target, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """4×4 camera→world of an ARKit/OpenGL camera (looks down −z, y up) at `centre` facing `target`: the
    OpenCV camera there with its y and z axes negated."""
    return camera_to_world(*look_at(centre, target, up)) @ np.diag([1.0, -1.0, -1.0, 1.0])


def project_gl(T_wc, X) -> np.ndarray:
    """Pixels of world points X (..., 3) in an ARKit camera: x right, y up, looking down −z."""
    p = (np.asarray(X) - T_wc[:3, 3]) @ T_wc[:3, :3]
    return np.stack(
        [K[0, 2] + K[0, 0] * p[..., 0] / -p[..., 2], K[1, 2] - K[1, 1] * p[..., 1] / -p[..., 2]], -1
    )


def egodex_joints(j21: np.ndarray) -> dict[str, np.ndarray]:
    """EgoDex's 25 joint names (without side prefix) → (F, 3) positions, from 21 OpenPose joints (F, 21, 3)."""
    out = {"Hand": j21[:, 0]}
    for k, part in enumerate(("Knuckle", "IntermediateBase", "IntermediateTip", "Tip")):
        out[f"Thumb{part}"] = j21[:, 1 + k]
    for i, f in enumerate(FINGERS):
        base = 5 + 4 * i
        out[f"{f}FingerMetacarpal"] = j21[:, 0] + 0.35 * (j21[:, base] - j21[:, 0])
        for k, part in enumerate(("Knuckle", "IntermediateBase", "IntermediateTip", "Tip")):
            out[f"{f}Finger{part}"] = j21[:, base + k]
    return out


def _poses(p: np.ndarray) -> np.ndarray:
    T = np.tile(np.eye(4), (len(p), 1, 1))
    T[:, :3, 3] = p
    return T.astype(np.float32)


def write_mp4(path: Path, frames) -> None:
    """The episode's MP4 (MPEG-4 part 2 at 30 fps: quick to encode at 1920×1080)."""
    write_video(path, frames, "mpeg4", options={"qscale": "3"})


def build_egodex(
    root: Path,
    mano_dir: Path,
    axes: str = "arkit",
    num_frames: int = 31,
    absent_left: int = 30,
    seed: int = 0,
) -> dict:
    """Writes one episode; returns the truth: camera→world per frame (ARKit axes), 21 joints per side."""
    rng = np.random.default_rng(seed)
    write_mano_files(mano_dir)
    s = np.linspace(0, 1, num_frames)
    head = np.array([0.0, 1.5, 0.0])
    T_gl = np.stack([gl_look_at(head + [0.05 * si, 0, 0], [0.0, 1.0 - 0.05 * si, -0.5]) for si in s])
    truth = {"T_wc_gl": T_gl, "joints": {}, "absent_left": absent_left}
    for side, x in (("left", -0.1), ("right", 0.1)):
        j = pose_mano(
            mano_dir,
            side,
            np.column_stack([np.zeros(num_frames), 0.2 * s, np.full(num_frames, -np.pi / 2)]),
            rng.normal(0, 0.15, (num_frames, 45)),
            np.tile(rng.normal(0, 0.5, 10), (num_frames, 1)),
            np.array([x, 1.05, -0.45]) + s[:, None] * np.array([0.05, 0.04, 0.02]),
            fingertips="manopth",
        )
        truth["joints"][side] = j
    T_store = T_gl if axes == "arkit" else T_gl @ np.diag([1.0, -1.0, -1.0, 1.0])
    episode = Path(root) / PART / TASK
    episode.mkdir(parents=True, exist_ok=True)
    with h5py.File(episode / "0.hdf5", "w") as f:
        f.create_dataset("camera/intrinsic", data=K.astype(np.float32))
        f.create_dataset("transforms/camera", data=T_store.astype(np.float32))
        f.create_dataset("confidences/camera", data=np.ones(num_frames, np.float32))
        f.create_dataset("transforms/hip", data=_poses(np.tile([0.0, 0.9, 0.1], (num_frames, 1))))
        for side in ("left", "right"):
            j = truth["joints"][side]
            f.create_dataset(f"transforms/{side}Forearm", data=_poses(j[:, 0] + [0.0, -0.05, 0.2]))
            for name, p in egodex_joints(j).items():
                f.create_dataset(f"transforms/{side}{name}", data=_poses(p))
                c = np.full(num_frames, 0.95, np.float32)
                if side == "left":
                    c[absent_left] = 0.1
                f.create_dataset(f"confidences/{side}{name}", data=c)
        f.attrs["llm_description"] = DESCRIPTION
        f.attrs["llm_description2"] = "Put the lid back on the pot."
        f.attrs["which_llm_description"] = "1"
        f.attrs["llm_type"] = "reversible"
        f.attrs["task"] = TASK
        f.attrs["environment"] = "kitchen_table"
        f.attrs["session_name"] = "session_0001"
    frames = []
    for k in range(num_frames):
        blobs = []
        for side, colour in (("left", (230, 120, 100)), ("right", (100, 200, 230))):
            if side == "left" and k == absent_left:
                continue
            p = (truth["joints"][side][k] - T_gl[k, :3, 3]) @ T_gl[k, :3, :3] * [1, -1, -1]  # OpenCV camera
            blobs.append((p, 0.01, colour, 1))
        frames.append(render_rgbd(K, HW, blobs, seed=k)[0])
    write_mp4(episode / "0.mp4", frames)
    truth["frames"] = frames
    return truth
