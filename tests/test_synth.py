"""The synth source: determinism, camera conventions against the rendered segmentation, depth, boxes."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from hand3d_dataset.clip import HAND_SEGMENT
from hand3d_dataset.sources import SourceAdapter, get_source
from hand3d_dataset.sources.synth import HAND_POSES, SynthConfig, SynthSource, hand_skeleton

# find_spec, not import: MUJOCO_GL must be set (by the source) before mujoco is first imported
needs_mujoco = pytest.mark.skipif(
    importlib.util.find_spec("mujoco") is None, reason="the synth source needs the `sim` extra (mujoco)"
)

SIZE, FRAMES = 80, 3


@pytest.fixture(scope="module")
def clips():
    src = SynthSource(num_clips=12, seed=3, image_size=SIZE, num_frames=FRAMES)
    return [src.load_clip(i) for i in src.clip_ids()]


def pixel(uv):
    """Nearest pixel (row, col) by hand: pixel centres at integers."""
    return np.floor(uv[..., 1] + 0.5).astype(int), np.floor(uv[..., 0] + 0.5).astype(int)


def project_by_hand(points_world, K, R, t):
    pc = points_world @ R.T + t
    return np.stack(
        [K[0, 0] * pc[:, 0] / pc[:, 2] + K[0, 2], K[1, 1] * pc[:, 1] / pc[:, 2] + K[1, 2]], -1
    ), pc[:, 2]


@needs_mujoco
def test_protocol_registry_and_shapes(clips):
    src = get_source("synth", num_clips=2, seed=3, image_size=SIZE, num_frames=FRAMES)
    assert isinstance(src, SourceAdapter) and src.clip_ids() == ["synth-s3-000000", "synth-s3-000001"]
    c = clips[0]
    assert c.frames.shape == (FRAMES, SIZE, SIZE, 3) and c.frames.dtype == np.uint8
    assert c.depth.shape == (FRAMES, SIZE, SIZE) and c.segmentation.dtype == np.uint8
    assert c.source == "synth" and c.task and c.fps == SynthConfig().fps
    for clip in clips:
        assert 2 <= len(clip.objects) <= 5 and clip.meta["target"] in clip.task
        assert all(
            o.name.split()[-1] in ("mug", "box", "ball", "bottle", "can", "plate", "bowl")
            for o in clip.objects
        )
    assert len({c.task for c in clips}) > 3  # tasks vary


@needs_mujoco
def test_same_seed_same_arrays_in_a_fresh_process(clips, tmp_path):
    code = (
        "import sys; from hand3d_dataset.sources.synth import SynthSource;"
        f"s = SynthSource(num_clips=12, seed=3, image_size={SIZE}, num_frames={FRAMES});"
        "s.load_clip('synth-s3-000000'); s.load_clip('synth-s3-000005').save(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.npz")], check=True, capture_output=True)
    other = np.load(tmp_path / "c.npz")
    mine = clips[5]
    np.testing.assert_array_equal(other["frames"], mine.frames)
    np.testing.assert_array_equal(other["depth"], mine.depth)
    np.testing.assert_array_equal(other["R"], mine.R)
    np.testing.assert_array_equal(
        other[f"hand.{mine.meta['active_hand']}.joints3d"], mine.hands[mine.meta["active_hand"]].joints3d
    )
    assert not np.array_equal(clips[0].frames, clips[1].frames)
    other_seed = SynthSource(num_clips=1, seed=4, image_size=SIZE, num_frames=FRAMES).load_clip(
        "synth-s4-000000"
    )
    assert not np.array_equal(other_seed.frames, clips[0].frames)


@needs_mujoco
def test_camera_is_a_rotation_and_K_is_centred(clips):
    for c in clips:
        np.testing.assert_allclose(
            np.einsum("tji,tjk->tik", c.R, c.R), np.broadcast_to(np.eye(3), c.R.shape), atol=1e-9
        )
        assert np.all(np.linalg.det(c.R) > 0)
        np.testing.assert_allclose(c.K[:, :2, 2], (SIZE - 1) / 2)


@needs_mujoco
def test_projected_joints_land_on_the_rendered_hand(clips):
    """The OpenCV conversion of MuJoCo's camera: joints projected by hand hit the hand's segment."""
    hits = total = 0
    for c in clips:
        for side, hand in c.hands.items():
            for k in range(FRAMES):
                uv, z = project_by_hand(hand.joints3d[k], c.K[k], c.R[k], c.t[k])
                r, col = pixel(uv)
                ok = (z > 0) & (r >= 0) & (r < SIZE) & (col >= 0) & (col < SIZE)
                hits += int((c.segmentation[k][r[ok], col[ok]] == HAND_SEGMENT[side]).sum())
                total += int(ok.sum())
    assert total > 200
    assert hits / total > 0.8  # the rest are joints hidden behind objects or the other fingers


@needs_mujoco
def test_object_centres_project_into_their_boxes_and_depth_is_on_the_surface(clips):
    inside = total = 0
    for c in clips:
        for o in c.objects:
            for k in range(FRAMES):
                if np.isnan(o.box2d[k]).any():
                    continue
                uv, _ = project_by_hand(o.position3d[k : k + 1], c.K[k], c.R[k], c.t[k])
                x0, y0, x1, y1 = o.box2d[k]
                inside += int(x0 <= uv[0, 0] < x1 and y0 <= uv[0, 1] < y1)
                total += 1
                # back-project the GT depth of the object's pixels by hand; they lie on its surface
                rows, cols = np.nonzero(c.segmentation[k] == o.segment_id)
                z = c.depth[k, rows, cols].astype(float)
                K = c.K[k]
                pc = np.stack([(cols - K[0, 2]) / K[0, 0] * z, (rows - K[1, 2]) / K[1, 1] * z, z], -1)
                pw = (pc - c.t[k]) @ c.R[k]  # camera → world
                dist = np.linalg.norm(pw - o.position3d[k], axis=-1)
                assert np.median(dist) < 0.2, (c.clip_id, o.name, np.median(dist))
                assert np.mean(dist < 0.17) > 0.9  # the largest object (large plate) has radius ~0.11 m
    assert total > 50 and inside / total > 0.9


@needs_mujoco
def test_depth_of_the_table_plane(clips):
    """Table pixels back-project onto the plane z = 0 (world), to within depth-buffer precision."""
    c = clips[0]
    k = 0
    table = (c.segmentation[k] == 0) & np.isfinite(c.depth[k])
    rows, cols = np.nonzero(table)
    z = c.depth[k, rows, cols].astype(float)
    K = c.K[k]
    pc = np.stack([(cols - K[0, 2]) / K[0, 0] * z, (rows - K[1, 2]) / K[1, 1] * z, z], -1)
    pw = (pc - c.t[k]) @ c.R[k]
    assert len(z) > 100
    assert np.median(np.abs(pw[:, 2])) < 2e-3


def test_hand_skeleton_bone_lengths_are_pose_invariant():
    a = hand_skeleton(HAND_POSES["open"], "right")
    b = hand_skeleton(HAND_POSES["grasp"], "left")
    parents = [0, 1, 2, 3, 0, 5, 6, 7, 0, 9, 10, 11, 0, 13, 14, 15, 0, 17, 18, 19]
    la = np.linalg.norm(a[1:] - a[parents], axis=-1)
    lb = np.linalg.norm(b[1:] - b[parents], axis=-1)
    np.testing.assert_allclose(la, lb, atol=1e-12)
    pinch = hand_skeleton(HAND_POSES["pinch"], "right")
    assert np.linalg.norm(pinch[8] - pinch[4]) < 0.6 * np.linalg.norm(
        a[8] - a[4]
    )  # thumb and index tips meet
    np.testing.assert_allclose(b[:, 1], -hand_skeleton(HAND_POSES["grasp"], "right")[:, 1])  # mirror image


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"image_size": 8}, "image_size"),
        ({"num_frames": 1}, "num_frames"),
        ({"min_objects": 1}, "min_objects"),
        ({"two_hands_prob": 2.0}, "two_hands_prob"),
        ({"colour": "red"}, "unknown option"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SynthSource(num_clips=1, **kw)


def test_bad_clip_ids():
    src = SynthSource(num_clips=2, seed=0, image_size=SIZE, num_frames=FRAMES)
    for bad in ("synth-s1-000000", "synth-s0-000002", "nonsense"):
        with pytest.raises(ValueError, match="clip_id"):
            src.load_clip(bad)


def test_missing_mujoco_names_the_extra(monkeypatch):
    from hand3d_dataset.sources import synth

    monkeypatch.setitem(sys.modules, "mujoco", None)  # makes `import mujoco` fail
    monkeypatch.setattr(synth, "_SCENES", {})
    with pytest.raises(ImportError, match=r'pip install "vipa-vla\[sim\]"'):
        SynthSource(num_clips=1, image_size=SIZE, num_frames=FRAMES).load_clip("synth-s0-000000")


@needs_mujoco
def test_render_cache_gives_the_rendered_clip_back_without_rendering(clips, tmp_path, monkeypatch):
    """The cache written on first load holds exactly the rendered arrays (compared with the module's clips,
    rendered without a cache); a second load reads them (rendering is made to fail) and rebuilds the same clip;
    a damaged file is a miss; another image size is another file."""
    import hand3d_dataset.sources.synth as synth

    src = SynthSource(num_clips=12, seed=3, image_size=SIZE, num_frames=FRAMES, cache_dir=tmp_path)
    first = src.load_clip(src.clip_ids()[1])
    path = synth.render_cache_path(tmp_path, src.config, 3, 1)
    assert path.is_file() and not list(path.parent.glob(".*"))  # written atomically: no temporary left
    monkeypatch.setattr(synth, "_render", lambda *a: pytest.fail("rendered although the clip was cached"))
    again = src.load_clip(src.clip_ids()[1])
    for c in (first, again):
        for name in ("frames", "depth", "segmentation", "K", "R", "t"):
            np.testing.assert_array_equal(getattr(c, name), getattr(clips[1], name), err_msg=name)
        assert [o.box2d.tolist() for o in c.objects] == [o.box2d.tolist() for o in clips[1].objects]
        assert c.task == clips[1].task and c.meta == clips[1].meta
    monkeypatch.undo()
    path.write_bytes(b"not an npz")  # damaged: rendered again and replaced
    np.testing.assert_array_equal(src.load_clip(src.clip_ids()[1]).frames, clips[1].frames)
    with np.load(path) as z:
        np.testing.assert_array_equal(z["frames"], clips[1].frames)
    other = SynthSource(num_clips=12, seed=3, image_size=SIZE + 16, num_frames=FRAMES, cache_dir=tmp_path)
    assert synth.render_cache_path(tmp_path, other.config, 3, 1) != path
