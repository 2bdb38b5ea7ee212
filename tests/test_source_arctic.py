"""ARCTIC adapter on a fixture in ARCTIC's layout: joints vs the dataset's own 2D joints, conventions, bad input."""

import pickle
import shutil

import numpy as np
import PIL.Image
import pytest

from hand3d_dataset.sources import SourceAdapter, get_source
from hand3d_dataset.sources._common import MANO_DIR_ENV
from hand3d_dataset.sources.arctic import ArcticSource
from tests.source_fixtures import arctic as fx
from tests.source_fixtures._common import MANO21_TO_OPENPOSE, Evil, clip_uv, row_count, run_build, smplx_hand

CLIP_ID = f"arctic-{fx.SUBJECT}-{fx.SEQUENCE}-c000"
BROKEN_ID = f"arctic-{fx.SUBJECT}-{fx.BROKEN}-c000"
# ARCTIC's 21 joints are MANO's 16 (wrist; index, middle, pinky, ring, thumb × 3) then the tips (thumb, index,
# middle, ring, pinky): the MANO order
ARCTIC_TO_OPENPOSE = MANO21_TO_OPENPOSE

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("arctic")
    return fx.build_arctic(root)


@pytest.fixture(scope="module")
def clip(data):
    return get_source("arctic", root=data["data"]).load_clip(CLIP_ID)


def test_ids_sampling_and_frames(data, clip):
    src = get_source("arctic", root=data["data"].parent.parent)  # the folder above arctic_data works too
    assert isinstance(src, SourceAdapter) and src.clip_ids() == [CLIP_ID, BROKEN_ID]
    # 61 frames at 30 fps sampled at 1 fps: frames 0, 30, 60 in one 10 s chunk
    assert clip.meta["frame_indices"] == [0, 30, 60] and clip.fps == 1.0
    assert clip.frames.shape == (3, fx.IMAGE_WH[1], fx.IMAGE_WH[0], 3) and clip.image_hw == (200, 280)
    folder = data["data"] / "images" / fx.SUBJECT / fx.SEQUENCE / "0"
    for k, f in enumerate([0, 30, 60]):  # image index = frame index + ioi_offset
        want = np.asarray(PIL.Image.open(folder / f"{f + fx.IOI_OFFSET:05d}.jpg").convert("RGB"))
        np.testing.assert_array_equal(clip.frames[k], want)
    assert clip.task == "grab the box" and [o.name for o in clip.objects] == ["box"]
    two = ArcticSource(data["data"], sample_fps=2.0, chunk_s=1.0)  # frames 0, 15 | 30, 45 | 60 (too short)
    assert two.clip_ids()[:3] == [f"arctic-s01-{fx.SEQUENCE}-c{c:03d}" for c in range(2)] + [
        BROKEN_ID[:-1] + "0"
    ]
    assert two.load_clip(f"arctic-s01-{fx.SEQUENCE}-c001").meta["frame_indices"] == [30, 45]
    with pytest.raises(ValueError, match="clip_id"):
        src.load_clip("arctic-nope")


def test_joints_project_onto_arcticss_view0_2d_joints(data, clip):
    """Independent check: the returned joints, projected with the returned K, R, t, land on ARCTIC's 2D joints."""
    np.testing.assert_allclose(clip.K[0], fx.K_EGO)
    for side in ("right", "left"):
        assert clip.hands[side].valid.all()
        for k, f in enumerate(clip.meta["frame_indices"]):
            want = data["j2d_view0"][side][f][ARCTIC_TO_OPENPOSE]
            np.testing.assert_allclose(clip_uv(clip, side, k), want, atol=2e-3)
            assert np.all((want >= 0) & (want < fx.IMAGE_WH))  # the fixture's hands are in view


def test_conventions_world2ego_flat_hand_mean_units_and_object_centre(data, clip):
    # world → camera as stored: the camera centre −Rᵀt is the fixture's eye position
    R, t = data["R"], data["t"]
    np.testing.assert_allclose(clip.R, R[[0, 30, 60]], atol=1e-6)
    np.testing.assert_allclose(clip.t, t[[0, 30, 60]], atol=1e-6)
    eye = np.array([0.25 * np.cos(0.3), -0.35 + 0.06, 0.45])
    np.testing.assert_allclose(clip.camera_centers()[1], eye, atol=1e-5)
    # MANO posed with the mean pose added (flat_hand_mean=False): the flat-hand posing is far from the joints
    p = {k: v[[0, 30, 60]] for k, v in data["params"]["right"].items()}
    flat, _ = smplx_hand(data["mano_dir"] / "MANO_RIGHT.pkl", "right", p, flat_hand_mean=True)
    mean, _ = smplx_hand(data["mano_dir"] / "MANO_RIGHT.pkl", "right", p, flat_hand_mean=False)
    got = clip.hands["right"].joints3d
    np.testing.assert_allclose(got, mean[:, ARCTIC_TO_OPENPOSE], atol=1e-5)
    assert np.abs(got - flat[:, ARCTIC_TO_OPENPOSE]).max() > 5e-3
    # object translation is millimetres; position = R_obj · (template box centre) + t_obj
    np.testing.assert_allclose(clip.objects[0].position3d, data["object_centres"][[0, 30, 60]], atol=1e-6)
    assert clip.hands["right"].mano["transl"].shape == (3, 3) and clip.meta["joints_from"] == "mano"


