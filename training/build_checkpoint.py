"""Compose the initial VIPA-VLA checkpoint from a transformers-format InternVL3.5 checkpoint and the official
CUT3R checkpoint: InternVL weights unchanged, CUT3R converted (`training/convert_cut3r.py`), the fusion layer
freshly initialised (alpha = 0.5), and a `VipaProcessor` around the InternVL tokenizer and image settings.
The result loads with `AutoModel` / `AutoProcessor.from_pretrained(out, trust_remote_code=True)`.

Usage:

    python -m training.build_checkpoint --internvl InternVL3_5-2B-HF/ --cut3r cut3r_512_dpt_4_64.pth \\
        --out checkpoints/vipa-init --motion-tokens
    # in Python:
    from training.build_checkpoint import build_checkpoint
    model, processor = build_checkpoint("InternVL3_5-2B-HF", "cut3r_512_dpt_4_64.pth", "out", motion_tokens=True)

`--internvl` is a local folder in the layout of `OpenGVLab/InternVL3_5-2B-HF` (config.json with
`model_type: internvl`, safetensors, tokenizer files, optionally preprocessor_config.json). Nothing is
downloaded. Memory: the model is never built with random weights first; `from_pretrained(None,
state_dict=...)` builds it on the meta device and assigns the source tensors (InternVL read from its
safetensors, CUT3R from the converter), so each weight is allocated once (plus one cast when `--dtype`
differs from a source's). Every model key must come from a source except the fusion layer's, and every
source key must be used: anything else is a ValueError listing the keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, GotOcr2ImageProcessorPil, InternVLConfig
from transformers.utils import logging as hf_logging

from modeling_vipa.configuration_vipa import VipaConfig, VipaFusionConfig
from modeling_vipa.modeling_vipa import VipaForConditionalGeneration, add_motion_tokens
from processing_vipa.processing_vipa import INTERNVL_IMAGE_MEAN, INTERNVL_IMAGE_STD, VipaProcessor
from training.convert_cut3r import (
    add_head_arguments,
    convert_state_dict,
    head_counts,
    load_official_checkpoint,
)

# InternVL checkpoint key prefix -> VIPA key prefix. transformers saves InternVL in its legacy layout
# (`language_model.model.*`, `vision_tower.*`); the in-memory layout (`model.language_model.*`) is accepted too.
_INTERNVL_PREFIXES = [
    ("model.vision_tower.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("model.multi_modal_projector.", "model.multi_modal_projector."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("model.language_model.", "model.language_model."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
]
_FUSION_PREFIX = "model.fusion."  # the only part of the model that no source provides
_SPATIAL_PREFIX = "model.spatial_encoder."
_TIED = ("lm_head.weight", "model.language_model.embed_tokens.weight")


def _internvl_key(key: str) -> str:
    for old, new in _INTERNVL_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    raise ValueError(
        f"InternVL checkpoint: unexpected key {key!r} (expected vision_tower.*, multi_modal_projector.*, "
        "language_model.*, lm_head.*)"
    )


def load_internvl_config(internvl_dir: str | Path) -> InternVLConfig:
    """The `InternVLConfig` of a transformers-format InternVL folder; ValueError for anything else."""
    path = Path(internvl_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"internvl: no config.json in {str(path)!r} (expected an InternVL3.5 -HF folder)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "internvl":
        raise ValueError(
            f"internvl: {path}/config.json has model_type {model_type!r}, expected 'internvl' (the -HF "
            "transformers-native checkpoints, e.g. OpenGVLab/InternVL3_5-2B-HF, not the remote-code ones)"
        )
    return AutoConfig.from_pretrained(path)


def load_internvl_state_dict(internvl_dir: str | Path) -> dict[str, torch.Tensor]:
    """InternVL weights of every `*.safetensors` file in the folder, renamed to VIPA keys."""
    files = sorted(Path(internvl_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"internvl: no *.safetensors file in {str(internvl_dir)!r}")
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                new = _internvl_key(key)
                if new in state_dict:
                    raise ValueError(f"internvl: {key!r} in {file.name} duplicates an earlier tensor ({new})")
                state_dict[new] = f.get_tensor(key)
    return state_dict


def _image_processor_settings(internvl_dir: Path, tile_size: int) -> GotOcr2ImageProcessorPil:
    """The InternVL image normalisation read from the folder (InternVL3.5's defaults when absent), one
    `tile_size` tile per frame: VIPA feeds each frame as a single tile, never InternVL's dynamic crops."""
    settings: dict[str, Any] = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (internvl_dir / name).is_file():
            data = json.loads((internvl_dir / name).read_text())
            settings = data.get("image_processor", data)
            break
    return GotOcr2ImageProcessorPil(
        size={"height": tile_size, "width": tile_size},
        image_mean=list(settings.get("image_mean", INTERNVL_IMAGE_MEAN)),
        image_std=list(settings.get("image_std", INTERNVL_IMAGE_STD)),
        crop_to_patches=False,
        do_convert_rgb=True,
    )


def build_processor(
    internvl_dir: str | Path,
    config: VipaConfig,
    spatial_image_size: tuple[int, int] = (384, 512),
) -> VipaProcessor:
    """`VipaProcessor` from the InternVL folder's tokenizer and image settings, sized for `config`.

    spatial_image_size: CUT3R input (height, width), multiples of its patch size (CUT3R's 512 side, 4:3).
    """
    internvl_dir = Path(internvl_dir)
    ivl = config.internvl_config
    tile = ivl.vision_config.image_size[0]
    spatial = config.spatial_config
    processor = VipaProcessor(
        image_processor=_image_processor_settings(internvl_dir, tile),
        tokenizer=AutoTokenizer.from_pretrained(internvl_dir),
        image_seq_length=ivl.image_seq_length,
        max_frames=config.max_frames,
        spatial_image_size=spatial_image_size,
        spatial_patch_size=spatial.patch_size,
        spatial_image_mean=spatial.image_mean,
        spatial_image_std=spatial.image_std,
    )
    if processor.image_token_id != ivl.image_token_id:
        raise ValueError(
            f"internvl: the tokenizer's {processor.context_image_token} is id {processor.image_token_id} but "
            f"config.json has image_token_id {ivl.image_token_id}; tokenizer and weights do not belong together"
        )
    return processor


def _check_keys(expected: set[str], provided: set[str]) -> None:
    """ValueError listing the model keys no source provides (fusion excepted) and the unused source keys."""
    missing = sorted(k for k in expected - provided if not k.startswith(_FUSION_PREFIX))
    unexpected = sorted(provided - expected)
    if missing or unexpected:
        raise ValueError(
            "checkpoint sources do not match the VIPA model:\n"
            f"  missing (in the model, in no source): {missing}\n"
            f"  unexpected (in a source, not in the model): {unexpected}"
        )


def build_model(
    internvl_dir: str | Path,
    cut3r_path: str | Path,
    fusion_config: VipaFusionConfig | None = None,
    dtype: torch.dtype = torch.float32,
    **cut3r_heads: int,
) -> VipaForConditionalGeneration:
    """`VipaForConditionalGeneration` with InternVL and CUT3R weights and a freshly initialised fusion layer.

    Args:
        internvl_dir: transformers-format InternVL folder (config.json, *.safetensors).
        cut3r_path: official CUT3R `.pth` (`ckpt["model"]` or a bare state dict; allow-listed unpickling).
        fusion_config: the fusion layer's config; `VipaFusionConfig()` (16 heads, 1024-d, alpha 0.5) when None.
        dtype: dtype of every weight; float32 (the default) upcasts bf16 InternVL weights exactly.
        cut3r_heads: attention head counts of the CUT3R checkpoint (`convert_state_dict`'s options).
    """
    ivl_config = load_internvl_config(internvl_dir)
    cut3r_weights, cut3r_config = convert_state_dict(load_official_checkpoint(cut3r_path), **cut3r_heads)
    config = VipaConfig(
        internvl_config=ivl_config,
        spatial_config=cut3r_config,
        fusion_layer_config=fusion_config or VipaFusionConfig(),
        tie_word_embeddings=ivl_config.tie_word_embeddings,
    )
    state_dict = load_internvl_state_dict(internvl_dir)
    state_dict.update({_SPATIAL_PREFIX + k: v for k, v in cut3r_weights.items()})
    if config.tie_word_embeddings and _TIED[0] in state_dict:
        # a tied checkpoint may still store lm_head; it must be the embedding matrix it is tied to
        if not torch.equal(state_dict[_TIED[0]], state_dict[_TIED[1]]):
            raise ValueError(
                "internvl: tie_word_embeddings is set but lm_head.weight differs from embed_tokens"
            )
        del state_dict[_TIED[0]]

    with torch.device("meta"):
        expected = set(VipaForConditionalGeneration(config).state_dict())
    if config.tie_word_embeddings:
        expected.discard(_TIED[0])
    _check_keys(expected, set(state_dict))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the fusion keys as MISSING: expected, checked below
    try:
        model, info = VipaForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info["missing_keys"] if not k.startswith(_FUSION_PREFIX)]
    problems = {"missing": missing, **{k: info[k] for k in ("unexpected_keys", "mismatched_keys") if info[k]}}
    if missing or len(problems) > 1:
        raise ValueError(f"loading the composed state dict into VIPA failed: {problems}")
    if (Path(internvl_dir) / "generation_config.json").is_file():
        # InternVL's end-of-turn / pad ids for generate(); VIPA answers in the same chat format
        model.generation_config = GenerationConfig.from_pretrained(internvl_dir)
    return model.eval()


