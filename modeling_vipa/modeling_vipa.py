"""VIPA-VLA models (paper §3.2.2, §3.3): InternVL3.5 with a CUT3R branch fused into its vision tokens.

transformers' native InternVL modules are composed, not copied: the InternViT tower gives V_sem, CUT3R gives
V_spa for the same frame, the fusion layer mixes them BEFORE InternVL's pixel shuffle and projector, and the
fused image features replace the image placeholder tokens of the Qwen3 prompt.

- `VipaModel`: the backbone (InternViT, projector and Qwen3 under InternVL's own names, so InternVL3.5
  checkpoints load into it unchanged; CUT3R as `spatial_encoder`; `fusion`), returning hidden states.
- `VipaForConditionalGeneration`: `VipaModel` + `lm_head`; spatial VQA and motion tokens (`generate()` works).
- `VipaForActionPrediction`: adds learned action queries, a state encoder and the flow-matching DiT head;
  `forward(..., state, actions)` returns the flow-matching loss, `predict_action(...)` an action chunk.
- `set_trainable(model, stage)`, `add_motion_tokens(model, tokenizer_or_processor)`.

Usage (tiny random model, inputs built by hand the way `VipaProcessor` builds them):

    import torch
    from modeling_vipa.configuration_vipa import VipaConfig
    from modeling_vipa.modeling_vipa import VipaForConditionalGeneration
    model = VipaForConditionalGeneration(VipaConfig.tiny()).eval()
    img = model.config.image_token_id
    ids = torch.tensor([[1, 2] + [img] * 4 + [3]])              # one frame -> image_seq_length = 4 tokens
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56),
                spatial_pixel_values=torch.randn(1, 1, 3, 32, 32), spatial_frame_mask=torch.ones(1, 1, dtype=torch.bool))
    out.logits.shape                                            # (1, 7, vocab)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, InternVLModel, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector
from transformers.utils import ModelOutput

from .action_head import VipaActionHead, VipaDiTBlock
from .configuration_vipa import (
    MOTION_BIN_TOKEN,
    MOTION_END_TOKEN,
    MOTION_START_TOKEN,
    VipaConfig,
)
from .fusion import VipaFusion
from .spatial_encoder import Cut3rEncoder

# Auto classes written into config.json's auto_map on save, besides the class's own `_auto_class`.
_GENERATION_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText")

_MODEL_CARD = """---
library_name: transformers
pipeline_tag: {pipeline_tag}
tags:
- vipa-vla
- vision-language-action
- custom_code
---

# VIPA-VLA ({class_name})

VIPA-VLA (spatial-aware VLA pretraining through visual-physical alignment): InternVL3.5 with a CUT3R 3D
encoder fused into the vision tokens by cross-attention, motion tokens, and a flow-matching action head.

```python
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained("{path}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{path}", trust_remote_code=True)
```

