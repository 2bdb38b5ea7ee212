"""Hand3D build throughput: clips/min of render + annotate + write, and where the time goes.

    python benchmarks/bench_build.py              # 24 clips per setting
    python benchmarks/bench_build.py --clips 48

Table 1 runs the real runner (`hand3d_dataset.build.build`, synth source, ground-truth depth with an
unknown scale, ground-truth boxes, 8 frames per clip) at 224 and 448 px with 1 and 2 workers, each
in a fresh output folder, and reports clips/min with the ratio against 1 worker at 224 px measured
in the same run. Target: ≥ 100 clips/min at 224 px on a 2-core machine.

Table 2 splits one process's time per clip into stages: render (MuJoCo), point cloud (estimator),
boxes (detector), annotate + samples (geometry, QA/action builders, PNG encoding).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict

os.environ.setdefault("MUJOCO_GL", "egl")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from hand3d_dataset.build import BuildConfig, build, make_models  # noqa: E402
from hand3d_dataset.pipeline import PipelineConfig, process_clip  # noqa: E402
from hand3d_dataset.sources import get_source  # noqa: E402


class _Timed:
    """Delegates to `inner`, adding the wall time of every method call to `totals[stage]`."""

    def __init__(self, inner, stage: str, totals: dict) -> None:
        self._inner, self._stage, self._totals = inner, stage, totals

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._totals[self._stage] += time.perf_counter() - t0

        return timed


def runner_rate(image_size: int, workers: int, clips: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        cfg = BuildConfig(
            source="synth",
            num_clips=clips,
            out=out,
            num_workers=workers,
            image_size=image_size,
            frames=8,
            progress=False,
        )
        t0 = time.perf_counter()
        build(cfg)
        return clips / (time.perf_counter() - t0) * 60


def stage_shares(image_size: int, clips: int) -> dict[str, float]:
    cfg = BuildConfig(source="synth", num_clips=clips, image_size=image_size, frames=8)
    totals: dict[str, float] = defaultdict(float)
    src = get_source("synth", num_clips=clips, seed=0, image_size=image_size, num_frames=8)
    estimator, detector = make_models(cfg)
    estimator, detector = _Timed(estimator, "point cloud", totals), _Timed(detector, "boxes", totals)
    src.load_clip(src.clip_ids()[0])  # warm-up: GL context and shaders
    for cid in src.clip_ids():
        t0 = time.perf_counter()
        clip = src.load_clip(cid)
        t1 = time.perf_counter()
        process_clip(clip, estimator, detector, PipelineConfig(object_source="estimate"), seed=0)
        t2 = time.perf_counter()
        totals["render"] += t1 - t0
        totals["annotate + samples"] += t2 - t1
    totals["annotate + samples"] -= totals["point cloud"] + totals["boxes"]
    return dict(totals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=24, help="clips per setting")
    args = ap.parse_args()
    console = Console(width=120)

    table = Table(title=f"bench_build: runner, synth, 8 frames/clip, {args.clips} clips per row")
    for col in ("image", "workers", "clips/min", "vs 224 px × 1 worker", "target"):
        table.add_column(col)
    base = None
    for size in (224, 448):
        for workers in (1, 2):
            rate = runner_rate(size, workers, args.clips)
            base = base or rate
            target = "≥ 100 clips/min" if size == 224 else ""
            table.add_row(f"{size} px", str(workers), f"{rate:.0f}", f"{rate / base:.2f}×", target)
    console.print(table)

    table = Table(title="bench_build: share of one process's time per stage")
    for col in ("image", "stage", "ms/clip", "share"):
        table.add_column(col)
    for size in (224, 448):
        totals = stage_shares(size, max(8, args.clips // 2))
        n, total = max(8, args.clips // 2), sum(totals.values())
        for stage, sec in sorted(totals.items(), key=lambda kv: -kv[1]):
            table.add_row(f"{size} px", stage, f"{1000 * sec / n:.1f}", f"{100 * sec / total:.0f} %")
    console.print(table)


if __name__ == "__main__":
    main()
