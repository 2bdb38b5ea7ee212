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

from hand3d_dataset.build import BuildConfig, build, is_test_clip, parse_sources
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
    # object_source "estimate": the detector's empty box must reach the pipeline (the fake objects have poses)
    report = _build(
        out, FakeSource(6, corrupt=corrupt), detector=EmptyBoxDetector(), object_source="estimate"
    )
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


# ---------------------------------------------------------------- several sources in one build (issue 17 §4)

HOT3D = REPO.parent / "shared" / "fixtures" / "real" / "hot3d"


def _rows_by_source(out: Path) -> dict[str, dict[str, set]]:
    """source -> {"clips": clip ids with rows, "rows": row ids}, read here with pyarrow."""
    res: dict = {}
    for path in (out / "data").glob("*/*.parquet"):
        t = pq.read_table(path, columns=["id", "source", "clip_id"]).to_pylist()
        for r in t:
            e = res.setdefault(r["source"], {"clips": set(), "rows": set(), "splits": {}})
            e["clips"].add(r["clip_id"])
            e["rows"].add(r["id"])
            e["splits"].setdefault(r["clip_id"], set()).add(path.name.split("-")[0])
    return res


def test_two_sources_build_one_dataset_with_per_source_counts(tmp_path):
    if not HOT3D.is_dir():
        pytest.skip(f"needs the HOT3D fixture at {HOT3D} (../shared absent)")
    pytest.importorskip("mujoco", reason="the synth source renders with MuJoCo (vipa-vla[sim])")
    out = tmp_path / "hand3d"
    cfg = BuildConfig(
        sources=f"synth:,hot3d:{HOT3D}", num_clips=4, out=str(out), image_size=64, frames=3,
        shard_size=3, progress=False,
    )  # fmt: skip
    report = build(cfg)
    got = _rows_by_source(out)
    synth_ids = [f"synth-s0-{i:06d}" for i in range(4)]
    assert got["synth"]["clips"] == set(synth_ids)  # every synth clip annotated
    # each clip keeps the split of its index in its own source's order
    for i, cid in enumerate(synth_ids):
        assert got["synth"]["splits"][cid] == {"test" if is_test_clip(i, 0.1) else "train"}
    # HOT3D: two sequences; the Aria one has no camera_models.json and is skipped with that reason
    hot = report["per_source"]["sources"]["hot3d"]
    assert got["hot3d"]["clips"] == {"hot3d-Quest3-P0002_273c2819"}
    assert hot["clips_requested"] == 2 and hot["clips_done"] == 1 and hot["clips_skipped"] == 1
    assert hot["skip_reasons"] == {"load failed": 1}
    assert any("camera_models.json" in s["reason"] for s in report["skipped"])
    # per-source rows in the report equal the rows in the files
    for name in ("synth", "hot3d"):
        per = report["per_source"]["sources"][name]
        assert sum(t["rows"] for t in per["tasks"].values()) == len(got[name]["rows"])
        assert per["clips_done"] == len(got[name]["clips"])
    ids = [i for e in got.values() for i in e["rows"]]
    assert len(ids) == len(set(ids))


def test_source_weight_keeps_a_stable_share_of_clips(tmp_path):
    pytest.importorskip("mujoco", reason="the synth source renders with MuJoCo (vipa-vla[sim])")
    common = dict(num_clips=12, image_size=48, frames=2, shard_size=4, progress=False)
    half = build(BuildConfig(sources="synth::0.5", out=str(tmp_path / "half"), **common))
    full_ids = {f"synth-s0-{i:06d}" for i in range(12)}
    kept = (
        set(half["splits"]["train"]) | set(half["splits"]["test"]) | {s["clip_id"] for s in half["skipped"]}
    )
    assert kept < full_ids and 2 <= len(kept) <= 10  # a share, not all or none (12 fair coins: p < 0.04)
    assert half["per_source"]["sources"]["synth"]["clips_requested"] == len(kept)
    # the kept share depends on the ids only: a bigger build keeps the same clips among its first 12
    more = build(BuildConfig(sources="synth::0.5", out=str(tmp_path / "more"), **{**common, "num_clips": 16}))
    kept_more = (
        set(more["splits"]["train"]) | set(more["splits"]["test"]) | {s["clip_id"] for s in more["skipped"]}
    )
    assert kept_more & full_ids == kept
    # splits follow the clip's index in its source, whatever was dropped before it
    for cid in kept:
        i = int(cid.rsplit("-", 1)[1])
        assert (cid in half["splits"]["test"]) == is_test_clip(i, 0.1)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("synth", r"entry 'synth' is not 'name:ROOT\[:WEIGHT\]'"),
        ("arctik:/data/arctic", "unknown source 'arctik'.*available"),
        ("hot3d:", "'hot3d' reads a dataset folder; write 'hot3d:ROOT'"),
        ("synth:/data", "synth renders its clips and takes no root"),
        ("synth:,,hot3d:/x", "empty entry"),
        ("hot3d:/x:0", r"weight of 'hot3d'.*\(0, 1\].*got 0.0"),
        ("hot3d:/x:1.5", r"weight of 'hot3d'.*got 1.5"),
        ("hot3d:/x:nan", "weight of 'hot3d'"),
        ("hot3d:/x,hot3d:/x", "listed twice"),
        ("", "sources: expected 'name:ROOT"),
    ],
)
def test_bad_sources_strings_name_the_entry(spec, match):
    with pytest.raises(ValueError, match=match):
        BuildConfig(sources=spec)


