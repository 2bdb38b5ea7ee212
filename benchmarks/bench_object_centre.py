"""Object positions in Hand3D rows: visible-surface centre against centre estimate (issue 17 §1b).

    python benchmarks/bench_object_centre.py                      # 150 clips of seeds 1001-1003, 128 px
    python benchmarks/bench_object_centre.py --clips 60 --seeds 1001 --image-size 256

Renders `synth` clips of seeds no test uses (tests use 0-20) and annotates each clip twice with the
real pipeline (ground-truth depth with a hidden per-clip scale, ground-truth boxes), once per
`LocalizationConfig.estimate`. For every `spatial_relationship` row it recovers the located object
(palm centre ± the row's `vector_m`; the palm comes from the same ground-truth joints as the
pipeline's, so the hand adds no error) and compares it with the object's rendered centre
(`ObjectTrack.position3d`, world → camera of the row's last frame):

- axis agreement: the row's direction labels against `language.direction_labels` of the same
  displacement computed with the rendered centre, over all three axes (None = "no label" counts as a
  label), in % of axes;
- position error: |located − rendered centre|, median and 90th percentile, cm;
- distance error: |row's distance − true hand–centre distance|, median, cm.

Goal (issue 17 §1b): centre ≥ 97 % of axes, median position error ≤ 1.5 cm. The surface row is the
baseline measured in the same run on the same clips.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from hand3d_dataset.calibration import ESTIMATES, LocalizationConfig  # noqa: E402
from hand3d_dataset.estimators import GroundTruthBoxDetector, GroundTruthDepthEstimator  # noqa: E402
from hand3d_dataset.language import direction_labels  # noqa: E402
from hand3d_dataset.pipeline import PipelineConfig, process_clip  # noqa: E402
from hand3d_dataset.samples_visual import PALM_JOINTS  # noqa: E402
from hand3d_dataset.sources import get_source  # noqa: E402


def row_errors(row: dict, clip) -> tuple[int, int, float, float]:
    """(axes agreeing, axes, position error m, distance error m) of one spatial_relationship row."""
    tgt = row["target"]
    f = tgt["frame_indices"][-1]
    R, t = clip.R[f], clip.t[f]
    palm = R @ clip.hands[tgt["hand"]].joints3d[f][list(PALM_JOINTS)].mean(0) + t
    centre = R @ clip.object(tgt["object"]).position3d[f] + t
    v = np.asarray(tgt["vector_m"])
    forward = tgt["relation"] == "object_from_hand"
    located = palm + v if forward else palm - v
    v_true = centre - palm if forward else palm - centre
    truth = direction_labels(v_true)
    agree = sum(tgt["labels"][ax] == truth[ax] for ax in "xyz")
    return agree, 3, float(np.linalg.norm(located - centre)), abs(tgt["distance_m"] - np.linalg.norm(v_true))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=50, help="clips per seed (default: 50)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1001, 1002, 1003], help="synth seeds")
    ap.add_argument("--image-size", type=int, default=128, help="rendered image side (default: 128)")
    ap.add_argument("--frames", type=int, default=4, help="frames per clip (default: 4)")
    args = ap.parse_args()

    stats = {e: {"agree": 0, "axes": 0, "pos": [], "dist": [], "rows": 0, "s": 0.0} for e in ESTIMATES}
    n_clips = 0
    for seed in args.seeds:
        src = get_source(
            "synth", num_clips=args.clips, seed=seed, image_size=args.image_size, num_frames=args.frames
        )
        est, det = GroundTruthDepthEstimator(seed=seed), GroundTruthBoxDetector()
        for cid in src.clip_ids():
            clip = src.load_clip(cid)
            n_clips += 1
            for e in ESTIMATES:
                cfg = PipelineConfig(localization=LocalizationConfig(estimate=e), object_source="estimate")
                t0 = time.perf_counter()
                res = process_clip(clip, est, det, cfg, seed=seed)
                st = stats[e]
                st["s"] += time.perf_counter() - t0
                for row in res.rows_visual:
                    if row["task_type"] != "spatial_relationship":
                        continue
                    a, n, pos, dist = row_errors(row, clip)
                    st["agree"] += a
                    st["axes"] += n
                    st["pos"].append(pos)
                    st["dist"].append(dist)
                    st["rows"] += 1

    table = Table(
        title=f"Object position in spatial_relationship rows against rendered centres: {n_clips} synth clips, "
        f"seeds {args.seeds}, {args.image_size} px, {args.frames} frames"
    )
    for col in ("estimate", "rows", "axes agree", "median pos. err", "p90 pos. err", "median dist. err"):
        table.add_column(col, justify="right")
    table.add_column("annotate time vs surface", justify="right")
    for e in ESTIMATES:
        st = stats[e]
        pos, dist = 100 * np.asarray(st["pos"]), 100 * np.asarray(st["dist"])
        table.add_row(
            e,
            str(st["rows"]),
            f"{100 * st['agree'] / max(st['axes'], 1):.2f} %",
            f"{np.median(pos):.2f} cm",
            f"{np.percentile(pos, 90):.2f} cm",
            f"{np.median(dist):.2f} cm",
            f"{st['s'] / stats['surface']['s']:.2f}x",
        )
    Console().print(table)
    print("goal (issue 17 §1b): centre >= 97 % of axes, median position error <= 1.5 cm")


if __name__ == "__main__":
    main()
