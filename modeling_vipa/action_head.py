"""Flow-matching DiT action head (paper §3.3).

The DiT input is the noisy action chunk plus the robot-state embedding, `h_DiT = concat(ã, s_t)` (the state
is one extra token in front of the H action tokens); every block self-attends over those tokens,
cross-attends to `h_cond` (the last hidden states of the action queries) and is conditioned on the flow
time tau by adaLN-Zero. Flow matching as the paper writes it:

    ã = (1 - tau) eps + tau a,    target v = a - eps,    tau ~ U(0, 1) (or Beta)
    inference: a <- a + (1 / N) v_theta(a, tau), tau = 0, 1/N, ..., (N - 1)/N, starting from a = eps

Usage:

    import torch
    from modeling_vipa.configuration_vipa import VipaActionHeadConfig
    from modeling_vipa.action_head import VipaActionHead
    head = VipaActionHead(VipaActionHeadConfig.tiny(), cond_dim=32)
    h_cond, state = torch.randn(2, 4, 32), torch.randn(2, 8)
    loss = head.flow_matching_loss(h_cond, state, actions=torch.randn(2, 4, 7))
    chunk = head.sample(h_cond, state)                          # (2, H=4, 7), normalised action space
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_vipa import VipaActionHeadConfig


def timestep_embedding(tau: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of the flow time.

    Args:
        tau: (B,) float in [0, 1].
        dim: embedding width (even).
        scale: tau is multiplied by it so that the frequencies span the usual diffusion range.

    Returns:
        (B, dim) float32: `[cos(scale tau w_i), sin(scale tau w_i)]`, `w_i = 10000^(-i / (dim / 2))`.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=tau.device, dtype=torch.float32) / half)
    angles = scale * tau.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: `x * (1 + scale) + shift`, with (B, D) shift/scale broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class VipaAttention(nn.Module):
    """Multi-head attention from `x` (B, N, D) to `context` (B, M, D); plain Linear layers so LoRA finds them."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `context` (B, M, D), each (B, heads, M, D / heads)."""
        b, m, d = context.shape
        h = self.num_heads
        k = self.k_proj(context).view(b, m, h, d // h).transpose(1, 2)
        v = self.v_proj(context).view(b, m, h, d // h).transpose(1, 2)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, N, D), context: (B, M, D), context_mask: (B, M) bool (True = attend) -> (B, N, D).

        kv: `project_kv(context)` computed once (the cross-attention to h_cond in every Euler step of
        `VipaActionHead.sample`); then `context` is not read."""
        b, n, d = x.shape
        h = self.num_heads
        q = self.q_proj(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.project_kv(context) if kv is None else kv
        mask = None if context_mask is None else context_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class VipaDiTBlock(nn.Module):
    """Self-attention (adaLN-Zero on tau) -> cross-attention to h_cond -> MLP (adaLN-Zero on tau)."""

    def __init__(self, config: VipaActionHeadConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.self_attn = VipaAttention(d, config.num_heads, config.dropout)
        self.norm_cross = nn.LayerNorm(d, eps=1e-6)
        self.cross_attn = VipaAttention(d, config.num_heads, config.dropout)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        width = int(d * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, width), nn.GELU(approximate="tanh"), nn.Linear(width, d))
        # shift/scale/gate for self-attention and MLP; zero-initialised so each block starts as identity
        self.adaLN_modulation = nn.Linear(d, 6 * d)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(
        self,
        x: torch.Tensor,
        t_emb: torch.Tensor,
        h_cond: torch.Tensor | None,
        cond_mask: torch.Tensor | None,
        cond_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, 1 + H, D), t_emb: (B, D), h_cond: (B, Q, D) (or its `cross_attn.project_kv` as
        `cond_kv`) -> (B, 1 + H, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(F.silu(t_emb)).chunk(6, dim=-1)
        y = _modulate(self.norm1(x), shift1, scale1)
        x = x + gate1[:, None] * self.self_attn(y, y)
        x = x + self.cross_attn(self.norm_cross(x), h_cond, cond_mask, kv=cond_kv)
        y = _modulate(self.norm2(x), shift2, scale2)
        return x + gate2[:, None] * self.mlp(y)


class VipaActionHead(nn.Module):
    """State encoder + DiT predicting the flow `v_theta(ã, tau | h_cond, s)`.

    Args:
        config: dims, horizon, DiT size, time sampling, inference steps.
        cond_dim: width of h_cond (the LLM hidden size).
    """

    def __init__(self, config: VipaActionHeadConfig, cond_dim: int) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.action_in = nn.Linear(config.action_dim, d)
        self.state_encoder = nn.Sequential(nn.Linear(config.state_dim, d), nn.SiLU(), nn.Linear(d, d))
        # token 0 is the state, tokens 1..H the actions: positions tell the DiT which is which
        self.pos_embed = nn.Parameter(torch.randn(1 + config.horizon, d) * 0.02)
        self.cond_proj = nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, d))
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(VipaDiTBlock(config) for _ in range(config.num_layers))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Linear(d, 2 * d)
        nn.init.zeros_(self.adaLN_out.weight)
        nn.init.zeros_(self.adaLN_out.bias)
        self.action_out = nn.Linear(d, config.action_dim)

    def check_state(self, state: torch.Tensor, batch: int) -> None:
        """Raise ValueError unless state is a finite (batch, state_dim) tensor."""
        want = (batch, self.config.state_dim)
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != want:
            got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"state must have shape {want} (batch, state_dim), got {got}")
        if not torch.isfinite(state).all():
            raise ValueError("state contains NaN or inf")

    def check_actions(self, actions: torch.Tensor, batch: int) -> None:
        """Raise ValueError unless actions is a finite (batch, horizon, action_dim) tensor."""
        want = (batch, self.config.horizon, self.config.action_dim)
        if not isinstance(actions, torch.Tensor) or tuple(actions.shape) != want:
            got = tuple(actions.shape) if isinstance(actions, torch.Tensor) else type(actions).__name__
            raise ValueError(f"actions must have shape {want} (batch, horizon, action_dim), got {got}")
        if not torch.isfinite(actions).all():
            raise ValueError("actions contain NaN or inf")

    def condition(self, state: torch.Tensor, h_cond: torch.Tensor) -> dict[str, Any]:
        """What the flow's conditioning gives every Euler step alike: the state token (B, 1, D) and each
        block's cross-attention keys/values of the projected h_cond. `sample` computes it once."""
        dtype = self.action_in.weight.dtype
        cond = self.cond_proj(h_cond.to(dtype))
        return {
            "state_token": self.state_encoder(state.to(dtype))[:, None],
            "cond_kv": [block.cross_attn.project_kv(cond) for block in self.blocks],
        }

    def forward(
        self,
        noisy_actions: torch.Tensor,
        tau: torch.Tensor,
        state: torch.Tensor,
        h_cond: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
        conditioning: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Predicted flow.

        Args:
            noisy_actions: ã, (B, H, action_dim).
            tau: (B,) flow time in [0, 1].
            state: (B, state_dim) normalised robot state s_t.
            h_cond: (B, Q, cond_dim) last hidden states of the action queries.
            cond_mask: optional (B, Q) bool, True where h_cond is valid.
            conditioning: `condition(state, h_cond)`, computed once for several calls with the same state
                and h_cond (then those two are not read again).

        Returns:
            v_theta: (B, H, action_dim).
        """
        dtype = self.action_in.weight.dtype
        if conditioning is None:
            conditioning = self.condition(state, h_cond)
        x = torch.cat([conditioning["state_token"], self.action_in(noisy_actions.to(dtype))], 1)
        x = x + self.pos_embed.to(dtype)
        t_emb = self.time_mlp(
            timestep_embedding(tau, self.config.hidden_size, self.config.time_embed_scale).to(dtype)
        )
        for block, kv in zip(self.blocks, conditioning["cond_kv"]):
            x = block(x, t_emb, None, cond_mask, cond_kv=kv)
        shift, scale = self.adaLN_out(F.silu(t_emb)).chunk(2, dim=-1)
        return self.action_out(_modulate(self.norm_out(x[:, 1:]), shift, scale))

    def sample_tau(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training flow times, (batch,): U(0, 1) as in the paper, or time_max * Beta(beta_alpha, beta_beta)."""
        if self.config.time_sampling == "uniform":
            return torch.rand(batch, device=device, generator=generator)
        beta = torch.distributions.Beta(self.config.beta_alpha, self.config.beta_beta)
        # torch's Beta takes no generator: draw it on CPU from the global RNG (seeded by the trainer)
        return (beta.sample((batch,)) * self.config.time_max).to(device)

    def flow_matching_loss(
        self,
        h_cond: torch.Tensor,
        state: torch.Tensor,
        actions: torch.Tensor,
        noise: torch.Tensor | None = None,
        tau: torch.Tensor | None = None,
        cond_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean squared error between v_theta(ã, tau) and a - eps, with ã = (1 - tau) eps + tau a.

        Args:
            h_cond: (B, Q, cond_dim); state: (B, state_dim); actions: (B, H, action_dim) normalised.
            noise: eps, (B, H, action_dim); standard normal when None.
            tau: (B,); drawn by `sample_tau` when None.

        Returns:
            Scalar loss.
        """
        batch = h_cond.shape[0]
        self.check_state(state, batch)
        self.check_actions(actions, batch)
        actions = actions.float()
        noise = torch.randn_like(actions) if noise is None else noise.float()
        tau = self.sample_tau(batch, actions.device) if tau is None else tau.float()
        noisy = (1 - tau[:, None, None]) * noise + tau[:, None, None] * actions
        v = self(noisy, tau, state, h_cond, cond_mask).float()
        return F.mse_loss(v, actions - noise)

    @torch.no_grad()
    def sample(
        self,
        h_cond: torch.Tensor,
        state: torch.Tensor,
        num_steps: int | None = None,
        noise: torch.Tensor | None = None,
        cond_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Integrate the flow from tau = 0 (noise) to tau = 1 with N Euler steps.

        Args:
            h_cond: (B, Q, cond_dim); state: (B, state_dim).
            num_steps: N; `config.num_inference_steps` when None.
            noise: starting point eps, (B, H, action_dim); standard normal when None.

        Returns:
            (B, H, action_dim) float32 actions in the normalised space.
        """
        batch = h_cond.shape[0]
        self.check_state(state, batch)
        steps = self.config.num_inference_steps if num_steps is None else int(num_steps)
        if steps <= 0:
            raise ValueError(f"num_steps must be > 0, got {num_steps}")
        shape = (batch, self.config.horizon, self.config.action_dim)
        if noise is None:
            a = torch.randn(shape, device=h_cond.device, generator=generator)
        else:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
            a = noise.float().clone()
        dt = 1.0 / steps
        conditioning = self.condition(state, h_cond)  # the same in every step: computed once
        for i in range(steps):
            tau = torch.full((batch,), i * dt, device=a.device)
            a = a + dt * self(a, tau, state, h_cond, cond_mask, conditioning=conditioning).float()
        return a
