"""Hand3D-visual and Hand3D-action sample builders, checked against independent computations: numpy by
hand for the geometry, scipy for rotations, and the Hand3D-test answer parser (`metrics.parse_answer`) for
the text, so every answer says exactly what its structured target says."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from hand3d_dataset import samples_action as sa
from hand3d_dataset import samples_visual as sv
from hand3d_dataset.clip import Clip, HandTrack
from hand3d_dataset.metrics import parse_answer
from hand3d_dataset.records import ClipAnnotation
from tests.hand3d_fake_source import make_clip

GAMMA = 0.3


def _labels_by_hand(v: np.ndarray) -> dict:
    """Direction labels of v computed from scratch (DESIGN.md §2), independent of language.py."""
    u = v / np.linalg.norm(v)
    words = {0: ("right", "left"), 1: ("down", "up"), 2: ("forward", "backward")}
    return {
        ax: (words[i][0] if u[i] > 0 else words[i][1]) if abs(u[i]) > GAMMA else None
        for i, ax in enumerate("xyz")
    }


def _annotation(clip: Clip) -> ClipAnnotation:
    """Ground-truth annotation: every frame usable, objects at their exact centres (camera frame)."""
    T = clip.num_frames
    objs = np.stack([np.einsum("tij,tj->ti", clip.R, o.position3d) + clip.t for o in clip.objects], axis=1)
    return ClipAnnotation(
        clip=clip,
        frame_ok=np.ones(T, bool),
        hand_visible={"right": np.ones(T, bool)},
        object_names=[o.name for o in clip.objects],
        objects_cam=objs,
        scale=1.0,
        target_object="red mug",
    )


def _palm_cam(clip: Clip, f: int) -> np.ndarray:
    j = clip.hands["right"].joints3d[f][[0, 5, 9, 13, 17]].mean(axis=0)
    return clip.R[f] @ j + clip.t[f]


@pytest.mark.parametrize(
    "questions, answers",
    [
        (sv.SPATIAL_QUESTIONS, sv.SPATIAL_ANSWERS),
        (sv.TASK_QUESTIONS, sv.TASK_ANSWERS),
        (sv.HAND_QUESTIONS, sv.HAND_ANSWERS),
        (sv.CAMERA_QUESTIONS, sv.CAMERA_ANSWERS),
    ],
)
def test_each_category_has_varied_phrasing(questions, answers):
    assert len(set(questions)) >= 10 and len(set(answers)) >= 5


def test_visual_answers_parse_back_to_their_targets():
    """Over many clips and seeds (every template gets drawn), the metric parser recovers from each answer
    the target's labels and distance (or rotation and angle), and the targets match numpy by hand."""
    seen_q: set[str] = set()
    n = 0
    for index in range(12):
        clip = make_clip(index)
        ann = _annotation(clip)
        cfg = sv.VisualSampleConfig(
            spatial_per_clip=6, task_per_clip=3, hand_movement_per_clip=3, camera_movement_per_clip=2
        )
        for s in sv.build_visual_samples(ann, cfg, np.random.default_rng(index)):
            n += 1
            seen_q.add(s.question)
            tgt, p = s.target, parse_answer(s.answer)
            assert s.target["frame_indices"] == s.frame_indices or s.task_type in (
                "hand_movement",
                "camera_movement",
            )
            if s.task_type == "camera_movement":
                i, j = s.frame_indices
                rel = Rotation.from_matrix(clip.R[i] @ clip.R[j].T)  # camera j in camera i (scipy)
                assert tgt["angle_deg"] == pytest.approx(np.degrees(rel.magnitude()), abs=1e-4)
                assert p.angle_deg == pytest.approx(tgt["angle_deg"], abs=0.051)
                assert p.rotation_found and p.rotation == tgt["rotation"]
                if tgt["rotation"] is not None:  # the fake camera yaws: words from the rotvec's y sign
                    assert tgt["rotation"] == ("turn right" if rel.as_rotvec()[1] > 0 else "turn left")
                continue
            f = s.frame_indices[-1]
            if s.task_type == "hand_movement":
                i, j = s.frame_indices
                palm_w = clip.hands["right"].joints3d[:, [0, 5, 9, 13, 17]].mean(axis=1)
                v = clip.R[i] @ (palm_w[j] - palm_w[i])
                assert np.allclose(tgt["trajectory"][0], clip.R[i] @ palm_w[i] + clip.t[i], atol=1e-6)
            else:
                obj = clip.R[f] @ clip.object(tgt["object"]).position3d[f] + clip.t[f]
                v = obj - _palm_cam(clip, f)
                if tgt["relation"] == "hand_from_object":
                    v = -v
                if s.task_type == "spatial_relationship":
                    joints = clip.R[f] @ clip.hands["right"].joints3d[f].T
                    d_min = np.linalg.norm(joints.T + clip.t[f] - obj, axis=1).min()
                    assert tgt["contact"] == (d_min < cfg.contact_threshold_m)
            assert np.allclose(tgt["vector_m"], v, atol=1e-6)
            assert tgt["distance_m"] == pytest.approx(np.linalg.norm(v), abs=1e-6)
            expected = _labels_by_hand(v) if np.linalg.norm(v) >= cfg.min_distance_m else dict.fromkeys("xyz")
            assert tgt["labels"] == expected
            assert p.labels == expected, s.answer
            assert p.distance_m == pytest.approx(tgt["distance_m"], abs=0.0051), s.answer
            # answers never carry the hand's side, which the parser would read as a direction
            assert "right hand" not in s.answer and "left hand" not in s.answer
    assert n > 100 and len(seen_q) >= 30


