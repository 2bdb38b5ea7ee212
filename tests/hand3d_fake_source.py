"""A tiny numpy-only Hand3D source for the pipeline/build tests: analytic scenes with exact ground truth.

    from tests.hand3d_fake_source import FakeSource
    src = FakeSource(num_clips=4)
    clip = src.load_clip(src.clip_ids()[0])   # 6 frames of 64x64, one right hand, two objects

Each clip: a static or yawing camera at the world origin looking along +z; a background plane at
z = 0.9 m; two objects drawn as square patches at their own depth (segmentation ids 1, 2); a right hand
whose 21 joints are drawn as 3x3 patches at the joint's depth (id 255), moving along a straight line.
Depth and segmentation are exact by construction, so `GroundTruthDepthEstimator` and
`GroundTruthBoxDetector` run on these clips as on rendered ones.

`corrupt` maps a clip index to a failure: "unreadable" (load_clip raises, as a reader would on a bad
file), "nan_joints" (NaN joints on a frame marked valid: the Clip refuses them), "out_of_view" (the
hand is behind the camera), "empty_box" (object 0's box is degenerate on every frame, see EmptyBoxDetector).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from hand3d_dataset.clip import Clip, HandTrack, ObjectTrack, boxes_from_segmentation

H = W = 64
T = 6
F = 60.0  # focal length, pixels
K = np.array([[F, 0.0, (W - 1) / 2], [0.0, F, (H - 1) / 2], [0.0, 0.0, 1.0]])
# A flat right hand in its own frame (metres): wrist at 0, fingers along -y (image up), spread in x.
_FINGER_X = np.array([-0.035, -0.015, 0.0, 0.015, 0.03])
HAND_SHAPE = np.zeros((21, 3))
for _f in range(5):
    for _k in range(4):
        HAND_SHAPE[1 + 4 * _f + _k] = [_FINGER_X[_f], -0.03 - 0.02 * _k, 0.0]


def _splat(depth, seg, uv, z, sid, half):
    """Draws a (2·half+1)² patch at pixel uv with depth z where it is nearer than what is there."""
    c, r = int(round(uv[0])), int(round(uv[1]))
    r0, r1, c0, c1 = max(r - half, 0), min(r + half + 1, H), max(c - half, 0), min(c + half + 1, W)
    if r0 >= r1 or c0 >= c1 or z <= 0:
        return
    patch = depth[r0:r1, c0:c1]
    near = z < patch
    patch[near] = z
    seg[r0:r1, c0:c1][near] = sid


def make_clip(index: int, seed: int = 0, corrupt: str | None = None) -> Clip:
    """Clip `index` of stream `seed` (see the module docstring)."""
    rng = np.random.default_rng([seed, index])
    clip_id = f"fake-s{seed}-{index:04d}"
    if corrupt == "unreadable":
        raise ValueError(f"clip {clip_id}: frame 2 is unreadable (truncated PNG)")
    yaw = np.radians(rng.uniform(-3, 3)) * np.arange(T) if index % 2 else np.zeros(T)
    R = Rotation.from_euler("y", yaw[:, None]).as_matrix()  # world → camera
    t = np.zeros((T, 3))
    start = np.array([rng.uniform(-0.1, 0.1), rng.uniform(0.0, 0.08), rng.uniform(0.45, 0.55)])
    step = np.array([rng.uniform(-0.03, 0.03), rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.03)])
    wrist = start + step * np.arange(T)[:, None]
    joints = wrist[:, None, :] + HAND_SHAPE[None]
    if corrupt == "out_of_view":
        joints = joints * np.array([1.0, 1.0, -1.0])  # behind the camera
    objects_pos = np.array(
        [[rng.uniform(-0.15, -0.05), rng.uniform(-0.05, 0.05), 0.7], [rng.uniform(0.05, 0.15), 0.05, 0.65]]
    )
    frames = rng.integers(40, 200, size=(T, H, W, 3), dtype=np.uint8)
    depth = np.full((T, H, W), 0.9, np.float32)
    seg = np.zeros((T, H, W), np.uint8)
    for k in range(T):
        for i, p in enumerate(objects_pos):
            pc = R[k] @ p + t[k]
            _splat(
                depth[k], seg[k], (F * pc[0] / pc[2] + K[0, 2], F * pc[1] / pc[2] + K[1, 2]), pc[2], i + 1, 4
            )
        for j in joints[k]:
            pc = R[k] @ j + t[k]
            if pc[2] > 0:
                _splat(
                    depth[k],
                    seg[k],
                    (F * pc[0] / pc[2] + K[0, 2], F * pc[1] / pc[2] + K[1, 2]),
                    pc[2],
                    255,
                    1,
                )
    if corrupt == "nan_joints":
        joints = joints.copy()
        joints[3, 5] = np.nan  # frame 3 stays "valid": the clip must refuse it
        hand = HandTrack("right", joints3d=joints, valid=np.ones(T, bool))
    else:
        hand = HandTrack("right", joints3d=joints)
    boxes = boxes_from_segmentation(seg, [1, 2])
    names = ["red mug", "blue box"]
    objects = [
        ObjectTrack(n, box2d=boxes[:, i], position3d=np.tile(objects_pos[i], (T, 1)), segment_id=i + 1)
        for i, n in enumerate(names)
    ]
    return Clip(
        clip_id=clip_id,
        source="fake",
        fps=5.0,
        K=K,
        R=R,
        t=t,
        image_hw=(H, W),
        hands={"right": hand},
        objects=objects,
        task="pick up the red mug",
        frames=frames,
        depth=depth,
        segmentation=seg,
        meta={"target": "red mug", "corrupt": corrupt},
    )


class FakeSource:
    """`SourceAdapter` over `make_clip`; picklable, so spawn workers can use it."""

    name = "fake"

    def __init__(self, num_clips: int = 8, seed: int = 0, corrupt: dict[int, str] | None = None) -> None:
        self.num_clips, self.seed, self.corrupt = num_clips, seed, dict(corrupt or {})

    def clip_ids(self) -> list[str]:
        return [f"fake-s{self.seed}-{i:04d}" for i in range(self.num_clips)]

    def load_clip(self, clip_id: str) -> Clip:
        index = int(clip_id.rsplit("-", 1)[1])
        return make_clip(index, self.seed, self.corrupt.get(index))


class EmptyBoxDetector:
    """Ground-truth boxes, except a zero-area box for object 0 on clips marked "empty_box"."""

    def detect_clip(self, clip: Clip) -> np.ndarray:
        boxes = boxes_from_segmentation(clip.segmentation, [o.segment_id for o in clip.objects])
        if clip.meta.get("corrupt") == "empty_box":
            boxes[:, 0] = [10.0, 10.0, 10.0, 20.0]  # x0 == x1
        return boxes


class InterruptingSource(FakeSource):
    """Raises KeyboardInterrupt (as Ctrl-C or a kill would stop the run) when loading clip `stop_at`."""

    def __init__(self, stop_at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stop_at = stop_at

    def load_clip(self, clip_id: str) -> Clip:
        if int(clip_id.rsplit("-", 1)[1]) == self.stop_at:
            raise KeyboardInterrupt(f"simulated kill at {clip_id}")
        return super().load_clip(clip_id)
