"""DexYCB adapter on a fixture in the toolkit's layout: joints vs the dataset's own joint_2d, conventions, bad input."""

import shutil

import numpy as np
import pytest
import yaml

from hand3d_dataset.clip import HAND_SEGMENT
from hand3d_dataset.sources import SourceAdapter, get_source
from hand3d_dataset.sources.dexycb import DexYcbSource
from tests.source_fixtures import dexycb as fx
from tests.source_fixtures._common import clip_uv, pose_mano, row_count, run_build

SEQ_ID = f"dexycb-{fx.SUBJECT}-{fx.SEQUENCE}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dexycb")
    truth = fx.build_dexycb(root / "data", root / "mano")
    return root, truth


@pytest.fixture(scope="module")
def clips(data):
    src = get_source("dexycb", root=data[0] / "data")
    return {s: src.load_clip(f"{SEQ_ID}-{s}-c000") for s in fx.SERIALS}


def test_ids_frames_and_sampling(data, clips):
    src = get_source("dexycb", root=data[0] / "data")
    assert isinstance(src, SourceAdapter)
    assert src.clip_ids() == [f"{SEQ_ID}-{s}-c000" for s in fx.SERIALS]
    clip = clips[fx.SERIALS[0]]
    # 61 frames at 30 fps sampled at 1 fps: frames 0, 30, 60, one chunk
    assert clip.meta["frame_indices"] == [0, 30, 60] and clip.fps == 1.0
    assert clip.frames.shape == (3, 480, 640, 3) and clip.depth.shape == (3, 480, 640)
    assert DexYcbSource(data[0] / "data", serials=[fx.SERIALS[1]]).clip_ids() == [
        f"{SEQ_ID}-{fx.SERIALS[1]}-c000"
    ]
    with pytest.raises(ValueError, match="clip_id"):
        src.load_clip("dexycb-nope")


def test_joints_project_onto_the_datasets_joint_2d(data, clips):
    """Independent check: the returned joints, projected with the returned K, R, t, land on joint_2d."""
    root = data[0] / "data"
    for serial, clip in clips.items():
        intr = yaml.safe_load((root / "calibration" / "intrinsics" / f"{serial}_640x480.yml").read_text())[
            "color"
        ]
        np.testing.assert_allclose(
            clip.K[0], [[intr["fx"], 0, intr["ppx"]], [0, intr["fy"], intr["ppy"]], [0, 0, 1]]
        )
        hand = clip.hands["right"]
        checked = 0
        for k, f in enumerate(clip.meta["frame_indices"]):
            label = np.load(root / fx.SUBJECT / fx.SEQUENCE / serial / f"labels_{f:06d}.npz")
            if not hand.valid[k]:
                continue
            np.testing.assert_allclose(clip_uv(clip, "right", k), label["joint_2d"][0], atol=1e-3)
            checked += 1
        assert checked == 2


def test_hand_absent_frame_is_invalid_not_minus_one(clips):
    hand = clips[fx.SERIALS[0]].hands["right"]
    assert hand.valid.tolist() == [True, False, True]  # frame 30 has pose_m = 0, joints = -1
    assert np.isnan(hand.joints3d[1]).all() and np.isnan(hand.mano["pose_pca"][1]).all()
    assert np.isfinite(hand.mano["betas"]).all()


