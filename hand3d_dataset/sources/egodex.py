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
  chunks (`dexycb.chunk_frame_indices`); the episode length is the HDF5's frame count. No depth: build
  with a point-cloud estimator (`--estimator cut3r:… | depth-anything:…`).

Bad input: a missing MP4 or HDF5 dataset, a non-finite transform, or a video with fewer frames than
the HDF5 (truncated) raises ValueError naming the file and what was expected; an HDF5 that cannot be
opened is not listed and its reason is kept in `skipped`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hand3d_dataset.clip import Clip, HandTrack, ObjectTrack
from hand3d_dataset.sources.dexycb import chunk_frame_indices, sampled_fps

__all__ = ["EgoDexSource", "EGODEX_K", "OPENPOSE_JOINTS", "ARKIT_TO_OPENCV", "decode_frames"]

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


def _h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the egodex source reads HDF5 files: pip install h5py") from e
    return h5py


def decode_frames(path: Path, indices: np.ndarray, what: str) -> np.ndarray:
    """(len(indices), H, W, 3) uint8 RGB frames `indices` (increasing) of a video, decoded with PyAV.

    Raises ValueError naming the file when it is missing, undecodable, or ends before the last index.
    """
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the egodex source decodes MP4 with PyAV: pip install av") from e
    if not path.exists():
        raise ValueError(f"{what}: missing video {path}")
    wanted = {int(i): k for k, i in enumerate(indices)}
    last = int(max(indices))
    out: list[np.ndarray | None] = [None] * len(indices)
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    out[wanted[i]] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise ValueError(f"{what}: cannot decode {path}: {e}") from e
    missing = [int(indices[k]) for k, f in enumerate(out) if f is None]
    if missing:
        raise ValueError(
            f"{what}: {path} ends early (truncated?): frames {missing[:5]} were not decoded; the HDF5 has "
            f"at least {last + 1} frames"
        )
    return np.stack(out)


class EgoDexSource:
    """`SourceAdapter` over EgoDex episodes below `root`; ids `egodex-<part>-<task>-<index>-c<chunk>`."""

    name = "egodex"

    def __init__(
        self,
        root: str | Path,
        sample_fps: float = 1.0,  # rate of the clip's frames (the paper samples 1 fps)
        chunk_s: float = 10.0,  # chunk length in seconds (the paper's ~10 s chunks)
        min_confidence: float = 0.5,  # a hand's frame is valid when all 21 mapped joints reach this
        camera_axes: str = "auto",  # "auto" (decided from the data), "arkit" or "opencv"
        load_frames: bool = True,  # decode the MP4 (False: trajectory-only clips)
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root: {self.root} is not a folder")
        if not (sample_fps > 0 and chunk_s > 0):
            raise ValueError(f"sample_fps, chunk_s: expected positive values, got {sample_fps}, {chunk_s}")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence: expected a value in [0, 1], got {min_confidence}")
        if camera_axes not in ("auto", "arkit", "opencv"):
            raise ValueError(f"camera_axes: expected 'auto', 'arkit' or 'opencv', got {camera_axes!r}")
        self.sample_fps, self.chunk_s = float(sample_fps), float(chunk_s)
        self.min_confidence, self.camera_axes, self.load_frames = (
            float(min_confidence),
            camera_axes,
            load_frames,
        )
        h5py = _h5py()
        self._clips: dict[str, tuple[Path, np.ndarray]] = {}
        self.skipped: dict[str, str] = {}  # hdf5 file → why it yields no clip
        for h5 in sorted(self.root.rglob("*.hdf5")):
            try:
                with h5py.File(h5, "r") as f:
                    n = int(f["transforms/camera"].shape[0])
            except (OSError, KeyError) as e:
                self.skipped[str(h5)] = f"cannot read transforms/camera of {h5}: {e}"
                continue
            rel = h5.relative_to(self.root).with_suffix("").parts
            part = () if len(rel) > 2 else (self.root.name,)
            base = "egodex-" + "-".join(part + rel)
            for c, idx in enumerate(chunk_frame_indices(n, FPS, self.sample_fps, self.chunk_s)):
                self._clips[f"{base}-c{c:03d}"] = (h5, idx)

    def clip_ids(self) -> list[str]:
        return list(self._clips)

    @staticmethod
    def _read(f, key: str, h5: Path, what: str, idx: np.ndarray) -> np.ndarray:
        if key not in f:
            raise ValueError(
                f"{what}: {h5} has no dataset {key!r}; expected EgoDex's transforms/ and confidences/"
            )
        return np.asarray(f[key][idx.tolist()], dtype=np.float64)

    def load_clip(self, clip_id: str) -> Clip:
        if clip_id not in self._clips:
            raise ValueError(f"clip_id: unknown {clip_id!r}; known: {list(self._clips)[:5]}")
        h5, idx = self._clips[clip_id]
        what = f"clip {clip_id}"
        with _h5py().File(h5, "r") as f:
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
        R = np.transpose(R_wc, (0, 2, 1))
        t = -np.einsum("tij,tj->ti", R, T_wc[:, :3, 3])
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
            frames = decode_frames(h5.with_suffix(".mp4"), idx, what)
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
            fps=sampled_fps(FPS, self.sample_fps),
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
