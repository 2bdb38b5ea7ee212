"""VipaProcessor against independent computations: PIL resizes and numpy normalisation by hand, token layout
read back from the ids, assistant masks checked by decoding, statistics and motion bins from their formulas."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from processing_vipa.processing_vipa import VipaProcessor
from tests.tiny_assets import (
    TINY_IMAGE_SEQ_LENGTH,
    build_tiny_processor,
    build_tiny_tokenizer,
    make_image,
    tiny_norm_stats,
)

# Written out here, not imported: the test must fail if the processor's constants drift.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def processor() -> VipaProcessor:
    return build_tiny_processor(with_motion_tokens=True)


def internvl_tile(image: PIL.Image.Image, size: int = 56) -> np.ndarray:
    """(3, size, size): PIL bicubic resize of the RGB image, /255, ImageNet mean/std."""
    rgb = np.asarray(image.convert("RGB").resize((size, size), PIL.Image.BICUBIC), dtype=np.float64) / 255.0
    return ((rgb - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def cut3r_input(rgb_uint8: np.ndarray) -> np.ndarray:
    """(3, H, W): CUT3R's normalisation of an already resized and cropped uint8 image."""
    return ((rgb_uint8.astype(np.float64) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


# ---- images -------------------------------------------------------------------------------------------
def test_pixel_values_equal_pil_resize_and_imagenet_normalisation(processor, tmp_path):
    a = make_image(40, 50, seed=1)
    b = make_image(120, 90, seed=2)
    c = make_image(33, 77, seed=3)
    c.save(tmp_path / "c.png")
    # PIL, numpy and a path, mixed sizes, in two samples
    out = processor(
        images=[a, np.asarray(b), str(tmp_path / "c.png")],
        text=["<image>\nfirst", "<image><image>\nsecond"],
        return_tensors="pt",
    )
    assert out["pixel_values"].shape == (3, 3, 56, 56)
    assert out["pixel_values"].dtype == torch.float32
    for got, image in zip(out["pixel_values"].numpy(), [a, b, c]):
        np.testing.assert_allclose(got, internvl_tile(image), atol=1e-5)


def test_default_tile_is_448_pixels_with_256_tokens(tmp_path):
    build_tiny_tokenizer().save_pretrained(tmp_path)  # stands in for the InternVL3.5 tokenizer folder
    processor = VipaProcessor.from_internvl(tmp_path)
    image = make_image(300, 400, seed=4)
    out = processor(images=image, text="<image>\nWhat is here?", return_tensors="np")
    assert out["pixel_values"].shape == (1, 3, 448, 448)
    np.testing.assert_allclose(out["pixel_values"][0], internvl_tile(image, 448), atol=1e-5)
    assert int((out["input_ids"][0] == processor.image_token_id).sum()) == 256
    assert out["spatial_pixel_values"].shape == (1, 1, 3, 384, 512)


def test_spatial_frames_resize_to_cover_then_centre_crop(processor):
    exact_half = make_image(96, 128, seed=5)  # (H, W): halves exactly to the (48, 64) target
    square = make_image(100, 100, seed=6)  # -> 64 x 64, then rows 8..56 kept
    small = make_image(24, 32, seed=7)  # enlarged x2: bicubic
    out = processor(
        images=[[exact_half], [square, small]],
        text=["<image>\none frame", "<image>\n<image>\ntwo frames"],
        return_tensors="np",
    )
    pixels, mask = out["spatial_pixel_values"], out["spatial_frame_mask"]
    assert pixels.shape == (2, 2, 3, 48, 64) and pixels.dtype == np.float32
    assert mask.dtype == bool and mask.tolist() == [[True, False], [True, True]]
    expected_half = np.asarray(exact_half.resize((64, 48), PIL.Image.LANCZOS))
    expected_square = np.asarray(square.resize((64, 64), PIL.Image.LANCZOS))[8:56]
    expected_small = np.asarray(small.resize((64, 48), PIL.Image.BICUBIC))
    np.testing.assert_allclose(pixels[0, 0], cut3r_input(expected_half), atol=1e-6)
    np.testing.assert_allclose(pixels[1, 0], cut3r_input(expected_square), atol=1e-6)
    np.testing.assert_allclose(pixels[1, 1], cut3r_input(expected_small), atol=1e-6)
    assert np.all(pixels[0, 1] == 0.0)  # padding frame


def test_rgba_is_composited_on_white_and_grayscale_replicated(processor):
    rng = np.random.default_rng(8)
    rgba = rng.integers(0, 256, size=(48, 64, 4), dtype=np.uint8)  # already the CUT3R size: no resize
    gray = rng.integers(0, 256, size=(48, 64), dtype=np.uint8)
    out = processor(images=[PIL.Image.fromarray(rgba), gray], text="<image><image>\nq", return_tensors="np")
    alpha = rgba[..., 3:].astype(np.float64) / 255.0
    composite = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    got = out["spatial_pixel_values"][0]
    np.testing.assert_allclose(got[0], cut3r_input(composite), atol=2.5 / 255 * 2)
    np.testing.assert_allclose(got[1], cut3r_input(np.repeat(gray[..., None], 3, axis=-1)), atol=1e-6)
    # float arrays in [0, 1] are the same picture as their uint8 version
    as_float = processor(images=gray.astype(np.float64) / 255.0, text="<image>q", return_tensors="np")
    np.testing.assert_allclose(as_float["spatial_pixel_values"][0, 0], got[1], atol=1e-6)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((4, 4, 2), dtype=np.uint8), r"\(H, W\) or \(H, W, 1\|3\|4\)"),
        (np.full((4, 4, 3), 2.0), r"\[0, 1\]"),
        (np.zeros((4, 4, 3), dtype=np.int32), "uint8 or float"),
        ("/nonexistent/frame.png", "no image file"),
        (3.5, "expected a PIL image"),
    ],
)
def test_bad_images_are_rejected(processor, image, match):
    with pytest.raises(ValueError, match=match):
        processor(images=image, text="<image>\nq")


