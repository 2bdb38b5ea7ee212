"""Hand3D-visual: question-answer pairs in four categories from an annotated clip (paper §3.2.1,
"Instructional data curation"; Table 1).

    >>> import numpy as np
    >>> from hand3d_dataset.samples_visual import VISUAL_TASK_TYPES, VisualSampleConfig, build_visual_samples
    >>> # `ann` is a `pipeline.ClipAnnotation` (see `pipeline.annotate_clip`)
    >>> # samples = build_visual_samples(ann, VisualSampleConfig(), np.random.default_rng(0))
    >>> sorted(VISUAL_TASK_TYPES)
    ['camera_movement', 'hand_movement', 'spatial_relationship', 'task_completion']

Categories (each sample keeps its structured ground truth beside the text, DESIGN.md §2):

- `spatial_relationship`: 1–4 consecutive frames; the hand ↔ object offset in the LAST frame's camera
  frame (direction labels, distance, contact). Half the templates ask where the object is relative to
  the hand (``v = object − hand``), the other half the reverse (``v = hand − object``); `relation` in
  the target says which.
- `task_completion`: the clip's task text plus 1–4 frames; how the hand should move in 3D to reach the
  task's target object (``v = object − hand`` in the last frame).
- `hand_movement`: two frames i < j; the hand's displacement ``R_i (h_j − h_i)`` (world → camera of
  frame i) and its path (the trajectory of the hand over frames i..j in camera i).
- `camera_movement`: two frames i < j; the rotation of camera j relative to camera i as axis-angle
  words and degrees (`language.relative_camera_motion`).

"The hand" is the palm centre: the mean of the wrist and the four finger bases (MCP joints 5, 9, 13,
17 in OpenPose order). It is steadier than any single joint under finger articulation; for a wrist-only
track it is the wrist. Objects are the pipeline's calibrated object positions (by default each object's estimated centre;
`--object-position surface`: the visible-surface centre).

Answers never name the hand's side or repeat the task text: the Hand3D-test parser
(`metrics.parse_answer`) reads "right"/"left"/"lift"... as directions anywhere in an answer, so answers
hold only the direction words of the label set, one length and (camera) one angle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hand3d_dataset.language import AXES, describe_displacement, relative_camera_motion
from hand3d_dataset.records import Sample, empty_target  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # pipeline imports this module; the annotation type is only needed for hints
    from hand3d_dataset.records import ClipAnnotation

__all__ = [
    "VISUAL_TASK_TYPES",
    "PALM_JOINTS",
    "VisualSampleConfig",
    "Sample",
    "empty_target",
    "hand_position",
    "build_visual_samples",
    "spatial_relationship_samples",
    "task_completion_samples",
    "hand_movement_samples",
    "camera_movement_samples",
]

VISUAL_TASK_TYPES = ("spatial_relationship", "task_completion", "hand_movement", "camera_movement")
PALM_JOINTS = (0, 5, 9, 13, 17)  # wrist + finger bases: the palm centre is their mean

# ---- templates -------------------------------------------------------------------------------------
# Placeholders: {object} object name, {hand} "right hand"/"left hand", {task} task text, {n} frames.
SPATIAL_QUESTIONS: tuple[tuple[str, str], ...] = (  # (template, relation)
    ("Where is the {object} relative to the {hand} in the last frame?", "object_from_hand"),
    (
        "In the final frame, in which direction and how far is the {object} from the {hand}?",
        "object_from_hand",
    ),
    (
        "Looking at the last image, describe the 3D position of the {object} with respect to the {hand}.",
        "object_from_hand",
    ),
    (
        "From the viewpoint of the camera, where does the {object} lie relative to the {hand} at the end of this sequence?",
        "object_from_hand",
    ),
    (
        "How far is the {object} from the {hand} in the last frame, in which direction, and are they in contact?",
        "object_from_hand",
    ),
    (
        "Give the direction and distance from the {hand} to the {object} in the most recent frame.",
        "object_from_hand",
    ),
    ("Where is the {hand} relative to the {object} in the last frame?", "hand_from_object"),
    (
        "In the final image, describe where the {hand} is with respect to the {object} in 3D.",
        "hand_from_object",
    ),
    (
        "What is the spatial relationship between the {hand} and the {object} at the end of the clip?",
        "hand_from_object",
    ),
    (
        "Relative to the {object}, in which direction and how far away is the {hand} in the last frame?",
        "hand_from_object",
    ),
    (
        "Is the {hand} touching the {object} in the last frame, and where is it relative to the object?",
        "hand_from_object",
    ),
    ("Estimate the 3D offset of the {hand} from the {object} in the latest frame.", "hand_from_object"),
)
# {subject}/{reference}: "mug"/"hand" names; {direction} label words; {distance} "0.23 m"; {contact} sentence.
SPATIAL_ANSWERS: tuple[str, ...] = (
    "The {subject} is {direction} relative to the {reference}, about {distance} away. {contact}",
    "Relative to the {reference}, the {subject} lies {direction}, at a distance of {distance}. {contact}",
    "{canonical}. {contact}",
    "It is {direction}, roughly {distance} from the {reference}. {contact}",
    "Seen from the camera, the {subject} sits {direction} of the {reference}; the gap is {distance}. {contact}",
    "Direction: {direction}. Distance: {distance}. {contact}",
)
SPATIAL_SAME_PLACE = (
    "The {subject} and the {reference} are at essentially the same place (no significant displacement), "
    "{distance} apart. {contact}"
)
CONTACT_YES = (
    "The hand is touching the {object}.",
    "They are in contact.",
    "The hand is in contact with it.",
)
CONTACT_NO = (
    "The hand is not touching the {object}.",
    "They are not in contact.",
    "There is no contact yet.",
)

TASK_QUESTIONS: tuple[str, ...] = (
    "The task is: {task}. How should the {hand} move in 3D to reach the {object}?",
    "Task: {task}. Describe the 3D motion the {hand} needs to make to get to the {object}.",
    "To {task}, in which direction and how far must the {hand} travel to reach the {object}?",
    "Instruction: {task}. From the current frame, how should the {hand} move toward the {object}?",
    "The person wants to {task}. Where should the {hand} go to reach the {object}, and how far?",
    "Given the goal '{task}', what 3D movement brings the {hand} to the {object}?",
    "We need to {task}. Tell me the direction and distance the {hand} should move to reach the {object}.",
    "For the task '{task}', plan the {hand}'s motion in 3D to the {object}.",
    "How does the {hand} have to move in space to reach the {object}? The task is: {task}.",
    "Goal: {task}. What direction and distance separate the {hand} from the {object} it must reach?",
    "In order to {task}, describe how the {hand} should move to make contact with the {object}.",
)
TASK_ANSWERS: tuple[str, ...] = (
    "Move the hand {direction}, about {distance}, to reach the {object}.",
    "The hand should travel {direction} for roughly {distance} to get to the {object}.",
    "{canonical}: that is how the hand must move to reach the {object}.",
    "To reach the {object}, the hand needs to go {direction}, covering about {distance}.",
    "Head {direction}; the {object} is {distance} away from the hand.",
    "Direction: {direction}. Distance: {distance}.",
)
TASK_ALREADY_THERE = "The hand is already at the {object} (no significant movement needed, {distance})."

HAND_QUESTIONS: tuple[str, ...] = (
    "How did the {hand} move between these two frames?",
    "Describe the 3D movement of the {hand} from the first image to the second.",
    "Between the first and the second frame, in which direction and how far did the {hand} travel?",
    "What is the 3D displacement of the {hand} from frame one to frame two?",
    "Compare the two frames: how has the {hand} moved in space?",
    "From the first frame to the second, where did the {hand} go, and how far?",
    "Estimate the direction and distance of the {hand}'s motion across these two frames.",
    "The two images are taken a moment apart. How did the {hand} move in 3D?",
    "Track the {hand}: what was its movement between the two frames?",
    "Relative to the camera of the first frame, how did the {hand} move by the second frame?",
    "Give the direction and length of the {hand}'s movement between the two images.",
)
HAND_ANSWERS: tuple[str, ...] = (
    "The hand moved {direction}, {distance} in total.",
    "It travelled {direction}, covering about {distance}.",
    "{canonical}.",
    "Between the two frames the hand went {direction} by roughly {distance}.",
    "Direction: {direction}. Distance: {distance}.",
    "The hand's displacement is {direction}, with a length of {distance}.",
)
HAND_STILL = "The hand shows no significant movement ({distance})."

CAMERA_QUESTIONS: tuple[str, ...] = (
    "How did the camera rotate between these two frames?",
    "Describe the rotation of the camera from the first image to the second.",
    "Between the two frames, which way did the camera turn, and by how many degrees?",
    "What is the camera's change in orientation from frame one to frame two?",
    "Compare the two views: how has the camera rotated?",
    "Estimate the rotation direction and angle of the camera across these frames.",
    "The viewpoint changes between the two images. What rotation did the camera make?",
    "By how much and in which direction did the camera rotate from the first to the second frame?",
    "Give the axis-angle rotation of the camera between these two images in words.",
    "How did the camera's viewing direction change between the two frames?",
    "From the first frame to the second, what was the camera's rotation?",
)
CAMERA_ANSWERS: tuple[str, ...] = (
    "The camera {motion} by {angle}.",
    "It {motion}, {angle} in total.",
    "{canonical}.",
    "Between the two frames the camera {motion} by about {angle}.",
    "Rotation: the camera {motion}; angle: {angle}.",
    "The view {motion} by roughly {angle}.",
)
CAMERA_STILL = "The camera did not rotate significantly ({angle})."
# rotation words (language.ROTATION_LABELS) in the past tense, as the metrics parser reads them
_PAST = {"turn": "turned", "tilt": "tilted", "roll": "rolled"}


@dataclass(frozen=True)
class VisualSampleConfig:
    """Knobs of the Hand3D-visual builders; defaults give a few samples of each category per clip."""

    gamma: float = 0.3  # direction threshold on the unit vector (DESIGN.md §2)
    min_distance_m: float = 0.01  # displacements shorter than this read as "no significant movement"
    contact_threshold_m: float = 0.05  # contact: a hand joint within this of the object's surface centre
    max_context_frames: int = 4  # spatial/task samples show 1..this many consecutive frames
    min_camera_angle_deg: float = 1.0  # smaller rotations read as "no significant rotation"
    spatial_per_clip: int = 4  # at most this many samples per category and clip
    task_per_clip: int = 2  # ...
    hand_movement_per_clip: int = 2  # ...
    camera_movement_per_clip: int = 1  # ...

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"gamma: expected a value in (0, 1), got {self.gamma}")
        for name in ("min_distance_m", "contact_threshold_m", "min_camera_angle_deg"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: expected a finite value >= 0, got {v}")
        if not 1 <= self.max_context_frames <= 4:
            raise ValueError(
                f"max_context_frames: expected 1..4 (paper §3.2.1), got {self.max_context_frames}"
            )
        for name in (
            "spatial_per_clip",
            "task_per_clip",
            "hand_movement_per_clip",
            "camera_movement_per_clip",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")


def hand_position(joints_or_wrist: np.ndarray) -> np.ndarray:
    """Palm centre: joints (..., 21, 3) → (..., 3) mean of `PALM_JOINTS`; a wrist (..., 3) passes through."""
    a = np.asarray(joints_or_wrist, dtype=np.float64)
    if a.ndim >= 2 and a.shape[-2:] == (21, 3):
        return a[..., PALM_JOINTS, :].mean(axis=-2)
    if a.shape[-1] != 3:
        raise ValueError(f"joints_or_wrist: expected (..., 21, 3) or (..., 3), got {a.shape}")
    return a


def _label_words(labels: dict) -> str:
    return " and ".join(labels[ax] for ax in AXES if labels[ax] is not None)


def _displacement_fields(v: np.ndarray, cfg: VisualSampleConfig) -> tuple[dict, dict]:
    """(template fields, target fields) of a displacement v (3,)."""
    d = describe_displacement(v, gamma=cfg.gamma, min_distance_m=cfg.min_distance_m)
    words = _label_words(d.labels)
    dist = f"{d.distance_m:.2f} m"
    fields = {"direction": words, "distance": dist, "canonical": d.text[:1].upper() + d.text[1:]}
    target = {
        "labels": dict(d.labels),
        "distance_m": round(float(d.distance_m), 6),
        "vector_m": [round(float(x), 6) for x in v],
        "text": d.text,
    }
    return fields, target


def _hand_points(ann: ClipAnnotation, side: str) -> np.ndarray:
    """(T, 3) palm centre of `side` in each frame's camera frame (NaN where the hand is not tracked)."""
    hand = ann.clip.hands[side]
    pts = ann.clip.joints_cam(side) if hand.joints3d is not None else ann.clip.wrist_cam(side)
    return hand_position(pts)


