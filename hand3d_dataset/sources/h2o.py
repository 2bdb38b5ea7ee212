"""The `h2o` source: H2O (two hands manipulating objects, egocentric + 4 fixed Azure Kinects) as unified clips.

    from hand3d_dataset.sources.h2o import H2oSource
    src = H2oSource("/data/h2o")                       # the folder holding subject1/, subject2/, ...
    clip = src.load_clip("h2o-subject1-h1-0-cam4-c000")
    clip.K[0], clip.hands["left"].joints3d.shape       # cam4 intrinsics, (10, 21, 3)

On-disk layout read here (the H2O README; `h2oplayer` reads the same files):
`<subject>/<scene>/<sequence>/cam<N>/` with, per frame `%06d`:
- `rgb/%06d.png` (1280×720) and `depth/%06d.png` (uint16 millimetres, registered to the RGB image);
- `cam_pose/%06d.txt`: 16 numbers, the 4×4 *camera→world* matrix, row-major (h2oplayer transforms the
  camera's point cloud by it into the world and inverts it to get the viewer's world→camera extrinsic);
- `hand_pose/%06d.txt`: 128 numbers, left then right: a 0/1 "annotated" flag and 21 × 3 joints in this
  camera's frame, metres;
- `hand_pose_MANO/%06d.txt`: 124 numbers, left then right: flag, 3 translation, 48 pose (3 global + 45
  finger axis-angle), 10 betas, in this camera's frame (the README's "first 59 numbers" miscounts its own
  1 + 3 + 48 + 10 = 62; h2oplayer slices 1:4, 4:52, 52:62 and 63:66, 66:114, 114:124);
- `obj_pose/%06d.txt`: object class (0 = none) and 21 × 3 points (centre, 8 corners, 12 edge midpoints) in
  this camera's frame, metres; `obj_pose_RT/%06d.txt`: class + 4×4 object→camera (not needed here);
- `action_label/%06d.txt` (cam4 only) and `verb_label/%06d.txt`: one integer;
- `cam_intrinsics.txt`: fx fy cx cy width height (cam4: 636.6593 636.2520 635.2839 366.8740 1280 720).

Conventions and why:
- cam4 is the head-mounted (egocentric) camera, the default `camera`; cam0-3 are fixed third-person views.
- The world is H2O's world frame; per frame ``R = Rcwᵀ, t = −Rcwᵀ tcw`` from the camera→world `cam_pose`
  (cam4 moves with the head, so R, t change per frame); intrinsics are fixed per camera.
- Joints: `hand_pose` of the chosen camera, moved to the world by its `cam_pose`. The 21 joints are in
  the MANO/manopth order (wrist; thumb, index, middle, ring, little, each base → tip), which is the
  OpenPose order of `clip.py` (H2O's joints come from its MANO fits). A flag of 0 makes the frame invalid.
- MANO: h2oplayer poses `hand_pose_MANO` with manopth `use_pca=False, flat_hand_mean=True`, 45 finger
  axis-angles, translation added after the pose (joints = MANO(pose, betas) + trans); kept per frame in
  `HandTrack.mano` ("global_orient", "hand_pose", "transl", "betas") in the camera's frame. With `mano_dir`
  the joints are re-posed with `hand3d_dataset.mano.ManoLayer` in that convention (manopth fingertips)
  and the largest difference to `hand_pose` is stored in `meta["mano_joint_error_mm"]`.
- Objects: `obj_pose`'s first point is the object centre; named from H2O's object classes (book,
  espresso, lotion, spray, milk, cocoa, chips, cappuccino), one track per class seen in the chunk, NaN
  where another or no object is annotated. The task is the chunk's most frequent `action_label` ("grab
  book"), else its most frequent verb and object ("open milk"), else "".
- Frames: 30 fps, sampled at `sample_fps` (1 fps) in `chunk_s` (10 s) chunks (`_common.chunk_frame_indices`).
  Depth is loaded by default so that `--estimator gt-depth` calibrates on the sensor's depth.
  A download in "pose" mode (no rgb folder) gives trajectory-only clips (frames None).

Bad input: a missing per-frame file, a wrong number count, or a NaN on an annotated hand raises
ValueError naming the file (the build skips that clip); a sequence folder without `cam_intrinsics.txt`
or `cam_pose/` is not listed and its reason is in `skipped`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from hand3d_dataset.clip import Clip, HandTrack, ObjectTrack
from hand3d_dataset.sources._common import ChunkedSource, ManoPoser, invert_poses, read_depth_mm, read_rgb

__all__ = ["H2oSource", "OBJECTS", "VERBS", "ACTIONS", "FPS"]

FPS = 30.0  # H2O is recorded at 30 Hz
EGO_CAMERA = "cam4"  # the head-mounted camera
OBJECTS = ("book", "espresso", "lotion", "spray", "milk", "cocoa", "chips", "cappuccino")  # classes 1..8
VERBS = ("grab", "place", "open", "close", "pour", "take out", "put in", "apply", "read", "spray", "squeeze")
# action_label 1..36 (the H2O README's list): verb + object
ACTIONS = tuple(
    [f"grab {o}" for o in OBJECTS]
    + [f"place {o}" for o in OBJECTS]
    + ["open lotion", "open milk", "open chips", "close lotion", "close milk", "close chips", "pour milk"]
    + ["take out espresso", "take out cocoa", "take out chips", "take out cappuccino"]
    + ["put in espresso", "put in cocoa", "put in cappuccino", "apply lotion", "apply spray"]
    + ["read book", "read espresso", "spray spray", "squeeze lotion"]
)
_SIDES = ("left", "right")


def _numbers(path: Path, count: int | None, what: str) -> np.ndarray:
    """The whitespace-separated numbers of a one-line H2O text file; ValueError naming it otherwise."""
    if not path.exists():
        raise ValueError(f"{what}: missing {path}")
    try:
        vals = np.array(path.read_text().split(), dtype=float)
    except ValueError as e:
        raise ValueError(f"{what}: {path} holds non-numeric text ({e})") from e
    if count is not None and vals.size != count:
        raise ValueError(f"{what}: {path} has {vals.size} numbers, expected {count}")
    return vals


class H2oSource(ChunkedSource):
    """`SourceAdapter` over an H2O root; ids `h2o-<subject>-<scene>-<sequence>-<camera>-c<chunk>`."""

    name = "h2o"
    FPS = FPS

    def __init__(
        self,
        root: str | Path,
        camera: str = EGO_CAMERA,  # cam4 (egocentric) or one of the fixed cam0..cam3
        sample_fps: float = 1.0,  # rate of the clip's frames (the paper samples 1 fps)
        chunk_s: float = 10.0,  # chunk length in seconds (the paper's ~10 s chunks)
        mano_dir: str | Path | None = None,  # MANO_LEFT/RIGHT files: re-pose hand_pose_MANO, report the error
        load_depth: bool = True,  # read the registered depth (for `--estimator gt-depth`)
    ) -> None:
        super().__init__(sample_fps, chunk_s)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root: {self.root} is not a folder")
        if camera not in {f"cam{i}" for i in range(5)}:
            raise ValueError(f"camera: expected cam0..cam4 (cam4 is egocentric), got {camera!r}")
        self.camera, self.load_depth = camera, bool(load_depth)
        # h2oplayer: manopth ManoLayer(use_pca=False, ncomps=45, flat_hand_mean=True)
        self.poser = (
            None if mano_dir is None else ManoPoser(mano_dir, flat_hand_mean=True, fingertips="manopth")
        )
        for intr in sorted(self.root.rglob(f"{camera}/cam_intrinsics.txt")):
            cam = intr.parent
            names = [p.stem for p in sorted(cam.glob("cam_pose/*.txt"))]
            if not names:
                self.skipped[str(cam)] = f"no cam_pose/*.txt in {cam}"
            elif names != [f"{i:06d}" for i in range(len(names))]:
                self.skipped[str(cam)] = (
                    f"cam_pose files of {cam} are not numbered 000000..{len(names) - 1:06d}"
                )
            else:
                seq = cam.parent
                rel = seq.relative_to(self.root).parts if seq != self.root else (seq.name,)
                self._add("h2o-" + "-".join(rel) + f"-{camera}", len(names), cam)

    def load_clip(self, clip_id: str) -> Clip:
        cam, idx = self._entry(clip_id)
        what = f"clip {clip_id}"
        fx, fy, cx, cy, w, h = _numbers(cam / "cam_intrinsics.txt", 6, what)
        K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        image_hw = (int(h), int(w))
        n = len(idx)
        T_wc = np.stack([_numbers(cam / "cam_pose" / f"{f:06d}.txt", 16, what).reshape(4, 4) for f in idx])
        R, t = invert_poses(T_wc[:, :3, :3], T_wc[:, :3, 3])

        joints_cam = {s: np.full((n, 21, 3), np.nan) for s in _SIDES}
        mano = {
            s: {
                k: np.full((n, d), np.nan)
                for k, d in (("global_orient", 3), ("hand_pose", 45), ("transl", 3), ("betas", 10))
            }
            for s in _SIDES
        }
        has_mano = (cam / "hand_pose_MANO").is_dir()
        obj_class = np.zeros(n, int)
        obj_centre_cam = np.full((n, 3), np.nan)
        actions, verbs = Counter(), Counter()
        for k, f in enumerate(idx):
            hp = _numbers(cam / "hand_pose" / f"{f:06d}.txt", 128, what).reshape(2, 64)
            for s, row in zip(_SIDES, hp):
                if row[0] == 1:
                    if not np.isfinite(row[1:]).all():
                        raise ValueError(
                            f"{what}: {cam / 'hand_pose' / f'{f:06d}.txt'} has NaN joints on the {s} hand"
                        )
                    joints_cam[s][k] = row[1:].reshape(21, 3)
                elif row[0] != 0:
                    raise ValueError(
                        f"{what}: {cam / 'hand_pose' / f'{f:06d}.txt'} has flag {row[0]} (expected 0/1)"
                    )
            if has_mano:
                mp = _numbers(cam / "hand_pose_MANO" / f"{f:06d}.txt", 124, what).reshape(2, 62)
                for s, row in zip(_SIDES, mp):
                    if row[0] == 1:
                        if not np.isfinite(row).all():
                            raise ValueError(
                                f"{what}: {cam / 'hand_pose_MANO' / f'{f:06d}.txt'} has NaN parameters on the {s} hand"
                            )
                        mano[s]["transl"][k], mano[s]["global_orient"][k] = row[1:4], row[4:7]
                        mano[s]["hand_pose"][k], mano[s]["betas"][k] = row[7:52], row[52:62]
            obj_file = cam / "obj_pose" / f"{f:06d}.txt"
            if obj_file.exists():
                op = _numbers(obj_file, 64, what)
                if not 0 <= op[0] <= len(OBJECTS) or op[0] != int(op[0]):
                    raise ValueError(
                        f"{what}: {obj_file} has object class {op[0]}, expected 0..{len(OBJECTS)}"
                    )
                if op[0] > 0:
                    obj_class[k], obj_centre_cam[k] = int(op[0]), op[1:4]
            for folder, counter in (("action_label", actions), ("verb_label", verbs)):
                lf = cam / folder / f"{f:06d}.txt"
                if lf.exists():
                    counter[int(_numbers(lf, 1, what)[0])] += 1

        def to_world(p_cam: np.ndarray) -> np.ndarray:  # (n, ..., 3) camera → world with T_wc
            return np.einsum("tij,t...j->t...i", T_wc[:, :3, :3], p_cam) + T_wc[:, None, :3, 3].reshape(
                (n,) + (1,) * (p_cam.ndim - 2) + (3,)
            )

        hands = {}
        meta = {"folder": str(cam), "camera": self.camera, "frame_indices": idx.tolist(), "source_fps": FPS}
        errors = []
        for s in _SIDES:
            valid = np.isfinite(joints_cam[s]).all(axis=(1, 2))
            if not valid.any():
                continue
            if self.poser is not None:
                ok = valid & np.isfinite(mano[s]["global_orient"]).all(axis=1)
                if ok.any():
                    m = {k: v[ok] for k, v in mano[s].items()}
                    errors.append(
                        self.poser.max_error_mm(
                            s, joints_cam[s][ok], m["global_orient"], m["hand_pose"], m["betas"], m["transl"]
                        )
                    )
            hands[s] = HandTrack(
                s, joints3d=to_world(joints_cam[s]), valid=valid, mano=mano[s] if has_mano else None
            )
        if not hands:
            raise ValueError(f"{what}: no annotated hand on any sampled frame of {cam / 'hand_pose'}")
        if errors:
            meta["mano_joint_error_mm"] = max(errors)
        centre_w = to_world(obj_centre_cam)
        objects = [
            ObjectTrack(OBJECTS[c - 1], position3d=np.where((obj_class == c)[:, None], centre_w, np.nan))
            for c in sorted(set(obj_class.tolist()) - {0})
        ]
        task = ""
        if any(a > 0 for a in actions):
            task = ACTIONS[max((a for a in actions if a > 0), key=lambda a: actions[a]) - 1]
        elif any(v > 0 for v in verbs) and objects:
            verb = VERBS[max((v for v in verbs if v > 0), key=lambda v: verbs[v]) - 1]
            task = f"{verb} {objects[0].name}"

        frames = depth = None
        if (cam / "rgb").is_dir():
            frames = np.stack([read_rgb(cam / "rgb" / f"{f:06d}.png", what) for f in idx])
            if frames.shape[1:3] != image_hw:
                raise ValueError(
                    f"{what}: rgb images are {frames.shape[1:3]}, cam_intrinsics.txt says {image_hw}"
                )
            if self.load_depth and (cam / "depth").is_dir():
                depth = np.stack([read_depth_mm(cam / "depth" / f"{f:06d}.png", what) for f in idx])
                if depth.shape[1:] != image_hw:
                    raise ValueError(f"{what}: depth images are {depth.shape[1:]}, expected {image_hw}")
        return Clip(
            clip_id=clip_id,
            source=self.name,
            fps=self.clip_fps,
            K=K,
            R=R,
            t=t,
            image_hw=image_hw,
            hands=hands,
            objects=objects,
            task=task,
            frames=frames,
            depth=depth,
            meta=meta,
        )
