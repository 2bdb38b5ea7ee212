"""What every training stage shares (stages 1-2 on TRL, stage 3 on Accelerate, the CPU stand-ins).

- the recipe: a YAML file of hyper-parameters (`load_recipe`, `resolve_recipe`);
- the one checkpoint loader (`load_model_and_processor`: model + processor + `check_compatible`), used by
  training, evaluation, the Space and the main job;
- the trainable-parameter checks (`set_trainable`'s set asserted after wrapping);
- precision and threads chosen on purpose (`resolve_bf16`, `mixed_precision`, `configure_threads`);
- the trained-checkpoint marker (`TRAINING_MARKER`, `write_training_summary`).

What only the SFT stages 1-2 share (dataset validation, the SFTTrainer) is in `training.sft`.

    from training.common import load_model_and_processor, load_recipe
    recipe = load_recipe("cpu-tiny")                      # or "paper", or a path to a YAML file
    model, processor = load_model_and_processor("runs/stage1")
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from hand3d_dataset.atomic import write_json
from modeling_vipa.modeling_vipa import VipaForConditionalGeneration
from processing_vipa.processing_vipa import VipaProcessor

logger = logging.getLogger("vipa.training")

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
# Prefixes a DDP / FSDP / activation-checkpointing wrapper puts before parameter names.
_WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


# ---- recipe --------------------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """Hyper-parameters of one pretraining run (paper §4.1 for `paper.yaml`)."""

    optim: str = "adamw_torch"  # transformers optimiser name (the paper: AdamW)
    learning_rate: float = 1e-5  # peak learning rate after warm-up
    lr_scheduler_type: str = "cosine"  # schedule after warm-up
    warmup_ratio: float = 0.03  # fraction of the total steps spent warming up linearly
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    global_batch_size: int = 32  # samples per optimiser step over all processes and accumulation steps
    per_device_batch_size: int = 4  # samples per forward pass on one process
    num_train_epochs: float = 1.0  # epochs over the (validated) training split
    max_steps: int = -1  # optimiser steps; > 0 overrides num_train_epochs
    image_size: int | None = 448  # InternVL tile side the checkpoint's processor must use; None: any
    max_length: int = 4096  # tokens per sample, image tokens included; longer samples are skipped and counted
    bf16: bool | None = (
        None  # bfloat16 autocast: null = on a GPU that supports it, float32 elsewhere (see resolve_bf16)
    )
    gradient_checkpointing: bool = False  # recompute LLM activations in backward (memory for time)
    save_steps: int = 500  # checkpoint every N optimiser steps: an interruption loses at most N steps
    save_total_limit: int = 3  # checkpoints kept on disk (oldest deleted)
    logging_steps: int = 10  # log loss / learning rate every N steps
    seed: int = 42  # model-independent randomness: data order, dropout
    dataloader_num_workers: int = 0  # worker processes decoding images
    max_skip_fraction: float = 0.01  # abort at start-up if validation skips more of the data than this
    spatial_cache: bool = (
        False  # read frozen CUT3R's tokens from OUTPUT/spatial_cache (computed once per clip)
    )

    def __post_init__(self) -> None:
        positive = ("global_batch_size", "per_device_batch_size", "max_length", "save_steps", "logging_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"recipe.{name}: expected an int >= 1, got {value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"recipe.learning_rate: expected a number > 0, got {self.learning_rate!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"recipe.warmup_ratio: expected a value in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"recipe.weight_decay: expected >= 0, got {self.weight_decay!r}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ValueError("recipe: num_train_epochs or max_steps must be > 0")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise ValueError(f"recipe.image_size: expected null or an int >= 1, got {self.image_size!r}")
        if self.bf16 not in (None, True, False):
            raise ValueError(f"recipe.bf16: expected true, false or null (auto), got {self.bf16!r}")
        if not 0.0 <= self.max_skip_fraction < 1.0:
            raise ValueError(
                f"recipe.max_skip_fraction: expected a value in [0, 1), got {self.max_skip_fraction!r}"
            )

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """global_batch_size / (per_device_batch_size x world_size); it must divide exactly."""
        return gradient_accumulation_steps(self.global_batch_size, self.per_device_batch_size, world_size)


def load_recipe(
    name_or_path: str | os.PathLike,
    recipe_cls: type | None = None,
    recipes_dir: str | os.PathLike = RECIPES_DIR,
    **overrides: Any,
) -> Any:
    """A recipe dataclass (`Recipe` for stages 1-2 by default) from a shipped name in `recipes_dir` (`paper`,
    `cpu-tiny`) or a YAML file; `overrides` (None values ignored) replace fields.

    Unknown keys are a `ValueError` (a typo must not silently fall back to a default)."""
    recipe_cls = recipe_cls or Recipe
    recipes_dir = Path(recipes_dir)
    path = Path(name_or_path)
    shipped = recipes_dir / f"{name_or_path}.yaml"
    if shipped.is_file():
        path = shipped
    elif not path.is_file():
        names = sorted(p.stem for p in recipes_dir.glob("*.yaml"))
        raise ValueError(f"recipe: {str(name_or_path)!r} is neither a shipped recipe {names} nor a YAML file")
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path}: expected a mapping of fields, got {type(values).__name__}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(recipe_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"recipe {path}: unknown fields {unknown}; known: {sorted(known)}")
    return recipe_cls(**values)


def gradient_accumulation_steps(global_batch_size: int, per_device_batch_size: int, processes: int) -> int:
    """global_batch_size / (per_device_batch_size x processes); it must divide exactly (`ValueError` naming
    the recipe fields otherwise)."""
    per_step = per_device_batch_size * processes
    if global_batch_size % per_step:
        raise ValueError(
            f"recipe: global_batch_size={global_batch_size} is not a multiple of per_device_batch_size "
            f"({per_device_batch_size}) x processes ({processes}) = {per_step}"
        )
    return global_batch_size // per_step


def resolve_recipe(recipe: str | os.PathLike | Recipe, max_steps: int | None = None) -> Recipe:
    """A shipped name, YAML path or `Recipe`, with `max_steps` (when given) replacing its length."""
    if not isinstance(recipe, Recipe):
        return load_recipe(recipe, max_steps=max_steps)  # a None override is ignored
    return recipe if max_steps is None else dataclasses.replace(recipe, max_steps=max_steps)


# ---- model ---------------------------------------------------------------------------------------------------
def load_model_and_processor(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    model_class: type | None = None,
    remote_code: bool = False,
    device: str | torch.device | None = None,
) -> tuple[Any, VipaProcessor]:
    """The one checkpoint loader: a VIPA checkpoint (model + processor, as `save_pretrained` writes them),
    checked for agreement (`check_compatible`).

    path: a local checkpoint folder, or (with `remote_code`) a Hub repo id.
    model_class: the class to load (default `VipaForConditionalGeneration`; `VipaForActionPrediction` for
        the policy). Ignored with `remote_code`.
    remote_code: load through the Auto classes with `trust_remote_code=True`, i.e. run the checkpoint's own
        copy of the code, as a user of a published checkpoint does (the Space). Otherwise the repository's
        classes are used, never the checkpoint's copy.
    device: where to put the model (default: where `from_pretrained` leaves it, the CPU).

    A local folder without `config.json` is a `ValueError` naming it.
    """
    local = Path(path).exists()
    if (local or not remote_code) and not (Path(path) / "config.json").is_file():
        raise ValueError(f"model_dir: no VIPA checkpoint (config.json) in {str(path)!r}")
    if remote_code:
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(str(path), dtype=dtype, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=True)
    else:
        model = (model_class or VipaForConditionalGeneration).from_pretrained(str(path), dtype=dtype)
        # False also stops AutoTokenizer's interactive prompt
        processor = VipaProcessor.from_pretrained(str(path), trust_remote_code=False)
    check_compatible(model, processor)
    if device is not None:
        model = model.to(device)
    return model, processor


def check_compatible(model: Any, processor: Any) -> None:
    """Raise `ValueError` when the processor would produce inputs the model cannot take."""
    ivl = model.config.internvl_config
    tile = processor.image_processor.size["height"]
    problems = []
    if processor.image_token_id != model.config.image_token_id:
        problems.append(f"image token id {processor.image_token_id} vs model {model.config.image_token_id}")
    if processor.image_seq_length != ivl.image_seq_length:
        problems.append(f"image_seq_length {processor.image_seq_length} vs model {ivl.image_seq_length}")
    if tile != ivl.vision_config.image_size[0]:
        problems.append(f"tile size {tile} vs model {ivl.vision_config.image_size[0]}")
    if problems:
        raise ValueError("processor and model disagree: " + "; ".join(problems))


def _bare_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def trainable_names(model: torch.nn.Module) -> set[str]:
    """Names (wrapper prefixes removed) of the parameters with requires_grad."""
    return {_bare_name(n) for n, p in model.named_parameters() if p.requires_grad}


def assert_trainable(model: torch.nn.Module, expected: list[str], stage: int) -> None:
    """Raise `RuntimeError` if the parameters with requires_grad are not exactly `expected` (set_trainable's)."""
    actual, wanted = trainable_names(model), set(expected)
    if actual != wanted:
        extra, missing = sorted(actual - wanted)[:10], sorted(wanted - actual)[:10]
        raise RuntimeError(
            f"stage {stage}: trainable parameters differ from set_trainable's: unexpected {extra}, "
            f"frozen but expected trainable {missing}"
        )


def summarize_trainable(model: torch.nn.Module) -> dict[str, Any]:
    """Trainable parameter counts per module group (`model.fusion`, `model.language_model`, ...)."""
    groups: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        parts = _bare_name(name).split(".")
        group = ".".join(parts[:2]) if parts[0] == "model" else parts[0]
        count = groups.setdefault(group, [0, 0])
        count[0] += param.numel() if param.requires_grad else 0
        count[1] += param.numel()
    trainable = sum(c[0] for c in groups.values())
    total = sum(c[1] for c in groups.values())
    return {
        "trainable": trainable,
        "total": total,
        "groups": {g: {"trainable": c[0], "total": c[1]} for g, c in sorted(groups.items())},
    }


def world_size() -> int:
    """Processes of this launch (`accelerate launch` / torchrun set WORLD_SIZE; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---- precision and threads -----------------------------------------------------------------------------------
def bf16_supported() -> bool:
    """True on a CUDA GPU with native bfloat16 (Ampere and later)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_bf16(requested: bool | None) -> bool:
    """Whether a trainer runs under bf16 autocast: `requested` when given, else bf16 exactly on a GPU that
    supports it. On CPU the default is float32 on purpose: a CPU without native bf16 (AVX2-only) runs a bf16
    matmul through a fallback kernel ~50x slower than float32 (BENCHMARKS.md, the dtype section)."""
    if requested is None:
        return bf16_supported()
    if requested and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError("recipe.bf16: true, but this GPU has no bfloat16 support; set it to false or null")
    return bool(requested)


def mixed_precision(requested: bool | None = None) -> str:
    """Accelerate's `mixed_precision` for `resolve_bf16(requested)`: "bf16" or "no"."""
    return "bf16" if resolve_bf16(requested) else "no"


def available_cpus() -> int:
    """CPUs this process may actually use: its affinity mask, capped by a cgroup v2 CPU quota when one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


THREADS_ENV = "VIPA_NUM_THREADS"  # user override of the intra-op thread count


def configure_threads(requested: int | None = None) -> int:
    """Sets torch's intra-op threads from `requested`, else $VIPA_NUM_THREADS, else `available_cpus()`, and
    returns the count. Never more than the CPUs the process may use: with tiny kernels, OpenMP threads that
    cannot all run spin at every barrier (a 40x slowdown was measured with one core busy elsewhere)."""
    if requested is None and os.environ.get(THREADS_ENV):
        try:
            requested = int(os.environ[THREADS_ENV])
        except ValueError:
            raise ValueError(
                f"{THREADS_ENV}: expected an int >= 1, got {os.environ[THREADS_ENV]!r}"
            ) from None
    n = available_cpus() if requested is None else requested
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_threads: expected an int >= 1, got {n!r}")
    torch.set_num_threads(n)
    return n


# The trained-checkpoint marker: written beside the weights by every training entry point (stages 1-3, the
# stand-ins); its absence means "untrained weights" (the Space says so, the main job re-trains).
TRAINING_MARKER = "training_summary.json"


def write_training_summary(
    output_dir: str | os.PathLike,
    stage: int | str,
    steps: int,
    dataset: str | os.PathLike,
    final_loss: float | None,
    recipe: Any,
    model: torch.nn.Module,
    **extra: Any,
) -> Path:
    """Writes `TRAINING_MARKER` beside the weights (atomically): what trained this checkpoint.

    recipe: a dataclass (its fields are written) or a dict; `extra` adds fields (e.g. `stand_in=True`)."""
    summary = {
        "stage": stage,
        "steps": int(steps),
        "dataset": str(dataset),
        "final_loss": final_loss,
        "recipe": dataclasses.asdict(recipe) if dataclasses.is_dataclass(recipe) else dict(recipe),
        "trainable_parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **extra,
    }
    return write_json(summary, Path(output_dir) / TRAINING_MARKER)
