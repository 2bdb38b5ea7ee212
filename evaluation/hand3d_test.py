"""Hand3D-test evaluation of a VIPA checkpoint (paper §4.4, Table 8, Figures 8-9): generation and scoring.

    hand3d evaluate --model runs/stage2 --data hand3d --out eval   # results.json, figure8.png, figure9.png

    from evaluation.hand3d_test import evaluate_model_dir
    vipa = evaluate_model_dir("runs/stage1", "hand3d", config="visual")["configs"]["visual"]
    vipa["text"]["overall"]["distance_error_m"]

Answers are greedy. Text rows are generated freely. Motion rows (`instructional_motion_generation`,
`contextual_motion_prediction`) go through the one constrained motion decoder of the package
(`MotionDecoding`, also what the Space runs): the prompt ends with `<motion>`, and every generated token is a
motion bin until a whole number of x, y, z triplets (at least `min_waypoints`) may close with `</motion>`, so
the trajectory numbers measure the decoder users see. The scoring itself (what a row's answer is worth) is in
`hand3d_dataset.scoring`, which needs no model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from hand3d_dataset.atomic import write_json
from hand3d_dataset.scoring import (
    CONFIGS,
    evaluate_predictions,
    finite,
    is_motion_row,
    load_rows,
    plot_figure8,
    plot_figure9,
    summarize,
)
from training.common import load_model_and_processor

__all__ = [
    "EvalConfig",
    "MotionDecoding",
    "MotionTripletsOnly",
    "has_motion_tokens",
    "build_prompts",
    "generate_answers",
    "evaluate_model",
    "evaluate_model_dir",
]


@dataclass(frozen=True)
class EvalConfig:
    """Knobs of `evaluate_model`; validated on construction."""

    split: str = "test"  # dataset split to evaluate (Hand3D-test is the visual test split)
    config: str = (
        "auto"  # "visual", "action", "both", or "auto" (visual, plus action if the model has motion tokens)
    )
    batch_size: int = 8  # prompts per generate() call (left-padded)
    max_new_tokens: int | None = (
        None  # answer tokens of a text row (None: 64); motion rows: see MotionDecoding
    )
    limit: int | None = None  # evaluate only the first N rows of each config (None: all)
    progress: bool = True  # tqdm bar over batches
    num_figure9_samples: int = 4  # motion rows drawn in figure9.png

    def __post_init__(self) -> None:
        if self.config not in (*CONFIGS, "both", "auto"):
            raise ValueError(f"config: expected visual, action, both or auto, got {self.config!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {self.batch_size!r}")
        if self.max_new_tokens is not None and (
            not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens: expected an int >= 1 or None, got {self.max_new_tokens!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit: expected an int >= 1 or None, got {self.limit!r}")
        if self.num_figure9_samples < 1:
            raise ValueError(f"num_figure9_samples: expected >= 1, got {self.num_figure9_samples}")


# ---- the constrained motion decoder ---------------------------------------------------------------------------
class MotionTripletsOnly(LogitsProcessor):
    """Masks every token but the motion bins, and allows `</motion>` only once a whole number of triplets (at
    least `min_tokens`) exists; after `max_tokens` bins `</motion>` is the only choice.

    scores: (B, V). Only the generated part (after `prompt_len`, the left-padded batch's common prompt length)
    counts towards the triplets.
    """

    def __init__(self, bin_ids: list[int], end_id: int, prompt_len: int, min_tokens: int, max_tokens: int):
        if min_tokens % 3 or max_tokens % 3 or not 3 <= min_tokens <= max_tokens:
            raise ValueError(
                f"min_tokens/max_tokens: expected multiples of 3 with 3 <= min <= max, got {min_tokens}/{max_tokens}"
            )
        self.bins = torch.tensor(bin_ids)
        self.end_id, self.prompt_len = end_id, prompt_len
        self.min_tokens, self.max_tokens = min_tokens, max_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n = input_ids.shape[1] - self.prompt_len
        allowed = torch.full_like(scores, float("-inf"))
        if n < self.max_tokens:
            allowed[:, self.bins.to(scores.device)] = 0.0
        if n % 3 == 0 and n >= self.min_tokens:
            allowed[:, self.end_id] = 0.0
        return scores + allowed


@dataclass(frozen=True)
class MotionDecoding:
    """How a trajectory is generated: after `<motion>`, only bins, whole x, y, z triplets, then `</motion>`."""

    min_waypoints: int = 2  # a trajectory needs a start and an end
    max_waypoints: int = 16  # longest trajectory generated (3 motion tokens per waypoint)

    def __post_init__(self) -> None:
        if not isinstance(self.min_waypoints, int) or self.min_waypoints < 1:
            raise ValueError(f"min_waypoints: expected an int >= 1, got {self.min_waypoints!r}")
        if not isinstance(self.max_waypoints, int) or self.max_waypoints < self.min_waypoints:
            raise ValueError(f"max_waypoints: expected an int >= min_waypoints, got {self.max_waypoints!r}")

    def prompt_suffix(self, processor: Any) -> str:
        """The text appended to a generation prompt: the `<motion>` delimiter."""
        return processor.tokenizer.convert_ids_to_tokens(processor.motion_start_token_id)

    def generate_kwargs(self, processor: Any, prompt_len: int) -> dict[str, Any]:
        """`model.generate` arguments for prompts of `prompt_len` tokens that end with `prompt_suffix`."""
        only = MotionTripletsOnly(
            processor.motion_token_ids,
            processor.motion_end_token_id,
            prompt_len,
            3 * self.min_waypoints,
            3 * self.max_waypoints,
        )
        return {
            "logits_processor": LogitsProcessorList([only]),
            "eos_token_id": processor.motion_end_token_id,
            "max_new_tokens": 3 * self.max_waypoints + 1,
        }


# ---- model --------------------------------------------------------------------------------------------------
def has_motion_tokens(model: Any, processor: Any) -> bool:
    """Whether both the model's config and the processor's vocabulary have the motion tokens (stage 2 adds them)."""
    return bool(getattr(model.config, "motion_token_ids", None)) and processor.has_motion_tokens


def build_prompts(rows: Sequence[Mapping], processor: Any) -> list[str]:
    """Chat-template prompts (generation prompt appended) from the rows' messages before the last assistant turn."""
    prompts = []
    for row in rows:
        msgs = list(row["messages"])
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        if last == 0:
            raise ValueError(f"row {row.get('id')!r}: no user message before the answer")
        prompts.append(processor.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True))
    return prompts


