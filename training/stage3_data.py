"""Stage-3 data (paper §3.3, §4.1): LeRobot v3 datasets opened and checked, their samples ordered across
processes and DataLoader workers, and collated into the model's inputs with padding and loss masks.

Several datasets (embodiments) can train together: each keeps its cameras, widths and statistics
(`EmbodimentSpec`, its `unnorm_key`), samples are normalised with their own dataset's statistics and the
state / action chunk zero-padded to the head's widths; `action_mask` is 1 on real steps and real dimensions
only (steps past an episode's end and padded dimensions carry no loss). The epoch order keeps the LeRobot
reader's decode blocks together (`EpochSampler`), so each block of video is decoded once per epoch.

Usage (the pieces `training.stage3.train_stage3` puts together):

    from training.stage3 import load_stage3_recipe
    from training.stage3_data import make_loader, open_sources
    recipe = load_stage3_recipe("cpu-tiny")
    sources, report = open_sources(["runs/demos/libero_10"], recipe, max_views=2, horizon=16)
    # processor: the checkpoint's VipaProcessor, with attach_norm_stats(processor, sources, recipe) done
    loader, sampler = make_loader(sources, processor, recipe, state_dim=8, action_dim=7, rank=0, processes=1)
    sampler.set_position(epoch=0, start_batch=0)
    batch = next(iter(loader))   # input_ids, pixel_values, ..., state (B, 8), actions / action_mask (B, 16, 7)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.policy import EmbodimentSpec, prepare_observation_inputs
from processing_vipa.processing_vipa import VipaProcessor

__all__ = [
    "ActionCollator",
    "ConcatSources",
    "DataSource",
    "EpochSampler",
    "attach_norm_stats",
    "make_loader",
    "open_sources",
]


# ---- datasets --------------------------------------------------------------------------------------------------
@dataclass
class DataSource:
    """One dataset of the run."""

    path: str  # as given
    dataset: Any  # LeRobotV3Dataset
    spec: EmbodimentSpec  # cameras, widths, unnorm_key


def open_sources(
    data: str | os.PathLike | list[str | os.PathLike], recipe: Any, max_views: int, horizon: int
) -> tuple[list[DataSource], dict[str, Any]]:
    """Open every dataset, check it at start-up and say what was left out.

    Missing features, an unknown camera key, too many views, a vector feature of another shape, timestamps that
    disagree with fps: `ValueError` naming the dataset, file, episode and feature (the reader's checks and ours).
    Episodes with NaN / inf state or actions, empty ones, undecodable videos: skipped and counted by the reader;
    more than `recipe.max_skip_fraction` of them is a `ValueError`. Returns the sources and the data report.
    """
    from training.lerobot_dataset import LeRobotMeta, LeRobotV3Dataset, open_lerobot_dataset

    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not paths:
        raise ValueError("data: at least one LeRobot v3 dataset is needed")
    if len(paths) > 1 and recipe.unnorm_key is not None:
        raise ValueError(
            "recipe.unnorm_key names one dataset's statistics; with several datasets each uses its folder name"
        )
    sources, report = [], {"datasets": []}
    for given in paths:
        root = open_lerobot_dataset(given)
        meta = LeRobotMeta.load(root)
        where = f"dataset {str(given)!r}"
        features = meta.features
        for key in (recipe.state_key, recipe.action_key):
            if key not in features:
                raise ValueError(
                    f"{where}: feature {key!r} missing from meta/info.json; it has {sorted(features)}"
                )
        cameras = list(recipe.camera_keys or meta.camera_keys)
        unknown = [k for k in cameras if k not in meta.camera_keys]
        if unknown:
            raise ValueError(f"{where}: camera key(s) {unknown} not among its cameras {meta.camera_keys}")
        if not cameras:
            raise ValueError(f"{where}: no camera features (dtype video or image) in meta/info.json")
        if len(cameras) > max_views:
            raise ValueError(
                f"{where}: {len(cameras)} cameras {cameras} but the model takes at most {max_views} frames; "
                "choose some with recipe.camera_keys"
            )
        dims = {}
        for part, key in (("state", recipe.state_key), ("action", recipe.action_key)):
            shape = features[key].get("shape") or [1]
            if len(shape) != 1:
                raise ValueError(f"{where}: feature {key!r} must be a vector, got shape {shape}")
            dims[part] = int(shape[0])
        # the reader checks every episode: NaN/inf, empty episodes, damaged videos are counted skips in its report
        dataset = LeRobotV3Dataset(
            root,
            camera_keys=cameras,
            action_horizon=horizon,
            state_key=recipe.state_key,
            action_key=recipe.action_key,
        )
        total, skipped = len(meta.episodes), len(dataset.report["skipped_episodes"])
        entry = {
            "dataset": str(given),
            "root": str(root),
            "episodes": total,
            "episodes_kept": dataset.report["episodes"],
            "frames": len(dataset),
            "skipped": dict(dataset.report["skipped"]),
            "skipped_episodes": {str(k): v for k, v in list(dataset.report["skipped_episodes"].items())[:50]},
        }
        if skipped / max(total, 1) > recipe.max_skip_fraction:
            raise ValueError(
                f"{where}: {skipped} of {total} episodes unusable, more than max_skip_fraction="
                f"{recipe.max_skip_fraction:.1%}: {list(entry['skipped_episodes'].values())[:5]}"
            )
        key = recipe.unnorm_key or Path(str(given).rstrip("/")).name
        spec = EmbodimentSpec(
            unnorm_key=key,
            camera_keys=cameras,
            state_key=recipe.state_key,
            action_key=recipe.action_key,
            state_dim=dims["state"],
            action_dim=dims["action"],
            fps=float(meta.fps),
            n_action_steps=recipe.n_action_steps,
        )
        entry["unnorm_key"] = key
        report["datasets"].append(entry)
        sources.append(DataSource(str(given), dataset, spec))
    keys = [s.spec.unnorm_key for s in sources]
    if len(set(keys)) != len(keys):
        raise ValueError(f"data: two datasets share an unnorm_key (folder name) {keys}; rename a folder")
    return sources, report


def attach_norm_stats(processor: VipaProcessor, sources: list[DataSource], recipe: Any) -> None:
    """Put each dataset's statistics into the processor under its unnorm_key (replacing an older entry of that
    name; other datasets' entries are kept). The processor has one norm mode for all its datasets."""
    from training.lerobot_dataset import norm_stats_for_processor

    mode = "min_max" if recipe.norm_mode == "quantile" else recipe.norm_mode
    others = {k: v for k, v in processor.norm_stats.items() if k not in {s.spec.unnorm_key for s in sources}}
    if others and processor.norm_mode != mode:
        raise ValueError(
            f"recipe.norm_mode={recipe.norm_mode!r} but the checkpoint's processor normalises its other datasets "
            f"{sorted(others)} with {processor.norm_mode!r}; one processor has one mode"
        )
    stats = dict(others)
    for source in sources:
        meta = source.dataset.meta
        stats.update(
            norm_stats_for_processor(
                meta, recipe.state_key, recipe.action_key, recipe.norm_mode, source.spec.unnorm_key
            )
        )
    processor.norm_mode = mode
    processor.norm_stats = processor._check_norm_stats(stats, mode)


class ConcatSources(torch.utils.data.Dataset):
    """The sources end to end; an item is (source index, the reader's sample dict)."""

    def __init__(self, sources: list[DataSource]) -> None:
        self.sources = sources
        self.offsets = np.cumsum([0] + [len(s.dataset) for s in sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> tuple[int, dict]:
        s = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return s, self.sources[s].dataset[index - int(self.offsets[s])]


class ActionCollator:
    """Reader samples -> model inputs, normalised and padded to the head (see the module docstring).

    Returns `input_ids, attention_mask, pixel_values, spatial_pixel_values, spatial_frame_mask` (as the policy
    builds them), `state (B, S_head)`, `actions (B, H, A_head)`, `action_mask (B, H, A_head)` float (1 = loss).
    """

    def __init__(
        self, processor: VipaProcessor, specs: list[EmbodimentSpec], state_dim: int, action_dim: int
    ) -> None:
        self.processor, self.specs = processor, specs
        self.state_dim, self.action_dim = state_dim, action_dim

    def __call__(self, items: list[tuple[int, dict]]) -> dict[str, torch.Tensor]:
        batch = len(items)
        frames, tasks = [], []
        horizon = items[0][1][self.specs[items[0][0]].action_key].shape[0]
        state = torch.zeros(batch, self.state_dim)
        actions = torch.zeros(batch, horizon, self.action_dim)
        mask = torch.zeros(batch, horizon, self.action_dim)
        for b, (s, item) in enumerate(items):
            spec = self.specs[s]
            frames.append([item[k] for k in spec.camera_keys])
            tasks.append(item["task"])
            raw_state = torch.as_tensor(item[spec.state_key], dtype=torch.float32)
            raw_actions = torch.as_tensor(item[spec.action_key], dtype=torch.float32)
            state[b, : spec.state_dim] = self.processor.normalize_state(raw_state, spec.unnorm_key)
            actions[b, :, : spec.action_dim] = self.processor.normalize_actions(raw_actions, spec.unnorm_key)
            real = ~torch.as_tensor(item[f"{spec.action_key}_is_pad"], dtype=torch.bool)
            mask[b, :, : spec.action_dim] = real[:, None].float()
        inputs = prepare_observation_inputs(self.processor, frames, tasks)
        return {**inputs, "state": state, "actions": actions, "action_mask": mask}


class EpochSampler(torch.utils.data.Sampler):
    """This process's batches of a seeded epoch, starting `start_batch` batches in (exact resume).

    Each dataset is read in the LeRobot reader's order: `EpisodeGroupedSampler(ds, batch_size=B,
    num_streams=S)`, S = W x P (DataLoader workers, at least 1, x processes), deals shuffled groups of a few
    decode blocks (consecutive frames of one episode) to S streams; the datasets' streams are paired so that
    the combined streams are about equally long. Each stream's groups of all datasets are shuffled together as
    whole pieces (a group is never cut, so its blocks are read together; a batch still mixes embodiments where
    two groups meet) and cut into batches of B; the streams then take turns, one batch each. Whole batches go
    to processes: batch i to rank i mod P, and on that rank its k-th batch to worker k mod W, so batch i is
    read by the worker of stream i mod S and a decode block by one worker only. Streams end unevenly: near
    the epoch's end the turns lose that alignment, and the streams' last samples (under a batch each) are
    pooled into the final batches; an incomplete last batch is dropped and every process gets
    (samples // B) // P batches, so all processes step together. (A run resumed mid-epoch restarts the
    DataLoader's turns at worker 0: the same samples, some blocks decoded twice in that epoch.)

    Every epoch's order is a function of (seed, epoch) for a given B, P and W: the data position of optimiser
    step s is known without replaying the data.
    """

    def __init__(
        self, sources: list[DataSource], batch: int, rank: int, processes: int, workers: int, seed: int
    ) -> None:
        from training.lerobot_dataset import EpisodeGroupedSampler

        self.streams = max(workers, 1) * processes
        self.samplers = [
            EpisodeGroupedSampler(s.dataset, seed=seed, batch_size=batch, num_streams=self.streams)
            for s in sources
        ]
        self.offsets = np.cumsum([0] + [len(s.dataset) for s in sources])
        size = int(self.offsets[-1])
        self.batch, self.rank, self.processes, self.seed = batch, rank, processes, seed
        self.batches_per_epoch = size // batch // processes
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"data: {size} samples cannot fill one batch of {batch} on each of {processes} process(es)"
            )
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start = epoch, start_batch

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Every process's batches of `epoch` (int64 positions in `ConcatSources`), in global order."""
        streams: list[list[np.ndarray]] = [[] for _ in range(self.streams)]
        totals = np.zeros(self.streams, np.int64)
        for sampler, offset in zip(self.samplers, self.offsets[:-1], strict=True):
            sampler.set_epoch(epoch)
            groups = sampler.stream_groups()
            sizes = np.array([sum(map(len, g)) for g in groups])
            # a dataset's longest streams join the shortest so far: even streams keep batches aligned longer
            for mine, s in zip(np.argsort(-sizes, kind="stable"), np.argsort(totals, kind="stable")):
                streams[s] += [g + offset for g in groups[mine]]
                totals[s] += sizes[mine]
        rng = np.random.default_rng([self.seed, epoch, 1])
        b = self.batch
        turns, rest = [], []
        for pieces in streams:
            order = np.concatenate(
                [pieces[i] for i in rng.permutation(len(pieces))] or [np.empty(0, np.int64)]
            )
            full = len(order) // b * b
            turns.append([order[i : i + b] for i in range(0, full, b)])
            rest.append(order[full:])
        batches = [st[k] for k in range(max(map(len, turns))) for st in turns if k < len(st)]
        tail = np.concatenate(rest)
        return batches + [tail[i : i + b] for i in range(0, len(tail) // b * b, b)]

    def __iter__(self):
        mine = self.epoch_batches(self.epoch)[self.rank :: self.processes][: self.batches_per_epoch]
        return iter(np.concatenate(mine[self.start :] or [np.empty(0, np.int64)]).tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start) * self.batch


def make_loader(
    sources: list[DataSource],
    processor: VipaProcessor,
    recipe: Any,
    state_dim: int,
    action_dim: int,
    rank: int,
    processes: int,
) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    """This process's DataLoader over `sources` (batches of `recipe.per_device_batch_size`, collated to the
    head's `state_dim` / `action_dim`) and its sampler; call `sampler.set_position` before each pass."""
    sampler = EpochSampler(
        sources,
        recipe.per_device_batch_size,
        rank,
        processes,
        recipe.dataloader_num_workers,
        recipe.seed,
    )
    loader = torch.utils.data.DataLoader(
        ConcatSources(sources),
        batch_size=recipe.per_device_batch_size,
        sampler=sampler,
        collate_fn=ActionCollator(processor, [s.spec for s in sources], state_dim, action_dim),
        num_workers=recipe.dataloader_num_workers,
        generator=torch.Generator(),  # the loader's base seed never draws from the global RNG (exact resume)
    )
    return loader, sampler