def test_spatial_context_is_one_to_four_consecutive_frames_ending_at_the_asked_frame():
    ann = _annotation(make_clip(0))
    lengths = set()
    for seed in range(20):
        for s in sv.spatial_relationship_samples(ann, sv.VisualSampleConfig(), np.random.default_rng(seed)):
            fr = s.frame_indices
            lengths.add(len(fr))
            assert fr == list(range(fr[0], fr[0] + len(fr)))
    assert lengths == {1, 2, 3, 4}


def test_action_trajectories_tokens_and_translation():
    clip = make_clip(3)
    ann = _annotation(clip)
    samples, _ = sa.build_action_samples(
        ann, sa.ActionSampleConfig(min_motion_m=0.0), np.random.default_rng(0)
    )
    kinds = {s.task_type for s in samples}
    assert kinds == set(sa.ACTION_TASK_TYPES)
    wrist = clip.hands["right"].wrist3d
    for s in samples:
        (shown,) = s.frame_indices
        frames = s.target["frame_indices"]
        # wrist in the camera frame of the SHOWN frame, for every trajectory frame (numpy by hand)
        expected = np.stack([clip.R[shown] @ wrist[k] + clip.t[shown] for k in frames])
        assert np.allclose(s.trajectory, expected, atol=1e-9)
        bins = np.clip(np.floor((expected - [-0.5, -0.5, 0.0]) / (1.0 / 1024)), 0, 1023).astype(int).ravel()
        assert s.motion_ids.tolist() == bins.tolist()
        if s.task_type == "contextual_motion_prediction":
            assert frames[0] == shown + 1  # the future starts after the shown frame
        if s.task_type == "motion_translation":
            p = parse_answer(s.answer)
            assert p.labels == _labels_by_hand(expected[-1] - expected[0])
            assert p.distance_m == pytest.approx(np.linalg.norm(expected[-1] - expected[0]), abs=0.0051)
        else:
            assert s.answer.startswith("<motion>") and s.answer.count("<motion_") == 3 * len(frames)


def test_insignificant_motion_is_filtered_with_a_configurable_threshold():
    clip = make_clip(0)
    T = clip.num_frames
    still = clip.hands["right"].joints3d[:1].repeat(T, axis=0)
    still = still + np.linspace(0, 0.01, T)[:, None, None] * np.array([1.0, 0.0, 0.0])  # 1 cm in total
    clip.hands["right"] = HandTrack("right", joints3d=still)
    ann = _annotation(clip)
    samples, stats = sa.build_action_samples(
        ann, sa.ActionSampleConfig(min_motion_m=0.03), np.random.default_rng(0)
    )
    assert samples == [] and stats["filtered_insignificant"] > 0
    samples, _ = sa.build_action_samples(
        ann, sa.ActionSampleConfig(min_motion_m=0.005), np.random.default_rng(0)
    )
    assert samples and all(
        np.linalg.norm(s.trajectory - s.trajectory[0], axis=1).max() > 0.005 for s in samples
    )


def test_trajectory_only_clip_gives_text_only_action_samples_and_no_visual():
    clip = make_clip(1)
    clip.frames = None
    ann = _annotation(clip)
    assert sv.build_visual_samples(ann, sv.VisualSampleConfig(), np.random.default_rng(0)) == []
    ann.frame_ok[:] = False
    samples, _ = sa.build_action_samples(
        ann, sa.ActionSampleConfig(min_motion_m=0.0), np.random.default_rng(0)
    )
    assert samples and all(s.frame_indices == [] for s in samples)


@pytest.mark.parametrize(
    "make",
    [
        lambda: sv.VisualSampleConfig(gamma=1.2),
        lambda: sv.VisualSampleConfig(max_context_frames=5),
        lambda: sv.VisualSampleConfig(contact_threshold_m=float("nan")),
        lambda: sa.ActionSampleConfig(min_motion_m=-0.1),
        lambda: sa.ActionSampleConfig(past_frames=1),
    ],
)
def test_bad_configs_raise(make):
    with pytest.raises(ValueError):
        make()


def test_wrist_trajectory_rejects_untracked_frames():
    with pytest.raises(ValueError, match="wrist_world"):
        sa.wrist_trajectory(np.array([[0.0, 0.0, 0.5], [np.nan, 0.0, 0.5]]), np.eye(3), np.zeros(3))
