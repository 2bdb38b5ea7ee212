"""LeRobot v3.0 reader and writer (training/lerobot_dataset.py, training/lerobot_writer.py): round trips,
LeRobot's own layout, bad input.

Reference values come from numpy on the generated arrays and from `tests/lerobot_v3_fixture.py`, a second
implementation of the layout that shares no code with the module under test.

Measured video error (smooth 48x32 / 64x48 test pictures, CRF 30 as LeRobot encodes): AV1 (SVT-AV1 ->
dav1d) PSNR 40.4 dB worst / 43.9 median, max abs error 9 of 255 through the writer, 41.3 / 43.6 dB and 10 on
the LeRobot-layout fixture; H.264 (x264 veryfast) 34.3 / 37.3 dB, max 25 (32.1 dB worst with one short
episode per file). The thresholds (AV1 >= 35 dB, H.264 >= 30 dB, and every decoded frame nearer to its own
picture than to any other) leave room for other encoder builds while catching an off-by-one frame.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from processing_vipa.processing_vipa import VipaProcessor
from tests.lerobot_v3_fixture import CAMERAS, build_v3_fixture, frame_image, write_v21_info
from training.lerobot_dataset import (
    EpisodeGroupedSampler,
    LeRobotMeta,
    LeRobotV3Dataset,
    norm_stats_for_processor,
    open_lerobot_dataset,
)
from training.lerobot_writer import LeRobotV3Writer, compute_stats

REPO = Path(__file__).resolve().parents[1]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def check_frames(
    ds: LeRobotV3Dataset, expected: dict[str, np.ndarray], lossless: bool = False, min_psnr: float = 35.0
) -> float:
    """Every sample's pictures are the right frames: nearest (MSE) among all reference frames, PSNR >= min_psnr
    (or identical when `lossless`). Returns the worst PSNR."""
    worst = float("inf")
    for i in range(len(ds)):
        item = ds[i]
        for cam, ref in expected.items():
            got = item[cam].numpy()
            assert got.dtype == np.uint8 and got.shape == ref.shape[1:]
            if lossless:
                np.testing.assert_array_equal(got, ref[i])
                continue
            mse = ((ref.astype(np.float64) - got.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
            assert int(np.argmin(mse)) == i, (
                f"sample {i} camera {cam}: nearest picture is {int(np.argmin(mse))}"
            )
            worst = min(worst, psnr(got, ref[i]))
    assert lossless or worst >= min_psnr, worst
    return worst


FEATURES = {
    "observation.images.front": {
        "dtype": "video",
        "shape": [48, 64, 3],
        "names": ["height", "width", "channels"],
    },
    "observation.images.wrist": {
        "dtype": "video",
        "shape": [32, 48, 3],
        "names": ["height", "width", "channels"],
    },
    "observation.state": {"dtype": "float32", "shape": [6], "names": None},
    "action": {"dtype": "float32", "shape": [4], "names": None},
}


def write_dataset(root: Path, lengths=(5, 9, 3), use_videos=True, codec=None, **kw) -> dict:
    """Record `lengths` episodes with the writer; return the arrays written (row n = global frame n)."""
    rng = np.random.default_rng(1)
    w = LeRobotV3Writer.create(root, fps=15, features=FEATURES, robot_type="toy", use_videos=use_videos,
                               video_codec=codec, **kw)  # fmt: skip
    out = {"state": [], "action": [], "task": [], "front": [], "wrist": []}
    for e, n in enumerate(lengths):
        for t in range(n):
            frame = {
                "observation.images.front": frame_image(e, t, 0, 48, 64),
                "observation.images.wrist": frame_image(e, t, 1, 32, 48),
                "observation.state": rng.normal(size=6).astype(np.float32),
                "action": rng.uniform(-2, 2, size=4).astype(np.float32),
            }
            task = ["stack the blocks", "wipe the table"][e % 2]
            w.add_frame(frame, task=task)
            for k, key in (("state", "observation.state"), ("action", "action")):
                out[k].append(frame[key])
            out["front"].append(frame["observation.images.front"])
            out["wrist"].append(frame["observation.images.wrist"])
            out["task"].append(task)
        w.save_episode()
    w.finalize()
    return {k: (np.stack(v) if k != "task" else v) for k, v in out.items()} | {"lengths": lengths}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("written") / "toy"
    return root, write_dataset(root)


@pytest.fixture(scope="module")
def lerobot_fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot") / "libero_like"
    return root, build_v3_fixture(root)


# ---- round trip ------------------------------------------------------------------------------------------------
def test_round_trip_video_every_frame_state_action_task_timestamp(written):
    root, ref = written
    ds = LeRobotV3Dataset(root, action_horizon=1)
    n = sum(ref["lengths"])
    assert len(ds) == n and ds.report == {"episodes": 3, "frames": n, "skipped_episodes": {}, "skipped": {}}
    assert ds.camera_keys == ["observation.images.front", "observation.images.wrist"]
    starts = np.cumsum((0,) + ref["lengths"])
    for i in range(n):
        item = ds[i]
        e = int(np.searchsorted(starts, i, side="right") - 1)
        assert (item["episode_index"], item["frame_index"], item["index"]) == (e, i - starts[e], i)
        assert item["timestamp"] == pytest.approx((i - starts[e]) / 15, abs=1e-6)
        assert item["task"] == ref["task"][i]
        np.testing.assert_array_equal(item["observation.state"].numpy(), ref["state"][i])
        np.testing.assert_array_equal(item["action"].numpy()[0], ref["action"][i])
    worst = check_frames(
        ds, {"observation.images.front": ref["front"], "observation.images.wrist": ref["wrist"]}
    )
    assert worst > 38.0  # measured 40.4 dB worst, 43.9 median


def test_written_layout_and_metadata_match_lerobot(written):
    root, ref = written
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [
        "data/chunk-000/file-000.parquet",
        "meta/episodes/chunk-000/file-000.parquet",
        "meta/info.json",
        "meta/stats.json",
        "meta/tasks.parquet",
        "videos/observation.images.front/chunk-000/file-000.mp4",
        "videos/observation.images.wrist/chunk-000/file-000.mp4",
    ]
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 15 and info["total_frames"] == 17
    assert info["total_episodes"] == 3 and info["total_tasks"] == 2 and info["splits"] == {"train": "0:3"}
    assert list(info["features"])[-5:] == ["timestamp", "frame_index", "episode_index", "index", "task_index"]
    assert info["features"]["observation.images.front"]["info"]["video.codec"] == "av1"
    with av.open(str(root / "videos/observation.images.front/chunk-000/file-000.mp4")) as c:
        assert c.streams.video[0].codec_context.name in ("libdav1d", "av1")
        assert c.streams.video[0].frames == 17  # all episodes in one stream
    eps = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["length"] for e in eps] == [5, 9, 3]
    assert [(e["dataset_from_index"], e["dataset_to_index"]) for e in eps] == [(0, 5), (5, 14), (14, 17)]
    key = "videos/observation.images.wrist"
    got = [(e[f"{key}/from_timestamp"], e[f"{key}/to_timestamp"]) for e in eps]
    np.testing.assert_allclose(got, [(0, 5 / 15), (5 / 15, 14 / 15), (14 / 15, 17 / 15)], atol=1e-9)
    assert eps[1]["tasks"] == ["wipe the table"]
    # per-episode stats columns, against numpy on the written arrays
    np.testing.assert_allclose(eps[1]["stats/action/mean"], ref["action"][5:14].mean(0), rtol=1e-6)
    np.testing.assert_allclose(
        eps[1]["stats/action/q99"], np.quantile(ref["action"][5:14], 0.99, axis=0), rtol=1e-6
    )
    assert np.asarray(eps[0]["stats/observation.images.front/mean"]).shape == (3, 1, 1)
    assert eps[2]["stats/frame_index/max"] == [2] and eps[2]["stats/index/min"] == [14]
    stats = json.loads((root / "meta/stats.json").read_text())
    np.testing.assert_allclose(stats["observation.state"]["std"], ref["state"].std(0), rtol=1e-6)
    np.testing.assert_allclose(stats["action"]["q01"], np.quantile(ref["action"], 0.01, axis=0), rtol=1e-6)
    assert stats["action"]["count"] == [17]
    front = np.asarray(stats["observation.images.front"]["mean"]).reshape(3)
    np.testing.assert_allclose(front, ref["front"].reshape(-1, 3).mean(0) / 255, atol=1e-6)
    tasks = pq.read_table(root / "meta/tasks.parquet").to_pandas()
    assert tasks.index.name == "task" and tasks.loc["wipe the table", "task_index"] == 1


def test_reload_in_fresh_process(written):
    """A reader in a new interpreter gets the same actions and states (nothing cached in this process)."""
    root, ref = written
    code = (
        "import sys, numpy as np; from training.lerobot_dataset import LeRobotV3Dataset\n"
        f"ds = LeRobotV3Dataset({str(root)!r}, camera_keys=[], action_horizon=1)\n"
        "np.save(sys.argv[1], np.stack([ds[i]['action'][0].numpy() for i in range(len(ds))]))\n"
    )
    out = root.parent / "fresh.npy"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=REPO, env=env, timeout=60)
    np.testing.assert_array_equal(np.load(out), ref["action"])


def test_round_trip_images_in_parquet_is_lossless(tmp_path):
    ref = write_dataset(tmp_path / "img", lengths=(4, 3), use_videos=False)
    info = json.loads((tmp_path / "img/meta/info.json").read_text())
    assert info["video_path"] is None and info["features"]["observation.images.front"]["dtype"] == "image"
    assert not (tmp_path / "img/videos").exists()
    ds = LeRobotV3Dataset(tmp_path / "img", action_horizon=2)
    check_frames(
        ds, {"observation.images.front": ref["front"], "observation.images.wrist": ref["wrist"]}, True
    )
    np.testing.assert_array_equal(
        torch.stack([ds[i]["observation.state"] for i in range(7)]).numpy(), ref["state"]
    )


def test_h264_round_trip_and_file_rotation(tmp_path):
    """H.264 videos; tiny size limits force a new data/video file per episode and chunks of 2 files."""
    root = tmp_path / "h264"
    ref = write_dataset(root, lengths=(4, 5, 3), codec="h264", chunks_size=2,
                        data_files_size_in_mb=1e-6, video_files_size_in_mb=1e-6)  # fmt: skip
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet") if "data/" in str(p))
    assert names == [
        "data/chunk-000/file-000.parquet",
        "data/chunk-000/file-001.parquet",
        "data/chunk-001/file-000.parquet",
    ]
    assert (root / "videos/observation.images.wrist/chunk-001/file-000.mp4").is_file()
    eps = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["videos/observation.images.front/from_timestamp"] for e in eps] == [0.0, 0.0, 0.0]
    with av.open(str(root / "videos/observation.images.front/chunk-000/file-001.mp4")) as c:
        assert c.streams.video[0].codec_context.name == "h264"
    ds = LeRobotV3Dataset(root, action_horizon=1)
    cams = {"observation.images.front": ref["front"], "observation.images.wrist": ref["wrist"]}
    assert check_frames(ds, cams, min_psnr=30.0) < 40.0  # x264 at CRF 30: measured 32.1 dB worst here
    np.testing.assert_array_equal(np.stack([ds[i]["action"][0].numpy() for i in range(12)]), ref["action"])


# ---- action chunks ---------------------------------------------------------------------------------------------
def test_action_chunk_padding_and_mask_by_hand(lerobot_fixture):
    root, ref = lerobot_fixture  # lengths (6, 4, 8): episode 1 is global rows 6..9
    ds = LeRobotV3Dataset(root, action_horizon=5)
    a = ref["action"]
    item = ds[8]  # episode 1, frame 2: steps 2, 3 exist; 4, 5, 6 are past the end
    assert (item["episode_index"], item["frame_index"]) == (1, 2)
    np.testing.assert_array_equal(item["action"].numpy(), a[[8, 9, 9, 9, 9]])
    assert item["action_is_pad"].tolist() == [False, False, True, True, True]
    item = ds[6]  # episode start: the whole chunk inside the episode (never reads episode 0's rows)
    np.testing.assert_array_equal(item["action"].numpy(), a[[6, 7, 8, 9, 9]])
    assert item["action_is_pad"].tolist() == [False, False, False, False, True]
    item = ds[5]  # last frame of episode 0 does not run into episode 1
    np.testing.assert_array_equal(item["action"].numpy(), a[[5] * 5])
    assert item["action_is_pad"].tolist() == [False, True, True, True, True]
    item = ds[10]  # episode 2, frame 0, chunk fully inside
    np.testing.assert_array_equal(item["action"].numpy(), a[10:15])
    assert not item["action_is_pad"].any() and item["action"].dtype == torch.float32
    assert item["action"].shape == (5, 7) and item["observation.state"].shape == (8,)


# ---- LeRobot's own layout (independent fixture) ----------------------------------------------------------------
def test_reads_lerobot_layout_fixture(lerobot_fixture):
    root, ref = lerobot_fixture
    meta = LeRobotMeta.load(root)
    assert meta.fps == 10 and meta.camera_keys == list(CAMERAS)
    assert meta.tasks == ["put the bowl on the plate", "open the top drawer"]
    assert [e["length"] for e in meta.episodes] == [6, 4, 8]
    assert meta.episodes[2]["videos/observation.images.image/from_timestamp"] == pytest.approx(1.0)
    np.testing.assert_allclose(meta.stats["action"]["q99"], np.quantile(ref["action"], 0.99, axis=0))
    assert meta.stats["observation.images.image"]["mean"].shape == (3, 1, 1)
    np.testing.assert_allclose(meta.episode_stats[1]["action"]["max"], ref["action"][6:10].max(0), rtol=1e-6)
    ds = LeRobotV3Dataset(root, camera_keys=[CAMERAS[1], CAMERAS[0]], action_horizon=3)
    assert ds.camera_keys == [CAMERAS[1], CAMERAS[0]]
    assert list(ds[0])[:2] == [CAMERAS[1], CAMERAS[0]]  # sample keys in the chosen view order
    for i in range(len(ds)):
        item = ds[i]
        assert item["task"] == ref["task"][i] and item["index"] == i
        assert (item["episode_index"], item["frame_index"]) == (ref["episode"][i], ref["frame"][i])
        assert item["timestamp"] == pytest.approx(float(ref["timestamp"][i]))
        np.testing.assert_array_equal(item["observation.state"].numpy(), ref["state"][i])
    check_frames(ds, ref["frames"])


def test_reads_images_in_parquet_layout_channel_first_declared(tmp_path):
    ref = build_v3_fixture(tmp_path / "imgs", cameras_as="image")
    ds = LeRobotV3Dataset(tmp_path / "imgs", action_horizon=2)
    assert ds.camera_keys == list(CAMERAS)
    check_frames(ds, ref["frames"], lossless=True)


def test_h264_lerobot_fixture_and_resize(tmp_path):
    from PIL import Image

    ref = build_v3_fixture(tmp_path / "h", codec="h264", lengths=(5, 7))
    ds = LeRobotV3Dataset(tmp_path / "h", camera_keys=[CAMERAS[0]], image_size=24, decode_block_frames=0)
    for i in range(len(ds)):
        got = ds[i][CAMERAS[0]].numpy()
        assert got.shape == (24, 24, 3)
        want = np.asarray(Image.fromarray(ref["frames"][CAMERAS[0]][i]).resize((24, 24), Image.BILINEAR))
        assert psnr(got, want) > 28.0  # swscale's and PIL's bilinear filters differ slightly, plus the codec


def test_v21_dataset_is_refused_with_the_converter_named(tmp_path):
    write_v21_info(tmp_path / "old")
    with pytest.raises(ValueError, match=r"v2\.1.*convert_dataset_v21_to_v30"):
        LeRobotMeta.load(tmp_path / "old")
    with pytest.raises(ValueError, match=r"v2\.1"):
        LeRobotV3Dataset(tmp_path / "old")


def test_open_local_folder_or_repo_id(lerobot_fixture, monkeypatch):
    root, _ = lerobot_fixture
    assert open_lerobot_dataset(root) == root and open_lerobot_dataset(str(root)) == root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not a local folder"):
        open_lerobot_dataset("no-such-org/no-such-dataset-for-vipa-tests")
    with pytest.raises(ValueError, match="neither an existing folder nor a Hub repo id"):
        open_lerobot_dataset("./missing/folder/x")


# ---- bad input -------------------------------------------------------------------------------------------------
def _data_file(root: Path) -> Path:
    return root / "data/chunk-000/file-000.parquet"


def _rewrite_column(root: Path, name: str, fn) -> None:
    t = pq.read_table(_data_file(root))
    i = t.column_names.index(name)
    t = t.set_column(i, name, fn(t.column(name).combine_chunks()))
    pq.write_table(t, _data_file(root))


def _poison(root: Path, name: str, row: int, value: float) -> None:
    def fn(col):
        width = col.type.list_size
        vals = col.flatten().to_numpy().copy()
        vals[row * width + 1] = value
        return pa.FixedSizeListArray.from_arrays(pa.array(vals), width)

    _rewrite_column(root, name, fn)


def _shift_timestamp(root: Path) -> None:
    def fn(col):
        ts = col.to_numpy().copy()
        ts[13] += 0.02  # episode 2, frame 3
        return pa.array(ts)

    _rewrite_column(root, "timestamp", fn)


def _drop_state_column(root: Path) -> None:
    t = pq.read_table(_data_file(root))
    pq.write_table(t.drop_columns(["observation.state"]), _data_file(root))


def _truncate_before_last_episode(root: Path) -> None:
    """Cut the wrist video at the first packet of episode 2 (a recording that stopped while writing)."""
    path = root / f"videos/{CAMERAS[1]}/chunk-000/file-000.mp4"
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        cut = min(p.pos for p in c.demux(s) if p.pts is not None and float(p.pts * s.time_base) >= 0.999)
    with open(path, "r+b") as f:
        f.truncate(cut)


def _garbage_video(root: Path) -> None:
    (root / f"videos/{CAMERAS[0]}/chunk-000/file-000.mp4").write_bytes(np.random.default_rng(0).bytes(4000))


def _add_empty_episode(root: Path) -> None:
    path = root / "meta/episodes/chunk-000/file-000.parquet"
    rows = pq.read_table(path).to_pylist()
    extra = dict(rows[-1], episode_index=3, length=0, dataset_from_index=18, dataset_to_index=18)
    pq.write_table(pa.Table.from_pylist(rows + [extra]), path)


BAD_INPUT = [
    # (case, mutation, constructor kwargs, expected: ("error", regex) or ("skip", reason, skipped episodes))
    ("missing_feature", None, {"state_key": "observation.joint_state"}, ("error", r"info\.json.*'observation\.joint_state'")),
    ("missing_column", _drop_state_column, {}, ("error", r"file-000\.parquet: no column 'observation\.state'.*\[0, 1, 2\]")),
    ("unknown_camera", None, {"camera_keys": ["observation.images.top"]}, ("error", r"observation\.images\.top.*cameras are")),
    ("nan_action", lambda r: _poison(r, "action", 7, np.nan), {}, ("skip", "nonfinite_values", [1])),
    ("inf_state", lambda r: _poison(r, "observation.state", 0, np.inf), {}, ("skip", "nonfinite_values", [0])),
    ("timestamps_vs_fps", _shift_timestamp, {}, ("error", r"file-000\.parquet, episode 2: feature 'timestamp' disagrees with fps 10")),
    ("truncated_video", _truncate_before_last_episode, {}, ("skip", "truncated_video", [2])),
    ("undecodable_video", _garbage_video, {}, ("error", r"no usable episode.*unreadable_video.*image/chunk-000/file-000\.mp4")),
    ("empty_episode", _add_empty_episode, {}, ("skip", "empty_episode", [3])),
]  # fmt: skip


@pytest.mark.parametrize("case, mutate, kwargs, expected", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input(lerobot_fixture, tmp_path, case, mutate, kwargs, expected):
    src, ref = lerobot_fixture
    root = tmp_path / case
    shutil.copytree(src, root)
    if mutate is not None:
        mutate(root)
    if expected[0] == "error":
        with pytest.raises(ValueError, match=expected[1]):
            LeRobotV3Dataset(root, **kwargs)
        return
    _, reason, skipped = expected
    ds = LeRobotV3Dataset(root, **kwargs)
    assert sorted(ds.report["skipped_episodes"]) == skipped
    assert ds.report["skipped"] == {reason: len(skipped)}
    assert all(str(root) in m for m in ds.report["skipped_episodes"].values())  # each names its file
    kept = [e for e in range(len(ref["lengths"])) if e not in skipped]
    assert len(ds) == sum(ref["lengths"][e] for e in kept) and ds.report["episodes"] == len(kept)
    assert {ds[i]["episode_index"] for i in range(len(ds))} == set(kept)
    for i in range(len(ds)):  # every remaining sample is finite and decodes
        item = ds[i]
        assert torch.isfinite(item["action"]).all() and torch.isfinite(item["observation.state"]).all()


def test_skip_messages_name_file_episode_and_feature(lerobot_fixture, tmp_path):
    src, _ = lerobot_fixture
    shutil.copytree(src, tmp_path / "d")
    _poison(tmp_path / "d", "action", 7, np.nan)
    _truncate_before_last_episode(tmp_path / "d")
    report = LeRobotV3Dataset(tmp_path / "d").report
    assert "file-000.parquet, episode 1: NaN/inf in feature 'action'" in report["skipped_episodes"][1]
    assert (
        f"feature '{CAMERAS[1]}'" in report["skipped_episodes"][2]
        and "file-000.mp4 ends at" in report["skipped_episodes"][2]
    )


def test_writer_rejects_bad_frames(tmp_path):
    w = LeRobotV3Writer.create(tmp_path / "w", fps=10, features=FEATURES)
    good = {
        "observation.images.front": np.zeros((48, 64, 3), np.uint8),
        "observation.images.wrist": np.zeros((32, 48, 3), np.uint8),
        "observation.state": np.zeros(6, np.float32),
        "action": np.zeros(4, np.float32),
    }
    with pytest.raises(ValueError, match="empty episode"):
        w.save_episode()
    with pytest.raises(ValueError, match=r"missing features \['action'\]"):
        w.add_frame({k: v for k, v in good.items() if k != "action"}, task="t")
    with pytest.raises(ValueError, match=r"frame\['action'\]: NaN/inf"):
        w.add_frame(good | {"action": np.array([0, np.nan, 0, 0], np.float32)}, task="t")
    with pytest.raises(
        ValueError, match=r"frame\['observation.images.front'\]: expected \(48, 64, 3\) uint8"
    ):
        w.add_frame(good | {"observation.images.front": np.zeros((48, 64, 3), np.float32)}, task="t")
    (tmp_path / "used").mkdir()
    (tmp_path / "used/notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        LeRobotV3Writer.create(tmp_path / "used", fps=10, features=FEATURES)
    with pytest.raises(ValueError, match="'timestamp' is added by the writer"):
        LeRobotV3Writer.create(
            tmp_path / "w2", fps=10, features=FEATURES | {"timestamp": {"dtype": "float32", "shape": [1]}}
        )
    w.add_frame(good, task="t")
    with pytest.raises(ValueError, match="not saved"):
        w.finalize()
    assert not (tmp_path / "w/meta/info.json").exists()  # an unfinished recording is not a dataset


# ---- statistics and the processor ------------------------------------------------------------------------------
def test_compute_stats_against_numpy():
    x = np.random.default_rng(3).normal(size=(500, 3)) * [1, 10, 0.1]
    s = compute_stats(x)
    np.testing.assert_allclose(s["mean"], x.mean(0))
    np.testing.assert_allclose(s["std"], x.std(0))
    np.testing.assert_allclose(s["q01"], np.percentile(x, 1, axis=0))
    np.testing.assert_allclose(s["q99"], np.percentile(x, 99, axis=0))
    assert s["count"].tolist() == [500] and s["min"].shape == (3,)
    with pytest.raises(ValueError, match="non-finite"):
        compute_stats(np.array([[1.0], [np.nan]]))


@pytest.mark.parametrize("mode", ["mean_std", "min_max", "quantile"])
def test_norm_stats_feed_the_processor(lerobot_fixture, mode):
    root, ref = lerobot_fixture
    stats = norm_stats_for_processor(LeRobotMeta.load(root), mode=mode, unnorm_key="libero")
    proc = VipaProcessor.__new__(VipaProcessor)  # statistics only: no tokenizer or image processor needed
    proc_mode = "mean_std" if mode == "mean_std" else "min_max"
    proc.norm_mode, proc.norm_stats = proc_mode, VipaProcessor._check_norm_stats(stats, proc_mode)
    a = ref["action"]
    normed = proc.normalize_actions(a, unnorm_key="libero")
    if mode == "mean_std":
        want = (a - a.mean(0)) / (a.std(0) + 1e-8)
    else:
        lo, hi = (a.min(0), a.max(0)) if mode == "min_max" else np.quantile(a, [0.01, 0.99], axis=0)
        want = 2 * (a - lo) / (hi - lo + 1e-8) - 1
    np.testing.assert_allclose(normed, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(proc.unnormalize_actions(normed, unnorm_key="libero"), a, atol=1e-5)
    np.testing.assert_allclose(stats["libero"]["state"]["mean"], ref["state"].mean(0), rtol=1e-5, atol=1e-7)


# ---- loading order -----------------------------------------------------------------------------------------------
def test_grouped_sampler_is_a_permutation_and_batches_load(lerobot_fixture):
    root, ref = lerobot_fixture
    ds = LeRobotV3Dataset(root, action_horizon=4, decode_block_frames=4)
    sampler = EpisodeGroupedSampler(ds, blocks_in_flight=2, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(len(ds)))
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(len(ds)))
    # blocks of 4 frames of one episode: 6 -> 2 blocks, 4 -> 1, 8 -> 2; a group of 2 blocks spans <= 8 samples
    block_of = {}
    for e, n in enumerate(ref["lengths"]):
        start = sum(ref["lengths"][:e])
        for t in range(n):
            block_of[start + t] = (e, t // 4)
    pos, groups = 0, []
    while pos < len(order):
        group = set()
        while pos < len(order) and len(group | {block_of[order[pos]]}) <= 2:
            group.add(block_of[order[pos]])
            pos += 1
        groups.append(group)
    assert len(groups) <= 3  # 5 blocks in groups of 2
    loader = torch.utils.data.DataLoader(ds, batch_size=5, sampler=sampler, num_workers=0)
    seen = []
    for batch in loader:
        assert batch[CAMERAS[0]].shape[1:] == (32, 48, 3) and batch["action"].shape[1:] == (4, 7)
        assert batch["action_is_pad"].dtype == torch.bool and len(batch["task"]) == len(batch["index"])
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(ds)))
    assert ds._cache.misses == 2 * 5  # each block decoded once per camera


def test_grouped_sampler_streams_keep_each_block_on_one_worker(lerobot_fixture):
    root, _ = lerobot_fixture
    ds = LeRobotV3Dataset(root, camera_keys=[], decode_block_frames=2)  # lengths 6, 4, 8 -> 9 blocks of 2
    block = {i: (ds[i]["episode_index"], ds[i]["frame_index"] // 2) for i in range(18)}

    def blocks_per_worker(order, batch_size=2, workers=2):
        batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
        return [{block[i] for b in batches[w::workers] for i in b} for w in range(workers)]  # round-robin

    order = list(EpisodeGroupedSampler(ds, blocks_in_flight=2, seed=4, batch_size=2, num_streams=2))
    assert sorted(order) == list(range(18))
    w0, w1 = blocks_per_worker(order)
    assert w0.isdisjoint(w1) and len(w0 | w1) == 9
    w0, w1 = blocks_per_worker(list(EpisodeGroupedSampler(ds, blocks_in_flight=2, seed=4)))  # one stream
    assert len(w0 & w1) >= 3  # without streams both workers decode most blocks
    # stream_groups: per stream, groups of at most 2 whole blocks; together every frame once
    streams = EpisodeGroupedSampler(
        ds, blocks_in_flight=2, seed=4, batch_size=2, num_streams=2
    ).stream_groups()
    assert len(streams) == 2
    for groups in streams:
        for g in groups:
            blocks = {block[int(i)] for i in g}
            assert len(blocks) <= 2 and len(g) == 2 * len(blocks)  # blocks of 2 frames, never cut
    assert sorted(int(i) for groups in streams for g in groups for i in g) == list(range(18))
    with pytest.raises(ValueError, match="batch_size"):
        EpisodeGroupedSampler(ds, num_streams=2)


def test_random_access_with_reused_decoders_and_pickling(lerobot_fixture):
    """Single-frame blocks read in a shuffled order through the per-process open decoders give the same
    pictures as whole-episode decoding; a pickled copy (spawned workers) carries no open file or cache."""
    import pickle

    root, ref = lerobot_fixture
    whole = LeRobotV3Dataset(root, decode_block_frames=0)
    single = LeRobotV3Dataset(root, decode_block_frames=1, cache_mb=0)
    for i in np.random.default_rng(0).permutation(len(whole)).tolist():
        for cam in CAMERAS:
            assert torch.equal(single[i][cam], whole[i][cam]), (i, cam)
    assert len(single._videos._open) == 2  # one open file per camera, reused
    copy = pickle.loads(pickle.dumps(single))
    assert copy._cache is None and len(copy._videos._open) == 0
    assert torch.equal(copy[7][CAMERAS[1]], whole[7][CAMERAS[1]])


def test_forked_workers_after_decoding_in_parent(lerobot_fixture):
    """Decoding in the parent then forking DataLoader workers must not hang (an swscale context with worker
    threads, inherited through fork, once blocked the child forever)."""
    root, ref = lerobot_fixture
    ds = LeRobotV3Dataset(root, action_horizon=2, image_size=16)
    ds[0], ds[17]  # parent decodes (and resizes) first
    loader = torch.utils.data.DataLoader(
        ds, batch_size=6, num_workers=2, multiprocessing_context="fork", timeout=60, shuffle=False
    )
    frames = torch.cat([b[CAMERAS[0]] for b in loader])
    assert frames.shape == (18, 16, 16, 3)
    assert torch.equal(frames[17], ds[17][CAMERAS[0]])
