"""The records the Hand3D pipeline and the sample builders exchange, and the dataset's row schemas.

    >>> from hand3d_dataset.records import Sample, empty_target
    >>> s = Sample("spatial_relationship", [0], "Where is the mug?", "left, 0.30 m", empty_target())
    >>> import pickle; pickle.loads(pickle.dumps(s)).question
    'Where is the mug?'

`pipeline.annotate_clip` makes a `ClipAnnotation`; `samples_visual` / `samples_action` turn it into
`Sample`s; `pipeline.process_clip` turns those into rows (`VISUAL_FEATURES` / `ACTION_FEATURES`) inside a
`ClipResult`. Everything here is plain data that pickles (the distributed build moves it between processes),
and this module imports none of the modules that exchange it, so none of them import each other for it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from datasets import Features, Image, List, Value

from hand3d_dataset.clip import Clip

__all__ = [
    "TARGET_FEATURES",
    "VISUAL_FEATURES",
    "ACTION_FEATURES",
    "ClipAnnotation",
    "ClipResult",
    "Sample",
    "empty_target",
]

# One struct schema for every row's target (samples_visual.empty_target), so all shards concatenate.
TARGET_FEATURES = {
    "labels": {"x": Value("string"), "y": Value("string"), "z": Value("string")},
    "distance_m": Value("float64"),
    "vector_m": List(Value("float64")),
    "contact": Value("bool"),
    "rotation": Value("string"),
    "angle_deg": Value("float64"),
    "rotvec_deg": List(Value("float64")),
    "object": Value("string"),
    "hand": Value("string"),
    "relation": Value("string"),
    "frame_indices": List(Value("int32")),
    "trajectory": List(List(Value("float64"))),
    "text": Value("string"),
}
# DESIGN.md §3 columns; `messages` is TRL's conversational format (image entries carry text=None).
VISUAL_FEATURES = Features(
    {
        "id": Value("string"),
        "source": Value("string"),
        "clip_id": Value("string"),
        "task_type": Value("string"),
        "images": List(Image()),
        "messages": List(
            {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
        ),
        "target": TARGET_FEATURES,
        # (3, 3) intrinsics of the last image, pixels of the stored image: projects `target` and
        # `trajectory` (camera frame of that image) onto it, e.g. for the paper's Figure 9.
        "K": List(List(Value("float64"))),
    }
)
ACTION_FEATURES = Features(
    {
        **VISUAL_FEATURES,
        "trajectory": List(List(Value("float64"))),  # (T, 3) wrist xyz, camera frame of the shown frame
        "motion_ids": List(Value("int32")),  # (3T,) motion-token bin ids, x y z per waypoint
    }
)


@dataclass
class ClipAnnotation:
    """What the sample builders read: the clip plus the pipeline's 3D annotations (T frames, O objects)."""

    clip: Clip  # the source clip (cameras, hands in world, task, frames)
    frame_ok: np.ndarray  # (T,) bool: the frame has a usable image and a calibrated cloud
    hand_visible: dict[str, np.ndarray]  # side → (T,) bool: tracked and in view (visibility filter)
    object_names: list[str]  # O names, in clip.objects order
    objects_cam: np.ndarray  # (T, O, 3) object positions (localization.estimate), camera frame, m; NaN = none
    scale: float | None  # the clip's calibrated scale (None for trajectory-only clips)
    target_object: str | None  # the object the task acts on (task_completion), None when unknown


@dataclass
class ClipResult:
    """Outcome of `process_clip`: dataset rows, or the reason there are none, plus statistics."""

    clip_id: str  # Clip.clip_id, or the requested id when loading failed
    source: str  # source name
    rows_visual: list[dict] = field(default_factory=list)  # Hand3D-visual rows (sample_to_row)
    rows_action: list[dict] = field(default_factory=list)  # Hand3D-action rows
    skipped: str | None = None  # why the clip gave no rows; None when it was annotated
    notes: list[str] = field(default_factory=list)  # frame/object-level drops, one reason each
    scale: float | None = None  # calibrated scale
    scale_num_valid: int = 0  # |Ω| of the scale calibration
    true_scale: float | None = None  # the estimator's known scale when it has one (ground-truth depth)
    waypoints: int = 0  # motion waypoints tokenized (per axis)
    clipped: int = 0  # waypoint coordinates clipped by the motion tokenizer (all axes)
    action_stats: Counter = field(default_factory=Counter)  # filtered_insignificant / filtered_short


@dataclass
class Sample:
    """One generated sample before it becomes a dataset row (`pipeline.sample_to_row`).

    frame_indices: clip frames shown, in order (one {"type": "image"} per entry); empty for text-only.
    target: the structured ground truth (`empty_target()` keys, one schema for every row).
    trajectory / motion_ids: Hand3D-action only: (T, 3) wrist xyz and (3T,) motion-token bin ids.
    """

    task_type: str  # one of VISUAL_TASK_TYPES or samples_action.ACTION_TASK_TYPES
    frame_indices: list[int]  # clip frame indices of the images, in order
    question: str  # user text (after the image entries)
    answer: str  # assistant text
    target: dict  # structured ground truth, see empty_target
    trajectory: np.ndarray | None = None  # (T, 3) camera frame of the shown frame, metres (action)
    motion_ids: np.ndarray | None = None  # (3T,) int64 motion-token bin ids (action)
    clipped: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.int64))  # (3,) per-axis clips


def empty_target() -> dict:
    """The target schema every row shares (parquet shards concatenate only with one schema).

    Keys not used by a category stay None (`metrics.score_answer` treats None as absent) or empty.
    """
    return {
        "labels": {"x": None, "y": None, "z": None},  # direction label per axis (language.AXIS_LABELS)
        "distance_m": None,  # |v|, metres
        "vector_m": [],  # v (3,), camera frame of the reference frame, metres
        "contact": None,  # spatial_relationship: hand touches the object
        "rotation": None,  # camera_movement: rotation words (language.ROTATION_LABELS) or None
        "angle_deg": None,  # camera_movement: total rotation angle, degrees
        "rotvec_deg": [],  # camera_movement: axis-angle vector (3,), degrees, camera i frame
        "object": None,  # object name the sample is about
        "hand": None,  # "left"/"right"
        "relation": None,  # what v is: object_from_hand, hand_from_object, hand_motion, wrist_motion, ...
        "frame_indices": [],  # clip frames the sample refers to (shown images, or past/future for action)
        "trajectory": [],  # (T, 3) list of [x, y, z], metres, camera frame of the first listed frame
        "text": "",  # canonical answer text (language.format_displacement / format_rotation)
    }
