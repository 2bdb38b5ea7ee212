"""VIPA-VLA models on tiny random configs, checked against transformers' native InternVL, the CUT3R encoder
run on its own, hand-written greedy and Euler loops, and explicit parameter lists."""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from modeling_vipa.configuration_vipa import VipaConfig, VipaFusionConfig
from modeling_vipa.modeling_vipa import (
    VipaForActionPrediction,
    VipaForConditionalGeneration,
    add_motion_tokens,
    set_trainable,
)

IMG = VipaConfig.tiny().image_token_id  # 127
SEQ = VipaConfig.tiny().internvl_config.image_seq_length  # 4 tokens per frame
PAD = 0


def make_inputs(
    frames: list[int], text: list[int] | None = None, seed: int = 0, pad_side: str = "right"
) -> dict:
    """Processor-like batch: per sample `[5, 6] + frames*SEQ image tokens + text`, padded; CUT3R frames padded."""
    gen = torch.Generator().manual_seed(seed)
    text = text or [7, 8, 9]
    rows = [[5, 6] + [IMG] * (n * SEQ) + text[: 1 + i] for i, n in enumerate(frames)]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if pad_side == "right" else slice(length - len(r), length)
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    t = max(frames)
    frame_mask = torch.tensor([[j < n for j in range(t)] for n in frames])
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(sum(frames), 3, 56, 56, generator=gen),
        "spatial_pixel_values": torch.randn(len(frames), t, 3, 32, 48, generator=gen),
        "spatial_frame_mask": frame_mask,
    }


def select(inputs: dict, i: int, frames: list[int]) -> dict:
    """Sample i of a make_inputs batch on its own, without padding."""
    start = sum(frames[:i])
    keep = inputs["attention_mask"][i].bool()
    return {
        "input_ids": inputs["input_ids"][i : i + 1, keep],
        "attention_mask": inputs["attention_mask"][i : i + 1, keep],
        "pixel_values": inputs["pixel_values"][start : start + frames[i]],
        "spatial_pixel_values": inputs["spatial_pixel_values"][i : i + 1, : frames[i]],
        "spatial_frame_mask": inputs["spatial_frame_mask"][i : i + 1, : frames[i]],
    }


@pytest.fixture(scope="module")
def model() -> VipaForConditionalGeneration:
    torch.manual_seed(0)
    return VipaForConditionalGeneration(VipaConfig.tiny()).eval()


@pytest.fixture(scope="module")
def action_model() -> VipaForActionPrediction:
    torch.manual_seed(1)
    return VipaForActionPrediction(VipaConfig.tiny()).eval()


# -- configuration ------------------------------------------------------------------------------------------


def test_real_size_config_follows_the_paper() -> None:
    config = VipaConfig()
    ivl = config.internvl_config
    assert tuple(ivl.vision_config.image_size) == (448, 448) and ivl.vision_config.hidden_size == 1024
    assert ivl.image_seq_length == (448 // 14) ** 2 // 4 == 256
    text = config.get_text_config()
    assert (text.model_type, text.hidden_size, text.num_hidden_layers) == ("qwen3", 2048, 28)
    assert config.spatial_config.hidden_size == 768
    assert config.fusion_layer_config.alpha_init == 0.5
    assert config.action_head_config.time_sampling == "uniform"


def test_config_round_trips_through_json_dict() -> None:
    config = VipaConfig.tiny(motion_token_ids=[3, 4, 5], motion_start_token_id=6)
    again = VipaConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert again.fusion_layer_config.attention_dim == 32 and again.internvl_config.image_seq_length == SEQ


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_frames": 0}, "max_frames"),
        ({"motion_token_ids": [5, 5]}, "motion_token_ids"),
        ({"motion_token_ids": [500]}, "motion_token_ids"),
    ],
)
def test_config_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        VipaConfig.tiny(**overrides)


def test_image_seq_length_must_match_the_tile() -> None:
    from modeling_vipa.configuration_vipa import internvl_tiny_config

    with pytest.raises(ValueError, match="image_seq_length"):
        VipaConfig.tiny(internvl_config=internvl_tiny_config(image_seq_length=16))


# -- composition with transformers' InternVL ----------------------------------------------------------------


