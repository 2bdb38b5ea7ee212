"""`vipa-train`: the spatial-aware pretraining stages from the command line (paper §3.2.3, §4.1).

Usage:

    vipa-train stage1 --recipe cpu-tiny --model ckpt/vipa-init --data hand3d --output runs/stage1
    vipa-train stage2 --recipe paper --model runs/stage1 --data hand3d --output runs/stage2 --resume
    vipa-train stage3 --recipe paper-libero --model runs/stage2 --data HuggingFaceVLA/libero --output runs/stage3
    accelerate launch --config_file training/accelerate/multi_gpu_ddp.yaml -m training.cli stage1 ...

`--recipe` is `cpu-tiny` (default), `paper` or a YAML path (stage 3: `cpu-tiny`, `paper-libero`,
`paper-robocasa`; stage 3 takes several `--data` datasets, one embodiment each); `--max-steps N` overrides the recipe's length;
`--resume` continues from the last checkpoint in `--output`. Bad arguments or data exit with status 2 and
a one-line message, before any training step.
"""

from __future__ import annotations

import argparse
import logging
import sys

from training.common import load_recipe
from training.stage1 import train_stage1
from training.stage2 import train_stage2
from training.stage3 import load_stage3_recipe, train_stage3

_STAGES = {"stage1": train_stage1, "stage2": train_stage2, "stage3": train_stage3}


def build_parser() -> argparse.ArgumentParser:
    """The `vipa-train` argument parser."""
    parser = argparse.ArgumentParser(prog="vipa-train", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "stage",
        choices=sorted(_STAGES),
        help="stage1: fusion on Hand3D-visual; stage2: + LLM; stage3: robot post-training",
    )
    parser.add_argument("--recipe", default="cpu-tiny", help="cpu-tiny | paper | path to a recipe YAML")
    parser.add_argument("--model", required=True, help="VIPA checkpoint folder (model + processor)")
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="Hand3D folder; stage3: LeRobot v3 folder(s) or Hub repo id(s)",
    )
    parser.add_argument("--output", required=True, help="output folder: checkpoints and the final model")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    parser.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides the recipe)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vipa-train`; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        stage3 = args.stage == "stage3"
        recipe = (load_stage3_recipe if stage3 else load_recipe)(args.recipe, max_steps=args.max_steps)
        if not stage3 and len(args.data) > 1:
            raise ValueError(f"--data: {args.stage} reads one Hand3D folder, got {len(args.data)}")
        data = args.data if stage3 else args.data[0]
        _STAGES[args.stage](args.model, data, args.output, recipe=recipe, resume=args.resume)
    except ValueError as e:
        print(f"vipa-train {args.stage}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
