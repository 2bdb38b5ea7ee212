"""The `arctic` source: ARCTIC bimanual sequences seen from the egocentric camera, as unified clips.

    from hand3d_dataset.sources.arctic import ArcticSource
    src = ArcticSource("/data/arctic/data/arctic_data/data")   # holds raw_seqs/, meta/, images/
    clip = src.load_clip(src.clip_ids()[0])                    # e.g. "arctic-s01-box_grab_01-c000"
    clip.hands["right"].joints3d.shape, clip.task              # (10, 21, 3), "grab the box"

On-disk layout read here (`docs/data/data_doc.md` of zc-alexfan/arctic; the root is `arctic_data/data`):
- `raw_seqs/<sid>/<obj>_<action>_<nn>.mano.npy`: a pickled dict (`np.load(..., allow_pickle=True).item()`)
  `{"right"|"left": {"rot" (T, 3) axis-angle, "pose" (T, 45) axis-angle, "trans" (T, 3) m, "shape" (10,),
  "fitting_err" (T,)}}`: MANO in the world (mocap) frame.
- `raw_seqs/<sid>/<seq>.egocam.dist.npy`: pickled dict with `R_k_cam_np` (T, 3, 3), `T_k_cam_np` (T, 3, 1),
  `intrinsics` (3, 3), `dist8` (8,) ...; `world2ego = [R_k_cam_np | T_k_cam_np]` (`preprocess_dataset.py`).
- `raw_seqs/<sid>/<seq>.object.npy`: (T, 7) float array: articulation (rad), rotation (axis-angle), translation
  in **millimetres** (`processing.py` divides it by 1000).
- `meta/misc.json`: per subject `ioi_offset` (image index of frame 0), `image_size` ([w, h] per view, view 0
  = egocentric), allocentric `world2cam` / `intris_mat` (unused here).
- `meta/object_vtemplates/<obj>/mesh.obj`: object template in millimetres (optional; gives the centre).
- `images/<sid>/<seq>/0/<frame + ioi_offset:05d>.jpg`: egocentric view 0 (optional, see `images`).
- `processed_seqs/<sid>/<seq>.npy` (optional): pickled dict whose `world_coord["joints.right|left"]` (T, 21, 3)
  are ARCTIC's own MANO joints in the world frame; used when no MANO model files are found.

Conventions and why:
- Camera: ARCTIC's egocentric camera is head-mounted and moves; `world2ego` maps world points into it
  (`transform_points_batch(world2ego, pts_world)` in `processing.py`), so it is our world → camera directly:
  R = `R_k_cam_np`, t = `T_k_cam_np`, OpenCV axes, metres; K = `intrinsics`, fixed per sequence. The
  raw egocentric images are distorted (`dist8`); like `processing.py`'s view 0 ("egocentric view:
  undistorted space") we use the pinhole K and ignore the distortion, so joints land on the undistorted
  projection (the dataset's view 0 2D joints), a few pixels off the raw image towards its corners.
- Hands: `processing.py` poses MANO with smplx's `MANO(use_pca=False, flat_hand_mean=False)`
  (`build_mano_aa(flat_hand=False)` in `common/body_models.py`): 45-D axis-angle, the files' mean pose added,
  `transl` added last, smplx fingertips; left hands from MANO_LEFT as stored (smplx does not flip
  shapedirs). `hand3d_dataset.mano.ManoLayer` reproduces exactly that and its joints are OpenPose-ordered.
  Model files come from `mano_dir`, else `$HAND3D_MANO_DIR`, else `<root>/../../body_models/mano` (the
  official repo's `data/body_models/mano` next to `data/arctic_data`). Without model files the joints
  come from `processed_seqs` (ARCTIC's 21 joints are MANO's 16 + 5 smplx tips, reordered here with
  `MANO_TO_OPENPOSE`); with neither, the clip is refused (the MANO translation is not the wrist: it is off
  by the template's root joint, ~10 cm).
- Objects: one object per sequence, named from the sequence ("capsulemachine_use_02" → "capsule machine"),
  position = R_obj · c + t_obj with c the centre of the template's bounding box (mm → m) when the template
  is there, else the object origin; articulation of the top part is ignored (the centre of the whole
  object moves little with it). Task: "grab the box" / "use the box" (ARCTIC's two actions: "use"
  articulates the object).
- Frames: 30 fps (ARCTIC's capture rate), sampled at `sample_fps` in `chunk_s` chunks
  (`_common.chunk_frame_indices`). `images="auto"` reads the egocentric images when the sequence's
  `images/.../0` folder exists and otherwise yields trajectory-only clips (frames None; the images are
  ~1 TB and many users only download `raw_seqs`); "required" makes a missing folder an error; "none" never
  reads them. ARCTIC has no depth: with the object's pose (`--object-source auto | pose`) the images give
  spatial rows without a depth model.

Bad input: a missing or unreadable file, mismatched frame counts, or non-finite cameras raise ValueError
naming the file (the build records the clip as skipped). A frame whose MANO parameters are not finite is
an invalid frame of that hand (NaN), counted in `meta["nonfinite_mano_frames"]`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from hand3d_dataset.clip import Clip, HandTrack, ObjectTrack
from hand3d_dataset.sources._common import (
    MANO_DIR_ENV,
    ChunkedSource,
    ManoPoser,
    find_mano_dir,
    load_npy,
    masked,
    model_box_centre,
    read_rgb,
)

__all__ = ["ArcticSource", "FPS"]

FPS = 30.0  # ARCTIC's image rate
EGO_IMAGE_HW = (2000, 2800)  # egocentric image size (processing.py's fixed ego box) when misc.json lacks it
# ARCTIC object ids → natural names
OBJECT_NAMES = {
    "capsulemachine": "capsule machine",
    "espressomachine": "espresso machine",
    "waffleiron": "waffle iron",
    "ketchup": "ketchup bottle",
}


class ArcticSource(ChunkedSource):
    """`SourceAdapter` over an ARCTIC `arctic_data/data` root; ids `arctic-<sid>-<seq>-c<chunk>`."""

    name = "arctic"
    FPS = FPS

    def __init__(
        self,
        root: str | Path,
        mano_dir: str | Path | None = None,  # MANO_LEFT/RIGHT files; None → $HAND3D_MANO_DIR or beside root
        sample_fps: float = 1.0,  # rate of the clip's frames (the paper samples 1 fps)
        chunk_s: float = 10.0,  # chunk length in seconds (the paper's ~10 s chunks)
        images: str = "auto",  # "auto" | "required" | "none": read the egocentric images (see module doc)
    ) -> None:
        super().__init__(sample_fps, chunk_s, images)
        self.root = Path(root)
        if (
            not (self.root / "raw_seqs").is_dir()
            and (self.root / "arctic_data" / "data" / "raw_seqs").is_dir()
        ):
            self.root = self.root / "arctic_data" / "data"
        if not (self.root / "raw_seqs").is_dir():
            raise ValueError(
                f"root: {self.root} has no raw_seqs/ folder; point it at ARCTIC's arctic_data/data"
            )
        found = find_mano_dir(mano_dir, [self.root.parent.parent / "body_models" / "mano"])
        self.poser = None if found is None else ManoPoser(found, use_pca=False, flat_hand_mean=False)
        self._misc: dict | None = None
        for mano_p in sorted(self.root.glob("raw_seqs/*/*.mano.npy")):
            sid, seq = mano_p.parent.name, mano_p.name[: -len(".mano.npy")]
            try:  # only the MANO file here: the others are read (and their errors reported) per clip
                n = len(load_npy(mano_p, f"sequence {sid}/{seq}")["right"]["rot"])
            except (ValueError, KeyError, TypeError) as e:
                self.skipped[f"{sid}/{seq}"] = str(e)
                continue
            self._add(f"arctic-{sid}-{seq}", n, sid, seq)

    def misc(self) -> dict:
        if self._misc is None:
            path = self.root / "meta" / "misc.json"
            self._misc = json.loads(path.read_text()) if path.exists() else {}
        return self._misc

    def _raw(self, sid: str, seq: str, what: str) -> tuple[dict, dict, np.ndarray]:
        base = self.root / "raw_seqs" / sid / seq
        mano = load_npy(Path(f"{base}.mano.npy"), what)
        ego = load_npy(Path(f"{base}.egocam.dist.npy"), what)
        obj = load_npy(Path(f"{base}.object.npy"), what)
        if not isinstance(mano, dict) or not {"right", "left"} <= set(mano):
            raise ValueError(f"{what}: {base}.mano.npy is not a dict with 'right' and 'left'")
        for key in ("R_k_cam_np", "T_k_cam_np", "intrinsics"):
            if not isinstance(ego, dict) or key not in ego:
                raise ValueError(f"{what}: {base}.egocam.dist.npy lacks {key!r}")
        return mano, ego, np.asarray(obj, float)

    def load_clip(self, clip_id: str) -> Clip:
        sid, seq, idx = self._entry(clip_id)
        what = f"clip {clip_id}"
        base = self.root / "raw_seqs" / sid / seq
        mano, ego, obj = self._raw(sid, seq, what)
        T = len(mano["right"]["rot"])
        R_all = np.asarray(ego["R_k_cam_np"], float)
        t_all = np.asarray(ego["T_k_cam_np"], float).reshape(-1, 3)
        K = np.asarray(ego["intrinsics"], float)
        if len(R_all) != T or len(t_all) != T or obj.shape != (T, 7):
            raise ValueError(
                f"{what}: frame counts disagree: mano {T}, egocam {len(R_all)}, object {obj.shape} (expected ({T}, 7))"
            )
        if not (np.isfinite(R_all[idx]).all() and np.isfinite(t_all[idx]).all() and np.isfinite(K).all()):
            raise ValueError(f"{what}: {base}.egocam.dist.npy has non-finite camera values")
        if K.shape != (3, 3):
            raise ValueError(
                f"{what}: intrinsics in {base}.egocam.dist.npy have shape {K.shape}, expected (3, 3)"
            )

        hands, bad = {}, {}
        for side in ("left", "right"):
            joints, params, nonfinite = self._hand(mano[side], side, sid, seq, idx, what)
            valid = np.isfinite(joints).all(axis=(1, 2))
            bad[side] = nonfinite
            hands[side] = HandTrack(side, joints3d=joints, valid=valid, mano=params)

        obj_name = seq.split("_")[0]
        name = OBJECT_NAMES.get(obj_name, obj_name)
        centre = model_box_centre(self.root / "meta" / "object_vtemplates" / obj_name / "mesh.obj", 1e-3)
        o = obj[idx]
        if not np.isfinite(o).all():
            raise ValueError(f"{what}: {base}.object.npy has non-finite values on the sampled frames")
        pos = Rotation.from_rotvec(o[:, 1:4]).apply(centre) + o[:, 4:7] / 1000.0
        action = seq.split("_")[1] if seq.count("_") >= 2 else "use"

        misc = self.misc().get(sid, {})
        size = misc.get("image_size", [[EGO_IMAGE_HW[1], EGO_IMAGE_HW[0]]])[0]
        image_hw = (int(size[1]), int(size[0]))
        frames = self._frames(sid, seq, idx, image_hw, misc, what)
        return Clip(
            clip_id=clip_id,
            source=self.name,
            fps=self.clip_fps,
            K=K,
            R=R_all[idx],
            t=t_all[idx],
            image_hw=image_hw,
            hands=hands,
            objects=[ObjectTrack(name, position3d=pos)],
            task=f"{action} the {name}",
            frames=frames,
            meta={
                "sequence": f"{sid}/{seq}",
                "frame_indices": idx.tolist(),
                "source_fps": FPS,
                "joints_from": "mano" if self.poser is not None else "processed_seqs",
                "object_articulation_rad": o[:, 0].tolist(),
                "nonfinite_mano_frames": bad,
                "distortion_ignored": np.asarray(ego.get("dist8", []), float).tolist(),
            },
        )

    def _hand(self, h: dict, side: str, sid: str, seq: str, idx: np.ndarray, what: str):
        n = len(idx)
        try:
            rot = np.asarray(h["rot"], float)[idx]
            pose = np.asarray(h["pose"], float)[idx]
            trans = np.asarray(h["trans"], float)[idx]
            shape = np.broadcast_to(np.asarray(h["shape"], float).reshape(-1, 10)[0], (n, 10)).copy()
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"{what}: {side} hand of {sid}/{seq}.mano.npy lacks rot/pose/trans/shape ({e})"
            ) from e
        ok = (
            np.isfinite(rot).all(1)
            & np.isfinite(pose).all(1)
            & np.isfinite(trans).all(1)
            & np.isfinite(shape).all(1)
        )
        params = masked(ok, global_orient=rot, hand_pose=pose, transl=trans, betas=shape)
        if self.poser is not None:
            joints = self.poser.joints(side, rot, pose, shape, trans)
        else:
            joints = self._processed_joints(side, sid, seq, idx, what)
        joints[~ok] = np.nan
        return joints, params, int((~ok).sum())

    def _processed_joints(self, side: str, sid: str, seq: str, idx: np.ndarray, what: str) -> np.ndarray:
        from hand3d_dataset.mano import MANO_TO_OPENPOSE

        path = self.root / "processed_seqs" / sid / f"{seq}.npy"
        if not path.exists():
            raise ValueError(
                f"{what}: no MANO model files (pass mano_dir or set ${MANO_DIR_ENV}) and no {path} to take "
                "ARCTIC's own joints from"
            )
        data = load_npy(path, what)
        try:
            j = np.asarray(data["world_coord"][f"joints.{side}"], float)[idx]
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(
                f"{what}: {path} lacks world_coord['joints.{side}'] for the sampled frames ({e})"
            ) from e
        if j.shape[1:] != (21, 3):
            raise ValueError(f"{what}: {path} joints.{side} has shape {j.shape}, expected (T, 21, 3)")
        return j[:, MANO_TO_OPENPOSE].copy()

    def _frames(
        self, sid: str, seq: str, idx: np.ndarray, image_hw, misc: dict, what: str
    ) -> np.ndarray | None:
        folder = self.root / "images" / sid / seq / "0"
        if not self._use_images(folder.is_dir()):
            return None
        if not folder.is_dir():
            raise ValueError(f"{what}: missing egocentric image folder {folder}")
        if "ioi_offset" not in misc:
            raise ValueError(f"{what}: {self.root / 'meta' / 'misc.json'} has no ioi_offset for {sid}")
        off = int(misc["ioi_offset"])
        frames = np.zeros((len(idx), *image_hw, 3), np.uint8)
        for k, f in enumerate(idx):
            path = folder / f"{int(f) + off:05d}.jpg"
            img = read_rgb(path, what)
            if img.shape[:2] != tuple(image_hw):
                raise ValueError(f"{what}: {path} is {img.shape[:2]}, misc.json says {tuple(image_hw)}")
            frames[k] = img
        return frames
