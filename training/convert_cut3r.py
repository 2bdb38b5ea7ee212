"""Convert an official CUT3R checkpoint (github.com/CUT3R/CUT3R, `ARCroco3DStereo`) to this package's
`Cut3rEncoder` layout: `DST/model.safetensors` + `DST/config.json`, loadable with
`Cut3rEncoder.from_pretrained(DST)`.

Usage:

    python -m training.convert_cut3r cut3r_512_dpt_4_64.pth checkpoints/cut3r_512_dpt
    # in Python:
    from training.convert_cut3r import convert_state_dict
    weights, config = convert_state_dict(official_state_dict)

Loading is `torch.load(weights_only=True)` with an explicit allow-list (`ALLOWED_GLOBALS`); a checkpoint
whose pickle needs anything else (the official release pickles its Hydra/OmegaConf training config under
`ckpt["args"]`) is refused with a message, never executed. Extract the state dict once, in an environment
you trust: `torch.save(torch.load(SRC, weights_only=False)["model"], "cut3r_weights.pth")`, and convert that.

Input: `ckpt["model"]` (or a bare state dict), keys optionally prefixed by `module.` (DDP).
Sizes are read from tensor shapes; attention head counts are not visible in shapes and come from the
options (defaults: the official 16 / 12 / 16 / 16).

Key mapping (reference -> this package; `{i}` a layer index; block suffixes in the second table):

    patch_embed.proj.*                        image_encoder.patch_embed.*
    enc_blocks.{i}.*                          image_encoder.layers.{i}.*              (encoder block)
    enc_norm.*                                image_encoder.norm.*
    patch_embed_ray_map.proj.*                ray_map_encoder.patch_embed.*
    enc_blocks_ray_map.{i}.*                  ray_map_encoder.layers.{i}.*            (encoder block)
    enc_norm_ray_map.*                        ray_map_encoder.norm.*
    register_tokens.weight                    state_tokens
    pose_token                                pose_token
    decoder_embed.* / dec_blocks.{i}.* / dec_norm.*
                                              image_decoder.embed.* / .layers.{i}.* (decoder block) / .norm.*
    decoder_embed_state.* / dec_blocks_state.{i}.* / dec_norm_state.*
                                              state_decoder.embed.* / .layers.{i}.* (decoder block) / .norm.*
    pose_retriever.proj_q.*                   pose_memory.query_proj.*
    pose_retriever.masked_token               pose_memory.masked_token
    pose_retriever.mem                        pose_memory.memory
    pose_retriever.write_blocks.{i}.*         pose_memory.write_layers.{i}.*          (decoder block)
    pose_retriever.read_blocks.{i}.*          pose_memory.read_layers.{i}.*           (decoder block)
    downstream_head.dpt_self.*                heads.self_view_dpt.*                   (DPT)
    downstream_head.dpt_cross.*               heads.world_dpt.*                       (DPT)
    downstream_head.final_transform.{i}.*     heads.world_layers.{i}.*                (modulated block)
    downstream_head.pose_head.mlp.*           heads.pose_head.mlp.*
    dropped: masked_img_token, masked_ray_map_token (only for frames given as ray maps without an image,
             which this encoder does not take), downstream_head.dpt_rgb.* (RGB head, unused),
             DPT scratch.layer{1-4}_rn.weight (the same tensors as scratch.layer_rn.{0-3}.weight)

    block suffixes           encoder block      decoder block        modulated block
    norm1.*                  self_attn_norm.*   self_attn_norm.*     -
    norm1.norm.* / .mlp.1.*  -                  -                    self_attn_norm.norm.* / .modulation.*
    attn.qkv.* / attn.proj.* self_attn.qkv.* / self_attn.out_proj.*  (all three)
    norm2.*                  mlp_norm.*         cross_attn_norm.*    -
    norm2.norm.* / .mlp.1.*  -                  -                    mlp_norm.norm.* / .modulation.*
    norm_y.*                 -                  context_norm.*       -
    cross_attn.projq/projk/projv/proj.*         cross_attn.q_proj/k_proj/v_proj/out_proj.*
    norm3.*                  -                  mlp_norm.*           -
    mlp.fc1.* / mlp.fc2.*    unchanged

    DPT:  act_postprocess.{i}.{j}.* -> reassemble.{i}.{j}.*;  scratch.layer_rn.{i}.* -> project.{i}.*;
          scratch.refinenet{n}.resConfUnit1/resConfUnit2/out_conv.* -> fusion.{n-1}.skip_unit/unit/out_conv.*;
          head.{0,2,4}.* unchanged.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path

import torch

from modeling_vipa.configuration_cut3r import Cut3rConfig

# The only non-tensor types a checkpoint may pickle: a plain argparse namespace of training arguments.
ALLOWED_GLOBALS = [argparse.Namespace]

_PREFIXES: list[tuple[str, str, str]] = [
    # (reference prefix regex, our prefix, block kind of what follows)
    (r"patch_embed\.proj\.", "image_encoder.patch_embed.", ""),
    (r"patch_embed_ray_map\.proj\.", "ray_map_encoder.patch_embed.", ""),
    (r"enc_blocks\.(\d+)\.", r"image_encoder.layers.\1.", "encoder"),
    (r"enc_norm\.", "image_encoder.norm.", ""),
    (r"enc_blocks_ray_map\.(\d+)\.", r"ray_map_encoder.layers.\1.", "encoder"),
    (r"enc_norm_ray_map\.", "ray_map_encoder.norm.", ""),
    (r"register_tokens\.weight$", "state_tokens", ""),
    (r"pose_token$", "pose_token", ""),
    (r"decoder_embed\.", "image_decoder.embed.", ""),
    (r"dec_blocks\.(\d+)\.", r"image_decoder.layers.\1.", "decoder"),
    (r"dec_norm\.", "image_decoder.norm.", ""),
    (r"decoder_embed_state\.", "state_decoder.embed.", ""),
    (r"dec_blocks_state\.(\d+)\.", r"state_decoder.layers.\1.", "decoder"),
    (r"dec_norm_state\.", "state_decoder.norm.", ""),
    (r"pose_retriever\.proj_q\.", "pose_memory.query_proj.", ""),
    (r"pose_retriever\.masked_token$", "pose_memory.masked_token", ""),
    (r"pose_retriever\.mem$", "pose_memory.memory", ""),
    (r"pose_retriever\.write_blocks\.(\d+)\.", r"pose_memory.write_layers.\1.", "decoder"),
    (r"pose_retriever\.read_blocks\.(\d+)\.", r"pose_memory.read_layers.\1.", "decoder"),
    (r"downstream_head\.dpt_self\.", "heads.self_view_dpt.", "dpt"),
    (r"downstream_head\.dpt_cross\.", "heads.world_dpt.", "dpt"),
    (r"downstream_head\.final_transform\.(\d+)\.", r"heads.world_layers.\1.", "modulated"),
    (r"downstream_head\.pose_head\.mlp\.", "heads.pose_head.mlp.", ""),
]
_DROPPED = re.compile(
    r"^(masked_img_token|masked_ray_map_token|downstream_head\.dpt_rgb\..*|.*\.scratch\.layer[1-4]_rn\.weight)$"
)
_ATTENTION = [
    (r"attn\.qkv\.", "self_attn.qkv."),
    (r"attn\.proj\.", "self_attn.out_proj."),
    (r"cross_attn\.projq\.", "cross_attn.q_proj."),
    (r"cross_attn\.projk\.", "cross_attn.k_proj."),
    (r"cross_attn\.projv\.", "cross_attn.v_proj."),
    (r"cross_attn\.proj\.", "cross_attn.out_proj."),
    (r"mlp\.(fc[12])\.", r"mlp.\1."),
]
_SUFFIXES: dict[str, list[tuple[str, str]]] = {
    "": [(r"", "")],
    "encoder": [(r"norm1\.", "self_attn_norm."), (r"norm2\.", "mlp_norm."), *_ATTENTION],
    "decoder": [
        (r"norm1\.", "self_attn_norm."),
        (r"norm2\.", "cross_attn_norm."),
        (r"norm_y\.", "context_norm."),
        (r"norm3\.", "mlp_norm."),
        *_ATTENTION,
    ],
    "modulated": [
        (r"norm1\.norm\.", "self_attn_norm.norm."),
        (r"norm1\.mlp\.1\.", "self_attn_norm.modulation."),
        (r"norm2\.norm\.", "mlp_norm.norm."),
        (r"norm2\.mlp\.1\.", "mlp_norm.modulation."),
        *_ATTENTION,
    ],
    "dpt": [
        (r"act_postprocess\.(\d)\.(\d)\.", r"reassemble.\1.\2."),
        (r"scratch\.layer_rn\.(\d)\.", r"project.\1."),
        (r"head\.([024])\.", r"head.\1."),
    ]
    + [
        (rf"scratch\.refinenet{n}\.{old}\.", f"fusion.{n - 1}.{new}.")
        for n in range(1, 5)
        for old, new in (("resConfUnit1", "skip_unit"), ("resConfUnit2", "unit"), ("out_conv", "out_conv"))
    ],
}


def rename_key(key: str) -> str | None:
    """Reference key (no `module.` prefix) -> this package's key, None for a dropped key.

    Raises ValueError for a key the table does not know, so a different architecture is never half-loaded.
    """
    if _DROPPED.match(key):
        return None
    for pattern, replacement, kind in _PREFIXES:
        match = re.match(pattern, key)
        if match is None:
            continue
        head, rest = match.expand(replacement), key[match.end() :]
        for suffix, new_suffix in _SUFFIXES[kind]:
            sub = re.fullmatch(f"{suffix}(?P<tail>.*)", rest)
            if sub is not None:
                return head + sub.expand(new_suffix) + sub.group("tail")
        break
    raise ValueError(f"state dict: unknown CUT3R key {key!r} (not in the conversion table)")


def infer_config(state_dict: dict[str, torch.Tensor], **heads: int) -> Cut3rConfig:
    """Sizes from tensor shapes (reference keys); head counts from `heads` (official defaults otherwise)."""

    def count(prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        return len({m.group(1) for k in state_dict if (m := pattern.match(k))})

    try:
        enc_dim, _, patch, _ = state_dict["patch_embed.proj.weight"].shape
        dpt = "downstream_head.dpt_self."
        values = {
            "patch_size": patch,
            "enc_embed_dim": enc_dim,
            "enc_depth": count("enc_blocks"),
            "ray_enc_depth": count("enc_blocks_ray_map"),
            "dec_embed_dim": state_dict["decoder_embed.weight"].shape[0],
            "dec_depth": count("dec_blocks"),
            "state_size": state_dict["register_tokens.weight"].shape[0],
            "local_mem_size": state_dict["pose_retriever.mem"].shape[1],
            "mlp_ratio": state_dict["enc_blocks.0.mlp.fc1.weight"].shape[0] / enc_dim,
            "dpt_layer_dims": tuple(
                state_dict[f"{dpt}act_postprocess.{i}.0.weight"].shape[0] for i in range(4)
            ),
            "dpt_feature_dim": state_dict[f"{dpt}scratch.layer_rn.0.weight"].shape[0],
            "dpt_last_dim": state_dict[f"{dpt}head.2.weight"].shape[0],
        }
    except KeyError as e:
        raise ValueError(
            f"state dict: missing {e} — not a CUT3R ARCroco3DStereo checkpoint with pose and DPT heads"
        ) from e
    if values["dec_depth"] != count("dec_blocks_state"):
        raise ValueError("state dict: image and state decoders have different depths")
    return Cut3rConfig(**values, **heads)


def convert_state_dict(
    state_dict: dict[str, torch.Tensor],
    enc_num_heads: int = 16,
    ray_enc_num_heads: int = 16,
    dec_num_heads: int = 12,
    state_dec_num_heads: int = 16,
) -> tuple[dict[str, torch.Tensor], Cut3rConfig]:
    """Official state dict (optionally `module.`-prefixed) -> (our state dict, config). Tensors are copied
    contiguous (the reference shares DPT tensors between two names; safetensors refuses shared storage)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    config = infer_config(
        state_dict,
        enc_num_heads=enc_num_heads,
        ray_enc_num_heads=ray_enc_num_heads,
        dec_num_heads=dec_num_heads,
        state_dec_num_heads=state_dec_num_heads,
    )
    converted = {}
    for key, value in state_dict.items():
        new = rename_key(key)
        if new is not None:
            converted[new] = value.detach().clone().contiguous()
    return converted, config


