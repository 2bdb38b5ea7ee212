"""The `synth` source: procedural table-top scenes rendered with MuJoCo, with exact ground truth.

    >>> from hand3d_dataset.sources.synth import SynthSource
    >>> src = SynthSource(num_clips=3, seed=0, image_size=96, num_frames=4)  # needs `vipa-vla[sim]`
    >>> clip = src.load_clip(src.clip_ids()[0])
    >>> clip.frames.shape, clip.depth.shape, clip.segmentation.shape
    ((4, 96, 96, 3), (4, 96, 96), (4, 96, 96))

Each clip: a table, 2–5 objects named from shape × colour × size ("small blue box"), one or two hands
drawn as a 21-joint skeleton of capsules (open, pinch and grasp poses) and a task the active hand
performs (reach, pick up, put on, move), with smooth minimum-jerk motions plus low-frequency and
per-frame noise. The camera is egocentric-like (above and behind the table edge, looking down),
static or slowly drifting. Everything is drawn from `numpy.random.default_rng([seed, index])`, so a
clip depends only on (seed, index) and the same id gives identical arrays in any process.

`Clip.meta` carries the task structure: `task_type` (reach | pick | move | put), `target` and
`destination` (object names), `active_hand`, `grasp_pose`, `grasp_time` (s), `move_direction` (world:
left = −x, forward = +y, the person sits at −y looking along +y), `camera_moving`,
`hand_capsule_radius_m` (skin over the joints), `seed`, `index`. The hand segment includes the forearm.

Ground truth is read back from the simulator after placing the bodies (camera pose from MuJoCo's
`cam_xpos`/`cam_xmat`), not from the numbers we asked for. MuJoCo cameras look along −z with y up;
OpenCV looks along +z with y down, so ``R_cv = diag(1, −1, −1) · cam_xmatᵀ`` and ``t = −R_cv · cam_xpos``.
MuJoCo's frustum is symmetric about the image centre with square pixels and vertical field of view
`fovy`, so with pixel centres at integers ``fx = fy = (H/2) / tan(fovy/2)``, ``cx = (W − 1)/2``,
``cy = (H − 1)/2``. `tests/test_synth.py` checks both by projecting bodies onto the rendered segmentation.

Rendering cost: a `mujoco.Renderer` owns a GL context and compiles shaders on first use (~0.1–0.2 s,
more than rendering a whole clip), so each process builds ONE template model with slots for the maximum
number of objects and both hands and ONE renderer per image size, and a clip only rewrites geom types,
sizes, colours and groups (hidden slots go to a geom group the scene option switches off) and the mocap
poses per frame. This replaces "one MJCF per clip": same scenes, no per-clip GL setup.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from hand3d_dataset.clip import HAND_SEGMENT, Clip, HandTrack, ObjectTrack, boxes_from_segmentation
from hand3d_dataset.extras import require

__all__ = ["SynthConfig", "SynthSource", "render_clip", "hand_skeleton", "HAND_POSES"]

MAX_OBJECTS = 5
_HIDDEN_GROUP = 3  # geom group switched off in the scene option: unused slots live there
# Bones drawn as capsules: the 20 parent→child links of the OpenPose tree, plus 3 across the palm.
_PARENTS = [0, 1, 2, 3, 0, 5, 6, 7, 0, 9, 10, 11, 0, 13, 14, 15, 0, 17, 18, 19]
BONES = [(p, c + 1) for c, p in enumerate(_PARENTS)] + [(5, 9), (9, 13), (13, 17)]
_BONE_A, _BONE_B = [p for p, _ in BONES], [c for _, c in BONES]
# Egocentric views always show forearms: one more capsule from the wrist away from the fingers. It
# carries the hand's segmentation id (it is not a joint: joints3d stays the 21 hand joints).
FOREARM_LENGTH = 0.25  # metres, before the per-clip hand size
_NUM_CAPSULES = len(BONES) + 1
_RADIUS = {"finger": 0.0085, "palm": 0.011, "forearm": 0.024}  # capsule radii, metres, before hand size


def _capsules(joints: np.ndarray, size: float, side: str) -> tuple[np.ndarray, np.ndarray]:
    """End points (N, 3), (N, 3) of the hand's capsules (bones, then the forearm) from (21, 3) joints.

    The forearm points from the wrist towards an elbow resting near the person's side of the table, so
    arms enter the egocentric view from below, as in real recordings.
    """
    elbow = np.array([0.22 if side == "right" else -0.22, -0.2, 0.02])
    to_elbow = elbow - joints[0]
    to_elbow = to_elbow / max(float(np.linalg.norm(to_elbow)), 1e-9)
    a = np.concatenate([joints[_BONE_A], (joints[0] + 0.015 * size * to_elbow)[None]])
    b = np.concatenate([joints[_BONE_B], (joints[0] + FOREARM_LENGTH * size * to_elbow)[None]])
    return a, b


_COLOURS = {
    "red": (0.85, 0.12, 0.1),
    "green": (0.15, 0.65, 0.2),
    "blue": (0.12, 0.3, 0.85),
    "yellow": (0.95, 0.85, 0.15),
    "orange": (0.95, 0.5, 0.1),
    "purple": (0.55, 0.2, 0.7),
    "white": (0.92, 0.92, 0.9),
    "black": (0.08, 0.08, 0.08),
}
_SIZES = {"small": 0.75, "": 1.0, "large": 1.3}  # scale of the base dimensions; medium has no adjective
# shape → (main geom, base half-sizes (m), aux part or None, can hold other objects)
_SHAPES = {
    "mug": ("cylinder", (0.035, 0.045), "handle", False),
    "box": ("box", (0.035, 0.035, 0.03), None, True),
    "ball": ("sphere", (0.03,), None, False),
    "bottle": ("cylinder", (0.028, 0.07), "neck", False),
    "can": ("cylinder", (0.03, 0.05), None, False),
    "plate": ("cylinder", (0.08, 0.008), None, True),
    "bowl": ("cylinder", (0.065, 0.025), None, True),
}
_GEOM_TYPE = {"sphere": 2, "capsule": 3, "cylinder": 5, "box": 6}  # mjtGeom values

# Joint flexion per finger (MCP/CMC, PIP/MCP, DIP/IP) in radians, thumb first.
HAND_POSES = {
    "open": np.array(
        [[0.15, 0.1, 0.1], [0.1, 0.1, 0.05], [0.1, 0.1, 0.05], [0.1, 0.1, 0.05], [0.1, 0.1, 0.05]]
    ),
    "pinch": np.array(  # thumb and index tips ~3 cm apart, the other fingers curled
        [[0.2, 1.0, 1.0], [1.2, 1.4, 0.0], [0.9, 1.0, 0.6], [1.0, 1.1, 0.6], [1.0, 1.1, 0.6]]
    ),
    "grasp": np.array([[0.6, 0.5, 0.4], [0.8, 0.9, 0.6], [0.8, 0.9, 0.6], [0.8, 0.9, 0.6], [0.8, 0.9, 0.6]]),
}
# Right hand, local frame: x towards the fingers, y towards the thumb, z out of the back of the hand.
_BASES = np.array(
    [[0.025, 0.022, -0.012], [0.095, 0.025, 0], [0.098, 0.004, 0], [0.092, -0.015, 0], [0.083, -0.033, 0]]
)
_LENGTHS = np.array(
    [
        [0.045, 0.032, 0.028],
        [0.04, 0.024, 0.02],
        [0.045, 0.028, 0.022],
        [0.042, 0.026, 0.021],
        [0.032, 0.02, 0.018],
    ]
)
_SPLAY = np.array([0.75, 0.1, 0.0, -0.1, -0.2])  # yaw of each finger in the palm plane


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the synthetic scenes; every field is validated on construction."""

    image_size: int | tuple[int, int] = 448  # rendered (H, W); an int means square
    num_frames: int = 8  # frames per clip
    fps: float = 3.0  # frame rate; a clip lasts (num_frames − 1) / fps seconds
    min_objects: int = 2  # objects per scene, at least
    max_objects: int = 5  # objects per scene, at most (≤ 5 slots in the template model)
    two_hands_prob: float = 0.3  # chance that an idle second hand is in the scene
    moving_camera_prob: float = 0.5  # chance that the camera drifts (egocentric head motion)
    fovy_deg: tuple[float, float] = (60.0, 75.0)  # range of the vertical field of view
    noise_m: float = 0.004  # amplitude of the slow wrist wobble, metres
    jitter_m: float = 0.001  # per-frame wrist jitter, metres

    def __post_init__(self) -> None:
        hw = (
            (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)
        )
        if len(hw) != 2 or any(not isinstance(x, (int, np.integer)) or x < 16 or x > 2048 for x in hw):
            raise ValueError(
                f"SynthConfig.image_size: expected an int or (H, W) in [16, 2048], got {self.image_size!r}"
            )
        object.__setattr__(self, "image_size", (int(hw[0]), int(hw[1])))
        if self.num_frames < 2:
            raise ValueError(f"SynthConfig.num_frames: expected ≥ 2, got {self.num_frames}")
        if not self.fps > 0:
            raise ValueError(f"SynthConfig.fps: expected > 0, got {self.fps}")
        if not 2 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"SynthConfig.min_objects/max_objects: need 2 ≤ min ≤ max ≤ {MAX_OBJECTS}, "
                f"got {self.min_objects}, {self.max_objects}"
            )
        for name in ("two_hands_prob", "moving_camera_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"SynthConfig.{name}: expected a probability, got {getattr(self, name)}")
        lo, hi = self.fovy_deg
        if not 10 <= lo <= hi <= 120:
            raise ValueError(f"SynthConfig.fovy_deg: expected 10 ≤ lo ≤ hi ≤ 120, got {self.fovy_deg}")
        if self.noise_m < 0 or self.jitter_m < 0:
            raise ValueError(
                f"SynthConfig.noise_m/jitter_m: expected ≥ 0, got {self.noise_m}, {self.jitter_m}"
            )


# --- hand skeleton -----------------------------------------------------------------------------------


def hand_skeleton(flex: np.ndarray, side: str, size: float = 1.0) -> np.ndarray:
    """21 joints in the hand's local frame (wrist at the origin) for given finger flexions.

    flex: (..., 5, 3) radians per finger joint (thumb first); returns (..., 21, 3) metres, OpenPose
    order. Each finger bends in its own plane towards the palm (−z); the thumb curls towards the palm
    centre. The left hand mirrors the right one in local y (the thumb side).
    """
    flex = np.asarray(flex, dtype=np.float64)
    lead = flex.shape[:-2]
    d = np.stack([np.cos(_SPLAY), np.sin(_SPLAY), np.zeros(5)], axis=1)  # (5, 3) finger directions
    bend = np.tile([0.0, 0.0, -1.0], (5, 1))
    bend[0] = [-0.35, -0.45, -0.8]  # the thumb folds across the palm
    bend -= (bend * d).sum(1, keepdims=True) * d
    bend /= np.linalg.norm(bend, axis=1, keepdims=True)
    theta = np.cumsum(flex, axis=-1)[..., None]  # (..., 5, 3, 1) accumulated flexion
    dirs = np.cos(theta) * d[:, None, :] + np.sin(theta) * bend[:, None, :]  # (..., 5, 3, 3)
    segs = dirs * (_LENGTHS * size)[..., None]
    chain = (_BASES * size)[:, None, :] + np.concatenate(
        [np.zeros(lead + (5, 1, 3)), np.cumsum(segs, axis=-2)], -2
    )
    joints = np.concatenate([np.zeros(lead + (1, 3)), chain.reshape(lead + (20, 3))], axis=-2)
    if side == "left":
        joints = joints * np.array([1.0, -1.0, 1.0])
    return joints


def _hand_rotation(pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """(T, 3, 3) world-from-hand rotations: fingers forward (+y world) pitched down, back of hand up."""
    cp, sp, cy, sy = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    x = np.stack([-sy * cp, cy * cp, -sp], axis=-1)
    z = np.stack([-sy * sp, cy * sp, cp], axis=-1)
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=-1)


def _min_jerk(s: np.ndarray) -> np.ndarray:
    return 10 * s**3 - 15 * s**4 + 6 * s**5


def _interp_keys(u: np.ndarray, keys_u: list[float], keys: np.ndarray) -> np.ndarray:
    """Minimum-jerk interpolation through keyframes: keys (K, D) at times keys_u (K,) → (T, D)."""
    keys_u = np.asarray(keys_u)
    k = np.clip(np.searchsorted(keys_u, u, side="right") - 1, 0, len(keys_u) - 2)
    s = np.clip((u - keys_u[k]) / np.maximum(keys_u[k + 1] - keys_u[k], 1e-9), 0, 1)
    return keys[k] + (keys[k + 1] - keys[k]) * _min_jerk(s)[:, None]


# --- scene sampling ----------------------------------------------------------------------------------


@dataclass
class _Object:
    name: str
    shape: str
    colour: str
    half: np.ndarray  # main geom's mujoco size
    height: float  # full height, metres
    radius: float  # footprint radius, metres
    pos: np.ndarray  # (3,) centre at t = 0


def _sample_objects(rng: np.random.Generator, n: int) -> list[_Object]:
    objs: list[_Object] = []
    names: set[str] = set()
    for _ in range(50 * n):  # bounded: a crowded table ends the scene with fewer objects
        if len(objs) == n:
            break
        shape = str(rng.choice(list(_SHAPES)))
        colour = str(rng.choice(list(_COLOURS)))
        size = str(rng.choice(list(_SIZES)))
        name = " ".join(w for w in (size, colour, shape) if w)
        if name in names or (shape == "plate" and any(o.shape == "plate" for o in objs)):
            continue
        kind, base, _, _ = _SHAPES[shape]
        half = np.array(base) * _SIZES[size] * rng.uniform(0.92, 1.08)
        if kind == "sphere":
            height, radius = 2 * half[0], half[0]
        elif kind == "box":
            height, radius = 2 * half[2], float(np.hypot(half[0], half[1]))
        else:
            height, radius = 2 * half[1], half[0]
        for _ in range(200):  # rejection sampling of a free spot in reach
            xy = np.array([rng.uniform(-0.25, 0.25), rng.uniform(0.12, 0.42)])
            if all(np.hypot(*(xy - o.pos[:2])) > radius + o.radius + 0.03 for o in objs):
                break
        else:
            continue
        objs.append(_Object(name, shape, colour, half, height, radius, np.array([xy[0], xy[1], height / 2])))
        names.add(name)
    return objs


def _look_at(eye: np.ndarray, target: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """(T, 3, 3) OpenCV world→camera rotations (rows = camera axes in world) looking at target."""
    z = target - eye
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y = np.cross(z, x)
    c, s = np.cos(roll)[:, None], np.sin(roll)[:, None]
    return np.stack([c * x + s * y, -s * x + c * y, z], axis=1)


@dataclass
class _Plan:
    """Everything sampled for one clip, before rendering."""

    objects: list[_Object]
    obj_pos: np.ndarray  # (T, N, 3) object centres
    hands: dict[str, np.ndarray]  # side → (T, 21, 3) world joints
    hand_size: float
    cam_R_cv: np.ndarray  # (T, 3, 3) requested camera rotations (OpenCV, world → camera)
    cam_eye: np.ndarray  # (T, 3)
    fovy: float  # degrees
    task: str
    meta: dict


def _plan_clip(cfg: SynthConfig, rng: np.random.Generator) -> _Plan:
    T = cfg.num_frames
    u = np.linspace(0.0, 1.0, T)
    objs = _sample_objects(rng, int(rng.integers(cfg.min_objects, cfg.max_objects + 1)))
    holders = [i for i, o in enumerate(objs) if _SHAPES[o.shape][3]]
    movable = [i for i, o in enumerate(objs) if o.shape != "plate"]
    tasks = ["reach", "pick", "move"] + (["put", "put"] if len(holders) and len(movable) > 1 else [])
    task_type = str(rng.choice(tasks))
    target = int(rng.choice(movable)) if task_type != "reach" else int(rng.integers(len(objs)))
    dest = None
    if task_type == "put":
        # only a wider holder can take the object
        wide = [h for h in holders if h != target and objs[h].radius > objs[target].radius]
        dest = int(rng.choice(wide)) if wide else target
        if dest == target:
            task_type, dest = "pick", None
    tobj = objs[target]
    side = str(rng.choice(["left", "right"], p=[0.3, 0.7]))
    hand_size = float(rng.uniform(0.9, 1.1))

    # Grip point (between thumb and index/middle tips) in the hand frame, for placing the hand.
    pose_name = "pinch" if tobj.radius < 0.035 else "grasp"
    grip_local = hand_skeleton(HAND_POSES[pose_name], side, hand_size)[[4, 8, 12]].mean(0)
    rest = np.array([0.12 if side == "right" else -0.12, 0.02, 0.1]) + rng.normal(0, 0.02, 3)
    grasp_pt = tobj.pos + np.array([0.0, -0.2 * tobj.radius, 0.25 * tobj.height])
    above = grasp_pt + np.array([0.0, -0.03, 0.06])
    lift = rng.uniform(0.1, 0.18)
    if task_type == "reach":
        key_u, grip_keys, close_u = [0, 0.75, 1.0], [rest, above, grasp_pt + [0, -0.02, 0.02]], None
    elif task_type == "pick":
        key_u, grip_keys, close_u = [0, 0.4, 0.6, 1.0], [rest, above, grasp_pt, grasp_pt + [0, 0, lift]], 0.6
    elif task_type == "move":
        direction = str(rng.choice(["left", "right", "forward", "backward"]))
        step = {"left": [-1, 0, 0], "right": [1, 0, 0], "forward": [0, 1, 0], "backward": [0, -1, 0]}[
            direction
        ]
        goal = grasp_pt + np.array(step) * rng.uniform(0.12, 0.2)
        key_u = [0, 0.3, 0.45, 0.6, 0.85, 1.0]
        grip_keys = [rest, above, grasp_pt, grasp_pt + [0, 0, 0.05], goal + [0, 0, 0.05], goal]
        close_u = 0.45
    else:  # put
        d = objs[dest]
        on_top = d.pos + np.array([0.0, 0.0, d.height / 2 + tobj.height / 2]) - tobj.pos + grasp_pt
        key_u = [0, 0.3, 0.45, 0.6, 0.85, 1.0]
        grip_keys = [rest, above, grasp_pt, grasp_pt + [0, 0, lift], on_top + [0, 0, 0.06], on_top]
        close_u = 0.45
    grip = _interp_keys(u, key_u, np.array(grip_keys, dtype=np.float64))
    phase = rng.uniform(0, 2 * np.pi, (2, 3))
    freq = rng.uniform(0.5, 1.5, (2, 1, 3))
    wobble = (np.sin(2 * np.pi * freq * u[None, :, None] + phase[:, None, :])).sum(0) * cfg.noise_m / 2
    grip = grip + wobble + rng.normal(0, cfg.jitter_m, grip.shape)
    if close_u is not None:  # the grip point holds still relative to the object while grasping
        grip_at_close = _interp_keys(np.array([close_u]), key_u, np.array(grip_keys, dtype=np.float64))[0]
    pitch = np.deg2rad(
        _interp_keys(u, [0, 0.4, 1.0], np.array([[20.0], [40.0], [35.0]]))[:, 0] + rng.normal(0, 3)
    )
    yaw = np.full(T, rng.normal(0, 0.15) + (0.2 if side == "right" else -0.2))
    R_hand = _hand_rotation(pitch, yaw)
    # Fingers close over the 0.2 of the clip before the grasp; a reach only half-closes as it touches.
    if close_u is not None:
        closing = np.clip((u - (close_u - 0.2)) / 0.2, 0, 1)
    else:
        closing = 0.5 * np.clip((u - 0.6) / 0.4, 0, 1)
    flex = HAND_POSES["open"] + _min_jerk(closing)[:, None, None] * (
        HAND_POSES[pose_name] - HAND_POSES["open"]
    )
    local = hand_skeleton(flex, side, hand_size)  # (T, 21, 3)
    grip_now = np.einsum("tij,j->ti", R_hand, grip_local)
    wrist = grip - grip_now
    hands = {side: wrist[:, None, :] + np.einsum("tij,tkj->tki", R_hand, local)}

    obj_pos = np.repeat(np.stack([o.pos for o in objs])[None], T, axis=0)
    if close_u is not None:
        held = u >= close_u
        obj_pos[held, target] = tobj.pos + (grip[held] - grip_at_close)
        obj_pos[held, target, 2] = np.maximum(obj_pos[held, target, 2], tobj.height / 2)

    if rng.random() < cfg.two_hands_prob:  # the other hand rests on the table edge, open
        other = "left" if side == "right" else "right"
        base = np.array([-0.15 if other == "left" else 0.15, 0.0, 0.05]) + rng.normal(0, 0.02, 3)
        w = (
            base
            + rng.normal(0, cfg.jitter_m, (T, 3))
            + np.linspace(0, 1, T)[:, None] * rng.normal(0, 0.01, 3)
        )
        R_o = _hand_rotation(np.full(T, 0.3), np.full(T, -0.3 if other == "right" else 0.3))
        loc = hand_skeleton(HAND_POSES["open"], other, hand_size)
        hands[other] = w[:, None, :] + np.einsum("tij,kj->tki", R_o, loc)

    eye0 = np.array([rng.normal(0, 0.03), rng.uniform(-0.35, -0.25), rng.uniform(0.45, 0.55)])
    look0 = np.array([rng.normal(0, 0.03), rng.uniform(0.2, 0.3), 0.0])
    moving = bool(rng.random() < cfg.moving_camera_prob)
    ramp = u[:, None] if moving else np.zeros((T, 1))
    eye = eye0 + ramp * rng.normal(0, 0.03, 3)
    look = look0 + ramp * rng.normal(0, 0.04, 3)
    roll = rng.normal(0, 0.03) + ramp[:, 0] * (rng.normal(0, 0.05) if moving else 0.0)
    R_cv = _look_at(eye, look, roll)

    templates = {
        "reach": ["reach for the {x}", "touch the {x}"],
        "pick": ["pick up the {x}", "grab the {x} and lift it"],
        "move": ["move the {x} {d}", "slide the {x} {d}"],
        "put": ["put the {x} on the {y}", "place the {x} onto the {y}"],
    }
    words = {"left": "to the left", "right": "to the right", "forward": "forward", "backward": "towards you"}
    task = str(rng.choice(templates[task_type])).format(
        x=tobj.name,
        y=objs[dest].name if dest is not None else "",
        d=words[direction] if task_type == "move" else "",
    )
    meta = {
        "task_type": task_type,
        "target": tobj.name,
        "destination": objs[dest].name if dest is not None else None,
        "active_hand": side,
        "grasp_pose": pose_name,
        "grasp_time": None if close_u is None else float(close_u * (T - 1) / cfg.fps),
        "move_direction": direction if task_type == "move" else None,  # world axes: left = −x, forward = +y
        "camera_moving": moving,
        # joints lie on capsule axes: the skin the depth sees is this far in front of them
        "hand_capsule_radius_m": {k: v * hand_size for k, v in _RADIUS.items()},
    }
    return _Plan(objs, obj_pos, hands, hand_size, R_cv, eye, float(rng.uniform(*cfg.fovy_deg)), task, meta)


# --- MuJoCo template scene -------------------------------------------------------------------------


def _import_mujoco():
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before the import
    return require("mujoco", "sim")  # and a GL backend for rendering, e.g. EGL


def _template_xml(h: int, w: int) -> str:
    bodies = []
    for i in range(MAX_OBJECTS):
        bodies.append(
            f'<body name="obj{i}" mocap="true" pos="0 0 -5"><geom name="obj{i}_main" type="box" size=".01 .01 .01"/>'
            f'<geom name="obj{i}_aux" type="capsule" size=".01 .01"/></body>'
        )
    for side in ("left", "right"):
        for b in range(_NUM_CAPSULES):
            bodies.append(
                f'<body name="{side}{b}" mocap="true" pos="0 0 -5">'
                f'<geom name="{side}{b}" type="capsule" size=".01 .01" rgba="0.87 0.67 0.55 1"/></body>'
            )
    return f"""<mujoco model="hand3d_synth">
  <statistic extent="1" center="0 0 0"/>
  <visual><global offwidth="{w}" offheight="{h}"/><quality shadowsize="1024"/>
    <map znear="0.01" zfar="20"/><headlight ambient="0.35 0.35 0.35" diffuse="0.5 0.5 0.5"/></visual>
  <worldbody>
    <light directional="true" pos="0 0 2" dir="0.2 0.3 -1" diffuse="0.5 0.5 0.5" castshadow="false"/>
    <geom name="table" type="box" pos="0 0.2 -0.02" size="0.7 0.5 0.02" rgba="0.62 0.5 0.38 1"/>
    <body name="camera_rig" mocap="true" pos="0 -0.3 0.5"><camera name="cam" fovy="65"/></body>
    {"".join(bodies)}
  </worldbody>
</mujoco>"""


class _Scene:
    """One template model + data + renderer per image size per process (see the module docstring)."""

    def __init__(self, h: int, w: int) -> None:
        mj = self.mj = _import_mujoco()
        self.model = mj.MjModel.from_xml_string(_template_xml(h, w))
        self.data = mj.MjData(self.model)
        try:
            self.renderer = mj.Renderer(self.model, height=h, width=w)
        except mj.FatalError as e:
            # MuJoCo picks its GL backend once, at import: importing it before MUJOCO_GL was set
            # (e.g. `import mujoco` in user code ahead of this module) leaves it with none.
            raise RuntimeError(
                f"MuJoCo could not create an offscreen GL context ({e}). Set MUJOCO_GL=egl (or osmesa) "
                "in the environment before anything imports mujoco."
            ) from e
        self.option = mj.MjvOption()
        self.option.geomgroup[_HIDDEN_GROUP] = 0
        gid = lambda n: mj.mj_name2id(self.model, mj.mjtObj.mjOBJ_GEOM, n)  # noqa: E731
        bid = lambda n: mj.mj_name2id(self.model, mj.mjtObj.mjOBJ_BODY, n)  # noqa: E731
        self.obj_geoms = np.array([[gid(f"obj{i}_main"), gid(f"obj{i}_aux")] for i in range(MAX_OBJECTS)])
        self.hand_geoms = {
            s: np.array([gid(f"{s}{b}") for b in range(_NUM_CAPSULES)]) for s in ("left", "right")
        }
        self.obj_mocap = np.array([self.model.body_mocapid[bid(f"obj{i}")] for i in range(MAX_OBJECTS)])
        self.hand_mocap = {
            s: np.array([self.model.body_mocapid[bid(f"{s}{b}")] for b in range(_NUM_CAPSULES)])
            for s in ("left", "right")
        }
        self.cam_mocap = self.model.body_mocapid[bid("camera_rig")]
        self.cam_id = mj.mj_name2id(self.model, mj.mjtObj.mjOBJ_CAMERA, "cam")

    def configure(self, plan: _Plan) -> np.ndarray:
        """Rewrites geoms for the plan's objects and hands; returns the geom id → segment id table."""
        m = self.model
        lut = np.zeros(m.ngeom + 1, dtype=np.uint8)  # last entry: background (id −1)
        m.geom_group[self.obj_geoms.ravel()] = _HIDDEN_GROUP
        for s in ("left", "right"):
            m.geom_group[self.hand_geoms[s]] = _HIDDEN_GROUP
        for i, o in enumerate(plan.objects):
            main, aux = self.obj_geoms[i]
            kind, _, aux_kind, _ = _SHAPES[o.shape]
            m.geom_type[main] = _GEOM_TYPE[kind]
            m.geom_size[main, : len(o.half)] = o.half
            m.geom_rgba[main] = (*_COLOURS[o.colour], 1.0)
            m.geom_group[main] = 0
            m.geom_rbound[main] = 1.0  # culling bound; generous since sizes change per clip
            lut[[main, aux]] = i + 1
            if aux_kind is not None:
                if aux_kind == "handle":  # a vertical bar beside the mug
                    m.geom_type[aux] = _GEOM_TYPE["capsule"]
                    m.geom_size[aux, :2] = (0.25 * o.half[0], 0.55 * o.half[1])
                    m.geom_pos[aux] = (0.0, -1.2 * o.half[0], 0.0)
                else:  # bottle neck
                    m.geom_type[aux] = _GEOM_TYPE["cylinder"]
                    m.geom_size[aux, :2] = (0.4 * o.half[0], 0.25 * o.half[1])
                    m.geom_pos[aux] = (0.0, 0.0, 1.25 * o.half[1])
                m.geom_rgba[aux] = (*_COLOURS[o.colour], 1.0)
                m.geom_group[aux] = 0
                m.geom_rbound[aux] = 1.0
        for side, joints in plan.hands.items():
            g = self.hand_geoms[side]
            a, b = _capsules(joints[0], plan.hand_size, side)
            lengths = np.linalg.norm(b - a, axis=-1)
            radius = np.where(np.arange(_NUM_CAPSULES) < 20, _RADIUS["finger"], _RADIUS["palm"])
            radius[[0, 4, 8, 12, 16]] = _RADIUS["palm"]  # wrist → finger-base links are thicker
            radius[-1] = _RADIUS["forearm"]
            radius = radius * plan.hand_size
            m.geom_size[g, 0] = radius
            m.geom_size[g, 1] = np.maximum(lengths / 2, 1e-4)
            m.geom_group[g] = 0
            m.geom_rbound[g] = 1.0
            lut[g] = HAND_SEGMENT[side]
        m.cam_fovy[self.cam_id] = plan.fovy
        return lut

    def pose(self, plan: _Plan, k: int) -> None:
        """Places every mocap body for frame k and runs kinematics."""
        mj, d = self.mj, self.data
        d.mocap_pos[:] = (0.0, 0.0, -5.0)
        n = len(plan.objects)
        d.mocap_pos[self.obj_mocap[:n]] = plan.obj_pos[k]
        d.mocap_quat[self.obj_mocap] = (1.0, 0.0, 0.0, 0.0)
        for side, joints in plan.hands.items():
            a, b = _capsules(joints[k], plan.hand_size, side)
            ids = self.hand_mocap[side]
            d.mocap_pos[ids] = (a + b) / 2
            d.mocap_quat[ids] = _quat_z_to(b - a)
        # MuJoCo camera axes in the world: x = x_cv, y = −y_cv, z = −z_cv.
        rot_mj = (np.diag([1.0, -1.0, -1.0]) @ plan.cam_R_cv[k]).T
        q = np.zeros(4)
        mj.mju_mat2Quat(q, rot_mj.ravel())
        d.mocap_pos[self.cam_mocap] = plan.cam_eye[k]
        d.mocap_quat[self.cam_mocap] = q
        mj.mj_kinematics(self.model, d)
        mj.mj_camlight(self.model, d)

    def camera(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Current K, R, t (OpenCV) read back from the simulator."""
        h, w = self.renderer.height, self.renderer.width
        fy = (h / 2) / np.tan(np.deg2rad(self.model.cam_fovy[self.cam_id]) / 2)
        K = np.array([[fy, 0.0, (w - 1) / 2], [0.0, fy, (h - 1) / 2], [0.0, 0.0, 1.0]])
        xmat = self.data.cam_xmat[self.cam_id].reshape(3, 3)
        R = np.diag([1.0, -1.0, -1.0]) @ xmat.T
        t = -R @ self.data.cam_xpos[self.cam_id]
        return K, R, t


def _quat_z_to(v: np.ndarray) -> np.ndarray:
    """(N, 4) unit quaternions (w, x, y, z) rotating +z onto the directions v (N, 3)."""
    d = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    q = np.stack([1.0 + d[:, 2], -d[:, 1], d[:, 0], np.zeros(len(d))], axis=-1)
    flip = q[:, 0] < 1e-9  # v ≈ −z: any half-turn about a horizontal axis
    q[flip] = (0.0, 1.0, 0.0, 0.0)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


_SCENES: dict[tuple[int, int], _Scene] = {}


def _scene(h: int, w: int) -> _Scene:
    if (h, w) not in _SCENES:
        _SCENES[(h, w)] = _Scene(h, w)
    return _SCENES[(h, w)]


_RENDERED = {  # what a clip's rendering produces (and the render cache stores): name -> dtype
    "frames": np.uint8,
    "depth": np.float32,
    "segmentation": np.uint8,
    "K": np.float64,
    "R": np.float64,
    "t": np.float64,
}
RENDER_CACHE_VERSION = 1  # part of the cache key: bump when rendering changes what a clip's pixels are


def render_cache_path(cache_dir: str | os.PathLike, config: SynthConfig, seed: int, index: int) -> Path:
    """The render cache's file of clip (seed, index) under `config`: keyed by every SynthConfig field."""
    key = repr((RENDER_CACHE_VERSION, sorted(asdict(config).items())))
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"synth-{digest}" / f"synth-s{int(seed)}-{int(index):06d}.npz"


def _read_rendered(path: Path, config: SynthConfig) -> dict[str, np.ndarray] | None:
    """The cached arrays of a clip, or None when the file is missing or not what this config renders (a
    damaged or foreign file is a miss: the clip is rendered again and the file replaced)."""
    T, (h, w) = config.num_frames, config.image_size
    shapes = {"frames": (T, h, w, 3), "depth": (T, h, w), "segmentation": (T, h, w), "K": (T, 3, 3), "R": (T, 3, 3), "t": (T, 3)}  # fmt: skip
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _RENDERED}
    except (OSError, KeyError, ValueError, EOFError):
        return None
    ok = all(arrays[k].dtype == dt and arrays[k].shape == shapes[k] for k, dt in _RENDERED.items())
    return arrays if ok else None


def _write_rendered(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically (temporary file, then rename): concurrent build workers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _render(config: SynthConfig, plan: _Plan) -> dict[str, np.ndarray]:
    """MuJoCo's frames, metric depth (NaN: background), segmentation ids and camera of every frame."""
    h, w = config.image_size
    sc = _scene(h, w)
    lut = sc.configure(plan)
    T = config.num_frames
    frames = np.empty((T, h, w, 3), np.uint8)
    depth = np.empty((T, h, w), np.float32)
    seg = np.empty((T, h, w), np.uint8)
    K, R, t = np.empty((T, 3, 3)), np.empty((T, 3, 3)), np.empty((T, 3))
    r = sc.renderer
    for k in range(T):
        sc.pose(plan, k)
        K[k], R[k], t[k] = sc.camera()
        r.update_scene(sc.data, camera=sc.cam_id, scene_option=sc.option)
        r.render(out=frames[k])
        r.enable_depth_rendering()
        r.render(out=depth[k])
        r.disable_depth_rendering()
        r.enable_segmentation_rendering()
        ids = r.render()[..., 0]
        r.disable_segmentation_rendering()
        seg[k] = lut[ids]  # id −1 (background) indexes the table's last entry, which is 0
    depth[depth >= 0.99 * sc.model.vis.map.zfar * sc.model.stat.extent] = np.nan
    return {"frames": frames, "depth": depth, "segmentation": seg, "K": K, "R": R, "t": t}


def render_clip(
    config: SynthConfig, seed: int, index: int, cache_dir: str | os.PathLike | None = None
) -> Clip:
    """Samples and renders clip `index` of the stream `seed`; see the module docstring.

    cache_dir: a render cache: the rendered arrays are read from `render_cache_path` when there, else
    rendered and written there (the scene plan is always sampled again: it is cheap and exact)."""
    if index < 0:
        raise ValueError(f"index: expected ≥ 0, got {index}")
    rng = np.random.default_rng([int(seed), int(index)])
    plan = _plan_clip(config, rng)
    path = None if cache_dir is None else render_cache_path(cache_dir, config, seed, index)
    arrays = None if path is None else _read_rendered(path, config)
    if arrays is None:
        arrays = _render(config, plan)
        if path is not None:
            _write_rendered(path, arrays)
    frames, depth, seg = arrays["frames"], arrays["depth"], arrays["segmentation"]
    K, R, t = arrays["K"], arrays["R"], arrays["t"]
    h, w = config.image_size
    seg_ids = [i + 1 for i in range(len(plan.objects))]
    boxes = boxes_from_segmentation(seg, seg_ids)
    objects = [
        ObjectTrack(o.name, box2d=boxes[:, i], position3d=plan.obj_pos[:, i], segment_id=i + 1)
        for i, o in enumerate(plan.objects)
    ]
    hands = {s: HandTrack(s, joints3d=j) for s, j in plan.hands.items()}
    return Clip(
        clip_id=f"synth-s{seed}-{index:06d}",
        source="synth",
        fps=config.fps,
        K=K,
        R=R,
        t=t,
        image_hw=(h, w),
        hands=hands,
        objects=objects,
        task=plan.task,
        frames=frames,
        depth=depth,
        segmentation=seg,
        meta={**plan.meta, "seed": int(seed), "index": int(index)},
    )


class SynthSource:
    """`SourceAdapter` of procedural MuJoCo clips: ids `synth-s{seed}-{index:06d}`, index < num_clips."""

    name = "synth"

    def __init__(
        self,
        num_clips: int = 1000,
        seed: int = 0,
        config: SynthConfig | None = None,
        cache_dir: str | os.PathLike | None = None,
        **overrides,
    ) -> None:
        """cache_dir: a render cache (`render_clip`): later loads of the same clips (the main job renders the
        train clips again for its stand-ins and probe) read the pixels instead of rendering them."""
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        if num_clips < 0:
            raise ValueError(f"num_clips: expected ≥ 0, got {num_clips}")
        known = {f.name for f in fields(SynthConfig)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(
                f"SynthSource: unknown option(s) {sorted(unknown)}; SynthConfig has {sorted(known)}"
            )
        self.config = replace(config or SynthConfig(), **overrides)
        self.num_clips, self.seed = int(num_clips), int(seed)

    def clip_ids(self) -> list[str]:
        return [f"synth-s{self.seed}-{i:06d}" for i in range(self.num_clips)]

    def load_clip(self, clip_id: str) -> Clip:
        prefix = f"synth-s{self.seed}-"
        if not clip_id.startswith(prefix) or not clip_id[len(prefix) :].isdigit():
            raise ValueError(f"clip_id: expected '{prefix}<index>', got {clip_id!r}")
        index = int(clip_id[len(prefix) :])
        if index >= self.num_clips:
            raise ValueError(f"clip_id: index {index} ≥ num_clips {self.num_clips}")
        return render_clip(self.config, self.seed, index, self.cache_dir)
