"""Disk cache of CUT3R spatial tokens V_spa for stage 1, where the encoder is frozen (paper §3.2.3): each clip's
tokens are computed once and read back in every later epoch, so a stage-1 step runs InternViT, the fusion
layer and Qwen3 but not CUT3R.

Usage:

    import torch
    from modeling_vipa.configuration_cut3r import Cut3rConfig
    from modeling_vipa.spatial_encoder import Cut3rEncoder
    from training.spatial_cache import SpatialTokenCache
    cache = SpatialTokenCache("/tmp/vipa_spatial_cache", Cut3rEncoder(Cut3rConfig.tiny()).eval())
    pixels, mask = torch.zeros(2, 3, 3, 32, 32), torch.tensor([[True, True, False], [True, False, False]])
    tokens = cache.get_or_compute(pixels, mask)          # (2, 3, 1 + 4, 32); zeros on padding frames
    # model(input_ids=..., pixel_values=..., spatial_tokens=tokens, spatial_frame_mask=mask)

Keys. CUT3R is recurrent: a frame's tokens depend on the frames before it in its clip, so the unit cached is a
sample's clip, its real frames in order. Key = sha256 over the preprocessed pixels of those frames (dtype,
shape and raw bytes of `spatial_pixel_values[b, :n_b]`, exactly what the encoder would see). Entries live
under `DIR/<encoder fingerprint>/`, the fingerprint being a sha256 over the encoder's config (minus where it
was loaded from) and every tensor of its state dict (so a reloaded checkpoint finds its entries again): a different checkpoint or config never reads another's entries (`prune()` deletes
those). The fingerprint is taken at construction; call `refresh_fingerprint()` if the weights change in place.

Files: one safetensors file per clip, `tokens: (n_frames, 1 + N, d_s)` in the encoder's dtype, with the
fingerprint and key in its metadata (checked on read); written to a temporary file in the same folder and
moved with `os.replace`, so concurrent workers never see a partial file. A file that cannot be read or does
not match is recomputed and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

# config entries that change with where and how a checkpoint was loaded, not with what the encoder computes
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}
_BUFFER_BYTES = 1 << 24  # hash large tensors in 16 MiB pieces: no full host copy of a 3 GB encoder at once


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw bytes of a CPU contiguous tensor (any dtype, bf16 included: viewed as uint8)."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def _hash_tensor(h: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    flat = tensor.detach().reshape(-1)
    step = max(1, _BUFFER_BYTES // max(1, tensor.element_size()))
    for start in range(0, flat.numel(), step):
        h.update(_tensor_bytes(flat[start : start + step].cpu()))


def encoder_fingerprint(encoder: nn.Module) -> str:
    """sha256 hex of the encoder's config (JSON) and every state-dict tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    config = getattr(encoder, "config", None)
    h.update(type(encoder).__name__.encode())
    if config is not None:
        values = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(values, sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        _hash_tensor(h, name, tensor)
    return h.hexdigest()


def clip_key(frames: torch.Tensor) -> str:
    """sha256 hex of one clip's preprocessed frames `(n, 3, H, W)`: dtype, shape and raw bytes."""
    h = hashlib.sha256()
    _hash_tensor(h, "frames", frames)
    return h.hexdigest()


class SpatialTokenCache:
    """Spatial tokens of a frozen `Cut3rEncoder`, cached on disk per clip (see the module docstring).

    Args:
        directory: cache root; created if missing. Safe to share between processes and runs.
        encoder: the frozen CUT3R encoder (`model.spatial_encoder`); it runs under `torch.no_grad()` on misses.
    """

    def __init__(self, directory: str | os.PathLike, encoder: nn.Module) -> None:
        self.root = Path(directory)
        self.encoder = encoder
        self.hits = 0  # clips read from disk
        self.misses = 0  # clips computed by the encoder
        self.refresh_fingerprint()

    def refresh_fingerprint(self) -> str:
        """Recompute the encoder fingerprint (after changing its weights in place); returns it."""
        self.fingerprint = encoder_fingerprint(self.encoder)
        self.directory = self.root / self.fingerprint[:32]
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.fingerprint

    def prune(self) -> int:
        """Delete the entries of every other encoder fingerprint; returns how many folders were removed."""
        removed = 0
        for child in self.root.iterdir():
            if child.is_dir() and child != self.directory:
                shutil.rmtree(child)
                removed += 1
        return removed

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def _read(self, key: str, frames: int) -> torch.Tensor | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tokens = f.get_tensor("tokens")
        except Exception:  # a foreign or damaged file is a miss: it gets recomputed and replaced
            return None
        if meta.get("fingerprint") != self.fingerprint or meta.get("key") != key or tokens.shape[0] != frames:
            return None
        return tokens

    def _write(self, key: str, tokens: torch.Tensor) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(
                {"tokens": tokens.detach().cpu().contiguous()},
                tmp,
                metadata={"fingerprint": self.fingerprint, "key": key},
            )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_or_compute(
        self, spatial_pixel_values: torch.Tensor, frame_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """V_spa for a batch, read from disk where cached, computed (in one encoder call) and stored otherwise.

        Args:
            spatial_pixel_values: (B, T, 3, H, W) CUT3R inputs, as `VipaProcessor` returns them.
            frame_mask: (B, T) bool, True on a prefix of real frames per row; all True when None.

        Returns:
            tokens: (B, T, 1 + N, d_s) in the encoder's dtype on the input's device, zeros on padding frames
            (what `Cut3rEncoder(...).tokens` returns), for `model(..., spatial_tokens=tokens)`.
        """
        if not torch.is_tensor(spatial_pixel_values) or spatial_pixel_values.ndim != 5:
            shape = getattr(spatial_pixel_values, "shape", type(spatial_pixel_values).__name__)
            raise ValueError(f"spatial_pixel_values: expected a (B, T, 3, H, W) tensor, got {shape}")
        batch, length = spatial_pixel_values.shape[:2]
        if frame_mask is None:
            frame_mask = torch.ones(batch, length, dtype=torch.bool, device=spatial_pixel_values.device)
        if tuple(frame_mask.shape) != (batch, length):
            raise ValueError(f"frame_mask: expected shape {(batch, length)}, got {tuple(frame_mask.shape)}")
        mask = frame_mask.bool().cpu()
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()) or not bool(mask[:, 0].all()):
            raise ValueError(f"frame_mask: each row must be a non-empty prefix of True, got {mask.tolist()}")
        counts = mask.sum(-1).tolist()
        pixels = spatial_pixel_values.detach()
        keys = [clip_key(pixels[b, : counts[b]].cpu()) for b in range(batch)]

        cached: dict[int, torch.Tensor] = {}
        for b, key in enumerate(keys):
            tokens = self._read(key, counts[b])
            if tokens is not None:
                cached[b] = tokens
        missing = [b for b in range(batch) if b not in cached]
        self.hits += len(cached)
        self.misses += len(missing)
        if missing:
            param = next(self.encoder.parameters())
            index = torch.tensor(missing, device=pixels.device)
            with torch.no_grad():
                computed = self.encoder(
                    pixels.index_select(0, index).to(device=param.device, dtype=param.dtype),
                    frame_mask=frame_mask.bool().to(pixels.device).index_select(0, index).to(param.device),
                    return_heads=False,
                ).tokens
            for i, b in enumerate(missing):
                cached[b] = computed[i, : counts[b]]
                self._write(keys[b], cached[b])

        first = cached[0]
        out = torch.zeros(
            batch, length, *first.shape[1:], dtype=first.dtype, device=spatial_pixel_values.device
        )
        for b, tokens in cached.items():
            if tuple(tokens.shape[1:]) != tuple(first.shape[1:]):
                raise ValueError(
                    f"spatial_pixel_values: samples give token grids {tuple(first.shape[1:])} and "
                    f"{tuple(tokens.shape[1:])}; one batch must share one image size"
                )
            out[b, : counts[b]] = tokens.to(out.device)
        return out
