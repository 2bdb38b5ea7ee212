"""LeRobot dataset v3.0, read without the `lerobot` package (paper §3.3, §4.1: stage-3 robot data).

`lerobot` pins torch and datasets versions that cannot live beside this project's pins, so this module reads
the v3.0 layout itself (and `training.lerobot_writer` writes it), from LeRobot's documentation and the files
its code writes:

    ROOT/meta/info.json                                    codebase_version "v3.0", fps, features, path templates
    ROOT/meta/stats.json                                   {feature: {mean, std, min, max, q01, ..., q99, count}}
    ROOT/meta/tasks.parquet                                index "task" (str), column task_index (int64)
    ROOT/meta/episodes/chunk-000/file-000.parquet          one row per episode: episode_index, tasks, length,
                                                           data/{chunk,file}_index, dataset_{from,to}_index,
                                                           videos/<key>/{chunk_index,file_index,from_timestamp,
                                                           to_timestamp}, stats/<feature>/<stat>, meta/episodes/...
    ROOT/data/chunk-000/file-000.parquet                   one row per frame, many episodes per file
    ROOT/videos/<key>/chunk-000/file-000.mp4               one stream per camera, many episodes per file

Camera frames are MP4 (AV1 by default, H.264 also read) decoded with PyAV (its wheel bundles FFmpeg with dav1d
and SVT-AV1), or images inside the data parquet (`dtype: "image"`, struct {bytes, path}; the
`HuggingFaceVLA/libero` layout).

Samples (`LeRobotV3Dataset[i]`), for frame t of an episode, all as LeRobot returns them:

    "observation.images.<cam>"  (H, W, 3) uint8 per chosen camera (resized to image_size x image_size if given)
    "observation.state"         (S,) float32, the state feature at t
    "action"                    (H, A) float32, a[t + k] for k = 0..H-1, i.e. delta timestamps k / fps
    "action_is_pad"             (H,) bool, True where t + k is past the episode's end; those steps repeat the
                                episode's last action (LeRobot clamps the query index) and the loss ignores them
    "task" str, "episode_index" / "frame_index" / "index" int, "timestamp" float (seconds from episode start)

Views: the model receives the chosen cameras as its frames in `camera_keys` order (the order given, else the
order of `meta/info.json`'s features; LeRobot's LIBERO datasets list the agent view before the wrist view).
Nothing distinguishes a wrist view here: it is one more frame, and CUT3R's recurrent state reads the frames as
views of one scene in that order, its world frame being the first view's camera. Put a static third-person
camera first (its frame is the most stable reference) and the wrist camera last, which is also the paper's
two-view LIBERO setting (agent view + wrist view) and what the default order gives on those datasets.

Fast reading: video is decoded sequentially in blocks of `decode_block_frames` frames of one episode, and the
decoded blocks are kept in a per-process LRU (`cache_mb`). Use `EpisodeGroupedSampler` (with `batch_size` and
`num_streams` = DataLoader workers x processes): a shuffled epoch that draws a few blocks at a time, each
block going to one worker, so each block is decoded once instead of one seek and decode per sample and
camera. Plain random access works too (`decode_block_frames=1` then suits it best: one seek per frame, through
the process's open decoders). benchmarks/bench_robot_data.py measures these against per-sample decoding.
Damaged videos are found at construction by demuxing every referenced file (`check_videos`); a frame that
still fails to decode raises ValueError naming the file, episode, feature and frame.

Usage (a dataset written here, then read back):

    import numpy as np, torch
    from training.lerobot_dataset import EpisodeGroupedSampler, LeRobotV3Dataset, norm_stats_for_processor
    from training.lerobot_writer import LeRobotV3Writer
    features = {
        "observation.images.front": {"dtype": "video", "shape": [64, 64, 3], "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": [8], "names": None},
        "action": {"dtype": "float32", "shape": [7], "names": None},
    }
    w = LeRobotV3Writer.create("demo_robot", fps=10, features=features)
    for t in range(20):
        w.add_frame({"observation.images.front": np.zeros((64, 64, 3), np.uint8),
                     "observation.state": np.zeros(8, np.float32), "action": np.zeros(7, np.float32)},
                    task="pick up the cup")
    w.save_episode(); w.finalize()
    ds = LeRobotV3Dataset("demo_robot", action_horizon=16)   # or a Hub id: "HuggingFaceVLA/libero"
    sampler = EpisodeGroupedSampler(ds, batch_size=8, num_streams=2)  # num_streams = workers x processes
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler, num_workers=2)
    batch = next(iter(loader))   # batch["action"]: (8, 16, 7), batch["action_is_pad"]: (8, 16)
    stats = norm_stats_for_processor(ds.meta, unnorm_key="demo")  # -> VipaProcessor(norm_stats=stats)
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from training.video_io import LRUCache, OpenVideos, decode_segment, probe_video

__all__ = [
    "CODEBASE_VERSION",
    "DEFAULT_FEATURES",
    "EpisodeGroupedSampler",
    "LeRobotMeta",
    "LeRobotV3Dataset",
    "norm_stats_for_processor",
    "open_lerobot_dataset",
]

CODEBASE_VERSION = "v3.0"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
TASKS_PATH = "meta/tasks.parquet"
# The per-frame bookkeeping columns LeRobot adds to every dataset (never passed to add_frame).
DEFAULT_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
CAMERA_DTYPES = ("video", "image")
NORM_MODES = ("mean_std", "min_max", "quantile")
_V21_HINT = (
    "LeRobot's converter turns it into v3.0: `python -m lerobot.scripts.convert_dataset_v21_to_v30 "
    "--repo-id=<repo>` (in an environment where `lerobot` installs), or use the dataset's v3.0 revision"
)


# ---- small helpers --------------------------------------------------------------------------------------------
def _column_array(table: pa.Table, name: str, where: str) -> np.ndarray:
    """A numeric parquet column as (N, D) (list / fixed-size list) or (N, 1) (scalar) float64 / int64."""
    col = table.column(name).combine_chunks()
    if (
        pa.types.is_list(col.type)
        or pa.types.is_fixed_size_list(col.type)
        or pa.types.is_large_list(col.type)
    ):
        n = len(col)
        values = col.flatten().to_numpy(zero_copy_only=False)
        if n and values.size % n:
            raise ValueError(f"{where}: column {name!r} holds lists of different lengths")
        return values.reshape(n, -1 if n else 0)
    return col.to_numpy(zero_copy_only=False).reshape(-1, 1)


def _chunk_file(episode: dict, prefix: str) -> tuple[int, int]:
    return int(episode[f"{prefix}/chunk_index"]), int(episode[f"{prefix}/file_index"])


# ---- metadata -------------------------------------------------------------------------------------------------
def open_lerobot_dataset(root_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local dataset folder as-is, otherwise a Hub dataset repo id downloaded with `huggingface_hub`.

    `revision` picks a branch / tag / commit on the Hub (LeRobot tags datasets "v3.0"); it is ignored for a
    local folder. Offline (`HF_HUB_OFFLINE=1`) only already cached snapshots resolve.
    """
    path = Path(root_or_repo_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"root_or_repo_id: {str(path)!r} is a file, expected a dataset folder")
        return path
    text = str(root_or_repo_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise ValueError(
            f"root_or_repo_id: {text!r} is neither an existing folder nor a Hub repo id of the form 'org/name'"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, repo_type="dataset", revision=revision))
    except Exception as e:  # offline without a cached copy, unknown repo, no network
        raise ValueError(
            f"root_or_repo_id: {text!r} is not a local folder and its Hub dataset could not be fetched "
            f"({type(e).__name__}: {e}); download it where there is a network or pass a local folder"
        ) from e