def test_sources_parse_roots_with_colons_and_weights():
    specs = parse_sources("synth:, hot3d:C:/data/hot3d ,hot3d:/mnt/a:b:0.25")
    assert [(s.name, s.root, s.weight) for s in specs] == [
        ("synth", None, 1.0),
        ("hot3d", "C:/data/hot3d", 1.0),
        ("hot3d", "/mnt/a:b", 0.25),
    ]


def test_cli_reports_a_bad_sources_string_and_a_missing_root(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for spec, match in (
        ("synth:,bogus:/x", "unknown source 'bogus'"),
        (f"hot3d:{tmp_path}/nope", "does not exist"),
    ):
        res = subprocess.run(
            [sys.executable, "-m", "hand3d_dataset.cli", "build", "--sources", spec, "--out", str(tmp_path / "o")],
            capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
        )  # fmt: skip
        assert res.returncode == 2 and match in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_object_position_is_validated_and_part_of_the_resume_key(tmp_path):
    with pytest.raises(ValueError, match="object_position: expected one of"):
        BuildConfig(object_position="middle")
    out = tmp_path / "hand3d"
    _build(out, FakeSource(2))
    with pytest.raises(ValueError, match="other settings"):
        _build(out, FakeSource(2), object_position="surface")


def test_object_source_is_validated_and_part_of_the_resume_key(tmp_path):
    with pytest.raises(ValueError, match="object_source: expected one of"):
        BuildConfig(object_source="guess")
    with pytest.raises(ValueError, match="object_source: 'pose' gives object centres"):
        BuildConfig(object_source="pose", object_position="surface")
    out = tmp_path / "hand3d"
    _build(out, FakeSource(2))
    assert json.loads((out / ".build" / "config.json").read_text())["object_source"] == "auto"
    with pytest.raises(ValueError, match="other settings"):
        _build(out, FakeSource(2), object_source="estimate")


class _SourceWithListingSkips(FakeSource):
    """A fake source that, like the real adapters, could not list some sequences (`skipped`)."""

    def __init__(self, num_clips: int) -> None:
        super().__init__(num_clips)
        self.skipped = {
            "subject1/seq7": "sequence subject1/seq7: missing /data/subject1/seq7/meta.yml",
            "subject2/seq1": "sequence subject2/seq1: refusing to unpickle global 'os.system'",
        }


def test_sequences_skipped_at_listing_are_counted_in_the_report(tmp_path):
    out = tmp_path / "hand3d"
    report = _build(out, _SourceWithListingSkips(2))
    assert report["clips_done"] == 2 and report["clips_skipped"] == 0  # the listed clips are unaffected
    assert report["listing_skipped"] == [
        {"source": "fake", "sequence": "subject1/seq7", "reason": "sequence subject1/seq7: missing /data/subject1/seq7/meta.yml"},
        {"source": "fake", "sequence": "subject2/seq1", "reason": "sequence subject2/seq1: refusing to unpickle global 'os.system'"},
    ]  # fmt: skip
    assert report["skip_reasons"] == {"listing failed (sequence)": 2}
    fake = report["per_source"]["sources"]["fake"]
    assert fake["sequences_skipped"] == 2 and fake["skip_reasons"] == {"listing failed (sequence)": 2}
    assert json.loads((out / "report.json").read_text())["listing_skipped"] == report["listing_skipped"]
