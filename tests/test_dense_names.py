"""Dense name alignment of the backbone stand-in (`cpu_demo.dense_names`): token regions agree with the model's
own feature layout, targets with a hand-made segmentation, and the loss trains the whole InternVL path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpu_demo.dense_names import DenseNameLoss, token_log_depth, token_name_targets
from cpu_demo.standins import (
    StandinConfig,
    build_standin_processor,
    build_standin_tokenizer,
    standin_vipa_config,
)
from evaluation.probe3d import image_token_regions
from hand3d_dataset.clip import HAND_SEGMENT
from modeling_vipa.modeling_vipa import VipaForConditionalGeneration
from tests.hand3d_fake_source import make_clip

TEXTS = ["The right hand is left of the red mug and right of the blue box, 0.3 m."] * 4


@pytest.fixture(scope="module")
def tiny():
    cfg = StandinConfig.quick()
    tok = build_standin_tokenizer(TEXTS, cfg.vocab_size)
    processor = build_standin_processor(cfg, tok)
    torch.manual_seed(0)
    model = VipaForConditionalGeneration(standin_vipa_config(cfg, tok))
    model.model.fusion.alpha.data.zero_()  # the InternVL path only, as in backbone training
    return cfg, processor, model


def test_token_regions_are_where_the_model_puts_each_patch(tiny) -> None:
    """Push patch indices through the model's own get_image_features (ViT and projector replaced by
    identities) and read which patches land in each LLM image token."""
    cfg, _, model = tiny
    inner = model.model
    g = cfg.tile_size // 14
    n_patch, width = g * g, inner.vision_tower.config.hidden_size

    class FakeVision(torch.nn.Module):
        def forward(self, pixel_values):  # CLS + patch p carries the value p in every channel
            vals = torch.arange(-1, n_patch, dtype=torch.float32)[None, :, None].repeat(
                len(pixel_values), 1, width
            )
            return type("O", (), {"last_hidden_state": vals})()

    real_vision, real_proj = inner.vision_tower, inner.multi_modal_projector
    inner.vision_tower, inner.multi_modal_projector = FakeVision(), torch.nn.Identity()
    try:
        feats = inner.get_image_features(torch.zeros(1, 3, 8, 8), None, use_spatial=False)[
            0
        ]  # (N, 4 * width)
    finally:
        inner.vision_tower, inner.multi_modal_projector = real_vision, real_proj
    seen = [sorted({int(v) for v in tok.tolist()}) for tok in feats]
    regions = image_token_regions(cfg.tile_size, 14, 0.5)
    assert [sorted(r.tolist()) for r in regions] == seen
    # and each region is a 2x2 block of neighbouring patches, the blocks tiling the grid
    assert sorted(np.concatenate(regions).tolist()) == list(range(n_patch))
    for r in regions:
        rows, cols = np.divmod(r, g)
        assert rows.max() - rows.min() == 1 and cols.max() - cols.min() == 1


def test_targets_from_a_hand_made_segmentation() -> None:
    tile, patch = 56, 14  # 4 x 4 patches -> 2 x 2 tokens of 28 px
    seg = np.zeros((tile, tile), np.uint8)
    seg[0:28, 28:56] = 7  # exactly the top-right token's region
    seg[40:44, 0:4] = 9  # 16 px of the bottom-left token's 784: 2 %, under the 3 % threshold
    seg[28:56, 28:56][:10, :10] = 255  # 100 px (12.8 %) of the bottom-right token
    targets = token_name_targets(seg, {7: [0], 9: [1], 255: [2, 3]}, 4, tile, patch, 0.5)
    regions = image_token_regions(tile, patch, 0.5)
    expected = np.zeros((4, 4), np.float32)
    for t, r in enumerate(regions):
        rows, cols = np.divmod(r, tile // patch)
        top, left = rows.min() * patch, cols.min() * patch
        if (top, left) == (0, 28):
            expected[t, 0] = 1
        if (top, left) == (28, 28):
            expected[t, [2, 3]] = 1
    np.testing.assert_array_equal(targets, expected)
    assert expected[:, 0].sum() == 1 and expected[:, 2].sum() == 1 and targets[:, 1].sum() == 0


def test_loss_from_clips_trains_vision_projector_and_llm(tiny) -> None:
    cfg, processor, model = tiny
    clips = [make_clip(i) for i in range(2)]
    dense = DenseNameLoss.from_clips(clips, processor, model.config, batch_size=4, seed=0)
    n_frames = sum(c.num_frames for c in clips)
    assert dense.pixel_values.shape[0] == n_frames == dense.targets.shape[0]
    ids = set(dense.token_ids.tolist())
    for word in ("red", "mug", "blue", "box", "right", "left", "hand"):  # object names, hand sides, "hand"
        assert set(processor.tokenizer.encode(" " + word, add_special_tokens=False)) <= ids, word
    # the right hand's columns are on exactly where the segmentation shows it (first frame, by hand)
    hand_cols = [
        dense.token_ids.tolist().index(i)
        for i in processor.tokenizer.encode(" hand", add_special_tokens=False)
    ]
    seg = clips[0].segmentation[0]
    hand_any = token_name_targets(seg, {HAND_SEGMENT["right"]: [0]}, 1, cfg.tile_size, 14, 0.5)[:, 0]
    np.testing.assert_array_equal(dense.targets[0, :, hand_cols[0]].numpy(), hand_any)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = dense(model)
    first.backward()
    inner = model.model
    for part in (inner.vision_tower, inner.multi_modal_projector, inner.language_model):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in inner.spatial_encoder.parameters())
    opt.step()
    for _ in range(40):
        opt.zero_grad()
        dense(model).backward()
        opt.step()
    assert np.mean(dense.history[-5:]) < 0.5 * dense.history[0]
    assert len(dense.history) == 41


def test_bad_inputs_name_the_problem(tiny) -> None:
    _, processor, model = tiny
    clip = make_clip(0)
    clip.segmentation = None
    with pytest.raises(ValueError, match="has no segmentation"):
        DenseNameLoss.from_clips([clip], processor, model.config)
    with pytest.raises(ValueError, match="same F"):
        DenseNameLoss(torch.zeros(2, 3, 8, 8), torch.zeros(3, 4, 1), [5], 1, 2)
    with pytest.raises(ValueError, match="token_ids"):
        DenseNameLoss(torch.zeros(2, 3, 8, 8), torch.zeros(2, 4, 2), [5], 1, 2)
    with pytest.raises(ValueError, match="dense_weight"):
        StandinConfig(dense_weight=-1.0)
    assert StandinConfig(dense_weight=0.0).dense_weight == 0.0


def test_token_log_depth_by_hand() -> None:
    tile, patch = 56, 14
    depth = np.full((tile, tile), 2.0, np.float32)
    depth[0:28, 28:56] = 0.5  # the top-right token's region
    depth[28:56, 0:28] = np.nan  # no surface under the bottom-left token
    depth[28:56, 28:56][:5, :] = 9.0  # 140 of 784 px: the median stays 2.0
    regions = image_token_regions(tile, patch, 0.5)
    got = token_log_depth(depth, tile, patch, regions)
    for t, r in enumerate(regions):
        rows, cols = np.divmod(r, tile // patch)
        top, left = rows.min() * patch, cols.min() * patch
        block = depth[top : top + 28, left : left + 28]
        if np.isnan(block).all():
            assert np.isnan(got[t])
        else:
            assert got[t] == pytest.approx(np.log(np.median(block[np.isfinite(block)])))
    assert sorted(np.round(np.exp(got[np.isfinite(got)]), 6).tolist()) == [0.5, 2.0, 2.0]


def test_depth_readout_targets_and_loss(tiny) -> None:
    cfg, processor, model = tiny
    clips = [make_clip(i) for i in range(2)]
    clips[1].depth = clips[1].depth * 2.0  # a second scene twice as far: the targets must vary
    clips[1].depth[0, :4, :4] = np.nan  # and a few pixels with no surface
    dense = DenseNameLoss.from_clips(clips, processor, model.config, batch_size=4, seed=0, depth_weight=0.5)
    # targets: z-scored log median depth, recomputed here from the clips with numpy
    regions = image_token_regions(cfg.tile_size, 14, 0.5)
    raw = np.stack(
        [token_log_depth(c.depth[f], cfg.tile_size, 14, regions) for c in clips for f in range(c.num_frames)]
    )
    expected = (raw - np.nanmean(raw)) / np.nanstd(raw)
    np.testing.assert_allclose(dense.depth.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert dense.depth_token_id == processor.tokenizer.convert_tokens_to_ids("<video>")
    # the loss adds weight x the squared error of the readout logit, recomputed by hand on the same frames
    state = dense.generator.get_state()
    total = dense(model)
    dense.generator.set_state(state)
    idx = torch.randint(len(dense.targets), (4,), generator=dense.generator)
    with torch.no_grad():
        inner = model.model
        feats = inner.get_image_features(dense.pixel_values[idx], None, use_spatial=False)
        emb = model.get_input_embeddings()
        seq = torch.cat(
            [
                emb(torch.full((4, 1), dense.image_start_id)),
                feats,
                emb(torch.full((4, 1), dense.image_end_id)),
            ],
            1,
        )
        h = inner.language_model(inputs_embeds=seq).last_hidden_state[:, 1:-1]
        readout = h @ model.lm_head.weight[dense.depth_token_id]
        t = dense.depth[idx]
        ok = torch.isfinite(t)
        expected_depth = ((readout[ok] - t[ok]) ** 2).mean()
    assert float(total.detach()) == pytest.approx(dense.history[-1] + 0.5 * float(expected_depth), rel=1e-5)
    assert dense.depth_history[-1] == pytest.approx(float(expected_depth), rel=1e-5)
    # names only: no depth needed
    clip = make_clip(0)
    clip.depth = None
    with pytest.raises(ValueError, match="has no depth"):
        DenseNameLoss.from_clips([clip], processor, model.config)
    names_only = DenseNameLoss.from_clips([clip], processor, model.config, depth_weight=0.0)
    assert names_only.depth is None and float(names_only(model).detach()) == pytest.approx(
        names_only.history[-1]
    )


def test_relative_depth_removes_each_frames_scale(tiny) -> None:
    """relative_depth: the same scene twice as far gives the same targets (depth up to scale)."""
    _, processor, model = tiny
    near = make_clip(0)
    far = make_clip(0)
    far.depth = far.depth * 2.0
    rel = DenseNameLoss.from_clips([near, far], processor, model.config, relative_depth=True)
    n = near.num_frames
    np.testing.assert_allclose(rel.depth[:n].numpy(), rel.depth[n:].numpy(), atol=1e-5)
    metric = DenseNameLoss.from_clips([near, far], processor, model.config)
    gap = (metric.depth[n:] - metric.depth[:n]).numpy()  # log 2 over the global std: one constant, > 0
    assert np.nanstd(gap) < 1e-5 and np.nanmean(gap) > 0.1
    with pytest.raises(ValueError, match="dense_relative_depth: expected a bool"):
        StandinConfig(dense_relative_depth=1)
