"""A LeRobot v3.0 dataset laid out as LeRobot's own code writes it, built with pyarrow, pandas and PyAV only.

Independent of `training.lerobot_dataset` (nothing is imported from it), so reader tests compare against a
second implementation of the format. What it reproduces from LeRobot (`src/lerobot/datasets/`):

- each episode's video is encoded on its own (SVT-AV1 or H.264, yuv420p, `g=2`, CRF 30) and the episode files
  are concatenated into `videos/<key>/chunk-000/file-000.mp4` by stream copy through FFmpeg's concat demuxer
  (`concatenate_video_files`); `videos/<key>/from_timestamp` is the running sum of the episode files'
  durations, `to_timestamp` = from + duration;
- the data parquet holds several episodes, one row group each, user features then timestamp, frame_index,
  episode_index, index, task_index; 1-D features as fixed-size lists (HF `Sequence(length=N)`), shape-(1,)
  features as scalars;
- `meta/episodes/chunk-000/file-000.parquet`: episode_index, tasks, length, data/chunk_index, data/file_index,
  dataset_from_index, dataset_to_index, videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp},
  stats/<feature>/<stat>, meta/episodes/chunk_index, meta/episodes/file_index;
- `meta/tasks.parquet` from a pandas frame indexed by "task"; `meta/stats.json`; `meta/info.json`.

With `cameras_as="image"` the frames are PNG bytes in the parquet (struct {bytes, path}) and the camera
features are declared channel-first, `[3, H, W]` with names channel/height/width, as `HuggingFaceVLA/libero`
and other Hub datasets declare them.
"""

from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CAMERAS = ("observation.images.image", "observation.images.wrist_image")


def frame_image(episode: int, t: int, camera: int, h: int, w: int) -> np.ndarray:
    """A smooth test picture whose brightness and a moving bar identify (episode, t, camera)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = 40 + 25 * episode + 9 * t + 60 * camera
    img = np.stack([base + 0.5 * xx, base + 0.5 * yy, 200 - base * 0.5 + 0 * xx], -1)
    col = (6 * t + 11 * episode) % max(w - 8, 1)
    img[:, col : col + 8, :] += 60
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode_episode(path: Path, frames: np.ndarray, fps: int, codec: str) -> None:
    options = {"g": "2", "crf": "30"}
    if codec == "libsvtav1":
        options["preset"] = "12"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _duration_s(path: Path) -> float:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return float(s.duration * s.time_base) if s.duration is not None else c.duration / av.time_base


def _concatenate(parts: list[Path], out_path: Path) -> None:
    """Stream-copy MP4s into one file with FFmpeg's concat demuxer (no re-encoding), as LeRobot does."""
    listing = out_path.with_suffix(".ffconcat")
    listing.write_text("ffconcat version 1.0\n" + "".join(f"file '{p.resolve()}'\n" for p in parts))
    with av.open(str(listing), "r", format="concat", options={"safe": "0"}) as src:
        with av.open(str(out_path), "w", options={"movflags": "faststart"}) as dst:
            istream = src.streams.video[0]
            ostream = dst.add_stream_from_template(template=istream, opaque=True)
            ostream.time_base = istream.time_base
            for packet in src.demux(istream):
                if packet.dts is None:
                    continue
                packet.stream = ostream
                dst.mux(packet)
    listing.unlink()


def _stats(values: np.ndarray) -> dict[str, list]:
    v = values.astype(np.float64).reshape(len(values), -1)
    out = {"min": v.min(0), "max": v.max(0), "mean": v.mean(0), "std": v.std(0)}
    for q in (1, 10, 50, 90, 99):
        out[f"q{q:02d}"] = np.quantile(v, q / 100, axis=0)
    res = {k: a.tolist() for k, a in out.items()}
    res["count"] = [len(v)]
    return res


def _image_stats(frames: np.ndarray) -> dict[str, list]:
    v = frames.reshape(-1, 3).astype(np.float64) / 255.0
    s = _stats(v)
    res = {k: [[[x]] for x in a] for k, a in s.items() if k != "count"}
    res["count"] = [len(frames)]
    return res


