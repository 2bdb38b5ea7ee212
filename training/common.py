"""Shared machinery of the spatial-aware pretraining stages 1 and 2 (paper §3.2.3, §4.1) on TRL's SFTTrainer.

A recipe (YAML) fixes the optimiser and schedule; the Hand3D dataset is checked before the first step (missing
columns are a `ValueError` at start-up; undecodable images, malformed chats and samples longer than the context
are skipped and counted in `OUTPUT/data_report.json`); the trainable parameter set is logged and asserted
against `set_trainable`; checkpoints are safetensors and `resume=True` continues from the last one.

Usage (what `training.stage1` / `training.stage2` and `vipa-train` do):

    from training.common import load_recipe, run_stage
    recipe = load_recipe("cpu-tiny")                      # or "paper", or a path to a YAML file
    run_stage(1, recipe, model_dir="ckpt/vipa-init", data_dir="hand3d", output_dir="runs/stage1")
    # runs/stage1 is then a VIPA checkpoint: AutoModel.from_pretrained(..., trust_remote_code=True)
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
import torch
import yaml
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hand3d_dataset.loading import load_hand3d
from modeling_vipa.modeling_vipa import VipaForConditionalGeneration, add_motion_tokens, set_trainable
from processing_vipa.processing_vipa import IMAGE_PLACEHOLDER, VipaProcessor

logger = logging.getLogger("vipa.training")

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
# Hand3D dataset config per stage (DESIGN.md §3): stage 1 reads Hand3D-visual, stage 2 Hand3D-action.
STAGE_DATA_CONFIG = {1: "visual", 2: "action"}
# Columns every Hand3D row has (DESIGN.md §3); training reads `images` and `messages`, `id` names skipped rows.
REQUIRED_COLUMNS = {
    "visual": ("id", "source", "clip_id", "task_type", "images", "messages", "target"),
    "action": (
        "id",
        "source",
        "clip_id",
        "task_type",
        "images",
        "messages",
        "target",
        "trajectory",
        "motion_ids",
    ),
}
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
    bf16: bool = False  # bfloat16 autocast (GPU)
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
        if not 0.0 <= self.max_skip_fraction < 1.0:
            raise ValueError(
                f"recipe.max_skip_fraction: expected a value in [0, 1), got {self.max_skip_fraction!r}"
            )

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """global_batch_size / (per_device_batch_size x world_size); it must divide exactly."""
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"recipe: global_batch_size={self.global_batch_size} is not a multiple of per_device_batch_size "
                f"({self.per_device_batch_size}) x processes ({world_size}) = {per_step}"
            )
        return self.global_batch_size // per_step


def load_recipe(name_or_path: str | os.PathLike, **overrides: Any) -> Recipe:
    """A `Recipe` from a shipped name (`paper`, `cpu-tiny`) or a YAML file; `overrides` replace fields.

    Unknown keys are a `ValueError` (a typo must not silently fall back to a default)."""
    path = Path(name_or_path)
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        path = shipped
    elif not path.is_file():
        names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ValueError(f"recipe: {str(name_or_path)!r} is neither a shipped recipe {names} nor a YAML file")
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path}: expected a mapping of fields, got {type(values).__name__}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"recipe {path}: unknown fields {unknown}; known: {sorted(known)}")
    return Recipe(**values)


def resolve_recipe(recipe: str | os.PathLike | Recipe, max_steps: int | None = None) -> Recipe:
    """A shipped name, YAML path or `Recipe`, with `max_steps` (when given) replacing its length."""
    if not isinstance(recipe, Recipe):
        return load_recipe(recipe, max_steps=max_steps)  # a None override is ignored
    return recipe if max_steps is None else dataclasses.replace(recipe, max_steps=max_steps)


# ---- data ----------------------------------------------------------------------------------------------------
def load_hand3d_split(data_dir: str | os.PathLike, config: str, split: str = "train") -> datasets.Dataset:
    """One split of a published Hand3D folder (`load_dataset(dir, "visual" | "action")`), columns checked."""
    if config not in REQUIRED_COLUMNS:
        raise ValueError(f"config: expected one of {sorted(REQUIRED_COLUMNS)}, got {config!r}")
    return load_hand3d(data_dir, config, split=split, required_columns=REQUIRED_COLUMNS[config])


def _check_row(row: dict[str, Any], processor: VipaProcessor, max_length: int) -> str | None:
    """Why a row cannot be trained on ("undecodable_image", "bad_messages", "too_long"), or None if it can."""
    images = row["images"] or []
    for image in images:
        try:
            if isinstance(image, dict):  # Image(decode=False): {"bytes", "path"}
                source = io.BytesIO(image["bytes"]) if image.get("bytes") else image.get("path")
                with PIL.Image.open(source) as opened:
                    opened.load()
            else:
                image.load()
        except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data; all mean "skip this row"
            return "undecodable_image"
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return "bad_messages"
    roles = [m.get("role") for m in messages]
    if roles[-1] != "assistant" or "user" not in roles:
        return "bad_messages"
    n_image_entries = sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for c in m["content"]
        if c.get("type") == "image"
    )
    if n_image_entries != len(images) or not 1 <= len(images) <= processor.max_frames:
        return "bad_messages"
    try:
        text = processor.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template error (unknown role, odd content) means a malformed chat
        return "bad_messages"
    # Each placeholder becomes <img> + image_seq_length x <IMG_CONTEXT> + </img>; special tokens never merge with
    # their neighbours, so one <IMG_CONTEXT> per frame plus the rest counted gives the collator's exact length
    # without tokenising hundreds of identical image tokens per sample.
    one = processor.start_image_token + processor.context_image_token + processor.end_image_token
    ids = processor.tokenizer(text.replace(IMAGE_PLACEHOLDER, one), add_special_tokens=False)["input_ids"]
    if len(ids) + len(images) * (processor.image_seq_length - 1) > max_length:
        return "too_long"
    return None


def validate_dataset(
    dataset: datasets.Dataset, processor: VipaProcessor, max_length: int, max_skip_fraction: float
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The rows that can be trained on, and a report of what was skipped and why.

    Every image is decoded once, every chat rendered and its token count (image tokens included) compared with
    `max_length`, so that no bad row reaches a training step. Raises `ValueError` when nothing is left or more
    than `max_skip_fraction` of the rows were skipped.

    Returns:
        (the kept rows, {"rows", "kept", "skipped": {reason: count}, "skipped_ids": {reason: [first ids]}}).
    """
    raw = dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))
    keep: list[int] = []
    skipped: dict[str, int] = {"undecodable_image": 0, "bad_messages": 0, "too_long": 0}
    skipped_ids: dict[str, list[str]] = {k: [] for k in skipped}
    for i, row in enumerate(raw.select_columns(["id", "images", "messages"])):
        reason = _check_row(row, processor, max_length)
        if reason is None:
            keep.append(i)
            continue
        skipped[reason] += 1
        if len(skipped_ids[reason]) < 20:  # enough to find them, bounded for huge datasets
            skipped_ids[reason].append(str(row["id"]))
    report = {"rows": len(dataset), "kept": len(keep), "skipped": skipped, "skipped_ids": skipped_ids}
    if not keep:
        raise ValueError(f"dataset: no trainable rows left after validation: {report}")
    fraction = 1.0 - len(keep) / len(dataset)
    if fraction > max_skip_fraction:
        raise ValueError(
            f"dataset: validation skipped {fraction:.1%} of the rows, more than max_skip_fraction="
            f"{max_skip_fraction:.1%}: {report}"
        )
    return dataset.select(keep), report


