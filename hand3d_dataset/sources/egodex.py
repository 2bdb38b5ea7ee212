"""The `egodex` source: EgoDex (Apple Vision Pro egocentric video + ARKit hand tracking) as unified clips.

    from hand3d_dataset.sources.egodex import EgoDexSource
    src = EgoDexSource("/data/egodex/part1")          # a part folder (or test/, or the folder above them)
    clip = src.load_clip(src.clip_ids()[0])           # e.g. "egodex-part1-add_remove_lid-0-c000"
    clip.frames.shape, clip.task                      # (10, 1080, 1920, 3), "Remove the lid from the pot."

On-disk layout read here (the EgoDex README; Apple's `ml-egodex` utilities read the same): one episode is
`<task>/<index>.hdf5` next to `<task>/<index>.mp4` (1920×1080, 30 Hz, one video frame per pose frame).
The HDF5 file holds
- `camera/intrinsic` (3, 3): fixed for the whole dataset (fx = fy = 736.6339, cx 960, cy 540; the
  constant is used when a file lacks it, as `ml-egodex`'s `get_camera_intrinsics` does);
- `transforms/<name>` (N, 4, 4) world poses, metres, ARKit's world (y up): `camera` (camera→world, the
  utilities take ``inv(T_camera) @ T_joint`` to get camera-frame joints), and 25 joints per hand,
  `<side>Hand` (the wrist), `<side>ThumbKnuckle`, `…ThumbIntermediateBase`, `…ThumbIntermediateTip`,
  `…ThumbTip`, and for Index/Middle/Ring/Little `…<F>FingerMetacarpal`, `…Knuckle`,
  `…IntermediateBase`, `…IntermediateTip`, `…Tip` (plus body joints, unused here);
- `confidences/<name>` (N,) ARKit tracking confidence in [0, 1];
- attributes `llm_description` (and `llm_description2` for reversible tasks, chosen by
  `which_llm_description`), the task text.

Conventions and why:
- Joints: the 25 ARKit joints are *mapped* to the 21 OpenPose joints, not fitted with MANO: wrist =
  `Hand`; thumb = Knuckle (CMC), IntermediateBase (MCP), IntermediateTip (IP), Tip; each finger =
  Knuckle (MCP), IntermediateBase (PIP), IntermediateTip (DIP), Tip; the 4 metacarpal joints are
  dropped. These are the same anatomical joints as OpenPose's, so the mapping is exact, needs no MANO
  model files and adds no fitting residual (`hand3d_dataset.mano.fit_mano_to_joints` can still fit MANO
  to the mapped joints downstream when parameters are wanted). A frame is valid for a hand when every
  one of its 21 mapped joints has confidence ≥ `min_confidence` (0.5 by default: ARKit keeps reporting
  a pose for an untracked hand, with a low confidence); a file without `confidences/` counts as tracked.
- Camera axes: ARKit/OpenGL cameras look down −z with y up, OpenCV cameras down +z with y down, so
  ``T_world_cam(OpenCV) = T_world_cam(ARKit) · diag(1, −1, −1, 1)``. Third-party EgoDex loaders project
  `inv(T_camera) @ joint` with K directly, as if the stored camera were already OpenCV, while EgoDex is
  documented as ARKit data; rather than guess, `camera_axes="auto"` (default) decides per episode from
  the data: the hands of an egocentric recording are in front of the camera, so the convention that puts
  the median valid wrist at positive depth wins (`meta["camera_axes"]` records it); "arkit" or "opencv"
  force one. World → camera is then ``R = R_wcᵀ, t = −R_wcᵀ t_wc`` per frame.
- Objects: EgoDex has no object annotation; names come from a `llm_objects` attribute when a file has
  one (no positions), otherwise the clip has no objects. The task is the chosen LLM description, or the
  task folder name ("add_remove_lid" → "add remove lid").
- Frames: decoded from the MP4 with PyAV at the sampled indices (`sample_fps`, 1 fps) in `chunk_s` (10 s)
  chunks (`_common.chunk_frame_indices`); the episode length is the HDF5's frame count. No depth: build
  with a point-cloud estimator (`--estimator cut3r:… | depth-anything:…`).

Bad input: a missing MP4 or HDF5 dataset, a non-finite transform, or a video with fewer frames than
the HDF5 (truncated) raises ValueError naming the file and what was expected; an HDF5 that cannot be
opened is not listed and its reason is kept in `skipped`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hand3d_dataset.clip import Clip, HandTrack, ObjectTrack
from hand3d_dataset.extras import require
from hand3d_dataset.sources._common import ChunkedSource, invert_poses, read_video_frames

__all__ = ["EgoDexSource", "EGODEX_K", "OPENPOSE_JOINTS", "ARKIT_TO_OPENCV"]

FPS = 30.0
IMAGE_HW = (1080, 1920)
EGODEX_K = np.array([[736.6339, 0.0, 960.0], [0.0, 736.6339, 540.0], [0.0, 0.0, 1.0]])
ARKIT_TO_OPENCV = np.diag(
    [1.0, -1.0, -1.0]
)  # camera axes: x right, y up, z back → x right, y down, z forward
_FINGERS = ("Index", "Middle", "Ring", "Little")
# the 21 OpenPose joints as EgoDex joint-name suffixes (prefix "left"/"right")
OPENPOSE_JOINTS: tuple[str, ...] = (
    "Hand",
    "ThumbKnuckle",
    "ThumbIntermediateBase",
    "ThumbIntermediateTip",
    "ThumbTip",
    *(
        f"{f}Finger{part}"
        for f in _FINGERS
        for part in ("Knuckle", "IntermediateBase", "IntermediateTip", "Tip")
    ),
)


class EgoDexSource(ChunkedSource):
    """`SourceAdapter` over EgoDex episodes below `root`; ids `egodex-<part>-<task>-<index>-c<chunk>`."""

    name = "egodex"
    FPS = FPS

    def __init__(
        self,
        root: str | Path,
        sample_fps: float = 1.0,  # rate of the clip's frames (the paper samples 1 fps)
        chunk_s: float = 10.0,  # chunk length in seconds (the paper's ~10 s chunks)
        min_confidence: float = 0.5,  # a hand's frame is valid when all 21 mapped joints reach this
        camera_axes: str = "auto",  # "auto" (decided from the data), "arkit" or "opencv"
        load_frames: bool = True,  # decode the MP4 (False: trajectory-only clips)
    ) -> None:
        super().__init__(sample_fps, chunk_s)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root: {self.root} is not a folder")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence: expected a value in [0, 1], got {min_confidence}")
        if camera_axes not in ("auto", "arkit", "opencv"):
            raise ValueError(f"camera_axes: expected 'auto', 'arkit' or 'opencv', got {camera_axes!r}")
        self.min_confidence, self.camera_axes = float(min_confidence), camera_axes
        self.load_frames = bool(load_frames)
        h5py = require("h5py", "sources")
        for h5 in sorted(self.root.rglob("*.hdf5")):
            try:
                with h5py.File(h5, "r") as f:
                    n = int(f["transforms/camera"].shape[0])
            except (OSError, KeyError) as e:
                self.skipped[str(h5)] = f"cannot read transforms/camera of {h5}: {e}"
                continue
            rel = h5.relative_to(self.root).with_suffix("").parts
            part = () if len(rel) > 2 else (self.root.name,)
            self._add("egodex-" + "-".join(part + rel), n, h5)

    @staticmethod
    def _read(f, key: str, h5: Path, what: str, idx: np.ndarray) -> np.ndarray:
        if key not in f:
            raise ValueError(
                f"{what}: {h5} has no dataset {key!r}; expected EgoDex's transforms/ and confidences/"
            )
        return np.asarray(f[key][idx.tolist()], dtype=np.float64)

    def load_clip(self, clip_id: str) -> Clip:
        h5, idx = self._entry(clip_id)
        what = f"clip {clip_id}"
        with require("h5py", "sources").File(h5, "r") as f:
            K = np.asarray(f["camera/intrinsic"], float) if "camera/intrinsic" in f else EGODEX_K
            T_wc = self._read(f, "transforms/camera", h5, what, idx)
            joints, conf = {}, {}
            for side in ("left", "right"):
                joints[side] = np.stack(
                    [
                        self._read(f, f"transforms/{side}{j}", h5, what, idx)[:, :3, 3]
                        for j in OPENPOSE_JOINTS
                    ],
                    1,
                )
                conf[side] = (
                    np.stack(
                        [self._read(f, f"confidences/{side}{j}", h5, what, idx) for j in OPENPOSE_JOINTS], 1
                    )
                    if "confidences" in f
                    else np.ones((len(idx), 21))
                )
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        for name, arr in [("transforms/camera", T_wc)] + [(f"transforms/{s}*", joints[s]) for s in joints]:
            if not np.isfinite(arr).all():
                raise ValueError(f"{what}: {h5} has non-finite values in {name} on the sampled frames")
        valid = {s: (conf[s] >= self.min_confidence).all(axis=1) for s in joints}
        axes = self._axes(T_wc, joints, valid, clip_id)
        R_wc = T_wc[:, :3, :3] @ ARKIT_TO_OPENCV if axes == "arkit" else T_wc[:, :3, :3]
        R, t = invert_poses(R_wc, T_wc[:, :3, 3])
        hands = {
            s: HandTrack(s, joints3d=np.where(valid[s][:, None, None], joints[s], np.nan), valid=valid[s])
            for s in ("left", "right")
            if valid[s].any()
        }
        if not hands:
            raise ValueError(
                f"{what}: no hand reaches confidence {self.min_confidence} on any sampled frame of {h5}"
            )
        frames = None
        if self.load_frames:
            frames = read_video_frames(h5.with_suffix(".mp4"), idx, what)
        image_hw = IMAGE_HW if frames is None else frames.shape[1:3]
        names = attrs.get("llm_objects")
        objects = (
            []
            if names is None
            else [ObjectTrack(str(n)) for n in dict.fromkeys(np.atleast_1d(names).tolist())]
        )
        return Clip(
            clip_id=clip_id,
            source=self.name,
            fps=self.clip_fps,
            K=K,
            R=R,
            t=t,
            image_hw=tuple(int(x) for x in image_hw),
            hands=hands,
            objects=objects,
            task=self._task(attrs, h5),
            frames=frames,
            meta={"file": str(h5), "frame_indices": idx.tolist(), "source_fps": FPS, "camera_axes": axes},
        )

    def _axes(self, T_wc: np.ndarray, joints: dict, valid: dict, clip_id: str) -> str:
        if self.camera_axes != "auto":
            return self.camera_axes
        wrists = [joints[s][valid[s], 0] - T_wc[valid[s], :3, 3] for s in joints]
        Rs = [T_wc[valid[s], :3, :3] for s in joints]
        depth = np.concatenate([np.einsum("tji,tj->ti", r, w)[:, 2] for r, w in zip(Rs, wrists)])
        if depth.size == 0:
            raise ValueError(f"clip {clip_id}: no valid wrist to decide the camera axes; pass camera_axes")
        # OpenCV cameras see what is in front at +z, ARKit ones at -z
        return "opencv" if np.median(depth) > 0 else "arkit"

    @staticmethod
    def _task(attrs: dict, h5: Path) -> str:
        key = "llm_description2" if str(attrs.get("which_llm_description", "1")) == "2" else "llm_description"
        text = attrs.get(key) or attrs.get("llm_description")
        return str(text).strip() if text else h5.parent.name.replace("_", " ")