# ---- text and image tokens ----------------------------------------------------------------------------
@pytest.mark.parametrize("seq_len", [TINY_IMAGE_SEQ_LENGTH, 16])
def test_each_placeholder_becomes_img_context_run_img(seq_len):
    processor = build_tiny_processor(image_seq_length=seq_len)
    out = processor(
        images=[make_image(20, 20, seed=s) for s in range(3)],
        text=["<image>\nA cup.", "Frames: <image> then <image>, where?"],
        return_tensors="np",
    )
    start, end, ctx = processor.start_image_token_id, processor.end_image_token_id, processor.image_token_id
    tok = processor.tokenizer
    assert (start, end, ctx) == tuple(tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"]))
    for row, n_frames in zip(out["input_ids"], [1, 2]):
        row = row[out["attention_mask"][0 if n_frames == 1 else 1] == 1]
        starts = np.flatnonzero(row == start)
        assert len(starts) == n_frames
        for s in starts:
            assert np.all(row[s + 1 : s + 1 + seq_len] == ctx) and row[s + 1 + seq_len] == end
        assert int((row == ctx).sum()) == n_frames * seq_len
    # the text around the images is untouched
    decoded = tok.decode(out["input_ids"][1], skip_special_tokens=True)
    assert decoded.replace(tok.pad_token, "") == "Frames:  then , where?"


def test_text_only_call_has_no_image_outputs(processor):
    out = processor(text=["What is a hand?", "Hi"], return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].shape[0] == 2  # padded to the longest by default
    # what TRL's collators send for a batch without images
    assert set(processor(images=[[], []], text=["a", "b"])) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize(
    ("images", "text", "match"),
    [
        ([make_image(8, 8)] * 2, "<image>\nq", r"1 <image> placeholder\(s\).*but 2 image\(s\)"),
        ([make_image(8, 8)], "<image><image>\nq", r"2 <image> placeholder\(s\).*but 1 image\(s\)"),
        (None, "<image>\nq", r"1 <image> placeholder\(s\).*no images"),
        ([make_image(8, 8)], "no placeholder", r"0 <image> placeholder\(s\).*but 1 image\(s\)"),
        ([[make_image(8, 8)], []], ["<image>a", "<image>b"], r"images\[1\]: text\[1\] has 1 .* but 0 image"),
        ([[make_image(8, 8)]], ["<image>a", "<image>b"], r"one list of frames per text sample \(2\), got 1"),
        ([make_image(8, 8)] * 5, "<image>" * 5, r"expected 1 to 4 frames .* got 5"),
    ],
)
def test_image_placeholder_mismatch_says_expected_and_got(processor, images, text, match):
    with pytest.raises(ValueError, match=match):
        processor(images=images, text=text)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"text\[0\]: empty prompt"),
        (["ok", "   "], r"text\[1\]: empty"),
        (None, "text: a prompt is required"),
    ],
)
def test_empty_text_is_rejected(processor, text, match):
    with pytest.raises(ValueError, match=match):
        processor(text=text)


