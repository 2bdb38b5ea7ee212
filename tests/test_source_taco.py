"""TACO adapter on a fixture in TACO's layout: joints vs hand-computed projections, conventions, bad input."""

import pickle
import shutil

import av
import numpy as np
import pytest
import torch

from hand3d_dataset.sources import SourceAdapter, get_source
from hand3d_dataset.sources._common import MANO_DIR_ENV
from hand3d_dataset.sources.taco import TacoSource, parse_triplet
from tests.source_fixtures import taco as fx
from tests.source_fixtures._common import (
    MANO21_TO_OPENPOSE,
    Evil,
    clip_uv,
    noise_image,
    row_count,
    run_build,
    save_tiny_detector,
    write_video,
)

CLIP_ID = f"taco-stir_spoon_bowl-{fx.SEQ}-c000"

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fx.build_taco(tmp_path_factory.mktemp("taco") / "TACO")


@pytest.fixture(scope="module")
def clip(data):
    return get_source("taco", root=data["root"]).load_clip(CLIP_ID)


def _decode(path, fmt):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format=fmt) for f in c.decode(video=0)]


def test_ids_sampling_frames_and_depth(data, clip):
    src = get_source("taco", root=data["root"])
    assert isinstance(src, SourceAdapter) and src.clip_ids() == [CLIP_ID]
    assert clip.meta["frame_indices"] == [0, 30, 60] and clip.fps == 1.0
    rgb = _decode(data["root"] / "Egocentric_RGB_Videos" / fx.TRIPLET / fx.SEQ / "color.mp4", "rgb24")
    np.testing.assert_array_equal(clip.frames, np.stack([rgb[0], rgb[30], rgb[60]]))
    raw = _decode(
        data["root"] / "Egocentric_Depth_Videos" / fx.TRIPLET / fx.SEQ / "egocentric_depth.avi", "gray16le"
    )
    assert raw[30][5, 100] == 2030  # 0.5 m + 30 units, written as uint16
    np.testing.assert_allclose(clip.depth[1, :, 20:], (2000 + 30) / 4000.0)  # 0.25 mm units
    assert np.isnan(clip.depth[:, :, :20]).all()  # 0 = no return
    assert clip.task == "stir the bowl with the spoon" and [o.name for o in clip.objects] == ["spoon", "bowl"]
    assert parse_triplet("(cut, knife, apple)") == ("cut", "knife", "apple")
    with pytest.raises(ValueError, match="clip_id"):
        src.load_clip("taco-nope")


def test_joints_project_where_the_hand_computed_projection_says(data, clip):
    np.testing.assert_allclose(clip.K[0], fx.K)
    for side in ("left", "right"):
        assert clip.hands[side].valid.all()
        for k, i in enumerate(clip.meta["frame_indices"]):
            want = data["uv_mano_order"][side][i][MANO21_TO_OPENPOSE]
            np.testing.assert_allclose(clip_uv(clip, side, k), want, atol=1e-3)


def test_conventions_wrist_at_trans_extrinsics_and_object_units(data, clip):
    for side in ("left", "right"):  # center_idx=0 then + hand_trans: the wrist is hand_trans
        np.testing.assert_allclose(
            clip.hands[side].joints3d[:, 0], data["trans"][side][[0, 30, 60]], atol=1e-6
        )
    # egocentric_frame_extrinsic is world → camera: the camera centre −Rᵀt is the fixture's eye
    np.testing.assert_allclose(clip.camera_centers()[2], [0.1 * np.sin(1.8), -0.3, 0.35], atol=1e-9)
    # Object_Models are in centimetres: the bowl's centre sits 3.5 cm above its pose origin
    np.testing.assert_allclose(
        clip.object("bowl").position3d, data["centres"]["target"][[0, 30, 60]], atol=1e-9
    )
    np.testing.assert_allclose(clip.object("bowl").position3d[:, 2], 0.035, atol=1e-9)