Parameters: {num_parameters:,}. Inputs: `input_ids`, `attention_mask`, `pixel_values` (frames, 3, S, S),
`spatial_pixel_values` (B, T, 3, Hs, Ws), `spatial_frame_mask` (B, T){state_line}.
"""


@dataclass
class VipaActionOutput(ModelOutput):
    """Output of `VipaForActionPrediction.forward`.

    loss: scalar flow-matching loss (when `actions` is given).
    velocity: (B, H, action_dim) predicted flow v_theta at the sampled tau.
    h_cond: (B, Q, d_llm) last hidden states of the action queries.
    """

    loss: torch.Tensor | None = None
    velocity: torch.Tensor | None = None
    h_cond: torch.Tensor | None = None


class VipaPreTrainedModel(PreTrainedModel):
    """Weight initialisation and Hub plumbing shared by the VIPA models."""

    config_class = VipaConfig
    config: VipaConfig
    base_model_prefix = "vipa"  # no attribute of that name: the model is its own base model
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["InternVLVisionLayer", "Qwen3DecoderLayer", "VipaDiTBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, VipaFusion):
            init.constant_(module.alpha, module.config.alpha_init)
        elif isinstance(module, VipaDiTBlock):
            # adaLN-Zero: every DiT block starts as the identity
            init.zeros_(module.adaLN_modulation.weight)
            init.zeros_(module.adaLN_modulation.bias)
        elif isinstance(module, VipaActionHead):
            init.zeros_(module.adaLN_out.weight)
            init.zeros_(module.adaLN_out.bias)
            init.normal_(module.pos_embed, std=0.02)
        elif isinstance(module, VipaForActionPrediction):
            init.normal_(module.action_queries, std=0.02)

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained` plus every Auto class in `auto_map` and a model card (README.md)."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoConfig"] = "configuration_vipa.VipaConfig"
        for name in _GENERATION_AUTO_CLASSES:
            auto_map[name] = "modeling_vipa.VipaForConditionalGeneration"
        self.config.auto_map = auto_map
        super().save_pretrained(save_directory, *args, **kwargs)
        card = f"{save_directory}/README.md"
        try:
            with open(card, "x", encoding="utf-8") as f:
                is_action = isinstance(self, VipaForActionPrediction)
                f.write(
                    _MODEL_CARD.format(
                        pipeline_tag="robotics" if is_action else "image-text-to-text",
                        class_name=type(self).__name__,
                        path=save_directory,
                        num_parameters=sum(p.numel() for p in self.parameters()),
                        state_line=", `state` (B, state_dim)" if is_action else "",
                    )
                )
        except FileExistsError:
            pass  # a card written by the user (or push_to_hub) wins


class VipaModel(VipaPreTrainedModel):
    """The VIPA-VLA backbone: InternVL's vision tower, projector and Qwen3, CUT3R and the fusion layer.

    The InternVL parts are transformers' own modules, under InternVL's names (`vision_tower`,
    `multi_modal_projector`, `language_model`), so InternVL3.5 checkpoints load into them unchanged.
    `forward` returns the LLM's last hidden states (B, L, d_llm).
    """

    def __init__(self, config: VipaConfig) -> None:
        super().__init__(config)
        ivl = config.internvl_config
        self.vision_tower = AutoModel.from_config(ivl.vision_config)
        self.multi_modal_projector = InternVLMultiModalProjector(ivl)
        self.language_model = AutoModel.from_config(ivl.text_config)
        self.spatial_encoder = Cut3rEncoder(config.spatial_config)
        self.fusion = VipaFusion(
            config.fusion_layer_config, ivl.vision_config.hidden_size, config.spatial_config.hidden_size
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # -- inputs --
    def _check_visual_inputs(
        self,
        input_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        spatial_pixel_values: torch.Tensor | None,
        spatial_frame_mask: torch.Tensor | None,
        spatial_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Validate the visual inputs against the image placeholders; returns the (B, T) bool frame mask."""
        ivl = self.config.internvl_config
        seq = ivl.image_seq_length
        n_placeholders = None if input_ids is None else (input_ids == ivl.image_token_id).sum(-1)
        if spatial_tokens is not None:
            # precomputed V_spa (e.g. training.spatial_cache) stand in for the CUT3R inputs
            if spatial_pixel_values is not None:
                raise ValueError("pass spatial_pixel_values or spatial_tokens, not both")
            d_s = self.config.spatial_config.hidden_size
            if spatial_tokens.ndim != 4 or spatial_tokens.shape[-1] != d_s:
                raise ValueError(
                    f"spatial_tokens must be (batch, frames, 1 + N_s, {d_s}), got {tuple(spatial_tokens.shape)}"
                )
            if not torch.isfinite(spatial_tokens).all():
                raise ValueError("spatial_tokens contains NaN or inf")
        spatial = spatial_pixel_values if spatial_tokens is None else spatial_tokens
        if pixel_values is None and spatial is None:
            if n_placeholders is not None and int(n_placeholders.sum()) > 0:
                raise ValueError(
                    f"input_ids hold {int(n_placeholders.sum())} image placeholder tokens "
                    f"(id {ivl.image_token_id}) but no pixel_values / spatial_pixel_values came"
                )
            return None
        if pixel_values is None or spatial is None:
            missing = "pixel_values" if pixel_values is None else "spatial_pixel_values"
            raise ValueError(
                f"VIPA needs both pixel_values (InternVL) and spatial_pixel_values (CUT3R) or spatial_tokens; "
                f"{missing} is None"
            )
        if isinstance(pixel_values, (list, tuple)):
            shapes = sorted({tuple(p.shape) for p in pixel_values})
            if len(shapes) > 1:
                raise ValueError(
                    f"pixel_values: images of mixed sizes {shapes}; the processor resizes every frame to one tile"
                )
            pixel_values = torch.stack(list(pixel_values))
        size = tuple(ivl.vision_config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, *size):
            raise ValueError(
                f"pixel_values must be (frames, 3, {size[0]}, {size[1]}), got {tuple(pixel_values.shape)}"
            )
        if spatial_tokens is None:
            if spatial_pixel_values.ndim != 5 or spatial_pixel_values.shape[2] != 3:
                raise ValueError(
                    f"spatial_pixel_values must be (batch, frames, 3, Hs, Ws), got {tuple(spatial_pixel_values.shape)}"
                )
            hs, ws = spatial_pixel_values.shape[-2:]
            patch = self.config.spatial_config.patch_size
            if hs % patch or ws % patch or hs == 0 or ws == 0:
                raise ValueError(
                    f"spatial_pixel_values height and width must be positive multiples of {patch}, got {hs}x{ws}"
                )
        batch, frames = spatial.shape[:2]
        if frames > self.config.max_frames:
            raise ValueError(f"at most max_frames={self.config.max_frames} frames per sample, got {frames}")
        if spatial_frame_mask is None:
            spatial_frame_mask = torch.ones(batch, frames, dtype=torch.bool, device=spatial.device)
        if tuple(spatial_frame_mask.shape) != (batch, frames):
            raise ValueError(
                f"spatial_frame_mask must be {(batch, frames)}, got {tuple(spatial_frame_mask.shape)}"
            )
        mask = spatial_frame_mask.bool()
        # real frames first, padding after: CUT3R's recurrent state runs over a prefix of the clip
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise ValueError("spatial_frame_mask must be True on a prefix of each row (real frames first)")
        if not bool(mask[:, 0].all()):
            raise ValueError(
                f"every sample needs at least one frame, got frame counts {mask.sum(-1).tolist()}"
            )
        if int(mask.sum()) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values hold {pixel_values.shape[0]} frames but spatial_frame_mask marks {int(mask.sum())}"
            )
        if n_placeholders is not None:
            if n_placeholders.shape[0] != batch:
                raise ValueError(
                    f"input_ids have batch {n_placeholders.shape[0]}, spatial_pixel_values {batch}"
                )
            expected = mask.sum(-1).to(n_placeholders.device) * seq
            if not torch.equal(n_placeholders, expected):
                raise ValueError(
                    f"image placeholders per sample {n_placeholders.tolist()} do not match the images: expected "
                    f"{expected.tolist()} (frames {mask.sum(-1).tolist()} x image_seq_length {seq})"
                )
        for name, tensor in (("pixel_values", pixel_values), ("spatial_pixel_values", spatial_pixel_values)):
            if tensor is not None and not torch.isfinite(tensor).all():
                raise ValueError(f"{name} contains NaN or inf")
        return mask

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        spatial_pixel_values: torch.Tensor,
        spatial_frame_mask: torch.Tensor | None = None,
        use_spatial: bool | None = None,
        spatial_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fused image features in the LLM embedding space.

        Args:
            pixel_values: (F, 3, S, S) InternVL tiles of the real frames, sample-major, time order.
            spatial_pixel_values: (B, T, 3, Hs, Ws) CUT3R inputs; spatial_frame_mask: (B, T) bool.
            use_spatial: False skips CUT3R and the fusion (the plain InternVL path: V_f = V_sem exactly);
                None (default) follows `config.use_spatial_branch`, the single-encoder switch.
            spatial_tokens: (B, T, 1 + N_s, d_s) precomputed CUT3R tokens (`Cut3rOutput.tokens`, e.g. from
                `training.spatial_cache`); when given, CUT3R is not run and spatial_pixel_values may be None.

        Returns:
            (F, image_seq_length, d_llm).
        """
        ivl = self.config.internvl_config
        vision = self.vision_tower(pixel_values=pixel_values.to(self.dtype))
        V_sem = vision.last_hidden_state
        if ivl.vision_feature_select_strategy == "default":
            V_sem = V_sem[:, 1:]  # drop CLS: only patch tokens are pixel-shuffled
        if use_spatial is None:
            use_spatial = self.config.use_spatial_branch
        if use_spatial:
            mask = spatial_frame_mask.bool()
            if spatial_tokens is not None:
                tokens = spatial_tokens.to(self.spatial_encoder.dtype)
            else:
                tokens = self.spatial_encoder(
                    spatial_pixel_values.to(self.spatial_encoder.dtype), frame_mask=mask, return_heads=False
                ).tokens
            V_spa = tokens[mask]  # (F, 1 + N_s, d_s): pose token + patch tokens, same frame order as V_sem
            patch = self.config.spatial_config.patch_size
            spatial_grid = None  # precomputed tokens: the fusion infers the grid from their count
            if spatial_tokens is None:
                spatial_grid = (
                    spatial_pixel_values.shape[-2] // patch,
                    spatial_pixel_values.shape[-1] // patch,
                )
            V_sem = self.fusion(V_sem, V_spa, spatial_grid=spatial_grid)
        frames, n_v, d_v = V_sem.shape
        side = int(round(n_v**0.5))
        grid = V_sem.reshape(frames, side, side, d_v)
        # InternVL's own pixel shuffle (it uses no module state)
        shuffled = InternVLModel.pixel_shuffle(self, grid, scale_factor=ivl.downsample_ratio)
        return self.multi_modal_projector(shuffled.reshape(frames, -1, shuffled.shape[-1]))

    def embed_inputs(
        self,
        input_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None = None,
        spatial_pixel_values: torch.Tensor | None = None,
        spatial_frame_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_spatial: bool | None = None,
        spatial_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by fused image features, (B, L, d_llm)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None and (input_ids.ndim != 2 or input_ids.shape[1] == 0):
            raise ValueError(
                f"input_ids must be a non-empty (batch, length) tensor, got {tuple(input_ids.shape)}"
            )
        mask = self._check_visual_inputs(
            input_ids, pixel_values, spatial_pixel_values, spatial_frame_mask, spatial_tokens
        )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if mask is None:
            return inputs_embeds
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        features = self.get_image_features(
            pixel_values, spatial_pixel_values, mask, use_spatial=use_spatial, spatial_tokens=spatial_tokens
        )
        if input_ids is None:
            raise ValueError("images need input_ids: the image placeholders are found by token id")
        placeholder = (input_ids == self.config.image_token_id)[..., None].to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(placeholder, features.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        spatial_pixel_values: torch.Tensor | None = None,
        spatial_frame_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        spatial_tokens: torch.Tensor | None = None,
        use_spatial: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Qwen3 over the prompt with fused image features; inputs as `VipaForConditionalGeneration.forward`.

        Returns:
            `BaseModelOutputWithPast` with `last_hidden_state` (B, L, d_llm) and `cache`.
        """
        inputs_embeds = self.embed_inputs(
            input_ids,
            pixel_values,
            spatial_pixel_values,
            spatial_frame_mask,
            inputs_embeds=inputs_embeds,
            use_spatial=use_spatial,
            spatial_tokens=spatial_tokens,
        )
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )


class VipaForConditionalGeneration(VipaPreTrainedModel, GenerationMixin):
    """VIPA-VLA as a causal LM over text, image and motion tokens: `model` (`VipaModel`) + `lm_head`."""

    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: VipaConfig) -> None:
        super().__init__(config)
        text = config.internvl_config.text_config
        self.model = VipaModel(config)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    # -- embeddings (resize_token_embeddings and tying go through these) --
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @property
    def spatial_encoder(self) -> Cut3rEncoder:
        """The CUT3R encoder (`model.spatial_encoder`)."""
        return self.model.spatial_encoder

    @property
    def fusion(self) -> VipaFusion:
        """The fusion layer (`model.fusion`)."""
        return self.model.fusion

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`VipaModel.get_image_features`: fused image features (F, image_seq_length, d_llm)."""
        return self.model.get_image_features(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        spatial_pixel_values: torch.Tensor | None = None,
        spatial_frame_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        spatial_tokens: torch.Tensor | None = None,
        use_spatial: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Causal-LM forward.

        Args:
            input_ids: (B, L) token ids, `image_seq_length` placeholders per frame.
            attention_mask: (B, L) 1 on real tokens.
            pixel_values: (F, 3, S, S) InternVL tiles; spatial_pixel_values: (B, T, 3, Hs, Ws);
                spatial_frame_mask: (B, T) bool, F = spatial_frame_mask.sum().
            spatial_tokens: (B, T, 1 + N_s, d_s) precomputed CUT3R tokens in place of spatial_pixel_values
                (stage 1 with a frozen encoder: `training.spatial_cache.SpatialTokenCache`).
            use_spatial: False runs without the 3D branch (CUT3R and the fusion skipped, V_f = V_sem); None
                follows `config.use_spatial_branch`.
            labels: (B, L) next-token targets (-100 ignored), shifted inside the loss.

        Returns:
            `CausalLMOutputWithPast` with `loss` (when labels), `logits` (B, L', vocab), `cache`.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            spatial_pixel_values=spatial_pixel_values,
            spatial_frame_mask=spatial_frame_mask,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            spatial_tokens=spatial_tokens,
            use_spatial=use_spatial,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.get_text_config().vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(
        self, *args: Any, is_first_iteration: bool | None = False, **kwargs: Any
    ):
        """GenerationMixin's preparation; the CUT3R inputs, like pixel_values, only reach the prefill step."""
        model_inputs = super().prepare_inputs_for_generation(
            *args, is_first_iteration=is_first_iteration, **kwargs
        )
        if not is_first_iteration and kwargs.get("use_cache", True):
            model_inputs.pop("spatial_pixel_values", None)
            model_inputs.pop("spatial_frame_mask", None)
            model_inputs.pop("spatial_tokens", None)
        return model_inputs