def _hand_world(ann: ClipAnnotation, side: str) -> np.ndarray:
    hand = ann.clip.hands[side]
    return hand_position(hand.joints3d if hand.joints3d is not None else hand.wrist3d)


def _pick(rng: np.random.Generator, options: list, k: int) -> list:
    """Up to k distinct options in a seeded random order."""
    if k <= 0 or not options:
        return []
    idx = rng.permutation(len(options))[:k]
    return [options[i] for i in sorted(idx)]


def _context(rng: np.random.Generator, ann: ClipAnnotation, last: int, cfg: VisualSampleConfig) -> list[int]:
    """1..max_context_frames consecutive usable frames ending at `last`."""
    n = int(rng.integers(1, cfg.max_context_frames + 1))
    frames = [last]
    while len(frames) < n and frames[0] - 1 >= 0 and ann.frame_ok[frames[0] - 1]:
        frames.insert(0, frames[0] - 1)
    return frames


def _hand_name(side: str) -> str:
    return f"{side} hand"


def spatial_relationship_samples(
    ann: ClipAnnotation, cfg: VisualSampleConfig, rng: np.random.Generator
) -> list[Sample]:
    """Hand ↔ object in the last of 1–4 consecutive frames: direction, distance, contact."""
    cands = []
    for side in sorted(ann.hand_visible):
        palm = _hand_points(ann, side)
        for f in np.flatnonzero(ann.frame_ok & ann.hand_visible[side]):
            for o, name in enumerate(ann.object_names):
                if np.isfinite(ann.objects_cam[f, o]).all():
                    cands.append((side, int(f), o, name, palm))
    out = []
    for side, f, o, name, palm in _pick(rng, cands, cfg.spatial_per_clip):
        q_tpl, relation = SPATIAL_QUESTIONS[rng.integers(len(SPATIAL_QUESTIONS))]
        obj = ann.objects_cam[f, o]
        v = obj - palm[f] if relation == "object_from_hand" else palm[f] - obj
        fields, target = _displacement_fields(v, cfg)
        joints = ann.clip.joints_cam(side)[f] if ann.clip.hands[side].joints3d is not None else palm[f][None]
        contact = bool(np.linalg.norm(joints - obj, axis=-1).min() < cfg.contact_threshold_m)
        subject, reference = ("{0}", "hand") if relation == "object_from_hand" else ("hand", "{0}")
        cpool = CONTACT_YES if contact else CONTACT_NO
        fields.update(
            subject=subject.format(name),
            reference=reference.format(name),
            contact=cpool[rng.integers(len(cpool))].format(object=name),
        )
        if fields["direction"]:
            answer = SPATIAL_ANSWERS[rng.integers(len(SPATIAL_ANSWERS))].format(**fields)
        else:
            answer = SPATIAL_SAME_PLACE.format(**fields)
        frames = _context(rng, ann, f, cfg)
        target.update(contact=contact, object=name, hand=side, relation=relation, frame_indices=frames)
        question = q_tpl.format(object=name, hand=_hand_name(side))
        out.append(Sample("spatial_relationship", frames, question, answer, {**empty_target(), **target}))
    return out


