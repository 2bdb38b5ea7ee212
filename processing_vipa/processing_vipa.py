"""VipaProcessor: images, text, motion tokens and robot state/action statistics for VIPA-VLA (paper §3.2-3.3).

One call turns a batch of (1-4 frames, prompt) samples into everything `VipaForConditionalGeneration` /
`VipaForActionPrediction` take:

- `input_ids`, `attention_mask`: the prompt with each `<image>` placeholder expanded to
  `<img>` + `<IMG_CONTEXT>` x `image_seq_length` + `</img>` (InternVL's layout, 256 tokens per 448 px tile);
- `pixel_values: (F, 3, S, S)` float32, InternVL-normalised, one S x S tile per frame (F = all frames of the
  batch, sample 0's frames first, in text order), through the InternVL image processor's PIL backend;
- `spatial_pixel_values: (B, T_max, 3, Hs, Ws)` float32, the same frames prepared for the CUT3R encoder
  (aspect-preserving resize and centre crop to `spatial_image_size`, `(rgb / 255 - mean) / std`), zero-padded;
- `spatial_frame_mask: (B, T_max)` bool, True on real frames;
- `state: (B, S)` / `actions: (B, H, A)` float32, normalised with the statistics of `unnorm_key`, when given.

Usage, from the repository root with the tests' tiny offline tokenizer (a saved checkpoint loads with
`AutoProcessor.from_pretrained(path, trust_remote_code=True)`, a new one wraps InternVL3.5's tokenizer with
`VipaProcessor.from_internvl("OpenGVLab/InternVL3_5-2B-HF")`):

    from PIL import Image
    from tests.tiny_assets import build_tiny_processor
    processor = build_tiny_processor()
    batch = processor(images=[Image.new("RGB", (64, 48))], text=["<image>\\nWhere is the cup?"], return_tensors="pt")
    batch["pixel_values"].shape, batch["spatial_frame_mask"].tolist()   # (1, 3, 56, 56), [[True]]

Remote code: imports only the standard library, numpy, PIL, torch, transformers and `motion_tokenizer.py` of
this folder, so that `save_pretrained` can copy both files next to the checkpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import AutoTokenizer, BatchFeature, GotOcr2ImageProcessorPil
from transformers.image_utils import load_image
from transformers.processing_utils import ProcessorMixin

from .motion_tokenizer import MotionEncoding, MotionTokenizer, MotionTokenizerConfig

__all__ = ["VipaProcessor", "CHAT_TEMPLATE", "IMAGE_PLACEHOLDER", "INTERNVL_IMAGE_MEAN", "INTERNVL_IMAGE_STD"]

IMAGE_PLACEHOLDER = "<image>"  # one per frame in the prompt text; what the chat template writes for an image
INTERNVL_IMAGE_MEAN = (0.485, 0.456, 0.406)  # InternVL3.5's preprocessor_config.json (ImageNet statistics)
INTERNVL_IMAGE_STD = (0.229, 0.224, 0.225)
_NORM_EPS = 1e-6  # keeps constant dimensions (std = 0, max = min) finite; the round trip stays exact
_NORM_MODES = ("mean_std", "min_max")
# Keyword arguments handed through to the tokenizer (those TRL and `apply_chat_template` send).
_TOKENIZER_KWARGS = (
    "padding",
    "padding_side",
    "truncation",
    "max_length",
    "pad_to_multiple_of",
    "add_special_tokens",
    "return_offsets_mapping",
    "return_attention_mask",
    "return_token_type_ids",
    "return_length",
    "verbose",
)

# ChatML (Qwen3's format) with images as `<image>\n` before the text of their message, InternVL's habit. The
# assistant turn, its closing <|im_end|> included (the model must learn to stop), sits inside
# {% generation %} so that `return_assistant_tokens_mask=True` marks exactly the tokens that carry loss.
# No default system prompt, no <think> block: VIPA answers directly.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('role must be system, user or assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}"
    "{%- else -%}{{- raise_exception('content type must be image or text, got ' + item['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = ns.text -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}{{- content + '<|im_end|>' -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _as_float_array(name: str, value: Any) -> np.ndarray:
    """numpy float64 copy of a list / array / tensor, rejecting NaN and inf."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected an array of numbers ({e})") from e
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: {int(arr.size - np.isfinite(arr).sum())} non-finite value(s) (NaN or inf)")
    return arr


