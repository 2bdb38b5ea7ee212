"""The unified clip: validation errors name the field, camera-frame helpers, boxes, save/load."""

import subprocess
import sys

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from hand3d_dataset.clip import Clip, HandTrack, ObjectTrack, boxes_from_segmentation

T = 3


def make_clip(**overrides) -> Clip:
    rng = np.random.default_rng(0)
    joints = rng.normal(0, 0.05, (T, 21, 3)) + [0, 0, 1.0]
    kw = dict(
        clip_id="c0",
        source="test",
        fps=10.0,
        K=np.array([[100.0, 0, 31.5], [0, 100.0, 31.5], [0, 0, 1]]),
        R=Rotation.from_rotvec(rng.normal(0, 0.3, (T, 3))).as_matrix(),
        t=rng.normal(0, 0.1, (T, 3)),
        image_hw=(64, 64),
        hands={"right": HandTrack("right", joints3d=joints)},
        objects=[
            ObjectTrack("red mug", box2d=np.tile([1.0, 2.0, 10.0, 12.0], (T, 1)), position3d=np.ones((T, 3)))
        ],
        task="pick up the red mug",
    )
    kw.update(overrides)
    return Clip(**kw)


def test_joints_cam_matches_scipy_transform():
    clip = make_clip()
    j = clip.hands["right"].joints3d
    for k in range(T):
        want = Rotation.from_matrix(clip.R[k]).apply(j[k]) + clip.t[k]
        np.testing.assert_allclose(clip.joints_cam("right")[k], want, atol=1e-12)
    np.testing.assert_allclose(clip.wrist_cam("right"), clip.joints_cam("right")[:, 0])
    centres = clip.camera_centers()
    for k in range(T):  # the camera centre maps to the camera origin
        np.testing.assert_allclose(clip.R[k] @ centres[k] + clip.t[k], 0, atol=1e-12)
    assert clip.K.shape == (T, 3, 3)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"R": np.tile(np.diag([1.0, 1.0, -1.0]), (T, 1, 1))}, "Clip.R"),
        ({"t": np.zeros((T + 1, 3))}, "Clip.t"),
        ({"K": np.diag([0.0, 1.0, 1.0])}, "Clip.K"),
        ({"fps": 0}, "Clip.fps"),
        ({"hands": {}}, "Clip.hands"),
        ({"frames": np.zeros((T, 64, 64, 3), np.float32)}, "Clip.frames"),
        ({"depth": np.zeros((T, 64, 64))}, "Clip.depth"),
        ({"segmentation": np.zeros((T, 32, 64), np.uint8)}, "Clip.segmentation"),
        ({"objects": [ObjectTrack("a"), ObjectTrack("a")]}, "Clip.objects"),
        ({"objects": [ObjectTrack("a", position3d=np.zeros((T + 1, 3)))]}, "position3d"),
    ],
)
def test_clip_validation_names_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_clip(**overrides)


def test_hand_and_object_validation():
    j = np.zeros((T, 21, 3))
    j[1, 5] = np.nan
    with pytest.raises(ValueError, match="joints3d: non-finite values on frames marked valid: \\[1\\]"):
        HandTrack("left", joints3d=j, valid=np.ones(T, bool))
    with pytest.raises(ValueError, match="side"):
        HandTrack("middle", wrist3d=np.zeros((T, 3)))
    with pytest.raises(ValueError, match="both are None"):
        HandTrack("left")
    with pytest.raises(ValueError, match="must be NaN"):
        HandTrack("left", wrist3d=np.zeros((T, 3)), valid=np.array([True, False, True]))
    with pytest.raises(ValueError, match="x0 < x1"):
        ObjectTrack("box", box2d=np.array([[5.0, 0, 1, 3]]))
    with pytest.raises(ValueError, match="must be NaN"):  # a partly NaN frame is corrupt, not missing
        HandTrack("left", joints3d=j)
    j[1] = np.nan  # an all-NaN frame marks the hand untracked there by default
    assert HandTrack("left", joints3d=j).valid.tolist() == [True, False, True]
    w = HandTrack("left", wrist3d=np.zeros((T, 3)))
    assert w.wrist_only and w.valid.all()
    clip = make_clip(hands={"left": w})
    with pytest.raises(ValueError, match="wrist-only"):
        clip.joints_cam("left")
    with pytest.raises(ValueError, match="side"):
        clip.wrist_cam("right")


def test_boxes_from_segmentation_by_hand():
    seg = np.zeros((2, 8, 10), np.uint8)
    seg[0, 2:5, 3:7] = 1  # rows 2..4, cols 3..6
    boxes = boxes_from_segmentation(seg, [1, 2])
    assert boxes[0, 0].tolist() == [2.5, 1.5, 6.5, 4.5]
    assert np.isnan(boxes[1, 0]).all() and np.isnan(boxes[:, 1]).all()
    # the membership rule x0 <= j < x1 recovers exactly the mask's pixels
    jj, ii = np.meshgrid(np.arange(10), np.arange(8))
    x0, y0, x1, y1 = boxes[0, 0]
    inside = (jj >= x0) & (jj < x1) & (ii >= y0) & (ii < y1)
    assert np.array_equal(inside, seg[0] == 1)


def test_save_load_roundtrip_in_fresh_process(tmp_path):
    clip = make_clip(
        frames=np.random.default_rng(1).integers(0, 255, (T, 64, 64, 3), dtype=np.uint8),
        depth=np.full((T, 64, 64), 0.5, np.float32),
        meta={"task_type": "pick"},
    )
    clip.hands["left"] = HandTrack("left", wrist3d=np.zeros((T, 3)), mano={"betas": np.ones((T, 10))})
    path = clip.save(tmp_path / "c.npz")
    code = (
        "import sys, numpy as np; from hand3d_dataset.clip import Clip; c = Clip.load(sys.argv[1]);"
        "np.save(sys.argv[2], np.concatenate([c.joints_cam('right').ravel(), c.frames.ravel().astype(float),"
        " c.objects[0].box2d.ravel(), c.hands['left'].mano['betas'].ravel()]));"
        "print(c.task, c.meta['task_type'], c.hands['left'].wrist_only)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "o.npy")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["pick", "up", "the", "red", "mug", "pick", "True"]
    want = np.concatenate(
        [
            clip.joints_cam("right").ravel(),
            clip.frames.ravel().astype(float),
            clip.objects[0].box2d.ravel(),
            np.ones(T * 10),
        ]
    )
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), want)
