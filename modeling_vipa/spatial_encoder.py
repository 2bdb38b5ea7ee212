"""CUT3R spatial encoder (Wang et al., CVPR 2025): the 3D foundation model whose last decoder layer gives
VIPA-VLA its spatial tokens V_spa (paper §3.2.2), and whose heads give the Hand3D pipeline its pointmaps.

Per frame I_t of a clip, in order, with a recurrent state s_{t-1} (768 learned tokens at the start):

    F_t        = Enc(I_t)                                   ViT-L/16 + 2D RoPE, (N, 1024)
    z_t        = p_0 (t = 0)  |  Retrieve(mean(F_t), m_{t-1})   pose token, (1, 768)
    [z'_t, F'_t], s_t = Dec([z_t, W F_t], s_{t-1})          two interacting 12-layer decoders
    m_t        = Write(m_{t-1}, mean(F_t), z'_t)            pose memory (256 slots)
    X_t^self, C_t = DPT(F_t, F'^(6)_t, F'^(9)_t, F'_t)      pointmap in the own camera + confidence
    P_t        = MLP(z'_t)                                  camera pose (translation, quaternion)

Usage:

    import torch
    from modeling_vipa.configuration_cut3r import Cut3rConfig
    from modeling_vipa.spatial_encoder import Cut3rEncoder
    model = Cut3rEncoder(Cut3rConfig.tiny()).eval()
    out = model(torch.zeros(1, 2, 3, 64, 64))           # (B, T, 3, H, W), normalised to [-1, 1]
    assert out.tokens.shape == (1, 2, 1 + 16, 32)        # pose token + (64/16)^2 patch tokens, d_s = 32
    assert out.pts3d_self.shape == (1, 2, 64, 64, 3)

Official weights: `python -m training.convert_cut3r cut3r_512_dpt_4_64.pth out_dir/` (see its key table).
Numerically this module matches the reference implementation to 1e-5 in fp32 (tests/test_spatial_encoder.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_cut3r import Cut3rConfig

# ----------------------------------------------------------------------------------------------------------
# Rotary position embedding, attention, blocks
# ----------------------------------------------------------------------------------------------------------


class Cut3rRotaryEmbedding2D(nn.Module):
    """2D RoPE: the first half of each head is rotated by the token's row y, the second half by its column x.

    Within a half of size D/2 = 2Q, channel pairs (j, j + Q) rotate by angle `pos * base^(-j/Q)`:
        u' = u cos(a) - v sin(a),   v' = v cos(a) + u sin(a).
    Positions may be negative: the pose token sits at (-1, -1), a rotation by a negative angle, as in the
    reference's CUDA kernel (its table-based CPU fallback only indexes non-negative positions).
    """

    def __init__(self, base: float) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, heads, N, D) queries or keys; positions: (B, N, 2) integer (y, x) -> (B, heads, N, D)."""
        half = x.shape[-1] // 2
        # Same float32 expression as the reference, so that the angles agree bit for bit.
        inv_freq = 1.0 / (
            self.base ** (torch.arange(0, half, 2, device=x.device, dtype=torch.float32) / half)
        )
        out = x.float()
        parts = []
        for axis, chunk in enumerate(out.split(half, dim=-1)):
            angle = positions[..., axis].float()[:, None, :, None] * inv_freq  # (B, 1, N, Q)
            cos, sin = angle.cos(), angle.sin()
            u, v = chunk.chunk(2, dim=-1)
            parts += [u * cos - v * sin, v * cos + u * sin]
        return torch.cat(parts, dim=-1).to(x.dtype)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