def test_alpha_zero_reproduces_native_internvl_logits() -> None:
    """Fusion on the branch with alpha = 0 must leave InternVL exactly as transformers computes it."""
    torch.manual_seed(2)
    config = VipaConfig.tiny(fusion_layer_config=VipaFusionConfig.tiny(alpha_init=0.0))
    vipa = VipaForConditionalGeneration(config).eval()
    native = InternVLForConditionalGeneration(config.internvl_config).eval()
    # InternVL's modules sit under InternVL's names: its checkpoints (here: our weights) load unchanged
    missing, unexpected = native.load_state_dict(vipa.state_dict(), strict=False)
    assert not missing
    assert {k.split(".")[1] for k in unexpected} == {"spatial_encoder", "fusion"}
    frames = [2, 1]
    inputs = make_inputs(frames)
    with torch.no_grad():
        ours = vipa(**inputs).logits
        theirs = native(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
        ).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            vipa.fusion.alpha.fill_(0.5)
        assert not torch.allclose(vipa(**inputs).logits, theirs, atol=1e-3)


def test_fusion_acts_before_pixel_shuffle_on_the_same_frame(model: VipaForConditionalGeneration) -> None:
    frames = [2, 1]
    inputs = make_inputs(frames)
    seen = {}
    handle = model.fusion.register_forward_hook(
        lambda m, args, out: seen.update(V_sem=args[0], V_spa=args[1])
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    # 56 px / 14 = 4x4 = 16 InternViT patch tokens per frame (CLS dropped), before the 0.5 pixel shuffle
    assert seen["V_sem"].shape == (3, 16, 32)
    # CUT3R on 32x48 px: pose token + 2x3 patches
    assert seen["V_spa"].shape == (3, 1 + 6, 32)
    with torch.no_grad():  # sample 1's only frame, run alone through CUT3R, is the third fused frame
        alone = model.spatial_encoder(inputs["spatial_pixel_values"][1:, :1], return_heads=False).tokens[0, 0]
        clip0 = model.spatial_encoder(inputs["spatial_pixel_values"][:1], return_heads=False).tokens[0]
    torch.testing.assert_close(seen["V_spa"][2], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["V_spa"][:2], clip0, rtol=1e-5, atol=1e-5)


def test_batch_with_varying_frame_counts_matches_each_sample_alone(
    model: VipaForConditionalGeneration,
) -> None:
    frames = [2, 1, 3]
    inputs = make_inputs(frames, seed=4)
    with torch.no_grad():
        batched = model(**inputs).logits
        for i in range(len(frames)):
            single = model(**select(inputs, i, frames)).logits[0]
            keep = inputs["attention_mask"][i].bool()
            torch.testing.assert_close(batched[i, keep], single, rtol=1e-4, atol=1e-4)


def test_generate_matches_a_greedy_loop_without_cache(model: VipaForConditionalGeneration) -> None:
    inputs = select(make_inputs([2], seed=5), 0, [2])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        ids = inputs["input_ids"]
        for _ in range(4):
            step = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
            nxt = model(**step, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


def test_labels_give_the_shifted_cross_entropy(model: VipaForConditionalGeneration) -> None:
    inputs = select(make_inputs([1], seed=6), 0, [1])
    labels = inputs["input_ids"].clone()
    labels[labels == IMG] = -100
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    logits = out.logits[0, :-1]
    target = labels[0, 1:]
    keep = target != -100
    want = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    torch.testing.assert_close(out.loss, want)


# -- bad input ---------------------------------------------------------------------------------------------


def _bad(kind: str) -> tuple[dict, str]:
    inputs = select(make_inputs([2], seed=7), 0, [2])
    if kind == "more_images":
        inputs["pixel_values"] = torch.randn(3, 3, 56, 56)
        return inputs, "pixel_values hold 3 frames but spatial_frame_mask marks 2"
    if kind == "fewer_placeholders":
        for key in ("input_ids", "attention_mask"):  # drop one frame's placeholders
            inputs[key] = torch.cat([inputs[key][:, :2], inputs[key][:, 2 + SEQ :]], dim=1)
        return inputs, r"image placeholders per sample \[4\].*expected \[8\]"
    if kind == "no_images":
        return {"input_ids": inputs["input_ids"]}, "8 image placeholder tokens"
    if kind == "empty":
        return {"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "non-empty"
    if kind == "mixed_sizes":
        inputs["pixel_values"] = [torch.randn(3, 56, 56), torch.randn(3, 42, 56)]
        return inputs, "mixed sizes"
    if kind == "wrong_tile":
        inputs["pixel_values"] = torch.randn(2, 3, 448, 448)
        return inputs, r"pixel_values must be \(frames, 3, 56, 56\)"
    if kind == "spatial_missing":
        inputs.pop("spatial_pixel_values")
        return inputs, "spatial_pixel_values is None"
    if kind == "spatial_not_multiple":
        inputs["spatial_pixel_values"] = torch.randn(1, 2, 3, 30, 32)
        return inputs, "multiples of 16"
    if kind == "gap_in_frames":
        inputs["spatial_frame_mask"] = torch.tensor([[False, True]])
        return inputs, "prefix"
    if kind == "too_many_frames":
        inputs["spatial_pixel_values"] = torch.randn(1, 5, 3, 32, 32)
        inputs["spatial_frame_mask"] = torch.tensor([[True, True, False, False, False]])
        return inputs, "max_frames=4"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "more_images",
        "fewer_placeholders",
        "no_images",
        "empty",
        "mixed_sizes",
        "wrong_tile",
        "spatial_missing",
        "spatial_not_multiple",
        "gap_in_frames",
        "too_many_frames",
    ],
)
def test_bad_input_says_what_was_expected(model: VipaForConditionalGeneration, kind: str) -> None:
    inputs, message = _bad(kind)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


# -- motion tokens and training stages ----------------------------------------------------------------------


class FakeTokenizer:
    """The slice of the tokenizer API that add_motion_tokens uses; unknown tokens map to unk (0)."""

    unk_token_id = 0

    def __init__(self, size: int) -> None:
        self.vocab = {f"tok{i}": i for i in range(size)}

    def __len__(self) -> int:
        return len(self.vocab)

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.vocab.get(t, self.unk_token_id) for t in tokens]

    def add_tokens(self, tokens: list[str]) -> int:
        for t in tokens:
            self.vocab.setdefault(t, len(self.vocab))
        return len(tokens)


