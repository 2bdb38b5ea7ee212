"""HaWoR-output adapter (the Taste-Rob path) on a fixture as HaWoR's demo writes it: projections, conventions, bad input."""

import pickle
import shutil

import joblib
import numpy as np
import PIL.Image
import pytest

from hand3d_dataset.sources import SourceAdapter, get_source
from hand3d_dataset.sources._common import MANO_DIR_ENV
from hand3d_dataset.sources.hawor import HaworSource
from tests.source_fixtures import hawor as fx
from tests.source_fixtures._common import MANO21_TO_OPENPOSE, Evil, clip_uv, row_count, run_build, smplx_hand

CLIP_ID = "hawor-kitchen-video_0-c000"

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fx.build_hawor(tmp_path_factory.mktemp("hawor") / "out")


@pytest.fixture(scope="module")
def clip(data):
    return get_source("hawor", root=data["root"]).load_clip(CLIP_ID)


def test_ids_sampling_frames_and_task(data, clip):
    src = get_source("hawor", root=data["root"])
    assert isinstance(src, SourceAdapter) and src.clip_ids() == [CLIP_ID]
    assert clip.meta["frame_indices"] == [0, 30, 60] and clip.fps == 1.0 and clip.objects == []
    for k, f in enumerate([0, 30, 60]):
        jpg = data["root"] / fx.VIDEO / "extracted_images" / f"{f:04d}.jpg"
        np.testing.assert_array_equal(clip.frames[k], np.asarray(PIL.Image.open(jpg).convert("RGB")))
    assert clip.task == fx.TASK and clip.image_hw == fx.IMAGE_HW
    with pytest.raises(ValueError, match="clip_id"):
        src.load_clip("hawor-nope")


def test_joints_project_where_the_hand_computed_projection_says(data, clip):
    np.testing.assert_allclose(clip.K[0], data["K"])
    checked = 0
    for side in ("left", "right"):
        for k, f in enumerate(clip.meta["frame_indices"]):
            if not clip.hands[side].valid[k]:
                continue
            want = data["uv_mano_order"][side][f][MANO21_TO_OPENPOSE]
            np.testing.assert_allclose(clip_uv(clip, side, k), want, atol=1e-3)
            assert np.all((want >= 0) & (want < fx.IMAGE_HW[::-1]))
            checked += 1
    assert checked == 5  # the left hand is invalid on frame 30 (pred_valid = 0 on 20..39)
    assert (
        clip.hands["left"].valid.tolist() == [True, False, True]
        and np.isnan(clip.hands["left"].joints3d[1]).all()
    )


def test_conventions_slam_scale_quaternion_order_flips_and_left_shapedirs(data, clip):
    # t_c2w = traj[:, :3] · scale and the (x, y, z, w) quaternion: camera centres and rotations come back
    np.testing.assert_allclose(clip.camera_centers(), data["t_c2w"][[0, 30, 60]], atol=1e-9)
    np.testing.assert_allclose(np.transpose(clip.R, (0, 2, 1)), data["R_c2w"][[0, 30, 60]], atol=1e-9)
    # demo.py's R_x = diag(1, -1, -1) applied to cameras and hands alike changes no camera-frame point
    Rx = np.diag([1.0, -1.0, -1.0])
    for k in range(3):
        R_c2w, c = data["R_c2w"][[0, 30, 60][k]], data["t_c2w"][[0, 30, 60][k]]
        Rf, cf = Rx @ R_c2w, Rx @ c
        flipped = (clip.hands["right"].joints3d[k] @ Rx.T - cf) @ Rf
        np.testing.assert_allclose(flipped, clip.joints_cam("right")[k], atol=1e-9)
    # the left model's shapedirs x are negated (HaWoR's fix): without it the joints differ
    p = {
        k: np.asarray(v, float)[[0, 60]]
        for k, v in zip(
            ("transl", "global_orient", "hand_pose", "betas"),
            [a[0] for a in joblib.load(data["root"] / fx.VIDEO / "world_space_res.pth")[:4]],
        )
    }
    left = data["root"] / "_DATA" / "data_left" / "mano_left" / "MANO_LEFT.pkl"
    fixed, _ = smplx_hand(left, "left", p, flat_hand_mean=True, flip_shapedirs=True)
    plain, _ = smplx_hand(left, "left", p, flat_hand_mean=True, flip_shapedirs=False)
    got = clip.hands["left"].joints3d[[0, 2]]
    np.testing.assert_allclose(got, fixed[:, MANO21_TO_OPENPOSE], atol=1e-5)
    assert np.abs(got - plain[:, MANO21_TO_OPENPOSE]).max() > 1e-3


