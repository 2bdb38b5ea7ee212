"""H2O adapter on a fixture in the README's layout: world joints vs another camera's own 3D joints, conventions."""

import shutil

import numpy as np
import pytest

from hand3d_dataset.sources import SourceAdapter, get_source
from hand3d_dataset.sources.h2o import H2oSource
from tests.source_fixtures import h2o as fx
from tests.source_fixtures._common import clip_uv, project_cam, row_count, run_build, save_tiny_detector

CLIP_ID = "h2o-subject1-h1-0-cam4-c000"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("h2o")
    truth = fx.build_h2o(root / "data", root / "mano")
    return root, truth


@pytest.fixture(scope="module")
def clip(data):
    return get_source("h2o", root=data[0] / "data").load_clip(CLIP_ID)


def cam_file(data, cam, folder, f):
    return np.array(
        (data[0] / "data" / "subject1" / "h1" / "0" / cam / folder / f"{f:06d}.txt").read_text().split(),
        float,
    )


def test_ids_egocentric_camera_and_sampling(data, clip):
    src = get_source("h2o", root=data[0] / "data")
    assert isinstance(src, SourceAdapter) and src.clip_ids() == [CLIP_ID]
    assert H2oSource(data[0] / "data", camera="cam0").clip_ids() == ["h2o-subject1-h1-0-cam0-c000"]
    # the real cam4 intrinsics (the H2O sample's cam_intrinsics.txt) at 1280x720
    np.testing.assert_allclose(clip.K[0], [[636.6593, 0, 635.2839], [0, 636.2520, 366.8740], [0, 0, 1]])
    assert clip.image_hw == (720, 1280) and clip.frames.shape == (2, 720, 1280, 3)
    assert clip.meta["frame_indices"] == [0, 30] and clip.fps == 1.0 and clip.depth.shape == (2, 720, 1280)
    with pytest.raises(ValueError, match="camera"):
        H2oSource(data[0] / "data", camera="cam7")


def test_world_joints_land_on_the_other_cameras_own_joints(data, clip):
    """Independent check: cam4's joints, moved to the world by the adapter, are cam0's hand_pose in cam0."""
    for k, f in enumerate(clip.meta["frame_indices"]):
        T_wc0 = cam_file(data, "cam0", "cam_pose", f).reshape(4, 4)
        hp0 = cam_file(data, "cam0", "hand_pose", f).reshape(2, 64)
        for s, row in zip(("left", "right"), hp0):
            hand = clip.hands[s]
            if row[0] == 0:
                assert not hand.valid[k] and np.isnan(hand.joints3d[k]).all()
                continue
            world = np.hstack([hand.joints3d[k], np.ones((21, 1))])
            in_cam0 = (np.linalg.inv(T_wc0) @ world.T).T[:, :3]
            np.testing.assert_allclose(in_cam0, row[1:].reshape(21, 3), atol=1e-7)
            # and the adapter's own camera projects them where cam4's hand_pose projects
            hp4 = (
                cam_file(data, "cam4", "hand_pose", f)
                .reshape(2, 64)[0 if s == "left" else 1, 1:]
                .reshape(21, 3)
            )
            K4 = np.array([[636.6593, 0, 635.2839], [0, 636.2520, 366.8740], [0, 0, 1]])
            np.testing.assert_allclose(clip_uv(clip, s, k), project_cam(K4, hp4), atol=1e-6)


def test_cam_pose_is_camera_to_world(data, clip):
    """Convention: cam_pose's translation column is the camera centre in the world (camera→world)."""
    for k, f in enumerate(clip.meta["frame_indices"]):
        T = cam_file(data, "cam4", "cam_pose", f).reshape(4, 4)
        np.testing.assert_allclose(clip.camera_centers()[k], T[:3, 3], atol=1e-9)
        np.testing.assert_allclose(clip.R[k], T[:3, :3].T, atol=1e-9)
    np.testing.assert_allclose(clip.hands["right"].joints3d, data[1]["joints"]["right"][[0, 30]], atol=1e-7)


def test_hand_absent_object_task_and_mano(data, clip):
    assert clip.hands["left"].valid.tolist() == [True, False] and clip.hands["right"].valid.all()
    assert clip.task == "pour milk" and [o.name for o in clip.objects] == ["milk"]
    np.testing.assert_allclose(
        clip.object("milk").position3d, np.tile(data[1]["object_centre"], (2, 1)), atol=1e-7
    )
    assert np.isnan(clip.hands["left"].mano["hand_pose"][1]).all()
    # hand_pose_MANO re-posed as h2oplayer does (45 axis-angles, flat mean) reproduces hand_pose
    src = H2oSource(data[0] / "data", mano_dir=data[0] / "mano")
    assert src.load_clip(CLIP_ID).meta["mano_joint_error_mm"] < 1e-3


def test_bad_input_is_named(data, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(data[0] / "data", root)
    cam4 = root / "subject1" / "h1" / "0" / "cam4"
    (cam4 / "hand_pose" / "000030.txt").unlink()
    with pytest.raises(ValueError, match=r"hand_pose/000030.txt"):
        H2oSource(root).load_clip(CLIP_ID)
    vals = cam_file(data, "cam4", "hand_pose", 30)
    vals[70] = np.nan
    (cam4 / "hand_pose" / "000030.txt").write_text(" ".join(map(str, vals)))
    with pytest.raises(ValueError, match="NaN joints on the right hand"):
        H2oSource(root).load_clip(CLIP_ID)
    (cam4 / "hand_pose" / "000030.txt").write_text(" ".join(map(str, vals[:100])))
    with pytest.raises(ValueError, match="has 100 numbers, expected 128"):
        H2oSource(root).load_clip(CLIP_ID)
    shutil.rmtree(cam4 / "cam_pose")
    src = H2oSource(root)
    assert src.clip_ids() == [] and "no cam_pose" in src.skipped[str(cam4)]


def test_hand3d_build_on_the_fixture(data, tmp_path):
    """`hand3d build --source h2o` with the sensor depth and a tiny random GroundingDINO: rows are built."""
    det = save_tiny_detector(tmp_path / "det")
    args = ["--estimator", "gt-depth", "--detector", f"grounding-dino:{det}", "--object-source", "estimate"]
    report = run_build("h2o", data[0] / "data", tmp_path / "out", *args)
    assert report["clips_done"] == 1 and report["clips_skipped"] == 0
    assert row_count(report) > 0


def test_pose_only_download_gives_trajectory_clips(data, tmp_path):
    """The README's "pose" download mode has no rgb/depth: clips are trajectory-only, cameras unchanged."""
    root = tmp_path / "pose"
    shutil.copytree(data[0] / "data", root, ignore=shutil.ignore_patterns("rgb", "depth"))
    clip = H2oSource(root).load_clip(CLIP_ID)
    assert clip.frames is None and clip.depth is None and clip.image_hw == (720, 1280)
    full = H2oSource(data[0] / "data", load_depth=False).load_clip(CLIP_ID)
    np.testing.assert_array_equal(clip.R, full.R)
    np.testing.assert_array_equal(clip.hands["right"].joints3d, full.hands["right"].joints3d)


def test_default_build_takes_object_positions_from_obj_pose(data, tmp_path):
    """With the defaults (`--object-source auto`, gt-depth, gt-boxes) no learnt model is needed: H2O's object
    centres give the spatial rows (gt-boxes, which needs a segmentation H2O lacks, is never asked for)."""
    report = run_build("h2o", data[0] / "data", tmp_path / "out")
    assert report["clips_done"] == 1 and report["samples"]["visual"]["train"]["spatial_relationship"] > 0
    assert report["frame_drops"].get("boxes", 0) == 0
