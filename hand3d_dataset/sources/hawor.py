"""The `hawor` source: HaWoR's world-space hand reconstructions of video-only data (Taste-Rob), as clips.

Taste-Rob and other video-only datasets have no hand annotation; the paper reconstructs their hands with
HaWoR. Run HaWoR's `demo.py --video_path <root>/<video>.mp4` on each video; it writes a folder
`<root>/<video>/` that this adapter reads.

    from hand3d_dataset.sources.hawor import HaworSource
    src = HaworSource("/data/taste_rob_hawor")      # folders written by HaWoR's demo.py, one per video
    clip = src.load_clip(src.clip_ids()[0])         # e.g. "hawor-kitchen-video_0-c000"
    clip.hands["right"].joints3d.shape              # (10, 21, 3)

On-disk layout read here (ThunderVVV/HaWoR `scripts/scripts_test_video/` and `lib/eval_utils/custom_utils.py`):
- `<video>/extracted_images/%04d.jpg`: the video's frames, extracted by ffmpeg at **30 fps**
  (`detect_track_video.extract_frames`), in natural-sort order (optional, see `images`).
- `<video>/SLAM/hawor_slam_w_scale_<start>_<end>.npz`: DROID-SLAM output: `traj` (T, 7) = camera → world
  translation (x, y, z) and quaternion (x, y, z, w) (`load_slam_cam` reorders it to (w, x, y, z)),
  `scale` (metric scale of the translation), `img_focal`, `img_center` (cx, cy).
- `<video>/world_space_res.pth`: `joblib.dump([pred_trans (2, T, 3), pred_rot (2, T, 3), pred_hand_pose
  (2, T, 45), pred_betas (2, T, 10), pred_valid (2, T)])`, hand 0 = left, 1 = right (`hawor_infiller`);
  torch tensors inside a joblib pickle, read with `hand3d_dataset.safe_pickle` (never joblib / torch).
- optional, ours (HaWoR has no text): `<video>/task.txt` or `<root>/tasks.json` {video name: instruction},
  e.g. Taste-Rob's instruction of that video.

Conventions and why:
- Camera: R_c2w from the quaternion, t_c2w = traj[:, :3] · scale (`load_slam_cam`); world → camera is its
  inverse. The SLAM world has the first camera's OpenCV axes (x right, y down, z forward). `demo.py`
  rotates camera *and* hands by R_x = diag(1, −1, −1) before showing them in aitviewer (y up); that flip
  is a rigid change of the world frame applied to both, so it changes no camera-frame coordinate and we
  keep the SLAM frame (OpenCV-like, as our cameras). K = [[f, 0, cx], [0, f, cy]] from `img_focal` /
  `img_center` (HaWoR estimates cx, cy = w / 2, h / 2 and f = max(h, w) unless given).
- Hands: `run_mano` / `run_mano_left` use smplx's `MANOLayer` with rotation matrices: 45-D axis-angle
  (converted from matrices), **no mean pose** (the layer adds none: flat_hand_mean), no PCA, `transl`
  added last, joints reordered to OpenPose with smplx's fingertip vertices; the left model's
  `shapedirs[:, 0, :]` is negated (`fix_shapedirs=True`). `hand3d_dataset.mano.ManoLayer(flat_hand_mean=True,
  fingertips="smplx")` with that flip reproduces it. Model files: `mano_dir`, else $HAND3D_MANO_DIR, else
  HaWoR's `_DATA/data/mano` (and `_DATA/data_left/mano_left` for the left file) under root; without them
  the clip is refused (the translation is not the wrist). Frames where `pred_valid` is 0 or the values
  are not finite are invalid.
- Objects: HaWoR reconstructs no object; clips have none (the detector path names and finds them).
- Frames: 30 fps, sampled at `sample_fps` in `chunk_s` chunks; `images="auto"` reads `extracted_images`
  when there, else trajectory-only clips with image size (2 cy, 2 cx).

Listing takes each video's frame count from its SLAM trajectory (the result pickle is read per clip);
without a single SLAM file, from the result.

Bad input: a missing SLAM or result file, several SLAM files, frame counts that disagree, a result file
carrying code (refused by name) or non-finite cameras raise ValueError naming the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from hand3d_dataset import safe_pickle
from hand3d_dataset.clip import Clip, HandTrack
from hand3d_dataset.sources._common import (
    ChunkedSource,
    ManoPoser,
    find_mano_dir,
    invert_poses,
    masked,
    read_rgb,
)

__all__ = ["HaworSource", "load_slam_camera", "FPS"]

FPS = 30.0  # HaWoR extracts frames at 30 fps
RESULT = "world_space_res.pth"
_HAND_INDEX = {"left": 0, "right": 1}  # hawor_infiller: idx2hand = ['left', 'right']


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def load_slam_camera(path: Path, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R_c2w (T, 3, 3), t_c2w (T, 3) metres, K (3, 3)) from HaWoR's SLAM `.npz`."""
    if not path.exists():
        raise ValueError(f"{what}: missing {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            traj, scale = np.asarray(z["traj"], float), float(z["scale"])
            focal, center = float(z["img_focal"]), np.asarray(z["img_center"], float).reshape(-1)
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(
            f"{what}: {path} is not HaWoR SLAM output (traj, scale, img_focal, img_center): {e}"
        ) from e
    if traj.ndim != 2 or traj.shape[1] != 7 or center.size != 2:
        raise ValueError(f"{what}: {path} has traj {traj.shape} (want (T, 7)) and img_center {center.shape}")
    if not (np.isfinite(traj).all() and np.isfinite([scale, focal]).all() and scale > 0 and focal > 0):
        raise ValueError(f"{what}: {path} has non-finite or non-positive camera values")
    R_c2w = Rotation.from_quat(traj[:, 3:7]).as_matrix()  # scipy takes (x, y, z, w), the file's order
    K = np.array([[focal, 0.0, center[0]], [0.0, focal, center[1]], [0.0, 0.0, 1.0]])
    return R_c2w, traj[:, :3] * scale, K


class HaworSource(ChunkedSource):
    """`SourceAdapter` over folders written by HaWoR's demo; ids `hawor-<video path, '/' → '-'>-c<chunk>`."""

    name = "hawor"
    FPS = FPS

    def __init__(
        self,
        root: str | Path,
        mano_dir: str | Path | None = None,  # MANO files; None → $HAND3D_MANO_DIR or HaWoR's _DATA under root
        sample_fps: float = 1.0,  # rate of the clip's frames (the paper samples 1 fps)
        chunk_s: float = 10.0,  # chunk length in seconds (the paper's ~10 s chunks)
        images: str = "auto",  # "auto" | "required" | "none": read extracted_images
    ) -> None:
        super().__init__(sample_fps, chunk_s, images)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root: {self.root} is not a folder")
        left_dir = self.root / "_DATA" / "data_left" / "mano_left"
        found = find_mano_dir(mano_dir, [self.root / "_DATA" / "data" / "mano", left_dir])
        self.poser = None
        if found is not None:
            self.poser = ManoPoser(
                found,
                flat_hand_mean=True,
                fingertips="smplx",
                flip_left_shapedirs=True,
                extra_dirs=(left_dir,),
            )
        for res in sorted(self.root.rglob(RESULT)):
            folder = res.parent
            rel = folder.relative_to(self.root).as_posix()
            try:  # the SLAM trajectory gives the frame count without unpickling the result
                slams = sorted((folder / "SLAM").glob("hawor_slam_w_scale_*.npz"))
                if len(slams) == 1:
                    with np.load(slams[0], allow_pickle=False) as z:
                        n = len(z["traj"])
                else:
                    n = len(self._result(folder, f"video {rel}")[0][0])
            except (ValueError, KeyError, OSError) as e:
                self.skipped[rel] = str(e)
                continue
            self._add(f"hawor-{rel.replace('/', '-')}", n, folder)

    @staticmethod
    def _result(folder: Path, what: str) -> list[np.ndarray]:
        data = safe_pickle.load(folder / RESULT)
        if not isinstance(data, (list, tuple)) or len(data) != 5:
            raise ValueError(
                f"{what}: {folder / RESULT} is not HaWoR's [trans, rot, hand_pose, betas, valid] list"
            )
        arrs = [np.asarray(a) for a in data]
        T = arrs[0].shape[1] if arrs[0].ndim == 3 else -1
        want = [(2, T, 3), (2, T, 3), (2, T, 45), (2, T, 10), (2, T)]
        if T < 1 or [a.shape for a in arrs] != want:
            raise ValueError(
                f"{what}: {folder / RESULT} has shapes {[a.shape for a in arrs]}, expected {want}"
            )
        return arrs

    def load_clip(self, clip_id: str) -> Clip:
        folder, idx = self._entry(clip_id)
        what = f"clip {clip_id}"
        trans, rot, pose, betas, valid = self._result(folder, what)
        T = trans.shape[1]
        slams = sorted((folder / "SLAM").glob("hawor_slam_w_scale_*.npz"))
        if len(slams) != 1:
            raise ValueError(
                f"{what}: expected one SLAM/hawor_slam_w_scale_<start>_<end>.npz in {folder}, found {len(slams)}"
            )
        R_c2w, t_c2w, K = load_slam_camera(slams[0], what)
        if len(R_c2w) != T:
            raise ValueError(
                f"{what}: {slams[0]} has {len(R_c2w)} camera poses, {folder / RESULT} {T} frames"
            )
        if self.poser is None:
            raise ValueError(
                f"{what}: HaWoR hands need MANO model files (pass mano_dir, set $HAND3D_MANO_DIR or keep HaWoR's "
                f"_DATA/data/mano under {self.root}); the translation alone is not the wrist"
            )
        hands = {}
        for side, h in _HAND_INDEX.items():
            go, hp, b, tr = (np.asarray(a[h][idx], float) for a in (rot, pose, betas, trans))
            ok = valid[h][idx].astype(bool) & np.isfinite(np.concatenate([go, hp, b, tr], axis=1)).all(axis=1)
            joints = self.poser.joints(side, go, hp, b, tr)
            joints[~ok] = np.nan
            mano = masked(ok, global_orient=go, hand_pose=hp, transl=tr, betas=b)
            hands[side] = HandTrack(side, joints3d=joints, valid=ok, mano=mano)
        R_w2c, t_w2c = invert_poses(R_c2w[idx], t_c2w[idx])
        frames, image_hw = self._frames(folder, idx, T, K, what)
        return Clip(
            clip_id=clip_id,
            source=self.name,
            fps=self.clip_fps,
            K=K,
            R=R_w2c,
            t=t_w2c,
            image_hw=image_hw,
            hands=hands,
            objects=[],
            task=self._task(folder),
            frames=frames,
            meta={
                "video": folder.relative_to(self.root).as_posix(),
                "frame_indices": idx.tolist(),
                "source_fps": FPS,
                "slam_file": slams[0].name,
            },
        )

    def _task(self, folder: Path) -> str:
        if (folder / "task.txt").exists():
            return (folder / "task.txt").read_text().strip()
        tasks = self.root / "tasks.json"
        if tasks.exists():
            return str(json.loads(tasks.read_text()).get(folder.relative_to(self.root).as_posix(), ""))
        return ""

    def _frames(self, folder: Path, idx: np.ndarray, T: int, K: np.ndarray, what: str):
        img_dir = folder / "extracted_images"
        if not self._use_images(img_dir.is_dir()):
            return None, (int(round(2 * K[1, 2])), int(round(2 * K[0, 2])))
        files = sorted(img_dir.glob("*.jpg"), key=_natural_key)
        if len(files) != T:
            raise ValueError(f"{what}: {img_dir} has {len(files)} images, {folder / RESULT} {T} frames")
        frames = np.stack([read_rgb(files[int(f)], what) for f in idx])
        return frames, frames.shape[1:3]
