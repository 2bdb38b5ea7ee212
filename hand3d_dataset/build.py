"""The Hand3D runner: sources → pipeline → sharded parquet, resumable (`hand3d build`).

    >>> from hand3d_dataset.build import BuildConfig, build
    >>> report = build(BuildConfig(source="synth", num_clips=4, out="hand3d", image_size=64, frames=4))
    >>> from datasets import load_dataset
    >>> ds = load_dataset("hand3d", "visual")          # works offline: parquet + README configs

Layout of the output folder (DESIGN.md §3):

    data/visual/{train,test}-SSSSS.parquet   Hand3D-visual shards (S = shard index)
    data/action/{train,test}-SSSSS.parquet   Hand3D-action shards
    README.md                                dataset card with `configs:` (publish.write_card)
    report.json                              run report (clips done/skipped with reasons, statistics)
    .build/config.json, .build/shard-SSSSS.json   resume state: settings and finished shards

Clips are grouped into shards of `shard_size` consecutive clips of the source's stable order. A shard
is written when all its clips are processed: each parquet file goes to a temporary name and is moved
into place with `os.replace` (atomic on POSIX), and the shard's marker is written last, the same way.
A re-run skips shards that have a marker and redoes the others from scratch, so an interrupted build
never leaves a half-written or duplicated shard, and the result equals an uninterrupted run: every
random choice comes from (seed, clip_id) (`pipeline.clip_seed`), not from the order of work.

Split: clip i (position in the source's order) goes to `test` when ``frac((i + 1) · φ) < test_fraction``
(φ the golden ratio, a low-discrepancy sequence: every ~1/test_fraction consecutive clips hold a test
clip, and a clip's split never depends on num_clips or the workers). All samples of a clip share its
split, so test clips never appear in train (Hand3D-test = the `visual` test split).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from datasets import Dataset

from hand3d_dataset.pipeline import ACTION_FEATURES, VISUAL_FEATURES, ClipResult, PipelineConfig, process_clip

__all__ = ["BuildConfig", "build", "is_test_clip", "shard_paths", "make_source", "make_models"]

GOLDEN = (5**0.5 - 1) / 2  # fractional part of the golden ratio φ
CONFIGS = {"visual": VISUAL_FEATURES, "action": ACTION_FEATURES}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class BuildConfig:
    """Settings of one build; all but num_clips/num_workers/progress must match when resuming."""

    source: str = "synth"  # registry name (sources.get_source)
    source_root: str | None = None  # dataset folder of a real source (e.g. hot3d); unused by synth
    num_clips: int = 100  # first N clips of the source's order
    out: str = "hand3d"  # output folder (default ./hand3d, so load_dataset("hand3d", "visual") works)
    num_workers: int = 1  # processes annotating clips; 1 runs in this process
    seed: int = 0  # source seed and sample seed
    image_size: int = 448  # rendered image side, pixels (synth)
    frames: int = 8  # frames per clip (synth)
    test_fraction: float = 0.1  # share of clips in the test split
    shard_size: int = 16  # clips per shard
    estimator: str = (
        "gt-depth"  # point clouds: "gt-depth", "cut3r:<folder>" or "depth-anything:<folder|hub id>"
    )
    detector: str = "gt-boxes"  # object boxes: "gt-boxes" or "grounding-dino:<folder|hub id>"
    device: str = "cpu"  # where a learnt estimator / detector runs ("cpu", "cuda", "cuda:1")
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        for name in ("num_clips", "num_workers", "image_size", "frames", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction: expected a value in [0, 1), got {self.test_fraction}")
        _parse_model_spec("estimator", self.estimator)
        _parse_model_spec("detector", self.detector)

    def resume_key(self) -> dict:
        """Settings that change the content of a shard (a resumed build must match them)."""
        d = asdict(self)
        for k in ("num_clips", "num_workers", "progress", "out", "device"):
            d.pop(k)
        return d


def is_test_clip(index: int, test_fraction: float) -> bool:
    """Split of the clip at position `index` of the source's order (see the module docstring)."""
    return ((index + 1) * GOLDEN) % 1.0 < test_fraction


