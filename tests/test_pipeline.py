"""The per-clip annotation pipeline: scale calibration, object localisation, visibility and corrupt-input
handling, against analytic ground truth (tests/hand3d_fake_source.py) and the MuJoCo renderer."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from datasets import Dataset

from hand3d_dataset.estimators import GroundTruthBoxDetector, GroundTruthDepthEstimator
from hand3d_dataset.pipeline import (
    ACTION_FEATURES,
    VISUAL_FEATURES,
    PipelineConfig,
    process_clip,
    self_occluded,
    target_object_of,
)
from tests.hand3d_fake_source import HAND_SHAPE, EmptyBoxDetector, K, make_clip

# fake joints are drawn at their depth; objects from the estimate path (the poses are tested apart)
EXACT = PipelineConfig(joint_depth_offset_scale=0.0, occlusion_radius_m=0.0, object_source="estimate")
ESTIMATE = PipelineConfig(object_source="estimate")


def test_scale_and_object_positions_match_the_analytic_scene():
    est = GroundTruthDepthEstimator(seed=3)
    for index in range(4):
        clip = make_clip(index)
        r = process_clip(clip, est, GroundTruthBoxDetector(), EXACT, seed=0)
        assert r.skipped is None
        # the estimator divided metric depth by a known factor; calibration must undo exactly that
        assert r.scale == pytest.approx(est.true_scale(clip.clip_id), rel=1e-6)
        for row in r.rows_visual:
            tgt = row["target"]
            if row["task_type"] != "spatial_relationship":
                continue
            f = tgt["frame_indices"][-1]
            palm = clip.R[f] @ clip.hands["right"].joints3d[f][[0, 5, 9, 13, 17]].mean(0) + clip.t[f]
            v = np.array(tgt["vector_m"])
            located = palm + v if tgt["relation"] == "object_from_hand" else palm - v
            # ground truth: the object's visible pixels (segmentation) back-projected with metric depth
            seg_id = clip.object(tgt["object"]).segment_id
            rows, cols = np.nonzero(clip.segmentation[f] == seg_id)
            z = clip.depth[f, rows, cols]
            visible = np.stack([(cols - K[0, 2]) * z / K[0, 0], (rows - K[1, 2]) * z / K[1, 1], z], 1).mean(0)
            assert abs(located[2] - visible[2]) < 1e-3  # flat, camera-facing patches: depth is exact
            # laterally, the hand hides part of a patch; one pixel is 12 mm at 0.7 m and 64 px
            assert np.linalg.norm(located - visible) < 0.02


def test_rows_follow_the_published_schema_and_images_decode():
    r = process_clip(
        make_clip(0), GroundTruthDepthEstimator(), GroundTruthBoxDetector(), PipelineConfig(), seed=0
    )
    vis = Dataset.from_list(r.rows_visual, features=VISUAL_FEATURES)
    act = Dataset.from_list(r.rows_action, features=ACTION_FEATURES)
    for row in list(vis) + list(act):
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        n_img = sum(c["type"] == "image" for c in user["content"])
        assert n_img == len(row["images"]) and user["content"][-1]["type"] == "text"
        for im in row["images"]:
            assert isinstance(im, PIL.Image.Image) and im.size == (64, 64)
    # the stored pixels are the clip's pixels (PNG is lossless)
    row = r.rows_visual[0]
    png = PIL.Image.open(io.BytesIO(row["images"][0]["bytes"]))
    assert np.array_equal(np.asarray(png), make_clip(0).frames[row["target"]["frame_indices"][0]])
    assert len(act) and all(len(x["motion_ids"]) == 3 * len(x["trajectory"]) for x in act)


def test_hand_out_of_view_skips_the_clip_with_a_reason():
    r = process_clip(
        make_clip(0, corrupt="out_of_view"), GroundTruthDepthEstimator(), GroundTruthBoxDetector(), EXACT, 0
    )
    assert r.rows_visual == [] and r.rows_action == []
    assert "no frame with a hand in view" in r.skipped


def test_empty_box_is_noted_and_its_object_never_located():
    clip = make_clip(2, corrupt="empty_box")
    r = process_clip(clip, GroundTruthDepthEstimator(), EmptyBoxDetector(), EXACT, seed=0)
    assert r.skipped is None
    assert any("red mug" in n and "degenerate box" in n for n in r.notes)
    assert all(row["target"]["object"] != "red mug" for row in r.rows_visual)
    assert not any(row["task_type"] == "task_completion" for row in r.rows_visual)  # its target is the mug


def test_blank_frame_is_dropped_and_never_shown():
    clip = make_clip(1)
    clip.frames[2] = 0
    r = process_clip(clip, GroundTruthDepthEstimator(), GroundTruthBoxDetector(), EXACT, seed=0)
    assert any(n.startswith("frame 2: blank image") for n in r.notes)
    assert r.rows_visual and all(2 not in row["target"]["frame_indices"] for row in r.rows_visual)


def test_estimator_failure_becomes_a_skip_reason():
    class Broken:
        def estimate_clip(self, clip):
            return np.zeros((1, 2, 3))

    r = process_clip(make_clip(0), Broken(), GroundTruthBoxDetector(), EXACT, seed=0)
    assert r.skipped.startswith("invalid data") and r.rows_visual == []


def test_self_occlusion_flags_a_joint_behind_a_bone():
    hand = np.asarray(HAND_SHAPE + [0.0, 0.0, 0.5])
    assert not self_occluded(hand, 0.01).any()  # a flat hand facing the camera hides nothing
    curled = hand.copy()
    curled[8] = hand[6] + [0.0, 0.0, 0.05]  # index tip folded 5 cm straight behind its middle joint
    occ = self_occluded(curled, 0.01)
    assert occ[8] and occ.sum() == 1


def test_target_object_prefers_meta_then_task_text():
    clip = make_clip(0)
    assert target_object_of(clip) == "red mug"
    clip.meta = {}
    clip.task = "slide the blue box next to the red mug"
    assert target_object_of(clip) == "blue box"


def test_config_validation():
    with pytest.raises(ValueError, match="min_visible_joints"):
        PipelineConfig(min_visible_joints=0)
    with pytest.raises(ValueError, match="joint_depth_offset_scale"):
        PipelineConfig(joint_depth_offset_scale=-1.0)


def test_synth_clip_scale_is_recovered_within_two_percent():
    from hand3d_dataset.sources import get_source

    src = get_source("synth", num_clips=2, seed=1, image_size=96, num_frames=4)
    est = GroundTruthDepthEstimator(seed=1)
    for cid in src.clip_ids():
        r = process_clip(src.load_clip(cid), est, GroundTruthBoxDetector(), ESTIMATE, seed=1)
        assert r.skipped is None, r.skipped
        assert abs(r.scale / est.true_scale(cid) - 1) < 0.02


def test_row_intrinsics_project_the_action_trajectory_onto_the_hand_in_the_shown_image():
    from hand3d_dataset.clip import HAND_SEGMENT
    from hand3d_dataset.sources import get_source

    src = get_source("synth", num_clips=3, seed=2, image_size=96, num_frames=4)
    hits = total = 0
    for cid in src.clip_ids():
        clip = src.load_clip(cid)
        r = process_clip(
            clip, GroundTruthDepthEstimator(seed=2), GroundTruthBoxDetector(), PipelineConfig(), seed=2
        )
        for row in r.rows_action:
            if not row["images"]:
                continue
            K = np.asarray(row["K"])
            shown = row["target"]["frame_indices"][0]
            x, y, z = row["trajectory"][0]  # the wrist at the shown frame, in that frame's camera
            u, v = K[0, 0] * x / z + K[0, 2], K[1, 1] * y / z + K[1, 2]  # pinhole by hand
            seg = clip.segmentation[shown]
            i, j = int(round(v)), int(round(u))
            total += 1
            if 0 <= i < 96 and 0 <= j < 96:
                window = seg[max(i - 2, 0) : i + 3, max(j - 2, 0) : j + 3]
                hits += bool(np.isin(window, list(HAND_SEGMENT.values())).any())
    assert total > 0
    assert hits / total >= 0.8, (hits, total)


def test_real_hot3d_trajectories_give_text_only_action_samples():
    root = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "real" / "hot3d"
    if not root.is_dir():
        pytest.skip(f"real fixtures not found at {root}")
    from hand3d_dataset.sources import get_source

    src = get_source("hot3d", root=str(root))
    clips = []
    for cid in src.clip_ids():
        try:
            clips.append(src.load_clip(cid))
        except ValueError:
            continue  # a sample without camera models: the runner records such clips as skipped
    assert clips, "no loadable HOT3D clip in the fixtures"
    n = 0
    for clip in clips:
        r = process_clip(
            clip, GroundTruthDepthEstimator(), GroundTruthBoxDetector(), PipelineConfig(), seed=0
        )
        assert r.rows_visual == []  # no images: nothing to ask about
        for row in r.rows_action:
            n += 1
            assert row["images"] == [] and all(c["type"] == "text" for c in row["messages"][0]["content"])
            side, frames = row["target"]["hand"], row["target"]["frame_indices"]
            s = frames[0] - 1 if row["task_type"] == "contextual_motion_prediction" else frames[0]
            wrist = clip.hands[side].wrist3d[frames]
            expected = wrist @ clip.R[s].T + clip.t[s]  # the real headset pose of the reference frame
            assert np.allclose(row["trajectory"], expected, atol=1e-9)
    assert n > 0


class _Refuses:
    """An estimator or detector that must not be called."""

    def estimate_clip(self, clip):
        raise AssertionError("estimator called")

    def detect_clip(self, clip):
        raise AssertionError("detector called")


def _check_rows_state_the_poses(rows, clip) -> int:
    """Asserts that each spatial row's object point (the palm, mean of wrist and finger bases in the shown
    frame's camera, computed here, plus or minus the row's vector) is the object's pose moved into that
    camera by the clip's R, t (to the rows' 6-decimal rounding); returns how many rows were checked."""
    checked = 0
    for row in rows:
        tgt = row["target"]
        if row["task_type"] != "spatial_relationship":
            continue
        f = tgt["frame_indices"][-1]
        palm = clip.R[f] @ clip.hands[tgt["hand"]].joints3d[f][[0, 5, 9, 13, 17]].mean(0) + clip.t[f]
        v = np.array(tgt["vector_m"])
        located = palm + v if tgt["relation"] == "object_from_hand" else palm - v
        centre = clip.R[f] @ clip.object(tgt["object"]).position3d[f] + clip.t[f]
        np.testing.assert_allclose(located, centre, atol=2e-6)
        checked += 1
    return checked


@pytest.mark.parametrize("object_source", ["pose", "auto"])
def test_object_positions_come_from_the_poses_without_estimator_or_detector(object_source):
    """Fake clips carry their analytic object centres as poses: rows state them exactly (to the rows'
    6-decimal rounding) and the detector never runs; "pose" runs no estimator either (no scale), "auto"
    still calibrates the cloud's scale."""
    cfg = PipelineConfig(object_source=object_source)
    est = _Refuses() if object_source == "pose" else GroundTruthDepthEstimator(seed=3)
    checked = 0
    for index in range(3):
        clip = make_clip(index)
        r = process_clip(clip, est, _Refuses(), cfg, seed=0)
        assert r.skipped is None and (r.scale is None) == (object_source == "pose")
        checked += _check_rows_state_the_poses(r.rows_visual, clip)
    assert checked > 0


