"""The unified clip: the one record every Hand3D source adapter yields (DESIGN.md §3).

    >>> import numpy as np
    >>> from hand3d_dataset.clip import Clip, HandTrack, ObjectTrack
    >>> T = 2
    >>> hand = HandTrack("right", joints3d=np.tile([0.0, 0.0, 1.0], (T, 21, 1)))
    >>> clip = Clip(clip_id="demo-0", source="synth", fps=10.0, K=np.diag([100.0, 100.0, 1.0]),
    ...             R=np.tile(np.eye(3), (T, 1, 1)), t=np.zeros((T, 3)), image_hw=(64, 64),
    ...             hands={"right": hand}, objects=[ObjectTrack("red mug")], task="pick up the red mug")
    >>> clip.joints_cam("right").shape, clip.num_frames
    ((2, 21, 3), 2)

Schema (T frames; units metres, seconds, pixels; geometry conventions of `cameras.py`):

- `K` (T, 3, 3) per-frame intrinsics (a single (3, 3) is broadcast on construction); `R` (T, 3, 3), `t`
  (T, 3) world → camera, ``x_c = R x_w + t``, OpenCV camera frame.
- `frames` (T, H, W, 3) uint8 RGB, or None for trajectory-only clips (e.g. the HOT3D sample has no
  images); `image_hw` is always given so that K has an image to refer to.
- `depth` (T, H, W) float32 metric z-depth, NaN where no surface was hit; `segmentation` (T, H, W) uint8
  with 0 = background/table, object i → `objects[i].segment_id`, hands → `HAND_SEGMENT[side]`.
- `hands` maps "left"/"right" to a `HandTrack`: `joints3d` (T, 21, 3) world, OpenPose order, and/or
  `wrist3d` (T, 3) world (a *wrist-only* track when `joints3d` is None, e.g. HOT3D without a MANO model
  file); `valid` (T,) bool, and joints/wrist are NaN exactly where `valid` is False.
- `objects` list of `ObjectTrack`: `name` ("red mug"), `box2d` (T, 4) xyxy pixels with NaN rows where the
  object is not visible, `position3d` (T, 3) world centre, both optional.
- `task` free-form instruction text; `meta` a JSON-able dict of source-specific extras.

Boxes use pixel edges: a mask whose pixels span columns c0..c1 and rows r0..r1 has the box
(c0 − ½, r0 − ½, c1 + ½, r1 + ½); with pixel centres at integers (`cameras.py`) a pixel (j, i) is inside
exactly when x0 ≤ j < x1 and y0 ≤ i < y1, the rule `calibration.localize_object` uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hand3d_dataset._checks import as_array, check_intrinsics, check_rotation, check_shape

__all__ = [
    "HAND_SIDES",
    "HAND_SEGMENT",
    "NUM_JOINTS",
    "HandTrack",
    "ObjectTrack",
    "Clip",
    "boxes_from_segmentation",
]

NUM_JOINTS = 21  # OpenPose order: 0 wrist; 1-4 thumb; 5-8 index; 9-12 middle; 13-16 ring; 17-20 pinky
HAND_SIDES = ("left", "right")
HAND_SEGMENT = {"left": 254, "right": 255}  # segmentation ids of the hands; objects use 1..253


def _check_nan_where_invalid(name: str, arr: np.ndarray, valid: np.ndarray) -> None:
    """Values must be finite on valid frames and all-NaN on invalid ones (never a stale number)."""
    per_frame = arr.reshape(arr.shape[0], -1)
    finite = np.isfinite(per_frame)
    bad_valid = valid & ~finite.all(axis=1)
    if bad_valid.any():
        raise ValueError(
            f"{name}: non-finite values on frames marked valid: {np.flatnonzero(bad_valid).tolist()[:10]}"
        )
    bad_invalid = ~valid & ~np.isnan(per_frame).all(axis=1)
    if bad_invalid.any():
        raise ValueError(
            f"{name}: frames marked invalid must be NaN, got numbers on frames "
            f"{np.flatnonzero(bad_invalid).tolist()[:10]}"
        )


@dataclass
class HandTrack:
    """One hand over a clip; world frame, metres.

    joints3d: (T, 21, 3) OpenPose order, or None for a wrist-only track.
    wrist3d: (T, 3); derived from joints3d[:, 0] when omitted; required when joints3d is None.
    valid: (T,) bool; defaults to all frames where the values are finite.
    mano: per-frame MANO parameters as the source stores them (e.g. "pose_pca" (T, 15), "betas" (T, 10),
        "wrist_R" (T, 3, 3)), or None; kept for adapters that fit joints later.
    """

    side: str  # "left" or "right"
    joints3d: np.ndarray | None = None  # (T, 21, 3) world, metres; NaN on invalid frames
    wrist3d: np.ndarray | None = None  # (T, 3) world, metres; NaN on invalid frames
    valid: np.ndarray | None = None  # (T,) bool: the hand is tracked on this frame
    mano: dict[str, np.ndarray] | None = None  # raw MANO parameters per frame, source-specific keys

    def __post_init__(self) -> None:
        if self.side not in HAND_SIDES:
            raise ValueError(f"HandTrack.side: expected one of {HAND_SIDES}, got {self.side!r}")
        name = f"HandTrack[{self.side}]"
        if self.joints3d is None and self.wrist3d is None:
            raise ValueError(f"{name}: give joints3d (T, 21, 3) or wrist3d (T, 3); both are None")
        if self.joints3d is not None:
            j = check_shape(
                f"{name}.joints3d", as_array(f"{name}.joints3d", self.joints3d, finite=False), (21, 3)
            )
            if j.ndim != 3:
                raise ValueError(f"{name}.joints3d: expected shape (T, 21, 3), got {tuple(j.shape)}")
            self.joints3d = j
            if self.wrist3d is None:
                self.wrist3d = j[:, 0].copy()
        w = check_shape(f"{name}.wrist3d", as_array(f"{name}.wrist3d", self.wrist3d, finite=False), (3,))
        if w.ndim != 2:
            raise ValueError(f"{name}.wrist3d: expected shape (T, 3), got {tuple(w.shape)}")
        self.wrist3d = w
        T = w.shape[0]
        if self.joints3d is not None:
            if self.joints3d.shape[0] != T:
                raise ValueError(f"{name}: joints3d has {self.joints3d.shape[0]} frames, wrist3d has {T}")
            if not np.array_equal(self.joints3d[:, 0], w, equal_nan=True):
                raise ValueError(f"{name}.wrist3d: differs from joints3d[:, 0]; the wrist is joint 0")
        if self.valid is None:
            self.valid = np.isfinite(w).all(axis=1)
            if self.joints3d is not None:
                self.valid &= np.isfinite(self.joints3d).all(axis=(1, 2))
        v = np.asarray(self.valid)
        if v.dtype != bool or v.shape != (T,):
            raise ValueError(f"{name}.valid: expected a bool array of shape ({T},), got {v.dtype} {v.shape}")
        self.valid = v
        _check_nan_where_invalid(f"{name}.wrist3d", w, v)
        if self.joints3d is not None:
            _check_nan_where_invalid(f"{name}.joints3d", self.joints3d, v)
        if self.mano is not None:
            for k, arr in self.mano.items():
                a = as_array(f"{name}.mano[{k!r}]", arr, finite=False)
                if a.ndim == 0 or a.shape[0] != T:
                    raise ValueError(f"{name}.mano[{k!r}]: expected {T} frames first, got shape {a.shape}")
                self.mano[k] = a

    @property
    def num_frames(self) -> int:
        return int(self.wrist3d.shape[0])

    @property
    def wrist_only(self) -> bool:
        """True when only the wrist is known (no 21-joint skeleton)."""
        return self.joints3d is None


@dataclass
class ObjectTrack:
    """One object over a clip.

    box2d: (T, 4) xyxy pixels (pixel-edge convention, see the module docstring), NaN rows where the
        object is not visible; position3d: (T, 3) world centre, metres.
    """

    name: str  # natural name used in language, e.g. "small blue box"
    box2d: np.ndarray | None = None  # (T, 4) xyxy pixels; NaN rows where not visible
    position3d: np.ndarray | None = None  # (T, 3) world, metres: the object's geometric centre
    segment_id: int | None = None  # its id in Clip.segmentation, when the source renders one

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"ObjectTrack.name: expected a non-empty string, got {self.name!r}")
        label = f"ObjectTrack[{self.name!r}]"
        if self.box2d is not None:
            b = check_shape(f"{label}.box2d", as_array(f"{label}.box2d", self.box2d, finite=False), (4,))
            if b.ndim != 2:
                raise ValueError(f"{label}.box2d: expected shape (T, 4), got {tuple(b.shape)}")
            rows = np.isfinite(b).all(axis=1)
            partial = ~rows & ~np.isnan(b).all(axis=1)
            if partial.any():
                raise ValueError(
                    f"{label}.box2d: rows must be all finite or all NaN; frames {np.flatnonzero(partial)}"
                )
            bad = rows & ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"{label}.box2d: need x0 < x1 and y0 < y1, got {b[i].tolist()} on frame {i}")
            self.box2d = b
        if self.position3d is not None:
            p = check_shape(
                f"{label}.position3d", as_array(f"{label}.position3d", self.position3d, finite=False), (3,)
            )
            if p.ndim != 2:
                raise ValueError(f"{label}.position3d: expected shape (T, 3), got {tuple(p.shape)}")
            if np.isinf(p).any():
                raise ValueError(f"{label}.position3d: contains inf")
            self.position3d = p
        if self.segment_id is not None and not (1 <= int(self.segment_id) <= 253):
            raise ValueError(f"{label}.segment_id: expected 1..253, got {self.segment_id}")


@dataclass
class Clip:
    """A clip of hand-object interaction with cameras and ground truth; see the module docstring."""

    clip_id: str  # unique within the source, stable across runs (resumable builds key on it)
    source: str  # adapter name, e.g. "synth", "hot3d"
    fps: float  # frame rate of the T frames, Hz
    K: np.ndarray  # (T, 3, 3) intrinsics in pixels ((3, 3) broadcast on construction)
    R: np.ndarray  # (T, 3, 3) world → camera rotation
    t: np.ndarray  # (T, 3) world → camera translation, metres
    image_hw: tuple[int, int]  # (H, W) of the images K refers to
    hands: dict[str, HandTrack]  # "left"/"right" → track; at least one hand
    objects: list[ObjectTrack] = field(default_factory=list)  # objects in the scene
    task: str = ""  # the instruction this clip performs, e.g. "put the red mug on the blue plate"
    frames: np.ndarray | None = None  # (T, H, W, 3) uint8 RGB; None for trajectory-only clips
    depth: np.ndarray | None = None  # (T, H, W) float32 metric z-depth, NaN where no surface
    segmentation: np.ndarray | None = None  # (T, H, W) uint8 ids: 0 background, objects, HAND_SEGMENT
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able source-specific extras

    def __post_init__(self) -> None:
        if not isinstance(self.clip_id, str) or not self.clip_id:
            raise ValueError(f"Clip.clip_id: expected a non-empty string, got {self.clip_id!r}")
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"Clip.source: expected a non-empty string, got {self.source!r}")
        if not (isinstance(self.fps, (int, float, np.number)) and np.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"Clip.fps: expected a positive number, got {self.fps!r}")
        self.fps = float(self.fps)
        R = check_rotation("Clip.R", self.R, atol=1e-4)
        if R.ndim != 3:
            raise ValueError(f"Clip.R: expected shape (T, 3, 3), got {tuple(R.shape)}")
        T = R.shape[0]
        if T < 1:
            raise ValueError("Clip.R: a clip needs at least one frame, got T=0")
        t = check_shape("Clip.t", as_array("Clip.t", self.t), (3,))
        if t.shape != (T, 3):
            raise ValueError(f"Clip.t: expected shape ({T}, 3) to match R, got {tuple(t.shape)}")
        K = check_intrinsics("Clip.K", self.K)
        if K.ndim == 2:
            K = np.broadcast_to(K, (T, 3, 3)).copy()
        if K.shape != (T, 3, 3):
            raise ValueError(f"Clip.K: expected shape (3, 3) or ({T}, 3, 3), got {tuple(K.shape)}")
        self.R, self.t, self.K = R, t, K
        try:
            h, w = (int(x) for x in self.image_hw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"Clip.image_hw: expected (height, width), got {self.image_hw!r}") from e
        if h <= 0 or w <= 0:
            raise ValueError(f"Clip.image_hw: expected positive sizes, got {self.image_hw!r}")
        self.image_hw = (h, w)
        self._check_images(T, h, w)
        if not isinstance(self.hands, dict) or not self.hands:
            raise ValueError(f"Clip.hands: expected a non-empty dict side → HandTrack, got {self.hands!r}")
        for side, hand in self.hands.items():
            if not isinstance(hand, HandTrack) or hand.side != side:
                raise ValueError(
                    f"Clip.hands[{side!r}]: expected a HandTrack with side={side!r}, got {hand!r}"
                )
            if hand.num_frames != T:
                raise ValueError(f"Clip.hands[{side!r}]: has {hand.num_frames} frames, the cameras have {T}")
        names = [o.name for o in self.objects]
        if len(set(names)) != len(names):
            raise ValueError(f"Clip.objects: names must be unique (language refers to them), got {names}")
        for o in self.objects:
            for attr in ("box2d", "position3d"):
                arr = getattr(o, attr)
                if arr is not None and arr.shape[0] != T:
                    raise ValueError(
                        f"Clip.objects[{o.name!r}].{attr}: has {arr.shape[0]} frames, expected {T}"
                    )
        if not isinstance(self.task, str):
            raise ValueError(f"Clip.task: expected a string, got {type(self.task).__name__}")

    def _check_images(self, T: int, h: int, w: int) -> None:
        if self.frames is not None:
            f = np.asarray(self.frames)
            if f.dtype != np.uint8 or f.shape != (T, h, w, 3):
                raise ValueError(f"Clip.frames: expected uint8 ({T}, {h}, {w}, 3), got {f.dtype} {f.shape}")
            self.frames = f
        if self.depth is not None:
            d = np.asarray(self.depth, dtype=np.float32)
            if d.shape != (T, h, w):
                raise ValueError(f"Clip.depth: expected shape ({T}, {h}, {w}), got {d.shape}")
            if np.isinf(d).any() or (d <= 0).any():
                raise ValueError(
                    "Clip.depth: expected z-depth > 0 in metres, NaN for holes; got inf or ≤ 0 values"
                )
            self.depth = d
        if self.segmentation is not None:
            s = np.asarray(self.segmentation)
            if s.dtype != np.uint8 or s.shape != (T, h, w):
                raise ValueError(
                    f"Clip.segmentation: expected uint8 ({T}, {h}, {w}), got {s.dtype} {s.shape}"
                )
            self.segmentation = s

    # --- accessors -----------------------------------------------------------------------------------

    @property
    def num_frames(self) -> int:
        return int(self.R.shape[0])

    @property
    def has_frames(self) -> bool:
        return self.frames is not None

    def object(self, name: str) -> ObjectTrack:
        """The object called `name`; ValueError listing the names when absent."""
        for o in self.objects:
            if o.name == name:
                return o
        raise ValueError(
            f"name: no object {name!r} in clip {self.clip_id}; objects are {[o.name for o in self.objects]}"
        )

    def _to_cam(self, points_world: np.ndarray) -> np.ndarray:
        """points_world: (T, ..., 3) → same shape in each frame's camera frame (NaN stays NaN)."""
        return np.einsum("tij,t...j->t...i", self.R, points_world) + self.t.reshape(
            (self.num_frames,) + (1,) * (points_world.ndim - 2) + (3,)
        )

    def _hand(self, side: str) -> HandTrack:
        if side not in self.hands:
            raise ValueError(f"side: clip {self.clip_id} has hands {sorted(self.hands)}, not {side!r}")
        return self.hands[side]

    def joints_cam(self, side: str) -> np.ndarray:
        """(T, 21, 3) joints of `side` in each frame's camera frame; ValueError for a wrist-only track."""
        hand = self._hand(side)
        if hand.joints3d is None:
            raise ValueError(f"side: the {side} hand of clip {self.clip_id} is wrist-only (no joints3d)")
        return self._to_cam(hand.joints3d)

    def wrist_cam(self, side: str) -> np.ndarray:
        """(T, 3) wrist of `side` in each frame's camera frame."""
        return self._to_cam(self._hand(side).wrist3d)

    def object_cam(self, name: str) -> np.ndarray:
        """(T, 3) centre of object `name` in each frame's camera frame."""
        o = self.object(name)
        if o.position3d is None:
            raise ValueError(f"name: object {name!r} of clip {self.clip_id} has no position3d")
        return self._to_cam(o.position3d)

    def camera_centers(self) -> np.ndarray:
        """(T, 3) camera centres in the world, ``c = −Rᵀ t``."""
        return -np.einsum("tji,tj->ti", self.R, self.t)

    # --- serialisation: one .npz per clip (arrays) with a JSON header (everything else) ---------------

    def save(self, path: str | Path) -> Path:
        """Writes the clip to `path` (.npz, uncompressed); `Clip.load` reads it back exactly."""
        arrays: dict[str, np.ndarray] = {"K": self.K, "R": self.R, "t": self.t}
        for name in ("frames", "depth", "segmentation"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        header: dict[str, Any] = {
            "clip_id": self.clip_id,
            "source": self.source,
            "fps": self.fps,
            "image_hw": list(self.image_hw),
            "task": self.task,
            "meta": self.meta,
            "hands": {},
            "objects": [],
        }
        for side, h in self.hands.items():
            arrays[f"hand.{side}.wrist3d"] = h.wrist3d
            arrays[f"hand.{side}.valid"] = h.valid
            if h.joints3d is not None:
                arrays[f"hand.{side}.joints3d"] = h.joints3d
            for k, v in (h.mano or {}).items():
                arrays[f"hand.{side}.mano.{k}"] = v
            header["hands"][side] = {"mano_keys": sorted(h.mano) if h.mano is not None else None}
        for i, o in enumerate(self.objects):
            header["objects"].append({"name": o.name, "segment_id": o.segment_id})
            if o.box2d is not None:
                arrays[f"object.{i}.box2d"] = o.box2d
            if o.position3d is not None:
                arrays[f"object.{i}.position3d"] = o.position3d
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        path = Path(path)
        with open(path, "wb") as fh:  # a file handle keeps numpy from appending ".npz" to the name
            np.savez(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Clip:
        """Reads a clip written by `save` (validated again on construction)."""
        with np.load(Path(path), allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        header = json.loads(a.pop("header").tobytes().decode())
        hands = {}
        for side, info in header["hands"].items():
            keys = info["mano_keys"]
            hands[side] = HandTrack(
                side,
                joints3d=a.get(f"hand.{side}.joints3d"),
                wrist3d=a[f"hand.{side}.wrist3d"],
                valid=a[f"hand.{side}.valid"],
                mano=None if keys is None else {k: a[f"hand.{side}.mano.{k}"] for k in keys},
            )
        objects = [
            ObjectTrack(
                o["name"],
                box2d=a.get(f"object.{i}.box2d"),
                position3d=a.get(f"object.{i}.position3d"),
                segment_id=o["segment_id"],
            )
            for i, o in enumerate(header["objects"])
        ]
        return cls(
            clip_id=header["clip_id"],
            source=header["source"],
            fps=header["fps"],
            K=a["K"],
            R=a["R"],
            t=a["t"],
            image_hw=tuple(header["image_hw"]),
            hands=hands,
            objects=objects,
            task=header["task"],
            frames=a.get("frames"),
            depth=a.get("depth"),
            segmentation=a.get("segmentation"),
            meta=header["meta"],
        )


def boxes_from_segmentation(segmentation: np.ndarray, segment_ids: list[int]) -> np.ndarray:
    """Tight boxes of each id in each frame.

    segmentation: (T, H, W) integer ids; returns (T, N, 4) xyxy pixel-edge boxes (see the module
    docstring), NaN rows where the id has no pixel in that frame.
    """
    seg = np.asarray(segmentation)
    if seg.ndim != 3 or not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"segmentation: expected integer (T, H, W), got {seg.dtype} {seg.shape}")
    out = np.full((seg.shape[0], len(segment_ids), 4), np.nan)
    for n, sid in enumerate(segment_ids):
        mask = seg == sid
        rows = mask.any(axis=2)  # (T, H)
        cols = mask.any(axis=1)  # (T, W)
        has = rows.any(axis=1)
        if not has.any():
            continue
        r0 = rows.argmax(axis=1)
        r1 = seg.shape[1] - 1 - rows[:, ::-1].argmax(axis=1)
        c0 = cols.argmax(axis=1)
        c1 = seg.shape[2] - 1 - cols[:, ::-1].argmax(axis=1)
        box = np.stack([c0 - 0.5, r0 - 0.5, c1 + 0.5, r1 + 0.5], axis=1)
        out[has, n] = box[has]
    return out
