"""Per-source statistics (issue 17 §4, paper Tables 1-2): `hand3d stats DIR` against counts made here
with pyarrow from the parquet files and the report's own skip list; the build's report agrees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import PIL.Image
import pyarrow.parquet as pq
import pytest

from hand3d_dataset.build import BuildConfig, build
from hand3d_dataset.estimators import GroundTruthBoxDetector, GroundTruthDepthEstimator
from hand3d_dataset.stats import dataset_stats, format_table, reason_kind
from tests.hand3d_fake_source import FakeSource

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("stats") / "hand3d"
    cfg = BuildConfig(source="fake", num_clips=7, out=str(out), shard_size=3, progress=False)
    src = FakeSource(7, corrupt={1: "unreadable", 3: "out_of_view"})
    report = build(cfg, source=src, estimator=GroundTruthDepthEstimator(), detector=GroundTruthBoxDetector())
    return out, report


def _count_by_hand(out: Path) -> dict:
    """(source, task_type) -> rows, clips, train, test: every column read with pyarrow, counted here."""
    rows, clips = Counter(), defaultdict(set)
    for path in sorted((out / "data").rglob("*.parquet")):
        split = path.name.split("-")[0]
        for r in pq.read_table(path).select(["source", "task_type", "clip_id"]).to_pylist():
            key = (r["source"], r["task_type"])
            rows[key, "all"] += 1
            rows[key, split] += 1
            clips[key].add(r["clip_id"])
    return {k: (rows[k, "all"], len(clips[k]), rows[k, "train"], rows[k, "test"]) for k in clips}


def test_stats_table_equals_counts_from_the_parquet_files(built):
    out, report = built
    stats = dataset_stats(out)
    by_hand = _count_by_hand(out)
    got = {
        (src, task): (t["rows"], t["clips"], t["train"], t["test"])
        for src, s in stats["sources"].items()
        for task, t in s["tasks"].items()
    }
    assert got == by_hand and len(got) >= 5
    visual = {"spatial_relationship", "task_completion", "hand_movement", "camera_movement"}
    assert stats["totals"]["visual"] == sum(v[0] for (_, task), v in by_hand.items() if task in visual)
    assert stats["totals"]["action"] == sum(v[0] for (_, task), v in by_hand.items() if task not in visual)
    # skips come from the report's own list of skipped clips
    fake = stats["sources"]["fake"]
    assert fake["clips_skipped"] == len(report["skipped"]) == 2
    assert fake["skip_reasons"] == dict(Counter(reason_kind(s["reason"]) for s in report["skipped"]))
    assert fake["clips_done"] == 5 and fake["clips_requested"] == 7
    # the build's report (from its shard markers) and the parquet-based statistics agree
    assert report["per_source"] == stats


def test_table_lines_and_shares(built):
    out, _ = built
    stats = dataset_stats(out)
    text = format_table(stats)
    by_hand = _count_by_hand(out)
    visual = {"spatial_relationship", "task_completion", "hand_movement", "camera_movement"}
    total_visual = sum(v[0] for (_, task), v in by_hand.items() if task in visual)
    rows, clips, train, test = by_hand[("fake", "spatial_relationship")]
    line = next(ln for ln in text.splitlines() if "spatial_relationship" in ln)
    assert line.split() == [
        "fake", "visual", "spatial_relationship", str(clips), str(rows), str(train), str(test),
        f"{100 * rows / total_visual:.1f}%",
    ]  # fmt: skip
    assert "fake: 5 clips annotated of 7 requested; 2 skipped (" in text


def test_cli_prints_the_table_and_writes_a_png(built, tmp_path):
    out, _ = built
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    png, js = tmp_path / "stats.png", tmp_path / "stats.json"
    res = subprocess.run(
        [sys.executable, "-m", "hand3d_dataset.cli", "stats", str(out), "--plot", str(png), "--json", str(js)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("source") and "spatial_relationship" in res.stdout
    with PIL.Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert json.loads(js.read_text()) == dataset_stats(out)


def test_stats_of_a_folder_without_shards_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no parquet shards under"):
        dataset_stats(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "hand3d_dataset.cli", "stats", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2 and "no parquet shards" in res.stderr and "Traceback" not in res.stderr


def test_reason_kind_groups_reasons_that_differ_by_numbers():
    assert reason_kind("frame 3 object 'mug': only 2 point(s) in the object's depth cluster (< 5)") == (
        "object: only N point(s) in the object's depth cluster"
    )
    assert reason_kind("frame 6: no hand in view, dropped") == "frame: no hand in view, dropped"
    assert reason_kind("load failed: ValueError: bad file") == "load failed"
