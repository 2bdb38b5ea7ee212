"""Model benchmarks (issue 4 §5), all measured in one run, printed as a table of ratios.

(a) forward time of VIPA-VLA vs the same InternVL backbone without the 3D branch and fusion (transformers'
    native `InternVLForConditionalGeneration` holding the same weights), and the 3D branch's share
    (CUT3R + fusion time / VIPA forward time);
(b) `predict_action` with N = 10 Euler steps vs a naive loop that re-runs the whole model per step
    (target >= 5x), and `predict_action` vs one prefix forward (target <= 1.5x).

Configs: `tiny` (the test config) and `small` (~100 M parameters, same layout as the paper's model).

Usage:

    python benchmarks/bench_model.py                 # both configs, CPU (or --device cuda)
    python benchmarks/bench_model.py --configs tiny --repeats 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from transformers import InternVLForConditionalGeneration

from modeling_vipa.configuration_cut3r import Cut3rConfig
from modeling_vipa.configuration_vipa import (
    VipaActionHeadConfig,
    VipaConfig,
    VipaFusionConfig,
    internvl_tiny_config,
)
from modeling_vipa.modeling_vipa import VipaForActionPrediction, VipaForConditionalGeneration


def small_config() -> VipaConfig:
    """~100 M parameters: InternViT 384x6 at 224 px, Qwen3 512x10, CUT3R 384x4 / 256x3, DiT 256x4."""
    ivl = internvl_tiny_config(
        vision_config={
            "hidden_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
            "intermediate_size": 1536,
            "image_size": 224,
            "patch_size": 14,
        },
        text_config={
            "model_type": "qwen3",
            "vocab_size": 32000,
            "hidden_size": 512,
            "intermediate_size": 1536,
            "num_hidden_layers": 10,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 64,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
        },
        image_token_id=31999,
        image_seq_length=64,
    )
    cut3r = Cut3rConfig(
        img_size=224,
        enc_embed_dim=384,
        enc_depth=4,
        enc_num_heads=6,
        ray_enc_depth=1,
        ray_enc_num_heads=6,
        dec_embed_dim=256,
        dec_depth=3,
        dec_num_heads=4,
        state_dec_num_heads=4,
        state_size=256,
        local_mem_size=64,
        dpt_layer_dims=(32, 64, 128, 256),
        dpt_feature_dim=64,
        dpt_last_dim=32,
    )
    return VipaConfig(
        internvl_config=ivl,
        spatial_config=cut3r,
        fusion_layer_config=VipaFusionConfig(num_heads=8, attention_dim=256),
        action_head_config=VipaActionHeadConfig(
            hidden_size=256, num_layers=4, num_heads=4, num_action_queries=16
        ),
    )


def make_inputs(config: VipaConfig, device: torch.device, spatial_side: int, text_tokens: int = 24) -> dict:
    """One sample, one frame (the post-training setting, paper §4.1), a short instruction."""
    ivl = config.internvl_config
    size = tuple(ivl.vision_config.image_size)
    ids = [1] + [ivl.image_token_id] * ivl.image_seq_length + [2 + i % 50 for i in range(text_tokens)]
    return {
        "input_ids": torch.tensor([ids], device=device),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
        "pixel_values": torch.randn(1, 3, *size, device=device),
        "spatial_pixel_values": torch.randn(1, 1, 3, spatial_side, spatial_side, device=device),
        "spatial_frame_mask": torch.ones(1, 1, dtype=torch.bool, device=device),
        "state": torch.randn(1, config.action_head_config.state_dim, device=device),
    }


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Best-of-`repeats` wall time (seconds) of each function, after one warm-up call each.

    The functions are timed round-robin and the minimum is kept: on a shared machine, load from other
    processes hits every path alike and only ever adds time, so the minimum is the least noisy estimate.
    """
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@torch.no_grad()
def bench(
    name: str, config: VipaConfig, spatial_side: int, repeats: int, device: torch.device
) -> dict[str, float]:
    """Times of every measured path for one config (seconds) and their ratios."""
    torch.manual_seed(0)
    vipa = VipaForActionPrediction(config).to(device).eval()
    native = InternVLForConditionalGeneration(config.internvl_config).to(device).eval()
    native.load_state_dict(vipa.state_dict(), strict=False)  # same InternVL weights, minus CUT3R and fusion
    inputs = make_inputs(config, device, spatial_side)
    vlm = {k: v for k, v in inputs.items() if k != "state"}
    mask = inputs["spatial_frame_mask"]
    steps = 10

    def spatial_branch() -> None:
        tokens = vipa.spatial_encoder(
            inputs["spatial_pixel_values"], frame_mask=mask, return_heads=False
        ).tokens
        V_sem = torch.randn(
            1, config.internvl_config.image_seq_length * 4, vipa.fusion.vision_dim, device=device
        )
        vipa.fusion(V_sem, tokens[mask])

    def naive_loop() -> None:
        # what predict_action avoids: the whole model (CUT3R + InternViT + LLM) once per Euler step
        a = torch.randn(
            1, config.action_head_config.horizon, config.action_head_config.action_dim, device=device
        )
        for i in range(steps):
            h_cond = vipa.encode_action_queries(**vlm)
            tau = torch.full((1,), i / steps, device=device)
            a = a + vipa.action_head(a, tau, inputs["state"], h_cond) / steps

    t = time_interleaved(
        {
            # the VLM forward (logits), not the action model's flow-matching forward
            "vipa_forward": lambda: VipaForConditionalGeneration.forward(vipa, **vlm),
            "internvl_forward": lambda: native(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"],
            ),
            "spatial_branch": spatial_branch,
            "prefix": lambda: vipa.encode_action_queries(**vlm),
            "predict_action": lambda: vipa.predict_action(**inputs, num_steps=steps, return_normalized=True),
            "naive_loop": naive_loop,
        },
        repeats,
        device,
    )
    params = sum(p.numel() for p in vipa.parameters())
    print(f"\n[{name}] {params / 1e6:.1f} M parameters, device {device}, best of {repeats}")
    for key, value in t.items():
        print(f"  {key:<18} {value * 1e3:10.2f} ms")
    return {
        "params_M": params / 1e6,
        "vipa / internvl forward": t["vipa_forward"] / t["internvl_forward"],
        "3D branch share of forward": t["spatial_branch"] / t["vipa_forward"],
        "naive loop / predict_action (N=10, >= 5)": t["naive_loop"] / t["predict_action"],
        "predict_action / prefix (<= 1.5)": t["predict_action"] / t["prefix"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="VIPA-VLA model benchmarks")
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = {"tiny": (VipaConfig.tiny(), 32), "small": (small_config(), 224)}
    results = {name: bench(name, *configs[name], args.repeats, device) for name in args.configs}
    rows = list(next(iter(results.values())))
    width = max(len(r) for r in rows)
    print("\n" + f"{'ratio':<{width}}  " + "  ".join(f"{n:>8}" for n in results))
    for row in rows:
        print(f"{row:<{width}}  " + "  ".join(f"{results[n][row]:8.2f}" for n in results))


if __name__ == "__main__":
    main()
