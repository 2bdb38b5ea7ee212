"""The `fpha` source: First-Person Hand Action Benchmark (FPHA, RealSense SR300 on the shoulder) as unified clips.

    from hand3d_dataset.sources.fpha import FphaSource
    src = FphaSource("/data/fpha")          # the folder holding Video_files/ and Hand_pose_annotation_v1/
    clip = src.load_clip("fpha-Subject_1-put_salt-1-c000")
    clip.task, clip.hands["right"].joints3d.shape       # "put salt", (T, 21, 3)

On-disk layout read here (the FPHA README and `load_example.py` of guiggh/hand_pose_action):
- `Video_files/<subject>/<action>/<seq>/color/color_%04d.jpeg` (1920×1080) and `depth/depth_%04d.png`
  (640×480 uint16 millimetres, in the *depth* camera);
- `Hand_pose_annotation_v1/<subject>/<action>/<seq>/skeleton.txt` (the README calls the folder
  `Hand_pose_annotation_v1_1`; both are accepted): one line per frame, `t x1 y1 z1 … x21 y21 z21`, joints
  in millimetres in the "world" frame, in FPHA's order [Wrist, TMCP, IMCP, MMCP, RMCP, PMCP, TPIP, TDIP,
  TTIP, IPIP, IDIP, ITIP, MPIP, MDIP, MTIP, RPIP, RDIP, RTIP, PPIP, PDIP, PTIP];
- `Object_6D_pose_annotation_v1/<subject>/<action>/<seq>/object_pose.txt` (only for juice bottle, liquid
  soap, milk and salt): one line per frame, `t M11 M21 M31 M41 M12 … M44`, i.e. the 4×4 object→world
  matrix column by column (load_example reshapes to 4×4 and transposes), translation in millimetres.

Conventions and why:
- FPHA's "world" is the depth camera's frame (load_example projects the skeleton into the colour image
  after the fixed depth→colour extrinsic; the depth map is in the depth camera). The clip's world is that
  frame in metres, and the camera is the colour camera, fixed on the subject's shoulder (egocentric):
  ``R = R_extr, t = (25.7, 1.22, 3.902) mm / 1000`` for every frame, K = fx 1395.749023, fy 1395.749268,
  cx 935.732544, cy 540.681030 (README values; load_example uses the same numbers).
- Joints: reordered to OpenPose with load_example's `reorder_idx` (wrist, then each finger MCP → tip)
  and divided by 1000. FPHA annotates one hand, the right. A frame whose joints are all zero is invalid.
- Depth (optional, default on): the depth image is back-projected with the depth intrinsics (fx 475.065948,
  fy 475.065857, cx 315.944855, cy 245.287079), moved by the extrinsic and splatted (3×3, nearest wins)
  into the colour image, so `Clip.depth` is colour-aligned metric z with NaN holes; this lets
  `--estimator gt-depth` calibrate on the sensor's depth.
- Objects and task: the action folder names the task ("put_salt" → "put salt") and its object via
  `ACTION_OBJECTS`; where `object_pose.txt` exists, the object's `position3d` is the translation of its pose
  (the model origin), metres.
- Frames: 30 fps; sampled at `sample_fps` (1 fps) in `chunk_s` (10 s) chunks (`_common.chunk_frame_indices`),
  counted from the skeleton's lines.

Bad input: a missing image, a skeleton with fewer lines than the sampled frames, a NaN in a skeleton or
object-pose line raises ValueError naming the file; unreadable skeleton files are not listed and their
reason is kept in `skipped`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hand3d_dataset.clip import Clip, HandTrack, ObjectTrack
from hand3d_dataset.sources._common import ChunkedSource, read_depth_mm, read_rgb

__all__ = ["FphaSource", "COLOR_K", "DEPTH_K", "DEPTH_TO_COLOR_R", "DEPTH_TO_COLOR_T_MM", "FPHA_TO_OPENPOSE"]

FPS = 30.0
COLOR_HW = (1080, 1920)
DEPTH_HW = (480, 640)
COLOR_K = np.array([[1395.749023, 0.0, 935.732544], [0.0, 1395.749268, 540.681030], [0.0, 0.0, 1.0]])
DEPTH_K = np.array([[475.065948, 0.0, 315.944855], [0.0, 475.065857, 245.287079], [0.0, 0.0, 1.0]])
DEPTH_TO_COLOR_R = np.array(
    [
        [0.999988496304, -0.00468848412856, 0.000982563360594],
        [0.00469115935266, 0.999985218048, -0.00273845880292],
        [-0.000969709653873, 0.00274303671904, 0.99999576807],
    ]
)
DEPTH_TO_COLOR_T_MM = np.array([25.7, 1.22, 3.902])
# OpenPose joint i is FPHA joint FPHA_TO_OPENPOSE[i] (load_example.py's reorder_idx)
FPHA_TO_OPENPOSE = [0, 1, 6, 7, 8, 2, 9, 10, 11, 3, 12, 13, 14, 4, 15, 16, 17, 5, 18, 19, 20]
# the manipulated object of each of FPHA's 45 actions (None: no object, e.g. a handshake)
ACTION_OBJECTS: dict[str, str | None] = {
    "charge_cell_phone": "cell phone",
    "clean_glasses": "glasses",
    "close_juice_bottle": "juice bottle",
    "close_liquid_soap": "liquid soap",
    "close_milk": "milk",
    "close_peanut_butter": "peanut butter",
    "drink_mug": "mug",
    "flip_pages": "book",
    "flip_sponge": "sponge",
    "give_card": "card",
    "give_coin": "coin",
    "handshake": None,
    "high_five": None,
    "light_candle": "candle",
    "open_juice_bottle": "juice bottle",
    "open_letter": "letter",
    "open_liquid_soap": "liquid soap",
    "open_milk": "milk",
    "open_peanut_butter": "peanut butter",
    "open_soda_can": "soda can",
    "open_wallet": "wallet",
    "pour_juice_bottle": "juice bottle",
    "pour_liquid_soap": "liquid soap",
    "pour_milk": "milk",
    "pour_wine": "wine bottle",
    "prick": "fork",
    "put_salt": "salt",
    "put_sugar": "sugar",
    "put_tea_bag": "tea bag",
    "read_letter": "letter",
    "receive_coin": "coin",
    "scoop_spoon": "spoon",
    "scratch_sponge": "sponge",
    "sprinkle": "spoon",
    "squeeze_paper": "paper",
    "squeeze_sponge": "sponge",
    "stir": "spoon",
    "take_letter_from_enveloppe": "letter",
    "tear_paper": "paper",
    "toast_wine": "wine glass",
    "unfold_glasses": "glasses",
    "use_calculator": "calculator",
    "use_flash": "flash",
    "wash_sponge": "sponge",
    "write": "pen",
}
_SKELETON_DIRS = ("Hand_pose_annotation_v1", "Hand_pose_annotation_v1_1")
_OBJECT_DIR = "Object_6D_pose_annotation_v1"


def _read_lines(path: Path, width: int, what: str) -> np.ndarray:
    """(N, width) numbers of an FPHA per-frame text file (frame number first); ValueError naming it otherwise."""
    if not path.exists():
        raise ValueError(f"{what}: missing {path}")
    try:
        rows = [np.array(line.split(), dtype=float) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise ValueError(f"{what}: {path} holds non-numeric text ({e})") from e
    bad = [i for i, r in enumerate(rows) if r.size != width]
    if bad:
        raise ValueError(
            f"{what}: {path} line {bad[0] + 1} has {rows[bad[0]].size} numbers, expected {width}"
        )
    return np.stack(rows) if rows else np.zeros((0, width))


def depth_to_color(depth_m: np.ndarray) -> np.ndarray:
    """(480, 640) depth-camera z (metres, NaN holes) → (1080, 1920) colour-camera z, NaN where nothing lands.

    Each depth pixel is back-projected with DEPTH_K, moved by the depth→colour extrinsic, projected with
    COLOR_K and splatted over 3×3 colour pixels (the colour image is ~2.9× finer); the nearest point wins.
    """
    v, u = np.nonzero(np.isfinite(depth_m))
    z = depth_m[v, u].astype(np.float64)
    p = np.stack([(u - DEPTH_K[0, 2]) / DEPTH_K[0, 0] * z, (v - DEPTH_K[1, 2]) / DEPTH_K[1, 1] * z, z], 1)
    q = p @ DEPTH_TO_COLOR_R.T + DEPTH_TO_COLOR_T_MM / 1000.0
    front = q[:, 2] > 0
    q = q[front]
    uc = np.rint(COLOR_K[0, 0] * q[:, 0] / q[:, 2] + COLOR_K[0, 2]).astype(int)
    vc = np.rint(COLOR_K[1, 1] * q[:, 1] / q[:, 2] + COLOR_K[1, 2]).astype(int)
    h, w = COLOR_HW
    out = np.full(h * w, np.inf)
    for du in (-1, 0, 1):
        for dv in (-1, 0, 1):
            x, y = uc + du, vc + dv
            ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            np.minimum.at(out, y[ok] * w + x[ok], q[ok, 2])
    out[~np.isfinite(out)] = np.nan
    return out.reshape(h, w).astype(np.float32)


class FphaSource(ChunkedSource):
    """`SourceAdapter` over an FPHA root; ids `fpha-<subject>-<action>-<seq>-c<chunk>`."""

    name = "fpha"
    FPS = FPS

    def __init__(
        self,
        root: str | Path,
        sample_fps: float = 1.0,  # rate of the clip's frames (the paper samples 1 fps)
        chunk_s: float = 10.0,  # chunk length in seconds (the paper's ~10 s chunks)
        load_depth: bool = True,  # reproject the depth into the colour image (for `--estimator gt-depth`)
    ) -> None:
        super().__init__(sample_fps, chunk_s)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root: {self.root} is not a folder")
        self.load_depth = bool(load_depth)
        skel_dirs = [self.root / d for d in _SKELETON_DIRS if (self.root / d).is_dir()]
        if not skel_dirs:
            raise ValueError(
                f"root: {self.root} has none of {list(_SKELETON_DIRS)}; point it at the FPHA folder that holds "
                "Video_files/ and Hand_pose_annotation_v1/"
            )
        for skel in sorted(skel_dirs[0].glob("*/*/*/skeleton.txt")):
            subject, action, seq = skel.parts[-4:-1]
            try:
                n = len(_read_lines(skel, 64, f"sequence {subject}/{action}/{seq}"))
            except ValueError as e:
                self.skipped[str(skel)] = str(e)
                continue
            self._add(f"fpha-{subject}-{action}-{seq}", n, skel, f"{subject}/{action}/{seq}")

    def load_clip(self, clip_id: str) -> Clip:
        skel_path, rel, idx = self._entry(clip_id)
        what = f"clip {clip_id}"
        skel = _read_lines(skel_path, 64, what)
        if len(skel) <= idx[-1]:
            raise ValueError(f"{what}: {skel_path} has {len(skel)} lines, frame {idx[-1]} is needed")
        raw = skel[idx, 1:].reshape(len(idx), 21, 3)
        if not np.isfinite(raw).all():
            raise ValueError(
                f"{what}: {skel_path} has NaN joints on frames {idx[~np.isfinite(raw).all(axis=(1, 2))].tolist()}"
            )
        joints = raw[:, FPHA_TO_OPENPOSE] / 1000.0
        valid = np.any(raw != 0, axis=(1, 2))
        joints[~valid] = np.nan
        action = rel.split("/")[1]
        obj_name = ACTION_OBJECTS.get(action)
        objects = []
        pose_path = self.root / _OBJECT_DIR / rel / "object_pose.txt"
        if obj_name is not None:
            position = None
            if pose_path.exists():
                poses = _read_lines(pose_path, 17, what)
                if len(poses) <= idx[-1]:
                    raise ValueError(f"{what}: {pose_path} has {len(poses)} lines, frame {idx[-1]} is needed")
                M = poses[idx, 1:].reshape(len(idx), 4, 4).transpose(0, 2, 1)  # column-major on disk
                if not np.isfinite(M).all():
                    raise ValueError(f"{what}: {pose_path} has non-finite values")
                position = M[:, :3, 3] / 1000.0
            objects.append(ObjectTrack(obj_name, position3d=position))
        video = self.root / "Video_files" / rel
        frames = np.stack([read_rgb(video / "color" / f"color_{f:04d}.jpeg", what) for f in idx])
        if frames.shape[1:3] != COLOR_HW:
            raise ValueError(f"{what}: colour frames are {frames.shape[1:3]}, FPHA's are {COLOR_HW}")
        depth = None
        if self.load_depth:
            d = [read_depth_mm(video / "depth" / f"depth_{f:04d}.png", what) for f in idx]
            if any(x.shape != DEPTH_HW for x in d):
                raise ValueError(f"{what}: depth images are not {DEPTH_HW} in {video / 'depth'}")
            depth = np.stack([depth_to_color(x) for x in d])
        n = len(idx)
        return Clip(
            clip_id=clip_id,
            source=self.name,
            fps=self.clip_fps,
            K=COLOR_K,
            R=np.tile(DEPTH_TO_COLOR_R, (n, 1, 1)),
            t=np.tile(DEPTH_TO_COLOR_T_MM / 1000.0, (n, 1)),
            image_hw=COLOR_HW,
            hands={"right": HandTrack("right", joints3d=joints, valid=valid)},
            objects=objects,
            task=action.replace("_", " "),
            frames=frames,
            depth=depth,
            meta={
                "sequence": rel,
                "frame_indices": idx.tolist(),
                "source_fps": FPS,
                "skeleton": str(skel_path),
            },
        )
