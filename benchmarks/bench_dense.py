"""Cost of the dense name loss (`cpu_demo.dense_names`) in a backbone stand-in step, measured in one run.

Same tiny stand-in model (the main job's sizes), 2 threads. Baseline: forward + backward of the LM loss on a
batch shaped like the main job's (8 samples, 2 frames each, 80 text tokens). Then the dense term alone
(16 frames, `<img> V </img>` sequences) and the sum, as the backbone step runs it. Prints a table; ratios are
against the LM-only step of this run.

    python benchmarks/bench_dense.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu_demo.dense_names import DenseNameLoss  # noqa: E402
from cpu_demo.standins import (  # noqa: E402
    StandinConfig,
    build_standin_processor,
    build_standin_tokenizer,
    standin_vipa_config,
)
from modeling_vipa.modeling_vipa import VipaForConditionalGeneration  # noqa: E402
from tests.hand3d_fake_source import make_clip  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed steps per mode (after 3 warm-up steps)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = StandinConfig()
    tok = build_standin_tokenizer(
        ["the right hand is left of the red mug and the blue box, 0.3 m"] * 8, cfg.vocab_size
    )
    processor = build_standin_processor(cfg, tok)
    torch.manual_seed(0)
    model = VipaForConditionalGeneration(standin_vipa_config(cfg, tok))
    model.config.use_spatial_branch = False  # the single encoder, as in backbone training
    model.train()
    dense = DenseNameLoss.from_clips(
        [make_clip(i) for i in range(8)], processor, model.config, cfg.dense_batch
    )

    n_img = processor.image_seq_length
    img = model.config.image_token_id
    batch, frames, text = 8, 2, 80
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 300, (batch, frames * n_img + text), generator=gen)
    ids[ids >= min(model.config.image_token_id, 260)] = 10  # text tokens: never a special or image token
    ids[:, : frames * n_img] = img
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch * frames, 3, cfg.tile_size, cfg.tile_size, generator=gen),
        "spatial_pixel_values": torch.randn(
            batch, frames, 3, cfg.spatial_size, cfg.spatial_size, generator=gen
        ),
        "spatial_frame_mask": torch.ones(batch, frames, dtype=torch.bool),
        "labels": ids.masked_fill(ids == img, -100),
    }

    def lm() -> torch.Tensor:
        return model(**inputs).loss  # CUT3R skipped: use_spatial_branch is off, as in backbone training

    modes = {"LM loss only (baseline)": lm, "dense term only": lambda: dense(model), "LM + dense": None}
    modes["LM + dense"] = lambda: lm() + cfg.dense_weight * dense(model)
    rows = []
    for name, fn in modes.items():
        times = []
        for i in range(args.repeats + 3):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn().backward()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        rows.append((name, float(np.median(times))))
    base = rows[0][1]
    print(
        f"\ntiny stand-in (tile {cfg.tile_size}, LLM {cfg.text_layers}x{cfg.text_hidden}), 2 threads, median of {args.repeats}"
    )
    print("| step | s | x LM-only |\n|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.4f} | {s / base:.2f} |")


if __name__ == "__main__":
    main()
