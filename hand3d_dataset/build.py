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

Several sources (`BuildConfig.sources`, `hand3d build --sources synth:,hot3d:ROOT,arctic:ROOT:0.5`)
make one dataset: each source contributes the first `num_clips` clips of its own order, the split of
each follows its index in that order (so a clip has the same split as in a build of its source
alone), and a weight w < 1 keeps a stable share w of them (clip kept when a hash of its id, uniform
in [0, 1), is below w: independent of the order and of the other sources). Clips are processed source
after source in the order given; ids stay the sources' own (two sources yielding one id is an error).
`report.json` holds `per_source` counts (clips, rows per task type, skips by reason), the table
`hand3d stats` prints (`hand3d_dataset.stats`). Sequences a source could not even list (its `skipped`
dict: sequence → reason) have no clip id; they are in `listing_skipped` and counted per source as
"listing failed (sequence)".

Object positions (`BuildConfig.object_source`, `hand3d build --object-source`): "auto" (default) takes an
object's pose from the dataset where it has one and the estimator/detector elsewhere, "pose" only the
poses, "estimate" only the estimator/detector (`pipeline` module docstring); part of the resume key.

Engines (`BuildConfig.engine`): "local" annotates clips in this process or a spawn pool of `num_workers`;
"ray" runs the same per-clip steps as a Ray Data pipeline on a Ray cluster (`hand3d_dataset.build_ray`).
Both hand their `ClipResult`s, in the order of the clips, to the one writer below (shards, markers,
report.json, card), so the engine never changes the output folder.
"""

from __future__ import annotations

import importlib
import json
import math
import multiprocessing as mp
import os
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from datasets import Dataset

from hand3d_dataset.calibration import ESTIMATES
from hand3d_dataset.clip import Clip
from hand3d_dataset.pipeline import (
    ACTION_FEATURES,
    OBJECT_SOURCES,
    VISUAL_FEATURES,
    ClipResult,
    PipelineConfig,
    process_clip,
)
from hand3d_dataset.stats import per_source_from_clips, reason_kind

__all__ = [
    "BuildConfig",
    "SourceSpec",
    "build",
    "is_test_clip",
    "keep_clip",
    "parse_sources",
    "shard_paths",
    "make_source",
    "make_models",
    "make_estimator",
    "make_detector",
    "load_or_skip",
    "annotate_or_skip",
    "ENGINES",
]

GOLDEN = (5**0.5 - 1) / 2  # fractional part of the golden ratio φ
CONFIGS = {"visual": VISUAL_FEATURES, "action": ACTION_FEATURES}
SPLITS = ("train", "test")
ENGINES = ("local", "ray")  # BuildConfig.engine


@dataclass(frozen=True)
class BuildConfig:
    """Settings of one build; all but num_clips/num_workers/progress must match when resuming."""

    source: str = "synth"  # registry name (sources.get_source); ignored when `sources` is set
    source_root: str | None = None  # dataset folder of a real source (e.g. hot3d); unused by synth
    # several sources in one dataset, "name:ROOT[:WEIGHT],..." (synth takes no root: "synth:" or "synth::0.5");
    # WEIGHT in (0, 1] is the stable share of the source's clips kept (default 1); replaces source/source_root
    sources: str | None = None
    num_clips: int = 100  # first N clips of the source's order
    out: str = "hand3d"  # output folder (default ./hand3d, so load_dataset("hand3d", "visual") works)
    num_workers: int = 1  # processes annotating clips; 1 runs in this process (ray: tasks/actors per stage)
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
    object_position: str = (
        "centre"  # objects in rows: "centre" (estimated volumetric) or "surface" (visible face)
    )
    # where object positions come from: "auto" (the dataset's pose where it has one, else estimated),
    # "pose" (the dataset's poses only, no estimator/detector) or "estimate" (pipeline.OBJECT_SOURCES)
    object_source: str = "auto"
    progress: bool = True  # show a progress bar
    # synth: a folder where the rendered clips (frames, depth, segmentation) are kept for later re-renders of
    # the same clips (the main job's stand-ins and probe read them back); None: not kept
    synth_cache: str | None = None
    engine: str = (
        "local"  # "local" (this process or a spawn pool) or "ray" (build_ray: Ray Data on a cluster)
    )
    # engine "ray": None starts a private local Ray instance of num_workers CPUs; "auto" joins the cluster of
    # this node (`ray start --head`, `ray job submit`); "ray://HOST:PORT" connects through Ray Client
    ray_address: str | None = None

    def __post_init__(self) -> None:
        for name in ("num_clips", "num_workers", "image_size", "frames", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction: expected a value in [0, 1), got {self.test_fraction}")
        _parse_model_spec("estimator", self.estimator)
        _parse_model_spec("detector", self.detector)
        if self.object_position not in ESTIMATES:
            raise ValueError(f"object_position: expected one of {ESTIMATES}, got {self.object_position!r}")
        if self.object_source not in OBJECT_SOURCES:
            raise ValueError(f"object_source: expected one of {OBJECT_SOURCES}, got {self.object_source!r}")
        if self.object_source == "pose" and self.object_position != "centre":
            raise ValueError(
                f"object_source: 'pose' gives object centres, not object_position {self.object_position!r}"
            )
        if self.sources is not None:
            parse_sources(self.sources)
        if self.engine not in ENGINES:
            raise ValueError(f"engine: expected one of {ENGINES}, got {self.engine!r}")
        if self.ray_address is not None:
            if self.engine != "ray":
                raise ValueError(f"ray_address: only used with engine 'ray', got engine {self.engine!r}")
            a = self.ray_address
            if not (a == "auto" or (a.startswith("ray://") and len(a) > len("ray://"))):
                raise ValueError(f"ray_address: expected 'auto' or 'ray://HOST:PORT', got {a!r}")

    def source_specs(self) -> list[SourceSpec]:
        """The sources of this build: `sources` parsed, or the single `source`/`source_root` at weight 1."""
        if self.sources is not None:
            return parse_sources(self.sources)
        return [SourceSpec(self.source, self.source_root, 1.0)]

    def resume_key(self) -> dict:
        """Settings that change the content of a shard (a resumed build must match them)."""
        d = asdict(self)
        for k in (
            "num_clips",
            "num_workers",
            "progress",
            "out",
            "device",
            "engine",
            "ray_address",
            "synth_cache",
        ):
            d.pop(k)
        return d


@dataclass(frozen=True)
class SourceSpec:
    """One entry of `BuildConfig.sources`."""

    name: str  # registry name (sources.SOURCES)
    root: str | None  # dataset folder; None for synth
    weight: float  # share of the source's clips kept, in (0, 1]


def parse_sources(spec: str) -> list[SourceSpec]:
    """'synth:,hot3d:/data/hot3d,arctic:/data/arctic:0.5' -> [SourceSpec, ...]; errors name the entry.

    Each comma-separated entry is ``name:ROOT[:WEIGHT]``; the last ``:`` part is a weight only when it
    reads as a number, so roots may contain ``:``. `synth` renders its clips and takes no root.
    """
    from hand3d_dataset.sources import SOURCES

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"sources: expected 'name:ROOT[:WEIGHT],...', got {spec!r}")
    out: list[SourceSpec] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            raise ValueError(f"sources: empty entry in {spec!r} (two commas, or a trailing comma)")
        name, sep, rest = item.partition(":")
        if not sep:
            raise ValueError(
                f"sources: entry {item!r} is not 'name:ROOT[:WEIGHT]' (synth takes no root: write 'synth:')"
            )
        if name not in SOURCES:
            raise ValueError(f"sources: unknown source {name!r} in {item!r}; available: {sorted(SOURCES)}")
        root, weight = rest, 1.0
        head, colon, tail = rest.rpartition(":")
        if colon:
            try:
                weight = float(tail)
            except ValueError:
                pass  # a ':' inside the root, not a weight
            else:
                root = head
        if not (math.isfinite(weight) and 0.0 < weight <= 1.0):
            raise ValueError(
                f"sources: weight of {name!r} in {item!r} must be in (0, 1] (the share of its clips kept), got {weight}"
            )
        if name == "synth" and root:
            raise ValueError(
                f"sources: synth renders its clips and takes no root; got {item!r} (write 'synth:')"
            )
        if name != "synth" and not root:
            raise ValueError(f"sources: {name!r} reads a dataset folder; write '{name}:ROOT' (got {item!r})")
        entry = SourceSpec(name, root or None, weight)
        if any((e.name, e.root) == (entry.name, entry.root) for e in out):
            raise ValueError(f"sources: {item!r} is listed twice in {spec!r}")
        out.append(entry)
    return out


def keep_clip(clip_id: str, weight: float) -> bool:
    """Whether a source of weight `weight` keeps `clip_id`: a hash of the id, uniform in [0, 1), < weight."""
    return weight >= 1.0 or zlib.crc32(f"hand3d-weight/{clip_id}".encode()) / 2**32 < weight


def is_test_clip(index: int, test_fraction: float) -> bool:
    """Split of the clip at position `index` of the source's order (see the module docstring)."""
    return ((index + 1) * GOLDEN) % 1.0 < test_fraction


