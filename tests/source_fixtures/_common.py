"""What the fixture builders and tests of the real Hand3D sources share: synthetic MANO files and posing
(our layer and, independently, smplx's), cameras, simple images, videos, tiny learnt models, and the
`hand3d build` call the tests make on each fixture.

    from tests.source_fixtures._common import write_mano_files, smplx_hand, random_hand_params
    mano = write_mano_files(tmp / "mano")                                   # MANO_{RIGHT,LEFT}.pkl
    joints, verts = smplx_hand(mano / "MANO_RIGHT.pkl", "right", random_hand_params(3, 0, [0, 0, 0.5]), True)

Truth numbers are computed here without the adapters' code: smplx's MANO (not `hand3d_dataset.mano`),
projections by hand, joint orders written out from the datasets' documentation.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import PIL.Image
import torch

# smplx / manopth fingertip vertices (thumb, index, middle, ring, pinky)
SMPLX_TIPS = (744, 320, 443, 554, 671)
MANOPTH_TIPS = (745, 317, 444, 556, 673)
# MANO's 16 joints (wrist; index, middle, pinky, ring, thumb × 3) then the 5 tips (thumb, index, middle, ring,
# pinky) → OpenPose order: OpenPose joint i is MANO-order joint MANO21_TO_OPENPOSE[i] (written out)
MANO21_TO_OPENPOSE = [0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20]


# ---------------------------------------------------------------------------- MANO


def write_mano_files(folder: Path) -> Path:
    """Synthetic MANO_RIGHT/LEFT.pkl (official keys, protocol-2 pickles; the test_mano builder) in `folder`."""
    from tests.test_mano import make_synthetic_mano

    folder.mkdir(parents=True, exist_ok=True)
    for side, seed in (("right", 1), ("left", 2)):
        with open(folder / f"MANO_{side.upper()}.pkl", "wb") as fh:
            pickle.dump(make_synthetic_mano(side, seed=seed), fh, protocol=2)
    return folder


def pose_mano(mano_dir: Path, side: str, global_orient, hand_pose, betas, transl, **layer_kw) -> np.ndarray:
    """(T, 21, 3) OpenPose joints of the synthetic MANO hand with our layer; layer_kw go to `ManoLayer`
    (pca, flat mean, tips). For fixtures whose truth is the joints themselves (DexYCB, H2O, FPHA, EgoDex)."""
    from hand3d_dataset.mano import ManoLayer

    layer = ManoLayer(mano_dir / f"MANO_{side.upper()}.pkl", side=side, **layer_kw).double()
    with torch.no_grad():
        return layer.forward_joints(
            *(torch.as_tensor(np.asarray(a, float)) for a in (global_orient, hand_pose, betas, transl))
        ).numpy()


def smplx_hand(
    mano_file: Path,
    side: str,
    params: dict,
    flat_hand_mean: bool,
    tips=SMPLX_TIPS,
    flip_shapedirs: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """smplx MANO forward: (T, 16 + 5, 3) joints in MANO order + tip vertices, and (T, 778, 3) vertices.

    flip_shapedirs: negate `shapedirs[:, 0, :]` of the layer first (HaWoR's left-hand fix).
    """
    import smplx

    layer = smplx.MANO(
        str(mano_file),
        is_rhand=side == "right",
        use_pca=False,
        flat_hand_mean=flat_hand_mean,
        dtype=torch.float64,
    )
    if flip_shapedirs:
        with torch.no_grad():
            layer.shapedirs[:, 0, :] *= -1
    t = {k: torch.as_tensor(np.asarray(v, np.float64)) for k, v in params.items()}
    with torch.no_grad():
        out = layer(
            global_orient=t["global_orient"],
            hand_pose=t["hand_pose"],
            betas=t["betas"],
            transl=t.get("transl"),
        )
    v = out.vertices.numpy()
    j16 = out.joints.numpy()[:, :16]
    return np.concatenate([j16, v[:, list(tips)]], axis=1), v


def random_hand_params(T: int, seed: int, wrist) -> dict[str, np.ndarray]:
    """Smooth MANO parameters: global_orient (T, 3), hand_pose (T, 45), betas (T, 10), transl (T, 3)."""
    rng = np.random.default_rng(seed)
    s = np.linspace(0.0, 1.0, T)[:, None]
    a0, a1 = rng.normal(size=3) * 0.8, rng.normal(size=3) * 0.8
    p0, p1 = rng.normal(size=45) * 0.25, rng.normal(size=45) * 0.25
    betas = np.tile(rng.normal(size=10) * 0.5, (T, 1))
    transl = np.asarray(wrist, float) + s * rng.normal(size=3) * 0.05
    return {
        "global_orient": a0 + s * (a1 - a0),
        "hand_pose": p0 + s * (p1 - p0),
        "betas": betas,
        "transl": transl,
    }


# ---------------------------------------------------------------------------- cameras


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """World → camera (R, t) of an OpenCV camera (x right, y down, z forward) at `eye` looking at `target`."""
    eye, target, up = (np.asarray(v, float) for v in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])  # rows: camera axes in world coordinates
    return R, -R @ eye


def camera_to_world(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """4×4 camera → world pose of the world → camera (R, t)."""
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R.T, -R.T @ t
    return T


def project_cam(K: np.ndarray, points) -> np.ndarray:
    """(..., 2) pixels of camera-frame points (..., 3): the pinhole the datasets document."""
    p = np.asarray(points, float)
    return np.stack(
        [K[0, 0] * p[..., 0] / p[..., 2] + K[0, 2], K[1, 1] * p[..., 1] / p[..., 2] + K[1, 2]], -1
    )


def project_world(K: np.ndarray, R: np.ndarray, t: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(N, 2) pixels of world points (N, 3) seen by world → camera (R, t)."""
    return project_cam(K, np.asarray(pts, float) @ R.T + t)


def clip_uv(clip, side: str, k: int) -> np.ndarray:
    """(21, 2) pixels of a clip's `side` joints on frame k, projected with the clip's own K, R, t by hand."""
    p = clip.R[k] @ clip.hands[side].joints3d[k].T + clip.t[k][:, None]
    q = clip.K[k] @ p
    return (q[:2] / q[2]).T


# ---------------------------------------------------------------------------- images and videos


def noise_image(h: int, w: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8 gradient plus noise (never a blank frame)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=-1)
    return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def render_rgbd(K, hw, blobs, background_z: float = 0.9, seed: int = 0):
    """A simple RGB-D image of spheres in front of a textured wall.

    blobs: list of (points_cam (P, 3) metres, radius metres, rgb, seg id); each point is a disc of its
    projected radius at its depth, nearest wins. Returns rgb (H, W, 3) uint8, depth (H, W) metres and
    seg (H, W) uint8 (0 = wall).
    """
    h, w = hw
    rng = np.random.default_rng(seed)
    # 16-pixel blocks of grey noise: not blank, and cheap to encode as PNG
    noise = np.kron(rng.integers(60, 120, (h // 16 + 1, w // 16 + 1)), np.ones((16, 16), int))[:h, :w]
    rgb = np.repeat(noise[..., None], 3, axis=2).astype(np.uint8)
    depth = np.full((h, w), background_z)
    seg = np.zeros((h, w), np.uint8)
    for points, radius, colour, sid in blobs:
        for p in np.asarray(points, float).reshape(-1, 3):
            if not np.isfinite(p).all() or p[2] <= 0.05:
                continue
            cu, cv = K[0, 0] * p[0] / p[2] + K[0, 2], K[1, 1] * p[1] / p[2] + K[1, 2]
            r = K[0, 0] * radius / p[2]
            u0, u1 = max(0, int(cu - r - 1)), min(w, int(cu + r + 2))
            v0, v1 = max(0, int(cv - r - 1)), min(h, int(cv + r + 2))
            if u0 >= u1 or v0 >= v1:
                continue
            v, u = np.mgrid[v0:v1, u0:u1]
            win = (slice(v0, v1), slice(u0, u1))
            disc = ((u - cu) ** 2 + (v - cv) ** 2 <= r * r) & (p[2] < depth[win])
            depth[win][disc], rgb[win][disc], seg[win][disc] = p[2], colour, sid
    return rgb, depth, seg


def write_depth_mm(path: Path, depth_m) -> None:
    """A uint16 millimetre PNG (0 where the depth is NaN), as DexYCB, H2O, FPHA and HOI4D store depth."""
    PIL.Image.fromarray(np.round(np.nan_to_num(depth_m) * 1000).astype(np.uint16)).save(path)


def write_video(
    path: Path, frames, codec: str = "libx264", fps: int = 30, options: dict | None = None
) -> None:
    """Encodes (T, H, W, 3) uint8 RGB, or (T, H, W) uint16 for codec 'ffv1', with PyAV."""
    import av

    frames = np.asarray(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = frames.ndim == 3
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "gray16le" if gray else "yuv420p"
        if options:
            s.options = options
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="gray16le" if gray else "rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


# ---------------------------------------------------------------------------- models and builds


def save_tiny_detector(folder: Path) -> Path:
    """A tiny random GroundingDINO (model + processor) saved where `--detector grounding-dino:<folder>` reads it."""
    from tests.test_estimators import tiny_grounding_dino

    model, processor = tiny_grounding_dino(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_depth_model(folder: Path) -> Path:
    """A tiny random metric DepthAnything saved where `--estimator depth-anything:<folder>` reads it."""
    from tests.test_estimators import tiny_depth_anything

    tiny_depth_anything("metric").save_pretrained(folder)
    return folder


def run_build(source: str, root: Path, out: Path, *args: str) -> dict:
    """`hand3d build --source SOURCE --source-root ROOT --out OUT --no-progress --test-fraction 0 ARGS`
    through the command line's `main`; returns report.json (the command must succeed)."""
    from hand3d_dataset.cli import main

    argv = ["build", "--source", source, "--source-root", str(root), "--out", str(out), "--no-progress"]
    assert main([*argv, "--test-fraction", "0", *args]) == 0
    return json.loads((Path(out) / "report.json").read_text())


def row_count(report: dict, config: str | None = None) -> int:
    """Rows of a build report, of one config ("visual" / "action") or of both."""
    configs = [config] if config else list(report["samples"])
    return sum(sum(v.values()) for c in configs for v in report["samples"][c].values())


class Evil:
    """Pickles into a call of os.system that would create `marker`: a tampered file a reader must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
