"""Configuration of VIPA-VLA (paper §3.2.2, §3.3): InternVL + CUT3R + fusion + flow-matching action head.

`VipaConfig` composes four sub-configs, each flat, typed and validated on construction:

- `internvl_config`: a transformers-native `InternVLConfig` (InternViT-300M, 448 px tiles, pixel shuffle
  0.5 -> 256 tokens per frame, Qwen3-1.7B), i.e. InternVL3.5-2B;
- `spatial_config`: the CUT3R encoder (`Cut3rConfig`, ViT-L/16 encoder, 768-d decoders);
- `fusion_layer_config`: the cross-attention fusion layer (`VipaFusionConfig`);
- `action_head_config`: the flow-matching DiT head of the post-training stage (`VipaActionHeadConfig`).

Usage:

    from modeling_vipa.configuration_vipa import VipaConfig
    config = VipaConfig.tiny()                      # a few layers, hidden 32: tests and the CPU default
    real = VipaConfig()                             # the paper's sizes (InternVL3.5-2B + CUT3R)
    assert real.internvl_config.image_seq_length == 256
    VipaConfig.from_dict(config.to_dict())          # round-trips through config.json
"""

from __future__ import annotations

from typing import Any

from transformers import InternVLConfig, PreTrainedConfig

from .configuration_cut3r import Cut3rConfig

# Motion-token vocabulary of DESIGN.md §3: K bin tokens shared by x, y, z plus two delimiters.
MOTION_BIN_TOKEN = "<motion_{}>"
MOTION_START_TOKEN = "<motion>"
MOTION_END_TOKEN = "</motion>"


def _require(condition: bool, field: str, expected: str, value: Any) -> None:
    """Raise a ValueError naming `field` when a config value is out of range."""
    if not condition:
        raise ValueError(f"{field} must be {expected}, got {value!r}")


class VipaFusionConfig(PreTrainedConfig):
    """Cross-attention fusion of semantic (V_sem) and spatial (V_spa) visual tokens (paper §3.2.2).

    `V_f = V_sem + alpha * Dropout(LayerNorm(F_spa))` with `F_spa = out_proj(MHA(W_q V_sem, W_kv V_spa))`
    when `norm_position == "branch"` (default). The paper says "dropout and layer normalization are
    applied" without saying where; on the branch, the pretrained path V_sem -> pixel shuffle -> projector
    reaches the projector unchanged (its own LayerNorm expects InternViT's raw statistics), and the branch is
    scale-normalised so `alpha` alone sets its weight. `"output"` is the literal reading
    `V_f = LayerNorm(Dropout(V_sem + alpha * F_spa))`, kept for ablations.
    `qk_position = "sincos2d"` adds a fixed 2D sine-cosine code of each patch's position in the image (both
    grids mapped to [0, 1]^2) to every head's queries and keys, so a semantic patch can find the spatial
    patch that sees the same place: CUT3R's tokens carry position only through RoPE inside its attention,
    so their content hardly says where they are. The pose token gets no position code.
    The token widths d_v and d_s are read from the vision and CUT3R configs, not repeated here.
    """

    model_type = "vipa_fusion"

    num_heads: int = 16  # attention heads of the cross-attention (attention_dim must divide by it)
    attention_dim: int = 1024  # width of the shared attention space that W_q and W_kv project into
    dropout: float = 0.1  # dropout on LN(F_spa), last before the residual add (paper: "to stabilize")
    attention_dropout: float = 0.0  # dropout on the attention weights
    alpha_init: float = 0.5  # initial value of the learnable residual scale alpha (paper §4.1)
    norm_position: str = "branch"  # "branch": LayerNorm on F_spa; "output": on V_sem + alpha F_spa
    layer_norm_eps: float = 1e-6  # epsilon of that LayerNorm
    qk_position: str = "none"  # "sincos2d": image-position code on queries and keys; "none": plain MHA

    def __post_init__(self, **kwargs: Any) -> None:
        _require(self.num_heads > 0, "num_heads", "> 0", self.num_heads)
        _require(
            self.attention_dim > 0 and self.attention_dim % self.num_heads == 0,
            "attention_dim",
            f"a positive multiple of num_heads={self.num_heads}",
            self.attention_dim,
        )
        _require(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)", self.dropout)
        _require(
            0.0 <= self.attention_dropout < 1.0, "attention_dropout", "in [0, 1)", self.attention_dropout
        )
        _require(
            self.norm_position in ("branch", "output"),
            "norm_position",
            "'branch' or 'output'",
            self.norm_position,
        )
        _require(self.layer_norm_eps > 0, "layer_norm_eps", "> 0", self.layer_norm_eps)
        _require(
            self.qk_position in ("none", "sincos2d"), "qk_position", "'none' or 'sincos2d'", self.qk_position
        )
        if self.qk_position == "sincos2d":
            head_dim = self.attention_dim // self.num_heads
            _require(
                head_dim % 4 == 0,
                "attention_dim",
                "num_heads x a multiple of 4 (sincos2d)",
                self.attention_dim,
            )
        super().__post_init__(**kwargs)

    @classmethod
    def tiny(cls, **overrides: Any) -> VipaFusionConfig:
        """Two heads over a 32-d attention space, for tests."""
        return cls(**{"num_heads": 2, "attention_dim": 32, "dropout": 0.0, **overrides})