def test_bad_input(data, tmp_path, monkeypatch):
    monkeypatch.delenv(MANO_DIR_ENV, raising=False)
    root = tmp_path / "h"
    shutil.copytree(data["root"], root)
    folder = root / fx.VIDEO
    (folder / "task.txt").write_text("wipe the table\n")  # a per-video instruction wins over tasks.json
    assert HaworSource(root).load_clip(CLIP_ID).task == "wipe the table"
    (folder / "extracted_images" / "0060.jpg").unlink()
    with pytest.raises(ValueError, match="extracted_images has 60 images, .*61 frames"):
        HaworSource(root).load_clip(CLIP_ID)
    assert HaworSource(root, images="none").load_clip(CLIP_ID).frames is None
    slam = folder / "SLAM" / "hawor_slam_w_scale_0_61.npz"
    shutil.copy(slam, folder / "SLAM" / "hawor_slam_w_scale_0_30.npz")
    with pytest.raises(ValueError, match="expected one SLAM/hawor_slam_w_scale_<start>_<end>.npz .* found 2"):
        HaworSource(root, images="none").load_clip(CLIP_ID)
    (folder / "SLAM" / "hawor_slam_w_scale_0_61.npz").unlink()
    listed = HaworSource(root, images="none")  # listed from the SLAM trajectory's length (61)
    z = dict(np.load(folder / "SLAM" / "hawor_slam_w_scale_0_30.npz"))
    np.savez(folder / "SLAM" / "hawor_slam_w_scale_0_30.npz", **(z | {"traj": z["traj"][:30]}))
    with pytest.raises(ValueError, match="has 30 camera poses, .*61 frames"):
        listed.load_clip(CLIP_ID)
    np.savez(folder / "SLAM" / "hawor_slam_w_scale_0_30.npz", **z)
    shutil.rmtree(root / "_DATA")
    with pytest.raises(ValueError, match="need MANO model files"):
        HaworSource(root, images="none").load_clip(CLIP_ID)
    # a result file carrying code (joblib.dump of a callable) is refused by name, never run
    marker = tmp_path / "pwned"
    joblib.dump([Evil(marker)], folder / "world_space_res.pth")
    src = HaworSource(root, mano_dir=data["root"] / "_DATA" / "data" / "mano")
    assert src.clip_ids() == [CLIP_ID]  # listed from the SLAM trajectory, the result is read per clip
    with pytest.raises(ValueError, match="refusing to unpickle global"):
        src.load_clip(CLIP_ID)
    assert not marker.exists()
    (folder / "world_space_res.pth").write_bytes(pickle.dumps([np.zeros((2, 5, 3))] * 5))
    with pytest.raises(ValueError, match="has shapes"):
        src.load_clip(CLIP_ID)
    shutil.rmtree(folder / "SLAM")  # without a SLAM file the listing reads the result: a counted skip
    assert "has shapes" in HaworSource(root).skipped[fx.VIDEO]
    assert HaworSource(tmp_path / "h" / "kitchen" / "video_0" / "extracted_images").clip_ids() == []
    with pytest.raises(ValueError, match="is not a folder"):
        HaworSource(tmp_path / "nope")


def test_hand3d_build_on_the_fixture(data, tmp_path):
    """`hand3d build --source hawor` on HaWoR's output without frames: trajectory clips give action rows."""
    root = tmp_path / "h"
    shutil.copytree(data["root"], root, ignore=shutil.ignore_patterns("extracted_images"))
    report = run_build("hawor", root, tmp_path / "out")
    assert report["clips_done"] == 1 and report["clips_skipped"] == 0
    assert row_count(report) > 0