def test_add_motion_tokens_resizes_and_records_ids() -> None:
    torch.manual_seed(3)
    model = VipaForConditionalGeneration(VipaConfig.tiny())
    old = model.get_input_embeddings().weight.detach().clone()
    tokenizer = FakeTokenizer(128)
    ids = add_motion_tokens(model, tokenizer, num_bins=1024)
    assert ids == list(range(128, 128 + 1024))
    assert model.config.motion_token_ids == ids
    assert (model.config.motion_start_token_id, model.config.motion_end_token_id) == (1152, 1153)
    emb = model.get_input_embeddings().weight
    assert emb.shape == (1154, 32) and model.lm_head.weight.shape == (1154, 32)
    assert model.config.get_text_config().vocab_size == 1154
    assert torch.equal(emb[:128], old)
    # a second call (tokens already there, e.g. added by the processor) changes nothing
    assert add_motion_tokens(model, tokenizer, num_bins=1024) == ids and len(tokenizer) == 1154
    again = VipaConfig.from_dict(model.config.to_dict())
    assert again.motion_token_ids == ids and again.motion_end_token_id == 1153


FUSION_PARAMS = {
    "model.fusion.alpha",
    "model.fusion.q_proj.weight",
    "model.fusion.q_proj.bias",
    "model.fusion.kv_proj.weight",
    "model.fusion.kv_proj.bias",
    "model.fusion.out_proj.weight",
    "model.fusion.out_proj.bias",
    "model.fusion.norm.weight",
    "model.fusion.norm.bias",
}


def test_set_trainable_stages_list_the_right_parameters() -> None:
    torch.manual_seed(4)
    model = VipaForActionPrediction(VipaConfig.tiny())
    llm = {f"model.language_model.{n}" for n, _ in model.model.language_model.named_parameters()}
    head = {f"action_head.{n}" for n, _ in model.action_head.named_parameters()}
    assert "model.language_model.embed_tokens.weight" in llm and "model.language_model.norm.weight" in llm

    assert set(set_trainable(model, 1)) == FUSION_PARAMS
    assert set(set_trainable(model, 2)) == FUSION_PARAMS | llm  # lm_head is tied to embed_tokens
    assert set(set_trainable(model, 3)) == llm | head | {"action_queries"}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("model.vision_tower.") for n in frozen)
    assert any(n.startswith("model.spatial_encoder.") for n in frozen)
    assert any(n.startswith("model.multi_modal_projector.") for n in frozen)
    with pytest.raises(ValueError, match="stage"):
        set_trainable(model, 4)
    with pytest.raises(ValueError, match="VipaForActionPrediction"):
        set_trainable(VipaForConditionalGeneration(VipaConfig.tiny()), 3)


