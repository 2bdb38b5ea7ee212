"""`training/build_checkpoint.py` end to end: a tiny InternVL saved by transformers' own class and a tiny
checkpoint in the official CUT3R format go in; the result is reloaded through the Auto classes in a fresh
offline process that cannot import this repository, and its weights are compared with the sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration

import training.build_checkpoint as build_module
from modeling_vipa.configuration_vipa import internvl_tiny_config
from tests.tiny_assets import build_tiny_tokenizer, make_image, run_offline_child
from training.build_checkpoint import build_checkpoint, build_model
from training.convert_cut3r import convert_state_dict

REPO = Path(__file__).resolve().parents[1]
CUT3R_FIXTURE = REPO / "tests" / "fixtures" / "cut3r_small_reference.safetensors"
HEAD_FIELDS = ("enc_num_heads", "ray_enc_num_heads", "dec_num_heads", "state_dec_num_heads")

CHILD = textwrap.dedent(
    """
    import numpy as np
    import PIL.Image
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoProcessor

    ckpt, out_file = sys.argv[1:3]
    model = AutoModel.from_pretrained(ckpt, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(ckpt, trust_remote_code=True)
    rng = np.random.default_rng(0)
    frames = [PIL.Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(2)]
    batch = processor(images=frames, text=["<image>\\n<image>\\nWhere is the cup?"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    motion = processor.motion_token_ids if processor.has_motion_tokens else []
    out = {f"weight.{k}": v.clone() for k, v in model.state_dict().items()}
    out.update({
        "logits": logits,
        "input_ids": batch["input_ids"],
        "motion_ids_processor": torch.tensor(motion, dtype=torch.long),
        "motion_ids_config": torch.tensor(model.config.motion_token_ids or [], dtype=torch.long),
        "vocab": torch.tensor([len(processor.tokenizer)]),
    })
    save_file(out, out_file)
    """
)


def official_cut3r(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, int]]:
    """The small parity fixture (reference key names) saved as the official training script does."""
    with safe_open(str(CUT3R_FIXTURE), "pt") as f:
        heads = {k: int(v) for k, v in f.metadata().items() if k in HEAD_FIELDS}
    state_dict = load_file(str(CUT3R_FIXTURE))
    path = tmp_path / "cut3r.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": 1}, path)
    return path, state_dict, heads


def tiny_internvl(tmp_path: Path) -> Path:
    """transformers' native InternVL at the tiny size, saved with save_pretrained, tokenizer beside it."""
    tokenizer = build_tiny_tokenizer()
    config = internvl_tiny_config(image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    config.text_config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config)
    folder = tmp_path / "internvl"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sources")
    cut3r, state_dict, heads = official_cut3r(tmp)
    return {"internvl": tiny_internvl(tmp), "cut3r": cut3r, "cut3r_sd": state_dict, "heads": heads}


def run_child(ckpt: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    result = run_offline_child(CHILD, [ckpt, "out.safetensors"], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return load_file(tmp_path / "out.safetensors")


def _build_cli(sources: dict, out: Path, *extra: str) -> None:
    """`python -m training.build_checkpoint` on the fixture's InternVL and CUT3R, in a fresh process."""
    heads = [f"--{k.replace('_', '-')}={v}" for k, v in sources["heads"].items()]
    cmd = [sys.executable, "-m", "training.build_checkpoint", "--internvl", str(sources["internvl"])]
    cmd += ["--cut3r", str(sources["cut3r"]), "--out", str(out), "--spatial-size", "48", "64", *heads, *extra]
    result = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_cli_checkpoint_reloads_with_the_source_weights(sources: dict, tmp_path: Path):
    out = tmp_path / "vipa"
    _build_cli(sources, out, "--motion-tokens")
    child = run_child(out, tmp_path)
    weights = {k[len("weight.") :]: v for k, v in child.items() if k.startswith("weight.")}

    # InternVL: every tensor equal to the source file's (transformers' legacy key layout, read by hand)
    source = load_file(sources["internvl"] / "model.safetensors")
    assert len(source) > 50
    for key, value in source.items():
        ours = "model." + key.replace("language_model.model.", "language_model.")
        if ours == "model.language_model.embed_tokens.weight":
            # the original rows stay; the new rows are the motion tokens
            assert torch.equal(weights[ours][: value.shape[0]], value)
            continue
        assert torch.equal(weights[ours], value), key
    # CUT3R: equal to the converter's output of the official-format state dict
    converted, _ = convert_state_dict(sources["cut3r_sd"], **sources["heads"])
    for key, value in converted.items():
        assert torch.equal(weights[f"model.spatial_encoder.{key}"], value), key
    # fusion: fresh, alpha = 0.5 (paper §4.1)
    assert weights["model.fusion.alpha"].item() == 0.5
    fusion = [k for k in weights if k.startswith("model.fusion.")]
    assert len(fusion) == 9
    assert set(weights) == set(fusion) | {f"model.spatial_encoder.{k}" for k in converted} | {
        "model." + k.replace("language_model.model.", "language_model.") for k in source
    } | {"lm_head.weight"}

    vocab = int(child["vocab"])
    assert weights["model.language_model.embed_tokens.weight"].shape[0] == vocab
    assert child["motion_ids_processor"].numel() == 1024
    assert torch.equal(child["motion_ids_config"], child["motion_ids_processor"])
    assert vocab == len(build_tiny_tokenizer()) + 1026
    # the model runs on the processor's batch: 2 frames x 4 image tokens, finite logits over the vocabulary
    image_token = json.loads((out / "config.json").read_text())["internvl_config"]["image_token_id"]
    assert int((child["input_ids"] == image_token).sum()) == 2 * 4
    assert child["logits"].shape == (*child["input_ids"].shape, vocab)
    assert torch.isfinite(child["logits"]).all()
    assert json.loads((out / "config.json").read_text())["use_spatial_branch"] is True


def test_cli_single_encoder_checkpoint_has_the_branch_off(sources: dict, tmp_path: Path):
    """`--single-encoder`: the same weights, saved with use_spatial_branch=False (Table 7's '- dual encoder')."""
    out = tmp_path / "single"
    _build_cli(sources, out, "--single-encoder")
    assert json.loads((out / "config.json").read_text())["use_spatial_branch"] is False


def test_missing_and_unexpected_keys_are_listed(sources: dict, tmp_path: Path):
    broken = tmp_path / "internvl_broken"
    broken.mkdir()
    for f in sources["internvl"].iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    state_dict = load_file(sources["internvl"] / "model.safetensors")
    del state_dict["language_model.model.norm.weight"]
    state_dict["multi_modal_projector.extra.weight"] = torch.zeros(2)
    save_file(state_dict, broken / "model.safetensors")
    with pytest.raises(ValueError) as err:
        build_model(broken, sources["cut3r"], **sources["heads"])
    message = str(err.value)
    assert (
        "model.language_model.norm.weight" in message
        and "model.multi_modal_projector.extra.weight" in message
    )

    state_dict["unknown_tower.weight"] = torch.zeros(1)
    save_file(state_dict, broken / "model.safetensors")
    with pytest.raises(ValueError, match="unknown_tower.weight"):
        build_model(broken, sources["cut3r"], **sources["heads"])


def test_not_an_internvl_folder_is_refused(sources: dict, tmp_path: Path):
    folder = tmp_path / "llava"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="model_type 'llava'"):
        build_model(folder, sources["cut3r"], **sources["heads"])


def test_without_motion_tokens_the_vocabulary_is_the_source_one(sources: dict, tmp_path: Path):
    model, processor = build_checkpoint(
        sources["internvl"],
        sources["cut3r"],
        tmp_path / "vipa",
        spatial_image_size=(48, 64),
        **sources["heads"],
    )
    assert not processor.has_motion_tokens and model.config.motion_token_ids is None
    source = load_file(sources["internvl"] / "model.safetensors")["language_model.model.embed_tokens.weight"]
    assert torch.equal(model.get_input_embeddings().weight, source)
    saved = json.loads((tmp_path / "vipa" / "config.json").read_text())
    assert saved["motion_token_ids"] is None and saved["fusion_layer_config"]["alpha_init"] == 0.5
    # the fused image features reach the logits: two different frames, two different answers
    texts = ["<image>\nWhere is the cup?"]
    a = processor(images=[make_image(40, 50, seed=1)], text=texts, return_tensors="pt")
    b = processor(images=[make_image(40, 50, seed=2)], text=texts, return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(model(**a).logits, model(**b).logits)


def test_source_tensors_are_assigned_not_copied(sources: dict, monkeypatch):
    """The InternVL tensors read from safetensors become the model's parameters (one allocation each)."""
    read: dict[str, torch.Tensor] = {}
    original = build_module.load_internvl_state_dict
    monkeypatch.setattr(
        build_module, "load_internvl_state_dict", lambda d: read.update(original(d)) or dict(read)
    )
    weights = build_model(sources["internvl"], sources["cut3r"], **sources["heads"]).state_dict()
    assert len(read) > 50
    assert all(weights[k].data_ptr() == v.data_ptr() for k, v in read.items())