def shard_paths(out: Path, shard: int) -> dict[tuple[str, str], Path]:
    """(config, split) → parquet path of a shard."""
    return {(c, s): out / "data" / c / f"{s}-{shard:05d}.parquet" for c in CONFIGS for s in SPLITS}


def make_source(cfg: BuildConfig):
    """The source adapter named by cfg.source, sized for the build."""
    from hand3d_dataset.sources import get_source

    if cfg.source == "synth":
        return get_source(
            "synth", num_clips=cfg.num_clips, seed=cfg.seed, image_size=cfg.image_size, num_frames=cfg.frames
        )
    if cfg.source_root is None:
        raise ValueError(f"source_root: source {cfg.source!r} reads a dataset folder; pass --source-root DIR")
    return get_source(cfg.source, root=cfg.source_root)


# Model specs of `BuildConfig.estimator` / `.detector`: kind -> whether it takes ":<folder or hub id>".
ESTIMATORS = {"gt-depth": False, "cut3r": True, "depth-anything": True}
DETECTORS = {"gt-boxes": False, "grounding-dino": True}


def _parse_model_spec(field: str, spec: str) -> tuple[str, str | None]:
    """'cut3r:/ckpt' -> ('cut3r', '/ckpt'); 'gt-depth' -> ('gt-depth', None). Errors name the field."""
    kinds = ESTIMATORS if field == "estimator" else DETECTORS
    kind, sep, where = str(spec).partition(":")
    if kind not in kinds:
        raise ValueError(f"{field}: unknown kind {kind!r} in {spec!r}; expected one of {sorted(kinds)}")
    if kinds[kind] and not where:
        raise ValueError(
            f"{field}: {kind!r} needs a checkpoint, as '{kind}:<folder or hub id>'; got {spec!r}"
        )
    if not kinds[kind] and sep:
        raise ValueError(f"{field}: {kind!r} takes no checkpoint; got {spec!r}")
    return kind, where or None


def make_models(cfg: BuildConfig):
    """(estimator, detector) named by the config.

    gt-depth / gt-boxes: the synth source's depth (with a hidden per-clip scale) and segmentation boxes.
    cut3r:<folder>: a converted CUT3R checkpoint (`vipa-train convert-cut3r`), self-view pointmaps.
    depth-anything:<folder|id>: transformers' DepthAnythingForDepthEstimation with the clip's intrinsics.
    grounding-dino:<folder|id>: transformers' GroundingDinoForObjectDetection, boxes from the object names.
    """
    from hand3d_dataset import estimators

    kind, where = _parse_model_spec("estimator", cfg.estimator)
    if kind == "gt-depth":
        estimator = estimators.GroundTruthDepthEstimator(seed=cfg.seed)
    elif kind == "cut3r":
        from hand3d_dataset.cut3r_estimator import Cut3rPointCloudEstimator

        if not Path(where).is_dir():
            raise ValueError(f"estimator: no CUT3R checkpoint folder at {where!r} (convert one first)")
        estimator = Cut3rPointCloudEstimator(where, device=cfg.device)
    else:
        estimator = estimators.DepthAnythingEstimator(where, device=cfg.device)
    kind, where = _parse_model_spec("detector", cfg.detector)
    if kind == "gt-boxes":
        detector = estimators.GroundTruthBoxDetector()
    else:
        detector = estimators.GroundingDinoDetector(where, device=cfg.device)
    return estimator, detector


# ---- workers -----------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(cfg: BuildConfig, source, estimator, detector, pipeline_cfg: PipelineConfig) -> None:
    """Per process: build (or receive) the source and models once."""
    if estimator is None or detector is None:
        estimator, detector = make_models(cfg)
    _WORKER.update(
        cfg=cfg,
        source=source if source is not None else make_source(cfg),
        estimator=estimator,
        detector=detector,
        pipeline=pipeline_cfg,
    )


