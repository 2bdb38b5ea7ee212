"""3D probe: how much metric 3D the image tokens carry, and how much of it the answers use.

Table 8 compares answers, and an answer mixes perception (is the 3D in the tokens?) with reading (does the
LLM use it?). This probe separates the two. For every object or hand segment of a rendered frame (frames +
metric depth + segmentation + K, e.g. synth clips), it takes
- the segment's 3D centre: the median of its back-projected pixels (median: depth edges give flying points),
  camera frame, metres;
- one vector per feature set: the tokens' mean weighted by how much of each token's image cell the segment
  covers. The feature sets of a VIPA checkpoint are `V_sem` (InternViT patch tokens), `V_spa` (CUT3R patch
  tokens), `V_f` (the fusion's output) and `LLM input` (V_f after pixel shuffle and the projector: what the
  LLM reads).

A ridge regression per feature set maps features -> 3D centre, fitted on train clips (its strength chosen on
a held-out fifth of them) and scored on test clips. Each pair of segments in a test frame gives a
displacement, scored like a Hand3D answer: per-axis labels (`language.direction_labels`), direction score out
of 3, and |distance error| in metres. A `constant` row (the train mean displacement's labels and mean
distance) is the floor. If a linear readout of `V_sem` already scores far above the model's answers, the LLM
(not the encoders) limits the answers; if `V_spa` adds nothing over `V_sem`, the fusion has nothing to add;
if `V_spa` beats `V_sem` but `V_f` does not, the fusion does not pass it on. `CUT3R pointmap (no probe)` scores
CUT3R's own pointmap, and `V_sem + V_spa` is all a fusion could pass on linearly.

`branch_ablation` looks from the answers' side: the per-token NLL of Hand3D answers with the 3D branch as
trained, with V_spa zeroed, and with alpha = 0 (if zeroing V_spa does not raise it, the answers ignore CUT3R).

    from evaluation.probe3d import Probe3DConfig, branch_ablation, format_probe_table, probe_model
    result = probe_model("outputs/demo/runs/stage1", Probe3DConfig(num_clips=1500))
    print(format_probe_table(result))
    # branch_ablation(model, processor, test_rows)["nll_per_token"]: as trained / V_spa zeroed / alpha = 0
    # or: python -m evaluation.probe3d --model outputs/demo/runs/stage1 --num-clips 1500 --out outputs/probe
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers.models.internvl.modeling_internvl import InternVLModel

from hand3d_dataset.cameras import backproject_depth
from hand3d_dataset.clip import HAND_SEGMENT, Clip
from hand3d_dataset.language import AXES, DEFAULT_GAMMA, direction_labels

__all__ = [
    "Probe3DConfig",
    "image_token_regions",
    "segment_centres",
    "cell_cover",
    "fit_ridge",
    "frame_pairs",
    "pair_scores",
    "clip_features",
    "probe_features",
    "probe_model",
    "format_probe_table",
    "plot_probe",
    "answer_nll",
    "branch_ablation",
    "synth_split_clips",
]

FEATURE_SETS = ("V_sem", "V_spa", "V_f", "LLM input")


@dataclass
class Probe3DConfig:
    """What the probe renders and how it fits."""

    num_clips: int = 1500  # synth clips of the build (the same seed and count give the same train/test split)
    train_clips: int = 300  # synth TRAIN clips the ridge is fitted on (the first ones)
    test_clips: int | None = None  # synth TEST clips scored (None: all)
    image_size: int = 128  # rendered frame side, px
    frames: int = 3  # frames per clip
    seed: int = 0  # synth seed (the main job's)
    min_pixels: int = 20  # smallest segment kept, px (smaller ones have too few depth pixels for a centre)
    lambdas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0)  # ridge strengths tried (standardised X)
    gamma: float = DEFAULT_GAMMA  # direction-label threshold on the unit displacement (Hand3D's)
    render_cache: str | None = None  # the build's synth render cache (BuildConfig.synth_cache); None: render

    def __post_init__(self) -> None:
        for name in ("num_clips", "train_clips", "image_size", "frames", "min_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Probe3DConfig.{name}: must be >= 1, got {getattr(self, name)!r}")
        if self.test_clips is not None and self.test_clips < 1:
            raise ValueError(f"Probe3DConfig.test_clips: must be >= 1 or None, got {self.test_clips!r}")
        if not self.lambdas or any(not np.isfinite(v) or v <= 0 for v in self.lambdas):
            raise ValueError(
                f"Probe3DConfig.lambdas: expected positive ridge strengths, got {self.lambdas!r}"
            )


# ---- geometry: segments, their centres and the token cells they cover ------------------------------------------
def image_token_regions(tile: int, patch: int, downsample_ratio: float) -> np.ndarray:
    """Which ViT patches each LLM image token is made of, in the order the LLM sees the tokens.

    InternVL pixel-shuffles the (tile/patch)^2 patch grid; the permutation is read off by pushing the patch
    indices through transformers' own `InternVLModel.pixel_shuffle`, so it cannot drift from the model.
    Returns (N_tokens, patches_per_token) int64 row-major patch indices.
    """
    g = tile // patch
    if g * patch != tile:
        raise ValueError(f"tile: {tile} px is not a multiple of the {patch} px patch")
    k = round(1 / downsample_ratio) ** 2
    idx = torch.arange(g * g, dtype=torch.float64).reshape(1, g, g, 1)
    shuffled = InternVLModel.pixel_shuffle(None, idx, scale_factor=downsample_ratio)
    return shuffled.reshape(-1, k).long().numpy()


def segment_centres(clip: Clip, min_pixels: int = 20) -> list[tuple[int, int, str, np.ndarray, np.ndarray]]:
    """Every object / hand segment of every frame with at least `min_pixels` pixels of valid depth.

    Returns [(frame, segment id, name, centre (3,) camera frame metres, mask (H, W) bool)], centre = the
    per-axis median of the segment's back-projected pixels.
    """
    if clip.segmentation is None or clip.depth is None:
        raise ValueError(f"clip {clip.clip_id!r}: the 3D probe needs segmentation and metric depth")
    names = {o.segment_id: o.name for o in clip.objects if o.segment_id is not None}
    names.update({HAND_SEGMENT[side]: f"{side} hand" for side in clip.hands})
    points = backproject_depth(clip.depth, clip.K)  # (T, H, W, 3), NaN where no depth
    out = []
    for f in range(clip.num_frames):
        for seg_id, name in sorted(names.items()):
            mask = clip.segmentation[f] == seg_id
            p = points[f][mask]
            p = p[np.isfinite(p).all(axis=1)]
            if len(p) >= min_pixels:
                out.append((f, seg_id, name, np.median(p, axis=0), mask))
    return out


def cell_cover(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Fraction of each cell of a rows x cols grid over the image that `mask` (H, W) covers, (rows * cols,)
    row-major (area averaging, so cells that straddle pixel edges count the overlap)."""
    m = torch.from_numpy(np.asarray(mask, np.float64))[None, None]
    return F.adaptive_avg_pool2d(m, (rows, cols)).reshape(-1).numpy()