def build_checkpoint(
    internvl_dir: str | Path,
    cut3r_path: str | Path,
    out_dir: str | Path,
    motion_tokens: bool = False,
    spatial_image_size: tuple[int, int] = (384, 512),
    fusion_config: VipaFusionConfig | None = None,
    dtype: torch.dtype = torch.float32,
    single_encoder: bool = False,
    **cut3r_heads: int,
) -> tuple[VipaForConditionalGeneration, VipaProcessor]:
    """Build model + processor (see `build_model`, `build_processor`) and save both to `out_dir`.

    motion_tokens: add `<motion_0>`..`<motion_1023>`, `<motion>`, `</motion>` to the tokenizer and the
        embeddings (stage 2 needs them; stage 1 does not).
    single_encoder: save with `use_spatial_branch=False`: InternVL alone (CUT3R and the fusion are kept in
        the file but never run), the "- dual encoder" start of the paper's ablation (Table 7) and its
        InternVL3.5 baseline (Table 5).
    """
    model = build_model(internvl_dir, cut3r_path, fusion_config=fusion_config, dtype=dtype, **cut3r_heads)
    model.config.use_spatial_branch = not single_encoder
    processor = build_processor(internvl_dir, model.config, spatial_image_size)
    if motion_tokens:
        add_motion_tokens(model, processor)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return model, processor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--internvl", required=True, help="InternVL3.5 -HF folder (config.json + safetensors)"
    )
    parser.add_argument(
        "--cut3r", required=True, help="official CUT3R checkpoint, e.g. cut3r_512_dpt_4_64.pth"
    )
    parser.add_argument("--out", required=True, help="output folder of the VIPA-VLA checkpoint")
    parser.add_argument("--motion-tokens", action="store_true", help="add the 1024 + 2 motion tokens")
    parser.add_argument(
        "--spatial-size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"), help="CUT3R input size"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument(
        "--single-encoder",
        action="store_true",
        help="InternVL alone (use_spatial_branch=False): the ablation's '- dual encoder' start point",
    )
    # head counts are invisible in tensor shapes; the defaults are the official checkpoint's
    add_head_arguments(parser)
    args = parser.parse_args(argv)
    try:
        model, processor = build_checkpoint(
            args.internvl,
            args.cut3r,
            args.out,
            motion_tokens=args.motion_tokens,
            spatial_image_size=tuple(args.spatial_size),
            dtype=getattr(torch, args.dtype),
            single_encoder=args.single_encoder,
            **head_counts(args),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.out}: {type(model).__name__}, {params:,} parameters, vocabulary {len(processor.tokenizer)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
