"""Hand3D-action: motion-token samples from an annotated clip (paper §3.2.1, "3D action annotations";
Table 2).

    >>> import numpy as np
    >>> from hand3d_dataset.samples_action import ACTION_TASK_TYPES, ActionSampleConfig, build_action_samples
    >>> # `ann` is a `pipeline.ClipAnnotation`:
    >>> # samples, stats = build_action_samples(ann, ActionSampleConfig(), np.random.default_rng(0))
    >>> sorted(ACTION_TASK_TYPES)
    ['contextual_motion_prediction', 'instructional_motion_generation', 'motion_translation']

Task types:

- `instructional_motion_generation`: instruction (the clip's task) + one frame → the wrist trajectory
  from that frame on, as motion tokens.
- `contextual_motion_prediction`: one frame + the past wrist motion (tokens, ending at the frame) →
  the future motion (tokens, after the frame).
- `motion_translation`: one frame + a motion (tokens) → its description in words (direction and
  distance of the net displacement, `language.describe_displacement`).

Waypoints are the wrist (joint 0) in the camera frame of the SHOWN frame s, ``R_s w_k + t_s``, for
every frame k of the trajectory (DESIGN.md §3), then `MotionTokenizer` (1024 bins, clipping counted).
A trajectory whose wrist never leaves a ball of radius `min_motion_m` around its first waypoint is
"insignificant motion" and yields no sample (counted in the returned stats).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hand3d_dataset.language import describe_displacement
from hand3d_dataset.records import Sample, empty_target
from processing_vipa.motion_tokenizer import MotionTokenizer

if TYPE_CHECKING:
    from hand3d_dataset.records import ClipAnnotation

__all__ = [
    "ACTION_TASK_TYPES",
    "ActionSampleConfig",
    "wrist_trajectory",
    "is_significant",
    "build_action_samples",
]

ACTION_TASK_TYPES = ("instructional_motion_generation", "contextual_motion_prediction", "motion_translation")

GENERATION_QUESTIONS: tuple[str, ...] = (
    "Instruction: {task}. Generate the 3D trajectory of the {hand}'s wrist from this frame.",
    "{task_cap}. Predict the wrist motion of the {hand} as motion tokens.",
    "How should the {hand} move to {task}? Answer with the wrist trajectory.",
    "Given the instruction '{task}', output the {hand}'s wrist waypoints in 3D.",
    "Plan the {hand}'s wrist path for the task: {task}.",
    "The person is asked to {task}. Generate the upcoming {hand} wrist motion.",
)
CONTEXT_QUESTIONS: tuple[str, ...] = (
    "The {hand}'s wrist has moved along {past} up to this frame. Predict its future motion.",
    "Past wrist motion of the {hand}: {past}. Continue the trajectory.",
    "Given the previous trajectory {past} of the {hand}, what comes next? Task: {task}.",
    "Here is how the {hand} moved so far: {past}. Predict the next waypoints.",
    "Continue this {hand} wrist trajectory from the current frame: {past}",
)
TRANSLATION_QUESTIONS: tuple[str, ...] = (
    "Describe this {hand} wrist motion in words: {motion}",
    "What does the following motion of the {hand} do? {motion}",
    "Translate the motion tokens into a description of the {hand}'s movement: {motion}",
    "In which direction and how far does the {hand} move here? {motion}",
    "Explain the 3D movement encoded by {motion} for the {hand}.",
)
TRANSLATION_ANSWERS: tuple[str, ...] = (
    "The hand moves {direction}, {distance} overall.",
    "Overall it travels {direction}, about {distance}.",
    "{canonical}.",
    "The wrist goes {direction}, covering roughly {distance} from start to end.",
    "Net motion: {direction}, {distance}.",
)


@dataclass(frozen=True)
class ActionSampleConfig:
    """Knobs of the Hand3D-action builders."""

    min_motion_m: float = 0.03  # a trajectory must leave a ball of this radius around its start
    min_waypoints: int = 2  # shorter trajectories (in frames) yield no sample
    past_frames: int = 3  # contextual prediction: waypoints of past motion, ending at the shown frame
    gamma: float = 0.3  # direction threshold for motion_translation answers
    per_task_per_clip: int = 1  # at most this many samples per task type, hand and clip

    def __post_init__(self) -> None:
        if not (np.isfinite(self.min_motion_m) and self.min_motion_m >= 0):
            raise ValueError(f"min_motion_m: expected a finite value >= 0, got {self.min_motion_m}")
        if self.min_waypoints < 2:
            raise ValueError(
                f"min_waypoints: expected >= 2 (a motion needs two points), got {self.min_waypoints}"
            )
        if self.past_frames < 2:
            raise ValueError(f"past_frames: expected >= 2, got {self.past_frames}")
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"gamma: expected a value in (0, 1), got {self.gamma}")
        if self.per_task_per_clip < 0:
            raise ValueError(f"per_task_per_clip: expected >= 0, got {self.per_task_per_clip}")


def wrist_trajectory(wrist_world: np.ndarray, R_s: np.ndarray, t_s: np.ndarray) -> np.ndarray:
    """Wrist waypoints in the camera frame of the shown frame s.

    wrist_world: (T, 3) world, metres; R_s (3, 3), t_s (3,) world → camera of frame s.
    Returns (T, 3) ``R_s w_k + t_s``.
    """
    w = np.asarray(wrist_world, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != 3:
        raise ValueError(f"wrist_world: expected shape (T, 3), got {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("wrist_world: contains NaN/inf (an untracked frame); cut the trajectory first")
    return w @ np.asarray(R_s, dtype=np.float64).T + np.asarray(t_s, dtype=np.float64)


def is_significant(traj: np.ndarray, min_motion_m: float) -> bool:
    """True when some waypoint of traj (T, 3) lies farther than min_motion_m from the first one."""
    return bool(np.linalg.norm(traj - traj[0], axis=1).max() > min_motion_m)


def _tracked_run(valid: np.ndarray, start: int) -> int:
    """End (exclusive) of the run of valid frames starting at `start`."""
    end = start
    while end < len(valid) and valid[end]:
        end += 1
    return end


def _round(traj: np.ndarray) -> list[list[float]]:
    return [[round(float(x), 6) for x in p] for p in traj]


def build_action_samples(
    ann: ClipAnnotation,
    cfg: ActionSampleConfig,
    rng: np.random.Generator,
    tokenizer: MotionTokenizer | None = None,
) -> tuple[list[Sample], Counter]:
    """The three task types for one annotated clip.

    Clips without images give text-only samples (no image entry), e.g. HOT3D trajectories.
    Returns (samples, stats) where stats counts "filtered_insignificant" and "filtered_short".
    """
    tok = tokenizer or MotionTokenizer()
    clip = ann.clip
    stats: Counter = Counter()
    out: list[Sample] = []
    task = clip.task.strip().rstrip(".") or "manipulate the objects on the table"
    with_image = clip.has_frames
    for side in sorted(ann.hand_visible):
        hand = clip.hands[side]
        # a shown frame must be usable (image decoded, hand in view); wrist-only tracks count as in view
        shown_ok = (ann.frame_ok & ann.hand_visible[side]) if with_image else hand.valid.copy()
        hname = f"{side} hand"
        frames_ok = np.flatnonzero(shown_ok)

        # instructional motion generation: from s to the end of the tracked run
        for s in _shuffled(rng, frames_ok, cfg.per_task_per_clip, stats, hand.valid, cfg, clip, side):
            end = _tracked_run(hand.valid, s)
            traj = wrist_trajectory(hand.wrist3d[s:end], clip.R[s], clip.t[s])
            q = GENERATION_QUESTIONS[rng.integers(len(GENERATION_QUESTIONS))]
            question = q.format(task=task, task_cap=task[:1].upper() + task[1:], hand=hname)
            out.append(
                _make_sample(
                    tok,
                    cfg,
                    side,
                    with_image,
                    "instructional_motion_generation",
                    s,
                    traj,
                    list(range(s, end)),
                    question,
                    None,  # answer: the trajectory's motion tokens
                    {},
                )
            )
        # contextual motion prediction: past (p..s) given, future (s+1..end) asked
        for s in _shuffled(
            rng, frames_ok, cfg.per_task_per_clip, stats, hand.valid, cfg, clip, side, past=True
        ):
            end = _tracked_run(hand.valid, s)
            p = s - cfg.past_frames + 1
            past = wrist_trajectory(hand.wrist3d[p : s + 1], clip.R[s], clip.t[s])
            future = wrist_trajectory(hand.wrist3d[s + 1 : end], clip.R[s], clip.t[s])
            q = CONTEXT_QUESTIONS[rng.integers(len(CONTEXT_QUESTIONS))]
            question = q.format(hand=hname, past=tok.encode(past).text, task=task)
            out.append(
                _make_sample(
                    tok,
                    cfg,
                    side,
                    with_image,
                    "contextual_motion_prediction",
                    s,
                    future,
                    list(range(s + 1, end)),
                    question,
                    None,  # answer: the future's motion tokens
                    {},
                )
            )
        # motion translation: the motion from s on, described in words
        for s in _shuffled(rng, frames_ok, cfg.per_task_per_clip, stats, hand.valid, cfg, clip, side):
            end = _tracked_run(hand.valid, s)
            traj = wrist_trajectory(hand.wrist3d[s:end], clip.R[s], clip.t[s])
            v = traj[-1] - traj[0]
            d = describe_displacement(v, gamma=cfg.gamma)
            words = " and ".join(lab for lab in d.labels.values() if lab is not None)
            fields = {
                "direction": words,
                "distance": f"{d.distance_m:.2f} m",
                "canonical": d.text[:1].upper() + d.text[1:],
            }
            answer = (
                TRANSLATION_ANSWERS[rng.integers(len(TRANSLATION_ANSWERS))].format(**fields)
                if words
                else f"The hand shows no significant movement overall ({fields['distance']})."
            )
            q = TRANSLATION_QUESTIONS[rng.integers(len(TRANSLATION_QUESTIONS))]
            question = q.format(hand=hname, motion=tok.encode(traj).text)
            out.append(
                _make_sample(
                    tok,
                    cfg,
                    side,
                    with_image,
                    "motion_translation",
                    s,
                    traj,
                    list(range(s, end)),
                    question,
                    answer,
                    {},
                )
            )
    return out, stats


def _make_sample(
    tok: MotionTokenizer,
    cfg: ActionSampleConfig,
    side: str,
    with_image: bool,
    kind: str,
    s: int,
    traj: np.ndarray,
    frames: list[int],
    question: str,
    answer: str | None,
    extra: dict,
) -> Sample:
    """A Hand3D-action sample showing frame s (when the clip has images) with trajectory traj (T, 3).

    answer: None for the motion-token tasks, whose answer is `traj` as motion tokens (encoded once, here).
    """
    enc = tok.encode(traj)
    answer = enc.text if answer is None else answer
    d = describe_displacement(traj[-1] - traj[0], gamma=cfg.gamma)
    target = {
        **empty_target(),
        "labels": dict(d.labels),
        "distance_m": round(float(d.distance_m), 6),
        "vector_m": [round(float(x), 6) for x in traj[-1] - traj[0]],
        "hand": side,
        "relation": "wrist_motion",
        "frame_indices": frames,
        "trajectory": _round(traj),
        "text": d.text,
        **extra,
    }
    return Sample(
        kind,
        [s] if with_image else [],
        question,
        answer,
        target,
        trajectory=traj,
        motion_ids=enc.ids,
        clipped=enc.clipped,
    )


def _shuffled(
    rng: np.random.Generator,
    frames_ok: np.ndarray,
    k: int,
    stats: Counter,
    valid: np.ndarray,
    cfg: ActionSampleConfig,
    clip,
    side: str,
    past: bool = False,
) -> list[int]:
    """Up to k shown frames whose trajectory is long enough and significant, in a seeded order."""
    chosen: list[int] = []
    wrist = clip.hands[side].wrist3d
    for s in rng.permutation(frames_ok):
        s = int(s)
        if len(chosen) >= k:
            break
        end = _tracked_run(valid, s)
        first = s + 1 if past else s  # contextual: the future starts after the shown frame
        if past and (s - cfg.past_frames + 1 < 0 or not valid[s - cfg.past_frames + 1 : s + 1].all()):
            stats["filtered_short"] += 1
            continue
        if end - first < cfg.min_waypoints:
            stats["filtered_short"] += 1
            continue
        traj = wrist_trajectory(wrist[first:end], clip.R[s], clip.t[s])
        if not is_significant(traj, cfg.min_motion_m):
            stats["filtered_insignificant"] += 1
            continue
        chosen.append(s)
    return sorted(chosen)