class VipaForActionPrediction(VipaForConditionalGeneration):
    """VIPA-VLA with learned action queries and a flow-matching DiT head (paper §3.3).

    `h_cond = VLM(v, l, Q_a)`: the queries are appended (in embedding space) after the prompt, every prompt
    token stays visible to them through the causal mask, and their last hidden states condition the DiT.
    """

    def __init__(self, config: VipaConfig) -> None:
        super().__init__(config)
        head = config.action_head_config
        d_llm = config.internvl_config.text_config.hidden_size
        self.action_queries = nn.Parameter(torch.randn(head.num_action_queries, d_llm) * 0.02)  # Q_a
        self.action_head = VipaActionHead(head, cond_dim=d_llm)
        self.post_init()

    def encode_action_queries(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        spatial_pixel_values: torch.Tensor | None = None,
        spatial_frame_mask: torch.Tensor | None = None,
        use_spatial: bool | None = None,
        spatial_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the VLM once over prompt + action queries; returns h_cond, (B, Q, d_llm).

        Works with left or right padding: position ids count real tokens only, so the queries sit right after
        the last real token of each sample. spatial_tokens: (B, T, 1 + N_s, d_s) precomputed CUT3R tokens, in
        place of spatial_pixel_values (frozen CUT3R need not run again, e.g. from `SpatialTokenCache`).
        """
        embeds = self.model.embed_inputs(
            input_ids,
            pixel_values,
            spatial_pixel_values,
            spatial_frame_mask,
            use_spatial=use_spatial,
            spatial_tokens=spatial_tokens,
        )
        batch, length = embeds.shape[:2]
        num_q = self.action_queries.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask must be {(batch, length)}, got {tuple(attention_mask.shape)}")
        queries = self.action_queries.to(embeds.dtype)[None].expand(batch, -1, -1)
        embeds = torch.cat([embeds, queries], dim=1)
        mask = torch.cat([attention_mask.long(), attention_mask.new_ones(batch, num_q).long()], dim=1)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state[:, -num_q:]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        spatial_pixel_values: torch.Tensor | None = None,
        spatial_frame_mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        actions: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        tau: torch.Tensor | None = None,
        spatial_tokens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> VipaActionOutput:
        """Flow-matching training step.

        Args:
            input_ids, attention_mask, pixel_values, spatial_pixel_values, spatial_frame_mask: as the VLM.
            state: (B, state_dim) normalised robot state.
            actions: (B, H, action_dim) normalised ground-truth chunk; None returns h_cond only.
            noise: eps (B, H, action_dim), standard normal when None; tau: (B,), sampled when None.
            spatial_tokens: (B, T, 1 + N_s, d_s) precomputed CUT3R tokens instead of spatial_pixel_values.

        Returns:
            `VipaActionOutput(loss, velocity, h_cond)`, loss = mean |v_theta(ã, tau) - (a - eps)|^2.
        """
        if input_ids is None:
            raise ValueError("input_ids is required (the prompt that the action queries follow)")
        batch = input_ids.shape[0]
        if state is None:
            raise ValueError(
                f"state is required: (batch={batch}, state_dim={self.config.action_head_config.state_dim})"
            )
        self.action_head.check_state(state, batch)
        if actions is not None:
            self.action_head.check_actions(actions, batch)
        h_cond = self.encode_action_queries(
            input_ids,
            attention_mask,
            pixel_values,
            spatial_pixel_values,
            spatial_frame_mask,
            spatial_tokens=spatial_tokens,
        )
        if actions is None:
            return VipaActionOutput(h_cond=h_cond)
        actions = actions.float()
        noise = torch.randn_like(actions) if noise is None else noise.float()
        tau = self.action_head.sample_tau(batch, actions.device) if tau is None else tau.float()
        noisy = (1 - tau[:, None, None]) * noise + tau[:, None, None] * actions
        velocity = self.action_head(noisy, tau, state, h_cond).float()
        loss = torch.nn.functional.mse_loss(velocity, actions - noise)
        return VipaActionOutput(loss=loss, velocity=velocity, h_cond=h_cond)

    @torch.no_grad()
    def predict_action(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        spatial_pixel_values: torch.Tensor | None = None,
        spatial_frame_mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        *,
        unnorm_key: str | None = None,
        processor: Any = None,
        num_steps: int | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_normalized: bool = False,
        spatial_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict an action chunk: the VLM prefix runs ONCE, then N Euler steps of the DiT head.

        Args:
            input_ids ... spatial_frame_mask: the prompt and frames, as the processor returns them.
            state: (B, state_dim) normalised robot state.
            unnorm_key: dataset whose statistics un-normalise the chunk (`processor.unnormalize_actions`).
            processor: anything with `unnormalize_actions(actions, unnorm_key)` (the `VipaProcessor`).
            num_steps: N Euler steps; `action_head_config.num_inference_steps` when None.
            noise: (B, H, action_dim) starting point, standard normal (from `generator`) when None.
            return_normalized: return the chunk in the normalised space and skip the processor.
            spatial_tokens: (B, T, 1 + N_s, d_s) precomputed CUT3R tokens instead of spatial_pixel_values.

        Returns:
            (B, H, action_dim) float32 actions, un-normalised unless `return_normalized`.
        """
        if not return_normalized and processor is None:
            raise ValueError(
                "predict_action returns un-normalised actions and needs `processor` (with unnormalize_actions) and "
                "`unnorm_key`; pass return_normalized=True for actions in the normalised space"
            )
        if state is None:
            raise ValueError(
                f"state is required: (batch, state_dim={self.config.action_head_config.state_dim})"
            )
        self.action_head.check_state(state, input_ids.shape[0])
        h_cond = self.encode_action_queries(
            input_ids,
            attention_mask,
            pixel_values,
            spatial_pixel_values,
            spatial_frame_mask,
            spatial_tokens=spatial_tokens,
        )
        actions = self.action_head.sample(
            h_cond, state, num_steps=num_steps, noise=noise, generator=generator
        )
        if return_normalized:
            return actions
        return torch.as_tensor(processor.unnormalize_actions(actions.cpu(), unnorm_key), dtype=torch.float32)


_STAGE_PREFIXES = {
    # stage 1: only the fusion layer (paper §3.2.3: all pretrained parameters frozen)
    1: ("model.fusion.",),
    # stage 2: fusion + the LLM; the embedding matrix (and lm_head, tied) holds the new motion-token rows
    2: ("model.fusion.", "model.language_model.", "lm_head."),
    # stage 3: encoders and fusion frozen; the LLM and everything of the action head train
    3: ("model.language_model.", "lm_head.", "action_queries", "action_head."),
}


def set_trainable(model: VipaForConditionalGeneration, stage: int) -> list[str]:
    """Freeze everything but the parts trained in `stage` (1, 2 or 3); returns the trainable parameter names.

    Stage 3 needs a `VipaForActionPrediction`. The InternVL projector and both encoders never train.
    """
    if stage not in _STAGE_PREFIXES:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    if stage == 3 and not isinstance(model, VipaForActionPrediction):
        raise ValueError(
            f"stage 3 trains the action head and needs a VipaForActionPrediction, got {type(model).__name__}"
        )
    prefixes = _STAGE_PREFIXES[stage]
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        if param.requires_grad:
            trainable.append(name)
    return trainable


def add_motion_tokens(
    model: VipaForConditionalGeneration, processor: Any, num_bins: int | None = None
) -> list[int]:
    """Add the motion tokens to the tokenizer (if missing), resize the embeddings and record the ids in the config.

    Args:
        model: a VIPA model.
        processor: a `VipaProcessor` (its own `add_motion_tokens()` and `motion_token_ids` are used, so the
            bin count and token strings are the processor's), or any tokenizer with `add_tokens`,
            `convert_tokens_to_ids` and `__len__` (then `<motion_0>`..`<motion_{K-1}>`, `<motion>`, `</motion>`).
        num_bins: K for a bare tokenizer (DESIGN.md §3: 1024); must match the processor's when both are given.

    Returns:
        The K bin-token ids in bin order; also stored as `config.motion_token_ids`, with the delimiters in
        `config.motion_start_token_id` / `config.motion_end_token_id`. Idempotent.
    """
    if hasattr(processor, "add_motion_tokens") and hasattr(type(processor), "motion_token_ids"):
        if num_bins is not None and num_bins != processor.motion_num_bins:
            raise ValueError(
                f"num_bins={num_bins} but the processor has motion_num_bins={processor.motion_num_bins}"
            )
        processor.add_motion_tokens()
        tokenizer = processor.tokenizer
        ids = list(processor.motion_token_ids) + [
            processor.motion_start_token_id,
            processor.motion_end_token_id,
        ]
        num_bins = len(ids) - 2
    else:
        num_bins = 1024 if num_bins is None else num_bins
        if num_bins <= 0:
            raise ValueError(f"num_bins must be > 0, got {num_bins}")
        tokenizer = getattr(processor, "tokenizer", processor)
        tokens = [MOTION_BIN_TOKEN.format(i) for i in range(num_bins)] + [
            MOTION_START_TOKEN,
            MOTION_END_TOKEN,
        ]
        unk = getattr(tokenizer, "unk_token_id", None)

        def lookup() -> list[int | None]:
            found = tokenizer.convert_tokens_to_ids(tokens)
            return [None if (i is None or (unk is not None and i == unk)) else int(i) for i in found]

        ids = lookup()
        missing = [t for t, i in zip(tokens, ids, strict=True) if i is None]
        if missing:
            tokenizer.add_tokens(missing)
            ids = lookup()
        if any(i is None for i in ids):
            raise ValueError(
                "the tokenizer did not accept the motion tokens (convert_tokens_to_ids gives no id)"
            )
    needed = max(len(tokenizer), max(ids) + 1)
    if needed > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(needed)
    model.config.motion_token_ids = [int(i) for i in ids[:num_bins]]
    model.config.motion_start_token_id = int(ids[num_bins])
    model.config.motion_end_token_id = int(ids[num_bins + 1])
    return model.config.motion_token_ids


VipaConfig.register_for_auto_class()
VipaForConditionalGeneration.register_for_auto_class("AutoModel")
