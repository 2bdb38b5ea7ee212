"""`hand3d build --engine ray` against the local runner: throughput, memory, and per-stage costs for scaling.

    python benchmarks/bench_ray_build.py                       # 48 clips at 224 px; memory at 100 and 500 clips
    python benchmarks/bench_ray_build.py --clips 24 --mem-clips 50 100

Table 1: clips/min on synth at 224 px (8 frames, ground-truth depth and boxes), each build in a fresh folder:
the local runner with 1 and 2 workers, and the Ray engine on a private local instance of 1 and 2 CPUs. The
Ray instance is started before the clock (its start-up is its own column: a cluster is started once, not
per build); the first build on it includes starting the worker processes and their imports, a second build
on the same instance ("2nd") does not. Ratios are times against the local runner with 1 worker measured in
the same run; the issue's bound is Ray 1 worker <= 1.3x. One row runs Ray with 4 clips per block
(`RayEngineConfig.clips_per_block`): a quarter of the tasks to schedule. Ray's "1 worker" is one CPU for the tasks; its
driver (which writes the shards) is a second process, as in any Ray job.

Table 2: peak resident memory (VmHWM) of the driver and of the largest Ray worker process while building
100 and 500 clips (128 px, 4 frames, 2 workers), each in a fresh interpreter: flat in the number of clips
when nothing accumulates (the driver holds one shard; the workers one clip each).

Table 3: per-stage cost of one process per clip at 224 px (render/read, point cloud, boxes, geometry +
calibration, samples + PNGs) and from it the clips/hour of N nodes: the CPU stages divide over the CPUs;
the learnt models' GPU cost per frame cannot be measured on this CPU-only machine and is a parameter
(--gpu-ms-per-frame, e.g. from the models' own benchmarks), so the note says which stage limits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import hand3d_dataset.pipeline as pipeline_mod  # noqa: E402
from hand3d_dataset.build import BuildConfig, _write_shard, build, make_models  # noqa: E402
from hand3d_dataset.pipeline import PipelineConfig, process_clip  # noqa: E402
from hand3d_dataset.sources import get_source  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_build import _Timed  # noqa: E402  (the per-method timer of the local runner's benchmark)


def _rate(
    workers: int, engine: str, clips: int, size: int, frames: int, clips_per_block: int = 1
) -> tuple[float, float, float]:
    """(clips/min of the build, clips/min of a second build on the same Ray instance, seconds to start Ray;
    the last two 0 for the local runner)."""
    import ray

    from hand3d_dataset import build_ray

    build_ray.DEFAULT = build_ray.RayEngineConfig(clips_per_block=clips_per_block)

    def one() -> float:
        with tempfile.TemporaryDirectory() as out:
            cfg = BuildConfig(
                source="synth", num_clips=clips, out=out, num_workers=workers, image_size=size, frames=frames,
                progress=False, engine=engine,
            )  # fmt: skip
            t0 = time.perf_counter()
            build(cfg)
            return clips / (time.perf_counter() - t0) * 60

    if engine == "local":
        return one(), 0.0, 0.0
    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING")
    startup = time.perf_counter() - t0
    try:
        return one(), one(), startup  # cold: worker processes start and import; warm: they are up
    finally:
        ray.shutdown()


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _memory_child(clips: int) -> None:
    """Runs in a fresh interpreter: one Ray build, then prints the driver's and the workers' peak RSS."""
    import psutil
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        build(
            BuildConfig(
                source="synth", num_clips=clips, out=out, num_workers=2, image_size=128, frames=4,
                progress=False, engine="ray",
            )
        )  # fmt: skip
        elapsed = time.perf_counter() - t0
    workers = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline()[0].startswith("ray::"):  # Ray renames its worker processes ray::<task or actor>
                workers.append(p.pid)
        except psutil.Error:  # a worker that exited meanwhile
            pass
    worker_peaks = sorted((_vm_hwm_mib(pid) for pid in workers), reverse=True)
    print(json.dumps({"driver": _vm_hwm_mib(os.getpid()), "workers": worker_peaks, "elapsed": elapsed}))
    ray.shutdown()


def _memory(clips: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(clips)], capture_output=True, text=True, env=env
    )
    if res.returncode != 0:
        raise RuntimeError(f"memory run of {clips} clips failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _stage_costs(clips: int, size: int, frames: int) -> dict[str, float]:
    """Seconds per clip of each stage in one process (ground-truth models)."""
    totals: dict[str, float] = defaultdict(float)
    src = get_source("synth", num_clips=clips, seed=0, image_size=size, num_frames=frames)
    est, det = make_models(BuildConfig(source="synth", image_size=size, frames=frames))
    est, det = _Timed(est, "point cloud", totals), _Timed(det, "boxes", totals)
    annotate = pipeline_mod.annotate_clip

    def timed_annotate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return annotate(*a, **kw)
        finally:
            totals["geometry + calibration"] += time.perf_counter() - t0

    src.load_clip(src.clip_ids()[0])  # warm-up: GL context and shaders
    pipeline_mod.annotate_clip = timed_annotate
    results = []
    try:
        for cid in src.clip_ids():
            t0 = time.perf_counter()
            clip = src.load_clip(cid)
            t1 = time.perf_counter()
            results.append(process_clip(clip, est, det, PipelineConfig(), seed=0))
            totals["render / read"] += t1 - t0
            totals["samples + PNGs"] += time.perf_counter() - t1
    finally:
        pipeline_mod.annotate_clip = annotate
    with tempfile.TemporaryDirectory() as out:  # the driver's serial part: one shard of these clips
        t0 = time.perf_counter()
        _write_shard(Path(out), 0, results, {r.clip_id: False for r in results})
        totals["write (driver)"] += time.perf_counter() - t0
    totals["samples + PNGs"] -= totals["geometry + calibration"]
    totals["geometry + calibration"] -= totals["point cloud"] + totals["boxes"]
    return {k: v / clips for k, v in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=48, help="clips per throughput setting")
    ap.add_argument(
        "--mem-clips", type=int, nargs="+", default=[100, 500], help="clip counts of the memory runs"
    )
    ap.add_argument("--gpu-ms-per-frame", type=float, default=40.0,
                    help="assumed GPU time per frame of estimator + detector, for the scaling note")  # fmt: skip
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        return _memory_child(args.memory_child)
    console = Console(width=130)

    size, frames = 224, 8
    table = Table(title=f"bench_ray_build: synth {size} px, {frames} frames, {args.clips} clips per row")
    cols = (
        "engine",
        "workers",
        "clips/min",
        "time vs local × 1",
        "2nd build clips/min",
        "2nd time vs local × 1",
    )
    for col in (*cols, "Ray start-up (s)"):
        table.add_column(col)
    base = None
    rates = {}
    for engine, workers, per_block in (
        ("local", 1, 1),
        ("ray", 1, 1),
        ("ray", 1, 4),
        ("local", 2, 1),
        ("ray", 2, 1),
    ):
        rate, warm, startup = _rate(workers, engine, args.clips, size, frames, per_block)
        rates[(engine, workers, per_block)] = (rate, warm)
        base = base or rate
        table.add_row(
            engine + (f", {per_block} clips/block" if per_block > 1 else ""), str(workers), f"{rate:.1f}", f"{base / rate:.2f}×", f"{warm:.1f}" if warm else "",
            f"{base / warm:.2f}×" if warm else "", f"{startup:.1f}" if startup else "",
        )  # fmt: skip
    console.print(table)
    for per_block in (1, 4):
        cold, warm = (rates[("local", 1, 1)][0] / r for r in rates[("ray", 1, per_block)])
        console.print(
            f"Ray overhead with 1 worker, {per_block} clip(s) per block: {cold:.2f}× the local runner's time on a "
            f"fresh instance (workers start and import), {warm:.2f}× on the second build (bound 1.3×)"
        )

    table = Table(
        title="bench_ray_build: peak resident memory (VmHWM), Ray engine, 2 workers, 128 px, 4 frames"
    )
    for col in ("clips", "driver MiB", "largest worker MiB", "workers", "build s"):
        table.add_column(col)
    for n in args.mem_clips:
        m = _memory(n)
        table.add_row(str(n), f"{m['driver']:.0f}", f"{m['workers'][0]:.0f}" if m["workers"] else "?",
                      str(len(m["workers"])), f"{m['elapsed']:.0f}")  # fmt: skip
    console.print(table)

    costs = _stage_costs(max(8, args.clips // 4), size, frames)
    cpu = sum(costs.values())
    table = Table(title=f"bench_ray_build: per-stage cost per clip, one process, {size} px, {frames} frames")
    for col in ("stage", "ms/clip", "share", "runs on"):
        table.add_column(col)
    where = {
        "point cloud": "GPU actor (learnt) / CPU (gt)",
        "boxes": "GPU actor (learnt) / CPU (gt)",
        "write (driver)": "driver, serial",
    }
    for stage, sec in sorted(costs.items(), key=lambda kv: -kv[1]):
        table.add_row(stage, f"{1000 * sec:.1f}", f"{100 * sec / cpu:.0f} %", where.get(stage, "CPU task"))
    console.print(table)
    cpu_only = cpu - costs["point cloud"] - costs["boxes"] - costs["write (driver)"]
    gpu = args.gpu_ms_per_frame * frames / 1000
    console.print(
        f"Scaling: CPU tasks {1000 * cpu_only:.0f} ms/clip -> {3600 / cpu_only:,.0f} clips/hour per CPU; learnt "
        f"models at an assumed {args.gpu_ms_per_frame:.0f} ms/frame (not measured here) -> {3600 / gpu:,.0f} "
        f"clips/hour per GPU; the driver's writer {3600 / costs['write (driver)']:,.0f} clips/hour in all. "
        f"N nodes of C CPUs and G GPUs: min(N*C*{3600 / cpu_only:,.0f}, N*G*{3600 / gpu:,.0f}, "
        f"{3600 / costs['write (driver)']:,.0f}) clips/hour; the GPUs limit when C/G > {cpu_only / gpu:.1f}."
    )


if __name__ == "__main__":
    main()