def shard_paths(out: Path, shard: int) -> dict[tuple[str, str], Path]:
    """(config, split) → parquet path of a shard."""
    return {(c, s): out / "data" / c / f"{s}-{shard:05d}.parquet" for c in CONFIGS for s in SPLITS}


def make_source(cfg: BuildConfig, spec: SourceSpec | None = None):
    """The source adapter of `spec` (default: cfg.source / cfg.source_root), sized for the build."""
    from hand3d_dataset.sources import get_source

    name, root = (cfg.source, cfg.source_root) if spec is None else (spec.name, spec.root)
    if name == "synth":
        return get_source(
            "synth", num_clips=cfg.num_clips, seed=cfg.seed, image_size=cfg.image_size, num_frames=cfg.frames,
            cache_dir=cfg.synth_cache,
        )  # fmt: skip
    if root is None:
        raise ValueError(f"source_root: source {name!r} reads a dataset folder; pass --source-root DIR")
    if not Path(root).exists():
        raise FileNotFoundError(f"source_root: {root!r} of source {name!r} does not exist")
    return get_source(name, root=root)


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
    """(estimator, detector) named by the config (`make_estimator`, `make_detector`)."""
    return make_estimator(cfg), make_detector(cfg)


def make_estimator(cfg: BuildConfig):
    """The point-cloud estimator of `cfg.estimator`.

    gt-depth: the synth source's depth with a hidden per-clip scale.
    cut3r:<folder>: a converted CUT3R checkpoint (`vipa-train convert-cut3r`), self-view pointmaps.
    depth-anything:<folder|id>: transformers' DepthAnythingForDepthEstimation with the clip's intrinsics.
    """
    from hand3d_dataset import estimators

    kind, where = _parse_model_spec("estimator", cfg.estimator)
    if kind == "gt-depth":
        return estimators.GroundTruthDepthEstimator(seed=cfg.seed)
    if kind == "cut3r":
        from hand3d_dataset.cut3r_estimator import Cut3rPointCloudEstimator

        if not Path(where).is_dir():
            raise ValueError(f"estimator: no CUT3R checkpoint folder at {where!r} (convert one first)")
        return Cut3rPointCloudEstimator(where, device=cfg.device)
    return estimators.DepthAnythingEstimator(where, device=cfg.device)


