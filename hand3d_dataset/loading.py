"""Loading a local Hand3D folder with `datasets`, safe against its name-keyed cache.

    from hand3d_dataset.loading import load_hand3d
    visual = load_hand3d("hand3d", "visual")                  # DatasetDict with train / test
    test = load_hand3d("hand3d", "action", split="test")      # one Dataset

`datasets.load_dataset(folder, config)` keys its cache of a local parquet folder on the folder's name
and the `data_files` patterns, which are the same for every Hand3D build. Three of our runs (training
tests, the main job, the Space's example export) read another build's cached rows that way; a minimal
two-folder repro did not trigger it, so the exact condition is unknown. `load_hand3d` removes the
question: every version of a folder gets its own cache directory, keyed by the absolute path and the
name, size and modification time of each shard, so a changed folder is converted again and an
unchanged one is read from cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import datasets

__all__ = ["load_hand3d", "hand3d_cache_dir", "CONFIGS", "REQUIRED_COLUMNS"]

CONFIGS = ("visual", "action")
# The columns of every Hand3D row (DESIGN.md §3; `publish.CONFIGS` holds their features): the one list that
# training, evaluation and the Space's example export check a folder against before reading it.
REQUIRED_COLUMNS = {
    "visual": ("id", "source", "clip_id", "task_type", "images", "messages", "target"),
    "action": (
        "id",
        "source",
        "clip_id",
        "task_type",
        "images",
        "messages",
        "target",
        "trajectory",
        "motion_ids",
    ),
}


def hand3d_cache_dir(folder: str | os.PathLike, config: str) -> Path:
    """The `cache_dir` that `load_hand3d` uses for this folder's current content."""
    root = Path(folder).resolve()
    # every data file below the folder, whatever layout its README `configs:` point at
    shards = sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".arrow", ".jsonl", ".csv"))
    if not shards:
        raise ValueError(f"folder: no data files under {str(root)!r} (build one with `hand3d build`)")
    h = hashlib.sha256(str(root).encode())
    for p in shards:
        st = p.stat()
        h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return Path(datasets.config.HF_DATASETS_CACHE) / "hand3d-local" / config / h.hexdigest()[:20]


def load_hand3d(
    folder: str | os.PathLike,
    config: str,
    split: str | None = None,
    required_columns: Sequence[str] | None = None,
):
    """`load_dataset(folder, config, split=split)` with a content-keyed cache (see the module docstring).

    required_columns: columns the caller reads (default: all of `REQUIRED_COLUMNS[config]`); a split without
    them is refused up front, naming the missing ones, instead of failing later deep inside training or
    evaluation. Pass `()` to check none.
    Every failure (no folder, no data files, no such config or split, missing columns) is a `ValueError`
    naming the folder, config and split.
    """
    if config not in CONFIGS:
        raise ValueError(f"config: expected one of {CONFIGS}, got {config!r}")
    if not Path(folder).is_dir():
        raise ValueError(f"folder: no dataset folder at {str(folder)!r} (build one with `hand3d build`)")
    if required_columns is None:
        required_columns = REQUIRED_COLUMNS[config]
    cache = hand3d_cache_dir(folder, config)
    try:
        ds = datasets.load_dataset(str(folder), config, split=split, cache_dir=str(cache))
    except (ValueError, FileNotFoundError, KeyError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ValueError(
            f"folder: cannot load config {config!r} split {split!r} from {str(folder)!r} "
            f"(expected parquet shards and a README with `configs:`, as `hand3d build` writes): {e}"
        ) from e
    if required_columns:
        parts = ds.values() if isinstance(ds, datasets.DatasetDict) else [ds]
        for part in parts:
            missing = [c for c in required_columns if c not in part.column_names]
            if missing:
                raise ValueError(
                    f"folder: Hand3D-{config} split {split!r} in {str(folder)!r} lacks columns {missing}; "
                    f"it has {part.column_names}"
                )
    return ds
