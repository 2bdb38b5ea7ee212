"""The `taco` source: TACO tool-action-object sequences seen from the egocentric camera, as unified clips.

    from hand3d_dataset.sources.taco import TacoSource
    src = TacoSource("/data/TACO")                    # holds Hand_Poses/, Object_Poses/, Egocentric_*/ ...
    clip = src.load_clip(src.clip_ids()[0])           # e.g. "taco-stir_spoon_bowl-20231105_019-c000"
    clip.task, clip.depth.shape                       # "stir the bowl with the spoon", (10, 1080, 1920)

On-disk layout read here (README and `dataset_utils/` of leolyliu/TACO-Instructions), per `<triplet>/<seq>`
with `<triplet>` = "(action, tool, target)":
- `Hand_Poses/<triplet>/<seq>/{right,left}_hand.pkl`: a pickle of {frame key: {"hand_pose" (48,), "hand_trans"
  (3,)}} holding **torch tensors** (read with `hand3d_dataset.safe_pickle`, which rebuilds them as numpy
  arrays without torch's unpickler); frames in sorted key order. `{right,left}_hand_shape.pkl`:
  {"hand_shape": (1, 10) tensor}; a missing shape file means zero betas (`read_hand_shape`).
- `Object_Poses/<triplet>/<seq>/tool_<id>.npy`, `target_<id>.npy`: (N, 4, 4) object → world.
- `Object_Models/<id>_cm.obj` (optional): models in **centimetres** (the loader multiplies by 0.01).
- `Egocentric_Camera_Parameters/<triplet>/<seq>/egocentric_intrinsic.txt` (3 × 3) and
  `egocentric_frame_extrinsic.npy` (N, 4, 4), "world_to_camera" per the loader's comment.
- `Egocentric_RGB_Videos/<triplet>/<seq>/color.mp4` (1920 × 1080, 30 fps) and
  `Egocentric_Depth_Videos/<triplet>/<seq>/egocentric_depth.avi` (uint16 in 0.25 mm: depth scale 4000),
  both optional (see `images`), decoded with PyAV (`av`).

Conventions and why:
- Camera: `egocentric_frame_extrinsic` is world → camera (the loader hands it to its renderer as the
  extrinsic of meshes given in world coordinates): R, t as stored, metres, OpenCV axes; K fixed.
- Hands: `mano_params_to_hand_info` poses manopth `ManoLayer(use_pca=False, ncomps=45, center_idx=0)` with
  manopth's default `flat_hand_mean=True`: 3 global + 45 axis-angle values, no mean pose, joints in mm
  centred on the wrist, then `/ 1000 + hand_trans`, so the wrist sits at `hand_trans`; manopth
  fingertips. We pose with `hand3d_dataset.mano.ManoLayer(flat_hand_mean=True, fingertips="manopth")`
  (metres), subtract the wrist, add `hand_trans`. Model files: `mano_dir`, else $HAND3D_MANO_DIR, else
  `<root>/mano` (TACO's own `dataset_utils/manopth/mano/models` is a code folder, not the data root).
  Without them the hands are wrist-only tracks at `hand_trans` (exact for the wrist, by the centring).
- Objects: the tool and the target, named from the triplet ("(stir, spoon, bowl)": tool "spoon", target
  "bowl"), `position3d` = pose · (centre of the model's bounding box, cm → m) when the model is there, else
  the pose's translation. Task: "<action> the <target> with the <tool>".
- Frames: 30 fps; the loader skips a sequence whose video has fewer frames than poses ("losing frames in
  the egocentric video"), so do we (a ValueError naming the video). `images="auto"` decodes the videos when
  they exist, else trajectory-only clips.

Listing reads each sequence's frame count from the header of `egocentric_frame_extrinsic.npy` (no pickle
is opened until a clip is loaded); without that file, from the right-hand pickle.

Bad input: a missing file, mismatched frame counts, a truncated or undecodable video, non-finite cameras
or a pickle carrying code (refused by name) raise ValueError naming the file; a frame whose MANO values are
not finite is an invalid frame of that hand.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from hand3d_dataset import safe_pickle
from hand3d_dataset.clip import Clip, HandTrack, ObjectTrack
from hand3d_dataset.sources._common import (
    ChunkedSource,
    ManoPoser,
    depth_from_units,
    find_mano_dir,
    load_npy,
    masked,
    model_box_centre,
    npy_length,
    read_video_frames,
)

__all__ = ["TacoSource", "parse_triplet", "FPS"]

FPS = 30.0  # TACO's egocentric video rate
DEPTH_SCALE = 4000.0  # egocentric depth units per metre (0.25 mm)
VIDEO_HW = (1080, 1920)  # egocentric video size, used for trajectory-only clips


def parse_triplet(name: str) -> tuple[str, str, str]:
    """ "(stir, spoon, bowl)" → ("stir", "spoon", "bowl"): TACO's (action, tool, target) folder name."""
    m = re.fullmatch(r"\(\s*([^,]+?)\s*,\s*([^,]+?)\s*,\s*([^,]+?)\s*\)", name)
    if m is None:
        raise ValueError(f"triplet: {name!r} is not TACO's '(action, tool, target)' folder name")
    return m.group(1), m.group(2), m.group(3)