def test_auto_estimates_only_where_a_pose_is_missing():
    """One frame of the mug has no pose: only that position is estimated (near the analytic centre)."""
    from hand3d_dataset.pipeline import annotate_clip

    clip = make_clip(2)
    o = [ob.name for ob in clip.objects].index("red mug")
    pose = clip.objects[o].position3d.copy()
    want = np.einsum("tij,tj->ti", clip.R, pose) + clip.t  # the analytic centre, camera frame
    est = GroundTruthDepthEstimator(seed=3)
    # "estimate" ignores the poses everywhere: the mug's estimated positions are not the pose's numbers
    ann_e, _, _ = annotate_clip(clip, est, GroundTruthBoxDetector(), ESTIMATE, [])
    seen = np.flatnonzero(np.isfinite(ann_e.objects_cam[:, o]).all(axis=1))
    assert len(seen) >= 2 and not np.array_equal(ann_e.objects_cam[seen, o], want[seen])
    k = int(seen[0])
    clip.objects[o].position3d[k] = np.nan
    ann, reason, _ = annotate_clip(clip, est, GroundTruthBoxDetector(), PipelineConfig(), [])
    assert reason is None and ann.scale == pytest.approx(est.true_scale(clip.clip_id), rel=0.02)
    others = [f for f in seen if f != k]
    assert np.array_equal(ann.objects_cam[others, o], want[others])  # the pose, untouched
    assert np.array_equal(ann.objects_cam[k, o], ann_e.objects_cam[k, o])  # the estimate, where no pose
    assert np.linalg.norm(ann.objects_cam[k, o] - want[k]) < 0.03