def test_expanded_image_tokens_in_text_and_truncation_are_rejected(processor):
    with pytest.raises(ValueError, match="contains '<IMG_CONTEXT>'"):
        processor(images=make_image(8, 8), text="<image><IMG_CONTEXT>")
    with pytest.raises(ValueError, match=r"expected 1 x 4 <IMG_CONTEXT> tokens after tokenization, got 2"):
        processor(images=make_image(8, 8), text="<image> hello", truncation=True, max_length=3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        processor(text="hi", colour="red")


# ---- chat template and assistant-only loss ------------------------------------------------------------
def conversation(image, question: str, answer: str) -> list[dict]:
    return [
        {"role": "system", "content": "You are VIPA."},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "no significant movement"},
    ]


def test_chat_template_renders_chatml_with_image_placeholders(processor):
    text = processor.apply_chat_template(conversation(None, "Where is the cup?", "left, 0.2 m"))
    assert text == (
        "<|im_start|>system\nYou are VIPA.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhere is the cup?<|im_end|>\n"
        "<|im_start|>assistant\nleft, 0.2 m<|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>\n"
        "<|im_start|>assistant\nno significant movement<|im_end|>\n"
    )
    prompt = processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert processor.tokenizer.chat_template == processor.chat_template
    with pytest.raises(Exception, match="role must be system, user or assistant"):
        processor.apply_chat_template([{"role": "tool", "content": "x"}])


def test_assistant_mask_covers_exactly_the_assistant_turns(processor):
    convs = [
        conversation(make_image(30, 40, seed=1), "Where is the cup?", "left and down, 0.21 m"),
        conversation(make_image(50, 20, seed=2), "Move?", "right, 0.3 m"),
    ]
    # the keyword arguments TRL's DataCollatorForVisionLanguageModeling sends
    out = processor.apply_chat_template(
        convs,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "right", "add_special_tokens": False},
    )
    tok = processor.tokenizer
    assert out["pixel_values"].shape == (2, 3, 56, 56)
    assert out["spatial_frame_mask"].tolist() == [[True], [True]]
    for i, answer in enumerate(["left and down, 0.21 m", "right, 0.3 m"]):
        mask = out["assistant_masks"][i].bool()
        ids = out["input_ids"][i]
        assert tok.decode(ids[mask]) == f"{answer}<|im_end|>no significant movement<|im_end|>"
        # two contiguous runs, each ending on <|im_end|>, none on images or padding
        runs = np.flatnonzero(np.diff(np.r_[0, mask.numpy().astype(int), 0]))
        assert len(runs) == 4
        assert all(ids[e - 1] == tok.convert_tokens_to_ids("<|im_end|>") for e in runs[1::2])
        assert not mask[ids == processor.image_token_id].any()
        assert not mask[out["attention_mask"][i] == 0].any()
    labels = VipaProcessor.build_labels(out)
    assert torch.equal(labels != -100, out["assistant_masks"].bool())
    assert torch.equal(labels[labels != -100], out["input_ids"][labels != -100])