# ---- model ---------------------------------------------------------------------------------------------------
def load_model_and_processor(
    model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[VipaForConditionalGeneration, VipaProcessor]:
    """A VIPA checkpoint folder (model + processor, as `save_pretrained` writes them), checked for agreement."""
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"model_dir: no VIPA checkpoint (config.json) in {str(model_dir)!r}")
    model = VipaForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype)
    # the local class is used, never the checkpoint's copy; False also stops AutoTokenizer's interactive prompt
    processor = VipaProcessor.from_pretrained(str(model_dir), trust_remote_code=False)
    check_compatible(model, processor)
    return model, processor


def check_compatible(model: VipaForConditionalGeneration, processor: VipaProcessor) -> None:
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


class TrainableSetCallback(TrainerCallback):
    """Re-asserts the trainable set once the trainer has wrapped the model (DDP / FSDP / accelerate prepare)."""

    def __init__(self, expected: list[str], stage: int) -> None:
        self.expected, self.stage = expected, stage

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            assert_trainable(model, self.expected, self.stage)


# ---- run -----------------------------------------------------------------------------------------------------
def world_size() -> int:
    """Processes of this launch (`accelerate launch` / torchrun set WORLD_SIZE; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_trainer(
    stage: int,
    recipe: Recipe,
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    callbacks: list[TrainerCallback] | None = None,
) -> Any:
    """An `SFTTrainer` for stage 1 or 2, after every start-up check (see the module docstring)."""
    from trl import SFTConfig, SFTTrainer  # heavy import, only where a trainer is built

    if stage not in STAGE_DATA_CONFIG:
        raise ValueError(f"stage: expected 1 or 2 (stage 3 runs on Accelerate, not TRL), got {stage!r}")
    output_dir = Path(output_dir)
    model, processor = load_model_and_processor(model_dir)
    tile = processor.image_processor.size["height"]
    if recipe.image_size is not None and recipe.image_size != tile:
        raise ValueError(
            f"recipe.image_size={recipe.image_size} but the checkpoint's processor uses {tile} px tiles"
        )
    if stage == 2:
        # paper §3.2.3: stage 2 "extends the LLM vocabulary to include a set of motion tokens"; a stage-1
        # output has none yet, a resumed or repeated stage 2 already has them (idempotent)
        add_motion_tokens(model, processor)
    expected = set_trainable(model, stage)
    summary = summarize_trainable(model)
    logger.info(
        "stage %d: %d of %d parameters trainable (%d tensors): %s",
        stage,
        summary["trainable"],
        summary["total"],
        len(expected),
        {g: c["trainable"] for g, c in summary["groups"].items() if c["trainable"]},
    )

    dataset = load_hand3d_split(data_dir, STAGE_DATA_CONFIG[stage], "train")
    dataset, report = validate_dataset(dataset, processor, recipe.max_length, recipe.max_skip_fraction)
    logger.info("data: %d rows, %d kept, skipped %s", report["rows"], report["kept"], report["skipped"])
    output_dir.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:
        (output_dir / "data_report.json").write_text(json.dumps(report, indent=2))
        (output_dir / "trainable_parameters.json").write_text(
            json.dumps({"stage": stage, **summary, "names": expected}, indent=2)
        )

    use_cpu = not torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(output_dir),
        optim=recipe.optim,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        weight_decay=recipe.weight_decay,
        per_device_train_batch_size=recipe.per_device_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps(world_size()),
        num_train_epochs=recipe.num_train_epochs,
        max_steps=recipe.max_steps,
        bf16=recipe.bf16 and not use_cpu,
        gradient_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing_kwargs={
            "use_reentrant": False
        },  # reentrant needs inputs with grad; ours have none
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        logging_steps=recipe.logging_steps,
        seed=recipe.seed,
        data_seed=recipe.seed,
        dataloader_num_workers=recipe.dataloader_num_workers,
        use_cpu=use_cpu,
        assistant_only_loss=True,
        # every kept sample fits max_length (validated above): TRL's truncation would cut image tokens
        max_length=None,
        report_to=[],
        disable_tqdm=True,
    )
    trainer_cls = SFTTrainer
    if recipe.spatial_cache:  # CUT3R is frozen in stages 1 and 2: its tokens never change during a run
        from training.spatial_cache import SpatialTokenCache

        trainer_cls = _with_spatial_cache(
            SFTTrainer, SpatialTokenCache(output_dir / "spatial_cache", model.model.spatial_encoder.eval())
        )
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[TrainableSetCallback(expected, stage), *(callbacks or [])],
    )
    assert_trainable(trainer.model, expected, stage)
    trainer.vipa_data_report = report
    return trainer


def _with_spatial_cache(trainer_cls: type, cache: Any) -> type:
    """`trainer_cls` whose loss reads V_spa from `cache` (a `SpatialTokenCache`) instead of running CUT3R:
    each batch's `spatial_pixel_values` become `spatial_tokens` before the model sees them."""

    class CachedSpatialTrainer(trainer_cls):
        spatial_cache = cache

        def compute_loss(self, model, inputs, *args, **kwargs):
            if inputs.get("spatial_pixel_values") is not None:
                inputs = dict(inputs)
                pixels = inputs.pop("spatial_pixel_values")
                inputs["spatial_tokens"] = cache.get_or_compute(pixels, inputs["spatial_frame_mask"])
            return super().compute_loss(model, inputs, *args, **kwargs)

    return CachedSpatialTrainer


