"""The fusion layer against a NumPy re-implementation of the paper's equations (§3.2.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling_vipa.configuration_vipa import VipaFusionConfig
from modeling_vipa.fusion import VipaFusion


def _numpy_fusion(fusion: VipaFusion, V_sem: np.ndarray, V_spa: np.ndarray) -> np.ndarray:
    """F_spa = out_proj(MHA(W_q V_sem, W_kv V_spa)); then the residual with alpha, LayerNorm where configured."""
    p = {k: v.detach().double().numpy() for k, v in fusion.state_dict().items()}
    heads = fusion.config.num_heads
    dim = fusion.config.attention_dim
    hd = dim // heads
    q = V_sem @ p["q_proj.weight"].T + p["q_proj.bias"]
    kv = V_spa @ p["kv_proj.weight"].T + p["kv_proj.bias"]
    k, v = kv[..., :dim], kv[..., dim:]
    out = np.zeros_like(q)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = q[..., sl] @ np.swapaxes(k[..., sl], -1, -2) / np.sqrt(hd)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[..., sl] = w @ v[..., sl]
    F_spa = out @ p["out_proj.weight"].T + p["out_proj.bias"]

    def layer_norm(x: np.ndarray) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + fusion.config.layer_norm_eps) * p["norm.weight"] + p["norm.bias"]

    alpha = float(p["alpha"])
    if fusion.config.norm_position == "branch":
        return V_sem + alpha * layer_norm(F_spa)
    return layer_norm(V_sem + alpha * F_spa)


def test_branch_applies_layernorm_then_dropout_in_train_mode() -> None:
    """V_f = V_sem + alpha * Dropout(LN(F_spa)) (README, fusion.py): in train mode each element of the branch
    is either exactly 0 (dropped) or LN(F_spa) / (1 - p) with LN computed on the whole, undropped F_spa.
    LN(Dropout(F_spa)) would give no exact zeros and other kept values."""
    torch.manual_seed(0)
    p = 0.5
    fusion = VipaFusion(
        VipaFusionConfig.tiny(dropout=p, attention_dropout=0.0), vision_dim=24, spatial_dim=40
    )
    fusion = fusion.double().train()
    V_sem = torch.randn(2, 16, 24, dtype=torch.float64)
    V_spa = torch.randn(2, 1 + 9, 40, dtype=torch.float64)
    with torch.no_grad():
        branch = ((fusion(V_sem, V_spa) - V_sem) / fusion.alpha).numpy()
    # independent: F_spa and the LayerNorm (default affine: weight 1, bias 0) by NumPy
    F_spa = fusion.cross_attention(V_sem, V_spa).detach().numpy()
    mu, var = F_spa.mean(-1, keepdims=True), F_spa.var(-1, keepdims=True)
    ln = (F_spa - mu) / np.sqrt(var + fusion.config.layer_norm_eps)
    dropped = np.isclose(branch, 0.0, atol=1e-12)
    assert 0.3 < dropped.mean() < 0.7  # about p of the elements
    np.testing.assert_allclose(branch[~dropped], ln[~dropped] / (1 - p), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm_position", ["branch", "output"])
def test_fusion_matches_numpy_equations(norm_position: str) -> None:
    torch.manual_seed(0)
    fusion = VipaFusion(
        VipaFusionConfig.tiny(norm_position=norm_position), vision_dim=24, spatial_dim=40
    ).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine so that a missing/misplaced norm shows
        fusion.norm.weight.uniform_(0.5, 1.5)
        fusion.norm.bias.uniform_(-0.3, 0.3)
    V_sem = torch.randn(3, 16, 24, dtype=torch.float64)
    V_spa = torch.randn(3, 1 + 9, 40, dtype=torch.float64)
    with torch.no_grad():
        got = fusion.double()(V_sem, V_spa).numpy()
    want = _numpy_fusion(fusion, V_sem.numpy(), V_spa.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_alpha_is_learnable_and_starts_at_half() -> None:
    fusion = VipaFusion(VipaFusionConfig.tiny(), vision_dim=24, spatial_dim=40)
    assert isinstance(fusion.alpha, torch.nn.Parameter) and fusion.alpha.requires_grad
    assert fusion.alpha.item() == 0.5
    fusion(torch.randn(2, 4, 24), torch.randn(2, 5, 40)).sum().backward()
    assert fusion.alpha.grad is not None and float(fusion.alpha.grad.abs()) > 0


def test_branch_norm_keeps_pretrained_path_at_alpha_zero() -> None:
    """With the LayerNorm on the branch, alpha = 0 returns V_sem exactly: the pretrained path is untouched."""
    fusion = VipaFusion(VipaFusionConfig.tiny(alpha_init=0.0), vision_dim=24, spatial_dim=40).eval()
    V_sem = torch.randn(2, 4, 24) * 7 + 3
    assert torch.equal(fusion(V_sem, torch.randn(2, 5, 40)), V_sem)
    output_norm = VipaFusion(VipaFusionConfig.tiny(alpha_init=0.0, norm_position="output"), 24, 40).eval()
    assert not torch.allclose(output_norm(V_sem, torch.randn(2, 5, 40)), V_sem)


def test_each_frame_attends_only_to_its_own_spatial_tokens() -> None:
    torch.manual_seed(1)
    fusion = VipaFusion(VipaFusionConfig.tiny(), vision_dim=24, spatial_dim=40).eval()
    V_sem, V_spa = torch.randn(2, 4, 24), torch.randn(2, 5, 40)
    changed = V_spa.clone()
    changed[1] = torch.randn(5, 40)
    a, b = fusion(V_sem, V_spa), fusion(V_sem, changed)
    assert torch.equal(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_heads": 3, "attention_dim": 32}, "attention_dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm_position": "pre"}, "norm_position"),
        ({"num_heads": 0}, "num_heads"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        VipaFusionConfig(**kwargs)


def test_bad_shapes_raise() -> None:
    fusion = VipaFusion(VipaFusionConfig.tiny(), vision_dim=24, spatial_dim=40)
    with pytest.raises(ValueError, match="V_spa"):
        fusion(torch.randn(2, 4, 24), torch.randn(2, 5, 41))
    with pytest.raises(ValueError, match="same frames"):
        fusion(torch.randn(2, 4, 24), torch.randn(3, 5, 40))
    with pytest.raises(ValueError, match="V_sem"):
        fusion(torch.randn(4, 24), torch.randn(2, 5, 40))


def _numpy_sincos(xy: np.ndarray, dim: int) -> np.ndarray:
    """The documented code written out by hand: per axis sin then cos of n = dim/4 frequencies pi, 2 pi, ..."""
    n = dim // 4
    freqs = np.pi * np.arange(1, n + 1)
    out = []
    for x, y in xy:
        out.append(
            np.concatenate([np.sin(x * freqs), np.cos(x * freqs), np.sin(y * freqs), np.cos(y * freqs)])
        )
    return np.array(out)


def test_sincos2d_positions_match_a_hand_computation_and_pair_the_same_place() -> None:
    """qk_position="sincos2d": q + pos(V_sem patch), k + pos(V_spa patch) (pose token: none), checked in NumPy;
    with the content projections zeroed, each semantic patch attends most to the spatial patch over it."""
    torch.manual_seed(0)
    cfg = VipaFusionConfig.tiny(qk_position="sincos2d", attention_dim=32, num_heads=2)
    fusion = VipaFusion(cfg, vision_dim=24, spatial_dim=40).double().eval()
    V_sem, V_spa = torch.randn(2, 16, 24, dtype=torch.float64), torch.randn(2, 1 + 6, 40, dtype=torch.float64)
    # semantic grid 4x4, spatial grid 2 rows x 3 cols: centres at ((c + 0.5) / cols, (r + 0.5) / rows)
    sem_xy = np.array([((c + 0.5) / 4, (r + 0.5) / 4) for r in range(4) for c in range(4)])
    spa_xy = np.array([((c + 0.5) / 3, (r + 0.5) / 2) for r in range(2) for c in range(3)])
    hd = 16
    pos_q, pos_k = _numpy_sincos(sem_xy, hd), np.vstack([np.zeros((1, hd)), _numpy_sincos(spa_xy, hd)])
    p = {k: v.detach().numpy() for k, v in fusion.state_dict().items()}
    q = V_sem.numpy() @ p["q_proj.weight"].T + p["q_proj.bias"]
    kv = V_spa.numpy() @ p["kv_proj.weight"].T + p["kv_proj.bias"]
    k, v = kv[..., :32], kv[..., 32:]
    out = np.zeros_like(q)
    for h in range(2):
        sl = slice(h * hd, (h + 1) * hd)
        logits = (q[..., sl] + pos_q) @ np.swapaxes(k[..., sl] + pos_k, -1, -2) / np.sqrt(hd)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        out[..., sl] = (w / w.sum(-1, keepdims=True)) @ v[..., sl]
    want = out @ p["out_proj.weight"].T + p["out_proj.bias"]
    with torch.no_grad():
        got = fusion.cross_attention(V_sem, V_spa, spatial_grid=(2, 3)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)

    with torch.no_grad():  # position only: the attention argmax is the spatial patch nearest in the image
        for lin in (fusion.q_proj, fusion.kv_proj):
            lin.weight.zero_()
            lin.bias.zero_()
        q = torch.zeros(1, 2, 16, hd, dtype=torch.float64) + torch.from_numpy(pos_q)
        k = torch.zeros(1, 2, 7, hd, dtype=torch.float64) + torch.from_numpy(pos_k)
    nearest = np.argmin(((sem_xy[:, None] - spa_xy[None]) ** 2).sum(-1), axis=1) + 1
    assert ((q @ k.transpose(-1, -2))[0, 0].argmax(-1).numpy() == nearest).all()


def test_sincos2d_grid_errors_and_inference() -> None:
    from modeling_vipa.fusion import infer_spatial_grid

    assert infer_spatial_grid(16) == (4, 4)
    assert infer_spatial_grid(24 * 32) == (24, 32)  # CUT3R 384 x 512 at patch 16
    fusion = VipaFusion(VipaFusionConfig.tiny(qk_position="sincos2d"), vision_dim=24, spatial_dim=40)
    with pytest.raises(ValueError, match="spatial_grid 2x2 does not match"):
        fusion(torch.randn(1, 16, 24), torch.randn(1, 1 + 6, 40), spatial_grid=(2, 2))
    with pytest.raises(ValueError, match="square patch grid"):
        fusion(torch.randn(1, 15, 24), torch.randn(1, 1 + 6, 40))
    with pytest.raises(ValueError, match="qk_position"):
        VipaFusionConfig.tiny(qk_position="rope")
