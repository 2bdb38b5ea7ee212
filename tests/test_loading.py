"""`load_hand3d` never returns another build's rows, which `datasets`' name-keyed cache can do."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hand3d_dataset.build import BuildConfig, build
from hand3d_dataset.estimators import GroundTruthBoxDetector, GroundTruthDepthEstimator
from hand3d_dataset.loading import hand3d_cache_dir, load_hand3d
from tests.hand3d_fake_source import FakeSource


def _build(out: Path, seed: int, num_clips: int) -> None:
    cfg = BuildConfig(
        source="fake", num_clips=num_clips, out=str(out), seed=seed, shard_size=3, progress=False
    )
    build(
        cfg,
        source=FakeSource(num_clips, seed),
        estimator=GroundTruthDepthEstimator(),
        detector=GroundTruthBoxDetector(),
    )


def _ids_on_disk(out: Path, config: str, split: str) -> set[str]:
    # read the parquet shards directly with pyarrow: the truth the loader must agree with
    files = sorted((out / "data" / config).glob(f"{split}-*.parquet"))
    return {i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()}


def test_same_folder_name_different_builds_give_their_own_rows(tmp_path):
    a, b = tmp_path / "a" / "hand3d", tmp_path / "b" / "hand3d"  # same name, different content
    _build(a, seed=1, num_clips=4)
    _build(b, seed=2, num_clips=6)
    for out in (a, b, a):  # load a again after b: still a's rows
        for config in ("visual", "action"):
            got = set(load_hand3d(out, config, split="train")["id"])
            assert got == _ids_on_disk(out, config, "train")
    assert hand3d_cache_dir(a, "visual") != hand3d_cache_dir(b, "visual")


def test_folder_rebuilt_in_place_is_read_again(tmp_path):
    out = tmp_path / "hand3d"
    _build(out, seed=1, num_clips=4)
    first = set(load_hand3d(out, "visual", split="train")["id"])
    for f in (out / "data").rglob("*.parquet"):
        f.unlink()
    (out / ".build").exists() and [p.unlink() for p in (out / ".build").rglob("*") if p.is_file()]
    _build(out, seed=3, num_clips=5)
    second = set(load_hand3d(out, "visual", split="train")["id"])
    assert second == _ids_on_disk(out, "visual", "train") and second != first


def test_bad_arguments_name_what_was_wrong(tmp_path):
    with pytest.raises(ValueError, match="config"):
        load_hand3d(tmp_path, "robot")
    with pytest.raises(ValueError, match="no dataset folder"):
        load_hand3d(tmp_path / "missing", "visual")
    with pytest.raises(ValueError, match="no data files"):
        load_hand3d(tmp_path, "visual")


def test_required_columns_are_checked_up_front(tmp_path):
    out = tmp_path / "h"
    _build(out, seed=1, num_clips=3)
    ok = load_hand3d(out, "visual", split="train", required_columns=("images", "messages"))
    assert {"images", "messages"} <= set(ok.column_names)
    for split in ("train", None):  # one Dataset, or a DatasetDict checked split by split
        with pytest.raises(ValueError, match=r"lacks columns \['no_such_column'\]"):
            load_hand3d(out, "visual", split=split, required_columns=("messages", "no_such_column"))
    with pytest.raises(ValueError, match="cannot load config 'visual' split 'validation'"):
        load_hand3d(out, "visual", split="validation")
