"""Dense name alignment for the semantic backbone STAND-IN: every image token learns to name what it shows.

A pretrained InternVL reads *where* a named thing is in the image because it was pretrained on web-scale
grounding data. The tiny stand-in trained from scratch on Hand3D-visual alone never gets there on a CPU
budget: it learns to answer from the question text (the direction score of a text-only majority vote) and
its answers do not change when the images are replaced by grey ones. This objective stands in for that
pretraining. Each frame is fed to the VLM on its own (`<img> V_1 ... V_N </img>`); the LLM's last hidden
state at each image token goes through the (tied) LM head, restricted to the tokens of the scene's name
words, and a binary cross-entropy asks it to name the objects and hands that cover that token's image
region (from the renderer's segmentation, resized like the tile). So image tokens come to live next to the
word embeddings of what they show, and a question's "red can" can find the red can's tokens by attention.

A second term gives the image tokens a coarse depth readout up to scale, as a pretrained VLM has from its
data: the LM-head logit of an otherwise unused token (`<video>`; image-only data never feeds it) regresses
the log of the median rendered depth of the token's region with the frame's mean removed (`relative_depth`,
the main job's setting), z-scored (squared error). Metric scale stays the 3D branch's business. On the main
job (1,181 test rows) names only gave a direction score of 1.861, names + metric depth 1.905, names +
relative depth 1.942 (distance error 0.106 -> 0.108 -> 0.100 m). Caveat: the semantic path learns its depth
from the same rendered depth as the CUT3R stand-in, which can hide what the 3D branch adds;
`StandinConfig.dense_depth_weight = 0` switches the readout off.

Only the segmentation, names and rendered depth of TRAIN clips are used, nothing of the test split, and only
for the stand-in; both Table-8 models share the backbone trained with it, so the comparison stays fair.

    from cpu_demo.dense_names import DenseNameLoss
    dense = DenseNameLoss.from_clips(train_clips, processor, model.config)   # clips with segmentation
    loss = dense(model)                     # one random batch of frames; add it to the LM loss
    pretrain_semantic_backbone(model, processor, rows, out, cfg, dense=dense)   # what the main job does
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from evaluation.probe3d import image_token_regions
from hand3d_dataset.clip import HAND_SEGMENT, Clip

__all__ = ["DenseNameLoss", "token_name_targets", "token_log_depth"]


def token_name_targets(
    segmentation: np.ndarray,
    segment_words: dict[int, list[int]],
    num_columns: int,
    tile: int,
    patch: int,
    downsample_ratio: float,
    min_cover: float = 0.03,
) -> np.ndarray:
    """Multi-hot name targets per LLM image token of one frame.

    segmentation: (H, W) uint8 segment ids; segment_words: segment id -> target columns of its name's tokens.
    A column is on for a token when the segments naming it cover at least `min_cover` of the token's region
    (the tile-resized segmentation, NEAREST, like the RGB resize up to sampling).
    Returns (N_tokens, num_columns) float32 in {0, 1}.
    """
    table = np.zeros((256, num_columns), np.float32)  # segment id -> multi-hot columns
    for seg_id, cols in segment_words.items():
        table[seg_id, cols] = 1.0
    seg = np.asarray(
        PIL.Image.fromarray(np.asarray(segmentation, np.uint8)).resize((tile, tile), PIL.Image.NEAREST)
    )
    g = tile // patch
    per_patch = (
        table[seg].reshape(g, patch, g, patch, num_columns).mean(axis=(1, 3)).reshape(g * g, num_columns)
    )
    cover = per_patch[image_token_regions(tile, patch, downsample_ratio)].mean(axis=1)
    return (cover >= min_cover).astype(np.float32)


def token_log_depth(depth: np.ndarray, tile: int, patch: int, regions: np.ndarray) -> np.ndarray:
    """Log of the median valid depth of each LLM image token's region, (N_tokens,) float64, NaN where none.

    depth: (H, W) metric depth (NaN or <= 0: no surface), resized to the tile (NEAREST);
    regions: `image_token_regions` of the tile.
    """
    d = np.asarray(PIL.Image.fromarray(np.asarray(depth, np.float32)).resize((tile, tile), PIL.Image.NEAREST))
    g = tile // patch
    per_patch = d.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
    pix = per_patch[regions].reshape(len(regions), -1).astype(np.float64)
    pix[~(np.isfinite(pix) & (pix > 0))] = np.nan
    out = np.full(len(regions), np.nan)
    has = np.isfinite(pix).any(axis=1)
    out[has] = np.log(np.nanmedian(pix[has], axis=1))
    return out


class DenseNameLoss:
    """Frames, their per-token name targets, and the loss on a random batch of them (see the module docstring).

    Args:
        pixel_values: (F, 3, S, S) InternVL tiles of the frames (one tile per frame).
        targets: (F, N_tokens, C) multi-hot name targets.
        token_ids: (C,) vocabulary ids of the target columns (the name words' BPE tokens).
        image_start_id, image_end_id: `<img>` / `</img>` token ids framing the image tokens.
        batch_size: frames per call; seed: the frame sampler's seed.
        depth: (F, N_tokens) z-scored log depth per token (NaN: no depth there), or None for names only.
        depth_token_id: the token whose LM-head logit reads the depth out; depth_weight: its loss weight.
    """

    def __init__(
        self,
        pixel_values: torch.Tensor,
        targets: torch.Tensor,
        token_ids: Sequence[int],
        image_start_id: int,
        image_end_id: int,
        batch_size: int = 16,
        seed: int = 0,
        depth: torch.Tensor | None = None,
        depth_token_id: int | None = None,
        depth_weight: float = 1.0,
    ) -> None:
        if (
            pixel_values.ndim != 4
            or targets.ndim != 3
            or len(pixel_values) != len(targets)
            or not len(targets)
        ):
            raise ValueError(
                f"pixel_values/targets: expected (F, 3, S, S) and (F, N, C) with the same F > 0, got "
                f"{tuple(pixel_values.shape)} and {tuple(targets.shape)}"
            )
        if targets.shape[-1] != len(token_ids):
            raise ValueError(f"token_ids: {len(token_ids)} ids for {targets.shape[-1]} target columns")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if depth is not None and (tuple(depth.shape) != tuple(targets.shape[:2]) or depth_token_id is None):
            raise ValueError(
                f"depth: expected {tuple(targets.shape[:2])} with a depth_token_id, got "
                f"{tuple(depth.shape)} and depth_token_id={depth_token_id}"
            )
        self.depth = None if depth is None else depth.float()
        self.depth_token_id, self.depth_weight = depth_token_id, float(depth_weight)
        self.depth_history: list[float] = []  # depth readout loss of every call
        self.pixel_values, self.targets = pixel_values, targets.float()
        self.token_ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        self.image_start_id, self.image_end_id = int(image_start_id), int(image_end_id)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[float] = []  # loss of every call, for the training summary

    @classmethod
    def from_clips(
        cls,
        clips: Sequence[Clip],
        processor: Any,
        config: Any,
        batch_size: int = 16,
        seed: int = 0,
        depth_weight: float = 1.0,
        depth_token: str = "<video>",
        relative_depth: bool = False,
    ) -> DenseNameLoss:
        """From rendered clips with segmentation (e.g. `SynthSource` TRAIN clips): every frame of every clip.

        Name words are the words of the objects' names plus "left"/"right" and "hand"; each word's tokens are
        its BPE pieces with a leading space, as it appears inside a sentence. With `depth_weight` > 0 the clips
        also need metric depth: each token's target is the log of the median valid depth of its region,
        z-scored over all tokens (`token_log_depth`); `relative_depth` first removes each frame's mean log
        depth, so the readout learns depth up to scale only (no metric scale, as from a monocular estimator).
        """
        tok = processor.tokenizer
        ivl = config.internvl_config
        tile = processor.image_processor.size["height"]
        patch = ivl.vision_config.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        words = sorted(
            {w for c in clips for o in c.objects for w in o.name.split()} | {"left", "right", "hand"}
        )
        word_ids = {w: tok.encode(" " + w, add_special_tokens=False) for w in words}
        columns = sorted({t for ids in word_ids.values() for t in ids})
        col = {t: i for i, t in enumerate(columns)}
        regions = image_token_regions(tile, patch, ivl.downsample_ratio)
        images, targets, depths = [], [], []
        for clip in clips:
            if clip.segmentation is None:
                raise ValueError(f"clips: clip {clip.clip_id!r} has no segmentation; dense names need one")
            if depth_weight and clip.depth is None:
                raise ValueError(
                    f"clips: clip {clip.clip_id!r} has no depth; the depth readout needs it (or depth_weight=0)"
                )
            seg_words = {
                o.segment_id: [col[t] for w in o.name.split() for t in word_ids[w]] for o in clip.objects
            }
            seg_words.pop(None, None)
            for side in clip.hands:
                seg_words[HAND_SEGMENT[side]] = [col[t] for w in (side, "hand") for t in word_ids[w]]
            for f in range(clip.num_frames):
                targets.append(
                    token_name_targets(
                        clip.segmentation[f], seg_words, len(columns), tile, patch, ivl.downsample_ratio
                    )
                )
                images.append(PIL.Image.fromarray(np.asarray(clip.frames[f], np.uint8)))
                if depth_weight:
                    depths.append(token_log_depth(clip.depth[f], tile, patch, regions))
        if not images:
            raise ValueError("clips: no frames to build dense name targets from")
        pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        if pixel_values.shape[0] != len(images):
            raise ValueError(
                f"processor: expected one tile per frame for dense names, got {pixel_values.shape[0]} tiles for "
                f"{len(images)} frames (switch dynamic tiling off)"
            )
        depth = None
        if depth_weight:
            logd = np.stack(depths)
            if not np.isfinite(logd).any():
                raise ValueError("clips: no valid depth in any token region; cannot build the depth readout")
            if (
                relative_depth
            ):  # per-frame mean log depth removed: depth up to scale, like a monocular estimator
                with np.errstate(all="ignore"):
                    logd = logd - np.nanmean(logd, axis=1, keepdims=True)
            depth = torch.from_numpy(
                ((logd - np.nanmean(logd)) / max(float(np.nanstd(logd)), 1e-6)).astype(np.float32)
            )
        depth_id = tok.convert_tokens_to_ids(depth_token) if depth_weight else None
        if depth_weight and (depth_id is None or depth_id == tok.unk_token_id):
            raise ValueError(f"depth_token: {depth_token!r} is not in the tokenizer's vocabulary")
        return cls(
            pixel_values,
            torch.from_numpy(np.stack(targets)),
            columns,
            tok.convert_tokens_to_ids("<img>"),
            tok.convert_tokens_to_ids("</img>"),
            batch_size=batch_size,
            seed=seed,
            depth=depth,
            depth_token_id=depth_id,
            depth_weight=depth_weight,
        )

    def __call__(self, model: Any) -> torch.Tensor:
        """Loss on `batch_size` random frames: BCE of the LM head's name-token logits at each image token.

        model: a `VipaForConditionalGeneration` whose 3D branch is off (InternVL path only). Returns a scalar.
        """
        idx = torch.randint(len(self.targets), (self.batch_size,), generator=self.generator)
        inner = model.model
        feats = inner.get_image_features(self.pixel_values[idx], None, use_spatial=False)  # (B, N, d_llm)
        embed = model.get_input_embeddings()
        b = feats.shape[0]
        ends = [
            embed(torch.full((b, 1), i, device=feats.device))
            for i in (self.image_start_id, self.image_end_id)
        ]
        hidden = inner.language_model(inputs_embeds=torch.cat([ends[0], feats, ends[1]], 1)).last_hidden_state
        weight = model.get_output_embeddings().weight
        hidden = hidden[:, 1:-1].float()
        logits = hidden @ weight[self.token_ids.to(feats.device)].float().T  # (B, N, C)
        loss = F.binary_cross_entropy_with_logits(logits, self.targets[idx].to(logits.device))
        self.history.append(float(loss.detach()))
        if self.depth is None or not self.depth_weight:
            return loss
        readout = hidden @ weight[self.depth_token_id].float()  # (B, N)
        target = self.depth[idx].to(readout.device)
        ok = torch.isfinite(target)
        depth_loss = F.mse_loss(readout[ok], target[ok]) if ok.any() else readout.sum() * 0.0
        self.depth_history.append(float(depth_loss.detach()))
        return loss + self.depth_weight * depth_loss