# ---- motion tokens ------------------------------------------------------------------------------------
def test_motion_tokens_are_added_once_and_contiguous():
    processor = build_tiny_processor()
    before = len(processor.tokenizer)
    assert processor.add_motion_tokens() == 1026
    assert processor.add_motion_tokens() == 0
    assert len(processor.tokenizer) == before + 1026
    ids = processor.motion_token_ids
    assert ids == list(range(before, before + 1024))
    assert processor.tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<motion_0>", "<motion_1023>"]
    assert processor.motion_start_token_id == before + 1024
    assert processor.motion_end_token_id == before + 1025
    encoded = processor.tokenizer("go <motion><motion_7><motion_1023><motion_0></motion>")["input_ids"]
    assert encoded[-5:] == [before + 1024, before + 7, before + 1023, before, before + 1025]
    # kept in the answer text when special tokens are skipped
    text = processor.tokenizer.decode(encoded + [processor.tokenizer.eos_token_id], skip_special_tokens=True)
    assert text == "go <motion><motion_7><motion_1023><motion_0></motion>"


def test_decode_motion_returns_bin_centres(processor):
    bins = [[0, 1023, 512], [100, 200, 1000]]
    text = "<motion>" + "".join(f"<motion_{k}>" for row in bins for k in row) + "</motion>"
    ids = processor.tokenizer("The wrist goes " + text + "<|im_end|>")["input_ids"]
    xyz = processor.decode_motion(torch.tensor(ids))
    width = 1.0 / 1024  # every axis spans 1 m
    expected = np.array(
        [
            [-0.5 + 0.5 * width, -0.5 + 1023.5 * width, 0.0 + 512.5 * width],
            [-0.5 + 100.5 * width, -0.5 + 200.5 * width, 0.0 + 1000.5 * width],
        ]
    )
    np.testing.assert_allclose(xyz, expected, atol=1e-12)
    # a round trip through encode_motion stays within half a bin
    waypoints = np.array([[0.1, -0.2, 0.35], [-0.45, 0.05, 0.9]])
    again = processor.decode_motion(processor.tokenizer(processor.encode_motion(waypoints).text)["input_ids"])
    assert np.abs(again - waypoints).max() <= width / 2
    broken = processor.tokenizer("<motion><motion_1><motion_2></motion>")["input_ids"]
    with pytest.raises(ValueError, match="not a multiple of 3"):
        processor.decode_motion(broken)
    with pytest.raises(ValueError, match="token ids must lie in"):
        processor.decode_motion([10**6])
    with pytest.raises(ValueError, match="add_motion_tokens"):
        build_tiny_processor().decode_motion(broken)