@dataclass
class LeRobotMeta:
    """The `meta/` folder of a v3.0 dataset (see the module docstring for the files)."""

    root: Path  # dataset folder
    info: dict  # meta/info.json as read
    stats: dict[
        str, dict[str, np.ndarray]
    ]  # meta/stats.json, values as numpy arrays ({} when the file is absent)
    tasks: list[str]  # task text by task_index
    episodes: list[dict]  # meta/episodes rows by episode_index, without the stats/ columns
    episode_stats: dict[int, dict[str, dict[str, np.ndarray]]] = field(repr=False, default_factory=dict)

    @property
    def fps(self) -> int | float:
        """Frames per second (some Hub datasets write 10.0; an integral value comes back as int)."""
        fps = self.info["fps"]
        return int(fps) if float(fps).is_integer() else float(fps)

    @property
    def features(self) -> dict[str, dict]:
        return self.info["features"]

    @property
    def camera_keys(self) -> list[str]:
        """Features stored as video or as images in the parquet, in info.json order."""
        return [k for k, f in self.features.items() if f.get("dtype") in CAMERA_DTYPES]

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") == "video"]

    @property
    def total_frames(self) -> int:
        return int(self.info.get("total_frames", sum(int(e["length"]) for e in self.episodes)))

    def data_path(self, episode: dict) -> Path:
        """The parquet file holding an episode's frames."""
        chunk, file = _chunk_file(episode, "data")
        return self.root / self.info.get("data_path", DATA_PATH).format(chunk_index=chunk, file_index=file)

    def video_path(self, episode: dict, key: str) -> Path:
        """The MP4 file holding an episode's frames of camera `key`."""
        chunk, file = _chunk_file(episode, f"videos/{key}")
        template = self.info.get("video_path") or VIDEO_PATH
        return self.root / template.format(video_key=key, chunk_index=chunk, file_index=file)

    @classmethod
    def load(cls, root: str | os.PathLike) -> LeRobotMeta:
        """Read `root/meta`. A v2.x dataset raises ValueError saying so and naming LeRobot's converter."""
        root = Path(root)
        info_path = root / "meta" / "info.json"
        if not info_path.is_file():
            raise ValueError(f"{info_path}: missing; not a LeRobot dataset folder (expected meta/info.json)")
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{info_path}: not valid JSON ({e})") from None
        version = str(info.get("codebase_version", ""))
        if version.startswith("v2") or version.startswith("v1"):
            raise ValueError(
                f"{info_path}: codebase_version {version!r}: this is a LeRobot {version} dataset (one file per "
                f"episode, meta/episodes.jsonl); this reader reads v3.0 only. {_V21_HINT}"
            )
        if version != CODEBASE_VERSION:
            raise ValueError(
                f"{info_path}: codebase_version {version!r}; this reader reads {CODEBASE_VERSION!r}"
            )
        for name in ("fps", "features"):
            if name not in info:
                raise ValueError(f"{info_path}: missing {name!r}")
        if not (isinstance(info["fps"], (int, float)) and info["fps"] > 0):
            raise ValueError(f"{info_path}: fps must be a positive number, got {info['fps']!r}")
        for key, ft in info["features"].items():
            if not isinstance(ft, dict) or "dtype" not in ft or "shape" not in ft:
                raise ValueError(f"{info_path}: feature {key!r} needs 'dtype' and 'shape', got {ft!r:.200}")

        stats_path = root / "meta" / "stats.json"
        stats: dict[str, dict[str, np.ndarray]] = {}
        if stats_path.is_file():
            raw = json.loads(stats_path.read_text())
            stats = {k: {n: np.atleast_1d(np.asarray(v)) for n, v in d.items()} for k, d in raw.items()}

        tasks_path = root / TASKS_PATH
        tasks: list[str] = []
        legacy = root / "meta" / "tasks.jsonl"  # a few early v3.0 datasets kept v2.1's JSON-lines tasks
        if not tasks_path.is_file() and legacy.is_file():
            rows = [json.loads(line) for line in legacy.read_text().splitlines() if line.strip()]
            by_index = {int(r["task_index"]): str(r["task"]) for r in rows}
            tasks = [by_index.get(i) for i in range(max(by_index, default=-1) + 1)]
            if any(t is None for t in tasks):
                raise ValueError(f"{legacy}: task_index values are not 0..{len(tasks) - 1}")
        elif tasks_path.is_file():
            table = pq.read_table(tasks_path)
            names = table.column_names
            text_col = (
                "task" if "task" in names else ("__index_level_0__" if "__index_level_0__" in names else None)
            )
            if text_col is None or "task_index" not in names:
                raise ValueError(f"{tasks_path}: expected columns 'task' and 'task_index', got {names}")
            by_index = dict(zip(table.column("task_index").to_pylist(), table.column(text_col).to_pylist()))
            tasks = [by_index.get(i) for i in range(max(by_index, default=-1) + 1)]
            if any(t is None for t in tasks):
                raise ValueError(f"{tasks_path}: task_index values are not 0..{len(tasks) - 1}")

        episode_files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not episode_files:
            raise ValueError(f"{root / 'meta' / 'episodes'}: no chunk-*/file-*.parquet episode files")
        episodes: dict[int, dict] = {}
        episode_stats: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        for path in episode_files:
            table = pq.read_table(path)
            for col in ("episode_index", "length", "dataset_from_index", "dataset_to_index"):
                if col not in table.column_names:
                    raise ValueError(f"{path}: missing episode column {col!r}")
            for row in table.to_pylist():
                ep = {k: v for k, v in row.items() if not k.startswith("stats/")}
                idx = int(ep["episode_index"])
                if idx in episodes:
                    raise ValueError(f"{path}: episode {idx} listed twice in meta/episodes")
                episodes[idx] = ep
                st: dict[str, dict[str, np.ndarray]] = {}
                for k, v in row.items():
                    if k.startswith("stats/") and v is not None:
                        feat, _, stat = k[len("stats/") :].rpartition("/")
                        st.setdefault(feat, {})[stat] = np.asarray(v)
                episode_stats[idx] = st
        ordered = [episodes[i] for i in sorted(episodes)]
        return cls(
            root=root, info=info, stats=stats, tasks=tasks, episodes=ordered, episode_stats=episode_stats
        )


