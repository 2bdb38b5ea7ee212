"""The pieces the real-dataset adapters share (hand3d_dataset/sources/_common.py), against numbers worked out
by hand: chunked 1 fps sampling, camera inversion, invalid-frame masking, depth units, the video reader's
errors and its optional dependency, the base adapter's settings and MANO rows that cannot be posed."""

import sys

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from hand3d_dataset.sources._common import (
    ChunkedSource,
    ManoPoser,
    chunk_frame_indices,
    depth_from_units,
    invert_poses,
    masked,
    read_video_frames,
    sampled_fps,
)
from tests.source_fixtures._common import noise_image, write_mano_files, write_video


def test_chunking_rule():
    assert [c.tolist() for c in chunk_frame_indices(750, 30.0)] == [
        list(range(0, 300, 30)),
        list(range(300, 600, 30)),
        list(range(600, 750, 30)),
    ]
    assert chunk_frame_indices(30, 30.0) == []  # one sampled frame: no motion to learn from
    # HOI4D's 15 fps: every 15th frame, 10 per chunk; 1 fps asked of 25 fps keeps every 25th frame
    assert [c[:2].tolist() for c in chunk_frame_indices(300, 15.0)] == [[0, 15], [150, 165]]
    assert sampled_fps(25.0, 1.0) == 1.0 and sampled_fps(30.0, 4.0) == 30.0 / 8
    with pytest.raises(ValueError, match="sample_fps"):
        chunk_frame_indices(10, 30.0, sample_fps=0)


def test_invert_poses_and_masked_rows():
    R = Rotation.from_rotvec([[0.1, -0.4, 0.3], [1.0, 0.2, 0.0]]).as_matrix()
    t = np.array([[0.3, -0.1, 2.0], [0.0, 0.5, -1.0]])
    Ri, ti = invert_poses(R, t)
    for k in range(2):
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R[k], t[k]
        np.testing.assert_allclose(np.linalg.inv(T)[:3], np.hstack([Ri[k], ti[k][:, None]]), atol=1e-12)
    m = masked(np.array([True, False]), a=np.ones((2, 3)), b=np.ones((2, 4, 4)))
    assert np.isnan(m["a"][1]).all() and np.isnan(m["b"][1]).all() and (m["a"][0] == 1).all()


def test_depth_units():
    got = depth_from_units(np.array([[0, 4000, 2030]], np.uint16), 4000.0)  # TACO: 0.25 mm units
    assert np.isnan(got[0, 0]) and got[0, 1] == 1.0 and got[0, 2] == pytest.approx(0.5075)


def test_video_reader_names_missing_and_truncated_files_and_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "v.mp4"
    write_video(path, np.stack([noise_image(32, 48, k) for k in range(5)]))
    frames = read_video_frames(path, [4, 0], "clip c")
    assert frames.shape == (2, 32, 48, 3)
    with pytest.raises(
        ValueError, match=r"clip c: .*v.mp4 ends before frame 7 \(truncated video of 5 frames\)"
    ):
        read_video_frames(path, [0, 7], "clip c")
    with pytest.raises(ValueError, match=r"has 5 frames for 9 poses"):
        read_video_frames(path, [0], "clip c", expect=9)
    with pytest.raises(ValueError, match="missing video .*nope.mp4"):
        read_video_frames(tmp_path / "nope.mp4", [0], "clip c")
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    with pytest.raises(ImportError, match=r'pip install "vipa-vla\[sources\]"'):
        read_video_frames(path, [0], "clip c")


def test_chunked_source_settings_and_unknown_ids():
    class Toy(ChunkedSource):
        name, FPS = "toy", 15.0

    with pytest.raises(ValueError, match="images: expected one of"):
        Toy(images="sometimes")
    with pytest.raises(ValueError, match="sample_fps, chunk_s"):
        Toy(chunk_s=0)
    src = Toy(sample_fps=1.0, chunk_s=2.0)
    src._add("toy-a", 61, "entry")  # 15 fps → frames 0, 15 | 30, 45 | 60 (one frame: dropped)
    assert src.clip_ids() == ["toy-a-c000", "toy-a-c001"] and src.clip_fps == 1.0
    assert src._entry("toy-a-c001")[0] == "entry" and src._entry("toy-a-c001")[1].tolist() == [30, 45]
    with pytest.raises(ValueError, match="clip_id: unknown 'toy-b'"):
        src._entry("toy-b")
    assert (src._use_images(False), Toy(images="required")._use_images(False)) == (False, True)


def test_mano_poser_leaves_rows_it_cannot_pose_nan(tmp_path):
    poser = ManoPoser(write_mano_files(tmp_path / "mano"), flat_hand_mean=True)
    go, hp, b = np.zeros((3, 3)), np.zeros((3, 45)), np.zeros((3, 10))
    hp[1, 4] = np.nan
    j = poser.joints("right", go, hp, b, np.array([[0.0, 0.0, 0.5]] * 3))
    assert np.isnan(j[1]).all() and np.isfinite(j[[0, 2]]).all()
    np.testing.assert_allclose(j[0], j[2])
    with pytest.raises(ValueError, match="mano_dir: none of"):
        ManoPoser(tmp_path).layer("left")
