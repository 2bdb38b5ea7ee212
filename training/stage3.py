"""Stage 3, robot post-training (paper §3.3, §4.1) on Accelerate: the action head learns to act from LeRobot v3
demonstrations with the flow-matching loss, the LLM trains with it, the semantic encoder and CUT3R stay frozen.

    ã = (1 - tau) eps + tau a,   loss = mean over real steps and dimensions of |v_theta(ã, tau | h_cond, s) - (a - eps)|^2

`a` is the normalised action chunk of H steps (statistics of the dataset, mode per the recipe), zero-padded to
the head's action width; steps past an episode's end (`action_is_pad`) and padded dimensions carry no loss.
The state is normalised and zero-padded to the head's state width, so one checkpoint can hold several
embodiments (each dataset's statistics sit in the processor under its `unnorm_key`).
Opening the datasets, the collator and the epoch order across processes and workers: `training.stage3_data`.

Starting points (one command for all; the kind is detected and written to `training_summary.json`):

- a stage-2 VIPA checkpoint (motion tokens present): the paper's VIPA-VLA;
- a VIPA checkpoint without pretraining (`training.build_checkpoint`, fresh fusion, no motion tokens): Table 7;
- a single-encoder checkpoint: the 3D branch is off, which this repository writes as fusion `alpha = 0`
  (`cpu_demo.standins.disable_spatial_branch`); the fusion then stays frozen at 0 and CUT3R is not
  run (zero tokens in its layout stand in for it, exactly: V_f = V_sem); the paper's "InternVL3.5" baseline;
- a stage-3 output (another embodiment, or more steps): its head is kept, its other datasets' statistics too.

Runs: one CPU (`vipa-train stage3 ...`) to many GPUs (`accelerate launch --config_file
training/accelerate/{cpu,single_gpu,multi_gpu_ddp,fsdp2,deepspeed_zero2}.yaml -m training.cli stage3 ...`);
bf16 autocast on a GPU that supports it, float32 on CPU. Every `save_steps` an Accelerate checkpoint
(model, optimiser, scheduler, RNG states, data position, loss history) is written atomically to
`OUTPUT/checkpoints/step-N`; `resume=True` continues from the newest and ends with the same weights as an
uninterrupted run. The final folder loads with `AutoModel.from_pretrained(OUTPUT, trust_remote_code=True)` and
`evaluation.policy.VipaPolicy.from_pretrained(OUTPUT)`.

Usage:

    from training.stage3 import train_stage3
    result = train_stage3("runs/stage2", "libero_10", "runs/stage3", recipe="cpu-tiny")
    # or: vipa-train stage3 --recipe paper-libero --model runs/stage2 --data HuggingFaceVLA/libero --output runs/stage3
    #     accelerate launch --config_file training/accelerate/multi_gpu_ddp.yaml -m training.cli stage3 ...
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from evaluation.policy import read_policy_config, zero_spatial_tokens
from hand3d_dataset.atomic import write_json
from modeling_vipa.configuration_vipa import VipaActionHeadConfig, VipaConfig
from modeling_vipa.modeling_vipa import VipaForActionPrediction
from processing_vipa.processing_vipa import VipaProcessor
from training.common import (
    RECIPES_DIR,
    TRAINING_MARKER,
    assert_trainable,
    check_compatible,
    gradient_accumulation_steps,
    load_recipe,
    mixed_precision,
    summarize_trainable,
    world_size,
    write_training_summary,
)
from training.stage3_data import DataSource, attach_norm_stats, make_loader, open_sources

logger = logging.getLogger("vipa.training.stage3")

STAGE = 3
STAGE3_RECIPES_DIR = RECIPES_DIR / "stage3"
CHECKPOINTS = "checkpoints"  # OUTPUT/checkpoints/step-00000050: Accelerate states to resume from
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_HEAD_FIELDS = tuple(VipaActionHeadConfig.__annotations__)
# Recipe fields that may change between an interrupted run and its resumption (they do not change the result;
# dataloader_num_workers does: the epoch order gives each worker its own decode blocks, see stage3_data).
_RESUME_FREE = {"save_steps", "save_total_limit", "logging_steps", "max_skip_fraction"}
_LLM_LINEAR = r".*\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


# ---- recipe ----------------------------------------------------------------------------------------------------
@dataclass
class Stage3Recipe:
    """Hyper-parameters of one stage-3 run (paper §4.1 for `paper-libero.yaml` / `paper-robocasa.yaml`)."""

    learning_rate: float = 5e-5  # AdamW peak learning rate after warm-up (paper §4.1)
    lr_scheduler_type: str = "cosine"  # schedule after warm-up (paper: none named; stages 1-2: cosine)
    warmup_ratio: float = 0.05  # fraction of max_steps spent warming up linearly (paper §4.1)
    weight_decay: float = 1e-5  # AdamW decoupled weight decay (paper §4.1)
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm); 0 turns it off
    global_batch_size: int = 128  # samples per optimiser step, all processes and accumulation (paper: 128)
    per_device_batch_size: int = 16  # samples per forward pass on one process
    max_steps: int = 30000  # optimiser steps (paper §4.1: 30K for LIBERO)
    train_fusion: bool = True  # the fusion layer trains too (why: see the recipes); never without a 3D branch
    lora_rank: int = 0  # 0: the whole LLM trains; > 0: LoRA adapters of this rank on the LLM's linear layers
    lora_alpha: int = 16  # LoRA scaling numerator (scale = lora_alpha / lora_rank)
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    horizon: int | None = None  # H, actions per chunk; None: the checkpoint's action_head_config.horizon
    action_dim: int | None = None  # head action width (data zero-padded); None: checkpoint/data
    state_dim: int | None = None  # head state width (data zero-padded); None: checkpoint/data
    camera_keys: list[str] | None = None  # `observation.images.<cam>`, frame order; None: info.json's
    state_key: str = "observation.state"  # state feature of the datasets
    action_key: str = "action"  # action feature of the datasets
    unnorm_key: str | None = None  # statistics name for a single dataset; None: the dataset folder's name
    norm_mode: str = "mean_std"  # mean_std | min_max | quantile (q01/q99 -> [-1, 1]); see lerobot_dataset
    n_action_steps: int | None = None  # actions VipaPolicy executes per chunk (written to policy_config.json)
    bf16: bool | None = None  # bf16 autocast; None: on a GPU that supports it (float32 on CPU)
    gradient_checkpointing: bool = False  # recompute the LLM's activations in backward (memory for time)
    spatial_cache: bool = False  # frozen CUT3R's tokens cached in OUTPUT/spatial_cache
    save_steps: int = 1000  # checkpoint every N steps: an interruption loses at most N steps
    save_total_limit: int = 2  # checkpoints kept on disk (oldest deleted)
    logging_steps: int = 10  # log the mean loss every N optimiser steps
    seed: int = 42  # fresh head init, data order, flow noise and tau, dropout
    dataloader_num_workers: int = 0  # worker processes decoding frames (the data order depends on it)
    max_skip_fraction: float = 0.01  # abort at start-up if more of the episodes than this are unusable

    def __post_init__(self) -> None:
        positive = (
            "global_batch_size",
            "per_device_batch_size",
            "max_steps",
            "save_steps",
            "save_total_limit",
        )
        for name in (*positive, "logging_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"recipe.{name}: expected an int >= 1, got {value!r}")
        for name in ("horizon", "action_dim", "state_dim", "n_action_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"recipe.{name}: expected null or an int >= 1, got {value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"recipe.learning_rate: expected a number > 0, got {self.learning_rate!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"recipe.warmup_ratio: expected a value in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"recipe.weight_decay: expected >= 0, got {self.weight_decay!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"recipe.{name}: expected a value in [0, 1), got {getattr(self, name)!r}")
        if self.max_grad_norm < 0:
            raise ValueError(f"recipe.max_grad_norm: expected >= 0, got {self.max_grad_norm!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"recipe.lora_rank: expected an int >= 0, got {self.lora_rank!r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"recipe.lora_alpha: expected > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"recipe.lora_dropout: expected a value in [0, 1), got {self.lora_dropout!r}")
        if self.norm_mode not in ("mean_std", "min_max", "quantile"):
            raise ValueError(
                f"recipe.norm_mode: expected 'mean_std', 'min_max' or 'quantile', got {self.norm_mode!r}"
            )
        if self.camera_keys is not None and (
            not isinstance(self.camera_keys, list)
            or not self.camera_keys
            or len(set(self.camera_keys)) != len(self.camera_keys)
        ):
            raise ValueError(
                f"recipe.camera_keys: expected null or a list of distinct keys, got {self.camera_keys!r}"
            )
        if self.dataloader_num_workers < 0:
            raise ValueError(
                f"recipe.dataloader_num_workers: expected >= 0, got {self.dataloader_num_workers!r}"
            )
        if not 0.0 <= self.max_skip_fraction < 1.0:
            raise ValueError(
                f"recipe.max_skip_fraction: expected a value in [0, 1), got {self.max_skip_fraction!r}"
            )

    def gradient_accumulation_steps(self, processes: int) -> int:
        """global_batch_size / (per_device_batch_size x processes); it must divide exactly."""
        return gradient_accumulation_steps(self.global_batch_size, self.per_device_batch_size, processes)


def load_stage3_recipe(name_or_path: str | os.PathLike, **overrides: Any) -> Stage3Recipe:
    """A `Stage3Recipe` from a shipped name (`paper-libero`, `paper-robocasa`, `cpu-tiny`) or a YAML file;
    `overrides` (None values ignored) replace fields. Unknown keys are a `ValueError` naming them."""
    return load_recipe(name_or_path, Stage3Recipe, STAGE3_RECIPES_DIR, **overrides)


def resolve_stage3_recipe(
    recipe: str | os.PathLike | Stage3Recipe, max_steps: int | None = None
) -> Stage3Recipe:
    """A shipped name, YAML path or `Stage3Recipe`, with `max_steps` (when given) replacing its length."""
    if not isinstance(recipe, Stage3Recipe):
        return load_stage3_recipe(recipe, max_steps=max_steps)
    return recipe if max_steps is None else dataclasses.replace(recipe, max_steps=max_steps)


# ---- model -----------------------------------------------------------------------------------------------------
@dataclass
class StartPoint:
    """What the starting checkpoint was (Table 5 / Table 7 rows are told apart by it)."""

    kind: str  # "stage2" | "stage1" | "no-pretraining" | "single-encoder" | "stage3"
    motion_tokens: bool  # the vocabulary holds motion tokens (stage 2 added them)
    spatial_branch: bool  # the 3D branch is on (fusion alpha != 0)
    alpha: float  # the fusion's alpha as loaded


def load_start_model(
    model_dir: str | os.PathLike, recipe: Stage3Recipe, dataset_dims: tuple[int, int] | None = None
) -> tuple[VipaForActionPrediction, VipaProcessor, StartPoint]:
    """The `VipaForActionPrediction` to post-train, its processor and what kind of checkpoint it came from.

    A checkpoint without an action head gets a fresh one (initialised from `recipe.seed`), sized by the
    checkpoint's `action_head_config` with the recipe's horizon / widths (None: the widest dataset's,
    `dataset_dims = (state_dim, action_dim)`). A stage-3 checkpoint keeps its head; a recipe width that
    disagrees with it is a `ValueError`.
    """
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model_dir: no VIPA checkpoint (config.json) in {str(folder)!r}")
    config = VipaConfig.from_pretrained(str(folder))
    is_action = "VipaForActionPrediction" in (config.architectures or [])
    head = config.action_head_config
    wanted = {"horizon": recipe.horizon, "action_dim": recipe.action_dim, "state_dim": recipe.state_dim}
    if is_action:
        clash = {
            k: (v, getattr(head, k)) for k, v in wanted.items() if v is not None and v != getattr(head, k)
        }
        if clash:
            raise ValueError(
                f"recipe: {', '.join(f'{k}={v[0]} but the checkpoint head has {v[1]}' for k, v in clash.items())}; "
                "a trained head keeps its sizes (start from a checkpoint without an action head to change them)"
            )
    else:
        if dataset_dims is not None:
            wanted["state_dim"] = wanted["state_dim"] or dataset_dims[0]
            wanted["action_dim"] = wanted["action_dim"] or dataset_dims[1]
        values = {name: getattr(head, name) for name in _HEAD_FIELDS}
        values.update({k: v for k, v in wanted.items() if v is not None})
        config.action_head_config = VipaActionHeadConfig(**values)
    torch.manual_seed(recipe.seed)  # the fresh head's initialisation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists a fresh head as MISSING: expected, checked below
    try:
        model, info = VipaForActionPrediction.from_pretrained(
            str(folder), config=config, dtype=torch.float32, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    fresh = () if is_action else ("action_queries", "action_head.")
    problems = {
        "missing": [k for k in info["missing_keys"] if not k.startswith(fresh)],
        "unexpected": list(info["unexpected_keys"]),
        "mismatched": [str(m) for m in info["mismatched_keys"]],
    }
    if any(problems.values()):
        raise ValueError(f"model_dir: {str(folder)!r} does not load into VipaForActionPrediction: {problems}")
    processor = VipaProcessor.from_pretrained(str(folder), trust_remote_code=False)
    check_compatible(model, processor)
    alpha = _stored_alpha(folder, model)
    motion = model.config.motion_token_ids is not None
    marker = folder / TRAINING_MARKER  # written by every training entry point: which stage made this
    trained_stage = json.loads(marker.read_text()).get("stage") if marker.is_file() else None
    # the single-encoder switch (config.use_spatial_branch = False, cpu_demo's backbone) or an alpha of 0
    branch = alpha != 0.0 and model.config.use_spatial_branch
    if is_action:
        kind = "stage3"
    elif not branch:
        kind = "single-encoder"
    elif trained_stage in (1, 2):
        kind = f"stage{trained_stage}"
    else:  # no marker: motion tokens mean stage 2 ran; none mean a fresh composition (build_checkpoint)
        kind = "stage2" if motion else "no-pretraining"
    return model, processor, StartPoint(kind, motion, branch, alpha)


def _stored_alpha(folder: Path, model: VipaForActionPrediction) -> float:
    """The fusion's alpha as stored in the checkpoint's safetensors. Read from the file, not the model: under
    FSDP with `fsdp_cpu_ram_efficient_loading` only rank 0 holds weights before `prepare` (meta elsewhere)."""
    from safetensors import safe_open

    name, file = "model.fusion.alpha", folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        file = folder / json.loads(index.read_text())["weight_map"].get(name, "")
    if file.is_file():
        with safe_open(str(file), "pt") as f:
            if name in f.keys():
                return float(f.get_tensor(name).float())
    return float(model.model.fusion.alpha.detach().float())


def stage3_trainable_prefixes(
    model: torch.nn.Module, recipe: Stage3Recipe, start: StartPoint
) -> tuple[str, ...]:
    """Name prefixes (of the unwrapped, PEFT-free model) that train: `set_trainable(model, 3)`'s (the LLM and the
    action head), the fusion when `recipe.train_fusion` and the 3D branch is on, and with LoRA the action head,
    queries and fusion only (the adapters are added on top)."""
    prefixes = ["action_queries", "action_head."]
    if recipe.lora_rank == 0:
        # set_trainable(model, 3) also lists lm_head: tied, it is the embedding matrix (named under the LLM);
        # untied, the flow-matching loss never reaches it, and a parameter without gradient breaks DDP
        prefixes.append("model.language_model.")
    if recipe.train_fusion and start.spatial_branch:
        prefixes.append("model.fusion.")
    return tuple(prefixes)


def apply_trainable(model: torch.nn.Module, recipe: Stage3Recipe, start: StartPoint) -> torch.nn.Module:
    """Freeze / unfreeze per `stage3_trainable_prefixes`; with `recipe.lora_rank > 0` wrap the model with PEFT
    LoRA adapters on the LLM's linear layers. Returns the model to train (the PEFT wrapper or the model)."""
    prefixes = stage3_trainable_prefixes(model, recipe, start)
    if recipe.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=recipe.lora_rank,
                lora_alpha=recipe.lora_alpha,
                lora_dropout=recipe.lora_dropout,
                target_modules=_LLM_LINEAR,
            ),
        )
        base = model.get_base_model()
        for name, param in base.named_parameters():
            param.requires_grad_("lora_" in name or name.startswith(prefixes))
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(prefixes))
    return model


