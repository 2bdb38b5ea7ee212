"""The `hoi4d` source: HOI4D egocentric RGB-D videos with MANO hands and object poses, as unified clips.

    from hand3d_dataset.sources.hoi4d import Hoi4dSource
    src = Hoi4dSource("/data/HOI4D")          # holds HOI4D_release/, HOI4D_annotations/, handpose/, camera_params/
    clip = src.load_clip(src.clip_ids()[0])   # e.g. "hoi4d-ZY20210800001-H1-C1-N19-S100-s02-T1-c000"
    clip.task, clip.depth.shape               # "push the toy car", (10, 1080, 1920)

On-disk layout read here (README of leolyliu/HOI4D-Instructions; `<vid>` = `ZY2021080000*/H*/C*/N*/S*/s*/T*`):
- `HOI4D_release/<vid>/align_rgb/image.mp4` (or the frames `utils/decode.py` writes: `align_rgb/%05d.jpg`)
  and `align_depth/depth_video.avi` (or `align_depth/%05d.png`, uint16 millimetres, 0 = no return);
  1920 × 1080 at 15 fps (decode.py's `fps=15`), 300 frames per video.
- `HOI4D_annotations/<vid>/3Dseg/output.log`: the camera trajectory, Open3D / Redwood `.log` format (a
  "i j n" line, then 4 lines of the 4 × 4 matrix, per frame).
- `HOI4D_annotations/<vid>/objpose/<t>.json`: `dataList` (or `objects`) of parts with `center` {x, y, z},
  `rotation` {x, y, z} (Euler "XYZ") and `dimensions`, in the camera frame, metres (the README's `read_rtd`).
- `handpose/refinehandpose_{right,left}/<vid>/<t>.pickle`: {"poseCoeff" (48,), "beta" (10,), "trans" (3,)
  camera frame, metres, "kps2D" (21, 2)}; a pickle (read with `hand3d_dataset.safe_pickle`).
- `camera_params/<ZY2021080000*>/intrin.npy`: (3, 3) K per camera.
  The annotation folders may also sit under `HOI4D_release/<vid>` or `<root>/<vid>` (the README's single tree).

Conventions and why:
- Camera: hands and objects are given in each frame's camera frame; `output.log` holds camera → world poses
  (Open3D's reader sets `extrinsic = pose⁻¹`, and HOI4D's 4D-segmentation script back-projects depth with
  that extrinsic into one static-scene world), so the world is the trajectory's frame, R, t = pose⁻¹ per
  frame, and hand / object points go to the world by the pose. K from `intrin.npy`, fixed.
- Hands: the README poses manopth `ManoLayer(use_pca=False, ncomps=45, flat_hand_mean=True)` without
  `center_idx`, and `kps3d = joints / 1000 + trans`: 3 global + 45 axis-angle, no mean pose, the root
  rotating about MANO's rest root joint, mm → m, then `trans`; manopth fingertips; `kps2D` is the projection
  of those joints (manopth's joint order is the OpenPose order). We pose with `hand3d_dataset.mano.ManoLayer(
  flat_hand_mean=True, fingertips="manopth")` (metres, same root convention) and add `trans`. Model files:
  `mano_dir`, else $HAND3D_MANO_DIR, else `<root>/mano`; without them the clip is refused (`trans` is not
  the wrist here: no centring). A frame without a pickle is an invalid frame of that hand; a sequence
  without a `refinehandpose_left` folder has no left hand.
- Objects: the category of `C*` (README mapping) names the object ("C1" → "toy car"); `position3d` = the
  first part's `center` (the README's `read_rtd(file, num=0)`) moved to the world, NaN where a frame has no
  pose file. Task: HOI4D's task definition of (C*, T*) with "it" replaced by the object
  ("Put it in the drawer" → "put the mug in the drawer").
- Frames: 15 fps, sampled at `sample_fps` in `chunk_s` chunks; `images="auto"` reads RGB (and depth when
  there) if the sequence's video or decoded frames exist, else trajectory-only clips.

Bad input: a missing trajectory or intrinsics file, too few trajectory poses, a truncated video, a pickle
carrying code (refused by name) or non-finite values raise ValueError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from hand3d_dataset import safe_pickle
from hand3d_dataset.clip import Clip, HandTrack, ObjectTrack
from hand3d_dataset.sources._common import (
    ChunkedSource,
    ManoPoser,
    depth_from_units,
    find_mano_dir,
    masked,
    read_depth_mm,
    read_rgb,
    read_video_frames,
)

__all__ = ["Hoi4dSource", "read_open3d_log", "FPS", "CATEGORIES", "TASKS"]

FPS = 15.0  # HOI4D's video rate (utils/decode.py extracts at fps=15)
VIDEO_HW = (1080, 1920)
# C* → object category, from the README's `mapping`
CATEGORIES = {
    1: "toy car",
    2: "mug",
    3: "laptop",
    4: "storage furniture",
    5: "bottle",
    6: "safe",
    7: "bowl",
    8: "bucket",
    9: "scissors",
    11: "pliers",
    12: "kettle",
    13: "knife",
    14: "trash can",
    17: "lamp",
    18: "stapler",
    20: "chair",
}
# (C*, T*) → task, from definitions/task/task_definitions.csv
TASKS = {
    1: ("Pick and place", "Push toy car", "Put it in the drawer", "Take it out of the drawer"),
    2: (
        "Pick and place",
        "Put it in the drawer",
        "Take it out of the drawer",
        "Fill with water by a kettle",
        "Pour water into another mug",
        "Pick and place (with water)",
    ),
    3: ("Pick and place", "Open and close the display"),
    4: (
        "Open and close the drawer",
        "Open and close the door",
        "Put the drink in the door",
        "Put the drink in the drawer",
    ),
    5: (
        "Pick and place",
        "Pour all the water into a mug",
        "Put it in the drawer",
        "Take it out of the drawer",
        "Reposition the bottle",
        "Pick and place (with water)",
    ),
    6: ("Open and close the door", "Put something in it", "Take something out of it"),
    7: (
        "Pick and place",
        "Put it in the drawer",
        "Take it out of the drawer",
        "Take the ball out of the bowl",
        "Put the ball in the bowl",
        "Pick and place (with ball)",
    ),
    8: ("Pick and place", "Pour water into another bucket"),
    9: ("Pick and place", "Cut something"),
    11: ("Pick and place", "Take it out of the drawer", "Put it in the drawer", "Clamp something"),
    12: ("Pick and place", "Pour water into a mug"),
    13: ("Pick and place", "Take it out of the drawer", "Put it in the drawer", "Cut apple"),
    14: ("Open and close", "Throw something in it"),
    17: ("Pick and place", "Turn and fold", "Turn on and turn off"),
    18: ("Pick and place", "Bind the paper"),
    20: (
        "Pick and place to the original position",
        "Pick and place to the original position",
        "Pick and place to a new position",
        "Pick and place to a new position",
    ),
}


def read_open3d_log(path: Path, what: str) -> np.ndarray:
    """(N, 4, 4) matrices of an Open3D / Redwood `.log` trajectory (camera → world poses)."""
    if not path.exists():
        raise ValueError(f"{what}: missing camera trajectory {path}")
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if len(rows) % 5:
        raise ValueError(f"{what}: {path} has {len(rows)} non-empty lines, not a multiple of 5 (.log format)")
    try:
        mats = np.array(
            [[[float(x) for x in r] for r in rows[i + 1 : i + 5]] for i in range(0, len(rows), 5)]
        )
    except ValueError as e:
        raise ValueError(f"{what}: {path} is not an Open3D .log trajectory ({e})") from e
    if mats.ndim != 3 or mats.shape[1:] != (4, 4):
        raise ValueError(f"{what}: {path} blocks are not 4 × 4 matrices")
    return mats


def task_text(category: int, task: int) -> str:
    """HOI4D's definition of task T<task> on category C<category>, phrased with the object's name."""
    name = CATEGORIES.get(category, f"object C{category}")
    tasks = TASKS.get(category, ())
    if not 1 <= task <= len(tasks):
        return f"manipulate the {name}"
    text = tasks[task - 1]
    words = text.split(" ")
    if "it" in words:
        text = " ".join(f"the {name}" if w == "it" else w for w in words)
    elif name not in text.lower() and text.lower().startswith("pick and place"):
        text = text.replace("Pick and place", f"Pick and place the {name}", 1)
    elif name not in text.lower() and text.lower().split(" ")[-1] in ("close", "off", "fold"):
        text = f"{text} the {name}"
    return text[0].lower() + text[1:]


class Hoi4dSource(ChunkedSource):
    """`SourceAdapter` over a HOI4D root; ids `hoi4d-<vid with '/' → '-'>-c<chunk>`."""

    name = "hoi4d"
    FPS = FPS

    def __init__(
        self,
        root: str | Path,
        mano_dir: str | Path | None = None,  # MANO files; None → $HAND3D_MANO_DIR or <root>/mano
        sample_fps: float = 1.0,  # rate of the clip's frames (the paper samples 1 fps)
        chunk_s: float = 10.0,  # chunk length in seconds (the paper's ~10 s chunks)
        images: str = "auto",  # "auto" | "required" | "none": read RGB (and depth) frames
        num_frames: int = 300,  # frames per HOI4D video (every released video has 300)
    ) -> None:
        super().__init__(sample_fps, chunk_s, images)
        self.root = Path(root)
        hands = self.root / "handpose" / "refinehandpose_right"
        if not hands.is_dir():
            raise ValueError(
                f"root: {self.root} has no handpose/refinehandpose_right/ folder; point it at HOI4D's root"
            )
        if num_frames < 1:
            raise ValueError(f"num_frames: expected a positive count, got {num_frames}")
        self.num_frames = num_frames
        found = find_mano_dir(mano_dir, [self.root / "mano"])
        self.poser = None if found is None else ManoPoser(found, flat_hand_mean=True, fingertips="manopth")
        for folder in sorted(p for p in hands.glob("*/*/*/*/*/*/*") if p.is_dir()):
            vid = folder.relative_to(hands).as_posix()
            self._add(f"hoi4d-{vid.replace('/', '-')}", num_frames, vid)

    def _annotation(self, vid: str, rel: str) -> Path:
        """First existing of the places the annotation `rel` of `vid` may be (see the module docstring)."""
        cands = [self.root / top / vid / rel for top in ("HOI4D_annotations", "HOI4D_release")] + [
            self.root / vid / rel
        ]
        return next((c for c in cands if c.exists()), cands[0])

    def load_clip(self, clip_id: str) -> Clip:
        vid, idx = self._entry(clip_id)
        what = f"clip {clip_id}"
        poses = read_open3d_log(self._annotation(vid, "3Dseg/output.log"), what)
        if len(poses) <= idx[-1]:
            raise ValueError(
                f"{what}: {self._annotation(vid, '3Dseg/output.log')} has {len(poses)} poses, need frame {idx[-1]}"
            )
        c2w = poses[idx]
        if not np.isfinite(c2w).all():
            raise ValueError(
                f"{what}: non-finite camera poses in {self._annotation(vid, '3Dseg/output.log')}"
            )
        w2c = np.linalg.inv(c2w)
        intrin = self.root / "camera_params" / vid.split("/")[0] / "intrin.npy"
        if not intrin.exists():
            raise ValueError(f"{what}: missing intrinsics {intrin}")
        K = np.load(intrin, allow_pickle=False).astype(float)
        if K.shape != (3, 3) or not np.isfinite(K).all():
            raise ValueError(f"{what}: {intrin} holds {K.shape}, expected a finite (3, 3) K")
        hands = {}
        for side in ("right", "left"):
            folder = self.root / "handpose" / f"refinehandpose_{side}" / vid
            if folder.is_dir():
                hands[side] = self._hand(folder, side, idx, c2w, what)
        category, task = (int(p[1:]) for p in (vid.split("/")[2], vid.split("/")[6]))
        name = CATEGORIES.get(category, f"object C{category}")
        obj = np.full((len(idx), 3), np.nan)
        for k, f in enumerate(idx):
            center = self._object_center(vid, int(f), what)
            if center is not None:
                obj[k] = c2w[k, :3, :3] @ center + c2w[k, :3, 3]
        frames, depth, image_hw = self._frames(vid, idx, what)
        return Clip(
            clip_id=clip_id,
            source=self.name,
            fps=self.clip_fps,
            K=K,
            R=w2c[:, :3, :3],
            t=w2c[:, :3, 3],
            image_hw=image_hw,
            hands=hands,
            objects=[ObjectTrack(name, position3d=obj)],
            task=task_text(category, task),
            frames=frames,
            depth=depth,
            meta={"sequence": vid, "frame_indices": idx.tolist(), "source_fps": FPS},
        )

    def _hand(self, folder: Path, side: str, idx: np.ndarray, c2w: np.ndarray, what: str) -> HandTrack:
        n = len(idx)
        theta, beta, trans = np.full((n, 48), np.nan), np.full((n, 10), np.nan), np.full((n, 3), np.nan)
        for k, f in enumerate(idx):
            path = folder / f"{int(f)}.pickle"
            if not path.exists():
                continue  # no annotation: the hand is not there on this frame
            rec = safe_pickle.load(path)
            try:
                th, b, tr = (
                    np.asarray(rec[key], float).reshape(-1) for key in ("poseCoeff", "beta", "trans")
                )
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{what}: {path} lacks poseCoeff/beta/trans ({e})") from e
            if (th.size, b.size, tr.size) != (48, 10, 3):
                raise ValueError(
                    f"{what}: {path} has poseCoeff/beta/trans of sizes {th.size}/{b.size}/{tr.size}"
                )
            theta[k], beta[k], trans[k] = th, b, tr
        ok = np.isfinite(theta).all(1) & np.isfinite(beta).all(1) & np.isfinite(trans).all(1)
        mano = masked(ok, global_orient=theta[:, :3], hand_pose=theta[:, 3:], transl_cam=trans, betas=beta)
        if self.poser is None:
            raise ValueError(
                f"{what}: HOI4D hands need MANO model files (pass mano_dir, set $HAND3D_MANO_DIR or put "
                f"MANO_RIGHT/LEFT in {self.root / 'mano'}); 'trans' alone is not the wrist"
            )
        cam = self.poser.joints(side, theta[:, :3], theta[:, 3:], beta) + trans[:, None]  # no centring
        joints = np.einsum("tij,tkj->tki", c2w[:, :3, :3], cam) + c2w[:, None, :3, 3]
        joints[~ok] = np.nan
        return HandTrack(side, joints3d=joints, valid=ok, mano=mano)

    def _object_center(self, vid: str, f: int, what: str) -> np.ndarray | None:
        folder = self._annotation(vid, "objpose")
        path = next((p for p in (folder / f"{f}.json", folder / f"{f:05d}.json") if p.exists()), None)
        if path is None:
            return None
        data = json.loads(path.read_text())
        parts = data.get("dataList") or data.get("objects") or []
        try:
            c = parts[0]["center"]
            center = np.array([c["x"], c["y"], c["z"]], float)
            r = parts[0]["rotation"]
            Rotation.from_euler("XYZ", [r["x"], r["y"], r["z"]])  # checked: a malformed pose is an error
        except (IndexError, KeyError, TypeError) as e:
            raise ValueError(f"{what}: {path} has no part with center/rotation ({e})") from e
        return center if np.isfinite(center).all() else None

    def _frames(self, vid: str, idx: np.ndarray, what: str):
        rgb_dir = self.root / "HOI4D_release" / vid / "align_rgb"
        depth_dir = self.root / "HOI4D_release" / vid / "align_depth"
        have = (rgb_dir / "image.mp4").exists() or (rgb_dir / "00000.jpg").exists()
        if not self._use_images(have):
            return None, None, VIDEO_HW
        if (rgb_dir / "00000.jpg").exists():
            frames = np.stack([read_rgb(rgb_dir / f"{int(f):05d}.jpg", what) for f in idx])
        else:
            frames = read_video_frames(rgb_dir / "image.mp4", idx, what)
        depth = None
        if (depth_dir / "00000.png").exists():
            depth = np.stack([read_depth_mm(depth_dir / f"{int(f):05d}.png", what) for f in idx])
        elif (depth_dir / "depth_video.avi").exists():
            raw = read_video_frames(depth_dir / "depth_video.avi", idx, what, fmt="gray16le")
            depth = depth_from_units(raw, 1000.0)  # millimetres
        if depth is not None and depth.shape[1:] != frames.shape[1:3]:
            raise ValueError(
                f"{what}: depth {depth.shape[1:]} and RGB {frames.shape[1:3]} sizes differ in {vid}"
            )
        return frames, depth, frames.shape[1:3]
