"""The stand-ins' initialisation: the tiny InternViT gets a 2D sine-cosine position code, not transformers' zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpu_demo.standins import (
    StandinConfig,
    build_standin_tokenizer,
    init_standin_vision_positions,
    standin_vipa_config,
)
from modeling_vipa.modeling_vipa import VipaForConditionalGeneration


def test_standin_vision_positions_are_a_2d_sincos_code_that_tells_patches_apart() -> None:
    cfg = StandinConfig.quick()
    tokenizer = build_standin_tokenizer(["The hand is left of the cup, 0.40 m."], vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    model = VipaForConditionalGeneration(standin_vipa_config(cfg, tokenizer)).eval()
    tower = model.model.vision_tower
    pixels = torch.zeros(1, 3, cfg.tile_size, cfg.tile_size)  # a uniform image: only position can differ
    with torch.no_grad():
        blind = tower(pixel_values=pixels).last_hidden_state[0, 1:]
    assert torch.allclose(
        blind, blind[:1].expand_as(blind), atol=1e-5
    )  # transformers' zero init: no position

    init_standin_vision_positions(model)
    pos = tower.embeddings.position_embeddings[0].detach().double().numpy()
    side, dim = cfg.tile_size // 14, cfg.vision_hidden
    freqs = np.pi * np.arange(1, dim // 4 + 1)
    for r in range(
        side
    ):  # by hand: patch (r, c) centre ((c + .5) / side, (r + .5) / side); sin, cos per axis
        for c in range(side):
            x, y = (c + 0.5) / side, (r + 0.5) / side
            want = np.concatenate(
                [np.sin(x * freqs), np.cos(x * freqs), np.sin(y * freqs), np.cos(y * freqs)]
            )
            np.testing.assert_allclose(pos[1 + r * side + c], want, atol=1e-6)
    assert not pos[0].any()  # CLS: no position
    with torch.no_grad():
        seen = tower(pixel_values=pixels).last_hidden_state[0, 1:]
    distances = torch.cdist(seen, seen)
    assert distances[~torch.eye(len(seen), dtype=torch.bool)].min() > 1e-3  # every patch now differs
    assert tower.embeddings.position_embeddings.requires_grad  # a starting point, still trained


def test_standin_vision_positions_refuse_a_tower_without_them() -> None:
    cfg = StandinConfig.quick()
    tokenizer = build_standin_tokenizer(["a cup"], vocab_size=cfg.vocab_size)
    model = VipaForConditionalGeneration(standin_vipa_config(cfg, tokenizer))
    model.model.vision_tower.embeddings.position_embeddings = None
    with pytest.raises(ValueError, match="no absolute position embeddings"):
        init_standin_vision_positions(model)


def test_token_point_loss_by_hand() -> None:
    """Patch means of the ground-truth points (holes skipped), a hand-set readout, the frame-depth scaling."""
    from cpu_demo.standins import token_point_loss

    rng = np.random.default_rng(0)
    S, g = 4, 2  # a 4 x 4 pointmap, 2 x 2 patches of 2 x 2 px
    pts = rng.uniform(0.5, 1.5, size=(1, 1, S, S, 3))
    pts[0, 0, 0, 0] = np.nan  # a hole in patch 0
    pts[0, 0, 2:, 2:] = np.nan  # patch 3 has no depth at all: it is left out
    tokens = rng.normal(size=(1, 1, g * g, 5))
    readout = torch.nn.Linear(5, 3)
    loss, err = token_point_loss(
        torch.tensor(tokens, dtype=torch.float32), readout, torch.tensor(pts, dtype=torch.float32)
    )
    W, b = readout.weight.detach().double().numpy(), readout.bias.detach().double().numpy()
    valid = np.isfinite(pts[0, 0]).all(-1)
    z_mean = pts[0, 0][valid][:, 2].mean()
    errs = []
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0)]):
        block = pts[0, 0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(-1, 3)
        target = block[np.isfinite(block).all(-1)].mean(0)
        errs.append(np.linalg.norm(tokens[0, 0, k] @ W.T + b - target) / z_mean)
    assert float(loss) == pytest.approx(np.mean(errs), rel=1e-5)
    assert float(err) == pytest.approx(float(loss))
    loss.backward()
    assert readout.weight.grad is not None and torch.isfinite(readout.weight.grad).all()
    with pytest.raises(ValueError, match="do not tile"):
        token_point_loss(torch.zeros(1, 1, 3, 5), readout, torch.tensor(pts, dtype=torch.float32))