class VipaActionHeadConfig(PreTrainedConfig):
    """Flow-matching DiT action head of the post-training stage (paper §3.3).

    The paper fixes the objective (`ã = (1 - tau) eps + tau a`, target `a - eps`, tau ~ U(0, 1)) but not the
    DiT's size; the defaults follow the GR00T-style heads the paper compares with (width 1024, 8 blocks),
    and the LIBERO action/state layout (7-d end-effector delta + gripper, 8-d state).
    """

    model_type = "vipa_action_head"

    action_dim: int = 7  # dimension of one action (LIBERO: 6-d end-effector delta + gripper)
    state_dim: int = 8  # dimension of the robot state s_t fed to the state encoder
    horizon: int = 16  # H, actions per predicted chunk
    num_action_queries: int = 32  # learned query tokens appended to the prompt; their states are h_cond
    hidden_size: int = 1024  # DiT width
    num_layers: int = 8  # DiT depth (blocks of self-attention, cross-attention to h_cond, MLP)
    num_heads: int = 16  # DiT attention heads (hidden_size must divide by it)
    mlp_ratio: float = 4.0  # DiT MLP width / hidden_size
    dropout: float = 0.0  # dropout inside the DiT blocks
    time_sampling: str = "uniform"  # training tau distribution: "uniform" U(0,1) (paper) or "beta"
    beta_alpha: float = 1.5  # Beta(alpha, beta) for time_sampling="beta" (pi0-style, favours small tau)
    beta_beta: float = 1.0  # second Beta parameter
    time_max: float = 0.999  # Beta samples are scaled into [0, time_max] so tau = 1 (no noise) is never hit
    num_inference_steps: int = 10  # N Euler steps from tau = 0 (noise) to tau = 1 in predict_action
    time_embed_scale: float = 1000.0  # tau is multiplied by this before the sinusoidal embedding

    def __post_init__(self, **kwargs: Any) -> None:
        for name in ("action_dim", "state_dim", "horizon", "num_action_queries", "hidden_size", "num_layers"):
            _require(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        _require(self.num_heads > 0, "num_heads", "> 0", self.num_heads)
        _require(
            self.hidden_size % self.num_heads == 0,
            "hidden_size",
            f"a multiple of num_heads={self.num_heads}",
            self.hidden_size,
        )
        _require(self.mlp_ratio > 0, "mlp_ratio", "> 0", self.mlp_ratio)
        _require(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)", self.dropout)
        _require(
            self.time_sampling in ("uniform", "beta"),
            "time_sampling",
            "'uniform' or 'beta'",
            self.time_sampling,
        )
        _require(self.beta_alpha > 0, "beta_alpha", "> 0", self.beta_alpha)
        _require(self.beta_beta > 0, "beta_beta", "> 0", self.beta_beta)
        _require(0.0 < self.time_max <= 1.0, "time_max", "in (0, 1]", self.time_max)
        _require(self.num_inference_steps > 0, "num_inference_steps", "> 0", self.num_inference_steps)
        super().__post_init__(**kwargs)

    @classmethod
    def tiny(cls, **overrides: Any) -> VipaActionHeadConfig:
        """Two 32-d blocks, horizon 4, for tests."""
        values = {
            "action_dim": 7,
            "state_dim": 8,
            "horizon": 4,
            "num_action_queries": 4,
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
        }
        return cls(**{**values, **overrides})


def internvl_35_2b_config(**overrides: Any) -> InternVLConfig:
    """InternVL3.5-2B: InternViT-300M (448 px, patch 14) + pixel shuffle 0.5 + Qwen3-1.7B."""
    vision = {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "image_size": 448,
        "patch_size": 14,
        "norm_type": "layer_norm",
        "use_qk_norm": False,
        "layer_scale_init_value": 0.1,
    }
    text = {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
    }
    values = {
        "vision_config": vision,
        "text_config": text,
        # <IMG_CONTEXT> of the InternVL3.5 tokenizer; the processor must use the same id (checked on load).
        "image_token_id": 151671,
        "image_seq_length": 256,  # (448 / 14)^2 patches * 0.5^2 after pixel shuffle
        "downsample_ratio": 0.5,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": True,
    }
    return InternVLConfig(**{**values, **overrides})


def internvl_tiny_config(**overrides: Any) -> InternVLConfig:
    """A 2-layer, 32-d InternVL with 56 px tiles (16 patches -> 4 tokens per frame) and a 128-token Qwen3."""
    vision = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 56,
        "patch_size": 14,
    }
    text = {
        "model_type": "qwen3",
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    }
    values = {
        "vision_config": vision,
        "text_config": text,
        "image_token_id": 127,
        "image_seq_length": 4,
        "downsample_ratio": 0.5,
        "tie_word_embeddings": True,
    }
    return InternVLConfig(**{**values, **overrides})