def make_detector(cfg: BuildConfig):
    """The object detector of `cfg.detector`.

    gt-boxes: the synth source's segmentation boxes.
    grounding-dino:<folder|id>: transformers' GroundingDinoForObjectDetection, boxes from the object names.
    """
    from hand3d_dataset import estimators

    kind, where = _parse_model_spec("detector", cfg.detector)
    if kind == "gt-boxes":
        return estimators.GroundTruthBoxDetector()
    return estimators.GroundingDinoDetector(where, device=cfg.device)


# ---- workers -----------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(cfg: BuildConfig, sources: dict, estimator, detector, pipeline_cfg: PipelineConfig) -> None:
    """Per process: build (or receive) the sources and models once. sources: name -> adapter or None."""
    if estimator is None or detector is None:
        estimator, detector = make_models(cfg)
    specs = {s.name: s for s in cfg.source_specs()}
    _WORKER.update(
        cfg=cfg,
        sources={n: src if src is not None else make_source(cfg, specs[n]) for n, src in sources.items()},
        estimator=estimator,
        detector=detector,
        pipeline=pipeline_cfg,
    )


def load_or_skip(adapter, source_name: str, clip_id: str) -> Clip | ClipResult:
    """The clip, or a skipped `ClipResult` saying why it could not be read (the run never stops for data)."""
    try:
        return adapter.load_clip(clip_id)
    except Exception as e:  # a corrupt or unreadable input: record and carry on
        return ClipResult(
            clip_id=clip_id, source=source_name, skipped=f"load failed: {type(e).__name__}: {e}"
        )