def test_each_camera_is_its_own_world_and_objects_come_from_pose_y(data, clips):
    """Convention: labels are per camera, so camera 2's joints are camera 1's moved by the rig's extrinsics."""
    root, truth = data
    c1, c2 = clips[fx.SERIALS[0]], clips[fx.SERIALS[1]]
    extr = yaml.safe_load(
        (root / "data" / "calibration" / "extrinsics_20200702_151821" / "extrinsics.yml").read_text()
    )["extrinsics"]
    T2 = np.vstack([np.array(extr[fx.SERIALS[1]]).reshape(3, 4), [0, 0, 0, 1]])  # camera 2 → master
    R_m2, t_m2 = np.linalg.inv(T2)[:3, :3], np.linalg.inv(T2)[:3, 3]
    v = c1.hands["right"].valid
    np.testing.assert_allclose(
        c2.hands["right"].joints3d[v], c1.hands["right"].joints3d[v] @ R_m2.T + t_m2, atol=1e-5
    )
    for clip in (c1, c2):
        np.testing.assert_array_equal(clip.R, np.tile(np.eye(3), (3, 1, 1)))
        np.testing.assert_array_equal(clip.t, 0)
    assert [o.name for o in c1.objects] == [
        "mustard bottle",
        "mug",
    ] and c1.task == "pick up the mustard bottle"
    np.testing.assert_allclose(
        c2.object("mug").position3d, np.tile(truth["objects"][fx.SERIALS[1]][1], (3, 1)), atol=1e-6
    )
    # segmentation: YCB ids for objects, the hand's 255 → HAND_SEGMENT
    seg = c1.segmentation[0]
    assert {int(v) for v in np.unique(seg)} == {0, 5, 14, HAND_SEGMENT["right"]}
    assert [o.segment_id for o in c1.objects] == [5, 14]
    # depth: uint16 mm → metres; the wall is 0.9 m
    assert np.nanmax(c1.depth) == pytest.approx(0.9)


def test_mano_params_follow_the_toolkit_convention(data):
    """pose_m re-posed with PCA-45 and the mean pose (flat_hand_mean=False) reproduces joint_3d; flat does not."""
    root, truth = data
    clip = DexYcbSource(root / "data", mano_dir=root / "mano").load_clip(f"{SEQ_ID}-{fx.SERIALS[0]}-c000")
    assert clip.meta["mano_joint_error_mm"] < 0.05
    hand = clip.hands["right"]
    k = 0
    flat = pose_mano(
        root / "mano",
        "right",
        *(hand.mano[key][k : k + 1] for key in ("global_orient", "pose_pca", "betas", "transl")),
        **(fx.TOOLKIT_MANO | {"flat_hand_mean": True}),
    )
    assert (
        np.linalg.norm(flat[0] - hand.joints3d[k], axis=-1).max() > 0.005
    )  # the other convention is off by mm
    np.testing.assert_allclose(hand.mano["pose_pca"][0], truth["pose_m"][fx.SERIALS[0]][0, 3:48], atol=1e-6)


def test_bad_input_names_the_file(data, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(data[0] / "data", root)
    cam = root / fx.SUBJECT / fx.SEQUENCE / fx.SERIALS[0]
    (cam / "labels_000030.npz").unlink()
    with pytest.raises(ValueError, match="labels_000030.npz"):
        DexYcbSource(root).load_clip(f"{SEQ_ID}-{fx.SERIALS[0]}-c000")
    label = dict(np.load(cam / "labels_000060.npz"))
    label["pose_m"][0, 5] = np.nan
    np.savez(cam.parent / fx.SERIALS[1] / "labels_000060.npz", **label)
    with pytest.raises(ValueError, match=r"labels_000060.npz has non-finite values in pose_m"):
        DexYcbSource(root).load_clip(f"{SEQ_ID}-{fx.SERIALS[1]}-c000")
    meta = yaml.safe_load((cam.parent / "meta.yml").read_text())
    del meta["ycb_ids"]
    (cam.parent / "meta.yml").write_text(yaml.safe_dump(meta))
    src = DexYcbSource(root)
    assert src.clip_ids() == [] and "ycb_ids" in next(iter(src.skipped.values()))


def test_hand3d_build_on_the_fixture(data, tmp_path):
    """`hand3d build --source dexycb` with the dataset's own depth and segmentation: rows, no skips."""
    root = tmp_path / "src"
    shutil.copytree(data[0] / "data", root)
    (root / fx.SUBJECT / fx.SEQUENCE / fx.SERIALS[1] / "color_000060.jpg").unlink()  # one bad clip
    report = run_build(
        "dexycb",
        root,
        tmp_path / "out",
        "--num-clips",
        "2",
        "--estimator",
        "gt-depth",
        "--detector",
        "gt-boxes",
    )
    assert report["clips_done"] == 1 and report["clips_skipped"] == 1
    assert "color_000060.jpg" in report["skipped"][0]["reason"]
    assert row_count(report) > 0
