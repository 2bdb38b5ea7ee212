"""Stage 1 of the spatial-aware pretraining (paper §3.2.3, §4.1): only the fusion layer trains, on Hand3D-visual.

Every pretrained part (InternViT, the projector, Qwen3, CUT3R) is frozen, so the fusion layer learns to align
the semantic tokens V_sem with the spatial tokens V_spa through the VQA answers (assistant-only loss).

Usage:

    from training.stage1 import train_stage1
    train_stage1("ckpt/vipa-init", "hand3d", "runs/stage1", recipe="cpu-tiny")
    # or: accelerate launch --config_file training/accelerate/cpu.yaml -m training.cli stage1 \\
    #         --recipe cpu-tiny --model ckpt/vipa-init --data hand3d --output runs/stage1
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from training.common import Recipe, resolve_recipe
from training.sft import run_stage

STAGE = 1


def train_stage1(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    recipe: str | os.PathLike | Recipe = "cpu-tiny",
    resume: bool = False,
    max_steps: int | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> Any:
    """Train the fusion layer of the checkpoint in `model_dir` on `data_dir`'s Hand3D-visual train split.

    recipe: a shipped name ("cpu-tiny", "paper"), a YAML path or a `Recipe`; max_steps overrides its length.
    Returns the trainer; `output_dir` ends as a loadable VIPA checkpoint (model + processor, remote code).
    """
    return run_stage(
        STAGE,
        resolve_recipe(recipe, max_steps),
        model_dir,
        data_dir,
        output_dir,
        resume=resume,
        callbacks=callbacks,
    )
