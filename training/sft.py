"""What only the SFT stages 1 and 2 share (paper §3.2.3, §4.1): TRL's SFTTrainer on Hand3D.

The Hand3D dataset is checked before the first step (missing columns are a `ValueError` at start-up;
undecodable images, malformed chats and samples longer than the context are skipped and counted in
`OUTPUT/data_report.json`); the trainable parameter set is logged and asserted against `set_trainable`;
checkpoints are safetensors and `resume=True` continues from the last one. Precision is chosen on purpose
(`training.common.resolve_bf16`: float32 on CPU, bf16 on GPUs that support it).

Usage (what `training.stage1` / `training.stage2` and `vipa-train` do):

    from training.common import load_recipe
    from training.sft import run_stage
    recipe = load_recipe("cpu-tiny")                      # or "paper", or a path to a YAML file
    run_stage(1, recipe, model_dir="ckpt/vipa-init", data_dir="hand3d", output_dir="runs/stage1")
    # runs/stage1 is then a VIPA checkpoint: AutoModel.from_pretrained(..., trust_remote_code=True)
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hand3d_dataset.atomic import write_json
from hand3d_dataset.extras import require
from hand3d_dataset.loading import load_hand3d
from modeling_vipa.modeling_vipa import add_motion_tokens, set_trainable
from processing_vipa.processing_vipa import IMAGE_PLACEHOLDER, VipaProcessor
from training.common import (
    Recipe,
    assert_trainable,
    load_model_and_processor,
    logger,
    resolve_bf16,
    summarize_trainable,
    world_size,
    write_training_summary,
)

# Hand3D dataset config per stage (DESIGN.md §3): stage 1 reads Hand3D-visual, stage 2 Hand3D-action.
STAGE_DATA_CONFIG = {1: "visual", 2: "action"}


# ---- data ----------------------------------------------------------------------------------------------------
def load_hand3d_split(data_dir: str | os.PathLike, config: str, split: str = "train") -> datasets.Dataset:
    """One split of a published Hand3D folder (`load_dataset(dir, "visual" | "action")`), columns checked."""
    return load_hand3d(data_dir, config, split=split)


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


class TrainableSetCallback(TrainerCallback):
    """Re-asserts the trainable set once the trainer has wrapped the model (DDP / FSDP / accelerate prepare)."""

    def __init__(self, expected: list[str], stage: int) -> None:
        self.expected, self.stage = expected, stage

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            assert_trainable(model, self.expected, self.stage)


# ---- run -----------------------------------------------------------------------------------------------------
def build_trainer(
    stage: int,
    recipe: Recipe,
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    callbacks: list[TrainerCallback] | None = None,
) -> Any:
    """An `SFTTrainer` for stage 1 or 2, after every start-up check (see the module docstring)."""
    trl = require("trl", "train")  # heavy import, only where a trainer is built
    SFTConfig, SFTTrainer = trl.SFTConfig, trl.SFTTrainer

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
        write_json(report, output_dir / "data_report.json")
        write_json({"stage": stage, **summary, "names": expected}, output_dir / "trainable_parameters.json")

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
        bf16=resolve_bf16(recipe.bf16),
        fp16=False,
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
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        write_training_summary(
            output_dir,
            stage,
            trainer.state.global_step,
            data_dir,
            losses[-1] if losses else None,
            recipe,
            trainer.model,
        )
    return trainer
