"""STAND-INS for the pretrained parts of VIPA-VLA, trained from scratch on synthetic Hand3D data (CPU default).

The paper initialises VIPA-VLA from InternVL3.5-2B and the official CUT3R checkpoint (§3.2.3). Neither can be
downloaded here, so the CPU main job (`cpu_demo.main_job`) first trains small stand-ins for them. They are NOT
those models and every checkpoint they produce says so in its `training_summary.json` (`"stand_in": true`):

1. the semantic backbone (a tiny InternVL: vision tower + projector + Qwen3, no 3D branch) is trained on the
   Hand3D-visual TRAIN split, so it is also the Table-8 row "single-encoder model trained with Hand3D";
   the 3D branch exists in the checkpoint but is switched off exactly (`alpha = 0`, frozen), so
   `V_f = V_sem` and the LLM sees InternVL's path only;
2. the tiny CUT3R is trained on pointmap regression from the rendered metric depth of synth TRAIN clips:
   `conf * |X_pred - X_gt| / z_mean - beta * log(conf)` (CUT3R's confidence-weighted regression), with both
   pointmaps divided by the ground truth's mean depth (CUT3R's normalisation) so near and far scenes weigh
   alike while the metric scale is still learnt; plus `token_point_loss` (`cut3r_token_weight`): a linear
   readout of each last-layer patch token regresses its patch's mean 3D point, as CUT3R's linear-head
   (224 px) checkpoint reads its points from the tokens. Without it the DPT head's convolutions hold the 3D
   and V_spa carries no more of it than V_sem (`evaluation.probe3d`, 1,181-row main job: pair direction score
   of a linear probe 2.34 for V_spa vs 2.43 for V_sem; with it, 2.50 vs 2.42, distance error 0.045 vs 0.056 m).

A byte-level BPE tokenizer with Qwen3's chat tokens and InternVL's image tokens (the same construction as
`tests/tiny_assets.build_tiny_tokenizer`, replicated here because production code must not import tests)
is trained on the Hand3D texts.

Usage:

    from cpu_demo.standins import (
        StandinConfig, build_standin_processor, build_standin_tokenizer, standin_vipa_config,
    )
    cfg = StandinConfig.quick()
    tokenizer = build_standin_tokenizer(["The hand is left and down of the cup, 0.44 m."], vocab_size=300)
    config = standin_vipa_config(cfg, tokenizer)            # VipaConfig: tiny InternVL + tiny CUT3R + fusion
    processor = build_standin_processor(cfg, tokenizer)     # VipaProcessor matching it
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import PreTrainedTokenizerFast, TrainerCallback

from hand3d_dataset.cameras import backproject_depth
from hand3d_dataset.extras import require
from modeling_vipa.configuration_cut3r import Cut3rConfig
from modeling_vipa.configuration_vipa import VipaConfig, VipaFusionConfig, internvl_tiny_config
from modeling_vipa.modeling_vipa import VipaForConditionalGeneration
from modeling_vipa.spatial_encoder import Cut3rEncoder
from processing_vipa.processing_vipa import VipaProcessor
from training.common import resolve_bf16, world_size

__all__ = [
    "StandinConfig",
    "STANDIN_NOTE",
    "build_standin_tokenizer",
    "build_standin_processor",
    "standin_vipa_config",
    "init_standin_vision_positions",
    "TqdmCallback",
    "pointmap_loss",
    "gt_pointmaps",
    "pretrain_cut3r",
    "disable_spatial_branch",
    "pretrain_semantic_backbone",
]

STANDIN_NOTE = (
    "STAND-IN: trained from scratch on synthetic Hand3D data by cpu_demo.main_job because no pretrained "
    "InternVL3.5 / CUT3R weights are available offline; not the paper's pretrained models"
)
# Qwen3's chat tokens and InternVL's image tokens, after the byte-level vocabulary as in Qwen.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
]


_BOOL_FIELDS = ("dense_relative_depth",)  # StandinConfig switches
_OFF_AT_ZERO = (
    "dense_weight",
    "dense_depth_weight",
    "cut3r_token_weight",
)  # loss weights: 0 switches the loss off


@dataclass
class StandinConfig:
    """Sizes and schedules of the stand-in models (defaults: the CPU main job, ~14 min on 2 cores). Batches are
    global: a data-parallel run (`cpu_demo.parallel`) splits them over its processes."""

    tile_size: int = 112  # InternVL tile side, px (patch 14 -> 64 patches -> 16 tokens per frame)
    vision_hidden: int = 96  # InternViT stand-in width
    vision_layers: int = 2  # InternViT stand-in depth
    text_hidden: int = 128  # Qwen3 stand-in width
    text_layers: int = 3  # Qwen3 stand-in depth
    text_heads: int = 4  # Qwen3 attention heads (head_dim = text_hidden / text_heads)
    vocab_size: int = 700  # BPE vocabulary trained on the Hand3D texts (before motion tokens)
    spatial_size: int = (
        128  # CUT3R input side, px (square, no crop: 8 x 8 patches of 16 px, as the ViT has 8 x 8)
    )
    cut3r_dim: int = 64  # CUT3R encoder and decoder width (d_s)
    cut3r_enc_layers: int = 3  # CUT3R encoder depth
    cut3r_dec_layers: int = 2  # CUT3R decoder depth
    fusion_dim: int = 64  # fusion cross-attention width
    fusion_heads: int = 4  # fusion attention heads
    cut3r_steps: int = 1200  # pointmap-regression steps of the CUT3R stand-in
    cut3r_batch: int = 4  # clips per CUT3R step (split over the data-parallel processes)
    cut3r_frames: int = 2  # consecutive frames per clip in a CUT3R step (exercises the recurrent state)
    cut3r_lr: float = 1e-3  # AdamW peak learning rate of the CUT3R stand-in (cosine to 0)
    cut3r_token_weight: float = 1.0  # weight of token_point_loss (V_spa holds 3D linearly); 0: off
    backbone_steps: int = 1500  # optimiser steps of the semantic backbone on Hand3D-visual train
    backbone_batch: int = 16  # samples per backbone step (split over the data-parallel processes)
    backbone_lr: float = 1e-3  # AdamW peak learning rate of the backbone (cosine, 3% warm-up)
    dense_weight: float = (
        1.0  # weight of the dense name loss (cpu_demo.dense_names) in backbone steps; 0: off
    )
    dense_batch: int = 32  # frames per dense name loss term (split over the data-parallel processes)
    dense_depth_weight: float = 1.0  # weight of the dense loss's per-token depth readout (0: names only)
    dense_relative_depth: bool = True  # depth readout up to scale (per-frame mean log depth removed)

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if name in _BOOL_FIELDS:
                if not isinstance(value, bool):
                    raise ValueError(f"StandinConfig.{name}: expected a bool, got {value!r}")
            elif (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or value < 0
                or (value == 0 and name not in _OFF_AT_ZERO)
            ):
                raise ValueError(f"StandinConfig.{name}: expected a number > 0, got {value!r}")
        if self.tile_size % 28:
            raise ValueError(
                f"StandinConfig.tile_size: expected a multiple of 28 (patch 14, shuffle 0.5), got {self.tile_size}"
            )
        if self.spatial_size % 16:
            raise ValueError(
                f"StandinConfig.spatial_size: expected a multiple of 16, got {self.spatial_size}"
            )
        if self.text_hidden % self.text_heads:
            raise ValueError(
                f"StandinConfig.text_hidden={self.text_hidden} not a multiple of text_heads={self.text_heads}"
            )

    @classmethod
    def quick(cls) -> StandinConfig:
        """Seconds-long settings for tests (`--quick`): the pipeline runs, nothing is learnt."""
        return cls(
            tile_size=56, vision_hidden=32, text_hidden=32, text_layers=2, text_heads=2, vocab_size=320,
            spatial_size=32, cut3r_dim=32, cut3r_enc_layers=2, fusion_dim=32, fusion_heads=2,
            cut3r_steps=3, cut3r_batch=2, backbone_steps=3, backbone_batch=2, dense_batch=4,
        )  # fmt: skip


# ---- tokenizer, config, processor -----------------------------------------------------------------------------
def build_standin_tokenizer(texts: Iterable[str], vocab_size: int = 700) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (every byte encodable), Qwen3/InternVL special tokens.

    `<|endoftext|>` pads, `<|im_end|>` ends a turn (eos), no BOS; `<img>`, `</img>`, `<IMG_CONTEXT>`, `<video>`
    are InternVL's image tokens. Deterministic for the same texts.
    """
    corpus = [t for t in texts if isinstance(t, str) and t]
    if not corpus:
        raise ValueError("texts: expected at least one non-empty string to train the tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )


def standin_cut3r_config(cfg: StandinConfig) -> Cut3rConfig:
    """The CUT3R stand-in: Cut3rConfig.tiny() widened to `cut3r_dim`, input `spatial_size`."""
    d = cfg.cut3r_dim
    return Cut3rConfig.tiny(
        img_size=cfg.spatial_size,
        enc_embed_dim=d,
        enc_depth=cfg.cut3r_enc_layers,
        enc_num_heads=max(2, d // 32),
        dec_embed_dim=d,
        dec_depth=cfg.cut3r_dec_layers,
        dec_num_heads=max(2, d // 32),
        state_dec_num_heads=max(2, d // 32),
        dpt_layer_dims=(d // 4, d // 2, d // 2, d),
        dpt_feature_dim=d // 2,
    )


def standin_vipa_config(cfg: StandinConfig, tokenizer: PreTrainedTokenizerFast) -> VipaConfig:
    """VipaConfig of the stand-in model; the image token id and the vocabulary come from `tokenizer`."""
    patches = (cfg.tile_size // 14) ** 2
    head_dim = cfg.text_hidden // cfg.text_heads
    vision = {
        "hidden_size": cfg.vision_hidden,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": max(2, cfg.vision_hidden // 32),
        "intermediate_size": 2 * cfg.vision_hidden,
        "image_size": cfg.tile_size,
        "patch_size": 14,
    }
    text = {
        "model_type": "qwen3",
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.text_hidden,
        "intermediate_size": 3 * cfg.text_hidden,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.text_heads,
        "num_key_value_heads": max(1, cfg.text_heads // 2),
        "head_dim": head_dim,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    }
    ivl = internvl_tiny_config(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=patches // 4,
    )
    return VipaConfig.tiny(
        internvl_config=ivl,
        spatial_config=standin_cut3r_config(cfg),
        fusion_layer_config=VipaFusionConfig(num_heads=cfg.fusion_heads, attention_dim=cfg.fusion_dim, dropout=0.0),
    )  # fmt: skip


def build_standin_processor(cfg: StandinConfig, tokenizer: PreTrainedTokenizerFast) -> VipaProcessor:
    """The VipaProcessor of the stand-in model (tile `tile_size`, CUT3R `spatial_size` square)."""
    return VipaProcessor(
        image_processor=VipaProcessor.default_image_processor(cfg.tile_size),
        tokenizer=tokenizer,
        image_seq_length=(cfg.tile_size // 14) ** 2 // 4,
        spatial_image_size=(cfg.spatial_size, cfg.spatial_size),
    )


class TqdmCallback(TrainerCallback):
    """A tqdm bar over the optimiser steps of a transformers Trainer (the stage code disables its own)."""

    def __init__(self, desc: str) -> None:
        self.desc, self.bar = desc, None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        if not state.is_world_process_zero:  # one bar per data-parallel launch
            return
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def init_standin_vision_positions(model: VipaForConditionalGeneration) -> None:
    """Give the InternViT stand-in informative position embeddings: a fixed 2D sine-cosine code per patch.

    transformers initialises InternViT's learned position embeddings to zero (right for loading a pretrained
    checkpoint, whose embeddings are trained). Trained from zero, a tiny stand-in stays blind to WHERE a patch
    is for far longer than the CPU budget: on a toy "is the coloured square left or right, up or down" task it
    was still at chance after 400 steps, while with this code it reached 97.5 % after 2000. The code is what a
    pretrained ViT would bring (MAE-style fixed embeddings); it stays trainable. CLS gets none.
    """
    from modeling_vipa.fusion import grid_centres, sincos_2d

    pos = model.model.vision_tower.embeddings.position_embeddings
    if pos is None:
        raise ValueError("model: the vision tower has no absolute position embeddings to initialise")
    n = pos.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"model: expected a square patch grid, got {n} position embeddings after CLS")
    with torch.no_grad():
        pos[0, 0].zero_()
        pos[0, 1:] = sincos_2d(grid_centres(side, side), pos.shape[-1]).to(pos.dtype)


# ---- CUT3R stand-in: pointmap regression from rendered metric depth ---------------------------------------------
def gt_pointmaps(depth: np.ndarray, K: np.ndarray, size: int) -> np.ndarray:
    """Ground-truth pointmaps at the CUT3R input size.

    depth: (T, H, W) metric z-depth, metres (H = W); K: (3, 3) or (T, 3, 3). The square frame is resized to
    `size` x `size` by the processor, so the pointmap is back-projected at full resolution and area-averaged to
    the same grid (a pixel of the small image sees the mean of the rays it covers).
    Returns (T, size, size, 3) float32, camera frame, metres (NaN where the depth had holes).
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 3 or depth.shape[1] != depth.shape[2]:
        raise ValueError(f"depth: expected (T, H, H) square frames, got {depth.shape}")
    pts = torch.from_numpy(backproject_depth(depth, K)).permute(0, 3, 1, 2)  # (T, 3, H, W)
    pts = F.adaptive_avg_pool2d(pts, size)  # NaN holes propagate: the loss masks them
    return pts.permute(0, 2, 3, 1).float().numpy()


def pointmap_loss(
    pts_pred: torch.Tensor, conf: torch.Tensor, pts_gt: torch.Tensor, beta: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUT3R's confidence-weighted regression, both pointmaps divided by the ground truth's mean depth.

    pts_pred, pts_gt: (B, T, H, W, 3) camera frame, metres (gt NaN = no depth); conf: (B, T, H, W) >= 1.
    Returns (loss, mean normalised L2 error over valid pixels, detached).
    """
    valid = torch.isfinite(pts_gt).all(-1)
    gt = torch.nan_to_num(pts_gt)
    # per frame: the mean z over valid pixels (the scene scale CUT3R normalises by)
    z_mean = (gt[..., 2] * valid).sum((-1, -2)) / valid.sum((-1, -2)).clamp(min=1)
    scale = z_mean.clamp(min=1e-3)[..., None, None, None]
    err = ((pts_pred - gt) / scale).norm(dim=-1)
    loss = (conf * err - beta * torch.log(conf))[valid].mean()
    return loss, err[valid].mean().detach()


def token_point_loss(
    tokens: torch.Tensor, readout: nn.Linear, pts_gt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear readout of each CUT3R patch token regresses its patch's mean 3D point.

    The DPT head turns several decoder layers into pointmaps through convolutions and an exp, so the last
    layer's tokens (V_spa) need not hold 3D in a form the fusion's linear values can pass on. This term asks
    them to: readout(token) ~ the mean of the patch's valid ground-truth points, error divided by the frame's
    mean depth as in `pointmap_loss`.
    tokens: (B, T, N, d_s) patch tokens (pose token dropped), N = (S/p)^2; pts_gt: (B, T, S, S, 3), NaN holes.
    Returns (loss, mean normalised L2 error, detached).
    """
    B, T, N, _ = tokens.shape
    S = pts_gt.shape[2]
    g = math.isqrt(N)
    if g * g != N or S % g:
        raise ValueError(f"tokens: {N} patch tokens do not tile a {S} x {S} pointmap")
    valid = torch.isfinite(pts_gt).all(-1)
    gt = torch.nan_to_num(pts_gt)
    p = S // g

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (B, T, S, S, ...) -> per-patch sums (B, T, g, g, ...)
        return x.reshape(B, T, g, p, g, p, *x.shape[4:]).sum((3, 5))

    count = blocks(valid.float())
    target = blocks(gt * valid[..., None]) / count.clamp(min=1)[..., None]
    has = count.reshape(B, T, N) > 0
    z_mean = (gt[..., 2] * valid).sum((-1, -2)) / valid.sum((-1, -2)).clamp(min=1)
    err = (readout(tokens) - target.reshape(B, T, N, 3)).norm(dim=-1) / z_mean.clamp(min=1e-3)[..., None]
    loss = err[has].mean()
    return loss, loss.detach()


def _cut3r_batches(
    clips: Sequence[dict], cfg: StandinConfig, batch: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random batch of `batch` clips: (B, T, 3, S, S) CUT3R pixels and (B, T, S, S, 3) ground-truth
    pointmaps."""
    pix, pts = [], []
    for _ in range(batch):
        clip = clips[int(rng.integers(len(clips)))]
        n = clip["pixels"].shape[0]
        start = int(rng.integers(0, max(1, n - cfg.cut3r_frames + 1)))
        pix.append(clip["pixels"][start : start + cfg.cut3r_frames])
        pts.append(clip["points"][start : start + cfg.cut3r_frames])
    return torch.from_numpy(np.stack(pix)), torch.from_numpy(np.stack(pts))


def prepare_cut3r_clips(clips: Iterable[Any], processor: VipaProcessor, size: int) -> list[dict]:
    """Synth `Clip`s (frames, depth, K) -> [{"pixels": (T, 3, S, S), "points": (T, S, S, 3)}]."""
    out = []
    for clip in clips:
        if clip.depth is None:
            raise ValueError(
                f"clip {clip.clip_id}: no metric depth; the CUT3R stand-in trains on rendered depth"
            )
        frames = [PIL.Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in clip.frames]
        pixels = np.stack([processor.spatial_frame(f) for f in frames]).astype(np.float32)
        out.append({"pixels": pixels, "points": gt_pointmaps(clip.depth, clip.K, size)})
    return out


class _Cut3rObjective(nn.Module):
    """The CUT3R stand-in's training loss as one module (so DDP can wrap it): pointmap regression plus, with
    `token_weight`, `token_point_loss` through a linear `readout` of the last-layer patch tokens."""

    def __init__(self, encoder: Cut3rEncoder, token_weight: float) -> None:
        super().__init__()
        self.encoder, self.token_weight = encoder, token_weight
        # token_point_loss's probe, discarded after training
        self.readout = nn.Linear(encoder.config.hidden_size, 3) if token_weight else None

    def forward(self, pixels: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels (B, T, 3, S, S), points (B, T, S, S, 3) -> (loss, [pointmap error, token error]) scalars."""
        out = self.encoder(pixels, return_heads=True)
        loss, err = pointmap_loss(out.pts3d_self, out.conf, points)
        t_err = torch.full_like(err, float("nan"))
        if self.readout is not None:
            t_loss, t_err = token_point_loss(out.tokens[:, :, 1:], self.readout, points)
            loss = loss + self.token_weight * t_loss
        return loss, torch.stack([err.detach(), t_err.detach()])


def pretrain_cut3r(
    encoder: Cut3rEncoder,
    clips: Sequence[dict],
    cfg: StandinConfig,
    processor: VipaProcessor,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train the CUT3R stand-in in place on `prepare_cut3r_clips` output; returns a summary dict.

    The summary holds the first/last 20-step means of the normalised pointmap error (dimensionless:
    a fraction of the scene depth) and of the loss, steps, seconds.

    Data parallel when torch.distributed is initialised (`cpu_demo.parallel`): `clips` is this rank's share,
    each rank draws `cut3r_batch / world` of them per step (its own random stream), DDP averages the
    gradients, and the summary's errors and losses are means over all ranks.
    """
    import torch.distributed as dist
    from tqdm.auto import tqdm

    if not clips:
        raise ValueError("clips: no training clips for the CUT3R stand-in")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if cfg.cut3r_batch % world:
        raise ValueError(
            f"StandinConfig.cut3r_batch: {cfg.cut3r_batch} clips do not split over {world} processes"
        )
    rng = np.random.default_rng(seed if world == 1 else [seed, rank])
    torch.manual_seed(seed)
    encoder.train()
    objective = _Cut3rObjective(encoder, cfg.cut3r_token_weight)
    params = list(objective.parameters())
    # find_unused_parameters: the encoder's parts this loss does not reach (e.g. its world-frame head) get no
    # gradient, as in one process, where AdamW skips them
    ddp = torch.nn.parallel.DistributedDataParallel
    model = ddp(objective, find_unused_parameters=True) if world > 1 else objective
    # fused: one kernel for all 2.3M parameters (15.7 -> 2.8 ms a step on one CPU thread)
    opt = torch.optim.AdamW(params, lr=cfg.cut3r_lr, weight_decay=0.01, fused=True)
    warm = max(1, cfg.cut3r_steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.cut3r_steps))),
    )
    errors, losses, token_errors = [], [], []
    t0 = time.time()
    bar = tqdm(
        range(cfg.cut3r_steps),
        desc="CUT3R stand-in (pointmaps)",
        unit="step",
        disable=not progress or rank != 0,
    )
    for _ in bar:
        pixels, points = _cut3r_batches(clips, cfg, cfg.cut3r_batch // world, rng)
        loss, errs = model(pixels, points)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        logged = torch.cat([loss.detach().reshape(1), errs])  # [loss, pointmap error, token error]
        if world > 1:
            dist.all_reduce(logged)
            logged /= world
        losses.append(float(logged[0]))
        errors.append(float(logged[1]))
        if cfg.cut3r_token_weight:
            token_errors.append(float(logged[2]))
        bar.set_postfix(err=f"{np.mean(errors[-20:]):.3f}")
    encoder.eval()
    k = min(20, len(errors))
    return {
        "steps": cfg.cut3r_steps,
        "processes": world,
        "seconds": round(time.time() - t0, 1),
        "pointmap_error_rel_first": float(np.mean(errors[:k])),
        "pointmap_error_rel_last": float(np.mean(errors[-k:])),
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "token_readout_error_rel_first": float(np.mean(token_errors[:k])) if token_errors else None,
        "token_readout_error_rel_last": float(np.mean(token_errors[-k:])) if token_errors else None,
        "note": "error = |X_pred - X_gt| / mean GT depth per frame, on synth TRAIN clips",
    }


# ---- semantic backbone stand-in ----------------------------------------------------------------------------------
def disable_spatial_branch(model: VipaForConditionalGeneration) -> None:
    """The single-encoder model: `config.use_spatial_branch = False` (CUT3R and the fusion are skipped, so
    V_f = V_sem, InternVL's own path; saved with the checkpoint) and the fusion frozen."""
    model.config.use_spatial_branch = False
    for p in model.model.fusion.parameters():
        p.requires_grad_(False)


BACKBONE_PREFIXES = (
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "model.language_model.",
    "lm_head.",
)


def pretrain_semantic_backbone(
    model: VipaForConditionalGeneration,
    processor: VipaProcessor,
    train_dataset: Any,
    output_dir: str | Path,
    cfg: StandinConfig,
    seed: int = 0,
    progress: bool = True,
    dense: Any = None,
) -> Any:
    """Train InternVL's parts (vision tower, projector, Qwen3) on Hand3D-visual rows with TRL's SFTTrainer.

    The 3D branch is off (`disable_spatial_branch`: CUT3R is not even run) and frozen: this is the
    single-encoder model.
    train_dataset: validated Hand3D-visual train rows (`images`, `messages`). Returns the trainer; the model is
    trained in place (not saved: the caller saves it with its marker).
    dense: a `cpu_demo.dense_names.DenseNameLoss`; each step then minimises
    `LM loss + cfg.dense_weight * dense(model)` (None, or dense_weight 0: the LM loss alone).
    """
    SFTTrainer = require("trl", "train").SFTTrainer

    weight = cfg.dense_weight if dense is not None else 0.0

    class _Trainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not weight:
                return out
            extra = weight * dense(self.accelerator.unwrap_model(model))  # DDP's wrapper hides .model
            return (out[0] + extra, out[1]) if return_outputs else out + extra

    disable_spatial_branch(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(BACKBONE_PREFIXES))
    trainer = _Trainer(
        model=model,
        args=backbone_sft_args(cfg, output_dir, seed),
        train_dataset=train_dataset,
        processing_class=processor,
        callbacks=[TqdmCallback("semantic backbone stand-in (single encoder)")] if progress else [],
    )
    trainer.train()
    return trainer


def backbone_sft_args(cfg: StandinConfig, output_dir: str | Path, seed: int = 0) -> Any:
    """TRL `SFTConfig` of the backbone stand-in. Precision on purpose (`training.common.resolve_bf16`): TRL's
    default is bf16, which on a CPU without native bf16 runs ~50x slower than float32.

    Under a data-parallel launch (WORLD_SIZE ranks) each rank takes `backbone_batch / WORLD_SIZE` samples, so
    the global batch stays `backbone_batch`."""
    world = world_size()
    if cfg.backbone_batch % world:
        raise ValueError(
            f"StandinConfig.backbone_batch: {cfg.backbone_batch} samples do not split over {world} processes"
        )
    return require("trl", "train").SFTConfig(
        output_dir=str(output_dir),
        bf16=resolve_bf16(None),
        fp16=False,
        optim="adamw_torch_fused",  # one kernel for all parameters instead of ~10 per tensor
        learning_rate=cfg.backbone_lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.01,
        per_device_train_batch_size=cfg.backbone_batch // world,
        max_steps=cfg.backbone_steps,
        save_strategy="no",
        logging_steps=10,
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        assistant_only_loss=True,
        max_length=None,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=False,  # TRL's default is on: recomputing a tiny model only costs time
    )
