"""HOI4D adapter on a fixture in HOI4D's layout: joints vs the dataset's own kps2D, conventions, bad input."""

import pickle
import shutil

import av
import numpy as np
import pytest

from hand3d_dataset.sources import SourceAdapter, get_source
from hand3d_dataset.sources._common import MANO_DIR_ENV
from hand3d_dataset.sources.hoi4d import Hoi4dSource, read_open3d_log, task_text
from tests.source_fixtures import hoi4d as fx
from tests.source_fixtures._common import Evil, clip_uv, row_count, run_build, write_video

SEQ = "hoi4d-ZY20210800001-H1-C2-N19-S100-s02-T2"

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fx.build_hoi4d(tmp_path_factory.mktemp("hoi4d") / "HOI4D")


@pytest.fixture(scope="module")
def clips(data):
    src = get_source("hoi4d", root=data["root"])
    return [src.load_clip(f"{SEQ}-c{c:03d}") for c in range(2)]


def test_ids_sampling_frames_and_depth(data, clips):
    src = get_source("hoi4d", root=data["root"])
    assert isinstance(src, SourceAdapter) and src.clip_ids() == [f"{SEQ}-c000", f"{SEQ}-c001"]
    # 300 frames at 15 fps, 1 fps, 10 s chunks: frames 0, 15, ..., 135 and 150, ..., 285
    assert clips[0].meta["frame_indices"] == list(range(0, 150, 15)) and clips[0].fps == 1.0
    assert clips[1].meta["frame_indices"] == list(range(150, 300, 15))
    with av.open(str(data["root"] / "HOI4D_release" / fx.VID / "align_rgb" / "image.mp4")) as c:
        rgb = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    np.testing.assert_array_equal(clips[1].frames, np.stack(rgb[150:300:15]))
    want = (600 + np.arange(150, 300, 15))[:, None, None] / 1000.0  # uint16 millimetres
    np.testing.assert_allclose(clips[1].depth[:, 10:, :], np.broadcast_to(want, (10, 110, 212)), rtol=1e-6)
    assert np.isnan(clips[1].depth[:, :10]).all()  # 0 = no return
    assert clips[0].task == "put the mug in the drawer" and clips[0].objects[0].name == "mug"
    assert task_text(1, 2) == "push toy car" and task_text(14, 1) == "open and close the trash can"
    with pytest.raises(ValueError, match="clip_id"):
        src.load_clip("hoi4d-nope")


def test_joints_project_onto_the_datasets_kps2D(data, clips):
    """Independent check: returned joints, projected with the returned K, R, t, land on HOI4D's kps2D."""
    checked = 0
    for clip in clips:
        np.testing.assert_allclose(clip.K[0], fx.K)
        for side in ("right", "left"):
            for k, f in enumerate(clip.meta["frame_indices"]):
                if clip.hands[side].valid[k]:
                    np.testing.assert_allclose(clip_uv(clip, side, k), data["kps2d"][side][f], atol=1e-3)
                    assert np.all(
                        (data["kps2d"][side][f] >= 0) & (data["kps2d"][side][f] < fx.IMAGE_HW[::-1])
                    )
                    checked += 1
    assert checked == 20 + 7  # the left hand is annotated on frames 100..199 only


def test_conventions_open3d_log_camera_to_world_and_objects(data, clips):
    # output.log holds camera → world poses: the clip's camera centres are their translations
    np.testing.assert_allclose(clips[0].camera_centers(), data["c2w"][0:150:15, :3, 3], atol=1e-9)
    np.testing.assert_allclose(
        read_open3d_log(data["root"] / "HOI4D_annotations" / fx.VID / "3Dseg" / "output.log", "t"),
        data["c2w"],
    )
    # absent left-hand frames are invalid (NaN), never zeros
    left = clips[0].hands["left"]
    assert (
        left.valid.tolist() == [f in fx.LEFT_FRAMES for f in range(0, 150, 15)]
        and np.isnan(left.joints3d[0]).all()
    )
    # object centre from objpose (camera frame) moved to the world; frame 150 has no pose file
    np.testing.assert_allclose(clips[1].objects[0].position3d[1:], data["obj_world"][165:300:15], atol=1e-6)
    assert np.isnan(clips[1].objects[0].position3d[0]).all()


def test_bad_input(data, tmp_path, monkeypatch):
    monkeypatch.delenv(MANO_DIR_ENV, raising=False)
    root = tmp_path / "h"
    shutil.copytree(data["root"], root)
    right = root / "handpose" / "refinehandpose_right" / fx.VID
    rec = pickle.loads((right / "30.pickle").read_bytes())  # the test's own fixture file
    rec["poseCoeff"][5] = np.nan
    (right / "30.pickle").write_bytes(pickle.dumps(rec, protocol=2))
    clip = Hoi4dSource(root).load_clip(f"{SEQ}-c000")
    assert clip.hands["right"].valid.tolist() == [True, True, False] + [True] * 7
    # a truncated trajectory and a truncated video name their files
    log = root / "HOI4D_annotations" / fx.VID / "3Dseg" / "output.log"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[: 5 * 200]) + "\n")
    with pytest.raises(ValueError, match="output.log has 200 poses, need frame 285"):
        Hoi4dSource(root).load_clip(f"{SEQ}-c001")
    write_video(
        root / "HOI4D_release" / fx.VID / "align_rgb" / "image.mp4",
        np.zeros((20, *fx.IMAGE_HW, 3), np.uint8),
        "libx264",
        15,
    )
    with pytest.raises(ValueError, match="image.mp4 ends before frame 30"):
        Hoi4dSource(root).load_clip(f"{SEQ}-c000")
    assert Hoi4dSource(root, images="none").load_clip(f"{SEQ}-c000").frames is None
    intrin = root / "camera_params" / fx.VID.split("/")[0] / "intrin.npy"
    kept = intrin.read_bytes()
    intrin.unlink()
    with pytest.raises(ValueError, match="missing intrinsics .*intrin.npy"):
        Hoi4dSource(root).load_clip(f"{SEQ}-c000")
    intrin.write_bytes(kept)
    # without MANO files the clip is refused (trans is not the wrist)
    shutil.rmtree(root / "mano")
    with pytest.raises(ValueError, match="need MANO model files"):
        Hoi4dSource(root, images="none").load_clip(f"{SEQ}-c000")
    # a hand pickle carrying code is refused by name, never run
    marker = tmp_path / "pwned"
    (right / "0.pickle").write_bytes(pickle.dumps({"poseCoeff": Evil(marker)}))
    with pytest.raises(ValueError, match="refusing to unpickle global"):
        Hoi4dSource(root, mano_dir=data["mano_dir"]).load_clip(f"{SEQ}-c000")
    assert not marker.exists()
    with pytest.raises(ValueError, match="no handpose/refinehandpose_right/"):
        Hoi4dSource(tmp_path)


def test_hand3d_build_on_the_fixture(data, tmp_path):
    """`hand3d build --source hoi4d` on the annotations (no videos): trajectory clips give action rows."""
    root = tmp_path / "h"
    shutil.copytree(data["root"], root, ignore=shutil.ignore_patterns("HOI4D_release"))
    report = run_build("hoi4d", root, tmp_path / "out")
    assert report["clips_done"] == 2 and report["clips_skipped"] == 0
    assert row_count(report) > 0
