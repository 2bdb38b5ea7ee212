"""OakInk2 adapter on a fixture in the toolkit's layout: joints vs hand-computed projections, conventions, bad input."""

import json
import pickle
import shutil

import numpy as np
import PIL.Image
import pytest

from hand3d_dataset.sources import SourceAdapter, get_source
from hand3d_dataset.sources._common import CACHE_ENV, MANO_DIR_ENV
from hand3d_dataset.sources.oakink2 import OakInk2Source, quat_wxyz_to_axis_angle
from tests.source_fixtures import oakink2 as fx
from tests.source_fixtures._common import MANO21_TO_OPENPOSE, Evil, clip_uv, row_count, run_build

CLIP_ID = f"oakink2-{fx.TOKEN}-c000"

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def frame_count_cache(tmp_path_factory):
    """The adapter remembers frame counts in $HAND3D_CACHE; keep this module's index in a temporary folder."""
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("cache")
    mp.setenv(CACHE_ENV, str(folder))
    yield folder
    mp.undo()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fx.build_oakink2(tmp_path_factory.mktemp("oakink2"))


@pytest.fixture(scope="module")
def clip(data):
    return get_source("oakink2", root=data["root"]).load_clip(CLIP_ID)


def _copy(data, dst, images=True):
    shutil.copytree(data["root"].parent, dst, ignore=None if images else shutil.ignore_patterns("data"))
    return dst / "OakInk-v2"


def test_ids_sampling_and_egocentric_frames(data, clip):
    src = get_source("oakink2", root=data["root"])
    assert isinstance(src, SourceAdapter) and src.clip_ids() == [CLIP_ID]
    assert clip.meta["frame_indices"] == [0, 30, 60] and clip.fps == 1.0
    assert clip.meta["mocap_frame_ids"] == [100, 220, 340]  # colour frames are every 4th mocap id
    assert clip.frames.shape == (3, *fx.IMAGE_HW, 3) and clip.image_hw == fx.IMAGE_HW
    for k, f in enumerate([100, 220, 340]):  # the egocentric serial's frames, not the allocentric one's
        png = data["root"] / "data" / fx.TOKEN / fx.EGO_SERIAL / f"{f:06d}.png"
        np.testing.assert_array_equal(clip.frames[k], np.asarray(PIL.Image.open(png).convert("RGB")))
    assert [o.name for o in clip.objects] == ["teapot", "cup"]
    # the chunk (mocap ids 100..340) overlaps the pouring segment most
    assert clip.task == "pour water from the teapot into the cup"
    with pytest.raises(ValueError, match="clip_id"):
        src.load_clip("oakink2-nope")


def test_listing_uses_the_cached_frame_count(data, frame_count_cache, monkeypatch):
    """The second listing does not unpickle the annotation again: its frame count comes from the index."""
    from hand3d_dataset import safe_pickle

    OakInk2Source(data["root"])
    index = json.loads((frame_count_cache / "frame_counts.json").read_text())
    assert [v for k, v in index.items() if k.startswith(str(data["root"].resolve()))] == [61]

    def refuse(*a, **k):
        raise AssertionError("unpickled again")

    monkeypatch.setattr(safe_pickle, "load", refuse)
    assert OakInk2Source(data["root"]).clip_ids() == [CLIP_ID]


def test_joints_project_where_the_hand_computed_projection_says(data, clip):
    np.testing.assert_allclose(clip.K[0], fx.K_EGO, atol=1e-5)
    for side in ("left", "right"):
        assert clip.hands[side].valid.all()
        for k, i in enumerate(clip.meta["frame_indices"]):
            want = data["uv_mano_order"][side][i][MANO21_TO_OPENPOSE]
            np.testing.assert_allclose(clip_uv(clip, side, k), want, atol=1e-3)
            assert np.all((want >= 0) & (want < fx.IMAGE_HW[::-1]))


