"""The runner and the publication: sharded parquet that `load_dataset` reads offline, resume after an
interruption, corrupt inputs skipped with reasons, splits, the dataset card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from hand3d_dataset.build import BuildConfig, build, is_test_clip
from hand3d_dataset.estimators import GroundTruthBoxDetector, GroundTruthDepthEstimator
from hand3d_dataset.publish import write_card
from tests.hand3d_fake_source import EmptyBoxDetector, FakeSource, InterruptingSource

REPO = Path(__file__).resolve().parents[1]


def _build(out: Path, source, detector=None, **kw) -> dict:
    cfg = BuildConfig(
        source="fake", num_clips=source.num_clips, out=str(out), shard_size=3, progress=False, **kw
    )
    return build(
        cfg,
        source=source,
        estimator=GroundTruthDepthEstimator(),
        detector=detector or GroundTruthBoxDetector(),
    )


def _load(out: Path, config: str) -> dict[str, list[dict]]:
    """Loads a config in a fresh offline interpreter (what a user does) and returns its rows as JSON."""
    code = (
        "import json, sys, hashlib\n"
        "from datasets import load_dataset\n"
        f"ds = load_dataset({str(out)!r}, {config!r})\n"
        "out = {}\n"
        "for split, d in ds.items():\n"
        "    rows = []\n"
        "    for r in d:\n"
        "        r['images'] = [[im.size, hashlib.sha1(im.tobytes()).hexdigest()] for im in r['images']]\n"
        "        rows.append(r)\n"
        "    out[split] = rows\n"
        "json.dump(out, sys.stdout)\n"
    )
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(out.parent / "cache"),
    }
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def test_build_writes_loadable_configs_with_disjoint_splits(tmp_path):
    out = tmp_path / "hand3d"
    report = _build(out, FakeSource(10))
    assert report["clips_done"] == 10 and report["clips_skipped"] == 0
    visual, action = _load(out, "visual"), _load(out, "action")
    assert set(visual) == {"train", "test"} and set(action) == {"train", "test"}
    for ds, name in ((visual, "visual"), (action, "action")):
        train = {r["clip_id"] for r in ds["train"]}
        test = {r["clip_id"] for r in ds["test"]}
        assert train and test and not train & test
        # the split of every clip follows its index, independently recomputed
        for cid in train | test:
            assert (cid in test) == is_test_clip(int(cid.rsplit("-", 1)[1]), 0.1)
        # the run report counts exactly the rows that load
        n = sum(sum(report["samples"][name][s].values()) for s in ("train", "test"))
        assert n == len(ds["train"]) + len(ds["test"])
        for r in ds["train"] + ds["test"]:
            user = r["messages"][0]["content"]
            assert sum(c["type"] == "image" for c in user) == len(r["images"])
            assert all(size == [64, 64] for size, _ in r["images"])
    assert all(len(r["motion_ids"]) == 3 * len(r["trajectory"]) for r in action["train"])
    assert {r["task_type"] for r in visual["train"] + visual["test"]} == {
        "spatial_relationship",
        "task_completion",
        "hand_movement",
        "camera_movement",
    }
    ids = [r["id"] for s in visual.values() for r in s]
    assert len(ids) == len(set(ids))


def test_interrupted_build_resumes_to_the_same_dataset(tmp_path):
    ref = tmp_path / "ref"
    _build(ref, FakeSource(8))
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _build(out, InterruptingSource(stop_at=5, num_clips=8))
    done = sorted(p.name for p in (out / ".build").glob("shard-*.json"))
    assert done == ["shard-00000.json"]  # clips 0-2 finished; clip 5 stopped the second shard
    (out / "data" / "visual" / ".train-00001.parquet.tmp").write_bytes(b"half a file")  # as a kill leaves it
    _build(out, FakeSource(8))
    assert not list(out.rglob(".*.tmp"))
    again = _build(out, FakeSource(8))  # a finished build re-run touches nothing
    assert again["this_run"]["clips_processed"] == 0
    for config in ("visual", "action"):
        assert _load(out, config) == _load(ref, config)


def test_corrupt_inputs_are_skipped_with_reasons(tmp_path):
    corrupt = {1: "unreadable", 2: "nan_joints", 3: "out_of_view", 4: "empty_box"}
    out = tmp_path / "hand3d"
    report = _build(out, FakeSource(6, corrupt=corrupt), detector=EmptyBoxDetector())
    reasons = {s["clip_id"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"fake-s0-0001", "fake-s0-0002", "fake-s0-0003"}
    assert "unreadable" in reasons["fake-s0-0001"]
    assert "non-finite" in reasons["fake-s0-0002"]
    assert "no frame with a hand in view" in reasons["fake-s0-0003"]
    assert report["frame_drops"].get("object: degenerate box", 0) > 0
    rows = [r for s in _load(out, "visual").values() for r in s]
    clips = {r["clip_id"] for r in rows}
    assert clips.isdisjoint(reasons) and "fake-s0-0004" in clips
    assert all(r["target"]["object"] != "red mug" for r in rows if r["clip_id"] == "fake-s0-0004")


def test_two_workers_give_the_same_rows_as_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _build(one, FakeSource(4))
    _build(two, FakeSource(4), num_workers=2)
    for config in ("visual", "action"):
        for split in ("train", "test"):
            a = [
                pq.read_table(p).to_pylist()
                for p in sorted((one / "data" / config).glob(f"{split}-*.parquet"))
            ]
            b = [
                pq.read_table(p).to_pylist()
                for p in sorted((two / "data" / config).glob(f"{split}-*.parquet"))
            ]
            assert a == b


def test_messages_feed_the_vipa_processor(tmp_path):
    """Rows as loaded go through the package's own chat template and processor (what SFTTrainer calls)."""
    from datasets import load_dataset

    from tests.tiny_assets import build_tiny_processor

    out = tmp_path / "hand3d"
    _build(out, FakeSource(3))
    ds = load_dataset(str(out), "visual", split="train", cache_dir=str(tmp_path / "cache"))
    processor = build_tiny_processor()
    for row in ds.select(range(6)):
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        assert text.count("<image>") == len(row["images"])
        assert row["messages"][1]["content"][0]["text"] in text
        batch = processor(images=row["images"], text=text, return_tensors="pt")
        assert batch["pixel_values"].shape[0] >= len(row["images"])


