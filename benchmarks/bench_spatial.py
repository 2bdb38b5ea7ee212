"""Spatial-branch benchmarks (issue 5 §5), each table's ratios measured in one run:

(1) CUT3R forward time per frame at 448 px (the InternVL tile size VIPA-VLA feeds it), per config.
    `tokens` is what the fusion layer needs (`return_heads=False`); `+heads` adds the self-view DPT and the
    pose head (what Hand3D needs).
(2) Share of VIPA-VLA's forward spent in the 3D branch (CUT3R + fusion, timed inside the forward by hooks).
(3) Stage 1 with the spatial-token cache (`training.spatial_cache`): one training step (fusion only trainable,
    forward + backward + AdamW) reading cached V_spa vs running the frozen CUT3R (target >= 2x when the 3D
    branch dominates).

VIPA configs: `tiny` (the test config, CUT3R input 48x64 as the tiny processor), `small` (bench_model's
~100 M model, CUT3R at 224x224), `small-512` (the same model, CUT3R at its real input 384x512), and `full`
(the paper's sizes, GPU only, not in the default run).

Usage:

    python benchmarks/bench_spatial.py                       # all tables, CPU, 2 frames
    python benchmarks/bench_spatial.py --configs tiny small full --device cuda --frames 4 --vipa tiny small
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from bench_model import small_config as small_vipa_config  # same folder: one definition of the small model

from modeling_vipa.configuration_cut3r import Cut3rConfig
from modeling_vipa.configuration_vipa import VipaConfig
from modeling_vipa.modeling_vipa import VipaForConditionalGeneration, set_trainable
from modeling_vipa.spatial_encoder import Cut3rEncoder
from training.spatial_cache import SpatialTokenCache


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


# VIPA config and CUT3R input (height, width) per benchmark row
VIPA_CONFIGS: dict[str, tuple[Callable[[], VipaConfig], tuple[int, int]]] = {
    "tiny": (VipaConfig.tiny, (48, 64)),
    "small": (small_vipa_config, (224, 224)),
    "small-512": (small_vipa_config, (384, 512)),
    "full": (VipaConfig, (384, 512)),  # InternVL3.5-2B + CUT3R 512-DPT: needs a GPU (--device cuda)
}


def vipa_inputs(config: VipaConfig, spatial_hw: tuple[int, int], frames: int, device: str) -> dict:
    """One stage-1 sample: `frames` frames, a 24-token question, labels on the last 8 tokens (the answer)."""
    ivl = config.internvl_config
    size = tuple(ivl.vision_config.image_size)
    ids = [1] + [ivl.image_token_id] * (ivl.image_seq_length * frames) + [2 + i % 50 for i in range(24)]
    input_ids = torch.tensor([ids], device=device)
    labels = torch.full_like(input_ids, -100)
    labels[:, -8:] = input_ids[:, -8:]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(frames, 3, *size, device=device),
        "spatial_pixel_values": torch.rand(1, frames, 3, *spatial_hw, device=device) * 2 - 1,
        "spatial_frame_mask": torch.ones(1, frames, dtype=torch.bool, device=device),
        "labels": labels,
    }


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bench_vipa(name: str, frames: int, repeats: int, device: str) -> dict[str, float]:
    """3D-branch share of the forward, and the stage-1 step with and without the spatial-token cache."""
    make_config, spatial_hw = VIPA_CONFIGS[name]
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: the full model is never materialised on the host
        model = VipaForConditionalGeneration(make_config())
    inputs = vipa_inputs(model.config, spatial_hw, frames, device)
    forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}

    # (2) time inside one forward: hooks around CUT3R and the fusion layer
    spent = {"start": 0.0, "branch": 0.0}

    def start(*_) -> None:
        _sync(device)
        spent["start"] = time.perf_counter()

    def stop(*_) -> None:
        _sync(device)
        spent["branch"] += time.perf_counter() - spent["start"]

    handles = [m.register_forward_pre_hook(start) for m in (model.spatial_encoder, model.fusion)]
    handles += [m.register_forward_hook(stop) for m in (model.spatial_encoder, model.fusion)]
    model.eval()
    shares, totals = [], []
    for i in range(repeats + 1):
        spent["branch"] = 0.0
        _sync(device)
        begin = time.perf_counter()
        with torch.no_grad():
            model(**forward_inputs)
        _sync(device)
        if i:  # the first round warms up
            totals.append(time.perf_counter() - begin)
            shares.append(spent["branch"] / totals[-1])
    for handle in handles:
        handle.remove()

    # (3) stage-1 step: fusion-only trainable, AdamW; the frozen CUT3R runs (no cache) or is read (cache)
    set_trainable(model, 1)
    model.train()
    model.spatial_encoder.eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    mask = inputs["spatial_frame_mask"]
    no_pixels = {k: v for k, v in inputs.items() if k != "spatial_pixel_values"}

    with tempfile.TemporaryDirectory() as directory:
        cache = SpatialTokenCache(directory, model.spatial_encoder)
        cache.get_or_compute(inputs["spatial_pixel_values"], mask)  # filled by an earlier epoch

        def step(cached: bool) -> None:
            if cached:
                tokens = cache.get_or_compute(inputs["spatial_pixel_values"], mask)
                loss = model(**no_pixels, spatial_tokens=tokens).loss
            else:
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(repeats + 1):
            for cached in (False, True):  # interleaved: load changes on a shared machine hit both alike
                _sync(device)
                begin = time.perf_counter()
                step(cached)
                _sync(device)
                if i:
                    times[cached].append(time.perf_counter() - begin)
        assert cache.misses == 1, "the cached step must never run the encoder"
    no_cache, with_cache = statistics.median(times[False]), statistics.median(times[True])
    return {
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "spatial": f"{spatial_hw[0]}x{spatial_hw[1]}",
        "forward_ms": 1e3 * statistics.median(totals),
        "share": statistics.median(shares),
        "step_ms": 1e3 * no_cache,
        "cached_ms": 1e3 * with_cache,
        "speedup": no_cache / with_cache,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
    parser.add_argument(
        "--vipa", nargs="*", default=["tiny", "small", "small-512"], choices=sorted(VIPA_CONFIGS)
    )
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

    if not args.vipa:
        return
    vipa_rows = [(name, bench_vipa(name, args.frames, args.repeats, args.device)) for name in args.vipa]
    print(
        f"\nVIPA-VLA: 3D-branch share of the forward and stage-1 step with / without the spatial-token cache, "
        f"{args.frames} frames, median of {args.repeats}"
    )
    print(
        f"{'config':10s} {'params (M)':>11s} {'CUT3R in':>9s} {'forward ms':>11s} {'3D share':>9s} "
        f"{'step ms':>9s} {'cached ms':>10s} {'speed-up':>9s}"
    )
    for name, r in vipa_rows:
        print(
            f"{name:10s} {r['params_M']:11.1f} {r['spatial']:>9s} {r['forward_ms']:11.1f} {r['share']:9.0%} "
            f"{r['step_ms']:9.1f} {r['cached_ms']:10.1f} {r['speedup']:8.2f}x"
        )


if __name__ == "__main__":
    main()
