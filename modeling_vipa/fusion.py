"""Cross-attention fusion of semantic and spatial visual tokens (paper §3.2.2, after VLM-3R).

Semantic tokens query the 3D tokens of the same frame:

    F_spa = out_proj(MHA(q = W_q V_sem, k, v = W_kv V_spa))
    V_f   = V_sem + alpha * Dropout(LayerNorm(F_spa))          (norm_position = "branch", default)
    V_f   = LayerNorm(Dropout(V_sem + alpha * F_spa))          (norm_position = "output")

Usage:

    import torch
    from modeling_vipa.configuration_vipa import VipaFusionConfig
    from modeling_vipa.fusion import VipaFusion
    fusion = VipaFusion(VipaFusionConfig.tiny(), vision_dim=32, spatial_dim=48)
    V_f = fusion(torch.randn(3, 16, 32), torch.randn(3, 1 + 20, 48))    # (frames, N_v, d_v)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_vipa import VipaFusionConfig


def grid_centres(rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, 2) patch centres (x, y) in [0, 1]^2 image coordinates, row-major like ViT tokens."""
    ys = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
    xs = (torch.arange(cols, dtype=torch.float64) + 0.5) / cols
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)


def sincos_2d(xy: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed 2D code: xy (N, 2) in [0, 1] -> (N, dim): per axis sin then cos of the n = dim / 4 frequencies
    pi, 2 pi, ..., n pi.

    The dot product of two codes is D(dx) + D(dy) with D(d) = sum_k cos(k pi d), a Dirichlet kernel: n at the
    same place, a main lobe about 2 / (2n + 1) wide, no second peak on [0, 1] (no aliasing).
    """
    if dim % 4:
        raise ValueError(f"dim: sincos_2d needs a multiple of 4, got {dim}")
    n = dim // 4
    freqs = math.pi * torch.arange(1, n + 1, dtype=torch.float64)
    angles = xy[:, :, None].double() * freqs  # (N, 2, n)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(xy.shape[0], dim)


def infer_spatial_grid(n_patches: int, aspect: float = 0.75) -> tuple[int, int]:
    """(rows, cols) of a patch grid from its size: square when it is a square, else the factorisation with
    rows / cols closest to `aspect` (CUT3R's landscape 384 x 512 input)."""
    side = math.isqrt(n_patches)
    if side * side == n_patches:
        return side, side
    pairs = [(r, n_patches // r) for r in range(1, n_patches + 1) if n_patches % r == 0]
    return min(pairs, key=lambda rc: abs(rc[0] / rc[1] - aspect))


class VipaFusion(nn.Module):
    """Fusion layer: every semantic token attends to the pose + patch tokens of its own frame.

    Args:
        config: heads, attention width, dropout, alpha_init, LayerNorm placement.
        vision_dim: d_v, width of the InternViT output tokens V_sem.
        spatial_dim: d_s, width of the CUT3R decoder tokens V_spa.
    """

    def __init__(self, config: VipaFusionConfig, vision_dim: int, spatial_dim: int) -> None:
        super().__init__()
        if vision_dim <= 0 or spatial_dim <= 0:
            raise ValueError(f"vision_dim and spatial_dim must be > 0, got {vision_dim} and {spatial_dim}")
        self.config = config
        self.num_heads = config.num_heads
        self.vision_dim = vision_dim
        self.spatial_dim = spatial_dim
        self.q_proj = nn.Linear(vision_dim, config.attention_dim)  # W_q
        self.kv_proj = nn.Linear(spatial_dim, 2 * config.attention_dim)  # W_kv: keys and values in one matmul
        self.out_proj = nn.Linear(config.attention_dim, vision_dim)
        self.alpha = nn.Parameter(torch.tensor(float(config.alpha_init)))
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(vision_dim, eps=config.layer_norm_eps)

    def cross_attention(
        self, V_sem: torch.Tensor, V_spa: torch.Tensor, spatial_grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """F_spa: (frames, N_v, d_v) from V_sem (frames, N_v, d_v) attending to V_spa (frames, N_s, d_s)."""
        frames, n_v, _ = V_sem.shape
        n_s = V_spa.shape[1]
        head_dim = self.config.attention_dim // self.num_heads
        q = self.q_proj(V_sem).view(frames, n_v, self.num_heads, head_dim).transpose(1, 2)
        k, v = self.kv_proj(V_spa).view(frames, n_s, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        if self.config.qk_position == "sincos2d":
            side = math.isqrt(n_v)
            if side * side != n_v:
                raise ValueError(f"V_sem: sincos2d needs a square patch grid, got {n_v} tokens")
            h, w = spatial_grid if spatial_grid is not None else infer_spatial_grid(n_s - 1)
            if h * w != n_s - 1:
                raise ValueError(f"spatial_grid {h}x{w} does not match V_spa's {n_s - 1} patch tokens")
            q = q + sincos_2d(grid_centres(side, side), head_dim).to(q)
            pos_s = torch.cat(
                [torch.zeros(1, head_dim, dtype=torch.float64), sincos_2d(grid_centres(h, w), head_dim)]
            )
            k = k + pos_s.to(k)  # pose token (index 0): no position
        drop = self.config.attention_dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.out_proj(attended.transpose(1, 2).reshape(frames, n_v, self.config.attention_dim))

    def forward(
        self, V_sem: torch.Tensor, V_spa: torch.Tensor, spatial_grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Fuse the tokens of each frame.

        Args:
            V_sem: (frames, N_v, d_v) InternViT tokens (patch tokens, CLS dropped) of each frame.
            V_spa: (frames, N_s, d_s) CUT3R last-decoder tokens (pose token + patches) of the same frames.
            spatial_grid: (rows, cols) of V_spa's patch tokens; only read by `qk_position="sincos2d"`
                (default: `infer_spatial_grid(N_s - 1)`).

        Returns:
            V_f: (frames, N_v, d_v), same dtype as V_sem.
        """
        if V_sem.ndim != 3 or V_sem.shape[-1] != self.vision_dim:
            raise ValueError(f"V_sem must be (frames, N_v, {self.vision_dim}), got {tuple(V_sem.shape)}")
        if V_spa.ndim != 3 or V_spa.shape[-1] != self.spatial_dim:
            raise ValueError(f"V_spa must be (frames, N_s, {self.spatial_dim}), got {tuple(V_spa.shape)}")
        if V_spa.shape[0] != V_sem.shape[0]:
            raise ValueError(
                f"V_sem and V_spa must hold the same frames, got {V_sem.shape[0]} and {V_spa.shape[0]} frames"
            )
        dtype = V_sem.dtype
        F_spa = self.cross_attention(
            V_sem.to(self.q_proj.weight.dtype), V_spa.to(self.kv_proj.weight.dtype), spatial_grid
        )
        if self.config.norm_position == "branch":
            V_f = V_sem + self.alpha * self.dropout(self.norm(F_spa))
        else:
            V_f = self.norm(self.dropout(V_sem + self.alpha * F_spa))
        return V_f.to(dtype)