def test_stage_one_step_changes_only_the_fusion_layer() -> None:
    torch.manual_seed(5)
    model = VipaForConditionalGeneration(VipaConfig.tiny())
    set_trainable(model, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = select(make_inputs([2], seed=8), 0, [2])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= FUSION_PARAMS and "model.fusion.alpha" in changed


# -- action prediction --------------------------------------------------------------------------------------


def _action_inputs(frames: list[int], seed: int, pad_side: str = "right") -> dict:
    inputs = make_inputs(frames, seed=seed, pad_side=pad_side)
    inputs["state"] = torch.randn(len(frames), 8, generator=torch.Generator().manual_seed(seed))
    return inputs


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_h_cond_does_not_depend_on_padding(action_model: VipaForActionPrediction, pad_side: str) -> None:
    frames = [1, 2]
    inputs = _action_inputs(frames, seed=9, pad_side=pad_side)
    keys = ("input_ids", "attention_mask", "pixel_values", "spatial_pixel_values", "spatial_frame_mask")
    with torch.no_grad():
        batched = action_model.encode_action_queries(**{k: inputs[k] for k in keys})
        for i in range(2):
            alone = action_model.encode_action_queries(**select(inputs, i, frames))
            torch.testing.assert_close(batched[i], alone[0], rtol=1e-4, atol=1e-4)


def test_predict_action_runs_the_prefix_once_then_euler(action_model: VipaForActionPrediction) -> None:
    inputs = _action_inputs([2], seed=10)
    eps = torch.randn(1, 4, 7)
    calls = {"llm": 0, "head": 0}
    hooks = [
        action_model.model.language_model.register_forward_hook(
            lambda *a: calls.__setitem__("llm", calls["llm"] + 1)
        ),
        action_model.action_head.register_forward_hook(
            lambda *a: calls.__setitem__("head", calls["head"] + 1)
        ),
    ]
    try:
        got = action_model.predict_action(**inputs, noise=eps, num_steps=5, return_normalized=True)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"llm": 1, "head": 5}
    keys = ("input_ids", "attention_mask", "pixel_values", "spatial_pixel_values", "spatial_frame_mask")
    with torch.no_grad():  # the integration written out: tau = 0, 0.2, ..., 0.8; a += 0.2 v
        h_cond = action_model.encode_action_queries(**{k: inputs[k] for k in keys})
        a = eps.clone()
        for i in range(5):
            a = a + 0.2 * action_model.action_head(a, torch.full((1,), i / 5), inputs["state"], h_cond)
    torch.testing.assert_close(got, a, rtol=1e-5, atol=1e-5)


class FakeProcessor:
    """unnormalize_actions as a [-1, 1] -> [low, high] map keyed by dataset."""

    stats = {"libero": (torch.full((7,), -2.0), torch.full((7,), 4.0))}

    def unnormalize_actions(self, actions: torch.Tensor, unnorm_key: str) -> torch.Tensor:
        if unnorm_key not in self.stats:
            raise ValueError(f"unknown unnorm_key {unnorm_key!r}; keys: {sorted(self.stats)}")
        low, high = self.stats[unnorm_key]
        return (actions + 1) / 2 * (high - low) + low


def test_predict_action_unnormalises_through_the_processor(action_model: VipaForActionPrediction) -> None:
    inputs = _action_inputs([1], seed=11)
    eps = torch.randn(1, 4, 7)
    normalised = action_model.predict_action(**inputs, noise=eps, return_normalized=True)
    got = action_model.predict_action(**inputs, noise=eps, processor=FakeProcessor(), unnorm_key="libero")
    torch.testing.assert_close(got, (normalised + 1) * 3 - 2)
    with pytest.raises(ValueError, match="processor"):
        action_model.predict_action(**inputs)
    with pytest.raises(ValueError, match="libero"):
        action_model.predict_action(**inputs, processor=FakeProcessor(), unnorm_key="bridge")