def task_completion_samples(
    ann: ClipAnnotation, cfg: VisualSampleConfig, rng: np.random.Generator
) -> list[Sample]:
    """How the hand should move in 3D (``object − hand``, last shown frame) to reach the task's object."""
    if ann.target_object is None or not ann.clip.task:
        return []
    o = ann.object_names.index(ann.target_object)
    cands = []
    for side in sorted(ann.hand_visible):
        ok = ann.frame_ok & ann.hand_visible[side] & np.isfinite(ann.objects_cam[:, o]).all(axis=1)
        cands += [(side, int(f)) for f in np.flatnonzero(ok)]
    out = []
    task = ann.clip.task.strip().rstrip(".")
    for side, f in _pick(rng, cands, cfg.task_per_clip):
        v = ann.objects_cam[f, o] - _hand_points(ann, side)[f]
        fields, target = _displacement_fields(v, cfg)
        fields["object"] = ann.target_object
        if fields["direction"]:
            answer = TASK_ANSWERS[rng.integers(len(TASK_ANSWERS))].format(**fields)
        else:
            answer = TASK_ALREADY_THERE.format(**fields)
        frames = _context(rng, ann, f, cfg)
        q = TASK_QUESTIONS[rng.integers(len(TASK_QUESTIONS))]
        question = q.format(task=task, hand=_hand_name(side), object=ann.target_object)
        target.update(object=ann.target_object, hand=side, relation="object_from_hand", frame_indices=frames)
        out.append(Sample("task_completion", frames, question, answer, {**empty_target(), **target}))
    return out