def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "hand3d"
    _build(out, FakeSource(3))
    with pytest.raises(ValueError, match="other settings"):
        _build(out, FakeSource(3), seed=1)


def test_card_lists_configs_statistics_license_and_citation(tmp_path):
    out = tmp_path / "hand3d"
    _build(out, FakeSource(6))
    text = write_card(out).read_text()
    meta = yaml.safe_load(text.split("---")[1])
    configs = {c["config_name"]: c["data_files"] for c in meta["configs"]}
    assert set(configs) == {"visual", "action"}
    for files in configs.values():
        assert {f["split"] for f in files} == {"train", "test"}
        assert all(f["path"].startswith("data/") and f["path"].endswith("-*.parquet") for f in files)
    assert meta["license"] == "apache-2.0" and "@article{" in text
    # the statistics table's total equals the rows in the parquet files, counted here with pyarrow
    n_visual = sum(pq.read_metadata(p).num_rows for p in (out / "data" / "visual").glob("*.parquet"))
    assert f"| **Total** | {n_visual:,} | 100% |" in text
    assert "Spatial Relations" in text and "Instructional Motion Generation" in text


def test_bad_build_config_raises():
    with pytest.raises(ValueError, match="num_clips"):
        BuildConfig(num_clips=0)
    with pytest.raises(ValueError, match="test_fraction"):
        BuildConfig(test_fraction=1.5)
