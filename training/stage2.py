"""Stage 2 of the spatial-aware pretraining (paper §3.2.3, §4.1): fusion layer + LLM train on Hand3D-action.

The LLM vocabulary is first extended with the motion tokens `<motion_0>`..`<motion_1023>`, `<motion>`,
`</motion>` (skipped when the checkpoint already has them); both encoders stay frozen, and the model learns to
answer with motion-token trajectories (assistant-only loss). Hyper-parameters as stage 1 (paper §4.1).

Usage:

    from training.stage2 import train_stage2
    train_stage2("runs/stage1", "hand3d", "runs/stage2", recipe="cpu-tiny")
    # or: accelerate launch --config_file training/accelerate/cpu.yaml -m training.cli stage2 \\
    #         --recipe cpu-tiny --model runs/stage1 --data hand3d --output runs/stage2
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from training.common import Recipe, resolve_recipe
from training.sft import run_stage

STAGE = 2


def train_stage2(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    recipe: str | os.PathLike | Recipe = "cpu-tiny",
    resume: bool = False,
    max_steps: int | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> Any:
    """Add the motion tokens (if absent) and train fusion + LLM on `data_dir`'s Hand3D-action train split.

    recipe: a shipped name ("cpu-tiny", "paper"), a YAML path or a `Recipe`; max_steps overrides its length.
    Returns the trainer; `output_dir` ends as a loadable VIPA checkpoint with the motion tokens.
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