# ---- ridge and scoring --------------------------------------------------------------------------------------------
@dataclass
class RidgeProbe:
    """y = ((x - mean) / std) @ W + b, fitted by `fit_ridge`."""

    mean: np.ndarray  # (d,) feature means of the fit set
    std: np.ndarray  # (d,) feature standard deviations (floored)
    W: np.ndarray  # (d, k) weights on standardised features
    b: np.ndarray  # (k,) intercept (the fit set's target mean)
    lam: float  # ridge strength chosen

    def predict(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, np.float64) - self.mean) / self.std) @ self.W + self.b


def _solve_ridge(X: np.ndarray, Y: np.ndarray, lam: float) -> RidgeProbe:
    mean, std = X.mean(0), X.std(0) + 1e-8
    A = (X - mean) / std
    b = Y.mean(0)
    W = np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ (Y - b))
    return RidgeProbe(mean, std, W, b, lam)


def fit_ridge(
    X: np.ndarray, Y: np.ndarray, lambdas: Sequence[float], groups: np.ndarray | None = None
) -> RidgeProbe:
    """Ridge X (n, d) -> Y (n, k); the strength with the least squared error on a held-out fifth (whole groups,
    e.g. clips, held out together so that frames of one clip do not leak), then refitted on everything."""
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
        raise ValueError(f"X, Y: expected (n, d) and (n, k) with the same n, got {X.shape} and {Y.shape}")
    if len(X) < 10:
        raise ValueError(f"X: {len(X)} rows are too few to fit and validate a probe (need >= 10)")
    groups = np.arange(len(X)) if groups is None else np.asarray(groups)
    held = np.isin(groups, np.unique(groups)[4::5])
    if held.all() or not held.any():
        held = np.arange(len(X)) % 5 == 4
    errors = {
        lam: float(((_solve_ridge(X[~held], Y[~held], lam).predict(X[held]) - Y[held]) ** 2).mean())
        for lam in lambdas
    }
    return _solve_ridge(X, Y, min(errors, key=errors.get))