def test_a_posed_object_out_of_view_has_no_position():
    """A pose behind the camera or outside the image says nothing about the frame: no position there."""
    from hand3d_dataset.pipeline import objects_from_poses

    clip = make_clip(0)
    clip.objects[0].position3d[0] = clip.camera_centers()[0] - 0.3 * clip.R[0][2]  # 0.3 m behind
    clip.objects[0].position3d[1] = np.linalg.inv(clip.R[1]) @ (np.array([5.0, 0.0, 1.0]) - clip.t[1])
    got = objects_from_poses(clip)
    assert np.isnan(got[:2, 0]).all() and np.isfinite(got[2:, 0]).all()
    np.testing.assert_allclose(got[2, 0], clip.R[2] @ clip.objects[0].position3d[2] + clip.t[2])


def test_synth_rows_state_the_rendered_object_centres():
    """Synth renders each object at its pose: with the default "auto", spatial rows give those centres
    (world → camera with the rendered R, t, computed here) to the rows' rounding."""
    from hand3d_dataset.sources import get_source

    src = get_source("synth", num_clips=2, seed=5, image_size=64, num_frames=4)
    checked = 0
    for cid in src.clip_ids():
        clip = src.load_clip(cid)
        r = process_clip(
            clip, GroundTruthDepthEstimator(seed=5), GroundTruthBoxDetector(), PipelineConfig(), 5
        )
        checked += _check_rows_state_the_poses(r.rows_visual, clip)
    assert checked > 0