def norm_stats_for_processor(
    meta: LeRobotMeta,
    state_key: str = "observation.state",
    action_key: str = "action",
    mode: str = "mean_std",
    unnorm_key: str | None = None,
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """`{unnorm_key: {"action": stats, "state": stats}}`, what `VipaProcessor(norm_stats=...)` takes.

    Each stats entry has "mean", "std", "min", "max" as lists of floats, so the processor works in either of
    its norm modes. `mode` picks where "min"/"max" come from:

    - "mean_std" (default) and "min_max": the dataset's true min / max; build the processor with
      `norm_mode=mode`.
    - "quantile": "min"/"max" are the dataset's q01 / q99, so the processor's `norm_mode="min_max"` maps the
      1st-99th percentile range to [-1, 1] (openpi's quantile normalisation; robust to a few outlier actions;
      values beyond it are not clipped, so un-normalising still returns them).

    The paper does not state the normalisation its models use, and flow-matching VLAs differ: GR00T N1.5 (a DiT
    flow-matching head like VIPA-VLA's, a baseline the paper reproduces) min-max scales state and action to
    [-1, 1], LeRobot's pi0 / SmolVLA standardise (mean/std), openpi's pi0.5 uses q01/q99 quantiles. The
    default here is "mean_std": the flow-matching noise is N(0, I) and standardised targets have the same
    per-dimension scale, it is the processor's default, and one extreme value cannot squash a whole dimension
    as it does under min-max. A dimension that never varies (a fixed joint) becomes a constant (0 under
    mean_std, -1 under min_max; the processor adds an epsilon) and un-normalises back to its value. The
    recipe can pick another mode per dataset.

    `unnorm_key` defaults to the dataset folder's name.
    """
    if mode not in NORM_MODES:
        raise ValueError(f"mode: expected one of {NORM_MODES}, got {mode!r}")
    out: dict[str, dict[str, list[float]]] = {}
    for part, key in (("action", action_key), ("state", state_key)):
        if key not in meta.stats:
            raise ValueError(
                f"{meta.root / 'meta' / 'stats.json'}: no statistics for feature {key!r} ({part}); "
                f"present: {sorted(meta.stats)}"
            )
        s = meta.stats[key]
        lo, hi = ("q01", "q99") if mode == "quantile" else ("min", "max")
        missing = [n for n in ("mean", "std", lo, hi) if n not in s]
        if missing:
            raise ValueError(
                f"{meta.root / 'meta' / 'stats.json'}: feature {key!r} lacks {missing} needed for mode={mode!r}"
            )
        out[part] = {
            "mean": np.asarray(s["mean"], np.float64).reshape(-1).tolist(),
            "std": np.asarray(s["std"], np.float64).reshape(-1).tolist(),
            "min": np.asarray(s[lo], np.float64).reshape(-1).tolist(),
            "max": np.asarray(s[hi], np.float64).reshape(-1).tolist(),
        }
    return {unnorm_key or meta.root.name: out}


# ---- reader ---------------------------------------------------------------------------------------------------
class LeRobotV3Dataset(torch.utils.data.Dataset):
    """Frames of a LeRobot v3.0 dataset as training samples (keys, shapes and padding in the module docstring).

    Construction reads the low-dimensional columns of the chosen episodes into memory and checks them; bad data
    is either a ValueError naming the file, episode and feature (a missing feature or column, an unknown camera
    key, timestamps that disagree with fps, episode metadata that disagrees with the data) or a counted skip of
    the episode in `self.report` (NaN/inf in state or action, an empty episode, an unreadable or truncated
    video). Camera frames are read lazily in `__getitem__`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        camera_keys: list[str] | None = None,
        action_horizon: int = 16,
        state_key: str = "observation.state",
        action_key: str = "action",
        episodes: list[int] | None = None,
        image_size: int | None = None,
        tolerance_s: float = 1e-4,
        decode_block_frames: int = 32,  # video frames of one episode decoded per seek (0: the whole episode)
        cache_mb: int = 512,  # per-process LRU of decoded video blocks / parquet image row groups
        check_videos: bool = True,  # demux every referenced video at construction to find damaged files
        revision: str | None = None,  # Hub revision when `root` is a repo id
    ):
        if not isinstance(action_horizon, int) or action_horizon < 1:
            raise ValueError(f"action_horizon: expected an int >= 1, got {action_horizon!r}")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise ValueError(f"image_size: expected None or an int >= 1, got {image_size!r}")
        if not tolerance_s > 0:
            raise ValueError(f"tolerance_s: expected > 0, got {tolerance_s!r}")
        if not isinstance(decode_block_frames, int) or decode_block_frames < 0:
            raise ValueError(f"decode_block_frames: expected an int >= 0, got {decode_block_frames!r}")
        if cache_mb < 0:
            raise ValueError(f"cache_mb: expected >= 0, got {cache_mb!r}")
        self.meta = LeRobotMeta.load(open_lerobot_dataset(root, revision))
        self.root = self.meta.root
        self.action_horizon, self.image_size, self.tolerance_s = (
            action_horizon,
            image_size,
            float(tolerance_s),
        )
        self.state_key, self.action_key = state_key, action_key
        self.decode_block_frames, self.cache_mb = decode_block_frames, cache_mb
        info_path = self.root / "meta" / "info.json"
        features = self.meta.features
        for key, arg in ((state_key, "state_key"), (action_key, "action_key")):
            if key not in features:
                raise ValueError(f"{info_path}: no feature {key!r} ({arg}); features are {sorted(features)}")
        available = self.meta.camera_keys
        if camera_keys is None:
            camera_keys = available
        unknown = [k for k in camera_keys if k not in available]
        if unknown:
            raise ValueError(
                f"camera_keys: {unknown} are not camera features of {info_path}; cameras are {available}"
            )
        if len(set(camera_keys)) != len(camera_keys):
            raise ValueError(f"camera_keys: duplicates in {camera_keys}")
        self.camera_keys = list(camera_keys)
        self.report: dict[str, Any] = {"episodes": 0, "frames": 0, "skipped_episodes": {}, "skipped": {}}

        by_index = {int(e["episode_index"]): e for e in self.meta.episodes}
        if episodes is None:
            chosen = list(by_index)
        else:
            missing = [e for e in episodes if e not in by_index]
            if missing:
                raise ValueError(f"episodes: {missing} not in {self.root / 'meta' / 'episodes'}")
            chosen = list(dict.fromkeys(int(e) for e in episodes))
        self._load_frames([by_index[e] for e in chosen], check_videos)
        self._cache = None  # created in each process on first use (DataLoader workers copy the dataset)
        self._videos = OpenVideos()  # open video files of this process (reopened after a fork)

    # -- construction -------------------------------------------------------------------------------------------
    def _skip(self, episode: int, reason: str, detail: str) -> None:
        self.report["skipped_episodes"][episode] = f"{reason}: {detail}"
        self.report["skipped"][reason] = self.report["skipped"].get(reason, 0) + 1

    def _load_frames(self, episodes: list[dict], check_videos: bool) -> None:
        fps = self.meta.fps
        columns = [
            "episode_index",
            "frame_index",
            "timestamp",
            "index",
            "task_index",
            self.state_key,
            self.action_key,
        ]
        shapes = {k: int(np.prod(self.meta.features[k]["shape"])) for k in (self.state_key, self.action_key)}
        video_keys = [k for k in self.camera_keys if self.meta.features[k]["dtype"] == "video"]
        image_keys = [k for k in self.camera_keys if self.meta.features[k]["dtype"] == "image"]
        by_file: dict[Path, list[dict]] = {}
        for ep in episodes:
            if int(ep["length"]) == 0:
                e = int(ep["episode_index"])
                self._skip(e, "empty_episode", f"{self.root / 'meta' / 'episodes'}: episode {e} has length 0")
                continue
            by_file.setdefault(self.meta.data_path(ep), []).append(ep)
        probes: dict[Path, dict | str] = {}
        parts: dict[str, list[np.ndarray]] = {
            k: [] for k in ("state", "action", "ts", "frame", "ep", "index", "task", "file", "row")
        }
        self._files: list[str] = []
        self._episode_info: dict[int, dict] = {}
        for path, eps in by_file.items():
            if not path.is_file():
                raise ValueError(
                    f"{path}: data file missing (episodes {[int(e['episode_index']) for e in eps]})"
                )
            schema_names = pq.read_schema(path).names
            for col in columns + image_keys:
                if col not in schema_names:
                    raise ValueError(
                        f"{path}: no column {col!r} (feature of episodes {[int(e['episode_index']) for e in eps]})"
                    )
            table = pq.read_table(path, columns=columns)
            file_id = len(self._files)
            self._files.append(str(path))
            ep_col = table.column("episode_index").to_numpy()
            frame_col = table.column("frame_index").to_numpy()
            ts_col = table.column("timestamp").to_numpy().astype(np.float64)
            state = _column_array(table, self.state_key, str(path))
            action = _column_array(table, self.action_key, str(path))
            for key, arr in ((self.state_key, state), (self.action_key, action)):
                if arr.shape[1] != shapes[key]:
                    raise ValueError(
                        f"{path}: feature {key!r} has width {arr.shape[1]}, info.json says shape "
                        f"{self.meta.features[key]['shape']}"
                    )
            for ep in eps:
                e = int(ep["episode_index"])
                where = f"{path}, episode {e}"
                rows = np.flatnonzero(ep_col == e)
                if len(rows) == 0:
                    self._skip(e, "empty_episode", f"{where}: no rows")
                    continue
                rows = rows[np.argsort(frame_col[rows], kind="stable")]
                n = len(rows)
                if n != int(ep["length"]):
                    raise ValueError(f"{where}: {n} rows but meta/episodes says length {ep['length']}")
                if not np.array_equal(frame_col[rows], np.arange(n)):
                    raise ValueError(f"{where}: feature 'frame_index' is not 0..{n - 1}")
                err = np.abs(ts_col[rows] - np.arange(n) / fps)
                if err.max() > self.tolerance_s:
                    bad = int(np.argmax(err))
                    raise ValueError(
                        f"{where}: feature 'timestamp' disagrees with fps {fps}: frame {bad} at "
                        f"{ts_col[rows][bad]:.6f} s, expected {bad / fps:.6f} s (tolerance_s {self.tolerance_s})"
                    )
                bad_feature = next(
                    (
                        k
                        for k, a in ((self.state_key, state), (self.action_key, action))
                        if not np.isfinite(a[rows]).all()
                    ),
                    None,
                )
                if bad_feature is not None:
                    self._skip(e, "nonfinite_values", f"{where}: NaN/inf in feature {bad_feature!r}")
                    continue
                vinfo = self._check_episode_videos(ep, video_keys, probes, check_videos, where)
                if vinfo is None:
                    continue
                self._episode_info[e] = {
                    "start": sum(len(p) for p in parts["ts"]),
                    "length": n,
                    "videos": vinfo,
                }
                parts["state"].append(state[rows].astype(np.float32))
                parts["action"].append(action[rows].astype(np.float32))
                parts["ts"].append(ts_col[rows])
                parts["frame"].append(frame_col[rows].astype(np.int64))
                parts["ep"].append(np.full(n, e, np.int64))
                parts["index"].append(table.column("index").to_numpy()[rows].astype(np.int64))
                parts["task"].append(table.column("task_index").to_numpy()[rows].astype(np.int64))
                parts["file"].append(np.full(n, file_id, np.int64))
                parts["row"].append(rows.astype(np.int64))
        if not parts["ts"]:
            raise ValueError(
                f"{self.root}: no usable episode among those chosen; skipped: {self.report['skipped_episodes']}"
            )
        cat = {k: np.concatenate(v) for k, v in parts.items()}
        self._state, self._action, self._ts = cat["state"], cat["action"], cat["ts"]
        self._frame, self._ep, self._index, self._task = cat["frame"], cat["ep"], cat["index"], cat["task"]
        self._file, self._row = cat["file"], cat["row"]
        self._ep_start = np.concatenate(
            [np.full(i["length"], i["start"]) for i in self._episode_info.values()]
        )
        self._ep_len = np.concatenate(
            [np.full(i["length"], i["length"]) for i in self._episode_info.values()]
        )
        bad_tasks = np.unique(self._task[(self._task < 0) | (self._task >= len(self.meta.tasks))])
        if len(bad_tasks):
            raise ValueError(
                f"{self.root / TASKS_PATH}: task_index {bad_tasks.tolist()} used by frames is missing"
            )
        self._row_groups: dict[int, np.ndarray] = {}
        self.report["episodes"] = len(self._episode_info)
        self.report["frames"] = int(len(self._ts))

    def _check_episode_videos(
        self, ep: dict, video_keys: list[str], probes: dict, check_videos: bool, where: str
    ) -> dict | None:
        """{camera: (path, from_timestamp)} for an episode, or None (counted skip) when a video is unusable."""
        out = {}
        e = int(ep["episode_index"])
        for key in video_keys:
            cols = [
                f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")
            ]
            missing = [c for c in cols if ep.get(c) is None]
            if missing:
                raise ValueError(f"{where}: meta/episodes lacks {missing} for video feature {key!r}")
            path = self.meta.video_path(ep, key)
            if check_videos:
                if path not in probes:
                    try:
                        probes[path] = probe_video(path)
                    except ValueError as err:
                        probes[path] = str(err)
                probe = probes[path]
                if isinstance(probe, str):
                    self._skip(e, "unreadable_video", f"feature {key!r}: {probe}")
                    return None
                last_needed = (
                    float(ep[f"videos/{key}/from_timestamp"]) + (int(ep["length"]) - 1) / self.meta.fps
                )
                if probe["last_frame_s"] + self.tolerance_s < last_needed:
                    self._skip(
                        e,
                        "truncated_video",
                        f"feature {key!r}: {path} ends at {probe['last_frame_s']:.4f} s, the episode needs "
                        f"frames up to {last_needed:.4f} s",
                    )
                    return None
            out[key] = (str(path), float(ep[f"videos/{key}/from_timestamp"]))
        return out

    # -- access -------------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Pickled into spawned DataLoader workers without this process's decoded frames."""
        return {**self.__dict__, "_cache": None}

    def __len__(self) -> int:
        return len(self._ts)

    @property
    def episode_ranges(self) -> list[tuple[int, int, int]]:
        """(episode_index, first dataset position, length) of every episode read, in dataset order."""
        return [(e, i["start"], i["length"]) for e, i in self._episode_info.items()]

    def _lru(self) -> LRUCache:
        if self._cache is None:
            self._cache = LRUCache(self.cache_mb * 2**20)
        return self._cache

    def _video_frame(self, key: str, i: int) -> np.ndarray:
        e, t, start, n = int(self._ep[i]), int(self._frame[i]), int(self._ep_start[i]), int(self._ep_len[i])
        path, from_ts = self._episode_info[e]["videos"][key]
        block = self.decode_block_frames or n
        b = t // block
        cache = self._lru()
        seg = cache.get((key, e, b))
        try:
            if seg is None:
                first, last = start + b * block, start + min(n, (b + 1) * block) - 1
                seg = decode_segment(
                    path,
                    from_ts + self._ts[first],
                    from_ts + self._ts[last],
                    size=self.image_size,
                    margin_s=max(self.tolerance_s, 1e-3),
                    videos=self._videos,
                )
                cache.put((key, e, b), seg, seg.nbytes)
            return seg.frames[int(seg.lookup(from_ts + self._ts[i], self.tolerance_s)[0])]
        except Exception as err:
            raise ValueError(f"{path}, episode {e}, feature {key!r}, frame {t}: {err}") from err

    def _image_frame(self, key: str, i: int) -> np.ndarray:
        from PIL import Image

        file_id, row = int(self._file[i]), int(self._row[i])
        path = self._files[file_id]
        if file_id not in self._row_groups:
            meta = pq.ParquetFile(path).metadata
            self._row_groups[file_id] = np.cumsum(
                [0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            )
        bounds = self._row_groups[file_id]
        g = int(np.searchsorted(bounds, row, side="right") - 1)
        cache = self._lru()
        cells = cache.get(("image", file_id, g, key))
        if cells is None:
            cells = pq.ParquetFile(path).read_row_group(g, columns=[key]).column(key).to_pylist()
            cache.put(
                ("image", file_id, g, key), cells, sum(len((c or {}).get("bytes") or b"") for c in cells)
            )
        cell = cells[row - int(bounds[g])]
        try:
            if cell is None:
                raise ValueError("empty cell")
            source = cell.get("bytes")
            img = Image.open(io.BytesIO(source) if source else self.root / cell["path"]).convert("RGB")
            if self.image_size is not None:
                img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
        except Exception as err:
            raise ValueError(
                f"{path}, episode {int(self._ep[i])}, feature {key!r}, row {row}: {err}"
            ) from err

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} frames")
        i %= len(self)
        start, n, t = int(self._ep_start[i]), int(self._ep_len[i]), int(self._frame[i])
        steps = t + np.arange(self.action_horizon)
        is_pad = steps >= n
        chunk = self._action[start + np.minimum(steps, n - 1)]  # past the end: the last action, masked
        item: dict[str, Any] = {}
        for key in self.camera_keys:
            frame = (
                self._video_frame(key, i)
                if self.meta.features[key]["dtype"] == "video"
                else self._image_frame(key, i)
            )
            item[key] = torch.from_numpy(
                np.array(frame, dtype=np.uint8, copy=True)
            )  # never a view of the cache
        item[self.state_key] = torch.from_numpy(self._state[i].copy())
        item[self.action_key] = torch.from_numpy(np.ascontiguousarray(chunk))
        item[f"{self.action_key}_is_pad"] = torch.from_numpy(is_pad)
        item["task"] = self.meta.tasks[int(self._task[i])]
        item["episode_index"] = int(self._ep[i])
        item["frame_index"] = t
        item["index"] = int(self._index[i])
        item["timestamp"] = float(self._ts[i])
        return item


class EpisodeGroupedSampler(torch.utils.data.Sampler[int]):
    """A shuffled epoch in which consecutive samples come from a few decode blocks at a time.

    The dataset's frames are cut into units of `dataset.decode_block_frames` consecutive frames of one episode
    (the video decode blocks); units are shuffled, taken `blocks_in_flight` at a time, and the frames of each
    group are shuffled together. A batch therefore mixes several episodes and positions while the LRU decodes
    each block once.

    DataLoader workers each have their own cache and receive batches round-robin (batch i goes to worker
    i % num_workers). With `batch_size` and `num_streams` = num_workers x number of processes (Accelerate and
    DDP deal batch i to process i % P), the units are dealt to `num_streams` disjoint streams and the output
    interleaves one batch from each in turn, so a block is decoded by one worker only (from the epoch's last,
    partial batch on, the alignment is lost and a few blocks may be decoded twice).

    Deterministic for (seed, epoch) and the same on every process; call `set_epoch` every epoch.
    """

    def __init__(
        self,
        dataset: LeRobotV3Dataset,
        blocks_in_flight: int = 8,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
        num_streams: int = 1,
    ):
        if blocks_in_flight < 1:
            raise ValueError(f"blocks_in_flight: expected >= 1, got {blocks_in_flight!r}")
        if num_streams < 1 or (num_streams > 1 and (batch_size is None or batch_size < 1)):
            raise ValueError(
                f"num_streams: expected >= 1, and a batch_size >= 1 when > 1; got {num_streams!r}, {batch_size!r}"
            )
        self.blocks_in_flight, self.shuffle, self.seed, self.epoch = blocks_in_flight, shuffle, seed, 0
        self.batch_size, self.num_streams = batch_size, num_streams
        self._units = []
        for _, start, n in dataset.episode_ranges:
            block = dataset.decode_block_frames or n
            self._units += [np.arange(start + b, start + min(n, b + block)) for b in range(0, n, block)]
        self._len = len(dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._len

    def stream_groups(self) -> list[list[np.ndarray]]:
        """This epoch's shuffled order as `num_streams` lists of block groups (what `__iter__` flattens).

        A group is the dataset positions (int64) of `blocks_in_flight` decode blocks, shuffled together; its
        blocks are decoded once if its samples are read together by one worker. A caller that mixes this order
        with others (stage 3 mixes datasets) reorders whole groups only.
        """
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self._units))
        streams = []
        for s in range(self.num_streams):
            mine = order[s :: self.num_streams]
            streams.append(
                [
                    rng.permutation(
                        np.concatenate([self._units[u] for u in mine[g : g + self.blocks_in_flight]])
                    )
                    for g in range(0, len(mine), self.blocks_in_flight)
                ]
            )
        return streams

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            yield from (int(i) for u in self._units for i in u)
            return
        streams = [np.concatenate(groups).tolist() if groups else [] for groups in self.stream_groups()]
        if self.num_streams == 1:
            yield from streams[0]
            return
        b = self.batch_size
        for pos in range(0, max(len(st) for st in streams), b):
            for st in streams:
                yield from st[pos : pos + b]