def test_without_mano_files_hands_are_wrist_only(data, tmp_path, monkeypatch):
    monkeypatch.delenv(MANO_DIR_ENV, raising=False)
    shutil.copytree(
        data["root"], tmp_path / "t", ignore=shutil.ignore_patterns("mano", "Egocentric_*_Videos")
    )
    clip = TacoSource(tmp_path / "t").load_clip(CLIP_ID)
    assert clip.hands["right"].wrist_only and clip.frames is None and clip.image_hw == (1080, 1920)
    np.testing.assert_allclose(clip.hands["right"].wrist3d, data["trans"]["right"][[0, 30, 60]], atol=1e-6)


def test_bad_input(data, tmp_path):
    root = tmp_path / "t"
    shutil.copytree(data["root"], root)
    hands = root / "Hand_Poses" / fx.TRIPLET / fx.SEQ
    poses = pickle.loads((hands / "left_hand.pkl").read_bytes())  # the test's own fixture file
    poses["00030"]["hand_pose"] = torch.full((48,), float("nan"))
    (hands / "left_hand.pkl").write_bytes(pickle.dumps(poses))
    clip = TacoSource(root).load_clip(CLIP_ID)
    assert clip.hands["left"].valid.tolist() == [True, False, True] and clip.hands["right"].valid.all()
    # a video that lost frames (40 of 61): the loader's skip, with the file named
    rgb = root / "Egocentric_RGB_Videos" / fx.TRIPLET / fx.SEQ / "color.mp4"
    write_video(rgb, np.stack([noise_image(*fx.IMAGE_HW, k) for k in range(40)]), "libx264")
    with pytest.raises(ValueError, match="color.mp4 has 40 frames for 61 poses"):
        TacoSource(root).load_clip(CLIP_ID)
    rgb.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot decode .*color.mp4"):
        TacoSource(root).load_clip(CLIP_ID)
    assert TacoSource(root, images="none").load_clip(CLIP_ID).frames is None
    (root / "Egocentric_Camera_Parameters" / fx.TRIPLET / fx.SEQ / "egocentric_intrinsic.txt").unlink()
    with pytest.raises(ValueError, match="missing .*egocentric_intrinsic.txt"):
        TacoSource(root).load_clip(CLIP_ID)
    # a triplet folder that is not "(action, tool, target)" and a pickle carrying code: counted skips
    shutil.copytree(hands, root / "Hand_Poses" / "stir spoon bowl" / fx.SEQ)
    marker = tmp_path / "pwned"
    (hands / "right_hand.pkl").write_bytes(pickle.dumps({"00000": Evil(marker)}))
    src = TacoSource(root, images="none")
    assert src.clip_ids() == [CLIP_ID]  # listed from the extrinsics' header, without unpickling
    (root / "Egocentric_Camera_Parameters" / fx.TRIPLET / fx.SEQ / "egocentric_intrinsic.txt").write_text(
        "\n".join(" ".join(str(v) for v in row) for row in fx.K)
    )
    with pytest.raises(ValueError, match="refusing to unpickle global"):
        src.load_clip(CLIP_ID)
    assert not marker.exists()
    assert "not TACO's '(action, tool, target)'" in src.skipped[f"stir spoon bowl/{fx.SEQ}"]
    with pytest.raises(ValueError, match="no Hand_Poses/"):
        TacoSource(tmp_path)


def test_hand3d_build_on_the_fixture(data, tmp_path):
    """`hand3d build --source taco` on the pose-only download: trajectory clips give action rows."""
    root = tmp_path / "t"
    shutil.copytree(data["root"], root, ignore=shutil.ignore_patterns("Egocentric_*_Videos"))
    report = run_build("taco", root, tmp_path / "out")
    assert report["clips_done"] == 1 and report["clips_skipped"] == 0
    assert row_count(report) > 0


def test_hand3d_build_with_frames_and_depth_gives_visual_rows(data, tmp_path):
    """With the videos: TACO's own egocentric depth calibrates the clouds (`--estimator gt-depth`) and a tiny
    random GroundingDINO stands in for the detector; the clip yields visual rows as well as action rows."""
    det = save_tiny_detector(tmp_path / "gd")
    args = ["--estimator", "gt-depth", "--detector", f"grounding-dino:{det}", "--object-source", "estimate"]
    report = run_build("taco", data["root"], tmp_path / "out", *args)
    assert report["clips_done"] == 1 and report["clips_skipped"] == 0
    assert row_count(report, "visual") > 0 and row_count(report, "action") > 0
