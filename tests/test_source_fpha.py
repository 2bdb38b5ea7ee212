"""FPHA adapter on a fixture in the README's layout: projection by hand with the README's camera, joint order, depth."""

import shutil

import numpy as np
import pytest

from hand3d_dataset.sources import SourceAdapter, get_source
from hand3d_dataset.sources.fpha import FphaSource
from tests.source_fixtures import fpha as fx
from tests.source_fixtures._common import clip_uv, row_count, run_build, save_tiny_detector

CLIP_ID = "fpha-Subject_1-put_salt-1-c000"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fpha")
    truth = fx.build_fpha(root / "data", root / "mano")
    return root / "data", truth


@pytest.fixture(scope="module")
def clip(data):
    return get_source("fpha", root=data[0]).load_clip(CLIP_ID)


def test_ids_camera_values_and_sampling(data, clip):
    src = get_source("fpha", root=data[0])
    assert isinstance(src, SourceAdapter) and src.clip_ids() == [CLIP_ID]
    np.testing.assert_allclose(
        clip.K[0], [[1395.749023, 0, 935.732544], [0, 1395.749268, 540.681030], [0, 0, 1]]
    )
    np.testing.assert_allclose(clip.t[0] * 1000, [25.7, 1.22, 3.902])  # depth → colour translation, mm
    assert clip.image_hw == (1080, 1920) and clip.frames.shape == (3, 1080, 1920, 3)
    assert clip.meta["frame_indices"] == [0, 30, 60] and clip.fps == 1.0
    assert clip.task == "put salt" and [o.name for o in clip.objects] == ["salt"]


def test_joints_project_where_the_readme_camera_puts_the_pose(data, clip):
    """Independent: the fixture's MANO joints (metres, depth camera), moved by the README extrinsic and
    projected with the README intrinsics by hand, land where the adapter's joints and camera project."""
    truth = data[1]["joints"][0]
    p = fx.EXTR_R @ (truth.T * 1000.0) + fx.EXTR_T_MM[:, None]  # mm, colour camera
    fxx, fyy, cx, cy = fx.COLOR
    want = np.column_stack([fxx * p[0] / p[2] + cx, fyy * p[1] / p[2] + cy])
    np.testing.assert_allclose(clip_uv(clip, "right", 0), want, atol=1e-3)
    np.testing.assert_allclose(clip.hands["right"].joints3d[0], truth, atol=1e-6)  # OpenPose order, metres


def test_joint_order_follows_the_readme_names(data, clip):
    """Convention: skeleton.txt is [Wrist, TMCP, IMCP, MMCP, RMCP, PMCP, TPIP, ...]; OpenPose is finger by finger."""
    row = np.array(
        (data[0] / "Hand_pose_annotation_v1" / "Subject_1" / "put_salt" / "1" / "skeleton.txt")
        .read_text()
        .splitlines()[0]
        .split(),
        float,
    )
    fpha = row[1:].reshape(21, 3) / 1000
    j = clip.hands["right"].joints3d[0]
    np.testing.assert_allclose(j[1], fpha[1], atol=1e-9)  # thumb MCP
    np.testing.assert_allclose(j[2], fpha[6], atol=1e-9)  # thumb PIP
    np.testing.assert_allclose(j[5], fpha[2], atol=1e-9)  # index MCP
    np.testing.assert_allclose(j[20], fpha[20], atol=1e-9)  # pinky tip


def test_absent_frame_object_pose_and_colour_aligned_depth(data, clip):
    hand = clip.hands["right"]
    assert hand.valid.tolist() == [True, False, True] and np.isnan(hand.joints3d[1]).all()
    np.testing.assert_allclose(clip.object("salt").position3d, data[1]["object_t"][[0, 30, 60]], atol=1e-6)
    # the depth camera's hand, reprojected: at the wrist's colour pixel the depth is the wrist disc's z
    w = clip.joints_cam("right")[0, 0]
    K = clip.K[0]
    u, v = (int(np.rint(K[i, i] * w[i] / w[2] + K[i, 2])) for i in (0, 1))
    assert abs(clip.depth[0, v, u] - w[2]) < 0.005
    # the wall (0.8 m in the depth camera) seen from the colour camera, 3.9 mm further
    assert np.nanmax(clip.depth) == pytest.approx(0.8 + 0.0039, abs=0.003)


def test_bad_input_is_named(data, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(data[0], root)
    seq = ("Subject_1", "put_salt", "1")
    (root / "Video_files" / "/".join(seq) / "color" / "color_0030.jpeg").unlink()
    with pytest.raises(ValueError, match="color_0030.jpeg"):
        FphaSource(root).load_clip(CLIP_ID)
    skel = root / "Hand_pose_annotation_v1" / "/".join(seq) / "skeleton.txt"
    lines = skel.read_text().splitlines()
    lines[0] = lines[0].replace(lines[0].split()[5], "nan", 1)
    skel.write_text("\n".join(lines))
    with pytest.raises(ValueError, match="skeleton.txt has NaN joints on frames \\[0\\]"):
        FphaSource(root).load_clip(CLIP_ID)
    skel.write_text("\n".join(lines[:30]))  # truncated: fewer than 2 sampled frames → no clip
    assert FphaSource(root).clip_ids() == []
    skel.write_text("\n".join(lines[:3] + ["3 1 2 3"]))
    src = FphaSource(root)
    assert "line 4 has 4 numbers, expected 64" in src.skipped[str(skel)]
    with pytest.raises(ValueError, match="Hand_pose_annotation_v1"):
        FphaSource(root / "Video_files")


def test_hand3d_build_on_the_fixture(data, tmp_path):
    """`hand3d build --source fpha` with the reprojected sensor depth and a tiny random GroundingDINO."""
    det = save_tiny_detector(tmp_path / "det")
    args = ["--estimator", "gt-depth", "--detector", f"grounding-dino:{det}", "--object-source", "estimate"]
    report = run_build("fpha", data[0], tmp_path / "out", *args)
    assert report["clips_done"] == 1 and report["clips_skipped"] == 0
    assert row_count(report) > 0
