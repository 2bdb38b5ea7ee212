"""Spatial-token cache for stage 1 and the model's `spatial_tokens` input: cached tokens give the same logits
as running CUT3R, a hit never runs the encoder, entries are keyed by pixel content and encoder weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import training.spatial_cache as spatial_cache
from modeling_vipa.configuration_vipa import VipaConfig
from modeling_vipa.modeling_vipa import VipaForConditionalGeneration
from modeling_vipa.spatial_encoder import Cut3rEncoder
from training.spatial_cache import SpatialTokenCache

IMG = VipaConfig.tiny().image_token_id


def make_batch(seed: int = 0) -> dict:
    """Two samples, 2 and 1 frames (the second padded), 4 image tokens per frame."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.tensor([[5, 6] + [IMG] * 8 + [7, 8], [5] + [IMG] * 4 + [9, 0, 0, 0, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1] * 12, [1] * 6 + [0] * 6]),
        "pixel_values": torch.randn(3, 3, 56, 56, generator=gen),
        "spatial_pixel_values": torch.randn(2, 2, 3, 32, 48, generator=gen),
        "spatial_frame_mask": torch.tensor([[True, True], [True, False]]),
    }


@pytest.fixture(scope="module")
def model() -> VipaForConditionalGeneration:
    torch.manual_seed(0)
    return VipaForConditionalGeneration(VipaConfig.tiny()).eval()


class CallCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self)

    def __call__(self, *args) -> None:
        self.calls += 1


def cached_inputs(batch: dict, tokens: torch.Tensor) -> dict:
    return {**{k: v for k, v in batch.items() if k != "spatial_pixel_values"}, "spatial_tokens": tokens}


def test_cached_tokens_give_the_same_logits_and_hits_skip_the_encoder(model, tmp_path: Path) -> None:
    batch = make_batch()
    with torch.no_grad():
        reference = model(**batch).logits
    counter = CallCounter(model.spatial_encoder)
    cache = SpatialTokenCache(tmp_path, model.spatial_encoder)
    first = cache.get_or_compute(batch["spatial_pixel_values"], batch["spatial_frame_mask"])
    assert counter.calls == 1 and (cache.hits, cache.misses) == (0, 2)
    second = cache.get_or_compute(batch["spatial_pixel_values"], batch["spatial_frame_mask"])
    assert counter.calls == 1 and (cache.hits, cache.misses) == (2, 2)  # read from disk, encoder not run
    assert torch.equal(first, second)
    with torch.no_grad():
        for tokens in (first, second):
            assert torch.equal(model(**cached_inputs(batch, tokens)).logits, reference)
    assert counter.calls == 1  # the model did not run CUT3R either


def test_each_clip_is_cached_on_its_own(model, tmp_path: Path) -> None:
    """Entries hold each clip's real frames: a clip met in another batch, padded differently, is a hit and
    equals the encoder run on that clip alone."""
    batch = make_batch()
    cache = SpatialTokenCache(tmp_path, model.spatial_encoder)
    cache.get_or_compute(batch["spatial_pixel_values"], batch["spatial_frame_mask"])
    alone = batch["spatial_pixel_values"][1:, :1]  # sample 1 without its padding frame
    counter = CallCounter(model.spatial_encoder)
    tokens = cache.get_or_compute(alone, torch.ones(1, 1, dtype=torch.bool))
    assert counter.calls == 0
    with torch.no_grad():
        direct = model.spatial_encoder(alone, return_heads=False).tokens
    torch.testing.assert_close(tokens, direct, rtol=1e-5, atol=1e-6)
    files = sorted(cache.directory.rglob("*.safetensors"))
    assert len(files) == 2 and not list(cache.directory.rglob("*.tmp"))
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata()["fingerprint"] == cache.fingerprint
        assert f.get_tensor("tokens").shape[1:] == (1 + 2 * 3, 32)  # pose + (32/16)(48/16) patches


def test_key_follows_pixel_content_and_encoder_weights(tmp_path: Path) -> None:
    torch.manual_seed(1)
    encoder = VipaForConditionalGeneration(VipaConfig.tiny()).spatial_encoder.eval()
    counter = CallCounter(encoder)
    batch = make_batch()
    pixels, mask = batch["spatial_pixel_values"], batch["spatial_frame_mask"]
    cache = SpatialTokenCache(tmp_path, encoder)
    cache.get_or_compute(pixels, mask)
    changed = pixels.clone()
    changed[0, 1, 0, 0, 0] += 1e-3  # one value of sample 0's second frame
    cache.get_or_compute(changed, mask)
    assert (cache.hits, cache.misses) == (1, 3)  # sample 1 hits, sample 0 is a new clip

    old_dir = cache.directory
    with torch.no_grad():
        encoder.pose_token.add_(0.1)
    cache.refresh_fingerprint()
    assert cache.directory != old_dir
    calls = counter.calls
    tokens = cache.get_or_compute(pixels, mask)
    assert counter.calls == calls + 1 and cache.misses == 5  # new weights: nothing is reused
    with torch.no_grad():
        torch.testing.assert_close(tokens, encoder(pixels, frame_mask=mask, return_heads=False).tokens)
    assert cache.prune() == 1 and not old_dir.exists() and cache.directory.exists()


