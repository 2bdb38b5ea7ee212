"""LoRA on every linear layer of a tiny VIPA-VLA: it trains, and merging reproduces the adapter's outputs."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from modeling_vipa.configuration_vipa import VipaConfig
from modeling_vipa.modeling_vipa import VipaForConditionalGeneration

IMG = VipaConfig.tiny().image_token_id


def test_lora_all_linear_trains_and_merges() -> None:
    torch.manual_seed(0)
    base = VipaForConditionalGeneration(VipaConfig.tiny())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # the adapters reach the fusion layer, the LLM and the vision tower
    for part in ("fusion.q_proj", "language_model.layers.0.self_attn.q_proj", "vision_tower"):
        assert any(part in n for n in names), part

    gen = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.tensor([[5, 6] + [IMG] * 4 + [7, 8, 9, 10, 11]]),
        "pixel_values": torch.randn(1, 3, 56, 56, generator=gen),
        "spatial_pixel_values": torch.randn(1, 1, 3, 32, 32, generator=gen),
        "spatial_frame_mask": torch.ones(1, 1, dtype=torch.bool),
    }
    labels = inputs["input_ids"].clone()
    labels[labels == IMG] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses

    model.eval()
    with torch.no_grad():
        adapter_logits = model(**inputs).logits
        merged = model.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        merged_logits = merged(**inputs).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-4)
    # and the adapter really changed the model (a no-op adapter would pass the comparison trivially)
    torch.manual_seed(0)
    fresh = VipaForConditionalGeneration(VipaConfig.tiny()).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(**inputs).logits, merged_logits, atol=1e-3)
