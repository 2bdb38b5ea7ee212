"""Configuration of the CUT3R spatial encoder (Wang et al., "Continuous 3D Perception Model with Persistent
State", CVPR 2025), as VIPA-VLA uses it for its spatial tokens V_spa (paper §3.2.2).

The defaults are the official `cut3r_512_dpt_4_64` checkpoint: ViT-L/16 image encoder (1024 x 24) with 2D
RoPE (base 100), a 2-layer ray-map encoder, two interacting 12-layer 768-d decoders (image: 12 heads,
state: 16 heads) over 768 learned state tokens, the pose token with its 256-slot memory, and DPT heads.

Usage:

    from modeling_vipa.configuration_cut3r import Cut3rConfig
    config = Cut3rConfig()                       # cut3r_512_dpt_4_64
    tiny = Cut3rConfig.tiny()                    # a few 32-d layers: tests and the CPU default
    assert config.hidden_size == 768             # d_s, the width of the tokens handed to the fusion layer
    Cut3rConfig.from_dict(tiny.to_dict())        # round-trips through config.json
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig


def _require(condition: bool, field: str, expected: str, value: Any) -> None:
    """Raise a ValueError naming `field` when a config value is out of range."""
    if not condition:
        raise ValueError(f"Cut3rConfig.{field} must be {expected}, got {value!r}")


class Cut3rConfig(PreTrainedConfig):
    """Sizes of the CUT3R encoder; every field maps to one argument of the reference `ARCroco3DStereo`.

    Fields the reference hard-codes (ray-map encoder heads, DPT widths) are fields here so that tiny
    variants exist; their defaults are the reference's constants.
    """

    model_type = "vipa_cut3r"

    img_size: int = 512  # nominal (training) image side; any H, W that are multiples of patch_size work
    patch_size: int = 16  # ViT patch side p; the DPT head's 4 resampling stages assume p = 16
    enc_embed_dim: int = 1024  # image-encoder width (ViT-L)
    enc_depth: int = 24  # image-encoder blocks
    enc_num_heads: int = 16  # image-encoder attention heads
    ray_enc_depth: int = 2  # ray-map encoder blocks (same width as the image encoder)
    ray_enc_num_heads: int = 16  # ray-map encoder heads (the reference hard-codes 16)
    dec_embed_dim: int = 768  # d_s: width of both decoders, of the state and of the output tokens
    dec_depth: int = 12  # blocks of each decoder (image and state decoders have the same depth)
    dec_num_heads: int = 12  # image-decoder heads (also the pose memory's and the world head's)
    state_dec_num_heads: int = 16  # state-decoder heads
    state_size: int = 768  # learned state tokens
    local_mem_size: int = 256  # slots of the pose memory that the pose retriever reads
    mlp_ratio: float = 4.0  # MLP hidden width / block width, everywhere
    rope_freq: float = 100.0  # base of the 2D rotary position embedding ("RoPE100")
    layer_norm_eps: float = 1e-6  # epsilon of every LayerNorm
    enc_qk_half_precision: bool = True  # image encoder rounds q, k to float16 around RoPE, as CroCo's does
    head_type: str = "dpt"  # dense head: "dpt" (the 512 checkpoint); "linear" (224 checkpoint) is not built
    dpt_layer_dims: tuple[int, ...] = (96, 192, 384, 768)  # DPT reassemble widths of the 4 hooked layers
    dpt_feature_dim: int = 256  # DPT fusion width
    dpt_last_dim: int = 128  # width before the DPT's last 1x1 convolution
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # pixel normalisation: (rgb/255 - mean) / std -> [-1, 1]
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)  # see image_mean

    def __post_init__(self, **kwargs: Any) -> None:
        self.dpt_layer_dims = tuple(int(d) for d in self.dpt_layer_dims)
        self.image_mean = tuple(float(m) for m in self.image_mean)
        self.image_std = tuple(float(s) for s in self.image_std)
        for name in ("img_size", "patch_size", "enc_embed_dim", "enc_depth", "dec_embed_dim", "dec_depth"):
            _require(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in ("state_size", "local_mem_size", "dpt_feature_dim", "dpt_last_dim"):
            _require(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        _require(self.ray_enc_depth >= 0, "ray_enc_depth", ">= 0", self.ray_enc_depth)
        # 2D RoPE splits each head in a y half and an x half, each rotated in pairs: head_dim % 4 == 0.
        checked = [
            (self.enc_embed_dim, self.enc_num_heads, "enc_num_heads"),
            (self.dec_embed_dim, self.dec_num_heads, "dec_num_heads"),
            (self.dec_embed_dim, self.state_dec_num_heads, "state_dec_num_heads"),
        ]
        if self.ray_enc_depth > 0:
            checked.append((self.enc_embed_dim, self.ray_enc_num_heads, "ray_enc_num_heads"))
        for width, heads, name in checked:
            _require(
                heads > 0 and width % heads == 0 and (width // heads) % 4 == 0,
                name,
                f"a divisor of the width {width} leaving a head size that is a multiple of 4",
                heads,
            )
        # The pose memory works at width 2 d_s with dec_num_heads heads (no RoPE there).
        _require(self.mlp_ratio > 0, "mlp_ratio", "> 0", self.mlp_ratio)
        _require(self.rope_freq > 0, "rope_freq", "> 0", self.rope_freq)
        _require(self.layer_norm_eps > 0, "layer_norm_eps", "> 0", self.layer_norm_eps)
        _require(
            self.head_type == "dpt",
            "head_type",
            "'dpt' (the linear 224 head is not implemented)",
            self.head_type,
        )
        _require(
            self.patch_size == 16,
            "patch_size",
            "16 with the DPT head (4 stages resample by 16)",
            self.patch_size,
        )
        _require(self.img_size % self.patch_size == 0, "img_size", "a multiple of patch_size", self.img_size)
        _require(
            len(self.dpt_layer_dims) == 4 and all(d > 0 for d in self.dpt_layer_dims),
            "dpt_layer_dims",
            "4 positive widths",
            self.dpt_layer_dims,
        )
        _require(
            self.dpt_feature_dim % 2 == 0,
            "dpt_feature_dim",
            "even (the head halves it)",
            self.dpt_feature_dim,
        )
        for name in ("image_mean", "image_std"):
            _require(len(getattr(self, name)) == 3, name, "3 values (RGB)", getattr(self, name))
        _require(all(s > 0 for s in self.image_std), "image_std", "> 0", self.image_std)
        super().__post_init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        """d_s = dec_embed_dim, the width of the tokens handed to the fusion layer."""
        return self.dec_embed_dim

    @classmethod
    def tiny(cls, **overrides: Any) -> Cut3rConfig:
        """Two 32-d encoder blocks, two 32-d decoder blocks, 16 state tokens, small DPT: fast on CPU."""
        values = {
            "img_size": 64,
            "enc_embed_dim": 32,
            "enc_depth": 2,
            "enc_num_heads": 2,
            "ray_enc_depth": 1,
            "ray_enc_num_heads": 2,
            "dec_embed_dim": 32,
            "dec_depth": 2,
            "dec_num_heads": 2,
            "state_dec_num_heads": 2,
            "state_size": 16,
            "local_mem_size": 8,
            "dpt_layer_dims": (8, 16, 16, 32),
            "dpt_feature_dim": 16,
            "dpt_last_dim": 8,
        }
        return cls(**{**values, **overrides})