def test_without_mano_files_the_processed_joints_are_used(data, tmp_path, monkeypatch):
    monkeypatch.delenv(MANO_DIR_ENV, raising=False)
    shutil.copytree(data["data"].parent.parent, tmp_path / "a", ignore=shutil.ignore_patterns("images"))
    shutil.rmtree(tmp_path / "a" / "body_models")
    src = ArcticSource(tmp_path / "a" / "arctic_data" / "data")
    clip = src.load_clip(CLIP_ID)
    assert clip.meta["joints_from"] == "processed_seqs" and clip.frames is None  # no images: trajectory-only
    for k, f in enumerate([0, 30, 60]):
        np.testing.assert_allclose(
            clip_uv(clip, "left", k), data["j2d_view0"]["left"][f][ARCTIC_TO_OPENPOSE], atol=2e-3
        )
    (tmp_path / "a" / "arctic_data" / "data" / "processed_seqs" / fx.SUBJECT / f"{fx.SEQUENCE}.npy").unlink()
    with pytest.raises(ValueError, match="no MANO model files"):
        src.load_clip(CLIP_ID)
    monkeypatch.setenv(MANO_DIR_ENV, str(data["mano_dir"]))  # the environment variable finds the files
    assert (
        ArcticSource(tmp_path / "a" / "arctic_data" / "data").load_clip(CLIP_ID).meta["joints_from"] == "mano"
    )


def test_bad_input(data, tmp_path):
    src = ArcticSource(data["data"])
    with pytest.raises(ValueError, match=rf"clip {BROKEN_ID}: missing .*{fx.BROKEN}\.egocam\.dist\.npy"):
        src.load_clip(BROKEN_ID)
    with pytest.raises(ValueError, match="no raw_seqs/ folder"):
        ArcticSource(tmp_path)
    with pytest.raises(ValueError, match="images: expected"):
        ArcticSource(data["data"], images="sometimes")
    root = tmp_path / "a"
    shutil.copytree(data["data"].parent.parent, root)
    d = root / "arctic_data" / "data"
    raw = d / "raw_seqs" / fx.SUBJECT
    # NaN MANO parameters on frame 30 of the right hand: that frame is invalid, the rest stays
    mano = np.load(raw / f"{fx.SEQUENCE}.mano.npy", allow_pickle=True).item()
    mano["right"]["pose"][30, 4] = np.nan
    np.save(raw / f"{fx.SEQUENCE}.mano.npy", np.array(mano, dtype=object), allow_pickle=True)
    clip = ArcticSource(d).load_clip(CLIP_ID)
    assert clip.hands["right"].valid.tolist() == [True, False, True] and clip.hands["left"].valid.all()
    assert clip.meta["nonfinite_mano_frames"] == {"left": 0, "right": 1}
    # a missing image of a sampled frame names the file; images="none" does not read them
    (d / "images" / fx.SUBJECT / fx.SEQUENCE / "0" / f"{30 + fx.IOI_OFFSET:05d}.jpg").unlink()
    with pytest.raises(ValueError, match=f"missing .*{30 + fx.IOI_OFFSET:05d}.jpg"):
        ArcticSource(d).load_clip(CLIP_ID)
    assert ArcticSource(d, images="none").load_clip(CLIP_ID).frames is None
    # a tampered .npy (a pickle calling os.system) is refused, never run: the sequence is skipped by name
    marker = tmp_path / "pwned"
    with open(raw / f"{fx.BROKEN}.mano.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(Evil(marker), fh)
    src = ArcticSource(d)
    assert (
        BROKEN_ID not in src.clip_ids() and "refusing to unpickle global" in src.skipped[f"s01/{fx.BROKEN}"]
    )
    assert not marker.exists()


def test_hand3d_build_on_the_fixture(data, tmp_path):
    """`hand3d build --source arctic`: the sequence with images annotates, the broken one is a counted skip."""
    root = tmp_path / "a"
    shutil.copytree(data["data"].parent.parent, root, ignore=shutil.ignore_patterns("images"))
    report = run_build("arctic", root / "arctic_data" / "data", tmp_path / "out", "--num-clips", "2")
    assert report["clips_done"] == 1 and report["clips_skipped"] == 1
    assert "egocam.dist.npy" in report["skipped"][0]["reason"]
    assert row_count(report) > 0


def test_object_poses_give_spatial_rows_without_a_depth_model(data, tmp_path):
    """ARCTIC has images but no depth. The estimate path needs a point cloud (`gt-depth` has nothing to read:
    the clip is skipped); with the object's pose (`--object-source auto`, the default) the same clip gives
    spatial rows, and they state the box's centre of the fixture, moved into the camera by the fixture's
    own world → camera."""
    import pyarrow.parquet as pq

    args = ("--num-clips", "1")
    estimate = run_build("arctic", data["data"], tmp_path / "e", *args, "--object-source", "estimate")
    assert estimate["clips_done"] == 0 and "has no depth" in estimate["skipped"][0]["reason"]
    report = run_build("arctic", data["data"], tmp_path / "a", *args)
    assert report["clips_done"] == 1 and report["samples"]["visual"]["train"]["spatial_relationship"] > 0
    clip = ArcticSource(data["data"]).load_clip(CLIP_ID)
    rows = pq.read_table(tmp_path / "a" / "data" / "visual" / "train-00000.parquet").to_pylist()
    spatial = [r for r in rows if r["task_type"] == "spatial_relationship"]
    assert spatial
    for row in spatial:
        tgt = row["target"]
        k = tgt["frame_indices"][-1]
        f = clip.meta["frame_indices"][k]  # the fixture's frame
        palm = clip.joints_cam(tgt["hand"])[k][[0, 5, 9, 13, 17]].mean(0)
        centre = data["R"][f] @ data["object_centres"][f] + data["t"][f]
        v = np.array(tgt["vector_m"])
        np.testing.assert_allclose(
            palm + v if tgt["relation"] == "object_from_hand" else palm - v, centre, atol=1e-5
        )