def _like_input(result: np.ndarray, original: Any) -> np.ndarray | torch.Tensor:
    """float32 result in the container the caller used (a tensor keeps its device)."""
    if isinstance(original, torch.Tensor):
        return torch.as_tensor(result, dtype=torch.float32, device=original.device)
    return result.astype(np.float32)


class VipaProcessor(ProcessorMixin):
    """InternVL image processor (PIL backend) + Qwen3 tokenizer + CUT3R frame preparation + motion tokens +
    robot state/action normalisation statistics keyed by dataset.

    The constructor arguments are saved in `processor_config.json`; the tokenizer and the chat template are
    saved beside it (`tokenizer.json`, `chat_template.jinja`).
    """

    def __init__(
        self,
        image_processor: GotOcr2ImageProcessorPil | None = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        image_seq_length: int = 256,  # <IMG_CONTEXT> tokens per frame: (tile / patch)^2 * downsample_ratio^2
        max_frames: int = 4,  # frames per sample (paper §4.1: 1-4 consecutive frames)
        start_image_token: str = "<img>",  # opens a frame's tokens (InternVL)
        end_image_token: str = "</img>",  # closes a frame's tokens (InternVL)
        context_image_token: str = "<IMG_CONTEXT>",  # the token whose embeddings the vision features replace
        spatial_image_size: Sequence[int] = (384, 512),  # CUT3R (height, width): 4:3 at its 512 long side
        spatial_patch_size: int = 16,  # Cut3rConfig.patch_size; spatial_image_size must be a multiple of it
        spatial_image_mean: Sequence[float] = (0.5, 0.5, 0.5),  # Cut3rConfig.image_mean
        spatial_image_std: Sequence[float] = (0.5, 0.5, 0.5),  # Cut3rConfig.image_std
        motion_num_bins: int = 1024,  # K bins per axis (MotionTokenizerConfig.num_bins)
        motion_low: Sequence[float] = (-0.5, -0.5, 0.0),  # lower corner of the motion box x, y, z, metres
        motion_high: Sequence[float] = (0.5, 0.5, 1.0),  # upper corner of the motion box x, y, z, metres
        norm_stats: dict[str, dict] | None = None,  # {dataset: {"action"|"state": {"mean"|"std"|...: [D]}}}
        norm_mode: str = "mean_std",  # "mean_std": (x - mean) / std; "min_max": to [-1, 1] between min and max
    ) -> None:
        if tokenizer is None:
            raise ValueError(
                "tokenizer: VipaProcessor needs a tokenizer (e.g. the InternVL3.5 Qwen3 tokenizer)"
            )
        if image_processor is None:
            image_processor = self.default_image_processor()
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        # One template for both, so that tokenizer.apply_chat_template never writes a different placeholder.
        self.tokenizer.chat_template = self.chat_template

        if not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(f"image_seq_length: expected an int >= 1, got {image_seq_length!r}")
        if not isinstance(max_frames, int) or max_frames < 1:
            raise ValueError(f"max_frames: expected an int >= 1, got {max_frames!r}")
        self.image_seq_length = image_seq_length
        self.max_frames = max_frames
        self.image_token = IMAGE_PLACEHOLDER
        self.start_image_token = start_image_token
        self.end_image_token = end_image_token
        self.context_image_token = context_image_token
        ids = {}
        for name, token in (
            ("start_image_token", start_image_token),
            ("end_image_token", end_image_token),
            ("context_image_token", context_image_token),
        ):
            pieces = self.tokenizer.encode(token, add_special_tokens=False)
            if len(pieces) != 1:
                raise ValueError(
                    f"{name}: {token!r} must be one token of the tokenizer, got {len(pieces)} pieces {pieces}"
                )
            ids[name] = pieces[0]
        self.start_image_token_id = ids["start_image_token"]
        self.end_image_token_id = ids["end_image_token"]
        self.image_token_id = ids["context_image_token"]  # = InternVLConfig.image_token_id of the model

        size = tuple(int(s) for s in spatial_image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"spatial_image_size: expected (height, width) > 0, got {spatial_image_size!r}")
        if not isinstance(spatial_patch_size, int) or spatial_patch_size < 1:
            raise ValueError(f"spatial_patch_size: expected an int >= 1, got {spatial_patch_size!r}")
        if size[0] % spatial_patch_size or size[1] % spatial_patch_size:
            raise ValueError(
                f"spatial_image_size: {size} must be a multiple of spatial_patch_size={spatial_patch_size}"
            )
        mean = tuple(float(m) for m in spatial_image_mean)
        std = tuple(float(s) for s in spatial_image_std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"spatial_image_mean/std: expected 3 values, std > 0; got {mean}, {std}")
        self.spatial_image_size = size
        self.spatial_patch_size = spatial_patch_size
        self.spatial_image_mean = mean
        self.spatial_image_std = std

        self.motion_num_bins = int(motion_num_bins)
        self.motion_low = tuple(float(v) for v in motion_low)
        self.motion_high = tuple(float(v) for v in motion_high)
        self.motion_tokenizer = MotionTokenizer(
            MotionTokenizerConfig(num_bins=self.motion_num_bins, low=self.motion_low, high=self.motion_high)
        )

        if norm_mode not in _NORM_MODES:
            raise ValueError(f"norm_mode: expected one of {_NORM_MODES}, got {norm_mode!r}")
        self.norm_mode = norm_mode
        self.norm_stats = self._check_norm_stats(norm_stats or {}, norm_mode)

    # ---- construction -----------------------------------------------------------------------------------
    @staticmethod
    def default_image_processor(tile_size: int = 448) -> GotOcr2ImageProcessorPil:
        """InternVL3.5's image processor on the PIL backend: one bicubic `tile_size` square tile per frame."""
        return GotOcr2ImageProcessorPil(
            size={"height": tile_size, "width": tile_size},
            image_mean=list(INTERNVL_IMAGE_MEAN),
            image_std=list(INTERNVL_IMAGE_STD),
            crop_to_patches=False,
            do_convert_rgb=True,
        )

    @classmethod
    def from_internvl(cls, tokenizer_path: str | os.PathLike, **kwargs: Any) -> VipaProcessor:
        """A processor around an InternVL3.5 tokenizer (a Hub id such as `OpenGVLab/InternVL3_5-2B-HF` or a
        folder); the image preprocessing is InternVL3.5's (448 px tiles, ImageNet statistics)."""
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        return cls(cls.default_image_processor(), tokenizer, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The image processor is rebuilt on the PIL backend from processor_config.json, never through
        # AutoImageProcessor: that one picks torchvision where installed, whose resize gives other pixel values.
        config = dict((processor_dict or {}).get("image_processor") or {})
        for key in ("image_processor_type", "processor_class", "auto_map"):
            config.pop(key, None)
        image_processor = GotOcr2ImageProcessorPil(**config) if config else cls.default_image_processor()
        kwargs.pop("subfolder", None)
        # The tokenizer is a stock class: it never needs remote code. Without this, AutoTokenizer reads the
        # model's `auto_map` in a checkpoint's config.json and asks interactively whether to run it.
        kwargs.setdefault("trust_remote_code", False)
        tokenizer = cls._load_tokenizer_from_pretrained("tokenizer", pretrained_model_name_or_path, **kwargs)
        return [image_processor, tokenizer]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "spatial_pixel_values", "spatial_frame_mask"]

    # ---- __call__ ---------------------------------------------------------------------------------------
    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        state: Any = None,
        actions: Any = None,
        unnorm_key: str | None = None,
        return_tensors: str | None = None,
        return_text_replacement_offsets: bool = False,
        **kwargs: Any,
    ) -> BatchFeature:
        """Prepare a batch.

        text: one prompt or a list of B prompts, each with one `<image>` placeholder per frame (1 to
        `max_frames` per sample when images are given).
        images: one image, a flat list matched to the placeholders in order, or a list of B lists (one per
        sample). An image is a PIL image, a path (or URL), or a numpy array (H, W), (H, W, 1|3|4) of uint8 or
        floats in [0, 1]; RGBA is composited on white, grayscale replicated to RGB. Frames of any sizes may be
        mixed: each one is resized on its own (InternVL: squashed to the square tile as InternVL does for a
        single tile; CUT3R: aspect kept, resized to cover `spatial_image_size`, centre-cropped).
        state: (B, S) or (S,) raw robot state; actions: (B, H, A) or (H, A) raw action chunk; both are
        normalised with the statistics of `unnorm_key` (see `resolve_unnorm_key`).
        Tokenizer keyword arguments (padding, padding_side, truncation, max_length, add_special_tokens,
        return_offsets_mapping, ...) are passed through; padding defaults to True (longest).
        """
        if videos is not None or audio is not None:
            raise ValueError("videos/audio: VipaProcessor takes frames as `images`; got videos or audio")
        unknown = sorted(set(kwargs) - set(_TOKENIZER_KWARGS))
        if unknown:
            raise TypeError(f"VipaProcessor.__call__ got unexpected keyword arguments {unknown}")
        if text is None:
            raise ValueError("text: a prompt is required (one `<image>` placeholder per frame), got None")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"text: expected a non-empty str or list of str, got {text!r:.200}")
        for i, t in enumerate(texts):
            if not t.strip():
                raise ValueError(f"text[{i}]: empty prompt")
            for token in (self.start_image_token, self.end_image_token, self.context_image_token):
                if token in t:
                    raise ValueError(
                        f"text[{i}]: contains {token!r}; write one {IMAGE_PLACEHOLDER!r} per frame instead, the "
                        "processor expands it"
                    )
        counts = [t.count(IMAGE_PLACEHOLDER) for t in texts]
        frames = self._group_images(images, counts)

        data: dict[str, Any] = {}
        offsets: list[list[dict[str, Any]]] = [[] for _ in texts]
        if frames is not None:
            expanded = (
                self.start_image_token
                + self.context_image_token * self.image_seq_length
                + self.end_image_token
            )
            texts, offsets = self._expand_placeholders(texts, expanded)
            flat = [f for sample in frames for f in sample]
            tiles = self.image_processor(flat, crop_to_patches=False, return_tensors="np")
            data["pixel_values"] = np.asarray(tiles["pixel_values"], dtype=np.float32)
            data["spatial_pixel_values"], data["spatial_frame_mask"] = self._spatial_batch(frames)

        tok_kwargs = {"padding": True, **kwargs}
        encoded = self.tokenizer(texts, **tok_kwargs)
        self._check_image_tokens(encoded["input_ids"], counts if frames is not None else [0] * len(texts))
        data = {**encoded, **data}
        if return_text_replacement_offsets:
            data["text_replacement_offsets"] = offsets
        if state is not None:
            data["state"] = self._batched("state", state, 2, len(texts))
            data["state"] = self.normalize_state(data["state"], unnorm_key)
        if actions is not None:
            data["actions"] = self._batched("actions", actions, 3, len(texts))
            data["actions"] = self.normalize_actions(data["actions"], unnorm_key)
        return BatchFeature(
            data, tensor_type=return_tensors, skip_tensor_conversion=["text_replacement_offsets"]
        )

    def _group_images(self, images: Any, counts: list[int]) -> list[list[PIL.Image.Image]] | None:
        """Per-sample lists of RGB frames, checked against the placeholder counts."""
        total = sum(counts)
        if (
            isinstance(images, (list, tuple))
            and total == 0
            and all(isinstance(x, (list, tuple)) and not x for x in images)
        ):
            images = None  # [] or [[], []]: a text-only batch, as TRL's collators send it
        if images is None:
            if total:
                raise ValueError(
                    f"images: the text has {total} {IMAGE_PLACEHOLDER} placeholder(s) (per sample {counts}) "
                    "but no images were given"
                )
            return None
        nested = isinstance(images, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in images)
        if nested:
            if len(images) != len(counts):
                raise ValueError(
                    f"images: expected one list of frames per text sample ({len(counts)}), got {len(images)} lists"
                )
            groups = []
            for i, (sample, n) in enumerate(zip(images, counts)):
                sample = list(sample) if isinstance(sample, (list, tuple)) else [sample]
                if len(sample) != n:
                    raise ValueError(
                        f"images[{i}]: text[{i}] has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(sample)} "
                        "image(s) were given for it"
                    )
                groups.append(sample)
        else:
            flat = list(images) if isinstance(images, (list, tuple)) else [images]
            if len(flat) != total:
                raise ValueError(
                    f"images: the text has {total} {IMAGE_PLACEHOLDER} placeholder(s) (per sample {counts}) but "
                    f"{len(flat)} image(s) were given"
                )
            starts = np.cumsum([0, *counts])
            groups = [flat[starts[i] : starts[i + 1]] for i in range(len(counts))]
        for i, n in enumerate(counts):
            if not 1 <= n <= self.max_frames:
                raise ValueError(
                    f"text[{i}]: expected 1 to {self.max_frames} frames ({IMAGE_PLACEHOLDER} placeholders) per "
                    f"sample, got {n}"
                )
        return [
            [self.load_rgb(img, f"images[{i}][{j}]") for j, img in enumerate(g)] for i, g in enumerate(groups)
        ]

    def _expand_placeholders(self, texts: list[str], expanded: str) -> tuple[list[str], list[list[dict]]]:
        """Replace every placeholder; also return the offsets `apply_chat_template` needs to shift the
        assistant spans (same record layout as `ProcessorMixin.get_text_with_replacements`)."""
        out, all_offsets = [], []
        for t in texts:
            pieces, offsets, last, gained = [], [], 0, 0
            for m in re.finditer(re.escape(IMAGE_PLACEHOLDER), t):
                start, end = m.span()
                pieces += [t[last:start], expanded]
                new_start = start + gained
                offsets.append(
                    {
                        "type": "image",
                        "span": (start, end),
                        "new_span": (new_start, new_start + len(expanded)),
                        "text": IMAGE_PLACEHOLDER,
                        "replacement": expanded,
                    }
                )
                gained += len(expanded) - (end - start)
                last = end
            pieces.append(t[last:])
            out.append("".join(pieces))
            all_offsets.append(offsets)
        return out, all_offsets

    def _check_image_tokens(self, input_ids: Any, counts: list[int]) -> None:
        """Truncation must not cut a frame's tokens: the model would misalign features and tokens."""
        for i, (ids, n) in enumerate(zip(input_ids, counts)):
            got = int(np.count_nonzero(np.asarray(ids) == self.image_token_id))
            if got != n * self.image_seq_length:
                raise ValueError(
                    f"text[{i}]: expected {n} x {self.image_seq_length} {self.context_image_token} tokens after "
                    f"tokenization, got {got}; max_length/truncation cut into the image tokens"
                )

    # ---- images -----------------------------------------------------------------------------------------
    @staticmethod
    def load_rgb(image: Any, name: str = "image") -> PIL.Image.Image:
        """An RGB PIL image from a PIL image, a path / URL, or an (H, W), (H, W, 1|3|4) numpy array
        (uint8, or floats in [0, 1]). Transparent pixels are composited on white (as transformers'
        `convert_to_rgb` does): their colour is undefined, white is the conventional background."""
        if isinstance(image, (str, Path)):
            source = str(image)
            if source.startswith(("http://", "https://", "data:")):
                image = load_image(source)
            else:
                if not Path(source).is_file():
                    raise ValueError(f"{name}: no image file at {source!r}")
                with PIL.Image.open(source) as opened:
                    opened.load()
                    image = opened.copy()
        elif isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if isinstance(image, np.ndarray):
            image = VipaProcessor._array_to_pil(image, name)
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(
                f"{name}: expected a PIL image, a path or a numpy array, got {type(image).__name__}"
            )
        if image.width < 1 or image.height < 1:
            raise ValueError(f"{name}: empty image of size {image.size}")
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise ValueError(f"{name}: expected a colour or 8-bit grayscale image, got PIL mode {image.mode}")
        if "A" in image.getbands() or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")

    @staticmethod
    def _array_to_pil(arr: np.ndarray, name: str) -> PIL.Image.Image:
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
            raise ValueError(f"{name}: expected an array of shape (H, W) or (H, W, 1|3|4), got {arr.shape}")
        if arr.dtype == np.uint8:
            pass
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise ValueError(f"{name}: float image with NaN or inf")
            if arr.min() < 0.0 or arr.max() > 1.0:
                raise ValueError(
                    f"{name}: float images must lie in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]; "
                    "pass uint8 for 0-255 data"
                )
            arr = np.round(arr * 255.0).astype(np.uint8)
        else:
            raise ValueError(f"{name}: expected uint8 or float pixels, got dtype {arr.dtype}")
        return PIL.Image.fromarray(np.ascontiguousarray(arr))  # uint8 (H, W) / 3 / 4 channels: L / RGB / RGBA

    def spatial_frame(self, image: PIL.Image.Image) -> np.ndarray:
        """One RGB frame -> (3, Hs, Ws) float32 CUT3R input.

        Resized with the aspect ratio kept until it covers (Hs, Ws) (LANCZOS when shrinking, BICUBIC when
        enlarging, as CUT3R's own loader does), centre-cropped, then `(rgb / 255 - mean) / std`.
        """
        if image.mode != "RGB":
            image = self.load_rgb(image)
        height, width = self.spatial_image_size
        scale = max(height / image.height, width / image.width)
        new_w = max(width, round(image.width * scale))
        new_h = max(height, round(image.height * scale))
        if (new_w, new_h) != image.size:
            resample = PIL.Image.LANCZOS if scale < 1 else PIL.Image.BICUBIC
            image = image.resize((new_w, new_h), resample=resample)
        left, top = (new_w - width) // 2, (new_h - height) // 2
        image = image.crop((left, top, left + width, top + height))
        rgb = np.asarray(image, dtype=np.float32) / 255.0
        mean = np.asarray(self.spatial_image_mean, dtype=np.float32)
        std = np.asarray(self.spatial_image_std, dtype=np.float32)
        return ((rgb - mean) / std).transpose(2, 0, 1)

    def _spatial_batch(self, frames: list[list[PIL.Image.Image]]) -> tuple[np.ndarray, np.ndarray]:
        t_max = max(len(f) for f in frames)
        height, width = self.spatial_image_size
        pixels = np.zeros((len(frames), t_max, 3, height, width), dtype=np.float32)
        mask = np.zeros((len(frames), t_max), dtype=bool)
        for b, sample in enumerate(frames):
            for t, frame in enumerate(sample):
                pixels[b, t] = self.spatial_frame(frame)
                mask[b, t] = True
        return pixels, mask

    # ---- training labels --------------------------------------------------------------------------------
    @staticmethod
    def build_labels(batch: dict[str, Any]) -> torch.Tensor:
        """(B, L) int64 labels: `input_ids` on assistant tokens, -100 elsewhere (prompt, images, padding).

        `batch` is the output of `apply_chat_template(..., tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True, return_tensors="pt")`.
        """
        if "assistant_masks" not in batch:
            raise ValueError(
                "batch: no 'assistant_masks'; call apply_chat_template with return_assistant_tokens_mask"
            )
        input_ids = torch.as_tensor(batch["input_ids"])
        keep = torch.as_tensor(batch["assistant_masks"]).bool()
        if "attention_mask" in batch:
            keep &= torch.as_tensor(batch["attention_mask"]).bool()
        return torch.where(keep, input_ids, torch.full_like(input_ids, -100))

    # ---- motion tokens ----------------------------------------------------------------------------------
    def add_motion_tokens(self) -> int:
        """Add `<motion_0>` … `<motion_{K-1}>`, `<motion>`, `</motion>` to the tokenizer (idempotent); returns
        how many were new. They are added as ordinary (not special) tokens so that `decode(...,
        skip_special_tokens=True)` keeps them in the answer text; they are still never split."""
        strings = self.motion_tokenizer.token_strings()
        vocab = self.tokenizer.get_vocab()
        present = [s in vocab for s in strings]
        if all(present):
            return 0
        if any(present):
            raise ValueError(
                f"tokenizer: {sum(present)} of the {len(strings)} motion tokens already exist; refusing to add the "
                "rest (the bin tokens must get contiguous ids)"
            )
        added = self.tokenizer.add_tokens(strings, special_tokens=False)
        self.motion_tokenizer.vocab_offset(self.tokenizer)  # checks contiguity
        return added

    @property
    def has_motion_tokens(self) -> bool:
        return self.motion_tokenizer.token_strings()[0] in self.tokenizer.get_vocab()

    @property
    def motion_token_ids(self) -> list[int]:
        """Vocabulary ids of `<motion_0>` … `<motion_{K-1}>`, in bin order (for VipaConfig.motion_token_ids)."""
        first = self._motion_offset()
        return list(range(first, first + self.motion_num_bins))

    @property
    def motion_start_token_id(self) -> int:
        self._motion_offset()
        return self.tokenizer.convert_tokens_to_ids(self.motion_tokenizer.config.begin_token)

    @property
    def motion_end_token_id(self) -> int:
        self._motion_offset()
        return self.tokenizer.convert_tokens_to_ids(self.motion_tokenizer.config.end_token)

    def _motion_offset(self) -> int:
        if not self.has_motion_tokens:
            raise ValueError("tokenizer: no motion tokens yet; call processor.add_motion_tokens() first")
        return self.motion_tokenizer.vocab_offset(self.tokenizer)

    def encode_motion(self, xyz: Any) -> MotionEncoding:
        """(T, 3) wrist waypoints, camera frame, metres -> bin ids, clipping counts and `<motion>…</motion>` text."""
        return self.motion_tokenizer.encode(xyz)

    def decode_motion(self, ids: Any, strict: bool = True) -> np.ndarray:
        """Token ids (e.g. one row of `generate()`'s output) -> (T, 3) float64 bin centres, metres.

        strict=True needs exactly one `<motion>` … `</motion>` span holding only bin tokens, 3T of them
        (tokens outside the span, such as the prompt or <|im_end|>, are ignored); strict=False decodes what it
        can (see `MotionTokenizer.decode_text`).
        """
        self._motion_offset()
        arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(
                f"ids: expected a 1-D sequence of integer token ids, got shape {arr.shape} {arr.dtype}"
            )
        vocab_size = len(self.tokenizer)
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(f"ids: token ids must lie in [0, {vocab_size}), got [{arr.min()}, {arr.max()}]")
        # Token strings, not decode(): exact spelling of the motion tokens, no detokenizer spacing rules.
        text = "".join(self.tokenizer.convert_ids_to_tokens(arr.tolist()))
        return self.motion_tokenizer.decode_text(text, strict=strict).xyz

    # ---- state / action normalisation -------------------------------------------------------------------
    @staticmethod
    def compute_norm_stats(values: Any) -> dict[str, list[float]]:
        """Statistics of (N, D) (or (..., D)) samples: per-dimension mean, std, min, max as lists."""
        arr = _as_float_array("values", values)
        if arr.ndim < 2 or arr.shape[0] == 0:
            raise ValueError(f"values: expected (N, D) samples, got shape {arr.shape}")
        arr = arr.reshape(-1, arr.shape[-1])
        return {
            "mean": arr.mean(0).tolist(),
            "std": arr.std(0).tolist(),
            "min": arr.min(0).tolist(),
            "max": arr.max(0).tolist(),
        }

    @staticmethod
    def _check_norm_stats(stats: dict, mode: str) -> dict:
        needed = ("mean", "std") if mode == "mean_std" else ("min", "max")
        clean: dict[str, dict[str, dict[str, list[float]]]] = {}
        if not isinstance(stats, dict):
            raise ValueError(
                f"norm_stats: expected {{dataset: {{'action': stats, 'state': stats}}}}, got {stats!r:.200}"
            )
        for key, entry in stats.items():
            if not isinstance(entry, dict) or "action" not in entry:
                raise ValueError(
                    f"norm_stats[{key!r}]: expected a dict with 'action' (and optionally 'state')"
                )
            clean[key] = {}
            for part, values in entry.items():
                if part not in ("action", "state"):
                    raise ValueError(
                        f"norm_stats[{key!r}]: unknown entry {part!r}; expected 'action' / 'state'"
                    )
                missing = [n for n in needed if n not in values]
                if missing:
                    raise ValueError(
                        f"norm_stats[{key!r}][{part!r}]: missing {missing} for norm_mode={mode!r}"
                    )
                arrays = {
                    n: _as_float_array(f"norm_stats[{key!r}][{part!r}][{n!r}]", v) for n, v in values.items()
                }
                dims = {n: a.shape for n, a in arrays.items()}
                if len(set(dims.values())) != 1 or len(next(iter(dims.values()))) != 1:
                    raise ValueError(
                        f"norm_stats[{key!r}][{part!r}]: expected 1-D vectors of one length, got {dims}"
                    )
                if "std" in arrays and (arrays["std"] < 0).any():
                    raise ValueError(f"norm_stats[{key!r}][{part!r}]['std']: negative values")
                if "min" in arrays and "max" in arrays and (arrays["max"] < arrays["min"]).any():
                    raise ValueError(f"norm_stats[{key!r}][{part!r}]: max < min in some dimension")
                clean[key][part] = {n: a.tolist() for n, a in arrays.items()}
        return clean

    def resolve_unnorm_key(self, unnorm_key: str | None = None) -> str:
        """The dataset whose statistics apply: `unnorm_key`, or the only one there is."""
        keys = sorted(self.norm_stats)
        if unnorm_key is None:
            if len(keys) == 1:
                return keys[0]
            if not keys:
                raise ValueError(
                    "unnorm_key: this processor has no normalisation statistics (norm_stats is empty)"
                )
            raise ValueError(
                f"unnorm_key: statistics exist for several datasets {keys}; choose one with unnorm_key="
            )
        if unnorm_key not in self.norm_stats:
            raise ValueError(f"unnorm_key: {unnorm_key!r} is not one of the datasets with statistics {keys}")
        return unnorm_key

    def _stats(self, part: str, unnorm_key: str | None, dim: int, name: str) -> dict[str, np.ndarray]:
        key = self.resolve_unnorm_key(unnorm_key)
        if part not in self.norm_stats[key]:
            raise ValueError(f"{name}: dataset {key!r} has no {part} statistics")
        stats = {n: np.asarray(v, dtype=np.float64) for n, v in self.norm_stats[key][part].items()}
        expected = len(next(iter(stats.values())))
        if dim != expected:
            raise ValueError(
                f"{name}: last dimension {dim}, expected {expected} ({part} dimension of {key!r})"
            )
        return stats

    def _normalize(self, name: str, part: str, values: Any, unnorm_key: str | None, inverse: bool):
        arr = _as_float_array(name, values)
        if arr.ndim == 0:
            raise ValueError(f"{name}: expected (..., D) values, got a scalar")
        s = self._stats(part, unnorm_key, arr.shape[-1], name)
        if self.norm_mode == "mean_std":
            scale, shift = s["std"] + _NORM_EPS, s["mean"]
            out = arr * scale + shift if inverse else (arr - shift) / scale
        else:
            span = s["max"] - s["min"] + _NORM_EPS
            out = (arr + 1.0) / 2.0 * span + s["min"] if inverse else 2.0 * (arr - s["min"]) / span - 1.0
        return _like_input(out, values)

    def normalize_state(self, state: Any, unnorm_key: str | None = None) -> np.ndarray | torch.Tensor:
        """(..., S) raw robot state -> normalised float32 (same container as the input; no clipping)."""
        return self._normalize("state", "state", state, unnorm_key, inverse=False)

    def normalize_actions(self, actions: Any, unnorm_key: str | None = None) -> np.ndarray | torch.Tensor:
        """(..., A) raw actions -> normalised float32, the space the action head is trained in."""
        return self._normalize("actions", "action", actions, unnorm_key, inverse=False)

    def unnormalize_actions(self, actions: Any, unnorm_key: str | None = None) -> np.ndarray | torch.Tensor:
        """(..., A) normalised actions (e.g. `predict_action`'s chunk) -> robot units, float32."""
        return self._normalize("actions", "action", actions, unnorm_key, inverse=True)

    @staticmethod
    def _batched(name: str, values: Any, ndim: int, batch: int) -> Any:
        """Add the batch axis to a single sample; check the batch size."""
        shape = tuple(values.shape) if hasattr(values, "shape") else np.shape(values)
        if len(shape) == ndim - 1:
            values = values[None] if hasattr(values, "shape") else [values]
            shape = (1, *shape)
        if len(shape) != ndim or shape[0] != batch:
            raise ValueError(f"{name}: expected shape ({batch}, ...) with {ndim} axes, got {shape}")
        return values


VipaProcessor.register_for_auto_class("AutoProcessor")
