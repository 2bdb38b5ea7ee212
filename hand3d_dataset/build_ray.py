"""The Ray engine of `hand3d build` (`--engine ray`): the local runner's output folder, built on a cluster.

Usage (a private local Ray instance of `num_workers` CPUs, started and stopped by the build):

    from hand3d_dataset.build import BuildConfig, build
    build(BuildConfig(source="synth", num_clips=6, image_size=64, frames=4, out="hand3d",
                      engine="ray", num_workers=2))

On an existing cluster (`ray start --head` on the head node, `ray start --address HEAD:6379` on the others):

    hand3d build --engine ray --ray-address auto --num-clips 100000 --num-workers 64 --out hand3d
    ray job submit --address http://HEAD:8265 -- hand3d build --engine ray --ray-address auto ...

Why Ray Data (not Ray core): the build is a linear per-clip pipeline whose stages need different resources
(reading and geometry want CPUs, the learnt models want GPUs and a model loaded once), which is exactly what
Ray Data's streaming executor schedules: task pools and autoscaling actor pools per stage, backpressure on
the object store between them, retries of tasks and restarts of actors whose worker died, and ordered
output (`preserve_order`), so the driver receives `ClipResult`s in clip order and hands them to the local
runner's own shard writer (`build._write_shard`, atomic parquet files + marker last). Ray core would mean
re-writing that scheduler, its backpressure and its retries by hand.

Pipeline: one row per clip, ``{"pos": position in the work list, "state": pickled _ClipState}``.

    stage      runs as                                   does
    read       CPU task (1 CPU)                           source.load_clip (build.load_or_skip)
    models     actor pool, only for a learnt estimator    each actor loads the model(s) once, then runs
               and/or detector (1 CPU, and 1 GPU when     `batch_clips` clips per call: the estimator, then
               --device is cuda)                          the detector, through `estimate_batch(clips)` /
                                                          `detect_batch(clips)` when the model has it
                                                          (frames batched across clips), else clip by clip
    annotate   CPU task (1 CPU)                           geometry, calibration, samples, PNGs
                                                          (build.annotate_or_skip → pipeline.process_clip)
    write      the driver, in clip order                  build.py: shards, markers, report.json, card

Ground-truth models (gt-depth, gt-boxes) need no weights and run inside the annotate task; Ray Data then
fuses read and annotate into one task per clip (nothing crosses the object store in between). A learnt
model's result is handed to `process_clip` through `_Given`, which replays it (or the exception it raised)
exactly where the pipeline asks for it, so every row and every skip reason equals the local runner's.

Memory bound: each CPU stage runs at most `num_workers` tasks of one clip each, the model pool at most
`num_workers` actors (fewer than the cluster's CPUs, or one per GPU) with `batch_clips` clips per call; the
queues between stages are bounded by Ray Data's per-operator object-store budget (backpressure stops the
read stage when downstream falls behind), so the frames in flight are O(num_workers · batch_clips) clips
whatever the number of clips; the driver holds at most one shard of finished rows (output in order) plus
the out-of-order results Ray buffers for it. What does grow with the number of clips is small: one block
reference per `clips_per_block` clips in the driver and one ledger entry per clip in flight.

Faults: a worker process that dies (killed, out of memory) has its task retried (`max_retries`) or its
actor restarted and the call retried (`max_task_retries`); every result depends on (seed, clip_id) only, so
a retry gives the same rows. A clip whose worker dies on every attempt is not retried forever: it comes
back as a skip "worker lost: ..." naming the stage and the attempts (counted in report.json like any skip).
Data errors never reach Ray: they are skip reasons, as in the local runner.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from hand3d_dataset.build import BuildConfig, annotate_or_skip, load_or_skip, make_detector, make_estimator
from hand3d_dataset.clip import Clip
from hand3d_dataset.estimators import (
    GroundTruthBoxDetector,
    GroundTruthDepthEstimator,
    detect_clip,
    estimate_clip,
)
from hand3d_dataset.extras import require
from hand3d_dataset.pipeline import ClipResult

__all__ = ["RayEngineConfig", "ray_results", "STAGES"]

STAGES = ("read", "estimate", "detect", "annotate")


@dataclass(frozen=True)
class RayEngineConfig:
    """Knobs of the Ray engine that do not change the output (none is part of the resume key)."""

    batch_clips: int = 4  # clips per call of a model actor (frames batched across them by *_batch hooks)
    # clips per input block: 1 streams clip by clip; raise it for builds of ~1e5+ clips, where the driver's
    # one object per block starts to count (a read task then holds this many clips)
    clips_per_block: int = 1
    max_retries: int = 3  # re-runs of a task / actor call whose worker process died, before "worker lost"
    # object store of a Ray instance this build starts itself, bytes (None: Ray's default, 30% of memory)
    object_store_memory: int | None = None
    quiet: bool = True  # no Ray Data progress bars / info logs (the build has its own bar over clips)

    def __post_init__(self) -> None:
        for name, low in (("batch_clips", 1), ("clips_per_block", 1), ("max_retries", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {v!r}")
        if self.object_store_memory is not None and self.object_store_memory < 80 * 2**20:
            raise ValueError(
                f"object_store_memory: expected >= 80 MiB (Ray's minimum), got {self.object_store_memory}"
            )


DEFAULT = RayEngineConfig()


@dataclass
class _ClipState:
    """What travels between the stages for one clip (pickled into the row's `state` column)."""

    source: str  # source name
    clip_id: str  # requested clip id
    clip: Clip | None = None  # the loaded clip (None once `result` is set)
    result: ClipResult | None = None  # final outcome: a load failure, or the annotate stage's result
    outputs: dict = field(default_factory=dict)  # stage -> (T, H, W, 3) pointmaps / (T, O, 4) boxes
    errors: dict = field(default_factory=dict)  # stage -> the exception the model raised on this clip
    true_scale: float | None = None  # the estimator's known scale (ground-truth-like estimators)


def _dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _portable(e: BaseException) -> BaseException:
    """The exception itself when it survives pickling (the skip reason then names its type and message
    as in the local runner), else a RuntimeError carrying both."""
    try:
        pickle.loads(_dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


class _Given:
    """A learnt model's output for one clip, replayed where `process_clip` asks for it.

    Has `estimate_clip` / `detect_clip` (the dispatch of `estimators.estimate_clip` / `detect_clip`), which
    return the stored array or raise the stored exception, and `true_scale` when the estimator had one.
    """

    def __init__(self, state: _ClipState, stage: str) -> None:
        self._out, self._err = state.outputs.get(stage), state.errors.get(stage)
        if stage == "estimate" and (state.true_scale is not None or "true_scale" in state.errors):
            self._scale, self._scale_err = state.true_scale, state.errors.get("true_scale")
            self.true_scale = self._true_scale

    def _true_scale(self, clip_id: str) -> float:
        if self._scale_err is not None:
            raise self._scale_err
        return self._scale

    def _replay(self, clip: Clip) -> np.ndarray:
        if self._err is not None:
            raise self._err
        if self._out is None:
            raise RuntimeError(f"clip: {clip.clip_id} reached the annotate stage without a model output")
        return self._out

    estimate_clip = _replay
    detect_clip = _replay


class _Ledger:
    """(Ray actor) attempts per (clip position, stage): names the stage of a clip whose worker keeps dying."""

    def __init__(self) -> None:
        self.attempts: dict[tuple[int, str], int] = {}

    def note(self, pos: int, stage: str) -> None:
        self.attempts[(pos, stage)] = self.attempts.get((pos, stage), 0) + 1

    def forget(self, pos: int) -> None:
        """The clip came back: its attempts no longer matter (keeps the ledger to the clips in flight)."""
        for stage in STAGES:
            self.attempts.pop((pos, stage), None)

    def last(self, pos: int) -> tuple[str, int] | None:
        """(last stage started, attempts at it), or None when the clip never started."""
        seen = [(STAGES.index(s), s, n) for (p, s), n in self.attempts.items() if p == pos]
        return max(seen)[1:] if seen else None


def _note(ledger, pos: int, stage: str) -> None:
    """Records an attempt before the work starts; waited for, since a worker that dies next sends nothing."""
    import ray

    ray.get(ledger.note.remote(pos, stage))


def _dumps_state(state: _ClipState, stage: str) -> bytes:
    """The pickled state; a clip that does not pickle (an adapter's unpicklable `meta`) becomes a skip naming
    the stage, instead of a failed Ray task that would read as a lost worker."""
    try:
        return _dumps(state)
    except Exception as e:
        failed = _ClipState(state.source, state.clip_id)
        failed.result = ClipResult(
            clip_id=state.clip_id,
            source=state.source,
            skipped=f"ray {stage} stage: the clip's data do not pickle: {type(e).__name__}: {e}",
        )
        return _dumps(failed)


def _read(row: dict, *, adapters: dict, ledger) -> dict:
    """read stage: one clip from its source adapter."""
    pos = int(row["pos"])
    _note(ledger, pos, "read")
    state = _ClipState(row["source"], row["clip_id"])
    got = load_or_skip(adapters[state.source], state.source, state.clip_id)
    if isinstance(got, ClipResult):
        state.result = got
    else:
        state.clip = got
    return {"pos": pos, "state": _dumps_state(state, "read")}


def _annotate(row: dict, *, cfg: BuildConfig, pipeline, estimator, detector, ledger) -> dict:
    """annotate stage: geometry, calibration and samples of one clip → its ClipResult.

    estimator / detector: the model object when it runs here (ground truth), None when an actor pool ran it.
    """
    pos = int(row["pos"])
    _note(ledger, pos, "annotate")
    state: _ClipState = pickle.loads(row["state"])
    if state.result is None:
        est = estimator if estimator is not None else _Given(state, "estimate")
        det = detector if detector is not None else _Given(state, "detect")
        state.result = annotate_or_skip(state.clip, est, det, pipeline, cfg.seed)
    try:
        out = _dumps(state.result)
    except Exception as e:  # a row value that does not pickle: a skip naming the stage, not a "lost worker"
        why = f"ray annotate stage: the clip's rows do not pickle: {type(e).__name__}: {e}"
        out = _dumps(ClipResult(clip_id=state.clip_id, source=state.source, skipped=why))
    return {"pos": pos, "result": out}


def _run_model(stage: str, model, clips: list[Clip]) -> list[tuple[np.ndarray | None, BaseException | None]]:
    """(output, error) per clip. A `estimate_batch` / `detect_batch` method takes all clips at once (the
    place to batch frames across clips); when it fails, clips are redone one by one to find the bad one."""
    one = estimate_clip if stage == "estimate" else detect_clip
    batched = getattr(model, f"{stage}_batch", None)
    if batched is not None and len(clips) > 1:
        try:
            outs = list(batched(clips))
            if len(outs) != len(clips):
                raise ValueError(f"{stage}_batch: returned {len(outs)} outputs for {len(clips)} clips")
            return [
                (one(_Given(_ClipState("", c.clip_id, outputs={stage: o}), stage), c), None)
                for c, o in zip(clips, outs)
            ]
        except Exception:
            pass  # redo one by one below: the error then belongs to one clip
    res = []
    for c in clips:
        try:
            res.append((one(model, c), None))
        except Exception as e:  # recorded, raised later in process_clip where the local runner raises it
            res.append((None, _portable(e)))
    return res


class _ModelStage:
    """Actor of the model pool: builds (or receives) the learnt estimator and/or detector once, then runs
    them on batches of `batch_clips` clips. One pool for both models: each actor holds a CPU (or a GPU), and
    two pools on a small cluster could hold every CPU while the read tasks that feed them wait."""

    def __init__(self, cfg: BuildConfig, models: dict, ledger) -> None:
        """models: stage ("estimate" / "detect") -> the model object, or None to build it from cfg here."""
        from dataclasses import replace

        # Ray gives the actor its GPU as CUDA_VISIBLE_DEVICES: inside it, the device is always "cuda"
        if cfg.device.startswith("cuda"):
            cfg = replace(cfg, device="cuda")
        make = {"estimate": make_estimator, "detect": make_detector}
        self.models = {st: m if m is not None else make[st](cfg) for st, m in models.items()}
        self.ledger = ledger

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        states: list[_ClipState] = [pickle.loads(b) for b in batch["state"]]
        todo = [s for s in states if s.result is None and s.clip.has_frames]
        for stage, model in self.models.items():
            for p in batch["pos"]:
                _note(self.ledger, int(p), stage)
            for s, (out, err) in zip(todo, _run_model(stage, model, [s.clip for s in todo])):
                if err is not None:
                    s.errors[stage] = err
                else:
                    s.outputs[stage] = out
                if stage == "estimate" and hasattr(model, "true_scale"):
                    try:
                        s.true_scale = float(model.true_scale(s.clip_id))
                    except Exception as e:  # raised in process_clip, as the local runner raises it
                        s.errors["true_scale"] = _portable(e)
        out = np.array([_dumps_state(s, "models") for s in states], dtype=object)
        return {"pos": np.asarray(batch["pos"]), "state": out}


def _inline(obj) -> bool:
    """Ground-truth models hold no weights and run inside the annotate task; anything else gets the pool."""
    return isinstance(obj, (GroundTruthDepthEstimator, GroundTruthBoxDetector))


def _plan(cfg: BuildConfig, estimator, detector) -> tuple[object, object, dict]:
    """(estimator run in the annotate task or None, detector likewise, {stage: model or None} of the model
    pool). Ground truth runs inline; a learnt model (None: the config's, built in each actor) gets the pool."""
    inline, pool = {}, {}
    for stage, obj, gt, make in (
        ("estimate", estimator, cfg.estimator == "gt-depth", make_estimator),
        ("detect", detector, cfg.detector == "gt-boxes", make_detector),
    ):
        if obj is None and gt:
            obj = make(cfg)
        if obj is not None and _inline(obj):
            inline[stage] = obj
        else:
            pool[stage] = obj
    return inline.get("estimate"), inline.get("detect"), pool


@contextmanager
def _ray_session(cfg: BuildConfig, engine: RayEngineConfig, num_cpus: int):
    """Joins the Ray instance of this process, the cluster at cfg.ray_address, or starts a private one of
    `num_cpus` CPUs."""
    ray = require("ray", "ray")
    require("ray.data", "ray")
    started = False
    if not ray.is_initialized():
        kw = dict(include_dashboard=False, logging_level=logging.WARNING if engine.quiet else logging.INFO)
        if cfg.ray_address is None:
            kw.update(num_cpus=num_cpus, object_store_memory=engine.object_store_memory)
        else:
            kw.update(address=cfg.ray_address)
        try:
            ray.init(**kw)
        except ConnectionError as e:
            raise ConnectionError(
                f"ray_address: no Ray cluster at {cfg.ray_address!r} ({e}); start one with `ray start --head`"
            ) from e
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


@contextmanager
def ray_results(
    cfg: BuildConfig, work: list[tuple[str, str]], init: tuple, engine: RayEngineConfig | None = None
) -> Iterator[Iterator[ClipResult]]:
    """The Ray engine: the `ClipResult`s of `work` ((source name, clip id) pairs), in order, for build.py.

    init: build.py's (cfg, adapters, estimator, detector, pipeline); estimator / detector None = the
    config's own, built once per actor (learnt) or per task (ground truth). Injected objects must pickle.
    A private Ray instance gets num_workers CPUs, plus one for the model pool when there is one.
    engine: the engine's knobs; None reads the module's DEFAULT at call time (`build` passes none).
    """
    engine = engine or DEFAULT
    _, adapters, estimator, detector, pipeline = init
    est, det, pool = _plan(cfg, estimator, detector)
    with _ray_session(cfg, engine, cfg.num_workers + (1 if pool else 0)) as ray:
        if not work:
            yield iter(())
            return
        import ray.data

        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.max_errored_blocks)
        ctx.execution_options.preserve_order = True  # results in clip order: the driver writes shard by shard
        ctx.max_errored_blocks = -1  # a block = a clip; one lost for good becomes a "worker lost" skip
        if engine.quiet:
            ctx.enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        ledger = ray.remote(num_cpus=0)(_Ledger).remote()
        results = _stream(ray, cfg, engine, work, adapters, (est, det, pool), pipeline, ledger)
        try:
            yield results
        finally:
            results.close()  # stops Ray Data's executor while Ray is still up
            ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.max_errored_blocks = saved
            ray.kill(ledger)


def _pool_size(ray, cfg: BuildConfig) -> tuple[int, int]:
    """(actors, GPUs per actor) of the model pool: at most num_workers actors, one GPU each on a cuda device,
    and on CPU at most the cluster's CPUs - 1, so that the read and annotate tasks always keep a CPU."""
    res = ray.cluster_resources()
    if cfg.device.startswith("cuda"):
        gpus = int(res.get("GPU", 0))
        if gpus < 1:
            raise ValueError(
                f"device: {cfg.device!r} but the Ray cluster has no GPU ({res}); use --device cpu"
            )
        return min(cfg.num_workers, gpus), 1
    cpus = int(res.get("CPU", 0))
    if cpus < 2:
        raise ValueError(
            f"num_workers: a learnt model's actor and the CPU tasks need >= 2 CPUs; the Ray cluster has {cpus}"
        )
    return min(cfg.num_workers, cpus - 1), 0


def _stream(ray, cfg, engine, work, adapters, models, pipeline, ledger) -> Iterator[ClipResult]:
    est, det, pool = models
    n = cfg.num_workers
    items = [{"pos": j, "source": s, "clip_id": c} for j, (s, c) in enumerate(work)]
    # one block per clip (by default): a task reads one clip, and the stages stream clip by clip
    ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // engine.clips_per_block))
    task = dict(num_cpus=1, compute=ray.data.TaskPoolStrategy(size=n), max_retries=engine.max_retries)
    with warnings.catch_warnings():
        # max_retries / max_task_retries (re-runs after a worker died) have no named parameter in Ray 2.60;
        # Ray Data's default is -1, retry forever: a clip that always kills its worker would hang the build
        warnings.filterwarnings(
            "ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning
        )
        ds = ds.map(_read, fn_kwargs=dict(adapters=adapters, ledger=ledger), **task)
        if pool:
            actors, gpus = _pool_size(ray, cfg)
            ds = ds.map_batches(
                _ModelStage,
                fn_constructor_kwargs=dict(cfg=cfg, models=pool, ledger=ledger),
                batch_size=engine.batch_clips,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                num_cpus=1,
                num_gpus=gpus,
                max_restarts=-1,
                max_task_retries=engine.max_retries,
            )
        ds = ds.map(
            _annotate,
            fn_kwargs=dict(cfg=cfg, pipeline=pipeline, estimator=est, detector=det, ledger=ledger),
            **task,
        )
    expected = 0
    for row in ds.iter_rows():
        pos = int(row["pos"])
        while expected < pos:  # clips between the last result and this one were lost for good
            yield _lost(ray, ledger, work, expected, engine)
            expected += 1
        ledger.forget.remote(pos)
        yield pickle.loads(row["result"])
        expected = pos + 1
    while expected < len(work):
        yield _lost(ray, ledger, work, expected, engine)
        expected += 1


def _lost(ray, ledger, work, pos: int, engine: RayEngineConfig) -> ClipResult:
    source, clip_id = work[pos]
    last = ray.get(ledger.last.remote(pos))
    where = f"in stage {last[0]!r} after {last[1]} attempts" if last else "before any stage started"
    return ClipResult(
        clip_id=clip_id,
        source=source,
        skipped=f"worker lost: the process running clip {clip_id} died {where} (killed or out of memory; "
        f"max_retries {engine.max_retries}; the Ray logs of the session say which)",
    )
