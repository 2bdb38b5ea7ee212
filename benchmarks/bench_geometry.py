"""Geometry-core throughput on one core, every figure next to a baseline measured in the same run.

    python benchmarks/bench_geometry.py            # or: make bench
    python benchmarks/bench_geometry.py --quick    # fewer repetitions

Rows:
1. The per-frame annotation chain of paper §3.2.1 — 2 hands × 21 joints world → camera → project →
   visibility → scale calibration against a 448×448 pointmap → 3D localisation of 3 boxes — against a
   naive version of the same chain that validates the whole pointmap and takes a plain box median.
   Target: ≥ 500 frames/s.
2. Motion tokenizer encode and decode, waypoints/s, against a per-waypoint Python loop.
   Target: ≥ 1 M waypoints/s.
3. MANO forward per frame at batch 1 vs batch 1024 (a random model with the official shapes).
   Target: batching ≥ 10× cheaper per frame.
"""

from __future__ import annotations

import os

# One core, as the targets are stated: set before numpy/torch start their thread pools.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from hand3d_dataset.calibration import calibrate_scale, localize_object  # noqa: E402
from hand3d_dataset.cameras import backproject_depth, intrinsics_matrix, visibility, world_to_camera  # noqa: E402
from hand3d_dataset.mano import ManoLayer, ManoModelData  # noqa: E402
from processing_vipa.motion_tokenizer import MotionTokenizer  # noqa: E402

torch.set_num_threads(1)


def _best_rate(fn, items_per_call: int, min_time: float) -> float:
    """Items per second of the fastest of several timed repetitions of `fn` (each ≥ min_time/5 s)."""
    fn()  # warm-up
    n, best = 1, float("inf")
    while True:  # calibrate the inner repeat count so one timing lasts long enough
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time / 5:
            break
        n *= 2
    best = dt / n
    for _ in range(4):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return items_per_call / best


# ------------------------------------------------------------------------------ 1. annotation chain


def _scene(seed: int = 0):
    rng = np.random.default_rng(seed)
    H = W = 448
    K = intrinsics_matrix((400.0, 400.0), (223.5, 223.5))
    depth = 1.2 + 0.05 * rng.standard_normal((H, W))
    depth[150:250, 100:200] = 0.8  # three objects in front of the background
    depth[260:340, 250:330] = 0.9
    depth[100:180, 300:400] = 0.7
    pointmap = (backproject_depth(depth, K) / 2.5).astype(np.float32)  # unknown scale
    joints_w = rng.uniform([-0.15, -0.15, 0.6], [0.15, 0.15, 0.9], size=(2, 21, 3))
    R, t = np.eye(3), np.zeros(3)
    boxes = [(100, 150, 200, 250), (250, 260, 330, 340), (300, 100, 400, 180)]
    return K, (H, W), pointmap, joints_w, R, t, boxes


def chain_frame(K, hw, pointmap, joints_w, R, t, boxes):
    joints_c = world_to_camera(joints_w, R, t)
    _, vis = visibility(joints_c, K, hw)
    res = calibrate_scale(joints_c, pointmap, K, joint_valid=vis)
    return [localize_object(b, pointmap, scale=res.scale or 1.0) for b in boxes]


def naive_chain_frame(K, hw, pointmap, joints_w, R, t, boxes):
    """The straightforward version: validates the whole map and medians the raw box."""
    joints_c = joints_w @ R.T + t
    uv = joints_c[..., :2] / joints_c[..., 2:] * K[[0, 1], [0, 1]] + K[:2, 2]
    finite = np.isfinite(pointmap).all(-1) & (pointmap[..., 2] > 0)
    r, c = np.round(uv[..., 1]).astype(int).ravel(), np.round(uv[..., 0]).astype(int).ravel()
    ok = (r >= 0) & (r < hw[0]) & (c >= 0) & (c < hw[1])
    ok[ok] &= finite[r[ok], c[ok]]
    s = np.median(joints_c[..., 2].ravel()[ok] / pointmap[r[ok], c[ok], 2])
    out = []
    for x0, y0, x1, y1 in boxes:
        crop = pointmap[y0:y1, x0:x1][finite[y0:y1, x0:x1]]
        out.append(s * np.median(crop, axis=0))
    return out


