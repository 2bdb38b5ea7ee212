"""The synth render cache (`SynthSource(cache_dir=...)`): rendering a clip vs writing it vs reading it back.

    python benchmarks/bench_render_cache.py            # 40 clips, the main job's size (128 px, 3 frames)
    python benchmarks/bench_render_cache.py --clips 20

The main job renders its synth clips in the build and, before the cache, rendered the train clips again for
the stand-ins (depth, segmentation) and the probe. Three passes over the same clips in one process, one run:
rendering without a cache (the baseline), rendering and writing the cache (what the build now pays), and
loading from the cache (what phases 3, 4 and 9 now pay). Ratios are per clip against the baseline.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=40)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--frames", type=int, default=3)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from hand3d_dataset.sources.synth import SynthSource

    folder = tempfile.mkdtemp(prefix="render_cache_")
    try:
        rows = {}
        for name, cache in (
            ("render (no cache)", None),
            ("render + write cache", folder),
            ("read cache", folder),
        ):
            src = SynthSource(
                num_clips=a.clips + 1, seed=11, image_size=a.image_size, num_frames=a.frames, cache_dir=cache
            )
            ids = src.clip_ids()
            if cache is None:
                src.load_clip(ids[-1])  # GL context and shaders: once per process, not per clip
            t0 = time.perf_counter()
            for clip_id in ids[: a.clips]:
                src.load_clip(clip_id)
            rows[name] = (time.perf_counter() - t0) / a.clips * 1000
        size = sum(f.stat().st_size for f in Path(folder).rglob("*.npz")) / a.clips / 1e6
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    base = rows["render (no cache)"]
    print(f"\n{a.clips} clips, {a.image_size} px, {a.frames} frames; cache file {size:.2f} MB per clip")
    print(f"{'pass':<24}{'ms/clip':>10}{'x render':>10}")
    for name, ms in rows.items():
        print(f"{name:<24}{ms:>10.1f}{ms / base:>9.2f}x")


if __name__ == "__main__":
    main()
