"""LeRobot dataset v3.0, written without the `lerobot` package: what the robot demonstrations and the vipa-demos
recordings are stored as (layout and file names: `training.lerobot_dataset`, which reads them back).

`LeRobotV3Writer` records frames episode by episode: numeric features go to the data parquet (one row group
per episode), "video" cameras are encoded as they arrive into one MP4 per camera (AV1 by SVT-AV1 as LeRobot
encodes, H.264 where PyAV has no AV1 encoder), "image" cameras are PNG cells in the parquet. Statistics are
computed here too (`compute_stats`, `aggregate_stats`): per episode into meta/episodes, over the dataset into
meta/stats.json, in LeRobot's keys (mean, std, min, max, q01 ... q99, count).

Usage (two episodes of two cameras; `training.lerobot_dataset.LeRobotV3Dataset(root)` reads them back):

    import numpy as np
    from training.lerobot_writer import LeRobotV3Writer
    cam = {"dtype": "video", "shape": [48, 64, 3], "names": ["height", "width", "channels"]}
    vector = {"observation.state": 8, "action": 7}
    features = {"observation.images.image": cam, "observation.images.wrist_image": cam}
    features |= {k: {"dtype": "float32", "shape": [d], "names": None} for k, d in vector.items()}
    w = LeRobotV3Writer.create("demo_two_cams", fps=20, features=features, robot_type="panda")
    rng = np.random.default_rng(0)
    for episode, length in enumerate((30, 25)):
        for t in range(length):
            frame = {k: rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for k in w.video_keys}
            frame |= {k: rng.normal(size=d).astype(np.float32) for k, d in vector.items()}
            w.add_frame(frame, task=f"task {episode}")
        w.save_episode()
    root = w.finalize()   # meta/info.json, stats.json, tasks.parquet and episodes/ are written last
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from training.lerobot_dataset import (
    CAMERA_DTYPES,
    CODEBASE_VERSION,
    DATA_PATH,
    DEFAULT_FEATURES,
    EPISODES_PATH,
    TASKS_PATH,
    VIDEO_PATH,
)
from training.video_io import VideoStreamWriter, default_av1_codec, probe_video

__all__ = ["LeRobotV3Writer", "aggregate_stats", "compute_stats"]

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)  # LeRobot's q01, q10, q50, q90, q99


# ---- small helpers --------------------------------------------------------------------------------------------
def _atomic_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and `os.replace`: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_json(path: Path, obj: Any) -> None:
    _atomic_bytes(path, (json.dumps(obj, indent=4) + "\n").encode())


def _atomic_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    pq.write_table(table, tmp, compression="snappy")
    os.replace(tmp, path)


def _next_chunk_file(chunk: int, file: int, chunks_size: int) -> tuple[int, int]:
    """The next file slot; a chunk folder holds at most `chunks_size` files (LeRobot's rule)."""
    return (chunk + 1, 0) if file + 1 >= chunks_size else (chunk, file + 1)


# ---- statistics -----------------------------------------------------------------------------------------------
def compute_stats(arrays: Any) -> dict[str, np.ndarray]:
    """Per-dimension statistics of (N, D) samples (or (N,), treated as D = 1), as LeRobot stores them.

    Returns float64 (D,) arrays "mean", "std" (population), "min", "max", the exact quantiles "q01", "q10",
    "q50", "q90", "q99" (linear interpolation; LeRobot's own writer approximates them with histograms) and
    "count": (1,) int64 = N. NaN/inf or N = 0 raise ValueError.

        >>> s = compute_stats(np.arange(101.0))
        >>> float(s["mean"][0]), float(s["q01"][0]), float(s["q99"][0]), int(s["count"][0])
        (50.0, 1.0, 99.0, 101)
    """
    arr = np.asarray(arrays, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"arrays: expected (N, D) samples with N > 0, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"arrays: {int((~np.isfinite(arr)).sum())} non-finite values (NaN/inf)")
    out = {
        "mean": arr.mean(0),
        "std": arr.std(0),
        "min": arr.min(0),
        "max": arr.max(0),
    }
    qs = np.quantile(arr, QUANTILES, axis=0)
    for q, v in zip(QUANTILES, qs):
        out[f"q{round(q * 100):02d}"] = v
    out["count"] = np.array([arr.shape[0]], dtype=np.int64)
    return out


def _image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """LeRobot's camera statistics: per channel over sampled frames, in [0, 1], shaped (3, 1, 1).

    `frames: (N, H, W, 3) uint8`. Up to 100 evenly spaced frames are used (LeRobot samples too); count = N used.
    """
    idx = np.round(np.linspace(0, len(frames) - 1, min(len(frames), 100))).astype(int)
    sample = frames[idx].reshape(-1, frames.shape[-1]).astype(np.float64) / 255.0
    stats = compute_stats(sample)
    stats = {k: v.reshape(-1, 1, 1) for k, v in stats.items() if k != "count"}
    stats["count"] = np.array([len(idx)], dtype=np.int64)
    return stats


def aggregate_stats(stats_list: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Combine statistics of disjoint parts of one feature: count-weighted mean and variance, min of mins, max of
    maxes; quantiles cannot be combined exactly, so (as LeRobot does) the lower ones take the minimum and the
    upper ones the maximum of the parts, a conservative envelope."""
    if not stats_list:
        raise ValueError("stats_list: nothing to aggregate")
    counts = np.array([float(s["count"].reshape(-1)[0]) for s in stats_list])
    means = np.stack([s["mean"] for s in stats_list])
    w = (counts / counts.sum()).reshape((-1,) + (1,) * (means.ndim - 1))
    mean = (means * w).sum(0)
    var = ((np.stack([s["std"] for s in stats_list]) ** 2 + (means - mean) ** 2) * w).sum(0)
    out = {
        "mean": mean,
        "std": np.sqrt(var),
        "min": np.min(np.stack([s["min"] for s in stats_list]), 0),
        "max": np.max(np.stack([s["max"] for s in stats_list]), 0),
    }
    for key in stats_list[0]:
        if re.fullmatch(r"q\d\d", key) and all(key in s for s in stats_list):
            stacked = np.stack([s[key] for s in stats_list])
            out[key] = stacked.min(0) if int(key[1:]) <= 50 else stacked.max(0)
    out["count"] = np.array([int(counts.sum())], dtype=np.int64)
    return out


# ---- writer ---------------------------------------------------------------------------------------------------
_NUMERIC_DTYPES = {
    "float32": pa.float32(),
    "float64": pa.float64(),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "int16": pa.int16(),
    "int8": pa.int8(),
    "uint8": pa.uint8(),
    "bool": pa.bool_(),
}
_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _hf_feature(ft: dict) -> dict:
    """The `datasets` feature JSON of a column (kept in the parquet's "huggingface" metadata, as LeRobot's
    files carry it, so `datasets.load_dataset("parquet", ...)` decodes images and lists the same way)."""
    if ft["dtype"] == "image":
        return {"_type": "Image"}
    value = {"dtype": ft["dtype"], "_type": "Value"}
    if list(ft["shape"]) == [1]:
        return value
    return {"feature": value, "length": int(np.prod(ft["shape"])), "_type": "List"}


class LeRobotV3Writer:
    """Writes the LeRobot v3.0 layout: `add_frame` per step, `save_episode` per episode, `finalize` once.

    Episodes are appended to one data parquet (one row group per episode) and one MP4 per camera until the file
    reaches its size limit, then the next file slot is used (chunk-XXX/file-YYY, `chunks_size` files per
    chunk), as LeRobot does. Video frames are encoded as they arrive (AV1 by SVT-AV1 by default, LeRobot's
    settings). Every file is written under a `.partial` name and renamed when complete; the `meta/` files are
    written by `finalize`, so an interrupted recording never looks like a finished dataset.
    Statistics: per episode (the `stats/...` columns of meta/episodes) for every numeric feature and camera;
    `meta/stats.json` has exact statistics over all frames for numeric features and LeRobot's count-weighted
    aggregate of the per-episode statistics for cameras (values in [0, 1], shape (3, 1, 1)).
    """

    def __init__(self) -> None:
        raise TypeError("use LeRobotV3Writer.create(root, fps, features, ...)")

    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        fps: int,
        features: dict[str, dict],
        robot_type: str | None = None,
        use_videos: bool = True,
        video_codec: str | None = None,
        chunks_size: int = 1000,
        data_files_size_in_mb: float = 100,
        video_files_size_in_mb: float = 200,
    ) -> LeRobotV3Writer:
        """Start a dataset in `root` (absent or empty). `features`: {key: {"dtype", "shape", "names"}} without
        LeRobot's bookkeeping columns (timestamp, frame_index, episode_index, index, task_index); cameras have
        dtype "video" or "image" and shape (H, W, 3). `use_videos=False` stores "video" cameras as images in
        the parquet. `video_codec`: None picks "libsvtav1" (AV1), else "h264" where PyAV has no AV1 encoder."""
        self = object.__new__(cls)
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            raise ValueError(f"root: {root} exists and is not empty; the writer starts new datasets only")
        if not isinstance(fps, int) or fps <= 0:
            raise ValueError(f"fps: expected a positive int, got {fps!r}")
        if not isinstance(chunks_size, int) or chunks_size <= 0:
            raise ValueError(f"chunks_size: expected a positive int, got {chunks_size!r}")
        if not features:
            raise ValueError("features: empty")
        clean: dict[str, dict] = {}
        for key, ft in features.items():
            if key in DEFAULT_FEATURES or key == "task":
                raise ValueError(f"features: {key!r} is added by the writer itself; remove it")
            if not isinstance(ft, dict) or "dtype" not in ft or "shape" not in ft:
                raise ValueError(
                    f"features[{key!r}]: expected {{'dtype', 'shape', 'names'}}, got {ft!r:.200}"
                )
            dtype, shape = ft["dtype"], [int(s) for s in ft["shape"]]
            if dtype in CAMERA_DTYPES:
                if len(shape) != 3 or shape[2] != 3:
                    raise ValueError(f"features[{key!r}]: camera shape must be (H, W, 3), got {shape}")
                dtype = dtype if use_videos else "image"
                names = ft.get("names") or ["height", "width", "channels"]
            elif dtype in _NUMERIC_DTYPES:
                if len(shape) != 1:
                    raise ValueError(f"features[{key!r}]: numeric features must be 1-D, got shape {shape}")
                names = ft.get("names")
            else:
                raise ValueError(
                    f"features[{key!r}]: dtype {dtype!r} not supported; use one of "
                    f"{list(CAMERA_DTYPES) + list(_NUMERIC_DTYPES)}"
                )
            clean[key] = {"dtype": dtype, "shape": shape, "names": names}
        codec = video_codec or default_av1_codec()
        if video_codec is None and codec == "h264":
            warnings.warn("PyAV's FFmpeg has no AV1 encoder here; writing H.264 videos", stacklevel=2)
        self.root, self.fps, self.codec = root, fps, codec
        self.features = {**clean, **{k: dict(v) for k, v in DEFAULT_FEATURES.items()}}
        self.robot_type, self.chunks_size = robot_type, chunks_size
        self.data_limit, self.video_limit = data_files_size_in_mb * 2**20, video_files_size_in_mb * 2**20
        self.video_keys = [k for k, f in clean.items() if f["dtype"] == "video"]
        self.image_keys = [k for k, f in clean.items() if f["dtype"] == "image"]
        self.numeric_keys = [k for k in self.features if self.features[k]["dtype"] in _NUMERIC_DTYPES]
        self._user_keys = list(clean)
        self._tasks: dict[str, int] = {}
        self._episode_rows: list[dict] = []
        self._all_numeric: dict[str, list[np.ndarray]] = {k: [] for k in self.numeric_keys}
        self._camera_stats: dict[str, list[dict]] = {k: [] for k in self.video_keys + self.image_keys}
        self._data_slot, self._data_writer, self._data_bytes, self._data_path = (0, 0), None, 0, None
        self._videos: dict[str, dict] = {}  # key -> {"slot", "writer"}
        self._video_info: dict[str, dict] = {}
        self._total_frames, self._finalized = 0, False
        self._frames: list[dict] = []
        self._frame_tasks: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        return self

    # -- recording ----------------------------------------------------------------------------------------------
    def add_frame(self, frame: dict[str, Any], task: str) -> None:
        """One time step: every feature given at creation (cameras (H, W, 3) uint8), and the task text."""
        if self._finalized:
            raise ValueError("add_frame: the writer is finalized")
        if not isinstance(task, str) or not task:
            raise ValueError(f"task: expected a non-empty string, got {task!r}")
        given, expected = set(frame), set(self._user_keys)
        if given != expected:
            raise ValueError(
                f"frame: missing features {sorted(expected - given)}, unexpected {sorted(given - expected)}"
            )
        clean = {}
        for key in self._user_keys:
            ft = self.features[key]
            value = frame[key]
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            arr = np.asarray(value)
            if ft["dtype"] in CAMERA_DTYPES:
                if arr.shape != tuple(ft["shape"]) or arr.dtype != np.uint8:
                    raise ValueError(
                        f"frame[{key!r}]: expected {tuple(ft['shape'])} uint8, got {arr.shape} {arr.dtype}"
                    )
            else:
                arr = arr.reshape(-1) if arr.ndim == 0 else arr
                if arr.shape != tuple(ft["shape"]):
                    raise ValueError(f"frame[{key!r}]: expected shape {tuple(ft['shape'])}, got {arr.shape}")
                arr = arr.astype(np.dtype(ft["dtype"]))
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    raise ValueError(f"frame[{key!r}]: NaN/inf values {arr.tolist()}")
            clean[key] = arr
        self._frames.append(clean)
        self._frame_tasks.append(task)

    def _next_slot(self, slot: tuple[int, int]) -> tuple[int, int]:
        return _next_chunk_file(*slot, self.chunks_size)

    def _episode_table(self, episode: int, n: int) -> pa.Table:
        from PIL import Image

        cols: dict[str, pa.Array] = {}
        for key in self._user_keys:
            ft = self.features[key]
            if ft["dtype"] == "video":
                continue
            if ft["dtype"] == "image":
                cells = []
                for t, f in enumerate(self._frames):
                    buf = io.BytesIO()
                    Image.fromarray(f[key]).save(buf, format="PNG")
                    cells.append({"bytes": buf.getvalue(), "path": f"frame-{t:06d}.png"})
                cols[key] = pa.array(cells, type=_IMAGE_STRUCT)
                continue
            values = np.stack([f[key] for f in self._frames])
            typ = _NUMERIC_DTYPES[ft["dtype"]]
            if ft["shape"] == [1]:
                cols[key] = pa.array(values.reshape(n), type=typ)
            else:
                cols[key] = pa.FixedSizeListArray.from_arrays(
                    pa.array(values.reshape(-1), type=typ), ft["shape"][0]
                )
        task_index = [self._tasks.setdefault(t, len(self._tasks)) for t in self._frame_tasks]
        cols["timestamp"] = pa.array((np.arange(n) / self.fps).astype(np.float32))
        cols["frame_index"] = pa.array(np.arange(n, dtype=np.int64))
        cols["episode_index"] = pa.array(np.full(n, episode, np.int64))
        cols["index"] = pa.array(np.arange(self._total_frames, self._total_frames + n, dtype=np.int64))
        cols["task_index"] = pa.array(np.asarray(task_index, np.int64))
        table = pa.table(cols)
        hf = {"info": {"features": {k: _hf_feature(self.features[k]) for k in table.column_names}}}
        return table.replace_schema_metadata({"huggingface": json.dumps(hf)})

    def save_episode(self) -> None:
        """Write the frames added since the last call as one episode (an empty episode raises ValueError)."""
        n = len(self._frames)
        if n == 0:
            raise ValueError("save_episode: no frames added since the last episode (empty episode)")
        episode = len(self._episode_rows)
        table = self._episode_table(episode, n)
        # data parquet: a new file slot when this one is full (never split an episode)
        if self._data_writer is not None and self._data_bytes >= self.data_limit:
            self._close_data()
            self._data_slot = self._next_slot(self._data_slot)
        if self._data_writer is None:
            self._data_path = self.root / DATA_PATH.format(
                chunk_index=self._data_slot[0], file_index=self._data_slot[1]
            )
            self._data_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._data_path.with_name(self._data_path.name + ".partial")
            self._data_writer = pq.ParquetWriter(tmp, table.schema, compression="snappy")
            self._data_bytes = 0
        self._data_writer.write_table(table)  # one row group per episode, as LeRobot writes them
        self._data_bytes += table.nbytes
        row: dict[str, Any] = {
            "episode_index": episode,
            "tasks": list(dict.fromkeys(self._frame_tasks)),
            "length": n,
            "data/chunk_index": self._data_slot[0],
            "data/file_index": self._data_slot[1],
            "dataset_from_index": self._total_frames,
            "dataset_to_index": self._total_frames + n,
        }
        for key in self.video_keys:
            row.update(self._write_video(key, n))
        stats: dict[str, dict[str, np.ndarray]] = {}
        for key in self.features:
            if key in self.numeric_keys:
                values = (
                    np.stack([f[key] for f in self._frames]).astype(np.float64)
                    if key in self._user_keys  # else a scalar bookkeeping column (timestamp, index, ...)
                    else table.column(key).to_numpy().astype(np.float64).reshape(-1, 1)
                )
                stats[key] = compute_stats(values)
                self._all_numeric[key].append(values)
            else:
                stats[key] = _image_stats(np.stack([f[key] for f in self._frames]))
                self._camera_stats[key].append(stats[key])
        for key, st in stats.items():
            for name, value in st.items():
                row[f"stats/{key}/{name}"] = value.tolist()
        row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
        self._episode_rows.append(row)
        self._total_frames += n
        self._frames, self._frame_tasks = [], []

    def _write_video(self, key: str, n: int) -> dict[str, Any]:
        state = self._videos.get(key)
        if state is not None and state["writer"].bytes_written() >= self.video_limit:
            state["writer"].close()
            state = {"slot": self._next_slot(state["slot"]), "writer": None}
            self._videos[key] = state
        if state is None:
            state = {"slot": (0, 0), "writer": None}
            self._videos[key] = state
        if state["writer"] is None:
            h, w, _ = self.features[key]["shape"]
            path = self.root / VIDEO_PATH.format(
                video_key=key, chunk_index=state["slot"][0], file_index=state["slot"][1]
            )
            state["writer"] = VideoStreamWriter(path, self.fps, w, h, codec=self.codec)
            self._video_info[key] = state["writer"].options
        writer = state["writer"]
        start = writer.duration_s
        for f in self._frames:
            writer.write(f[key])
        return {
            f"videos/{key}/chunk_index": state["slot"][0],
            f"videos/{key}/file_index": state["slot"][1],
            f"videos/{key}/from_timestamp": start,
            f"videos/{key}/to_timestamp": writer.duration_s,
        }

    def _close_data(self) -> None:
        if self._data_writer is not None:
            self._data_writer.close()
            os.replace(self._data_path.with_name(self._data_path.name + ".partial"), self._data_path)
            self._data_writer = None

    def finalize(self) -> Path:
        """Close the open files and write meta/ (info, stats, tasks, episodes). Returns the dataset root."""
        if self._finalized:
            return self.root
        if self._frames:
            raise ValueError(
                f"finalize: {len(self._frames)} frames added but not saved; call save_episode() first"
            )
        if not self._episode_rows:
            raise ValueError("finalize: no episode saved")
        self._close_data()
        for state in self._videos.values():
            state["writer"].close()
        rows = self._episode_rows
        columns = list(rows[0])
        _atomic_parquet(
            self.root / EPISODES_PATH.format(chunk_index=0, file_index=0),
            pa.table({c: [r[c] for r in rows] for c in columns}),
        )
        import pandas as pd

        tasks = pd.DataFrame(
            {"task_index": np.arange(len(self._tasks), dtype=np.int64)},
            index=pd.Index(list(self._tasks), name="task"),
        )
        tmp = self.root / (TASKS_PATH + ".partial")
        tasks.to_parquet(tmp)
        os.replace(tmp, self.root / TASKS_PATH)
        stats = {k: compute_stats(np.concatenate(v)) for k, v in self._all_numeric.items()}
        stats.update({k: aggregate_stats(v) for k, v in self._camera_stats.items()})
        _atomic_json(
            self.root / "meta" / "stats.json",
            {k: {n: v.tolist() for n, v in s.items()} for k, s in stats.items()},
        )
        features = json.loads(json.dumps(self.features))
        for key in self.video_keys:
            probe = probe_video(self.root / VIDEO_PATH.format(video_key=key, chunk_index=0, file_index=0))
            features[key]["info"] = {
                "video.height": probe["height"],
                "video.width": probe["width"],
                "video.codec": "av1" if "av1" in probe["codec"] else probe["codec"],
                "video.pix_fmt": self._video_info[key]["video.pix_fmt"],
                "video.is_depth_map": False,
                "video.fps": self.fps,
                "video.channels": 3,
                "video.g": self._video_info[key]["video.g"],
                "video.crf": self._video_info[key]["video.crf"],
                "has_audio": False,
            }
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": len(rows),
            "total_frames": self._total_frames,
            "total_tasks": len(self._tasks),
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": self.data_limit / 2**20,
            "video_files_size_in_mb": self.video_limit / 2**20,
            "fps": self.fps,
            "splits": {"train": f"0:{len(rows)}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.video_keys else None,
            "features": features,
        }
        _atomic_json(self.root / "meta" / "info.json", info)
        self._finalized = True
        return self.root