def frame_pairs(frame_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i < j, of the segments that share a frame; frame_ids: (n,). Returns two (m,) arrays."""
    frame_ids = np.asarray(frame_ids)
    pairs = [
        p for f in np.unique(frame_ids) for p in itertools.combinations(np.flatnonzero(frame_ids == f), 2)
    ]
    if not pairs:
        raise ValueError("frame_ids: no frame has two segments; nothing to score")
    i, j = np.asarray(pairs).T
    return i, j


def pair_scores(d_pred: np.ndarray, d_true: np.ndarray, gamma: float = DEFAULT_GAMMA) -> dict[str, Any]:
    """Score displacements like Hand3D answers: d_pred, d_true (m, 3) camera frame, metres.

    Returns n_pairs, direction_score (mean number of axes whose label, `language.direction_labels`, matches;
    out of 3), axis_accuracy per axis, distance_error_m (mean |‖d_pred‖ - ‖d_true‖|).
    """
    d_pred, d_true = np.asarray(d_pred, np.float64), np.asarray(d_true, np.float64)
    if d_pred.shape != d_true.shape or d_pred.ndim != 2 or d_pred.shape[1] != 3 or not len(d_pred):
        raise ValueError(
            f"d_pred, d_true: expected two (m, 3) arrays, m >= 1, got {d_pred.shape} and {d_true.shape}"
        )
    hits = np.array(
        [
            [direction_labels(p, gamma)[ax] == direction_labels(t, gamma)[ax] for ax in AXES]
            for p, t in zip(d_pred, d_true, strict=True)
        ]
    )
    dist = np.abs(np.linalg.norm(d_pred, axis=1) - np.linalg.norm(d_true, axis=1))
    return {
        "n_pairs": len(d_pred),
        "direction_score": float(hits.sum(axis=1).mean()),
        "axis_accuracy": {ax: float(hits[:, a].mean()) for a, ax in enumerate(AXES)},
        "distance_error_m": float(dist.mean()),
    }


# ---- features ---------------------------------------------------------------------------------------------------
def clip_features(
    model: Any, processor: Any, clip: Clip
) -> tuple[dict[str, tuple[np.ndarray, tuple[int, int]]], np.ndarray]:
    """The feature sets of one clip, {name: ((T, N, d) tokens, (rows, cols) of their image cells)}, and CUT3R's
    own pointmap `pts3d_self` (T, Hs, Ws, 3) (camera frame, its scale).

    `LLM input` tokens are pixel-shuffled; their cells are given as the ViT patch grid with the tokens'
    patch lists (see `_token_cover`), so its grid entry is the ViT grid. Frames must be square.
    """
    T, H, W = clip.num_frames, *clip.image_hw
    if H != W:
        raise ValueError(f"clip {clip.clip_id!r}: the 3D probe takes square frames, got {H}x{W}")
    images = [PIL.Image.fromarray(np.asarray(f, np.uint8)) for f in clip.frames]
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    if pixel_values.shape[0] != T:
        raise ValueError(
            f"processor: expected one tile per frame, got {pixel_values.shape[0]} for {T} frames"
        )
    spatial = torch.from_numpy(np.stack([processor.spatial_frame(im) for im in images]).astype(np.float32))
    mask = torch.ones(1, T, dtype=torch.bool)
    inner = model.model
    ivl = model.config.internvl_config
    patch_s = model.config.spatial_config.patch_size
    grid_s = (spatial.shape[-2] // patch_s, spatial.shape[-1] // patch_s)
    with torch.no_grad():
        V_sem = inner.vision_tower(pixel_values=pixel_values.to(model.dtype)).last_hidden_state
        if ivl.vision_feature_select_strategy == "default":
            V_sem = V_sem[:, 1:]
        cut3r = inner.spatial_encoder(spatial[None], frame_mask=mask)
        V_spa = cut3r.tokens[0]
        V_f = inner.fusion(V_sem, V_spa, spatial_grid=grid_s)
        llm = inner.get_image_features(pixel_values, None, mask, spatial_tokens=cut3r.tokens)
    g = round(V_sem.shape[1] ** 0.5)
    features = {
        "V_sem": (V_sem.float().numpy(), (g, g)),
        "V_spa": (V_spa[:, 1:].float().numpy(), grid_s),
        "V_f": (V_f.float().numpy(), (g, g)),
        "LLM input": (llm.float().numpy(), (g, g)),
    }
    return features, cut3r.pts3d_self[0].float().numpy()


def _token_cover(
    mask: np.ndarray, n_tokens: int, grid: tuple[int, int], downsample_ratio: float
) -> np.ndarray:
    """Cover of each token: its cell, or (pixel-shuffled LLM tokens, fewer than cells) the mean over its cells."""
    cover = cell_cover(mask, *grid)
    if n_tokens == len(cover):
        return cover

    regions = image_token_regions(grid[0], 1, downsample_ratio)  # cell indices per LLM token
    if len(regions) != n_tokens:
        raise ValueError(f"features: {n_tokens} tokens match neither the {grid} grid nor its pixel shuffle")
    return cover[regions].mean(axis=1)


def probe_features(
    model: Any, processor: Any, clips: Iterable[Clip], min_pixels: int = 20
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per segment: {feature set: (n, d)}, centres (n, 3), CUT3R's own estimate of the centres (n, 3) (the
    median of its pointmap over the segment, NEAREST-resized to the pointmap), frame ids (n,) unique over
    clips, clip ids (n,)."""
    ratio = model.config.internvl_config.downsample_ratio
    feats: dict[str, list[np.ndarray]] = {k: [] for k in FEATURE_SETS}
    centres, direct, frame_ids, clip_ids = [], [], [], []
    first_frame = 0  # frame ids run over all clips' frames
    for c, clip in enumerate(clips):
        first_frame += clip.num_frames
        segments = segment_centres(clip, min_pixels)
        if not segments:
            continue
        per_set, points = clip_features(model, processor, clip)
        for f, _seg, _name, centre, mask in segments:
            small = PIL.Image.fromarray(mask.astype(np.uint8)).resize(points.shape[2:0:-1], PIL.Image.NEAREST)
            on = np.asarray(small, bool)
            direct.append(np.median(points[f][on], axis=0) if on.any() else np.full(3, np.nan))
            for k, (tokens, grid) in per_set.items():
                w = _token_cover(mask, tokens.shape[1], grid, ratio)
                feats[k].append(w @ tokens[f] / w.sum())
            centres.append(centre)
            frame_ids.append(first_frame - clip.num_frames + f)
            clip_ids.append(c)
    if not centres:
        raise ValueError(f"clips: no segment with >= {min_pixels} px of depth; nothing to probe")
    return (
        {k: np.stack(v) for k, v in feats.items()},
        np.stack(centres),
        np.stack(direct),
        np.array(frame_ids),
        np.array(clip_ids),
    )


# ---- what the answers use: the 3D branch ablated -----------------------------------------------------------------
ABLATIONS = ("as trained", "V_spa zeroed", "3D branch off (alpha = 0)")


def _answer_batch(processor: Any, row: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs of a Hand3D row (one sample) and labels on its last answer: the tokens after the prompt up
    to and including `<|im_end|>` (the template's trailing newline carries no loss, as in training)."""
    messages = row["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("row: the last message must be the assistant's answer")
    images = row["images"]
    inputs = dict(
        processor(images=[images], text=[processor.apply_chat_template(messages)], return_tensors="pt")
    )
    prompt_text = processor.apply_chat_template(messages[:-1], add_generation_prompt=True)
    n_prompt = processor(images=[images], text=[prompt_text], return_tensors="pt")["input_ids"].shape[1]
    ids = inputs["input_ids"][0]
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    stops = (ids[n_prompt:] == end).nonzero()
    n_end = n_prompt + (int(stops[0]) + 1 if len(stops) else len(ids) - n_prompt)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, n_prompt:n_end] = ids[n_prompt:n_end]
    return inputs, labels


def _nll(
    model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor, spatial: str
) -> tuple[float, int]:
    if spatial not in ABLATIONS:
        raise ValueError(f"spatial: expected one of {ABLATIONS}, got {spatial!r}")
    inputs = dict(inputs)
    if spatial == "V_spa zeroed":  # CUT3R's token layout (pose token + patches), all zeros, CUT3R not run
        pixels = inputs.pop("spatial_pixel_values")
        cfg = model.config.spatial_config
        n = 1 + (pixels.shape[-2] // cfg.patch_size) * (pixels.shape[-1] // cfg.patch_size)
        inputs["spatial_tokens"] = pixels.new_zeros(*pixels.shape[:2], n, cfg.hidden_size)
    with torch.no_grad():  # the branch off: CUT3R and the fusion skipped, V_f = V_sem (as alpha = 0 gives)
        logits = model(**inputs, use_spatial=spatial != "3D branch off (alpha = 0)").logits[0, :-1].float()
    target = labels[0, 1:]
    keep = target != -100
    return float(F.cross_entropy(logits[keep], target[keep], reduction="sum")), int(keep.sum())


def answer_nll(model: Any, processor: Any, row: dict, spatial: str = "as trained") -> tuple[float, int]:
    """Summed negative log-likelihood of a Hand3D row's last assistant answer (its tokens up to and including
    `<|im_end|>`) given the prompt and images, and the number of those tokens.

    spatial: "as trained"; "V_spa zeroed" (the fusion sees zero CUT3R tokens); "3D branch off (alpha = 0)".
    """
    return _nll(model, *_answer_batch(processor, row), spatial)


def branch_ablation(model: Any, processor: Any, rows: Iterable[dict]) -> dict[str, Any]:
    """Per-token answer NLL over `rows` with the 3D branch as trained, with V_spa zeroed and with alpha = 0.

    If the fusion passes on what CUT3R measures, zeroing V_spa raises the NLL; if it does not, the three are
    about equal (and a freshly initialised fusion that stage 1 could not make useful is slightly worse than
    alpha = 0). Returns {"n_rows", "answer_tokens", "nll_per_token": {ablation: float}}.
    """
    model.eval()
    sums, count, n_rows = dict.fromkeys(ABLATIONS, 0.0), 0, 0
    for row in rows:
        inputs, labels = _answer_batch(processor, row)  # once per row, scored three ways
        for name in ABLATIONS:
            nll, n = _nll(model, inputs, labels, name)
            sums[name] += nll
        count += n
        n_rows += 1
    if not count:
        raise ValueError("rows: no answer tokens to score")
    return {
        "n_rows": n_rows,
        "answer_tokens": count,
        "nll_per_token": {k: v / count for k, v in sums.items()},
    }


def synth_split_indices(num_clips: int, test: bool, limit: int | None = None) -> list[int]:
    """Positions of a synth build's clips in one split (the build's rule, `is_test_clip`), first `limit` only.

    >>> test, train = synth_split_indices(30, test=True), synth_split_indices(30, test=False)
    >>> sorted(test + train) == list(range(30)), test
    (True, [4, 12, 25])
    """
    from hand3d_dataset.build import is_test_clip

    return [i for i in range(num_clips) if is_test_clip(i, 0.1) == test][:limit]


def synth_split_clips(
    num_clips: int,
    seed: int,
    image_size: int,
    num_frames: int,
    test: bool,
    limit: int | None,
    desc: str,
    shard: tuple[int, int] = (0, 1),
    cache_dir: str | os.PathLike | None = None,
) -> Iterator[Clip]:
    """The synth clips of one split of a build (`num_clips`, `seed`), rendered again with depth and
    segmentation (which Hand3D rows lack), by the build's split rule (`is_test_clip`), first `limit` only.

    shard: (rank, world): only every `world`-th of those clips from `rank` (a data-parallel rank's share;
    the progress bar shows on rank 0 only); cache_dir: the synth render cache (`SynthSource`) of the build."""
    from tqdm.auto import tqdm

    from hand3d_dataset.sources.synth import SynthSource

    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard: expected (rank, world) with 0 <= rank < world, got {shard}")
    source = SynthSource(
        num_clips=num_clips, seed=seed, image_size=image_size, num_frames=num_frames, cache_dir=cache_dir
    )
    all_ids = source.clip_ids()
    ids = [all_ids[i] for i in synth_split_indices(num_clips, test, limit)[rank::world]]
    return (source.load_clip(c) for c in tqdm(ids, desc=desc, unit="clip", disable=rank != 0))


def _synth_clips(cfg: Probe3DConfig, test: bool, limit: int | None, desc: str) -> Iterator[Clip]:
    return synth_split_clips(
        cfg.num_clips, cfg.seed, cfg.image_size, cfg.frames, test, limit, desc, cache_dir=cfg.render_cache
    )


def probe_model(model_or_dir: Any, cfg: Probe3DConfig | None = None, processor: Any = None) -> dict[str, Any]:
    """Fit and score the probe of every feature set of a VIPA checkpoint on synth clips (see the module doc).

    Returns {"config", "n_train_segments", "n_test_segments", "rows": {name: pair_scores + "r2_xyz"}}.
    """
    from training.common import load_model_and_processor

    cfg = cfg or Probe3DConfig()
    if isinstance(model_or_dir, (str, os.PathLike)):
        model, processor = load_model_and_processor(model_or_dir)
    else:
        model = model_or_dir
        if processor is None:
            raise ValueError("processor: pass the model's VipaProcessor along with a model object")
    model.eval()
    Xtr, Ytr, _, Ftr, Ctr = probe_features(
        model, processor, _synth_clips(cfg, False, cfg.train_clips, "probe: train clips"), cfg.min_pixels
    )
    Xte, Yte, Dte, Fte, _ = probe_features(
        model, processor, _synth_clips(cfg, True, cfg.test_clips, "probe: test clips"), cfg.min_pixels
    )
    Xtr["V_sem + V_spa"] = np.hstack([Xtr["V_sem"], Xtr["V_spa"]])  # all a fusion could pass on, linearly
    Xte["V_sem + V_spa"] = np.hstack([Xte["V_sem"], Xte["V_spa"]])
    i, j = frame_pairs(Fte)
    d_true = Yte[j] - Yte[i]
    # the floor, like Table 8's trivial baseline: the mean train displacement's labels, the mean train distance
    i_tr, j_tr = frame_pairs(Ftr)
    d_train = Ytr[j_tr] - Ytr[i_tr]
    mean_d = d_train.mean(0)
    d_const = mean_d / max(float(np.linalg.norm(mean_d)), 1e-9) * np.linalg.norm(d_train, axis=1).mean()
    rows = {
        "constant": {
            **pair_scores(np.broadcast_to(d_const, d_true.shape), d_true, cfg.gamma),
            "r2_xyz": [0.0] * 3,
        }
    }
    # CUT3R's own pointmap, no probe (a segment too small for the pointmap grid falls back to the mean)
    Dte = np.where(np.isfinite(Dte), Dte, Ytr.mean(0))
    rows["CUT3R pointmap (no probe)"] = {
        **pair_scores(Dte[j] - Dte[i], d_true, cfg.gamma),
        "r2_xyz": (1 - ((Dte - Yte) ** 2).mean(0) / Yte.var(0)).tolist(),
    }
    for name in (*FEATURE_SETS, "V_sem + V_spa"):
        probe = fit_ridge(Xtr[name], Ytr, cfg.lambdas, groups=Ctr)
        pred = probe.predict(Xte[name])
        r2 = 1 - ((pred - Yte) ** 2).mean(0) / Yte.var(0)
        rows[name] = {
            **pair_scores(pred[j] - pred[i], d_true, cfg.gamma),
            "r2_xyz": r2.tolist(),
            "ridge_lambda": probe.lam,
        }
    return {
        "config": asdict(cfg),
        "n_train_segments": len(Ytr),
        "n_test_segments": len(Yte),
        "rows": rows,
    }


def format_probe_table(result: dict[str, Any], answers: dict[str, dict] | None = None) -> str:
    """Markdown table of the probe rows (+ optional model-answer rows {name: Table-8 overall metrics})."""
    lines = [
        "| readout | Dir. Scr. (pairs) | x / y / z acc. | Dist. Err. (m) | R² x / y / z |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        acc = " / ".join(f"{r['axis_accuracy'][ax]:.2f}" for ax in AXES)
        r2 = " / ".join(f"{v:.2f}" for v in r["r2_xyz"])
        label = {"constant": "constant (mean train pair)"}.get(
            name, name if "(" in name else f"linear probe of {name}"
        )
        lines.append(f"| {label} | {r['direction_score']:.3f} | {acc} | {r['distance_error_m']:.4f} | {r2} |")

    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    for name, o in (answers or {}).items():
        acc = " / ".join(num((o.get("axis_accuracy") or {}).get(ax), ".2f") for ax in AXES)
        lines.append(
            f"| answers of {name} (Hand3D-test) | {num(o.get('direction_score'), '.3f')} | {acc} | "
            f"{num(o.get('distance_error_m'), '.4f')} | — |"
        )
    return "\n".join(lines)


def plot_probe(
    result: dict[str, Any], path: str | os.PathLike, answers: dict[str, dict] | None = None
) -> Path:
    """Bar chart: direction score of each linear readout (+ the models' answers, hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["rows"]) + list(answers or {})
    scores = [r["direction_score"] for r in result["rows"].values()]
    scores += [o.get("direction_score") or 0.0 for o in (answers or {}).values()]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    bars = ax.barh(
        range(len(names)),
        scores,
        color=["#888"] + ["#4c72b0"] * (len(result["rows"]) - 1) + ["#dd8452"] * len(answers or {}),
    )
    for b, s in zip(bars, scores, strict=True):
        ax.text(s + 0.02, b.get_y() + b.get_height() / 2, f"{s:.2f}", va="center", fontsize=8)
    ax.set_yticks(
        range(len(names)),
        [
            n
            if "(" in n and i < len(result["rows"])
            else ("probe: " if i < len(result["rows"]) else "answers: ") + n
            for i, n in enumerate(names)
        ],
        fontsize=8,
    )
    ax.invert_yaxis()
    ax.set_xlim(0, 3)
    ax.set_xlabel("direction score /3 (probes: test-frame segment pairs; answers: Hand3D-test rows)")
    ax.set_title("What the tokens carry (linear probe) vs what the answers use")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.probe3d", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a VIPA checkpoint folder (e.g. runs/stage1)")
    p.add_argument("--num-clips", type=int, default=Probe3DConfig.num_clips, help="synth clips of the build")
    p.add_argument("--train-clips", type=int, default=Probe3DConfig.train_clips, help="train clips to fit on")
    p.add_argument("--test-clips", type=int, default=None, help="test clips to score (default: all)")
    p.add_argument("--seed", type=int, default=0, help="synth seed of the build")
    p.add_argument("--out", default=None, help="folder for probe3d.json and probe3d.png")
    a = p.parse_args(argv)
    cfg = Probe3DConfig(
        num_clips=a.num_clips, train_clips=a.train_clips, test_clips=a.test_clips, seed=a.seed
    )
    result = probe_model(a.model, cfg)
    print(format_probe_table(result))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "probe3d.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out / "probe3d.json")
        plot_probe(result, out / "probe3d.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
