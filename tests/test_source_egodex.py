"""EgoDex adapter on a fixture in the README's layout: hand-computed ARKit projection, joint mapping, axes, bad input."""

import shutil

import h5py
import numpy as np
import pytest

from hand3d_dataset.sources import SourceAdapter, get_source
from hand3d_dataset.sources.egodex import EgoDexSource
from tests.source_fixtures import egodex as fx
from tests.source_fixtures._common import (
    clip_uv,
    row_count,
    run_build,
    save_tiny_depth_model,
    save_tiny_detector,
)

CLIP_ID = "egodex-part1-add_remove_lid-0-c000"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("egodex")
    truth = fx.build_egodex(root / "data", root / "mano")
    return root, truth


@pytest.fixture(scope="module")
def clip(data):
    return get_source("egodex", root=data[0] / "data" / "part1").load_clip(CLIP_ID)


def test_ids_intrinsics_frames_and_task(data, clip):
    src = get_source("egodex", root=data[0] / "data" / "part1")
    assert isinstance(src, SourceAdapter) and src.clip_ids() == [CLIP_ID]
    assert EgoDexSource(data[0] / "data").clip_ids() == [CLIP_ID]  # the folder above the parts
    np.testing.assert_allclose(clip.K[0], [[736.6339, 0, 960], [0, 736.6339, 540], [0, 0, 1]], rtol=1e-7)
    assert clip.image_hw == (1080, 1920) and clip.meta["frame_indices"] == [0, 30] and clip.fps == 1.0
    assert clip.task == fx.DESCRIPTION and clip.objects == []
    # the decoded frames are the video's frames 0 and 30 (each rendered differently), up to compression
    for k, f in enumerate((0, 30)):
        err = np.abs(clip.frames[k].astype(int) - data[1]["frames"][f]).mean()
        other = np.abs(clip.frames[k].astype(int) - data[1]["frames"][f - 1 if f else 1]).mean()
        assert err < 4 and other > 4 * err


def test_joints_project_where_the_arkit_camera_puts_them(data, clip):
    """Independent: world joints projected by hand through the ARKit camera (looks down −z, y up)."""
    assert clip.meta["camera_axes"] == "arkit"
    for side in ("left", "right"):
        hand = clip.hands[side]
        for k, f in enumerate((0, 30)):
            if not hand.valid[k]:
                continue
            want = fx.project_gl(data[1]["T_wc_gl"][f], data[1]["joints"][side][f])
            np.testing.assert_allclose(clip_uv(clip, side, k), want, atol=0.01)
            assert (clip.joints_cam(side)[k][:, 2] > 0).all()  # in front of the OpenCV camera


def test_25_arkit_joints_map_to_openpose_without_the_metacarpals(data, clip):
    j = clip.hands["right"].joints3d[0]
    truth = data[1]["joints"]["right"][0]
    np.testing.assert_allclose(j, truth, atol=1e-5)  # all 21 OpenPose joints, in order
    with h5py.File(data[0] / "data" / fx.PART / fx.TASK / "0.hdf5") as f:
        knuckle = f["transforms/rightIndexFingerKnuckle"][0][:3, 3]
        metacarpal = f["transforms/rightIndexFingerMetacarpal"][0][:3, 3]
    np.testing.assert_allclose(j[5], knuckle, atol=1e-7)  # index MCP is the knuckle, not the metacarpal
    assert np.linalg.norm(j[5] - metacarpal) > 0.01


def test_low_confidence_is_an_invalid_frame(clip):
    assert clip.hands["left"].valid.tolist() == [True, False] and clip.hands["right"].valid.all()
    assert np.isnan(clip.hands["left"].joints3d[1]).all()


def test_opencv_axes_are_recognised_and_give_the_same_camera(data, tmp_path, clip):
    """Convention: a file whose camera is stored with OpenCV axes is detected and yields identical R, t."""
    fx.build_egodex(tmp_path / "cv", tmp_path / "mano", axes="opencv")
    cv = EgoDexSource(tmp_path / "cv" / "part1").load_clip(CLIP_ID)
    assert cv.meta["camera_axes"] == "opencv"
    np.testing.assert_allclose(cv.R, clip.R, atol=1e-6)
    np.testing.assert_allclose(cv.t, clip.t, atol=1e-6)
    forced = EgoDexSource(tmp_path / "cv" / "part1", camera_axes="arkit", load_frames=False).load_clip(
        CLIP_ID
    )
    assert (forced.joints_cam("right")[:, :, 2] < 0).all()  # the wrong convention puts the hands behind
    with pytest.raises(ValueError, match="camera_axes"):
        EgoDexSource(tmp_path / "cv", camera_axes="opengl")


def test_bad_input_is_named(data, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(data[0] / "data", root)
    ep = root / fx.PART / fx.TASK
    # truncated video: only 20 frames where the HDF5 has 31
    fx.write_mp4(ep / "0.mp4", data[1]["frames"][:20])
    with pytest.raises(ValueError, match=r"0.mp4 ends before frame 30 \(truncated video of 20 frames\)"):
        EgoDexSource(root).load_clip(CLIP_ID)
    (ep / "0.mp4").write_bytes((data[0] / "data" / fx.PART / fx.TASK / "0.mp4").read_bytes()[:5000])
    with pytest.raises(ValueError, match="0.mp4"):
        EgoDexSource(root).load_clip(CLIP_ID)
    (ep / "0.mp4").unlink()
    with pytest.raises(ValueError, match="missing video"):
        EgoDexSource(root).load_clip(CLIP_ID)
    with h5py.File(ep / "0.hdf5", "r+") as f:
        del f["transforms/rightThumbTip"]
        f.attrs["llm_objects"] = np.array(["pot", "lid"], dtype=object)
    with pytest.raises(ValueError, match="no dataset 'transforms/rightThumbTip'"):
        EgoDexSource(root, load_frames=False).load_clip(CLIP_ID)
    with h5py.File(ep / "0.hdf5", "r+") as f:
        f.create_dataset("transforms/rightThumbTip", data=np.full((31, 4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="non-finite values in transforms/right"):
        EgoDexSource(root, load_frames=False).load_clip(CLIP_ID)
    (ep / "1.hdf5").write_bytes(b"not an hdf5 file")
    src = EgoDexSource(root)
    assert "transforms/camera" in src.skipped[str(ep / "1.hdf5")]


def test_object_names_from_llm_objects(data, tmp_path):
    root = tmp_path / "obj"
    shutil.copytree(data[0] / "data", root)
    with h5py.File(root / fx.PART / fx.TASK / "0.hdf5", "r+") as f:
        f.attrs["llm_objects"] = np.array(["pot", "lid"], dtype=object)
        del f.attrs["llm_description"]
    clip = EgoDexSource(root, load_frames=False).load_clip(CLIP_ID)
    assert [o.name for o in clip.objects] == ["pot", "lid"] and clip.frames is None
    assert clip.task == "add remove lid"  # no description: the task folder


def test_hand3d_build_on_the_fixture(data, tmp_path):
    """`hand3d build --source egodex` (no depth): a tiny random DepthAnything and GroundingDINO."""
    depth, det = save_tiny_depth_model(tmp_path / "depth"), save_tiny_detector(tmp_path / "det")
    report = run_build(
        "egodex",
        data[0] / "data",
        tmp_path / "out",
        "--estimator",
        f"depth-anything:{depth}",
        "--detector",
        f"grounding-dino:{det}",
    )
    assert report["clips_done"] == 1 and report["clips_skipped"] == 0
    assert row_count(report) > 0