def hand_movement_samples(
    ann: ClipAnnotation, cfg: VisualSampleConfig, rng: np.random.Generator
) -> list[Sample]:
    """The hand's displacement between two frames i < j, in camera i: ``R_i (h_j − h_i)``."""
    cands = []
    for side in sorted(ann.hand_visible):
        ok = np.flatnonzero(ann.frame_ok & ann.hand_visible[side])
        cands += [(side, int(i), int(j)) for a, i in enumerate(ok) for j in ok[a + 1 :]]
    out = []
    R, t = ann.clip.R, ann.clip.t
    for side, i, j in _pick(rng, cands, cfg.hand_movement_per_clip):
        hw = _hand_world(ann, side)
        path = hw[i : j + 1] @ R[i].T + t[i]  # (j - i + 1, 3) palm path in camera i
        if not np.isfinite(path).all():
            continue  # the hand was lost in between: no trustworthy path
        v = path[-1] - path[0]
        fields, target = _displacement_fields(v, cfg)
        if fields["direction"]:
            answer = HAND_ANSWERS[rng.integers(len(HAND_ANSWERS))].format(**fields)
        else:
            answer = HAND_STILL.format(**fields)
        question = HAND_QUESTIONS[rng.integers(len(HAND_QUESTIONS))].format(hand=_hand_name(side))
        target.update(
            hand=side,
            relation="hand_motion",
            frame_indices=[i, j],
            trajectory=[[round(float(x), 6) for x in p] for p in path],
        )
        out.append(Sample("hand_movement", [i, j], question, answer, {**empty_target(), **target}))
    return out