class Cut3rMlp(nn.Module):
    """fc2(GELU(fc1 x)); x: (..., dim) -> (..., out_dim)."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Cut3rSelfAttention(nn.Module):
    """Multi-head self-attention with optional 2D RoPE on queries and keys; x: (B, N, C) -> (B, N, C)."""

    def __init__(
        self, dim: int, num_heads: int, rope: Cut3rRotaryEmbedding2D | None, qk_half_precision: bool = False
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.rope = rope
        self.qk_half_precision = qk_half_precision

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        if self.rope is not None:
            if self.qk_half_precision:
                # CroCo's encoder attention rounds q and k to float16 around RoPE (the official weights were
                # trained so): the rotation is computed in float32 and stored back in float16.
                q, k = q.half(), k.half()
            q, k = self.rope(q, positions).to(v.dtype), self.rope(k, positions).to(v.dtype)
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Cut3rCrossAttention(nn.Module):
    """Multi-head cross-attention x -> context with optional 2D RoPE; x: (B, N, C), context: (B, M, C)."""

    def __init__(self, dim: int, num_heads: int, rope: Cut3rRotaryEmbedding2D | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.rope = rope

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        x_pos: torch.Tensor | None,
        context_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        q = _split_heads(self.q_proj(x), self.num_heads)
        k = _split_heads(self.k_proj(context), self.num_heads)
        v = _split_heads(self.v_proj(context), self.num_heads)
        if self.rope is not None:
            q, k = self.rope(q, x_pos), self.rope(k, context_pos)
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Cut3rEncoderLayer(nn.Module):
    """Pre-norm ViT block: x += Attn(LN x); x += MLP(LN x). x: (B, N, C), positions: (B, N, 2)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        eps: float,
        rope: Cut3rRotaryEmbedding2D,
        qk_half_precision: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Cut3rSelfAttention(dim, num_heads, rope, qk_half_precision)
        self.mlp_norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Cut3rMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_norm(x), positions)
        return x + self.mlp(self.mlp_norm(x))


class Cut3rDecoderLayer(nn.Module):
    """CroCo decoder block: x += SelfAttn(LN x); x += CrossAttn(LN x, LN_c context); x += MLP(LN x).

    x: (B, N, C), context: (B, M, C); positions (B, N, 2) / (B, M, 2), or None without RoPE.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, eps: float, rope: Cut3rRotaryEmbedding2D | None
    ) -> None:
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Cut3rSelfAttention(dim, num_heads, rope)
        self.cross_attn_norm = nn.LayerNorm(dim, eps=eps)
        self.context_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Cut3rCrossAttention(dim, num_heads, rope)
        self.mlp_norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Cut3rMlp(dim, int(dim * mlp_ratio))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        x_pos: torch.Tensor | None = None,
        context_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_norm(x), x_pos)
        x = x + self.cross_attn(self.cross_attn_norm(x), self.context_norm(context), x_pos, context_pos)
        return x + self.mlp(self.mlp_norm(x))


class Cut3rAdaLayerNorm(nn.Module):
    """LayerNorm modulated by a condition c (DiT adaLN): LN(x) (1 + scale) + shift, [shift, scale] = W SiLU(c).

    x: (B, N, C), c: (B, C).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.modulation = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class Cut3rModulatedLayer(nn.Module):
    """ViT block whose norms are conditioned on the pose token (the world-frame head's "final transform")."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, eps: float, rope: Cut3rRotaryEmbedding2D
    ) -> None:
        super().__init__()
        self.self_attn_norm = Cut3rAdaLayerNorm(dim, eps)
        self.self_attn = Cut3rSelfAttention(dim, num_heads, rope)
        self.mlp_norm = Cut3rAdaLayerNorm(dim, eps)
        self.mlp = Cut3rMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, condition: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) patch tokens, condition: (B, C) pose token, positions: (B, N, 2)."""
        x = x + self.self_attn(self.self_attn_norm(x, condition), positions)
        return x + self.mlp(self.mlp_norm(x, condition))


# ----------------------------------------------------------------------------------------------------------
# Encoders, decoders, pose memory
# ----------------------------------------------------------------------------------------------------------


