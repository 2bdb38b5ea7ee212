"""Robot-data loading benchmark (issue 14 §5): the LeRobot v3 reader against naive per-sample decoding, one run.

A dataset is recorded with `LeRobotV3Writer` (2 camera views of 256 x 256, AV1 by SVT-AV1 at LeRobot's
settings, 8-D state, 7-D action, a 16-step action chunk per sample) and read three ways, each through a
`torch.utils.data.DataLoader` with the same workers and batch size:

- `reader`: `LeRobotV3Dataset` + `EpisodeGroupedSampler` (a shuffled epoch drawn a few decode blocks at a
  time, one stream of blocks per worker; each block of frames is decoded once, sequentially, and kept in
  that worker's LRU);
- `reader, plain shuffle`: `RandomSampler` over a reader with `decode_block_frames=1` (random access: every
  sample from a random episode, one seek per frame, but through the worker's open decoders);
- `baseline`: naive per-sample seek-and-decode, what LeRobot's PyAV path does for each sample and camera
  (open the file, seek to the keyframe before the frame, decode forward to it, convert to RGB), in the
  grouped order.

"frames/s" counts dataset frames (time steps), each with both views decoded, the state and the action chunk.
Two files are timed: the recorded one (2,400 frames per MP4) and the same episodes x16 stream-copied into one
MP4 per camera (38,400 frames, nearer the size of LeRobot's files, up to 200 MB each): the baseline's
per-sample open and index parsing grow with the file, the reader's block decoding does not.
The machine is shared: besides wall-clock frames/s, frames per CPU-second (this process and its workers)
are printed, which depend much less on the other jobs; the load average is printed before and after.

Usage:

    python benchmarks/bench_robot_data.py                         # 2 workers, 24 x 100 frames, and x16 in one file
    python benchmarks/bench_robot_data.py --workers 0 1 2 --episodes 40 --data /tmp/robot_bench
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.lerobot_dataset import EpisodeGroupedSampler, LeRobotV3Dataset  # noqa: E402
from training.lerobot_writer import LeRobotV3Writer  # noqa: E402
from training.video_io import decode_segment  # noqa: E402

CAMERAS = ("observation.images.image", "observation.images.wrist_image")


def scene(
    episode: int, t: int, view: int, size: int, rng: np.random.Generator, texture: np.ndarray
) -> np.ndarray:
    """A textured picture that moves every frame (so the codec has real work), different per view."""
    shift = (3 * t + 17 * episode + 50 * view) % size
    img = np.roll(texture, shift, axis=1).astype(np.int16)
    yy = int(size * (0.2 + 0.6 * ((t * 0.01 + 0.1 * episode) % 1.0)))
    img[max(yy - 12, 0) : yy + 12, size // 3 : size // 3 + 40] = (200, 60, 40)  # a moving "object"
    return np.clip(img + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)


def build(root: Path, episodes: int, length: int, size: int) -> None:
    features = {
        cam: {"dtype": "video", "shape": [size, size, 3], "names": ["height", "width", "channels"]}
        for cam in CAMERAS
    }
    features["observation.state"] = {"dtype": "float32", "shape": [8], "names": None}
    features["action"] = {"dtype": "float32", "shape": [7], "names": None}
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    texture = np.stack([128 + 60 * np.sin(xx / 9.0), 128 + 60 * np.cos(yy / 13.0), 100 + 0.3 * (xx + yy)], -1)
    writer = LeRobotV3Writer.create(root, fps=10, features=features, robot_type="bench")
    for e in range(episodes):
        for t in range(length):
            frame = {cam: scene(e, t, v, size, rng, texture) for v, cam in enumerate(CAMERAS)}
            frame["observation.state"] = rng.normal(size=8).astype(np.float32)
            frame["action"] = rng.normal(size=7).astype(np.float32)
            writer.add_frame(frame, task=f"task {e % 4}")
        writer.save_episode()
    writer.finalize()


def replicate(src: Path, dst: Path, k: int) -> None:
    """`src` with its episodes repeated k times in the same files: videos stream-copied k times into one MP4
    per camera (no re-encoding), data rows and episode metadata shifted accordingly. Gives LeRobot-sized
    files (LeRobot fills a video file up to 200 MB, tens of thousands of frames at 256 x 256) without
    encoding them."""
    import json
    import shutil

    import av
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    info = json.loads((src / "meta/info.json").read_text())
    n_eps, n_frames = info["total_episodes"], info["total_frames"]
    (dst / "meta/episodes/chunk-000").mkdir(parents=True)
    (dst / "data/chunk-000").mkdir(parents=True)
    shutil.copy(src / "meta/tasks.parquet", dst / "meta/tasks.parquet")
    shutil.copy(src / "meta/stats.json", dst / "meta/stats.json")
    data = pq.read_table(src / "data/chunk-000/file-000.parquet")
    copies = []
    for j in range(k):
        t = data.set_column(
            data.column_names.index("episode_index"),
            "episode_index",
            pc.add(data["episode_index"], j * n_eps),
        )
        copies.append(t.set_column(t.column_names.index("index"), "index", pc.add(t["index"], j * n_frames)))
    pq.write_table(pa.concat_tables(copies), dst / "data/chunk-000/file-000.parquet")
    rows = pq.read_table(src / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    cams = [key for key, f in info["features"].items() if f["dtype"] == "video"]
    span = {c: rows[-1][f"videos/{c}/to_timestamp"] for c in cams}
    out = []
    for j in range(k):
        for r in rows:
            r = dict(r, episode_index=r["episode_index"] + j * n_eps)
            r["dataset_from_index"] += j * n_frames
            r["dataset_to_index"] += j * n_frames
            for c in cams:
                r[f"videos/{c}/from_timestamp"] += j * span[c]
                r[f"videos/{c}/to_timestamp"] += j * span[c]
            out.append(r)
    pq.write_table(pa.Table.from_pylist(out), dst / "meta/episodes/chunk-000/file-000.parquet")
    for c in cams:
        source = src / f"videos/{c}/chunk-000/file-000.mp4"
        target = dst / f"videos/{c}/chunk-000/file-000.mp4"
        target.parent.mkdir(parents=True)
        listing = dst / "list.ffconcat"
        listing.write_text("ffconcat version 1.0\n" + f"file '{source.resolve()}'\n" * k)
        with (
            av.open(str(listing), format="concat", options={"safe": "0"}) as i,
            av.open(str(target), "w") as o,
        ):
            istream = i.streams.video[0]
            ostream = o.add_stream_from_template(template=istream, opaque=True)
            ostream.time_base = istream.time_base
            for packet in i.demux(istream):
                if packet.dts is not None:
                    packet.stream = ostream
                    o.mux(packet)
        listing.unlink()
    info.update(total_episodes=n_eps * k, total_frames=n_frames * k, splits={"train": f"0:{n_eps * k}"})
    (dst / "meta/info.json").write_text(json.dumps(info, indent=4))


class NaiveSeekDataset(torch.utils.data.Dataset):
    """The baseline: per sample and camera, open the MP4, seek to the keyframe before the frame's timestamp
    and decode forward to it (no reuse between samples); state and action chunk as the reader gives them."""

    def __init__(self, reader: LeRobotV3Dataset):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict:
        r = self.reader
        e, t = int(r._ep[i]), float(r._ts[i])
        item = {}
        for cam in r.camera_keys:
            path, from_ts = r._episode_info[e]["videos"][cam]
            seg = decode_segment(path, from_ts + t, from_ts + t, size=r.image_size, margin_s=1e-3)
            item[cam] = torch.from_numpy(seg.frames[int(seg.lookup(from_ts + t, r.tolerance_s)[0])].copy())
        start, n, f = int(r._ep_start[i]), int(r._ep_len[i]), int(r._frame[i])
        steps = f + np.arange(r.action_horizon)
        item["action"] = torch.from_numpy(r._action[start + np.minimum(steps, n - 1)])
        item["action_is_pad"] = torch.from_numpy(steps >= n)
        item["observation.state"] = torch.from_numpy(r._state[i].copy())
        return item


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(dataset, sampler, workers: int, batch_size: int) -> tuple[float, float, int]:
    """(frames/s, frames per CPU-second, frames) over the whole `sampler`.

    Wall time is taken from the first batch on (steady state: worker start-up excluded, as with persistent
    workers). CPU time is this process's plus its finished workers' over the whole run, start-up included:
    unlike wall time it hardly depends on what else the machine runs. Each run starts with an empty cache.
    """
    if isinstance(dataset, LeRobotV3Dataset):
        dataset._cache = None
        dataset._videos.close()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        multiprocessing_context="fork" if workers else None,
        timeout=120 if workers else 0,
    )
    cpu0, children0 = time.process_time(), _children_cpu()
    count, total, start = 0, 0, None
    iterator = iter(loader)
    for batch in iterator:
        total += len(batch["action"])
        if start is None:
            start = time.perf_counter()
            continue
        count += len(batch["action"])
    wall = time.perf_counter() - start
    del iterator, loader  # joins the workers, so their CPU time is counted
    cpu = time.process_time() - cpu0 + _children_cpu() - children0
    return count / wall, total / cpu, total


def streams_order(ds: LeRobotV3Dataset, batch_size: int, workers: int) -> list[int]:
    """The grouped order with one block stream per worker."""
    return list(
        EpisodeGroupedSampler(
            ds, blocks_in_flight=8, seed=0, batch_size=batch_size, num_streams=max(workers, 1)
        )
    )


class Subset(torch.utils.data.Sampler[int]):
    def __init__(self, order: list[int]):
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (built there when absent)")
    parser.add_argument("--episodes", type=int, default=24)
    parser.add_argument("--length", type=int, default=100, help="frames per episode")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--baseline-samples", type=int, default=640)
    parser.add_argument("--reader-samples", type=int, default=4800)
    parser.add_argument(
        "--replicate", type=int, default=16, help="also time a file with the episodes x N (1: off)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = None
    root = args.data
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name) / "robot"
    if not (root / "meta" / "info.json").exists():
        t0 = time.perf_counter()
        build(root, args.episodes, args.length, args.size)
        print(
            f"recorded {args.episodes} x {args.length} frames, 2 views {args.size}^2 AV1 in {time.perf_counter() - t0:.1f} s"
        )
    roots = [("one file of", root)]
    if args.replicate > 1:
        big = root.parent / f"{root.name}_x{args.replicate}"
        if not (big / "meta" / "info.json").exists():
            replicate(root, big, args.replicate)
        roots.append(("one file of", big))
    load_before = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} cores, load average before {load_before[0]:.2f} / {load_before[1]:.2f} (1 / 5 min)"
    )
    print()
    print(
        "| video file | workers | loader | frames/s (wall) | x baseline | frames per CPU-s | x baseline | frames |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, path in roots:
        ds = LeRobotV3Dataset(path, action_horizon=16)
        single = LeRobotV3Dataset(path, action_horizon=16, decode_block_frames=1, check_videos=False)
        n = min(len(ds), args.reader_samples)
        grouped = list(EpisodeGroupedSampler(ds, blocks_in_flight=8, seed=0))
        where = f"{label} {len(ds):,} frames"
        shuffled = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[
            : args.baseline_samples
        ]
        for w in args.workers:
            rows = [
                (
                    "baseline: per-sample seek + decode",
                    NaiveSeekDataset(ds),
                    Subset(grouped[: args.baseline_samples]),
                ),
                ("reader, EpisodeGroupedSampler", ds, Subset(streams_order(ds, args.batch_size, w)[:n])),
                ("reader, plain shuffle, 1-frame blocks", single, Subset(shuffled.tolist())),
            ]
            base = None
            for name, dataset, sampler in rows:
                fps, per_cpu, count = run(dataset, sampler, w, args.batch_size)
                base = base or (fps, per_cpu)
                print(
                    f"| {where} | {w} | {name} | {fps:,.0f} | {fps / base[0]:.1f} | {per_cpu:,.0f} | "
                    f"{per_cpu / base[1]:.1f} | {count} |"
                )
    load_after = os.getloadavg()
    print()
    print(
        f"load average after {load_after[0]:.2f} / {load_after[1]:.2f} (1 / 5 min); this run's own loader uses up to {max(args.workers)} worker(s)"
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