# ------------------------------------------------------------------------------ 2. tokenizer


def naive_encode(xyz: np.ndarray, K: int = 1024) -> list[int]:
    lo, hi = (-0.5, -0.5, 0.0), (0.5, 0.5, 1.0)
    ids = []
    for p in xyz.tolist():
        for a in range(3):
            v = min(max(p[a], lo[a]), hi[a])
            ids.append(min(int((v - lo[a]) / (hi[a] - lo[a]) * K), K - 1))
    return ids


# ------------------------------------------------------------------------------ 3. MANO


def random_mano(seed: int = 0) -> ManoModelData:
    """A MANO-shaped model with random arrays (the official files cannot be downloaded here)."""
    rng = np.random.default_rng(seed)
    weights = rng.random((778, 16))
    return ManoModelData(
        side="right",
        v_template=rng.normal(0, 0.05, (778, 3)),
        shapedirs=rng.normal(0, 1e-3, (778, 3, 10)),
        posedirs=rng.normal(0, 1e-3, (778, 3, 135)),
        J_regressor=rng.dirichlet(np.ones(778), 16),
        parents=(-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14),
        weights=weights / weights.sum(1, keepdims=True),
        hands_components=np.linalg.qr(rng.normal(size=(45, 45)))[0],
        hands_mean=rng.normal(0, 0.1, 45),
        faces=rng.integers(0, 778, (1538, 3)),
    )


def mano_rate(layer: ManoLayer, batch: int) -> float:
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(batch, n, generator=g) * 0.3 for n in (3, 45, 10, 3)]

    @torch.inference_mode()
    def run():
        layer(*args)

    return _best_rate(run, batch, min_time=1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter timings")
    args = ap.parse_args()
    min_time = 0.5 if args.quick else 2.0

    scene = _scene()
    table = Table(title="bench_geometry (one core; ratios measured in this run)")
    for col in ("what", "ours", "baseline", "ratio", "target"):
        table.add_column(col)

    ours = _best_rate(lambda: chain_frame(*scene), 1, min_time)
    naive = _best_rate(lambda: naive_chain_frame(*scene), 1, min_time)
    table.add_row(
        "chain: project→visibility→calibration→3 boxes (frames/s)",
        f"{ours:,.0f}",
        f"{naive:,.0f} naive",
        f"{ours / naive:.2f}×",
        "≥ 500 frames/s",
    )

    tok = MotionTokenizer()
    xyz = np.random.default_rng(0).uniform([-0.6, -0.6, -0.1], [0.6, 0.6, 1.1], size=(100_000, 3))
    enc = _best_rate(lambda: tok.encode_ids(xyz), len(xyz), min_time)
    ids, _ = tok.encode_ids(xyz)
    dec = _best_rate(lambda: tok.decode_ids(ids), len(xyz), min_time)
    small = xyz[:5000]
    loop = _best_rate(lambda: naive_encode(small), len(small), min_time)
    table.add_row(
        "tokenizer encode (waypoints/s)",
        f"{enc:,.0f}",
        f"{loop:,.0f} py loop",
        f"{enc / loop:.0f}×",
        "≥ 1 M/s",
    )
    table.add_row("tokenizer decode (waypoints/s)", f"{dec:,.0f}", "", "", "≥ 1 M/s")

    layer = ManoLayer(random_mano(), flat_hand_mean=False).float()
    r1 = mano_rate(layer, 1)
    r1024 = mano_rate(layer, 1024)
    table.add_row(
        "MANO forward (frames/s), batch 1024 vs batch 1",
        f"{r1024:,.0f}",
        f"{r1:,.0f} at batch 1",
        f"{r1024 / r1:.1f}× cheaper per frame",
        "≥ 10×",
    )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