def test_failed_write_leaves_no_entry_and_no_temporary(model, tmp_path: Path, monkeypatch) -> None:
    def broken_save(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(spatial_cache, "save_file", broken_save)
    cache = SpatialTokenCache(tmp_path, model.spatial_encoder)
    batch = make_batch()
    with pytest.raises(OSError, match="disk full"):
        cache.get_or_compute(batch["spatial_pixel_values"], batch["spatial_frame_mask"])
    assert [p for p in cache.directory.rglob("*") if p.is_file()] == []


def test_damaged_entry_is_recomputed(model, tmp_path: Path) -> None:
    cache = SpatialTokenCache(tmp_path, model.spatial_encoder)
    batch = make_batch()
    first = cache.get_or_compute(batch["spatial_pixel_values"], batch["spatial_frame_mask"])
    for path in cache.directory.rglob("*.safetensors"):
        path.write_bytes(b"not a safetensors file")
    again = cache.get_or_compute(batch["spatial_pixel_values"], batch["spatial_frame_mask"])
    assert cache.misses == 4 and torch.equal(first, again)


def test_bad_inputs_are_named(model, tmp_path: Path) -> None:
    batch = make_batch()
    cache = SpatialTokenCache(tmp_path, model.spatial_encoder)
    with pytest.raises(ValueError, match="frame_mask"):
        cache.get_or_compute(batch["spatial_pixel_values"], torch.tensor([[False, True], [True, False]]))
    tokens = cache.get_or_compute(batch["spatial_pixel_values"], batch["spatial_frame_mask"])
    with pytest.raises(ValueError, match="not both"):
        model(**batch, spatial_tokens=tokens)
    with pytest.raises(ValueError, match="spatial_tokens must be"):
        model(**cached_inputs(batch, tokens[..., :16]))
    bad = tokens.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="spatial_tokens contains NaN"):
        model(**cached_inputs(batch, bad))


def test_a_reloaded_encoder_finds_its_entries(model, tmp_path: Path) -> None:
    """Same weights and config after save / from_pretrained (a new training run): same fingerprint, hits."""
    batch = make_batch()
    cache = SpatialTokenCache(tmp_path / "cache", model.spatial_encoder)
    first = cache.get_or_compute(batch["spatial_pixel_values"], batch["spatial_frame_mask"])
    model.spatial_encoder.save_pretrained(tmp_path / "cut3r")
    reloaded = Cut3rEncoder.from_pretrained(tmp_path / "cut3r").eval()
    counter = CallCounter(reloaded)
    again = SpatialTokenCache(tmp_path / "cache", reloaded)
    assert again.fingerprint == cache.fingerprint
    assert torch.equal(
        again.get_or_compute(batch["spatial_pixel_values"], batch["spatial_frame_mask"]), first
    )
    assert counter.calls == 0 and again.hits == 2


def test_action_model_accepts_cached_tokens() -> None:
    """VipaForActionPrediction: h_cond, the training loss and predict_action are unchanged when CUT3R's
    tokens come precomputed, and CUT3R is not run."""
    from modeling_vipa.modeling_vipa import VipaForActionPrediction

    torch.manual_seed(0)
    policy = VipaForActionPrediction(VipaConfig.tiny()).eval()
    batch = make_batch()
    head = policy.config.action_head_config
    state = torch.randn(2, head.state_dim)
    actions = torch.randn(2, head.horizon, head.action_dim)
    noise, tau = torch.randn_like(actions), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        tokens = policy.spatial_encoder(batch["spatial_pixel_values"], return_heads=False).tokens
        ref = policy(**batch, state=state, actions=actions, noise=noise, tau=tau)
        ref_act = policy.predict_action(**batch, state=state, noise=noise, return_normalized=True)
        counter = CallCounter(policy.spatial_encoder)
        got = policy(**cached_inputs(batch, tokens), state=state, actions=actions, noise=noise, tau=tau)
        got_act = policy.predict_action(
            **cached_inputs(batch, tokens), state=state, noise=noise, return_normalized=True
        )
    assert counter.calls == 0
    torch.testing.assert_close(got.h_cond, ref.h_cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.loss, ref.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_act, ref_act, rtol=0, atol=1e-6)
    # different tokens change the conditioning: the input is really used
    with torch.no_grad():
        other = policy(**cached_inputs(batch, tokens + 1.0), state=state)
    assert not torch.allclose(other.h_cond, ref.h_cond, atol=1e-4)