def test_conventions_quaternion_order_centring_and_cameras(data, clip):
    # (w, x, y, z): a rotation of 0.7 rad about y is (cos 0.35, 0, sin 0.35, 0)
    np.testing.assert_allclose(
        quat_wxyz_to_axis_angle([np.cos(0.35), 0, np.sin(0.35), 0]), [0, 0.7, 0], atol=1e-12
    )
    # center_idx=0 then + tsl: the wrist is exactly tsl
    for side in ("left", "right"):
        np.testing.assert_allclose(clip.hands[side].joints3d[:, 0], data["tsl"][side][[0, 30, 60]], atol=1e-6)
    np.testing.assert_allclose(
        clip.hands["right"].joints3d,
        data["joints_mano_order"]["right"][[0, 30, 60]][:, MANO21_TO_OPENPOSE],
        atol=1e-5,
    )
    # cam_extr is world → camera: the camera centre −Rᵀt is the fixture's eye
    np.testing.assert_allclose(clip.camera_centers()[0], [0.0, -0.2, 0.25], atol=1e-5)
    # objects: translation of obj_transf, metres
    np.testing.assert_allclose(clip.object("cup").position3d, data["obj_pos"]["cup"][[0, 30, 60]], atol=1e-6)


def test_without_mano_files_hands_are_wrist_only_at_tsl(data, tmp_path, monkeypatch):
    monkeypatch.delenv(MANO_DIR_ENV, raising=False)
    root = _copy(data, tmp_path / "o", images=False)
    shutil.rmtree(tmp_path / "o" / "mano_v1_2")
    clip = OakInk2Source(root).load_clip(CLIP_ID)
    assert clip.hands["left"].wrist_only and clip.frames is None and clip.image_hw == (480, 848)
    np.testing.assert_allclose(clip.hands["left"].wrist3d, data["tsl"]["left"][[0, 30, 60]], atol=1e-6)


def test_bad_input(data, tmp_path):
    root = _copy(data, tmp_path / "o")
    pkl = root / "anno_preview" / f"{fx.TOKEN}.pkl"
    anno = pickle.loads(pkl.read_bytes())  # the test's own fixture: plain pickle is fine here
    # an absent left hand on mocap frame 220 and a non-finite right pose on 340: invalid frames, not errors
    del anno["raw_mano"][220]["lh__pose_coeffs"]
    anno["raw_mano"][340]["rh__pose_coeffs"][0, 3, 1] = float("nan")
    pkl.write_bytes(pickle.dumps(anno))
    clip = OakInk2Source(root).load_clip(CLIP_ID)
    assert clip.hands["left"].valid.tolist() == [True, False, True]
    assert clip.hands["right"].valid.tolist() == [True, True, False]
    # a missing frame of a sampled id names the file
    (root / "data" / fx.TOKEN / fx.EGO_SERIAL / "000220.png").unlink()
    with pytest.raises(ValueError, match="missing .*000220.png"):
        OakInk2Source(root).load_clip(CLIP_ID)
    # no egocentric camera; an unknown layout (keys missing) names what is missing
    anno["cam_def"] = {fx.ALLO_SERIAL: "allocentric_top"}
    pkl.write_bytes(pickle.dumps(anno))
    with pytest.raises(ValueError, match="no 'egocentric' camera"):
        OakInk2Source(root).load_clip(CLIP_ID)
    del anno["raw_mano"]
    pkl.write_bytes(pickle.dumps(anno))
    src = OakInk2Source(root)
    assert src.clip_ids() == [] and "lacks ['raw_mano']" in src.skipped[fx.TOKEN]
    # a pickle carrying code is refused by name and never runs
    marker = tmp_path / "pwned"
    pkl.write_bytes(pickle.dumps({"cam_def": Evil(marker)}))
    assert "refusing to unpickle global" in OakInk2Source(root).skipped[fx.TOKEN] and not marker.exists()
    with pytest.raises(ValueError, match="no anno_preview/"):
        OakInk2Source(tmp_path)


def test_hand3d_build_on_the_fixture(data, tmp_path):
    """`hand3d build --source oakink2` on the annotation-only download: trajectory clips give action rows."""
    root = _copy(data, tmp_path / "o", images=False)
    report = run_build("oakink2", root, tmp_path / "out")
    assert report["clips_done"] == 1 and report["clips_skipped"] == 0
    assert row_count(report) > 0
