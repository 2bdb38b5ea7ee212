"""Tiny offline assets shared by the tests: a byte-level BPE tokenizer with Qwen's chat tokens and InternVL's
image tokens, a tiny `VipaProcessor` sized for `VipaConfig.tiny()`, images and normalisation statistics.

Nothing here downloads anything; the tokenizer is trained from scratch on a fixed corpus (deterministic).

    from tests.tiny_assets import build_tiny_processor, build_tiny_tokenizer, make_image
    tokenizer = build_tiny_tokenizer()                   # ~400 tokens: 256 bytes + merges + specials
    processor = build_tiny_processor()                   # 56 px tiles, 4 <IMG_CONTEXT> per frame, 48x64 CUT3R
    batch = processor(images=[make_image(40, 50)], text="<image>\\nWhere is the cup?", return_tensors="pt")
"""

from __future__ import annotations

import numpy as np
import PIL.Image
from transformers import PreTrainedTokenizerFast

from cpu_demo.standins import SPECIAL_TOKENS, build_standin_tokenizer
from processing_vipa.processing_vipa import VipaProcessor

TINY_SPECIAL_TOKENS = SPECIAL_TOKENS  # Qwen3's chat tokens and InternVL's image tokens
TINY_TILE_SIZE = 56  # internvl_tiny_config(): image_size 56, patch 14 -> 16 patches
TINY_IMAGE_SEQ_LENGTH = 4  # 16 patches * downsample_ratio 0.5^2
TINY_SPATIAL_IMAGE_SIZE = (48, 64)  # (height, width), multiples of CUT3R's patch 16; not square on purpose

_CORPUS = [
    "What is the spatial relationship between the hand and the cup in the last frame?",
    "The hand is left and down and forward of the cup, 0.44 m.",
    "How does the hand move between the two frames? It moves right and up, 0.12 m.",
    "How does the camera move? turn left, 12.4 degrees. tilt up, 3.0 degrees. no significant movement",
    "Pick up the red block and place it in the bowl. Open the drawer. Close the microwave door.",
    "Predict the wrist trajectory of the right hand to grasp the mug on the table.",
    "The object is behind the hand and to the right, at a distance of 0.25 metres.",
    "user assistant system image frame answer question task robot action state",
    "0 1 2 3 4 5 6 7 8 9 0.1 0.2 0.3 0.5 1.0 10 20 45 90 180",
]


def build_tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer (every byte encodable) with `<|endoftext|>` as pad, `<|im_end|>` as
    eos, no BOS (as Qwen3), and InternVL's `<img>`, `</img>`, `<IMG_CONTEXT>`, `<video>` as named extra
    special tokens (`tokenizer.context_image_token` etc., as the InternVL3.5 tokenizer has them).

    The main job's stand-in tokenizer trained on the fixed test corpus: `len(tokenizer)` is about
    `vocab_size` + 7 (fewer merges exist in the small corpus); `save_pretrained` /
    `AutoTokenizer.from_pretrained(folder)` round-trip offline.
    """
    return build_standin_tokenizer(_CORPUS * 4, vocab_size)


def tiny_norm_stats(action_dim: int = 7, state_dim: int = 8, keys: tuple[str, ...] = ("tiny",)) -> dict:
    """Per-dataset statistics with distinct, non-trivial values per dimension (mean, std, min, max)."""
    stats = {}
    for k, key in enumerate(keys):
        entry = {}
        for part, dim in (("action", action_dim), ("state", state_dim)):
            i = np.arange(dim, dtype=np.float64)
            entry[part] = {
                "mean": (0.1 * i - 0.2 + k).tolist(),
                "std": (0.5 + 0.25 * i).tolist(),
                "min": (-1.0 - 0.5 * i + k).tolist(),
                "max": (1.0 + 0.3 * i + k).tolist(),
            }
        stats[key] = entry
    return stats


def build_tiny_processor(
    image_seq_length: int = TINY_IMAGE_SEQ_LENGTH,
    tile_size: int = TINY_TILE_SIZE,
    spatial_image_size: tuple[int, int] = TINY_SPATIAL_IMAGE_SIZE,
    norm_stats: dict | None = None,
    with_motion_tokens: bool = False,
    **kwargs,
) -> VipaProcessor:
    """A `VipaProcessor` matching `VipaConfig.tiny()` (56 px tiles, 4 image tokens per frame, CUT3R patch 16)
    with `tiny_norm_stats()` unless `norm_stats` is given; `with_motion_tokens` adds the 1026 motion tokens."""
    processor = VipaProcessor(
        image_processor=VipaProcessor.default_image_processor(tile_size),
        tokenizer=build_tiny_tokenizer(),
        image_seq_length=image_seq_length,
        spatial_image_size=spatial_image_size,
        norm_stats=tiny_norm_stats() if norm_stats is None else norm_stats,
        **kwargs,
    )
    if with_motion_tokens:
        processor.add_motion_tokens()
    return processor


def make_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> PIL.Image.Image:
    """A random PIL image of the given size and mode ("RGB", "RGBA", "L")."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return PIL.Image.fromarray(arr[..., 0] if channels == 1 else arr)  # uint8 layout gives the mode


def tiny_vipa_config(processor: VipaProcessor, **overrides):
    """`VipaConfig.tiny()` whose InternVL part matches `processor`: its image-token id and vocabulary size.

    overrides: other `VipaConfig` fields (e.g. `fusion_layer_config=VipaFusionConfig.tiny(dropout=0.1)`).
    """
    from modeling_vipa.configuration_vipa import VipaConfig, internvl_tiny_config

    internvl = internvl_tiny_config(image_token_id=processor.image_token_id)
    internvl.text_config.vocab_size = len(processor.tokenizer)
    return VipaConfig.tiny(internvl_config=internvl, **overrides)


def build_tiny_model(processor: VipaProcessor, *, seed: int = 0, model_class=None, **overrides):
    """A randomly initialised tiny VIPA model (eval mode) matching `processor`; motion token ids are recorded
    when the processor has motion tokens."""
    import torch

    from modeling_vipa.modeling_vipa import VipaForConditionalGeneration, add_motion_tokens

    torch.manual_seed(seed)
    model = (model_class or VipaForConditionalGeneration)(tiny_vipa_config(processor, **overrides)).eval()
    if processor.has_motion_tokens:
        add_motion_tokens(model, processor)
    return model


# Prepended to a child script: the repository's own packages cannot be imported, so a checkpoint must
# load from its own remote-code files alone.
BLOCK_PACKAGE_IMPORTS = """\
import importlib.abc, sys

BLOCKED = {"modeling_vipa", "processing_vipa", "hand3d_dataset", "training", "tests"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the checkpoint must be self-contained")
        return None

sys.meta_path.insert(0, Block())
"""


def run_offline_child(script: str, args: list[str], tmp_path, timeout: int = 300):
    """Runs `BLOCK_PACKAGE_IMPORTS + script` in a fresh offline Python process in `tmp_path` (not the repository
    root), with its own empty HF cache and remote-code module folder. Returns the CompletedProcess."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tmp_path = Path(tmp_path)
    (tmp_path / "child.py").write_text(BLOCK_PACKAGE_IMPORTS + script)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
        "PYTHONPATH": "",
    }
    return subprocess.run(
        [sys.executable, "child.py", *map(str, args)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def record_calls(monkeypatch, owner: type, name: str) -> list:
    """Wrap `owner.name` (e.g. `Cut3rEncoder.forward`) for the test: the returned list gets one entry per call;
    the method still runs, and pytest's `monkeypatch` puts the original back."""
    calls: list = []
    original = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls
