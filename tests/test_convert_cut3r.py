"""Official CUT3R checkpoint -> this package: the CLI end to end, the key table, and the pickle allow-list."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modeling_vipa.spatial_encoder import Cut3rEncoder
from training.convert_cut3r import convert_state_dict, load_official_checkpoint, rename_key

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
HEAD_FIELDS = ("enc_num_heads", "ray_enc_num_heads", "dec_num_heads", "state_dec_num_heads")


def official_state_dict() -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    path = FIXTURES / "cut3r_small_reference.safetensors"
    with safe_open(str(path), "pt") as f:
        heads = {k: int(v) for k, v in f.metadata().items() if k in HEAD_FIELDS}
    return load_file(str(path)), heads


class _Touch:
    """Unpickling this would create `marker`: proof that a refused checkpoint ran no code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "training.convert_cut3r", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )


def test_cli_converts_a_ddp_checkpoint_that_reproduces_the_reference(tmp_path):
    state_dict, heads = official_state_dict()
    # As the official training script saves it: DDP prefix, training args, epoch; the DPT alias too.
    model_sd = {f"module.{k}": v for k, v in state_dict.items()}
    model_sd["module.downstream_head.dpt_self.scratch.layer1_rn.weight"] = state_dict[
        "downstream_head.dpt_self.scratch.layer_rn.0.weight"
    ]
    ckpt = {"model": model_sd, "epoch": 3, "args": argparse.Namespace(model="ARCroco3DStereo(...)")}
    torch.save(ckpt, tmp_path / "ckpt.pth")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in heads.items()]
    result = run_cli(str(tmp_path / "ckpt.pth"), str(tmp_path / "out"), *flags)
    assert result.returncode == 0, result.stderr

    model = Cut3rEncoder.from_pretrained(tmp_path / "out").eval()
    assert model.config.state_size == state_dict["register_tokens.weight"].shape[0]
    ref = np.load(FIXTURES / "cut3r_small_io.npz")
    pixels = (torch.from_numpy(ref["pixels_uint8"]).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        out = model(pixels)
    for name in ("tokens", "pts3d_self", "conf", "camera_pose"):
        np.testing.assert_allclose(getattr(out, name).numpy(), ref[name], atol=1e-5, rtol=0, err_msg=name)


def test_converted_keys_are_exactly_the_model_keys():
    state_dict, heads = official_state_dict()
    weights, config = convert_state_dict(state_dict, **heads)
    assert set(weights) == set(Cut3rEncoder(config).state_dict())
    assert torch.equal(weights["pose_memory.memory"], state_dict["pose_retriever.mem"])
    assert torch.equal(
        weights["heads.world_dpt.fusion.3.skip_unit.conv2.bias"],
        state_dict["downstream_head.dpt_cross.scratch.refinenet4.resConfUnit1.conv2.bias"],
    )


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("enc_blocks.3.norm2.weight", "image_encoder.layers.3.mlp_norm.weight"),
        ("dec_blocks.1.norm2.bias", "image_decoder.layers.1.cross_attn_norm.bias"),
        ("dec_blocks_state.0.norm_y.weight", "state_decoder.layers.0.context_norm.weight"),
        ("dec_blocks_state.11.cross_attn.projk.weight", "state_decoder.layers.11.cross_attn.k_proj.weight"),
        ("enc_blocks_ray_map.1.attn.proj.bias", "ray_map_encoder.layers.1.self_attn.out_proj.bias"),
        (
            "downstream_head.final_transform.1.norm2.mlp.1.weight",
            "heads.world_layers.1.mlp_norm.modulation.weight",
        ),
        ("downstream_head.dpt_self.act_postprocess.3.1.weight", "heads.self_view_dpt.reassemble.3.1.weight"),
        (
            "downstream_head.dpt_self.scratch.refinenet1.out_conv.bias",
            "heads.self_view_dpt.fusion.0.out_conv.bias",
        ),
        ("downstream_head.dpt_rgb.head.4.weight", None),
        ("downstream_head.dpt_cross.scratch.layer2_rn.weight", None),
        ("masked_img_token", None),
    ],
)
def test_key_table(old, new):
    assert rename_key(old) == new


def test_unknown_keys_and_missing_parts_are_errors():
    with pytest.raises(ValueError, match="unknown CUT3R key"):
        rename_key("dec_blocks.0.norm4.weight")
    with pytest.raises(ValueError, match="unknown CUT3R key"):
        rename_key("downstream_head.linear.proj.weight")
    state_dict, heads = official_state_dict()
    del state_dict["pose_retriever.mem"]
    with pytest.raises(ValueError, match="pose_retriever.mem"):
        convert_state_dict(state_dict, **heads)


def test_checkpoint_outside_the_allow_list_is_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"model": {"w": torch.zeros(1)}, "args": _Touch(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused"):
        load_official_checkpoint(tmp_path / "evil.pth")
    result = run_cli(str(tmp_path / "evil.pth"), str(tmp_path / "out"))
    assert result.returncode == 2 and "refused" in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_bare_state_dict_is_accepted(tmp_path):
    state_dict, _ = official_state_dict()
    torch.save(state_dict, tmp_path / "bare.pth")
    loaded = load_official_checkpoint(tmp_path / "bare.pth")
    assert set(loaded) == set(state_dict)