def run_stage(
    stage: int,
    recipe: Recipe,
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
) -> Any:
    """Train stage 1 or 2 and save the final VIPA checkpoint (model + processor, remote code) in `output_dir`.

    resume: continue from the last `checkpoint-N` in `output_dir` (optimizer, scheduler, RNG and data position
    included); a `ValueError` when there is none. Returns the trainer.
    """
    checkpoint = None
    if resume:
        checkpoint = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
        if checkpoint is None:
            raise ValueError(f"resume: no checkpoint-N folder in {str(output_dir)!r} to resume from")
        logger.info("resuming from %s", checkpoint)
    trainer = build_trainer(stage, recipe, model_dir, data_dir, output_dir, callbacks)
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.state.global_step < trainer.state.max_steps:
        logger.warning("stopped at step %d of %d", trainer.state.global_step, trainer.state.max_steps)
        return trainer  # stopped early (callback or signal): the last checkpoint is the state to resume
    trainer.save_model(str(output_dir))  # model.save_pretrained (remote code) + processor.save_pretrained
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(output_dir))
        write_training_summary(trainer, stage, recipe, data_dir, output_dir)
    return trainer


TRAINING_SUMMARY = (
    "training_summary.json"  # the Space's "this checkpoint is trained" marker (spaces_demo.app)
)


def write_training_summary(trainer: Any, stage: int, recipe: Recipe, data_dir, output_dir) -> Path:
    """Writes `training_summary.json` beside the weights (atomically): what trained this checkpoint."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "stage": stage,
        "steps": int(trainer.state.global_step),
        "dataset": str(data_dir),
        "final_loss": losses[-1] if losses else None,
        "recipe": dataclasses.asdict(recipe),
        "trainable_parameters": int(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)),
    }
    path = Path(output_dir) / TRAINING_SUMMARY
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, path)
    return path
