"""The `oakink2` source: OakInk2 bimanual task sequences seen from the egocentric camera, as unified clips.

    from hand3d_dataset.sources.oakink2 import OakInk2Source
    src = OakInk2Source("/data/OakInk-v2")          # holds anno_preview/, data/, object_raw/, program/
    clip = src.load_clip(src.clip_ids()[0])         # e.g. "oakink2-scene_01__A001++seq__...__2023-04-20-15-48-43-c000"
    clip.hands["left"].joints3d.shape, clip.task    # (10, 21, 3), "pour water from the teapot into the cup"

On-disk layout read here (the README and `src/oakink2_toolkit/dataset.py`, `oakink2_preview/dataset/
stream_preview.py` of oakink/OakInk2):
- `anno_preview/<seq_token>.pkl` (`seq_token` = seq key with "/" → "++"): a pickle (read with
  `hand3d_dataset.safe_pickle`, never `pickle.load`) of a dict with `cam_def` {serial: view name},
  `cam_selection`, `frame_id_list` (mocap frame ids that have colour frames), `cam_intr` / `cam_extr`
  {view: {frame id: (3, 3) / (4, 4)}}, `mocap_frame_id_list`, `raw_mano` {frame id: {"lh__pose_coeffs"
  (1, 16, 4), "lh__tsl" (1, 3), "lh__betas" (1, 10), "rh__..."}} (torch tensors), `obj_list` and
  `obj_transf` {object id: {frame id: (4, 4)}}.
- `data/<seq_token>/<serial>/<frame id:06d>.png`: colour frames of each camera (optional, see `images`).
- `object_raw/obj_desc.json` {object id: {"obj_name": ...}} (names; optional).
- `program/task_target.json` {seq key: task text} and `program/desc_info/<seq_token>.json` {str(((lh_begin,
  lh_end) | None, (rh_begin, rh_end) | None)): {"seg_desc": text}} (the primitive tasks; optional).

Conventions and why:
- Camera: the view named "egocentric" in `cam_def` (the head-mounted camera), per-frame `cam_intr` and
  `cam_extr`. `cam_extr` maps world points into the camera: the toolkit's `seg_3d.py` renders hands with
  `transf_point_array_np(cam_extr, joints_world)` and objects with `cam_extr @ obj_transf`, so it is our
  world → camera, OpenCV axes, metres.
- Hands: the toolkit poses MANO with manotorch `ManoLayer(rot_mode="quat", use_pca=False,
  flat_hand_mean=True, center_idx=0)` and adds `tsl`: 16 joint rotations as unit quaternions in manotorch's
  (w, x, y, z) order (the first is the global rotation), no PCA, zero pose = flat hand, joints centred on
  the wrist and then translated, so the wrist sits at `tsl`; manotorch's fingertips are manopth's vertices.
  We convert the quaternions to axis-angle (scipy, real part moved last) and pose with
  `hand3d_dataset.mano.ManoLayer(flat_hand_mean=True, fingertips="manopth")`, subtract the wrist, add `tsl`.
  Model files: `mano_dir`, else $HAND3D_MANO_DIR, else `<root>/mano` or `<root>/../mano_v1_2/models`.
  Without them the hands are wrist-only tracks at `tsl` (exact for the wrist, by the centring).
- Frames: colour at 30 fps (`FPS_COLOR` of the toolkit; mocap runs at 120 Hz), so chunks index
  `frame_id_list`: every 30th entry is 1 s. A frame id missing from `raw_mano` or with non-finite values
  is an invalid frame of that hand.
- Objects: each id of `obj_list`, named by `obj_desc.json` (else "object <id>"); `position3d` = translation of
  `obj_transf` (the origin of the object's model frame; OakInk2 models are centred on it), NaN where the
  pose is missing. Task: the `seg_desc` of the primitive segment overlapping the chunk most, else the
  sequence's `task_target`.
- `images`: as the ARCTIC adapter ("auto": read PNGs when the camera folder exists, else trajectory-only).

Listing: a sequence's colour frame count is only in its annotation pickle (tens of seconds to unpickle for a
long sequence), so it is remembered per file in `$HAND3D_CACHE/frame_counts.json` (`_common.cached_count`):
the first listing of a download reads every annotation once, later ones none.

Bad input: a missing or unreadable annotation file, a sequence without an egocentric camera, an annotation
pickle carrying code (refused by name) or non-finite cameras raise ValueError naming the file.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from hand3d_dataset import safe_pickle
from hand3d_dataset.clip import Clip, HandTrack, ObjectTrack
from hand3d_dataset.sources._common import (
    ChunkedSource,
    ManoPoser,
    cached_count,
    find_mano_dir,
    masked,
    read_rgb,
)

__all__ = ["OakInk2Source", "quat_wxyz_to_axis_angle", "FPS"]

FPS = 30.0  # OakInk2's colour rate (mocap runs at 120 Hz)
DEFAULT_IMAGE_HW = (480, 848)  # the toolkit's FRAME_SHAPE, used when no image is there to measure
EGO_VIEW = "egocentric"
_ANNO_KEYS = ("cam_def", "frame_id_list", "cam_intr", "cam_extr", "raw_mano", "obj_list", "obj_transf")


def quat_wxyz_to_axis_angle(q: np.ndarray) -> np.ndarray:
    """(..., 4) unit quaternions, real part first (manotorch's order) → (..., 3) axis-angle, radians."""
    q = np.asarray(q, float)
    flat = q.reshape(-1, 4)
    return Rotation.from_quat(flat[:, [1, 2, 3, 0]]).as_rotvec().reshape(*q.shape[:-1], 3)


def _np(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=float)


class OakInk2Source(ChunkedSource):
    """`SourceAdapter` over an OakInk2 root; ids `oakink2-<seq_token>-c<chunk>`."""

    name = "oakink2"
    FPS = FPS

    def __init__(
        self,
        root: str | Path,
        mano_dir: str | Path | None = None,  # MANO files; None → $HAND3D_MANO_DIR or beside root
        sample_fps: float = 1.0,  # rate of the clip's frames (the paper samples 1 fps)
        chunk_s: float = 10.0,  # chunk length in seconds (the paper's ~10 s chunks)
        images: str = "auto",  # "auto" | "required" | "none": read the egocentric colour frames
    ) -> None:
        super().__init__(sample_fps, chunk_s, images)
        self.root = Path(root)
        if not (self.root / "anno_preview").is_dir():
            raise ValueError(
                f"root: {self.root} has no anno_preview/ folder; point it at the OakInk2 data folder"
            )
        found = find_mano_dir(mano_dir, [self.root / "mano", self.root.parent / "mano_v1_2" / "models"])
        self.poser = None if found is None else ManoPoser(found, flat_hand_mean=True, fingertips="manopth")
        self._cache: tuple[str, dict] | None = None
        for path in sorted((self.root / "anno_preview").glob("*.pkl")):
            token = path.stem
            try:  # unpickling an annotation takes long: the count is cached (_common.cached_count)
                n = cached_count(
                    path, lambda p, t=token: len(self._anno(t, f"sequence {t}")["frame_id_list"])
                )
            except ValueError as e:
                self.skipped[token] = str(e)
                continue
            self._add(f"oakink2-{token}", n, token)

    def _anno(self, token: str, what: str) -> dict:
        if self._cache is not None and self._cache[0] == token:
            return self._cache[1]
        path = self.root / "anno_preview" / f"{token}.pkl"
        if not path.exists():
            raise ValueError(f"{what}: missing {path}")
        try:
            anno = safe_pickle.load(path)
        except (OSError, EOFError) as e:
            raise ValueError(f"{what}: cannot read {path}: {e}") from e
        if not isinstance(anno, dict):
            raise ValueError(f"{what}: {path} holds {type(anno).__name__}, expected a dict")
        missing = [k for k in _ANNO_KEYS if k not in anno]
        if missing:
            raise ValueError(
                f"{what}: {path} lacks {missing}; not an OakInk2 anno_preview file (layout changed?)"
            )
        self._cache = (token, anno)
        return anno

    def load_clip(self, clip_id: str) -> Clip:
        token, idx = self._entry(clip_id)
        what = f"clip {clip_id}"
        anno = self._anno(token, what)
        fids = [int(anno["frame_id_list"][i]) for i in idx]
        serials = [s for s, view in anno["cam_def"].items() if view == EGO_VIEW]
        if not serials or EGO_VIEW not in anno["cam_intr"] or EGO_VIEW not in anno["cam_extr"]:
            raise ValueError(
                f"{what}: anno_preview/{token}.pkl has no {EGO_VIEW!r} camera (cam_def {anno['cam_def']})"
            )
        try:
            K = np.stack([_np(anno["cam_intr"][EGO_VIEW][f]) for f in fids])
            extr = np.stack([_np(anno["cam_extr"][EGO_VIEW][f]) for f in fids])
        except KeyError as e:
            raise ValueError(
                f"{what}: anno_preview/{token}.pkl has no egocentric camera for frame {e}"
            ) from e
        if (
            K.shape[1:] != (3, 3)
            or extr.shape[1:] != (4, 4)
            or not (np.isfinite(K).all() and np.isfinite(extr).all())
        ):
            raise ValueError(
                f"{what}: anno_preview/{token}.pkl has malformed or non-finite egocentric cameras"
            )

        hands = {
            side: self._hand(anno["raw_mano"], prefix, side, fids)
            for side, prefix in (("left", "lh"), ("right", "rh"))
        }
        names = self._object_names()
        objects = []
        for oid in anno["obj_list"]:
            poses = anno["obj_transf"].get(oid, {})
            pos = np.array([_np(poses[f])[:3, 3] if f in poses else np.full(3, np.nan) for f in fids])
            name = names.get(oid, f"object {oid}")
            if name in [o.name for o in objects]:
                name = f"{name} ({oid})"
            objects.append(
                ObjectTrack(name, position3d=np.where(np.isfinite(pos).all(1)[:, None], pos, np.nan))
            )

        image_hw, frames = self._frames(token, serials[0], fids, what)
        return Clip(
            clip_id=clip_id,
            source=self.name,
            fps=self.clip_fps,
            K=K,
            R=extr[:, :3, :3],
            t=extr[:, :3, 3],
            image_hw=image_hw,
            hands=hands,
            objects=objects,
            task=self._task(token, fids),
            frames=frames,
            meta={
                "sequence": token.replace("++", "/"),
                "frame_indices": idx.tolist(),
                "mocap_frame_ids": fids,
                "source_fps": FPS,
                "camera_serial": serials[0],
            },
        )

    def _hand(self, raw_mano: dict, prefix: str, side: str, fids: list[int]) -> HandTrack:
        n = len(fids)
        quat, tsl, betas = np.full((n, 16, 4), np.nan), np.full((n, 3), np.nan), np.full((n, 10), np.nan)
        for k, f in enumerate(fids):
            rec = raw_mano.get(f)
            if rec is None or f"{prefix}__pose_coeffs" not in rec:
                continue
            q, tr, b = (_np(rec[f"{prefix}__{key}"]) for key in ("pose_coeffs", "tsl", "betas"))
            if q.size == 64 and tr.size == 3 and b.size == 10:
                quat[k], tsl[k], betas[k] = q.reshape(16, 4), tr.reshape(3), b.reshape(10)
        ok = np.isfinite(quat).all(axis=(1, 2)) & np.isfinite(tsl).all(1) & np.isfinite(betas).all(1)
        norms = np.linalg.norm(np.where(ok[:, None, None], quat, 1.0), axis=-1)
        ok &= np.all(np.abs(norms - 1.0) < 1e-3, axis=1)  # not unit quaternions: corrupt, not a pose
        aa = np.full((n, 16, 3), np.nan)
        if ok.any():
            aa[ok] = quat_wxyz_to_axis_angle(quat[ok])
        mano = masked(
            ok,
            pose_quat_wxyz=quat,
            global_orient=aa[:, 0],
            hand_pose=aa[:, 1:].reshape(n, 45),
            transl=tsl,
            betas=betas,
        )
        if self.poser is None:
            return HandTrack(side, wrist3d=mano["transl"], valid=ok, mano=mano)
        local = self.poser.joints(side, aa[:, 0], aa[:, 1:].reshape(n, 45), betas)
        joints = local - local[:, :1] + tsl[:, None]  # center_idx=0, then tsl
        joints[~ok] = np.nan
        return HandTrack(side, joints3d=joints, valid=ok, mano=mano)

    def _object_names(self) -> dict[str, str]:
        path = self.root / "object_raw" / "obj_desc.json"
        if not path.exists():
            return {}
        desc = json.loads(path.read_text())
        return {k: str(v["obj_name"]) for k, v in desc.items() if isinstance(v, dict) and v.get("obj_name")}

    def _task(self, token: str, fids: list[int]) -> str:
        key = token.replace("++", "/")
        desc_path = self.root / "program" / "desc_info" / f"{token}.json"
        best, best_overlap = None, 0
        if desc_path.exists():
            lo, hi = min(fids), max(fids) + 1
            for k, v in json.loads(desc_path.read_text()).items():
                ranges = [r for r in ast.literal_eval(k) if r is not None]
                if not ranges or not isinstance(v, dict) or not v.get("seg_desc"):
                    continue
                b, e = min(r[0] for r in ranges), max(r[1] for r in ranges)
                overlap = min(hi, e) - max(lo, b)
                if overlap > best_overlap:
                    best, best_overlap = str(v["seg_desc"]), overlap
        if best is not None:
            return best
        target_path = self.root / "program" / "task_target.json"
        if target_path.exists():
            return str(json.loads(target_path.read_text()).get(key, ""))
        return ""

    def _frames(self, token: str, serial: str, fids: list[int], what: str):
        folder = self.root / "data" / token / str(serial)
        if not self._use_images(folder.is_dir()):
            first = sorted(folder.glob("*.png"))[:1] if folder.is_dir() else []
            hw = read_rgb(first[0], what).shape[:2] if first else DEFAULT_IMAGE_HW
            return tuple(hw), None
        if not folder.is_dir():
            raise ValueError(f"{what}: missing egocentric frame folder {folder}")
        imgs = [read_rgb(folder / f"{f:06d}.png", what) for f in fids]
        if len({im.shape for im in imgs}) != 1:
            raise ValueError(f"{what}: frames in {folder} differ in size")
        return imgs[0].shape[:2], np.stack(imgs)