def annotate_or_skip(clip: Clip, estimator, detector, pipeline: PipelineConfig, seed: int) -> ClipResult:
    """`process_clip`, with any exception turned into a skip reason."""
    try:
        return process_clip(clip, estimator, detector, pipeline, seed=seed)
    except Exception as e:  # a bug or an estimator failure on odd data must not kill a long build
        return ClipResult(
            clip_id=clip.clip_id, source=clip.source, skipped=f"pipeline error: {type(e).__name__}: {e}"
        )


def _run_clip(item: tuple[str, str]) -> ClipResult:
    """Load and annotate one clip (source name, clip id); any failure becomes a skip reason."""
    w = _WORKER
    source_name, clip_id = item
    clip = load_or_skip(w["sources"][source_name], source_name, clip_id)
    if isinstance(clip, ClipResult):
        return clip
    return annotate_or_skip(clip, w["estimator"], w["detector"], w["pipeline"], w["cfg"].seed)


@contextmanager
def _local_results(
    cfg: BuildConfig, work: list[tuple[str, str]], init: tuple
) -> Iterator[Iterator[ClipResult]]:
    """The local engine: `ClipResult`s of `work`, in order, from this process or a spawn pool."""
    pool = None
    if cfg.num_workers > 1 and work:
        # spawn: MuJoCo's EGL context and torch's threads do not survive fork
        pool = mp.get_context("spawn").Pool(cfg.num_workers, initializer=_init_worker, initargs=init)
        results = pool.imap(_run_clip, work, chunksize=1)
    else:
        _init_worker(*init)
        results = map(_run_clip, work)
    try:
        yield iter(results)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


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
                "source": r.source,
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


LISTING_FAILED = "listing failed (sequence)"  # skip kind of a sequence a source could not list


def _listing_skips(per_source: dict, listing: dict[str, dict[str, str]]) -> list[dict]:
    """Adds the sequences each source failed to list (`adapter.skipped`: sequence → reason) to its
    `per_source` entry (`sequences_skipped`, and `skip_reasons` under LISTING_FAILED); returns them as rows."""
    rows = []
    for name, reasons in sorted(listing.items()):
        if not reasons:
            continue
        e = per_source["sources"][name]
        e["sequences_skipped"] = len(reasons)
        e["skip_reasons"] = dict(sorted((e["skip_reasons"] | {LISTING_FAILED: len(reasons)}).items()))
        rows += [{"source": name, "sequence": k, "reason": v} for k, v in sorted(reasons.items())]
    return rows