class VipaConfig(PreTrainedConfig):
    """VIPA-VLA: InternVL3.5 with a CUT3R branch fused into the vision tokens, motion tokens, and an action head.

    Inputs the model expects (produced by `VipaProcessor`):
    `input_ids, attention_mask: (B, L)`; `pixel_values: (F, 3, S, S)` InternVL tiles, one per real frame,
    frames of sample 0 first, in time order; `spatial_pixel_values: (B, T, 3, Hs, Ws)` CUT3R-normalised;
    `spatial_frame_mask: (B, T)` bool, True on real frames (F = spatial_frame_mask.sum()); and for the
    action model `state: (B, state_dim)` normalised.
    """

    model_type = "vipa"
    sub_configs_defaults = {
        "internvl_config": InternVLConfig,
        "spatial_config": Cut3rConfig,
        "fusion_layer_config": VipaFusionConfig,
        "action_head_config": VipaActionHeadConfig,
    }

    internvl_config: dict | PreTrainedConfig | None = None  # InternVL (vision tower, projector, Qwen3)
    spatial_config: dict | PreTrainedConfig | None = None  # CUT3R 3D encoder producing V_spa
    # cross-attention fusion layer; not `fusion_config`: from_pretrained reserves that name for kernel fusion
    fusion_layer_config: dict | PreTrainedConfig | None = None
    action_head_config: dict | PreTrainedConfig | None = None  # flow-matching DiT head (post-training)
    max_frames: int = 4  # most frames per sample (paper §4.1: 1-4 consecutive frames)
    motion_token_ids: list[int] | None = None  # ids of <motion_0> ... <motion_{K-1}> in bin order
    motion_start_token_id: int | None = None  # id of the <motion> delimiter
    motion_end_token_id: int | None = None  # id of the </motion> delimiter
    tie_word_embeddings: bool = True  # lm_head shares the input embedding matrix (Qwen3-1.7B does)
    # False: the single-encoder model (InternVL alone): CUT3R and the fusion are skipped, V_f = V_sem exactly;
    # the one switch for "no 3D branch" (the Table 5/7/8 baselines), saved with the checkpoint
    use_spatial_branch: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if self.internvl_config is None:
            self.internvl_config = internvl_35_2b_config()
        super().__post_init__(**kwargs)
        _require(self.max_frames > 0, "max_frames", "> 0", self.max_frames)
        _require(
            isinstance(self.use_spatial_branch, bool), "use_spatial_branch", "a bool", self.use_spatial_branch
        )
        vision = self.internvl_config.vision_config
        patches = (vision.image_size[0] // vision.patch_size[0]) * (
            vision.image_size[1] // vision.patch_size[1]
        )
        expected = int(round(patches * self.internvl_config.downsample_ratio**2))
        _require(
            self.internvl_config.image_seq_length == expected,
            "internvl_config.image_seq_length",
            f"{expected} (patches {patches} x downsample_ratio^2)",
            self.internvl_config.image_seq_length,
        )
        _require(
            self.internvl_config.vision_feature_layer == -1,
            "internvl_config.vision_feature_layer",
            "-1 (fusion acts on the last vision layer)",
            self.internvl_config.vision_feature_layer,
        )
        if self.motion_token_ids is not None:
            ids = list(self.motion_token_ids)
            _require(len(set(ids)) == len(ids), "motion_token_ids", "distinct ids", ids[:8])
            vocab = self.internvl_config.text_config.vocab_size
            _require(max(ids) < vocab, "motion_token_ids", f"ids < vocab_size={vocab}", max(ids))

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PreTrainedConfig:
        """The Qwen3 config: generation and caches read layer counts and vocab size from it."""
        return self.internvl_config.get_text_config(decoder=decoder, encoder=encoder)

    @property
    def image_token_id(self) -> int:
        """Id of the image placeholder token (one per visual token) in `input_ids`."""
        return self.internvl_config.image_token_id

    @property
    def num_motion_bins(self) -> int:
        """K, the number of motion bin tokens recorded by `add_motion_tokens` (0 before)."""
        return 0 if self.motion_token_ids is None else len(self.motion_token_ids)

    @classmethod
    def tiny(cls, **overrides: Any) -> VipaConfig:
        """Every part a few layers deep and 32 wide: fast on CPU, for tests and the CPU default."""
        values = {
            "internvl_config": internvl_tiny_config(),
            "spatial_config": Cut3rConfig.tiny(),
            "fusion_layer_config": VipaFusionConfig.tiny(),
            "action_head_config": VipaActionHeadConfig.tiny(),
        }
        return cls(**{**values, **overrides})
