"""The `hot3d` source: HOT3D sequences (Quest3 / Aria headsets) as unified clips.

    >>> from hand3d_dataset.sources.hot3d import Hot3dSource
    >>> src = Hot3dSource("../shared/fixtures/real/hot3d")  # doctest: +SKIP
    >>> clip = src.load_clip("hot3d-Quest3-P0002_273c2819")  # doctest: +SKIP
    >>> clip.num_frames, clip.hands["left"].wrist_only  # doctest: +SKIP
    (15, True)

On-disk layout read here (one folder per sequence, as in HOT3D's `data_loaders` samples):
- `headset_trajectory.csv`: `timestamp[ns], t_wo_*[m], q_wo_{w,x,y,z}`: T_world_device per frame.
  Its timestamps are the clip's frames; fps comes from their spacing.
- `camera_models.json`: per stream `T_Device_Camera` (quaternion_wxyz, translation_xyz), image size
  and `projectionParams` of the FISHEYE624 model (`fx, fy, cx, cy, k0..k5, p0, p1, s0..s3`; Aria files
  have a single `f`). We approximate the camera by the PINHOLE with that focal length and principal
  point and ignore the distortion terms: exact at the principal point, increasingly off towards the
  fisheye's edge. Pixel centres are taken at integers (no shift).
- `mano_hand_pose_trajectory.jsonl`: per timestamp and handedness ("0" left, "1" right) 15 MANO PCA
  coefficients `pose`, 10 `betas` and `wrist_xform` (T_world_wrist: t_xyz, q_wxyz).
- `dynamic_objects.csv` (T_world_object per object uid and timestamp) and `box2d_objects.csv` (per
  stream, uid and timestamp: x_min, x_max, y_min, y_max in pixels, read as inclusive pixel indices and
  converted to pixel-edge boxes), both optional.

World → camera is ``T_camera_world = (T_world_device · T_device_camera)⁻¹``. Frames where a hand is
not tracked are invalid (NaN) in its track. Without MANO model files the hands are wrist-only tracks
(`wrist3d` from `wrist_xform`); with `mano_dir` holding MANO_LEFT/RIGHT (.pkl or .npz) the 21 joints
come from `hand3d_dataset.mano.ManoLayer` (15 PCA components, the files' mean pose), posed about the
wrist by `wrist_xform`. Objects are named `object <uid>` unless `object_names` maps uids to names
(HOT3D's object library has them). The sample has no images: clips are trajectory-only (frames None).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from hand3d_dataset.clip import Clip, HandTrack, ObjectTrack
from hand3d_dataset.sources._common import ManoPoser, invert_poses

__all__ = ["Hot3dSource", "pinhole_from_fisheye624"]

_HANDEDNESS = {"0": "left", "1": "right"}
_REQUIRED = ("headset_trajectory.csv", "mano_hand_pose_trajectory.jsonl")


def pinhole_from_fisheye624(params) -> np.ndarray:
    """(3, 3) K from FISHEYE624 `projectionParams` (16 values fx, fy, cx, cy, ... or 15 with one f)."""
    p = [float(x) for x in params]
    if len(p) == 16:
        fx, fy, cx, cy = p[:4]
    elif len(p) == 15:
        fx = fy = p[0]
        cx, cy = p[1:3]
    else:
        raise ValueError(f"projectionParams: expected 15 or 16 FISHEYE624 values, got {len(p)}")
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def _pose(t_xyz, q_wxyz) -> np.ndarray:
    """4×4 transform from a translation and a (w, x, y, z) quaternion."""
    T = np.eye(4)
    w, x, y, z = (float(v) for v in q_wxyz)
    T[:3, :3] = Rotation.from_quat([x, y, z, w]).as_matrix()
    T[:3, 3] = [float(v) for v in t_xyz]
    return T


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class Hot3dSource:
    """`SourceAdapter` over HOT3D sequence folders below `root`; ids `hot3d-<device>-<sequence>`."""

    name = "hot3d"

    def __init__(
        self,
        root: str | Path,
        stream_id: str = "1201-1",  # camera stream whose pose and boxes the clip uses (Quest3 slam-left)
        mano_dir: str | Path | None = None,  # folder with MANO_LEFT/RIGHT model files; None → wrist-only
        object_names: dict[str, str] | None = None,  # object uid → natural name
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root: {self.root} is not a folder")
        self.stream_id, self.object_names = stream_id, dict(object_names or {})
        # HOT3D's MANO: 15 PCA components with the files' mean pose
        self.poser = None if mano_dir is None else ManoPoser(mano_dir, use_pca=True, num_pca_comps=15)
        self.skipped: dict[str, str] = {}  # nothing fails at listing: sequences are found by file name
        seqs = sorted({p.parent for p in self.root.rglob(_REQUIRED[0]) if (p.parent / _REQUIRED[1]).exists()})
        self._seqs = {f"hot3d-{p.parent.name}-{p.name}": p for p in seqs}

    def clip_ids(self) -> list[str]:
        return list(self._seqs)

    def _camera(self, folder: Path, clip_id: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        path = folder / "camera_models.json"
        if not path.exists():
            raise ValueError(f"clip {clip_id}: no camera_models.json in {folder}; cannot place the camera")
        for cam in json.loads(path.read_text()):
            if cam.get("stream_id") == self.stream_id:
                T_dc = cam["T_Device_Camera"]
                T = _pose(T_dc["translation_xyz"], T_dc["quaternion_wxyz"])
                return (
                    T,
                    pinhole_from_fisheye624(cam["projectionParams"]),
                    (
                        int(cam["imageHeight"]),
                        int(cam["imageWidth"]),
                    ),
                )
        raise ValueError(f"clip {clip_id}: camera_models.json has no stream {self.stream_id!r}")

    def _joints(self, side: str, pca: np.ndarray, betas: np.ndarray, T_world_wrist: np.ndarray) -> np.ndarray:
        """(T, 21, 3) world joints: MANO in the wrist's frame (wrist at the origin), then T_world_wrist."""
        local = self.poser.joints(side, np.zeros((len(pca), 3)), pca, betas)
        local = local - local[:, :1]
        return np.einsum("tij,tkj->tki", T_world_wrist[:, :3, :3], local) + T_world_wrist[:, None, :3, 3]

    def load_clip(self, clip_id: str) -> Clip:
        if clip_id not in self._seqs:
            raise ValueError(f"clip_id: unknown {clip_id!r}; known: {list(self._seqs)[:5]}")
        folder = self._seqs[clip_id]
        T_dc, K, image_hw = self._camera(folder, clip_id)
        rows = _read_csv(folder / "headset_trajectory.csv")
        if not rows:
            raise ValueError(f"clip {clip_id}: headset_trajectory.csv has no rows")
        ts = np.array([int(r["timestamp[ns]"]) for r in rows])
        if np.any(np.diff(ts) <= 0):
            raise ValueError(f"clip {clip_id}: headset timestamps are not strictly increasing")
        T_wd = np.stack(
            [_pose([r[f"t_wo_{a}[m]"] for a in "xyz"], [r[f"q_wo_{a}"] for a in "wxyz"]) for r in rows]
        )
        T_wc = T_wd @ T_dc
        R, t = invert_poses(T_wc[:, :3, :3], T_wc[:, :3, 3])
        fps = 1e9 / float(np.median(np.diff(ts))) if len(ts) > 1 else 30.0
        index = {int(v): i for i, v in enumerate(ts)}
        n = len(ts)

        hands_raw: dict[str, dict[str, np.ndarray]] = {}
        with open(folder / "mano_hand_pose_trajectory.jsonl") as fh:
            for line in fh:
                if not line.strip():
                    continue
                rec = json.loads(line)
                k = index.get(int(rec["timestamp_ns"]))
                if k is None:
                    continue
                for key, hp in rec["hand_poses"].items():
                    side = _HANDEDNESS.get(str(key))
                    if side is None:
                        raise ValueError(f"clip {clip_id}: unknown handedness {key!r} (expected '0' or '1')")
                    h = hands_raw.setdefault(
                        side,
                        {"pose_pca": np.full((n, 15), np.nan), "betas": np.full((n, 10), np.nan)}
                        | {"T_world_wrist": np.full((n, 4, 4), np.nan)},
                    )
                    h["pose_pca"][k] = hp["pose"]
                    h["betas"][k] = hp["betas"]
                    h["T_world_wrist"][k] = _pose(hp["wrist_xform"]["t_xyz"], hp["wrist_xform"]["q_wxyz"])
        if not hands_raw:
            raise ValueError(f"clip {clip_id}: no hand pose matches a headset timestamp")
        hands = {}
        for side, h in hands_raw.items():
            valid = np.isfinite(h["T_world_wrist"]).all(axis=(1, 2))
            wrist = np.where(valid[:, None], h["T_world_wrist"][:, :3, 3], np.nan)
            joints = None
            if self.poser is not None:
                joints = np.full((n, 21, 3), np.nan)
                joints[valid] = self._joints(
                    side, h["pose_pca"][valid], h["betas"][valid], h["T_world_wrist"][valid]
                )
            mano = {"pose_pca": h["pose_pca"], "betas": h["betas"], "wrist_R": h["T_world_wrist"][:, :3, :3]}
            hands[side] = HandTrack(
                side, joints3d=joints, wrist3d=None if joints is not None else wrist, valid=valid, mano=mano
            )

        objects = self._objects(folder, index, n, image_hw)
        return Clip(
            clip_id=clip_id,
            source=self.name,
            fps=fps,
            K=K,
            R=R,
            t=t,
            image_hw=image_hw,
            hands=hands,
            objects=objects,
            task="",
            meta={"folder": str(folder), "stream_id": self.stream_id, "timestamps_ns": ts.tolist()},
        )

    def _objects(self, folder: Path, index: dict[int, int], n: int, image_hw) -> list[ObjectTrack]:
        pos: dict[str, np.ndarray] = {}
        boxes: dict[str, np.ndarray] = {}
        if (folder / "dynamic_objects.csv").exists():
            for r in _read_csv(folder / "dynamic_objects.csv"):
                k = index.get(int(r["timestamp[ns]"]))
                if k is not None:
                    p = pos.setdefault(r["object_uid"], np.full((n, 3), np.nan))
                    p[k] = [float(r[f"t_wo_{a}[m]"]) for a in "xyz"]
        if (folder / "box2d_objects.csv").exists():
            for r in _read_csv(folder / "box2d_objects.csv"):
                k = index.get(int(r["timestamp[ns]"]))
                if k is None or r["stream_id"] != self.stream_id:
                    continue
                x0, x1, y0, y1 = (
                    float(r[c]) for c in ("x_min[pixel]", "x_max[pixel]", "y_min[pixel]", "y_max[pixel]")
                )
                if x1 >= x0 and y1 >= y0:
                    b = boxes.setdefault(r["object_uid"], np.full((n, 4), np.nan))
                    b[k] = (x0 - 0.5, y0 - 0.5, x1 + 0.5, y1 + 0.5)
        return [
            ObjectTrack(
                self.object_names.get(uid, f"object {uid}"), box2d=boxes.get(uid), position3d=pos.get(uid)
            )
            for uid in sorted(set(pos) | set(boxes))
        ]
