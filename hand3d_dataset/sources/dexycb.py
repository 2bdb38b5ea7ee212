"""The `dexycb` source: DexYCB grasp sequences (8 static RealSense views) as unified clips.

    from hand3d_dataset.sources.dexycb import DexYcbSource
    src = DexYcbSource("/data/dex-ycb")                 # the folder DEX_YCB_DIR points at
    clip = src.load_clip(src.clip_ids()[0])             # e.g. "dexycb-20200709-subject-01-20200709_141754-836212060125-c000"
    clip.frames.shape, clip.hands["right"].joints3d.shape   # (3, 480, 640, 3), (3, 21, 3)

On-disk layout read here (as `dex_ycb_toolkit/dex_ycb.py` and `sequence_loader.py` read it):
- `<subject>/<sequence>/meta.yml`: `serials` (the 8 cameras), `num_frames`, `ycb_ids` (YCB class ids of the
  objects on the table), `ycb_grasp_ind` (index into `ycb_ids` of the grasped object), `mano_sides`
  (one of "right"/"left"), `mano_calib` (subject calibration name).
- `<subject>/<sequence>/<serial>/color_%06d.jpg` (640×480 RGB), `aligned_depth_to_color_%06d.png` (uint16
  millimetres, aligned to the colour camera, 0 = no return) and `labels_%06d.npz` per frame with `seg`
  (480×640 uint8: YCB class id per object pixel, 255 hand, 0 background), `pose_y` (O, 3, 4) object→camera
  `[R | t]` in metres, `pose_m` (1, 51) MANO, `joint_3d` (1, 21, 3) camera frame, metres, and `joint_2d`
  (1, 21, 2) pixels.
- `calibration/intrinsics/<serial>_640x480.yml` (`color: fx, fy, ppx, ppy`) and
  `calibration/mano_<mano_calib>/mano.yml` (`betas`, 10 values).

Conventions and why:
- Every label is in the frame of *its* camera (the toolkit's renderer app reads them per camera), so a clip
  is one (sequence, camera) pair and its world frame is that camera: R = I, t = 0. The cameras are fixed
  third-person views; none is egocentric, so all 8 serials are clips unless `serials` narrows them.
- Joints: `joint_3d` in metres in DexYCB's 21-joint order (wrist, thumb mcp..tip, index, middle, ring,
  little), which is the OpenPose order of `clip.py`: used as they are. `joint_2d` is their K-projection
  (the fixture and the test check this). A frame without a hand has `pose_m` all zero and `joint_3d` =
  `joint_2d` = −1: the frame is invalid (NaN joints), never a hand at (−1, −1, −1) m.
- MANO: `pose_m` = 3 global axis-angle + 45 PCA coefficients + 3 translation, posed exactly as the toolkit's
  `MANOLayer` does with manopth: `use_pca=True, ncomps=45, flat_hand_mean=False` (the file's mean pose is
  added), betas from the subject's `mano.yml`, manopth fingertip vertices, translation added last, metres.
  They are kept in `HandTrack.mano` ("global_orient", "pose_pca", "transl", "betas"). With `mano_dir`
  the joints are re-posed with `hand3d_dataset.mano.ManoLayer` in that convention and the largest
  difference to `joint_3d` is stored in `meta["mano_joint_error_mm"]` (a check of the files and of the
  convention; the joints themselves stay DexYCB's own).
- Objects: one `ObjectTrack` per YCB id, named from the YCB class ("006_mustard_bottle" → "mustard
  bottle"), `position3d` = translation of `pose_y` (the YCB model origin, the models' centre), and its
  segmentation id in `Clip.segmentation` is the YCB class id (1..21); hand pixels (255) become
  `HAND_SEGMENT[side]`. The task is "pick up the <grasped object>".
- Frames: 30 fps; sampled at `sample_fps` (1 fps, the paper's rate) in chunks of `chunk_s` seconds
  (`_common.chunk_frame_indices`). DexYCB sequences are ~2-3 s, so a sequence is one chunk of 3 frames at
  the defaults.

Bad input: a missing label/colour/depth file or a NaN in a label raises ValueError naming the file (the
build records the clip as skipped); `meta.yml` without the documented keys names the missing key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from hand3d_dataset.clip import HAND_SEGMENT, Clip, HandTrack, ObjectTrack
from hand3d_dataset.sources._common import ChunkedSource, ManoPoser, masked, read_depth_mm, read_rgb

__all__ = ["DexYcbSource", "YCB_CLASSES", "FPS"]

FPS = 30.0  # DexYCB's capture rate (RealSense D415 at 30 Hz)
IMAGE_HW = (480, 640)
# YCB class id → model folder name, as in dex_ycb_toolkit (the names are facts of the YCB object set)
YCB_CLASSES = {
    1: "002_master_chef_can",
    2: "003_cracker_box",
    3: "004_sugar_box",
    4: "005_tomato_soup_can",
    5: "006_mustard_bottle",
    6: "007_tuna_fish_can",
    7: "008_pudding_box",
    8: "009_gelatin_box",
    9: "010_potted_meat_can",
    10: "011_banana",
    11: "019_pitcher_base",
    12: "021_bleach_cleanser",
    13: "024_bowl",
    14: "025_mug",
    15: "035_power_drill",
    16: "036_wood_block",
    17: "037_scissors",
    18: "040_large_marker",
    19: "051_large_clamp",
    20: "052_extra_large_clamp",
    21: "061_foam_brick",
}
_META_KEYS = ("serials", "num_frames", "ycb_ids", "ycb_grasp_ind", "mano_sides", "mano_calib")
_HAND_LABEL = 255  # DexYCB's segmentation value of hand pixels


def object_name(ycb_id: int) -> str:
    """Natural name of a YCB class id: 6 → "mustard bottle"."""
    if ycb_id not in YCB_CLASSES:
        raise ValueError(f"ycb_ids: unknown YCB class id {ycb_id}; DexYCB uses 1..21")
    return YCB_CLASSES[ycb_id].split("_", 1)[1].replace("_", " ")


def _load_yaml(path: Path, what: str) -> dict:
    if not path.exists():
        raise ValueError(f"{what}: missing {path}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} is not a YAML mapping")
    return data


class DexYcbSource(ChunkedSource):
    """`SourceAdapter` over a DexYCB root; ids `dexycb-<subject>-<sequence>-<serial>-c<chunk>`."""

    name = "dexycb"
    FPS = FPS

    def __init__(
        self,
        root: str | Path,
        serials: list[str] | None = None,  # cameras to use; None → every serial of each meta.yml
        sample_fps: float = 1.0,  # rate of the clip's frames (the paper samples 1 fps)
        chunk_s: float = 10.0,  # chunk length in seconds (the paper's ~10 s chunks)
        mano_dir: str | Path | None = None,  # MANO_LEFT/RIGHT files: re-pose pose_m and report the error
        load_depth: bool = True,  # read the aligned depth (lets `--estimator gt-depth` calibrate on it)
    ) -> None:
        super().__init__(sample_fps, chunk_s)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root: {self.root} is not a folder")
        self.serials = None if serials is None else [str(s) for s in serials]
        self.load_depth = bool(load_depth)
        # dex-ycb-toolkit's MANOLayer: manopth ManoLayer(use_pca=True, ncomps=45, flat_hand_mean=False)
        self.poser = (
            None
            if mano_dir is None
            else ManoPoser(
                mano_dir, use_pca=True, num_pca_comps=45, flat_hand_mean=False, fingertips="manopth"
            )
        )
        for meta_path in sorted(self.root.glob("*/*/meta.yml")):
            seq = meta_path.parent
            try:
                meta = self._meta(seq)
            except ValueError as e:
                self.skipped[str(seq)] = str(e)
                continue
            for serial in meta["serials"]:
                if self.serials is None or str(serial) in self.serials:
                    base = f"dexycb-{seq.parent.name}-{seq.name}-{serial}"
                    self._add(base, meta["num_frames"], seq, str(serial))

    def _meta(self, seq: Path) -> dict:
        meta = _load_yaml(seq / "meta.yml", f"sequence {seq.name}")
        missing = [k for k in _META_KEYS if k not in meta]
        if missing:
            raise ValueError(
                f"sequence {seq.name}: {seq / 'meta.yml'} lacks {missing}; expected DexYCB's keys {_META_KEYS}"
            )
        if meta["mano_sides"][0] not in ("left", "right"):
            raise ValueError(
                f"sequence {seq.name}: mano_sides[0] = {meta['mano_sides'][0]!r}, not left/right"
            )
        return meta

    def _K(self, serial: str, clip_id: str) -> np.ndarray:
        intr = _load_yaml(
            self.root / "calibration" / "intrinsics" / f"{serial}_{IMAGE_HW[1]}x{IMAGE_HW[0]}.yml",
            f"clip {clip_id}",
        )
        try:
            c = intr["color"]
            return np.array([[c["fx"], 0.0, c["ppx"]], [0.0, c["fy"], c["ppy"]], [0.0, 0.0, 1.0]], float)
        except (KeyError, TypeError) as e:
            raise ValueError(f"clip {clip_id}: intrinsics of {serial} lack color.fx/fy/ppx/ppy ({e})") from e

    def load_clip(self, clip_id: str) -> Clip:
        seq, serial, idx = self._entry(clip_id)
        meta = self._meta(seq)
        side = meta["mano_sides"][0]
        K = self._K(serial, clip_id)
        calib = _load_yaml(
            self.root / "calibration" / f"mano_{meta['mano_calib'][0]}" / "mano.yml", f"clip {clip_id}"
        )
        betas = np.asarray(calib.get("betas", []), float)
        if betas.shape != (10,):
            raise ValueError(
                f"clip {clip_id}: mano.yml of {meta['mano_calib'][0]} needs 10 betas, got {betas.shape}"
            )
        ycb_ids = [int(i) for i in meta["ycb_ids"]]
        n, cam = len(idx), seq / serial
        frames = np.zeros((n, *IMAGE_HW, 3), np.uint8)
        depth = np.full((n, *IMAGE_HW), np.nan, np.float32) if self.load_depth else None
        seg = np.zeros((n, *IMAGE_HW), np.uint8)
        joints = np.full((n, 21, 3), np.nan)
        pose_m = np.zeros((n, 51))
        obj_pos = np.full((n, len(ycb_ids), 3), np.nan)
        for k, f in enumerate(idx):
            what = f"clip {clip_id}"
            img = read_rgb(cam / f"color_{f:06d}.jpg", what)
            if img.shape[:2] != IMAGE_HW:
                raise ValueError(
                    f"{what}: {cam / f'color_{f:06d}.jpg'} is {img.shape[:2]}, expected {IMAGE_HW}"
                )
            frames[k] = img
            if depth is not None:
                depth[k] = read_depth_mm(cam / f"aligned_depth_to_color_{f:06d}.png", what)
            label = self._label(cam / f"labels_{f:06d}.npz", what, len(ycb_ids))
            seg[k] = np.where(label["seg"] == _HAND_LABEL, HAND_SEGMENT[side], label["seg"])
            obj_pos[k] = label["pose_y"][:, :, 3]
            pm, j3 = label["pose_m"][0], label["joint_3d"][0]
            if np.any(pm != 0) and not np.all(j3 == -1):  # the toolkit's "hand present" test on pose_m
                joints[k], pose_m[k] = j3, pm
        valid = np.isfinite(joints).all(axis=(1, 2))
        mano = masked(valid, global_orient=pose_m[:, :3], pose_pca=pose_m[:, 3:48], transl=pose_m[:, 48:])
        mano["betas"] = np.tile(betas, (n, 1))
        meta_out = {
            "sequence": f"{seq.parent.name}/{seq.name}",
            "serial": serial,
            "frame_indices": idx.tolist(),
            "source_fps": FPS,
        }
        if self.poser is not None and valid.any():
            p = pose_m[valid]
            meta_out["mano_joint_error_mm"] = self.poser.max_error_mm(
                side, joints[valid], p[:, :3], p[:, 3:48], np.tile(betas, (len(p), 1)), p[:, 48:]
            )
        names = [object_name(i) for i in ycb_ids]
        objects = [
            ObjectTrack(name, position3d=obj_pos[:, o], segment_id=ycb_ids[o]) for o, name in enumerate(names)
        ]
        g = int(meta["ycb_grasp_ind"])
        if not 0 <= g < len(names):
            raise ValueError(f"clip {clip_id}: ycb_grasp_ind {g} is outside ycb_ids {ycb_ids}")
        return Clip(
            clip_id=clip_id,
            source=self.name,
            fps=self.clip_fps,
            K=K,
            R=np.tile(np.eye(3), (n, 1, 1)),
            t=np.zeros((n, 3)),
            image_hw=IMAGE_HW,
            hands={side: HandTrack(side, joints3d=joints, valid=valid, mano=mano)},
            objects=objects,
            task=f"pick up the {names[g]}",
            frames=frames,
            depth=depth,
            segmentation=seg,
            meta=meta_out,
        )

    @staticmethod
    def _label(path: Path, what: str, num_objects: int) -> dict[str, np.ndarray]:
        if not path.exists():
            raise ValueError(f"{what}: missing label file {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                label = {k: z[k] for k in ("seg", "pose_y", "pose_m", "joint_3d")}
        except (KeyError, OSError, ValueError) as e:
            raise ValueError(
                f"{what}: {path} is not a DexYCB label file (seg, pose_y, pose_m, joint_3d): {e}"
            ) from e
        want = {"seg": IMAGE_HW, "pose_y": (num_objects, 3, 4), "pose_m": (1, 51), "joint_3d": (1, 21, 3)}
        for key, shape in want.items():
            if label[key].shape != shape:
                raise ValueError(f"{what}: {path} has {key} of shape {label[key].shape}, expected {shape}")
            if key != "seg" and not np.isfinite(label[key]).all():
                raise ValueError(f"{what}: {path} has non-finite values in {key}")
        return label