def _run_clip(clip_id: str) -> ClipResult:
    """Load and annotate one clip; any failure becomes a skip reason (the run never stops for data)."""
    w = _WORKER
    source_name = w["cfg"].source
    try:
        clip = w["source"].load_clip(clip_id)
    except Exception as e:  # a corrupt or unreadable input: record and carry on
        return ClipResult(
            clip_id=clip_id, source=source_name, skipped=f"load failed: {type(e).__name__}: {e}"
        )
    try:
        return process_clip(clip, w["estimator"], w["detector"], w["pipeline"], seed=w["cfg"].seed)
    except Exception as e:  # a bug or an estimator failure on odd data must not kill a long build
        return ClipResult(
            clip_id=clip_id, source=source_name, skipped=f"pipeline error: {type(e).__name__}: {e}"
        )


# ---- writing -----------------------------------------------------------------------------------------
def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _write_shard(out: Path, shard: int, results: list[ClipResult], test: dict[str, bool]) -> dict:
    """Writes the shard's parquet files (atomically) and returns its marker record."""
    rows: dict[tuple[str, str], list[dict]] = {k: [] for k in shard_paths(out, shard)}
    for r in results:
        split = "test" if test[r.clip_id] else "train"
        rows[("visual", split)] += r.rows_visual
        rows[("action", split)] += r.rows_action
    for key, path in shard_paths(out, shard).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not rows[key]:
            path.unlink(missing_ok=True)  # a stale file of an older, different attempt
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        # the table carries the `datasets` features in its schema metadata, so images load as Image
        pq.write_table(Dataset.from_list(rows[key], features=CONFIGS[key[0]]).data.table, tmp)
        os.replace(tmp, path)
    clips = []
    for r in results:
        counts = Counter(row["task_type"] for row in r.rows_visual + r.rows_action)
        clips.append(
            {
                "clip_id": r.clip_id,
                "split": "test" if test[r.clip_id] else "train",
                "skipped": r.skipped,
                "notes": r.notes,
                "scale": r.scale,
                "scale_num_valid": r.scale_num_valid,
                "true_scale": r.true_scale,
                "samples": dict(sorted(counts.items())),
                "waypoints": r.waypoints,
                "clipped": r.clipped,
                "action_filtered": dict(r.action_stats),
            }
        )
    return {"shard": shard, "clips": clips}


def _reason_kind(reason: str) -> str:
    """Groups reasons for counting: "frame 3 object 'mug': degenerate box [..]" → "object: degenerate box",
    "frame 6: no hand in view, dropped" → "frame: no hand in view, dropped", "load failed: ..." → "load failed"."""
    head, _, rest = reason.partition(": ")
    if head.startswith("frame "):
        kind = "object" if " object " in head else "frame"
        detail = re.sub(r"\d+(\.\d+)?", "N", rest.split(" [")[0].split(" (")[0])
        return f"{kind}: {detail}"
    return head


def _report(cfg: BuildConfig, markers: list[dict], elapsed: float, processed: int) -> dict:
    clips = [c for m in markers for c in m["clips"]]
    done = [c for c in clips if c["skipped"] is None]
    samples: dict = {c: {s: Counter() for s in SPLITS} for c in CONFIGS}
    visual_types = {"spatial_relationship", "task_completion", "hand_movement", "camera_movement"}
    for c in done:
        for task, n in c["samples"].items():
            samples["visual" if task in visual_types else "action"][c["split"]][task] += n
    per_category = Counter()
    for conf in samples.values():
        for split in conf.values():
            per_category.update(split)
    scales = np.array([c["scale"] for c in done if c["scale"] is not None], dtype=np.float64)
    rel = np.array(
        [abs(c["scale"] / c["true_scale"] - 1) for c in done if c["scale"] and c.get("true_scale")],
        dtype=np.float64,
    )
    coords = 3 * sum(c["waypoints"] for c in done)
    clipped = sum(c["clipped"] for c in done)
    filtered = Counter()
    for c in done:
        filtered.update(c["action_filtered"])
    skipped = [{"clip_id": c["clip_id"], "reason": c["skipped"]} for c in clips if c["skipped"] is not None]
    notes = Counter(_reason_kind(n) for c in clips for n in c["notes"])
    return {
        "config": asdict(cfg),
        "clips_requested": cfg.num_clips,
        "clips_done": len(done),
        "clips_skipped": len(skipped),
        "skipped": skipped,
        "skip_reasons": dict(Counter(_reason_kind(s["reason"]) for s in skipped)),
        "frame_drops": dict(notes),
        "splits": {s: sorted(c["clip_id"] for c in done if c["split"] == s) for s in SPLITS},
        "samples": {c: {s: dict(sorted(v.items())) for s, v in d.items()} for c, d in samples.items()},
        "samples_per_category": dict(sorted(per_category.items())),
        "action_filtered": dict(filtered),
        "clipping": {"coordinates": coords, "clipped": clipped, "rate": clipped / coords if coords else 0.0},
        "scale": {
            "n": int(scales.size),
            "mean": float(scales.mean()) if scales.size else None,
            "median": float(np.median(scales)) if scales.size else None,
            "min": float(scales.min()) if scales.size else None,
            "max": float(scales.max()) if scales.size else None,
            # only with an estimator that knows its scale (ground-truth depth): |s / s_true - 1|
            "rel_error_median": float(np.median(rel)) if rel.size else None,
            "rel_error_max": float(rel.max()) if rel.size else None,
        },
        "this_run": {
            "clips_processed": processed,
            "elapsed_s": round(elapsed, 3),
            "clips_per_min": round(60.0 * processed / elapsed, 2) if elapsed > 0 and processed else None,
        },
    }