def test_forward_returns_the_flow_matching_loss(action_model: VipaForActionPrediction) -> None:
    inputs = _action_inputs([1, 2], seed=12)
    actions, eps, tau = torch.randn(2, 4, 7), torch.randn(2, 4, 7), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        out = action_model(**inputs, actions=actions, noise=eps, tau=tau)
        noisy = (1 - tau[:, None, None]) * eps + tau[:, None, None] * actions
        v = action_model.action_head(noisy, tau, inputs["state"], out.h_cond)
    torch.testing.assert_close(out.velocity, v)
    torch.testing.assert_close(out.loss, ((v - (actions - eps)) ** 2).mean())


def test_action_bad_input(action_model: VipaForActionPrediction) -> None:
    inputs = _action_inputs([1], seed=13)
    with pytest.raises(ValueError, match=r"state must have shape \(1, 8\).*got \(1, 9\)"):
        action_model(**{**inputs, "state": torch.randn(1, 9)}, actions=torch.randn(1, 4, 7))
    with pytest.raises(ValueError, match=r"actions must have shape \(1, 4, 7\).*got \(1, 6, 7\)"):
        action_model(**inputs, actions=torch.randn(1, 6, 7))
    with pytest.raises(ValueError, match="state is required"):
        action_model(**{k: v for k, v in inputs.items() if k != "state"}, actions=torch.randn(1, 4, 7))


def test_end_to_end_with_the_tiny_processor() -> None:
    """The processor's batch feeds the model as is; motion tokens and un-normalisation go through it."""
    import tests.tiny_assets as tiny_assets

    processor = tiny_assets.build_tiny_processor()
    model = tiny_assets.build_tiny_model(processor, seed=6, model_class=VipaForActionPrediction)
    make_image = tiny_assets.make_image
    batch = processor(
        images=[[make_image(40, 50, 0), make_image(40, 50, 1)], [make_image(30, 60, 2, mode="RGBA")]],
        text=["<image><image>\nWhere is the cup?", "<image>\nPick up the block."],
        state=torch.randn(2, 8),
        unnorm_key="tiny",
        return_tensors="pt",
    )
    assert batch["spatial_frame_mask"].tolist() == [[True, True], [True, False]]
    keys = ("input_ids", "attention_mask", "pixel_values", "spatial_pixel_values", "spatial_frame_mask")
    inputs = {k: batch[k] for k in keys}
    eps = torch.randn(2, 4, 7)
    with torch.no_grad():
        logits = VipaForConditionalGeneration.forward(model, **inputs).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    normalised = model.predict_action(**inputs, state=batch["state"], noise=eps, return_normalized=True)
    chunk = model.predict_action(
        **inputs, state=batch["state"], noise=eps, processor=processor, unnorm_key="tiny"
    )
    torch.testing.assert_close(chunk, torch.as_tensor(processor.unnormalize_actions(normalised, "tiny")))
    assert not torch.allclose(chunk, normalised)

    ids = add_motion_tokens(model, processor)
    assert ids == processor.motion_token_ids and len(ids) == processor.motion_num_bins
    assert model.config.motion_end_token_id == processor.motion_end_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer)


def test_summary_counts_the_real_model_on_meta_and_the_tiny_one_exactly() -> None:
    from modeling_vipa.summary import format_table, parameter_counts

    real = parameter_counts(VipaConfig())
    # published sizes: InternViT-300M; Qwen3-1.7B has 1.4B non-embedding parameters (its model card)
    assert 0.29e9 < real["InternViT vision tower"] < 0.31e9
    assert 1.35e9 < real["Qwen3 decoder layers + norm"] < 1.45e9
    assert real["Qwen3 token embeddings (tied lm_head)"] == 151936 * 2048
    assert "total" in format_table(real)
    torch.manual_seed(0)
    tiny_model = VipaForActionPrediction(VipaConfig.tiny())
    tiny = parameter_counts(VipaConfig.tiny())
    assert tiny["total"] == sum(p.numel() for p in tiny_model.parameters())
    assert tiny["fusion layer"] == sum(p.numel() for p in tiny_model.fusion.parameters())