def _report(
    cfg: BuildConfig,
    markers: list[dict],
    elapsed: float,
    processed: int,
    requested: dict[str, int],
    listing: dict[str, dict[str, str]] | None = None,
) -> dict:
    """The run report. listing: source → {sequence: reason} of what failed while the source was listed
    (no clip id exists for those; counted per source next to the clip skips)."""
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
    notes = Counter(reason_kind(n) for c in clips for n in c["notes"])
    per_source = per_source_from_clips(clips, requested)
    listed = _listing_skips(per_source, listing or {})
    skip_reasons = Counter(reason_kind(s["reason"]) for s in skipped)
    if listed:
        skip_reasons[LISTING_FAILED] = len(listed)
    return {
        "config": asdict(cfg),
        "clips_requested": sum(requested.values()),
        "clips_done": len(done),
        "clips_skipped": len(skipped),
        "skipped": skipped,
        "skip_reasons": dict(skip_reasons),
        "listing_skipped": listed,  # sequences a source could not list: {source, sequence, reason}
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
        # per source and task type: clips, rows, skips by reason (hand3d_dataset.stats, paper Tables 1-2)
        "per_source": per_source,
        "this_run": {
            "clips_processed": processed,
            "elapsed_s": round(elapsed, 3),
            "clips_per_min": round(60.0 * processed / elapsed, 2) if elapsed > 0 and processed else None,
        },
    }


# Distributed engines: registry name -> "module:function" (a context manager like `_local_results`), imported
# only when asked for (Ray is an extra); the engine module imports this one, never the other way round.
_ENGINE_MODULES = {"ray": "hand3d_dataset.build_ray:ray_results"}


def _engine(name: str):
    module, fn = _ENGINE_MODULES[name].split(":")
    return getattr(importlib.import_module(module), fn)


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
    sources this way; with num_workers > 1 or engine "ray" they must be picklable).
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
    # the build's own setting decides what an object's position is (it is part of the resume key)
    pipeline = replace(
        pipeline,
        localization=replace(pipeline.localization, estimate=cfg.object_position),
        object_source=cfg.object_source,
    )
    specs = cfg.source_specs()
    if source is not None and not isinstance(source, dict):
        if len(specs) != 1:
            raise ValueError("source: pass a dict {name: adapter} when the build has several sources")
        source = {specs[0].name: source}
    adapters = {s.name: (source or {}).get(s.name) or make_source(cfg, s) for s in specs}
    items: list[tuple[str, str]] = []  # (source name, clip id) in processing order
    test: dict[str, bool] = {}
    requested: dict[str, int] = {}
    for spec in specs:
        ids = list(adapters[spec.name].clip_ids())[: cfg.num_clips]
        if len(ids) < cfg.num_clips and spec.name != "synth":
            print(f"hand3d build: source {spec.name!r} has only {len(ids)} clips")
        for i, cid in enumerate(ids):
            if not keep_clip(cid, spec.weight):
                continue
            if cid in test:
                raise ValueError(f"sources: clip id {cid!r} comes from two sources; ids must be unique")
            test[cid] = is_test_clip(i, cfg.test_fraction)  # the index in its own source's order
            items.append((spec.name, cid))
        requested[spec.name] = sum(1 for n, _ in items if n == spec.name)
    shards = [items[k : k + cfg.shard_size] for k in range(0, len(items), cfg.shard_size)]
    marker = lambda k: state / f"shard-{k:05d}.json"  # noqa: E731
    todo = [k for k in range(len(shards)) if not marker(k).exists()]
    work = [cid for k in todo for cid in shards[k]]

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(items), initial=len(items) - len(work), unit="clip", disable=not cfg.progress, desc="hand3d"
    )
    init = (cfg, adapters, estimator, detector, pipeline)
    engine = _local_results if cfg.engine == "local" else _engine(cfg.engine)
    try:
        with engine(cfg, work, init) as it:
            for k in todo:
                shard_results = []
                for _ in shards[k]:
                    shard_results.append(next(it))
                    bar.update(1)
                _atomic_json(marker(k), _write_shard(out, k, shard_results, test))
    finally:
        bar.close()
    markers = [json.loads(marker(k).read_text()) for k in range(len(shards))]
    listing = {s.name: dict(getattr(adapters[s.name], "skipped", None) or {}) for s in specs}
    report = _report(cfg, markers, time.perf_counter() - t0, len(work), requested, listing)
    _atomic_json(out / "report.json", report)

    from hand3d_dataset.publish import write_card

    write_card(out)
    return report