def build(
    cfg: BuildConfig,
    *,
    source=None,
    estimator=None,
    detector=None,
    pipeline: PipelineConfig | None = None,
) -> dict:
    """Runs (or resumes) a build and returns the run report (also written to OUT/report.json).

    source/estimator/detector: objects to use instead of those named in cfg (tests inject corrupt
    sources this way; with num_workers > 1 they must be picklable).
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    state = out / ".build"
    state.mkdir(parents=True, exist_ok=True)
    key_path = state / "config.json"
    if key_path.exists():
        old = json.loads(key_path.read_text())
        if old != json.loads(json.dumps(cfg.resume_key())):
            raise ValueError(
                f"out: {out} holds a build with other settings {old}; use a new folder or the same settings"
            )
    else:
        _atomic_json(key_path, cfg.resume_key())
    # temporary files of a killed run: never valid, never matched by the README globs, removed here
    for stale in [*state.glob(".*.tmp"), *out.glob("data/*/.*.tmp")]:
        stale.unlink(missing_ok=True)
    pipeline = pipeline or PipelineConfig()
    if source is None:
        source = make_source(cfg)
    ids = list(source.clip_ids())[: cfg.num_clips]
    if len(ids) < cfg.num_clips:
        print(f"hand3d build: source {cfg.source!r} has only {len(ids)} clips")
    test = {cid: is_test_clip(i, cfg.test_fraction) for i, cid in enumerate(ids)}
    shards = [ids[k : k + cfg.shard_size] for k in range(0, len(ids), cfg.shard_size)]
    marker = lambda k: state / f"shard-{k:05d}.json"  # noqa: E731
    todo = [k for k in range(len(shards)) if not marker(k).exists()]
    work = [cid for k in todo for cid in shards[k]]

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(ids), initial=len(ids) - len(work), unit="clip", disable=not cfg.progress, desc="hand3d"
    )
    init = (cfg, source, estimator, detector, pipeline)
    pool = None
    if cfg.num_workers > 1 and work:
        # spawn: MuJoCo's EGL context and torch's threads do not survive fork
        pool = mp.get_context("spawn").Pool(cfg.num_workers, initializer=_init_worker, initargs=init)
        results = pool.imap(_run_clip, work, chunksize=1)
    else:
        _init_worker(*init)
        results = map(_run_clip, work)
    try:
        it = iter(results)
        for k in todo:
            shard_results = []
            for _ in shards[k]:
                shard_results.append(next(it))
                bar.update(1)
            _atomic_json(marker(k), _write_shard(out, k, shard_results, test))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    markers = [json.loads(marker(k).read_text()) for k in range(len(shards))]
    report = _report(cfg, markers, time.perf_counter() - t0, len(work))
    _atomic_json(out / "report.json", report)

    from hand3d_dataset.publish import write_card

    write_card(out)
    return report
