"""CUT3R forward time per frame at 448 px (the InternVL tile size VIPA-VLA feeds it), per config.

Prints one table; all ratios come from the same run. `tokens` is what the fusion layer needs
(`return_heads=False`); `+heads` adds the self-view DPT and the pose head (what Hand3D needs).

Usage:

    python benchmarks/bench_spatial.py                       # tiny and small, CPU, 2 frames
    python benchmarks/bench_spatial.py --configs tiny small full --device cuda --frames 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from modeling_vipa.configuration_cut3r import Cut3rConfig
from modeling_vipa.spatial_encoder import Cut3rEncoder


def small_config() -> Cut3rConfig:
    """ViT-S/16 encoder, 6-layer 256-d decoders, 256 state tokens, narrow DPT: a mid point between tiny and
    the official 1024 x 24 / 768 x 12 model."""
    return Cut3rConfig(
        enc_embed_dim=384,
        enc_depth=12,
        enc_num_heads=6,
        ray_enc_depth=1,
        ray_enc_num_heads=6,
        dec_embed_dim=256,
        dec_depth=6,
        dec_num_heads=4,
        state_dec_num_heads=4,
        state_size=256,
        local_mem_size=64,
        dpt_layer_dims=(48, 96, 192, 384),
        dpt_feature_dim=128,
        dpt_last_dim=64,
    )


CONFIGS = {"tiny": Cut3rConfig.tiny, "small": small_config, "full": Cut3rConfig}


def time_forward(model: Cut3rEncoder, pixels: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds per call without and with heads; the two modes alternate within each repeat so that
    a load change on a shared machine hits both alike. One warm-up round first."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats + 1):
        for heads in (False, True):
            if pixels.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                model(pixels, return_heads=heads)
            if pixels.is_cuda:
                torch.cuda.synchronize()
            if i:
                times[heads].append(time.perf_counter() - start)
    return statistics.median(times[False]), statistics.median(times[True])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
    parser.add_argument("--size", type=int, default=448, help="square image side in pixels")
    parser.add_argument("--frames", type=int, default=2, help="frames per clip (batch of one clip)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    pixels = torch.rand(1, args.frames, 3, args.size, args.size, device=args.device) * 2 - 1
    rows = []
    for name in args.configs:
        model = Cut3rEncoder(CONFIGS[name]()).to(args.device).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        tokens, full = (t / args.frames for t in time_forward(model, pixels, args.repeats))
        rows.append((name, params, tokens, full))
        del model

    base = rows[0][2]
    print(
        f"CUT3R forward per frame, {args.size}x{args.size}, {args.frames} frames, {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'config':8s} {'params (M)':>11s} {'tokens ms':>10s} {'+heads ms':>10s} {'heads/tokens':>13s} "
        f"{'tokens vs ' + rows[0][0]:>16s}"
    )
    for name, params, tokens, full in rows:
        print(
            f"{name:8s} {params:11.2f} {1e3 * tokens:10.1f} {1e3 * full:10.1f} {full / tokens:13.2f} "
            f"{tokens / base:16.1f}"
        )


if __name__ == "__main__":
    main()