def camera_movement_samples(
    ann: ClipAnnotation, cfg: VisualSampleConfig, rng: np.random.Generator
) -> list[Sample]:
    """Rotation of camera j relative to camera i (i < j) as axis-angle words and degrees."""
    ok = np.flatnonzero(ann.frame_ok)
    cands = [(int(i), int(j)) for a, i in enumerate(ok) for j in ok[a + 1 :]]
    out = []
    R, t = ann.clip.R, ann.clip.t
    for i, j in _pick(rng, cands, cfg.camera_movement_per_clip):
        m = relative_camera_motion(
            R[i], t[i], R[j], t[j], gamma=cfg.gamma, min_angle_deg=cfg.min_camera_angle_deg
        )
        angle = f"{m.angle_deg:.1f} degrees"
        if m.rotation_label is None:
            answer = CAMERA_STILL.format(angle=angle)
        else:
            verb, word = m.rotation_label.split(" ", 1)
            fields = {
                "motion": f"{_PAST[verb]} {word}",
                "angle": angle,
                "canonical": m.text[:1].upper() + m.text[1:],
            }
            answer = CAMERA_ANSWERS[rng.integers(len(CAMERA_ANSWERS))].format(**fields)
        question = CAMERA_QUESTIONS[rng.integers(len(CAMERA_QUESTIONS))]
        target = {
            "rotation": m.rotation_label,
            "angle_deg": round(float(m.angle_deg), 6),
            "rotvec_deg": [round(float(x), 6) for x in m.rotvec_deg],
            "relation": "camera_motion",
            "frame_indices": [i, j],
            "text": m.text,
        }
        out.append(Sample("camera_movement", [i, j], question, answer, {**empty_target(), **target}))
    return out


def build_visual_samples(
    ann: ClipAnnotation, cfg: VisualSampleConfig, rng: np.random.Generator
) -> list[Sample]:
    """All four categories for one annotated clip; empty for clips without images."""
    if not ann.clip.has_frames:
        return []
    return [
        *spatial_relationship_samples(ann, cfg, rng),
        *task_completion_samples(ann, cfg, rng),
        *hand_movement_samples(ann, cfg, rng),
        *camera_movement_samples(ann, cfg, rng),
    ]