def load_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """`torch.load(weights_only=True)` with `ALLOWED_GLOBALS`; returns `ckpt["model"]` (or the bare dict)."""
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Torch's message is a page long; keep the line that names the blocked global.
        reason = next(
            (ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), str(e).splitlines()[0]
        )
        raise ValueError(
            f"{path}: refused — its pickle needs objects outside the allow-list {[g.__name__ for g in ALLOWED_GLOBALS]} "
            f"and is never executed here. Torch said: {reason.split('. Please use')[0]}\n"
            "Extract the weights once, in an environment you trust: "
            'torch.save(torch.load(SRC, weights_only=False)["model"], "cut3r_weights.pth"), then convert that file.'
        ) from e
    state_dict = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(
            f"{path}: expected a dict with a 'model' state dict (or a bare state dict) of tensors"
        )
    return state_dict


def convert_checkpoint(src: str | Path, dst: str | Path, **heads: int) -> Path:
    """SRC.pth -> DST/model.safetensors + DST/config.json (Cut3rEncoder.from_pretrained(DST) loads it)."""
    from safetensors.torch import save_file

    weights, config = convert_state_dict(load_official_checkpoint(src), **heads)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(dst)
    return dst


# Attention head counts of the official cut3r_512_dpt_4_64: not recoverable from tensor shapes, so CLIs take them.
OFFICIAL_HEAD_COUNTS = {
    "enc_num_heads": 16,
    "ray_enc_num_heads": 16,
    "dec_num_heads": 12,
    "state_dec_num_heads": 16,
}


def add_head_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `--enc-num-heads` … `--state-dec-num-heads` (defaults: the official checkpoint's)."""
    for name, default in OFFICIAL_HEAD_COUNTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)


def head_counts(args: argparse.Namespace) -> dict[str, int]:
    """The head counts parsed by `add_head_arguments`, as keyword arguments of the converter."""
    return {name: getattr(args, name) for name in OFFICIAL_HEAD_COUNTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="official checkpoint, e.g. cut3r_512_dpt_4_64.pth")
    parser.add_argument("dst", help="output folder (model.safetensors + config.json)")
    add_head_arguments(parser)
    args = parser.parse_args(argv)
    try:
        dst = convert_checkpoint(
            args.src,
            args.dst,
            **head_counts(args),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst / 'model.safetensors'} and {dst / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