class Cut3rViT(nn.Module):
    """Patch embedding + RoPE ViT blocks + LayerNorm: the image encoder (3 channels) and the ray-map encoder
    (6 channels: ray origin and direction per pixel).

    pixels: (B, C, H, W), H and W multiples of p -> tokens (B, N, D), positions (B, N, 2) integer (row, col),
    N = (H / p)(W / p) in row-major order.
    """

    def __init__(
        self,
        in_channels: int,
        depth: int,
        num_heads: int,
        config: Cut3rConfig,
        rope: Cut3rRotaryEmbedding2D,
        qk_half_precision: bool = False,
    ) -> None:
        super().__init__()
        dim, p = config.enc_embed_dim, config.patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=p, stride=p)
        self.layers = nn.ModuleList(
            Cut3rEncoderLayer(
                dim, num_heads, config.mlp_ratio, config.layer_norm_eps, rope, qk_half_precision
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed(pixels)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        positions = torch.stack([rows, cols], dim=-1).reshape(1, h * w, 2).to(x.device)
        positions = positions.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, positions)
        return self.norm(x), positions


class Cut3rDecoder(nn.Module):
    """One of the two interacting decoders: input projection (encoder width -> d_s), layers, final norm.

    The layers are driven by `Cut3rEncoder.decode`, which interleaves them with the other decoder's.
    """

    def __init__(self, num_heads: int, config: Cut3rConfig, rope: Cut3rRotaryEmbedding2D) -> None:
        super().__init__()
        dim = config.dec_embed_dim
        self.embed = nn.Linear(config.enc_embed_dim, dim)
        self.layers = nn.ModuleList(
            Cut3rDecoderLayer(dim, num_heads, config.mlp_ratio, config.layer_norm_eps, rope)
            for _ in range(config.dec_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)


class Cut3rPoseMemory(nn.Module):
    """The pose retriever: a learned memory m of `local_mem_size` (key ‖ value) slots of width 2 d_s.

    read:  z_t = [Dec_read([W_q g_t ‖ e_mask], m)]_value     (the pose token of frame t > 0)
    write: m  <- Dec_write(m, [W_q g_t ‖ z'_t])               (after frame t is decoded)
    with g_t = mean over patches of the frame's encoder tokens, z'_t the decoded pose token.
    """

    def __init__(self, config: Cut3rConfig) -> None:
        super().__init__()
        dim = config.dec_embed_dim
        self.query_proj = nn.Linear(config.enc_embed_dim, dim)
        self.masked_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.memory = nn.Parameter(torch.zeros(1, config.local_mem_size, 2 * dim))
        depth = 2  # fixed in the reference

        def layers() -> nn.ModuleList:
            return nn.ModuleList(
                Cut3rDecoderLayer(
                    2 * dim, config.dec_num_heads, config.mlp_ratio, config.layer_norm_eps, None
                )
                for _ in range(depth)
            )

        self.write_layers = layers()
        self.read_layers = layers()

    def read(self, image_feature: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """image_feature g: (B, 1, enc_dim), memory: (B, S, 2 d_s) -> pose token (B, 1, d_s)."""
        x = self.query_proj(image_feature)
        x = torch.cat([x, self.masked_token.expand(x.shape[0], -1, -1)], dim=-1)
        for layer in self.read_layers:
            x = layer(x, memory)
        return x[..., x.shape[-1] // 2 :]

    def write(
        self, memory: torch.Tensor, image_feature: torch.Tensor, pose_token: torch.Tensor
    ) -> torch.Tensor:
        """memory: (B, S, 2 d_s), image_feature: (B, 1, enc_dim), pose_token: (B, 1, d_s) -> new memory."""
        entry = torch.cat([self.query_proj(image_feature), pose_token], dim=-1)
        for layer in self.write_layers:
            memory = layer(memory, entry)
        return memory


# ----------------------------------------------------------------------------------------------------------
# Heads: DPT (pointmaps, confidence), pose
# ----------------------------------------------------------------------------------------------------------


class Cut3rResidualConvUnit(nn.Module):
    """x + conv2(ReLU(conv1(ReLU x))), 3x3 convolutions; x: (B, F, h, w)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Cut3rFusionBlock(nn.Module):
    """DPT fusion: y = out_conv(Up2(RCU_2(x + RCU_1(skip)))), bilinear x2 with aligned corners.

    x: (B, F, h, w), skip: (B, F, h, w) or None (the deepest stage) -> (B, F, 2h, 2w).
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.skip_unit = Cut3rResidualConvUnit(features)
        self.unit = Cut3rResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.skip_unit(skip)
        x = F.interpolate(self.unit(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Cut3rDPT(nn.Module):
    """Dense Prediction Transformer head (Ranftl et al. 2021) over 4 hooked token maps on an h x w grid.

    Reassemble: map i is projected by a 1x1 conv to `layer_dims[i]` and resampled to 4x, 2x, 1x, 1/2x of the
    grid; project: 3x3 conv to `feature_dim`; fusion from the deepest map up (each x2); head: conv, x2,
    conv, ReLU, 1x1 conv. Net resolution 16 h x 16 w = H x W.

    tokens: 4 x (B, h w, C_i) -> (B, out_channels, H, W).
    """

    def __init__(self, in_dims: list[int], out_channels: int, config: Cut3rConfig) -> None:
        super().__init__()
        dims, features = config.dpt_layer_dims, config.dpt_feature_dim
        self.reassemble = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(in_dims[0], dims[0], 1), nn.ConvTranspose2d(dims[0], dims[0], 4, stride=4)
                ),
                nn.Sequential(
                    nn.Conv2d(in_dims[1], dims[1], 1), nn.ConvTranspose2d(dims[1], dims[1], 2, stride=2)
                ),
                nn.Sequential(nn.Conv2d(in_dims[2], dims[2], 1)),
                nn.Sequential(
                    nn.Conv2d(in_dims[3], dims[3], 1), nn.Conv2d(dims[3], dims[3], 3, stride=2, padding=1)
                ),
            ]
        )
        self.project = nn.ModuleList(nn.Conv2d(d, features, 3, padding=1, bias=False) for d in dims)
        self.fusion = nn.ModuleList(Cut3rFusionBlock(features) for _ in range(4))
        self.head = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(features // 2, config.dpt_last_dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(config.dpt_last_dim, out_channels, 1),
        )

    def forward(self, tokens: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        maps = [t.transpose(1, 2).unflatten(2, (h, w)) for t in tokens]
        maps = [proj(resample(m)) for m, resample, proj in zip(maps, self.reassemble, self.project)]
        # The stride-2 map rounds up on odd grids; crop its upsampled path back to the 1x map's size.
        x = self.fusion[3](maps[3])[:, :, : maps[2].shape[2], : maps[2].shape[3]]
        x = self.fusion[2](x, maps[2])
        x = self.fusion[1](x, maps[1])
        x = self.fusion[0](x, maps[0])
        return self.head(x)


def _pointmap_and_confidence(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPT output (B, 4, H, W) -> pointmap (B, H, W, 3), confidence (B, H, W).

    X = x / |x| (exp(|x|) - 1) (the "exp" depth mode: the norm is a log-distance), C = 1 + exp(c).
    """
    raw = raw.permute(0, 2, 3, 1)
    xyz = raw[..., :3]
    d = xyz.norm(dim=-1, keepdim=True)
    return xyz / d.clip(min=1e-8) * torch.expm1(d), 1 + raw[..., 3].exp()


def _camera_pose(raw: torch.Tensor) -> torch.Tensor:
    """Pose head output (B, 7) -> (t, q): t = t_raw / |t_raw| (exp(|t_raw|) - 1), q = ±q_raw / |q_raw| with
    real part q_w >= 0; q = (q_w, q_x, q_y, q_z). (B, 7)."""
    t, q = raw[..., :3], raw[..., 3:7]
    d = t.norm(dim=-1, keepdim=True)
    t = t * (torch.expm1(d) / d.clip(min=1e-8))
    q = F.normalize(q, p=2, dim=-1)
    return torch.cat([t, torch.where(q[..., :1] < 0, -q, q)], dim=-1)


def pose_encoding_to_matrix(camera_pose: torch.Tensor) -> torch.Tensor:
    """CUT3R pose encoding (..., 7) = (t, q_wxyz) -> camera-to-world matrix (..., 4, 4).

    "World" is the camera frame of the clip's first frame: x_world = R x_cam + t, OpenCV axes.
    """
    if camera_pose.shape[-1] != 7:
        raise ValueError(f"camera_pose: expected shape (..., 7), got {tuple(camera_pose.shape)}")
    t, q = camera_pose[..., :3], camera_pose[..., 3:]
    w, x, y, z = q.unbind(-1)
    s = 2.0 / (q * q).sum(-1)
    R = torch.stack(
        [
            1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
            s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
            s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
        ],
        dim=-1,
    ).unflatten(-1, (3, 3))  # fmt: skip
    T = torch.zeros(*camera_pose.shape[:-1], 4, 4, dtype=camera_pose.dtype, device=camera_pose.device)
    T[..., :3, :3], T[..., :3, 3], T[..., 3, 3] = R, t, 1.0
    return T


class Cut3rPoseHead(nn.Module):
    """MLP on the decoded pose token: (B, d_s) -> raw (B, 7) = (translation, quaternion) before `_camera_pose`."""

    def __init__(self, config: Cut3rConfig) -> None:
        super().__init__()
        self.mlp = Cut3rMlp(config.dec_embed_dim, int(config.dec_embed_dim * config.mlp_ratio), 7)

    def forward(self, pose_token: torch.Tensor) -> torch.Tensor:
        return self.mlp(pose_token)


class Cut3rHeads(nn.Module):
    """All heads on the hooked decoder layers (encoder tokens, image-decoder layers d/2, 3d/4 and d).

    - self-view DPT: pointmap in the frame's own camera + confidence;
    - pose MLP on the pose token;
    - world DPT: the last layer's patch tokens, first transformed by 2 blocks conditioned on the pose token,
      give the pointmap in the first frame's camera (optional: VIPA-VLA and Hand3D need only the self view).
    """

    def __init__(self, config: Cut3rConfig, rope: Cut3rRotaryEmbedding2D) -> None:
        super().__init__()
        dd = config.dec_embed_dim
        in_dims = [config.enc_embed_dim, dd, dd, dd]
        self.self_view_dpt = Cut3rDPT(in_dims, 4, config)
        self.pose_head = Cut3rPoseHead(config)
        self.world_layers = nn.ModuleList(
            Cut3rModulatedLayer(dd, config.dec_num_heads, config.mlp_ratio, config.layer_norm_eps, rope)
            for _ in range(2)
        )
        self.world_dpt = Cut3rDPT(in_dims, 4, config)

    def forward(
        self, hooked: list[torch.Tensor], grid: tuple[int, int], positions: torch.Tensor, return_world: bool
    ) -> dict[str, torch.Tensor]:
        """hooked: [(B, N, enc), (B, 1+N, d_s) x 3] (index 0 of the decoder maps = pose token);
        positions: (B, N, 2). Returns pts3d_self (B, H, W, 3), conf (B, H, W), camera_pose (B, 7), and with
        `return_world` pts3d_world (B, H, W, 3), conf_world (B, H, W)."""
        pose_token, patches = hooked[3][:, 0], hooked[3][:, 1:]
        maps = [hooked[0], hooked[1][:, 1:], hooked[2][:, 1:], patches]
        pts, conf = _pointmap_and_confidence(self.self_view_dpt(maps, grid))
        out = {"pts3d_self": pts, "conf": conf, "camera_pose": _camera_pose(self.pose_head(pose_token))}
        if return_world:
            for layer in self.world_layers:
                patches = layer(patches, pose_token, positions)
            out["pts3d_world"], out["conf_world"] = _pointmap_and_confidence(
                self.world_dpt(maps[:3] + [patches], grid)
            )
        return out


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Cut3rOutput(ModelOutput):
    """Per-frame outputs of `Cut3rEncoder`; padding frames (frame_mask False) are all zeros.

    tokens: (B, T, 1 + N, d_s) last image-decoder layer (after its norm); index 0 = pose token, then the
        N = (H/p)(W/p) patch tokens in row-major order. These are V_spa for the fusion layer.
    pts3d_self: (B, T, H, W, 3) pointmap in each frame's own camera frame (OpenCV axes, up to CUT3R's
        global scale: metric for the official weights, roughly metres).
    conf: (B, T, H, W) confidence of pts3d_self, >= 1.
    camera_pose: (B, T, 7) camera-to-world pose of each frame, world = first frame's camera:
        (t_x, t_y, t_z, q_w, q_x, q_y, q_z), unit quaternion with q_w >= 0 (`pose_encoding_to_matrix`).
    pts3d_world, conf_world: (B, T, H, W, 3), (B, T, H, W) pointmap in the first frame's camera and its
        confidence, only with `return_world=True`.
    """

    tokens: torch.FloatTensor | None = None
    pts3d_self: torch.FloatTensor | None = None
    conf: torch.FloatTensor | None = None
    camera_pose: torch.FloatTensor | None = None
    pts3d_world: torch.FloatTensor | None = None
    conf_world: torch.FloatTensor | None = None


class Cut3rEncoder(PreTrainedModel):
    """CUT3R: image encoder, empty-ray-map encoder, interacting image/state decoders, pose memory, heads.

    Each call starts from the learned initial state (explicit reset) and runs the T frames in order.
    """

    config_class = Cut3rConfig
    base_model_prefix = "cut3r"
    main_input_name = "pixel_values"
    _no_split_modules = ["Cut3rEncoderLayer", "Cut3rDecoderLayer"]

    def __init__(self, config: Cut3rConfig) -> None:
        super().__init__(config)
        rope = Cut3rRotaryEmbedding2D(config.rope_freq)
        self.image_encoder = Cut3rViT(
            3, config.enc_depth, config.enc_num_heads, config, rope, config.enc_qk_half_precision
        )
        self.ray_map_encoder = Cut3rViT(6, config.ray_enc_depth, config.ray_enc_num_heads, config, rope)
        self.state_tokens = nn.Parameter(torch.zeros(config.state_size, config.enc_embed_dim))
        self.pose_token = nn.Parameter(torch.zeros(1, 1, config.dec_embed_dim))
        self.image_decoder = Cut3rDecoder(config.dec_num_heads, config, rope)
        self.state_decoder = Cut3rDecoder(config.state_dec_num_heads, config, rope)
        self.pose_memory = Cut3rPoseMemory(config)
        self.heads = Cut3rHeads(config, rope)
        # State tokens sit on a 2D grid of even width w = ceil_even(floor(sqrt(S))), as in the reference.
        width = int(config.state_size**0.5)
        width += width % 2
        index = torch.arange(config.state_size)
        self.register_buffer(
            "state_positions", torch.stack([index // width, index % width], -1), persistent=False
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """CroCo's initialisation: xavier-uniform linear layers, zero biases, unit norms; tokens N(0, 0.02)."""
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, Cut3rPoseMemory):
            init.normal_(module.masked_token, std=0.2)
            init.normal_(module.memory, std=0.2)
        elif isinstance(module, Cut3rEncoder):
            init.normal_(module.state_tokens, std=0.02)
            init.normal_(module.pose_token, std=0.02)
            width = int(module.config.state_size**0.5)
            width += width % 2
            index = torch.arange(module.config.state_size, device=module.state_positions.device)
            init.copy_(module.state_positions, torch.stack([index // width, index % width], -1))

    def decode(
        self,
        state: torch.Tensor,
        image_features: torch.Tensor,
        image_positions: torch.Tensor,
        pose_token: torch.Tensor,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One step of the two interacting decoders (both read the other's previous layer):

            s^(l) = StateLayer_l(s^(l-1), x^(l-1)),   x^(l) = ImageLayer_l(x^(l-1), s^(l-1)),
            x^(0) = [z ‖ W_img F],   s^(0) = state,   outputs LN(x^(d)), LN(s^(d)).

        state: (B, S, d_s); image_features F: (B, N, enc); image_positions: (B, N, 2); pose_token z: (B, 1, d_s).
        Returns the image stream per layer [F, x^(1), ..., LN(x^(d))] (d + 1 entries; x has 1 + N tokens,
        the pose token at (-1, -1)) and the new state LN(s^(d)) (B, S, d_s).
        """
        batch = state.shape[0]
        state_pos = self.state_positions.expand(batch, -1, -1)
        pose_pos = torch.full((batch, 1, 2), -1, dtype=image_positions.dtype, device=image_positions.device)
        x_pos = torch.cat([pose_pos, image_positions], dim=1)
        x = torch.cat([pose_token, self.image_decoder.embed(image_features)], dim=1)
        s = state
        stream = [image_features]
        for state_layer, image_layer in zip(self.state_decoder.layers, self.image_decoder.layers):
            s, x = state_layer(s, x, state_pos, x_pos), image_layer(x, s, x_pos, state_pos)
            stream.append(x)
        stream[-1] = self.image_decoder.norm(x)
        return stream, self.state_decoder.norm(s)

    def _check_inputs(self, pixel_values: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        p = self.config.patch_size
        if not torch.is_tensor(pixel_values) or pixel_values.ndim != 5 or pixel_values.shape[2] != 3:
            shape = (
                tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            )
            raise ValueError(f"pixel_values: expected a tensor (B, T, 3, H, W), got {shape}")
        B, T, _, H, W = pixel_values.shape
        if H % p or W % p or H == 0 or W == 0:
            raise ValueError(
                f"pixel_values: H and W must be positive multiples of patch_size={p}, got {H}x{W}"
            )
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values: contains NaN or inf")
        if frame_mask is None:
            return torch.ones(B, T, dtype=torch.bool, device=pixel_values.device)
        if frame_mask.shape != (B, T) or frame_mask.dtype != torch.bool:
            raise ValueError(
                f"frame_mask: expected a bool tensor of shape {(B, T)}, got {frame_mask.dtype} {tuple(frame_mask.shape)}"
            )
        return frame_mask.to(pixel_values.device)

    def forward(
        self,
        pixel_values: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
        return_heads: bool = True,
        return_world: bool = False,
    ) -> Cut3rOutput:
        """Runs the frames of each clip in order through the recurrent state, from the initial state.

        pixel_values: (B, T, 3, H, W) normalised with config.image_mean/std; H, W multiples of patch_size.
        frame_mask: (B, T) bool or None; False marks padding frames: they leave the state and the pose
            memory unchanged and their outputs are zeros. A clip's first valid frame gets the learned pose
            token (the reference's frame 0), later ones the token read from the pose memory.
        return_heads: False skips all heads (the fusion layer needs only `tokens`).
        return_world: also return the pointmaps in the first frame's camera (the reference's cross view).
        """
        frame_mask = self._check_inputs(pixel_values, frame_mask)
        B, T, _, H, W = pixel_values.shape
        grid = (H // self.config.patch_size, W // self.config.patch_size)
        features, positions = self.image_encoder(pixel_values.flatten(0, 1))
        # The reference runs the ray-map encoder on an empty ray map and adds 0x its output when no ray map
        # is given; kept so every parameter stays in the graph (DDP) and non-finite weights still surface.
        ray_features, _ = self.ray_map_encoder(pixel_values.new_zeros(1, 6, H, W))
        features = (features + 0.0 * ray_features).unflatten(0, (B, T))
        positions = positions[:B]

        state = self.state_decoder.embed(self.state_tokens).expand(B, -1, -1)
        memory = self.pose_memory.memory.expand(B, -1, -1)
        started = torch.zeros(B, dtype=torch.bool, device=pixel_values.device)
        tokens, hooked = [], []
        d = self.config.dec_depth
        for t in range(T):
            feat = features[:, t]
            global_feat = feat.mean(dim=1, keepdim=True)
            pose_token = self.pose_token.expand(B, -1, -1)
            if started.any():
                retrieved = self.pose_memory.read(global_feat, memory)
                pose_token = torch.where(started[:, None, None], retrieved, pose_token)
            stream, new_state = self.decode(state, feat, positions, pose_token)
            new_memory = self.pose_memory.write(memory, global_feat, stream[-1][:, :1])
            valid = frame_mask[:, t, None, None]
            state = torch.where(valid, new_state, state)
            memory = torch.where(valid, new_memory, memory)
            started = started | frame_mask[:, t]
            tokens.append(stream[-1])
            if return_heads:
                hooked.append([stream[0], stream[d * 2 // 4], stream[d * 3 // 4], stream[d]])

        valid = frame_mask.to(features.dtype)
        outputs = {"tokens": torch.stack(tokens, dim=1)}
        if return_heads:
            # Heads run once on all frames: they are per-frame and need no recurrence.
            hooked = [torch.stack([h[i] for h in hooked], dim=1).flatten(0, 1) for i in range(4)]
            heads = self.heads(hooked, grid, positions.repeat(T, 1, 1), return_world)
            outputs.update({name: value.unflatten(0, (B, T)) for name, value in heads.items()})
        return Cut3rOutput(
            **{name: value * valid.view(B, T, *([1] * (value.ndim - 2))) for name, value in outputs.items()}
        )