def _base_model(model: torch.nn.Module) -> VipaForActionPrediction:
    """The `VipaForActionPrediction` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _set_modes(model: torch.nn.Module) -> None:
    """Train mode for what trains; eval mode (no dropout) for frozen parts (encoders, projector, a frozen fusion)."""
    model.train()
    base = _base_model(model).model
    for module in (base.vision_tower, base.multi_modal_projector, base.spatial_encoder, base.fusion):
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()


def masked_flow_loss(velocity: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (velocity - target)^2 over the entries where mask is 1 (real steps, real dimensions)."""
    err = (velocity.float() - target.float()) ** 2 * mask
    return err.sum() / mask.sum().clamp(min=1.0)


# ---- run state and checkpoints ---------------------------------------------------------------------------------
class _RunState:
    """What Accelerate does not checkpoint by itself: the step, the flow-noise generator, the loss history."""

    def __init__(self, seed: int) -> None:
        self.step = 0
        self.noise = torch.Generator().manual_seed(seed)
        self.losses: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "noise": self.noise.get_state(), "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.noise.set_state(state["noise"])
        self.losses = list(state["losses"])


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete `OUTPUT/checkpoints/step-N` folder, or None."""
    folder = Path(output_dir) / CHECKPOINTS
    found = sorted(
        p for p in folder.glob("step-*") if _STEP_DIR.match(p.name) and (p / "recipe.json").is_file()
    )
    return found[-1] if found else None


def _save_checkpoint(accelerator: Any, output_dir: Path, step: int, recipe: Stage3Recipe) -> None:
    """Accelerate's state to a temporary folder, renamed into place once complete; old ones pruned."""
    root = output_dir / CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # recipe.json marks the folder complete (and lets a resume check that the recipe is the same)
        (tmp / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(p for p in root.glob("step-*") if _STEP_DIR.match(p.name))
        for old in done[: -recipe.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _check_resume_recipe(checkpoint: Path, recipe: Stage3Recipe) -> None:
    saved = json.loads((checkpoint / "recipe.json").read_text())
    now = dataclasses.asdict(recipe)
    differ = sorted(k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k])
    if differ:
        raise ValueError(
            f"resume: the recipe differs from the one {checkpoint} was trained with in {differ} "
            f"({[(k, saved.get(k), now[k]) for k in differ][:5]}); resume with the same recipe"
        )


# ---- run -------------------------------------------------------------------------------------------------------
@dataclass
class Stage3Result:
    """What `train_stage3` did."""

    output_dir: Path  # the final checkpoint folder (or where the checkpoints are, if stopped early)
    steps: int  # optimiser steps done in total
    finished: bool  # max_steps reached and the final checkpoint written
    start: StartPoint  # the starting checkpoint's kind
    losses: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "lr"} per logging window
    data_report: dict[str, Any] = field(default_factory=dict)  # datasets, episodes kept / skipped and why