def generate_answers(
    model: Any,
    processor: Any,
    rows: Sequence[Mapping],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
    desc: str = "generate",
    motion: MotionDecoding | None = None,
) -> list[str]:
    """Greedy answers of the model, one string per row, in row order.

    Text rows get at most `max_new_tokens` tokens. Motion rows (when the processor has motion tokens) go
    through `motion` (default: `MotionDecoding` with `max_waypoints` = the longest ground truth, at least 16);
    their answer is the `<motion>` … `</motion>` text.
    Batches are left-padded (generation appends on the right, so every prompt must end at the same column) and
    hold rows of one kind only: with or without images (the processor takes no mix), text or motion.
    Special tokens are dropped from the text; motion tokens are ordinary tokens and stay.
    """
    from tqdm.auto import tqdm

    prompts = build_prompts(rows, processor)
    tok = processor.tokenizer
    eos = [
        i
        for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
        if isinstance(i, int) and i >= 0
    ]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    constrained = processor.has_motion_tokens and any(is_motion_row(r) for r in rows)
    if constrained and motion is None:
        longest = max(len(r["trajectory"]) for r in rows if is_motion_row(r))
        motion = MotionDecoding(max_waypoints=max(16, longest))
    groups: dict[tuple[bool, bool], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((bool(row["images"]), constrained and is_motion_row(row)), []).append(i)
    batches = [
        (is_motion, g[s : s + batch_size])
        for (_, is_motion), g in groups.items()
        for s in range(0, len(g), batch_size)
    ]
    out: list[str] = [""] * len(rows)
    device = next(model.parameters()).device
    for is_motion, idx in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        images = [list(rows[i]["images"]) for i in idx] if rows[idx[0]]["images"] else None
        suffix = motion.prompt_suffix(processor) if is_motion else ""
        batch = processor(
            images=images,
            text=[prompts[i] + suffix for i in idx],
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            batch["spatial_pixel_values"] = batch["spatial_pixel_values"].to(model.dtype)
        prompt_len = batch["input_ids"].shape[1]
        if is_motion:
            gen = motion.generate_kwargs(processor, prompt_len)
        else:
            gen = {"max_new_tokens": max_new_tokens, "eos_token_id": eos}
        with torch.no_grad():
            ids = model.generate(**batch, do_sample=False, pad_token_id=pad, **gen)
        for i, text in zip(idx, tok.batch_decode(ids[:, prompt_len:], skip_special_tokens=True)):
            out[i] = suffix + text.strip()
    return out


# ---- end to end ---------------------------------------------------------------------------------------------
def evaluate_model(
    model: Any,
    processor: Any,
    dataset_dir: str | os.PathLike,
    split: str = "test",
    config: str = "auto",
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    name: str = "model",
) -> dict:
    """Generate answers on a Hand3D split and score them (see the module docstring).

    Returns {"split", "configs": {cfg: evaluate_predictions result + "summary"}, "skipped": {cfg: reason},
    "plots": {...}}. With `out_dir`, also writes results.json (atomic), figure8.png (visual text rows, else
    any text rows) and figure9.png (action motion rows).
    Raises `ValueError` when the split or config is missing, or when motion evaluation is asked of a model
    without motion tokens (config "action" or "both"; "auto" then skips the action config and says so).
    """
    cfg = EvalConfig(
        split=split,
        config=config,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        limit=limit,
        progress=progress,
    )
    has_motion = has_motion_tokens(model, processor)
    wanted = {"visual": ["visual"], "action": ["action"], "both": list(CONFIGS), "auto": list(CONFIGS)}[
        cfg.config
    ]
    result: dict = {
        "model": name,
        "data": str(dataset_dir),
        "split": split,
        "configs": {},
        "skipped": {},
        "plots": {},
    }
    for c in wanted:
        rows = load_rows(dataset_dir, c, split, cfg.limit)
        if c == "action" and not has_motion and any(is_motion_row(r) for r in rows):
            msg = "the model has no motion tokens (config.motion_token_ids / processor vocabulary); run stage 2 first"
            if cfg.config == "auto":
                result["skipped"][c] = msg
                continue
            raise ValueError(f"config: motion evaluation on Hand3D-action was asked, but {msg}")
        preds = generate_answers(
            model,
            processor,
            rows,
            cfg.batch_size,
            cfg.max_new_tokens or 64,
            cfg.progress,
            desc=f"{c} {split}",
        )
        res = evaluate_predictions(preds, rows, processor.motion_tokenizer)
        res["summary"] = summarize(res)
        result["configs"][c] = res
        if out_dir is not None and res["motion"] is not None:
            motion_rows = [r for r in rows if is_motion_row(r)][: cfg.num_figure9_samples]
            preds3d = [
                np.asarray(s["predicted"]) if s["decodable"] else None for s in res["motion"]["samples"]
            ]
            fig9 = plot_figure9(motion_rows, preds3d[: len(motion_rows)], Path(out_dir) / "figure9.png")
            result["plots"]["figure9"] = str(fig9)
    if out_dir is not None:
        text_src = next(
            (c for c in ("visual", "action") if (result["configs"].get(c) or {}).get("text")), None
        )
        if text_src is not None:
            path = plot_figure8({name: result["configs"][text_src]["text"]}, Path(out_dir) / "figure8.png")
            result["plots"]["figure8"] = str(path)
        result["results_json"] = str(write_json(finite(result), Path(out_dir) / "results.json"))
    return result


def evaluate_model_dir(model_dir: str | os.PathLike, dataset_dir: str | os.PathLike, **kwargs: Any) -> dict:
    """`evaluate_model` on a checkpoint folder (what `hand3d evaluate` runs)."""
    model, processor = load_model_and_processor(model_dir)
    kwargs.setdefault("name", Path(model_dir).name)
    return evaluate_model(model, processor, dataset_dir, **kwargs)