class TacoSource(ChunkedSource):
    """`SourceAdapter` over a TACO root; ids `taco-<action>_<tool>_<target>-<seq>-c<chunk>`."""

    name = "taco"
    FPS = FPS

    def __init__(
        self,
        root: str | Path,
        mano_dir: str | Path | None = None,  # MANO files; None → $HAND3D_MANO_DIR or <root>/mano
        sample_fps: float = 1.0,  # rate of the clip's frames (the paper samples 1 fps)
        chunk_s: float = 10.0,  # chunk length in seconds (the paper's ~10 s chunks)
        images: str = "auto",  # "auto" | "required" | "none": decode the egocentric RGB (and depth) videos
    ) -> None:
        super().__init__(sample_fps, chunk_s, images)
        self.root = Path(root)
        if not (self.root / "Hand_Poses").is_dir():
            raise ValueError(
                f"root: {self.root} has no Hand_Poses/ folder; point it at the TACO dataset root"
            )
        found = find_mano_dir(mano_dir, [self.root / "mano"])
        self.poser = None if found is None else ManoPoser(found, flat_hand_mean=True, fingertips="manopth")
        for right in sorted((self.root / "Hand_Poses").glob("*/*/right_hand.pkl")):
            triplet, seq = right.parent.parent.name, right.parent.name
            extr = (
                self.root / "Egocentric_Camera_Parameters" / triplet / seq / "egocentric_frame_extrinsic.npy"
            )
            try:
                action, tool, target = parse_triplet(triplet)
                # the extrinsics' header gives the frame count without unpickling the hand poses
                n = (
                    npy_length(extr)
                    if extr.exists()
                    else len(self._poses(right, f"sequence {triplet}/{seq}"))
                )
            except ValueError as e:
                self.skipped[f"{triplet}/{seq}"] = str(e)
                continue
            slug = "_".join(w.replace(" ", "-") for w in (action, tool, target))
            self._add(f"taco-{slug}-{seq}", n, triplet, seq)

    @staticmethod
    def _poses(path: Path, what: str) -> list[dict]:
        if not path.exists():
            raise ValueError(f"{what}: missing {path}")
        data = safe_pickle.load(path)
        if not isinstance(data, dict) or not data:
            raise ValueError(f"{what}: {path} is not a non-empty dict of per-frame hand poses")
        return [data[k] for k in sorted(data)]  # the loader's `keys.sort()`

    def _hand(self, folder: Path, side: str, n: int, idx: np.ndarray, what: str) -> HandTrack:
        frames = self._poses(folder / f"{side}_hand.pkl", what)
        if len(frames) != n:
            raise ValueError(
                f"{what}: {folder / f'{side}_hand.pkl'} has {len(frames)} frames, the right hand {n}"
            )
        theta, trans = np.full((len(idx), 48), np.nan), np.full((len(idx), 3), np.nan)
        for k, f in enumerate(idx):
            rec = frames[int(f)]
            try:
                th, tr = (
                    np.asarray(rec["hand_pose"], float).reshape(-1),
                    np.asarray(rec["hand_trans"], float).reshape(-1),
                )
            except (KeyError, TypeError) as e:
                raise ValueError(
                    f"{what}: frame {f} of {folder / f'{side}_hand.pkl'} lacks hand_pose/hand_trans"
                ) from e
            if th.size != 48 or tr.size != 3:
                raise ValueError(
                    f"{what}: frame {f} of {folder / f'{side}_hand.pkl'}: hand_pose {th.size} values (want 48), "
                    f"hand_trans {tr.size} (want 3)"
                )
            theta[k], trans[k] = th, tr
        shape_path = folder / f"{side}_hand_shape.pkl"
        betas = np.zeros(10)
        if shape_path.exists():
            shape = safe_pickle.load(shape_path)
            betas = np.asarray(shape["hand_shape"] if isinstance(shape, dict) else shape, float).reshape(-1)
            if betas.size != 10:
                raise ValueError(f"{what}: {shape_path} holds {betas.size} shape values, expected 10")
        betas = np.tile(betas, (len(idx), 1))
        ok = np.isfinite(theta).all(1) & np.isfinite(trans).all(1) & np.isfinite(betas).all(1)
        mano = masked(ok, global_orient=theta[:, :3], hand_pose=theta[:, 3:], transl=trans, betas=betas)
        if self.poser is None:
            return HandTrack(side, wrist3d=mano["transl"], valid=ok, mano=mano)
        local = self.poser.joints(side, theta[:, :3], theta[:, 3:], betas)
        joints = local - local[:, :1] + trans[:, None]  # center_idx=0, then + hand_trans
        joints[~ok] = np.nan
        return HandTrack(side, joints3d=joints, valid=ok, mano=mano)

    def load_clip(self, clip_id: str) -> Clip:
        triplet, seq, idx = self._entry(clip_id)
        what = f"clip {clip_id}"
        action, tool, target = parse_triplet(triplet)
        hands_dir = self.root / "Hand_Poses" / triplet / seq
        n = len(self._poses(hands_dir / "right_hand.pkl", what))
        cam_dir = self.root / "Egocentric_Camera_Parameters" / triplet / seq
        if not (cam_dir / "egocentric_intrinsic.txt").exists():
            raise ValueError(f"{what}: missing {cam_dir / 'egocentric_intrinsic.txt'}")
        K = np.loadtxt(cam_dir / "egocentric_intrinsic.txt")
        extr = np.asarray(load_npy(cam_dir / "egocentric_frame_extrinsic.npy", what), float)
        if K.shape != (3, 3) or extr.shape != (n, 4, 4):
            raise ValueError(
                f"{what}: egocentric intrinsic {K.shape} / extrinsics {extr.shape} in {cam_dir}; expected (3, 3) "
                f"and ({n}, 4, 4) for {n} hand-pose frames"
            )
        if not (np.isfinite(K).all() and np.isfinite(extr[idx]).all()):
            raise ValueError(f"{what}: non-finite egocentric camera values in {cam_dir}")
        hands = {side: self._hand(hands_dir, side, n, idx, what) for side in ("left", "right")}
        objects = [
            self._object(triplet, seq, role, name, n, idx, what)
            for role, name in (("tool", tool), ("target", target))
        ]
        if objects[0].name == objects[1].name:
            objects[1].name = f"{target} (target)"
        frames, depth, image_hw = self._videos(triplet, seq, idx, n, what)
        return Clip(
            clip_id=clip_id,
            source=self.name,
            fps=self.clip_fps,
            K=K,
            R=extr[idx, :3, :3],
            t=extr[idx, :3, 3],
            image_hw=image_hw,
            hands=hands,
            objects=objects,
            task=f"{action} the {target} with the {tool}",
            frames=frames,
            depth=depth,
            meta={"sequence": f"{triplet}/{seq}", "frame_indices": idx.tolist(), "source_fps": FPS},
        )

    def _object(
        self, triplet: str, seq: str, role: str, name: str, n: int, idx: np.ndarray, what: str
    ) -> ObjectTrack:
        folder = self.root / "Object_Poses" / triplet / seq
        files = sorted(folder.glob(f"{role}_*.npy"))
        if len(files) != 1:
            raise ValueError(
                f"{what}: expected one {role}_<id>.npy in {folder}, found {[f.name for f in files]}"
            )
        poses = np.asarray(load_npy(files[0], what), float)
        if poses.shape != (n, 4, 4):
            raise ValueError(f"{what}: {files[0]} has shape {poses.shape}, expected ({n}, 4, 4)")
        # TACO's models are in centimetres
        centre = model_box_centre(
            self.root / "Object_Models" / f"{files[0].stem.split('_', 1)[1]}_cm.obj", 0.01
        )
        p = poses[idx]
        pos = np.einsum("tij,j->ti", p[:, :3, :3], centre) + p[:, :3, 3]
        return ObjectTrack(name, position3d=np.where(np.isfinite(pos).all(1)[:, None], pos, np.nan))

    def _videos(self, triplet: str, seq: str, idx: np.ndarray, n: int, what: str):
        rgb = self.root / "Egocentric_RGB_Videos" / triplet / seq / "color.mp4"
        if not self._use_images(rgb.exists()):
            return None, None, VIDEO_HW
        frames = read_video_frames(rgb, idx, what, expect=n)
        dpath = self.root / "Egocentric_Depth_Videos" / triplet / seq / "egocentric_depth.avi"
        depth = None
        if dpath.exists():
            raw = read_video_frames(dpath, idx, what, fmt="gray16le", expect=n)
            if raw.shape[1:] != frames.shape[1:3]:
                raise ValueError(f"{what}: {dpath} is {raw.shape[1:]}, the RGB video {frames.shape[1:3]}")
            depth = depth_from_units(raw, DEPTH_SCALE)
        return frames, depth, frames.shape[1:3]