def test_auto_with_every_object_posed_survives_an_estimator_that_cannot_run():
    """ "auto" on a clip whose objects all have poses: an estimator failing on the clip is a note, not a
    skip ("estimate" needs it and skips the clip)."""

    class NoDepth:
        def estimate_clip(self, clip):
            raise ValueError(f"clip: {clip.clip_id} has no depth")

    r = process_clip(make_clip(0), NoDepth(), _Refuses(), PipelineConfig(), seed=0)
    assert r.skipped is None and r.scale is None and r.rows_visual
    assert any(n.startswith("cloud: not made") for n in r.notes)
    r = process_clip(make_clip(0), NoDepth(), GroundTruthBoxDetector(), ESTIMATE, seed=0)
    assert r.skipped.startswith("invalid data") and "has no depth" in r.skipped


def test_auto_keeps_the_poses_when_the_estimate_for_the_rest_cannot_be_made():
    """A frame of the mug lacks a pose and the detector cannot run on the clip: the other positions stay the
    poses and that one stays empty (noted); a clip without any pose is the estimate path (skipped)."""
    from hand3d_dataset.pipeline import annotate_clip

    class NoBoxes:
        def detect_clip(self, clip):
            raise ValueError(f"clip: {clip.clip_id} has no segmentation")

    clip = make_clip(2)
    o = [ob.name for ob in clip.objects].index("red mug")
    want = np.einsum("tij,tj->ti", clip.R, clip.objects[o].position3d) + clip.t
    clip.objects[o].position3d[0] = np.nan
    notes = []
    ann, reason, _ = annotate_clip(clip, GroundTruthDepthEstimator(), NoBoxes(), PipelineConfig(), notes)
    assert reason is None and np.isnan(ann.objects_cam[0, o]).all()
    seen = np.isfinite(ann.objects_cam[1:, o]).all(axis=1)
    assert seen.any() and np.array_equal(ann.objects_cam[1:, o][seen], want[1:][seen])
    assert any(n.startswith("boxes: not detected") for n in notes)
    for ob in clip.objects:
        ob.position3d = None
    r = process_clip(clip, GroundTruthDepthEstimator(), NoBoxes(), PipelineConfig(), seed=0)
    assert r.skipped.startswith("invalid data") and "no segmentation" in r.skipped


def test_object_source_validation():
    with pytest.raises(ValueError, match="object_source: expected one of"):
        PipelineConfig(object_source="guess")
    from hand3d_dataset.calibration import LocalizationConfig

    with pytest.raises(ValueError, match="object_source: 'pose' gives object centres"):
        PipelineConfig(object_source="pose", localization=LocalizationConfig(estimate="surface"))