def build_v3_fixture(
    root: str | Path,
    lengths: tuple[int, ...] = (6, 4, 8),
    fps: int = 10,
    hw: tuple[int, int] = (32, 48),
    state_dim: int = 8,
    action_dim: int = 7,
    cameras_as: str = "video",
    codec: str = "libsvtav1",
    seed: int = 0,
) -> dict:
    """Write the dataset under `root`; return what a reader must give back.

    Returns {"state": (N, S) float32, "action": (N, A) float32, "episode": (N,), "frame": (N,),
    "timestamp": (N,) float32, "task": [str] * N, "frames": {camera: (N, H, W, 3) uint8 (the pictures before
    encoding)}, "lengths": lengths}; row n of each is global frame index n.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = hw
    tasks = ["put the bowl on the plate", "open the top drawer"]
    n_total = sum(lengths)
    state = rng.normal(size=(n_total, state_dim)).astype(np.float32)
    action = rng.uniform(-1, 1, size=(n_total, action_dim)).astype(np.float32)
    episode = np.concatenate([np.full(n, e) for e, n in enumerate(lengths)]).astype(np.int64)
    frame = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)
    timestamp = (frame / fps).astype(np.float32)
    task_index = (episode % 2).astype(np.int64)
    frames = {
        cam: np.stack([frame_image(int(e), int(t), c, h, w) for e, t in zip(episode, frame)])
        for c, cam in enumerate(CAMERAS)
    }
    starts = np.concatenate([[0], np.cumsum(lengths)])

    features: dict[str, dict] = {}
    for cam in CAMERAS:
        if cameras_as == "video":
            features[cam] = {
                "dtype": "video",
                "shape": [h, w, 3],
                "names": ["height", "width", "channels"],
                "info": {
                    "video.height": h,
                    "video.width": w,
                    "video.codec": "av1" if codec == "libsvtav1" else "h264",
                    "video.pix_fmt": "yuv420p",
                    "video.is_depth_map": False,
                    "video.fps": fps,
                    "video.channels": 3,
                    "has_audio": False,
                },
            }
        else:
            features[cam] = {"dtype": "image", "shape": [3, h, w], "names": ["channel", "height", "width"]}
    features["observation.state"] = {"dtype": "float32", "shape": [state_dim], "names": None}
    features["action"] = {"dtype": "float32", "shape": [action_dim], "names": None}
    for k, dt in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64")):
        features[k] = {"dtype": dt, "shape": [1], "names": None}
    features["index"] = {"dtype": "int64", "shape": [1], "names": None}
    features["task_index"] = {"dtype": "int64", "shape": [1], "names": None}

    # data/chunk-000/file-000.parquet: all episodes, one row group per episode
    data_path = root / "data/chunk-000/file-000.parquet"
    data_path.parent.mkdir(parents=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    writer = None
    for e in range(len(lengths)):
        rows = slice(starts[e], starts[e + 1])
        cols = {}
        if cameras_as == "image":
            for cam in CAMERAS:
                cells = []
                for t, img in enumerate(frames[cam][rows]):
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="PNG")
                    cells.append({"bytes": buf.getvalue(), "path": f"frame_{t:06d}.png"})
                cols[cam] = pa.array(cells, type=image_type)
        cols["observation.state"] = pa.FixedSizeListArray.from_arrays(
            pa.array(state[rows].reshape(-1)), state_dim
        )
        cols["action"] = pa.FixedSizeListArray.from_arrays(pa.array(action[rows].reshape(-1)), action_dim)
        cols["timestamp"] = pa.array(timestamp[rows])
        cols["frame_index"] = pa.array(frame[rows])
        cols["episode_index"] = pa.array(episode[rows])
        cols["index"] = pa.array(np.arange(starts[e], starts[e + 1], dtype=np.int64))
        cols["task_index"] = pa.array(task_index[rows])
        table = pa.table(cols)
        if writer is None:
            writer = pq.ParquetWriter(data_path, table.schema, compression="snappy", use_dictionary=True)
        writer.write_table(table)
    writer.close()

    # videos: one file per episode, then concatenated by stream copy
    video_cols: dict[str, list] = {}
    if cameras_as == "video":
        for cam in CAMERAS:
            tmp_dir = root / "tmp_episodes" / cam
            tmp_dir.mkdir(parents=True)
            parts, offsets, durations = [], [], []
            offset = 0.0
            for e in range(len(lengths)):
                part = tmp_dir / f"episode_{e:06d}.mp4"
                _encode_episode(part, frames[cam][starts[e] : starts[e + 1]], fps, codec)
                parts.append(part)
                d = _duration_s(part)
                offsets.append(offset)
                durations.append(d)
                offset += d
            out = root / f"videos/{cam}/chunk-000/file-000.mp4"
            out.parent.mkdir(parents=True)
            _concatenate(parts, out)
            for p in parts:
                p.unlink()
            video_cols[f"videos/{cam}/chunk_index"] = [0] * len(lengths)
            video_cols[f"videos/{cam}/file_index"] = [0] * len(lengths)
            video_cols[f"videos/{cam}/from_timestamp"] = offsets
            video_cols[f"videos/{cam}/to_timestamp"] = [o + d for o, d in zip(offsets, durations)]
        for d in sorted((root / "tmp_episodes").glob("*"), reverse=True):
            d.rmdir()
        (root / "tmp_episodes").rmdir()

    # meta/episodes, with per-episode stats columns
    ep_cols: dict[str, list] = {
        "episode_index": list(range(len(lengths))),
        "tasks": [[tasks[e % 2]] for e in range(len(lengths))],
        "length": list(lengths),
        "data/chunk_index": [0] * len(lengths),
        "data/file_index": [0] * len(lengths),
        "dataset_from_index": starts[:-1].tolist(),
        "dataset_to_index": starts[1:].tolist(),
        **video_cols,
    }
    per_feature = {
        "observation.state": state,
        "action": action,
        "timestamp": timestamp,
        "frame_index": frame,
        "episode_index": episode,
        "index": np.arange(n_total),
        "task_index": task_index,
    }
    for e in range(len(lengths)):
        rows = slice(starts[e], starts[e + 1])
        stats = {k: _stats(v[rows]) for k, v in per_feature.items()}
        stats.update({cam: _image_stats(frames[cam][rows]) for cam in CAMERAS})
        for k, st in stats.items():
            for name, value in st.items():
                ep_cols.setdefault(f"stats/{k}/{name}", []).append(value)
    ep_cols["meta/episodes/chunk_index"] = [0] * len(lengths)
    ep_cols["meta/episodes/file_index"] = [0] * len(lengths)
    ep_path = root / "meta/episodes/chunk-000/file-000.parquet"
    ep_path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pydict(ep_cols), ep_path)

    pd.DataFrame({"task_index": [0, 1]}, index=pd.Index(tasks, name="task")).to_parquet(
        root / "meta/tasks.parquet"
    )
    global_stats = {k: _stats(v) for k, v in per_feature.items()}
    global_stats.update({cam: _image_stats(frames[cam]) for cam in CAMERAS})
    (root / "meta/stats.json").write_text(json.dumps(global_stats, indent=4))
    info = {
        "codebase_version": "v3.0",
        "robot_type": "panda",
        "total_episodes": len(lengths),
        "total_frames": n_total,
        "total_tasks": 2,
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": fps,
        "splits": {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
        if cameras_as == "video"
        else None,
        "features": features,
    }
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))
    return {
        "state": state,
        "action": action,
        "episode": episode,
        "frame": frame,
        "timestamp": timestamp,
        "task": [tasks[i] for i in task_index],
        "frames": frames,
        "lengths": lengths,
        "global_stats": global_stats,
    }


def write_v21_info(root: str | Path) -> None:
    """A v2.1 dataset's meta/info.json (one parquet per episode, episodes.jsonl), as LeRobot 0.3 wrote it."""
    root = Path(root)
    (root / "meta").mkdir(parents=True)
    info = {
        "codebase_version": "v2.1",
        "robot_type": "panda",
        "total_episodes": 1,
        "total_frames": 3,
        "fps": 10,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": {"action": {"dtype": "float32", "shape": [7], "names": None}},
    }
    (root / "meta/info.json").write_text(json.dumps(info))
    (root / "meta/episodes.jsonl").write_text(
        json.dumps({"episode_index": 0, "tasks": ["x"], "length": 3}) + "\n"
    )