def train_stage3(
    model_dir: str | os.PathLike,
    data: str | os.PathLike | list[str | os.PathLike],
    output_dir: str | os.PathLike,
    recipe: str | os.PathLike | Stage3Recipe = "cpu-tiny",
    resume: bool = False,
    max_steps: int | None = None,
    stop_after_steps: int | None = None,
) -> Stage3Result:
    """Post-train `model_dir` on the LeRobot v3 dataset(s) `data`; the final checkpoint goes to `output_dir`.

    recipe: a shipped name (`cpu-tiny`, `paper-libero`, `paper-robocasa`), a YAML path or a `Stage3Recipe`;
        `max_steps` overrides its length.
    resume: continue from the newest `output_dir/checkpoints/step-N` (a `ValueError` if there is none).
    stop_after_steps: stop once this many optimiser steps are done in total, after writing a checkpoint
        (time-boxed jobs, interruption tests); the run is then resumable and `finished` is False.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_scheduler

    recipe = resolve_stage3_recipe(recipe, max_steps)
    output_dir = Path(output_dir)
    checkpoint = None
    if resume:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(f"resume: no {CHECKPOINTS}/step-N folder in {str(output_dir)!r} to resume from")
        _check_resume_recipe(checkpoint, recipe)
    processes = world_size()
    accumulation = recipe.gradient_accumulation_steps(processes)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # as the Trainer's use_cpu: a torchrun launch on CPUs runs gloo DDP
        mixed_precision=mixed_precision(recipe.bf16),
        gradient_accumulation_steps=accumulation,
        step_scheduler_with_optimizer=False,
    )
    set_seed(recipe.seed, device_specific=True)
    distributed = accelerator.distributed_type
    logger.info(
        "stage 3: %d process(es), %s, mixed precision %s, gradient accumulation %d",
        accelerator.num_processes,
        distributed,
        accelerator.mixed_precision,
        accumulation,
    )
    if accelerator.num_processes != processes:
        raise ValueError(
            f"WORLD_SIZE says {processes} processes but Accelerate runs {accelerator.num_processes}; "
            "launch with `accelerate launch` or torchrun"
        )

    # -- model and data, every check before the first step --
    peek = VipaConfig.from_pretrained(str(model_dir)) if (Path(model_dir) / "config.json").is_file() else None
    max_views = min(peek.max_frames, 4) if peek is not None else 4
    head_peek = peek.action_head_config if peek is not None else None
    horizon = recipe.horizon or (head_peek.horizon if head_peek is not None else 16)
    sources, report = open_sources(data, recipe, max_views, horizon)
    dims = (max(s.spec.state_dim for s in sources), max(s.spec.action_dim for s in sources))
    model, processor, start = load_start_model(model_dir, recipe, dims)
    head = model.config.action_head_config
    if head.horizon != horizon:
        raise ValueError(
            f"recipe.horizon: data chunks of {horizon} steps but the head predicts {head.horizon}"
        )
    max_views = min(model.config.max_frames, processor.max_frames)
    for s in sources:
        if len(s.spec.camera_keys) > max_views:
            raise ValueError(
                f"dataset {s.path!r}: {len(s.spec.camera_keys)} cameras, the model takes {max_views}"
            )
        for part, width, limit in (
            ("state", s.spec.state_dim, head.state_dim),
            ("action", s.spec.action_dim, head.action_dim),
        ):
            key = s.spec.state_key if part == "state" else s.spec.action_key
            if width > limit:
                raise ValueError(
                    f"dataset {s.path!r}: feature {key!r} has {width} dims, wider than the head's {part}_dim={limit}; "
                    f"start from a checkpoint without an action head and set recipe.{part}_dim >= {width}"
                )
    attach_norm_stats(processor, sources, recipe)
    if recipe.lora_rank and distributed in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(
            "recipe.lora_rank > 0 runs on one process or DDP (the adapters are merged at the end)"
        )
    cache = None
    if recipe.spatial_cache and start.spatial_branch:
        if distributed == DistributedType.FSDP:
            raise ValueError(
                "recipe.spatial_cache needs CUT3R whole on every process; turn it off under FSDP"
            )
        from training.spatial_cache import SpatialTokenCache

        cache = SpatialTokenCache(output_dir / "spatial_cache", model.model.spatial_encoder.eval())
    if recipe.gradient_checkpointing:
        model.model.language_model.gradient_checkpointing_enable({"use_reentrant": False})
    if not start.spatial_branch:
        logger.info("start: %s checkpoint (alpha = 0): fusion frozen, CUT3R not run", start.kind)
    model = apply_trainable(model, recipe, start)
    prefixes = stage3_trainable_prefixes(_base_model(model), recipe, start)
    expected = sorted(
        n
        for n, _ in model.named_parameters()
        if n.split("base_model.model.")[-1].startswith(prefixes) or "lora_" in n
    )
    assert_trainable(model, expected, STAGE)
    summary = summarize_trainable(_base_model(model))
    logger.info(
        "stage 3 (%s start): %d of %d parameters trainable",
        start.kind,
        summary["trainable"],
        summary["total"],
    )

    loader, sampler = make_loader(
        sources,
        processor,
        recipe,
        head.state_dim,
        head.action_dim,
        accelerator.process_index,
        accelerator.num_processes,
    )
    report.update(
        {
            "samples": len(loader.dataset),
            "batches_per_epoch": sampler.batches_per_epoch,
            "start": dataclasses.asdict(start),
        }
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(report, output_dir / "data_report.json")
        write_json({"stage": STAGE, **summary, "names": expected}, output_dir / "trainable_parameters.json")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=recipe.learning_rate,
        betas=(recipe.adam_beta1, recipe.adam_beta2),
        weight_decay=recipe.weight_decay,
        # one kernel for all parameters where torch has one (CPU, CUDA)
        fused=accelerator.device.type in ("cpu", "cuda"),
    )
    scheduler = get_scheduler(
        recipe.lr_scheduler_type,
        optimizer,
        num_warmup_steps=math.ceil(recipe.warmup_ratio * recipe.max_steps),
        num_training_steps=recipe.max_steps,
    )
    if (
        distributed == DistributedType.DEEPSPEED
    ):  # its "auto" micro batch comes from a prepared loader otherwise
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
            recipe.per_device_batch_size
        )
    model, optimizer = accelerator.prepare(model, optimizer)
    assert_trainable(model, expected, STAGE)  # nothing the wrappers did changed what trains
    run = _RunState(recipe.seed + 7919 * accelerator.process_index)
    accelerator.register_for_checkpointing(scheduler, run)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        logger.info("resumed from %s at step %d", checkpoint, run.step)
    accelerator.step = run.step * accumulation
    model.train()  # the wrapper (DDP reads its flag) ...
    _set_modes(accelerator.unwrap_model(model))  # ... and the parts: frozen ones in eval mode (no dropout)
    inner = _base_model(accelerator.unwrap_model(model))

    # -- the loop --
    stop = min(recipe.max_steps, stop_after_steps or recipe.max_steps)
    window: list[float] = []
    micro = run.step * accumulation
    tic = time.perf_counter()
    while run.step < stop:
        epoch, offset = divmod(micro, sampler.batches_per_epoch)
        sampler.set_position(epoch, offset)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = _loss(model, inner, batch, run.noise, accelerator.device, start.spatial_branch, cache)
                accelerator.backward(loss)
                if accelerator.sync_gradients and recipe.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            micro += 1
            window.append(float(loss.detach()))
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            run.step += 1
            if run.step % recipe.logging_steps == 0 or run.step == stop:
                mean = accelerator.reduce(torch.tensor(np.mean(window), device=accelerator.device), "mean")
                entry = {"step": run.step, "loss": float(mean), "lr": float(scheduler.get_last_lr()[0])}
                run.losses.append(entry)
                window = []
                if accelerator.is_main_process:
                    logger.info(
                        "step %d loss %.5f lr %.3g (%.1f s)",
                        run.step,
                        entry["loss"],
                        entry["lr"],
                        time.perf_counter() - tic,
                    )
            if run.step % recipe.save_steps == 0 or run.step == stop:
                _save_checkpoint(accelerator, output_dir, run.step, recipe)
            if run.step >= stop:
                break
    result = Stage3Result(output_dir, run.step, run.step >= recipe.max_steps, start, list(run.losses), report)
    if not result.finished:
        logger.warning("stopped at step %d of %d; resume with --resume", run.step, recipe.max_steps)
        return result
    _save_final(accelerator, model, processor, sources, recipe, start, run, output_dir, data, model_dir)
    return result


def _loss(
    model: Any,
    inner: VipaForActionPrediction,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    device: torch.device,
    spatial_branch: bool,
    cache: Any,
) -> torch.Tensor:
    """The masked flow-matching loss of one micro-batch (noise and tau from the run's own generator)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    actions, mask = batch.pop("actions"), batch.pop("action_mask")
    if not spatial_branch:  # alpha = 0: CUT3R's output cannot matter
        batch["spatial_tokens"] = zero_spatial_tokens(inner, batch.pop("spatial_pixel_values"))
    elif cache is not None:
        batch["spatial_tokens"] = cache.get_or_compute(
            batch.pop("spatial_pixel_values"), batch["spatial_frame_mask"]
        )
    noise = torch.randn(actions.shape, generator=generator).to(device)
    tau = inner.action_head.sample_tau(actions.shape[0], torch.device("cpu"), generator=generator).to(device)
    out = model(**batch, actions=actions, noise=noise, tau=tau)
    return masked_flow_loss(out.velocity, actions - noise, mask)


def _save_final(
    accelerator: Any,
    model: Any,
    processor: VipaProcessor,
    sources: list[DataSource],
    recipe: Stage3Recipe,
    start: StartPoint,
    run: _RunState,
    output_dir: Path,
    data: Any,
    model_dir: str | os.PathLike,
) -> None:
    """The loadable checkpoint: merged weights (safetensors), processor with the statistics, policy config."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if recipe.lora_rank > 0:
        final = unwrapped.merge_and_unload()  # plain weights: no PEFT needed to load the checkpoint
        state_dict = final.state_dict()
    else:
        final = unwrapped
        state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    final.save_pretrained(str(output_dir), state_dict=state_dict, safe_serialization=True)
    processor.save_pretrained(str(output_dir))
    policy = read_policy_config(model_dir)  # a stage-3 start keeps its other embodiments
    for source in sources:
        policy.embodiments[source.spec.unnorm_key] = source.spec
    policy.default_unnorm_key = sources[0].spec.unnorm_key
    policy.write(output_dir)
    losses = run.losses
    write_training_summary(
        output_dir,
        STAGE,
        run.step,
        data if isinstance(data, (str, os.PathLike)) else ", ".join(map(str, data)),
        losses[-1]["loss"] if losses else None,
        recipe,
        final,
        start=dataclasses.asdict(start),
        losses=losses,
        unnorm_keys=[s.spec.unnorm_key for s in sources],
    )
    accelerator.wait_for_everyone()
