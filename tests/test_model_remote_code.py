"""A saved tiny VIPA-VLA loads through the Auto classes with trust_remote_code in a fresh process that cannot
import this repository's packages, and reproduces the logits and action chunks bit for bit."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modeling_vipa.configuration_vipa import VipaConfig
from modeling_vipa.modeling_vipa import VipaForActionPrediction, VipaForConditionalGeneration
from tests.tiny_assets import run_offline_child

IMG = VipaConfig.tiny().image_token_id

CHILD = textwrap.dedent(
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    lm_dir, action_dir, inputs_file, out_file = sys.argv[1:5]
    inputs = load_file(inputs_file)
    vlm = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "spatial_pixel_values")}
    vlm["spatial_frame_mask"] = inputs["spatial_frame_mask"].bool()
    out = {}
    assert type(AutoConfig.from_pretrained(lm_dir, trust_remote_code=True)).__name__ == "VipaConfig"
    for name, auto in (("auto", AutoModel), ("causal", AutoModelForCausalLM), ("i2t", AutoModelForImageTextToText)):
        model = auto.from_pretrained(lm_dir, trust_remote_code=True)
        assert type(model).__name__ == "VipaForConditionalGeneration", type(model)
        assert not model.training
        with torch.no_grad():
            out[name] = model(**vlm).logits
    action = AutoModel.from_pretrained(action_dir, trust_remote_code=True)
    assert type(action).__name__ == "VipaForActionPrediction", type(action)
    out["actions"] = action.predict_action(
        **vlm, state=inputs["state"], noise=inputs["noise"], return_normalized=True
    )
    assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
    save_file({k: v.contiguous() for k, v in out.items()}, out_file)
    """
)


def test_auto_classes_reload_bit_for_bit_in_a_fresh_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lm = VipaForConditionalGeneration(VipaConfig.tiny()).eval()
    action = VipaForActionPrediction(VipaConfig.tiny()).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.tensor([[5, 6] + [IMG] * 8 + [7, 8], [5] + [IMG] * 4 + [9, 0, 0, 0, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1] * 12, [1] * 6 + [0] * 6]),
        "pixel_values": torch.randn(3, 3, 56, 56, generator=gen),
        "spatial_pixel_values": torch.randn(2, 2, 3, 32, 32, generator=gen),
        "spatial_frame_mask": torch.tensor([[True, True], [True, False]]),
    }
    state, noise = torch.randn(2, 8, generator=gen), torch.randn(2, 4, 7, generator=gen)
    with torch.no_grad():
        logits = lm(**inputs).logits
    actions = action.predict_action(**inputs, state=state, noise=noise, return_normalized=True)

    lm_dir, action_dir = tmp_path / "vipa", tmp_path / "vipa_action"
    lm.save_pretrained(lm_dir)
    action.save_pretrained(action_dir)
    config = json.loads((lm_dir / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vipa.VipaConfig",
        "AutoModel": "modeling_vipa.VipaForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_vipa.VipaForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_vipa.VipaForConditionalGeneration",
    }
    action_map = json.loads((action_dir / "config.json").read_text())["auto_map"]
    assert action_map["AutoModel"] == "modeling_vipa.VipaForActionPrediction"
    for name in (
        "configuration_vipa",
        "modeling_vipa",
        "fusion",
        "action_head",
        "spatial_encoder",
        "configuration_cut3r",
    ):
        assert (lm_dir / f"{name}.py").is_file(), name
    assert (lm_dir / "model.safetensors").is_file()
    card = (action_dir / "README.md").read_text()
    assert "VipaForActionPrediction" in card and "pipeline_tag: robotics" in card

    tensors = {**{k: v.to(torch.uint8) if v.dtype == torch.bool else v for k, v in inputs.items()}}
    save_file({**tensors, "state": state, "noise": noise}, tmp_path / "inputs.safetensors")
    result = run_offline_child(
        CHILD, [lm_dir, action_dir, "inputs.safetensors", "out.safetensors"], tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = load_file(tmp_path / "out.safetensors")
    for name in ("auto", "causal", "i2t"):
        assert torch.equal(out[name], logits), name
    assert torch.equal(out["actions"], actions)