# ---- state and action normalisation -------------------------------------------------------------------
def test_mean_std_normalisation_matches_numpy_and_round_trips(processor):
    stats = tiny_norm_stats()["tiny"]
    rng = np.random.default_rng(9)
    actions = rng.normal(size=(3, 10, 7)) * 2
    mean, std = np.array(stats["action"]["mean"]), np.array(stats["action"]["std"])
    norm = processor.normalize_actions(actions)
    np.testing.assert_allclose(norm, (actions - mean) / (std + 1e-6), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(processor.unnormalize_actions(norm), actions, rtol=1e-5, atol=1e-5)
    as_tensor = processor.unnormalize_actions(torch.as_tensor(norm, dtype=torch.float64))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float32
    np.testing.assert_allclose(as_tensor.numpy(), actions, rtol=1e-5, atol=1e-5)
    state = rng.normal(size=(4, 8))
    s_mean, s_std = np.array(stats["state"]["mean"]), np.array(stats["state"]["std"])
    np.testing.assert_allclose(processor.normalize_state(state), (state - s_mean) / (s_std + 1e-6), rtol=1e-5)


def test_constant_dimension_stays_finite():
    # a gripper that never moved in the data: std = 0 must not give inf / NaN
    stats = {"c": {"action": {"mean": [1.0, 0.0], "std": [0.0, 1.0]}}}
    processor = build_tiny_processor(norm_stats=stats)
    norm = processor.normalize_actions(np.array([[1.0, 2.0]]))
    np.testing.assert_allclose(norm, [[0.0, 2.0 / (1.0 + 1e-6)]], rtol=1e-6)
    np.testing.assert_allclose(processor.unnormalize_actions(norm), [[1.0, 2.0]], rtol=1e-6)


def test_min_max_normalisation_maps_bounds_to_minus_one_and_one():
    processor = build_tiny_processor(norm_mode="min_max")
    stats = tiny_norm_stats()["tiny"]["action"]
    lo, hi = np.array(stats["min"]), np.array(stats["max"])
    np.testing.assert_allclose(
        processor.normalize_actions(np.stack([lo, hi])), [[-1.0] * 7, [1.0] * 7], atol=1e-5
    )
    x = np.random.default_rng(10).uniform(lo - 1, hi + 1, size=(20, 7))  # outside the bounds too: no clipping
    np.testing.assert_allclose(processor.normalize_actions(x), 2 * (x - lo) / (hi - lo + 1e-6) - 1, rtol=1e-5)
    np.testing.assert_allclose(processor.unnormalize_actions(processor.normalize_actions(x)), x, atol=1e-5)


def test_unnorm_key_missing_ambiguous_or_unknown_lists_the_keys():
    processor = build_tiny_processor(norm_stats=tiny_norm_stats(keys=("libero", "robocasa")))
    with pytest.raises(ValueError, match=r"several datasets \['libero', 'robocasa'\]"):
        processor.unnormalize_actions(np.zeros(7))
    with pytest.raises(ValueError, match=r"'bridge' is not one of the datasets .*\['libero', 'robocasa'\]"):
        processor.unnormalize_actions(np.zeros(7), unnorm_key="bridge")
    # the two datasets really have different statistics
    a = processor.unnormalize_actions(np.zeros(7), unnorm_key="libero")
    b = processor.unnormalize_actions(np.zeros(7), unnorm_key="robocasa")
    np.testing.assert_allclose(b - a, np.ones(7), atol=1e-5)
    with pytest.raises(ValueError, match="no normalisation statistics"):
        build_tiny_processor(norm_stats={}).normalize_state(np.zeros(8))


def test_state_and_actions_in_call_are_normalised_and_checked(processor):
    stats = tiny_norm_stats()["tiny"]
    state = np.arange(8.0)
    actions = np.ones((5, 7))
    out = processor(
        images=make_image(8, 8), text="<image>go", state=state, actions=actions, return_tensors="pt"
    )
    expected_state = (state - np.array(stats["state"]["mean"])) / (np.array(stats["state"]["std"]) + 1e-6)
    assert out["state"].shape == (1, 8) and out["actions"].shape == (1, 5, 7)
    np.testing.assert_allclose(out["state"][0].numpy(), expected_state, rtol=1e-5)
    with pytest.raises(ValueError, match=r"state: last dimension 6, expected 8"):
        processor(images=make_image(8, 8), text="<image>go", state=np.zeros(6))
    with pytest.raises(ValueError, match=r"actions: last dimension 3, expected 7"):
        processor.normalize_actions(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"state: expected shape \(2, ...\)"):
        processor(text=["a", "b"], state=np.zeros((3, 8)))
    with pytest.raises(ValueError, match="non-finite"):
        processor.normalize_state(np.full(8, np.nan))


def test_compute_norm_stats_matches_numpy():
    x = np.random.default_rng(11).normal(size=(50, 4, 3))
    stats = VipaProcessor.compute_norm_stats(x)
    flat = x.reshape(-1, 3)
    np.testing.assert_allclose(stats["mean"], flat.mean(0))
    np.testing.assert_allclose(stats["std"], flat.std(0))
    np.testing.assert_allclose(stats["min"], flat.min(0))
    np.testing.assert_allclose(stats["max"], flat.max(0))


def test_constructor_validates_arguments():
    tok = build_tiny_tokenizer()
    with pytest.raises(
        ValueError, match=r"spatial_image_size: \(40, 64\) must be a multiple of spatial_patch_size=16"
    ):
        VipaProcessor(tokenizer=tok, spatial_image_size=(40, 64))
    with pytest.raises(ValueError, match="context_image_token: '<IMAGE_PAD>' must be one token"):
        VipaProcessor(tokenizer=tok, context_image_token="<IMAGE_PAD>")
    with pytest.raises(ValueError, match=r"norm_stats\['x'\]\['action'\]: missing \['std'\]"):
        VipaProcessor(tokenizer=tok, norm_stats={"x": {"action": {"mean": [0.0]}}})
    with pytest.raises(ValueError, match="norm_mode"):
        VipaProcessor(tokenizer=tok, norm_mode="quantile")
    with pytest.raises(ValueError, match="tokenizer"):
        VipaProcessor()
