"""Motion tokenizer: bins by hand, round-trip bounds, clipping counts, malformed text, vocab ids."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from processing_vipa.motion_tokenizer import MotionTokenizer, MotionTokenizerConfig

ROOT = Path(__file__).resolve().parents[1]
TOK = MotionTokenizer()
WIDTH = np.array([1.0, 1.0, 1.0]) / 1024  # every default axis spans 1 m


def test_bins_by_hand():
    # x = 0 -> (0 + 0.5) / (1/1024) = 512; y = -0.1 -> 0.4 * 1024 = 409.6 -> 409; z = 0.4 -> 409
    xyz = np.array([[0.0, -0.1, 0.4], [-0.5, 0.5, 0.0], [0.4999, -0.4999, 0.9999], [0.7, -3.0, 1.5]])
    enc = TOK.encode(xyz)
    assert enc.ids.dtype == np.int64 and enc.ids.shape == (12,)
    assert enc.ids.tolist() == [512, 409, 409, 0, 1023, 0, 1023, 0, 1023, 1023, 0, 1023]
    assert enc.clipped.tolist() == [1, 1, 1]  # the upper bound itself is in range; 0.7, -3, 1.5 are not
    assert enc.text == (
        "<motion><motion_512><motion_409><motion_409><motion_0><motion_1023><motion_0>"
        "<motion_1023><motion_0><motion_1023><motion_1023><motion_0><motion_1023></motion>"
    )
    # bin centres: low + (id + 0.5) * width
    np.testing.assert_allclose(
        TOK.decode_ids([512, 409, 409]), [[0.5 / 1024, -0.5 + 409.5 / 1024, 409.5 / 1024]]
    )


def test_token_strings():
    toks = TOK.token_strings()
    assert len(toks) == 1026 and len(set(toks)) == 1026
    assert toks[0] == "<motion_0>" and toks[1023] == "<motion_1023>"
    assert toks[-2:] == ["<motion>", "</motion>"]


in_range = arrays(
    np.float64,
    st.tuples(st.integers(1, 40), st.just(3)),
    elements=st.floats(0.0, 1.0, allow_nan=False),
)


@settings(max_examples=200, deadline=None)
@given(in_range)
def test_round_trip_within_half_a_bin(u):
    low, high = np.array([-0.5, -0.5, 0.0]), np.array([0.5, 0.5, 1.0])
    xyz = low + u * (high - low)
    enc = TOK.encode(xyz)
    assert enc.clipped.tolist() == [0, 0, 0]
    back = TOK.decode_text(enc.text).xyz
    assert back.shape == xyz.shape
    assert np.all(np.abs(back - xyz) <= WIDTH / 2 + 1e-12)
    np.testing.assert_array_equal(TOK.decode_ids(enc.ids), back)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(0, 40), st.just(3)), elements=st.floats(-2, 2)))
def test_clipping_counts_and_clipped_values(xyz):
    enc = TOK.encode(xyz)
    low, high = np.array([-0.5, -0.5, 0.0]), np.array([0.5, 0.5, 1.0])
    expected = ((xyz < low) | (xyz > high)).sum(axis=0)
    np.testing.assert_array_equal(enc.clipped, expected)
    back = TOK.decode_ids(enc.ids).reshape(-1, 3)
    # out-of-range values land in the edge bin on their side
    assert np.all(back[xyz < low] == np.broadcast_to(low + WIDTH / 2, xyz.shape)[xyz < low])
    assert np.all(back[xyz > high] == np.broadcast_to(high - WIDTH / 2, xyz.shape)[xyz > high])


def test_custom_config_and_torch_input():
    tok = MotionTokenizer(MotionTokenizerConfig(num_bins=4, low=(0, 0, 0), high=(4, 8, 1)))
    enc = tok.encode(torch.tensor([[1.5, 7.9, 0.3]]))
    assert enc.ids.tolist() == [1, 3, 1]
    np.testing.assert_allclose(tok.decode_ids(enc.ids), [[1.5, 7.0, 0.375]])
    assert tok.token_strings()[-3:] == ["<motion_3>", "<motion>", "</motion>"]


def test_empty_trajectory():
    enc = TOK.encode(np.zeros((0, 3)))
    assert enc.text == "<motion></motion>" and enc.ids.shape == (0,)
    assert TOK.decode_text(enc.text).xyz.shape == (0, 3)


def test_text_with_prose_and_whitespace():
    dec = TOK.decode_text("Trajectory: <motion> <motion_0> <motion_1023>\n<motion_512> </motion> done.")
    np.testing.assert_allclose(dec.xyz, [[-0.5 + 0.5 / 1024, 0.5 - 0.5 / 1024, 512.5 / 1024]])
    assert dec.dropped == []


MALFORMED = {
    "not a multiple of 3": ("<motion><motion_1><motion_2></motion>", [], "multiple of 3"),
    "out of range": (
        "<motion><motion_1><motion_2><motion_3><motion_4><motion_5><motion_1024></motion>",
        [[1, 2, 3]],
        "outside",
    ),
    "missing end": ("<motion><motion_1><motion_2><motion_3>", [[1, 2, 3]], "missing </motion>"),
    "missing begin": ("<motion_1><motion_2><motion_3></motion>", [[1, 2, 3]], "without <motion>"),
    "no delimiters": ("<motion_1><motion_2><motion_3>", [[1, 2, 3]], "missing <motion>"),
    "unknown token": (
        "<motion><motion_1><pad><motion_2><motion_3></motion>",
        [[1, 2, 3]],
        "unknown piece '<pad>'",
    ),
    "bad bin token": (
        "<motion><motion_1><motion_x><motion_2><motion_3></motion>",
        [[1, 2, 3]],
        "unknown piece",
    ),
    "two spans": ("<motion><motion_1><motion_2><motion_3></motion><motion></motion>", [[1, 2, 3]], "found 2"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_text_strict_and_lenient(name):
    text, expected_ids, match = MALFORMED[name]
    with pytest.raises(ValueError, match=match):
        TOK.decode_text(text)
    dec = TOK.decode_text(text, strict=False)
    assert dec.ids.reshape(-1, 3).tolist() == expected_ids
    np.testing.assert_allclose(
        dec.xyz, np.array(expected_ids).reshape(-1, 3) * WIDTH + [-0.5, -0.5, 0] + WIDTH / 2
    )
    if name != "two spans":
        assert dec.dropped, "lenient mode must report what it skipped"


def test_lenient_report_names_what_was_dropped():
    dec = TOK.decode_text(
        "<motion><motion_1><motion_2><motion_3><motion_4><motion_5000><motion_6><motion_7>", strict=False
    )
    assert dec.ids.tolist() == [1, 2, 3]
    text = " ".join(dec.dropped)
    assert "<motion_5000>" in text and "<motion_7>" in text and "missing </motion>" in text


def test_decode_ids_errors_and_lenient():
    with pytest.raises(ValueError, match="multiple of 3"):
        TOK.decode_ids([1, 2])
    with pytest.raises(ValueError, match="outside"):
        TOK.decode_ids([1, 2, -1])
    with pytest.raises(ValueError, match="integer"):
        TOK.decode_ids(np.array([1.0, 2.0, 3.0]))
    rep = TOK.decode_ids_report([1, 2, 3, 4, 2000, 6, 7], strict=False)
    assert rep.ids.tolist() == [1, 2, 3] and len(rep.dropped) == 2


@pytest.mark.parametrize(
    "xyz, match",
    [
        (np.zeros((4, 2)), r"\(T, 3\)"),
        (np.zeros(3), r"\(T, 3\)"),
        ([[0.0, np.nan, 0.0]], "non-finite"),
        ("abc", "xyz"),
    ],
)
def test_encode_bad_input(xyz, match):
    with pytest.raises(ValueError, match=match):
        TOK.encode(xyz)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_bins": 1}, "num_bins"),
        ({"num_bins": 3.0}, "num_bins"),
        ({"low": (0, 0, 1), "high": (1, 1, 1)}, "low/high"),
        ({"low": (0, 0)}, "low"),
        ({"high": (1, float("nan"), 1)}, "high"),
        ({"begin_token": "</motion>"}, "distinct"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MotionTokenizerConfig(**kwargs)


def test_vocab_ids_with_a_real_hf_tokenizer():
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "the", "hand", "moves"]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="not contiguous"):
        TOK.vocab_offset(hf)
    hf.add_tokens(TOK.token_strings(), special_tokens=True)
    first = TOK.vocab_offset(hf)
    assert first == len(words)

    enc = TOK.encode(np.array([[0.1, -0.2, 0.3], [0.0, 0.0, 0.9]]))
    vocab_ids = TOK.to_vocab_ids(enc.ids, first)
    # the tokenizer itself maps the text to the same ids (delimiters around them)
    hf_ids = hf(enc.text, add_special_tokens=False)["input_ids"]
    assert hf_ids[1:-1] == vocab_ids.tolist()
    assert hf.convert_ids_to_tokens(hf_ids[0]) == "<motion>"
    np.testing.assert_array_equal(TOK.from_vocab_ids(hf_ids[1:-1], first), enc.ids)
    assert TOK.decode_text(hf.decode(hf_ids)).ids.tolist() == enc.ids.tolist()
    with pytest.raises(ValueError, match="vocab_ids"):
        TOK.from_vocab_ids([first - 1], first)
    with pytest.raises(ValueError, match="ids"):
        TOK.to_vocab_ids([1024], first)


def test_remote_code_loads_alone_without_the_package(tmp_path):
    # Copy the file flat, as save_pretrained does, block the package's own modules, and use it.
    (tmp_path / "motion_tokenizer.py").write_bytes(
        (ROOT / "processing_vipa" / "motion_tokenizer.py").read_bytes()
    )
    code = textwrap.dedent(
        """
        import sys
        for name in ("hand3d_dataset", "processing_vipa", "modeling_vipa", "training"):
            sys.modules[name] = None
        import numpy as np
        import motion_tokenizer as mt
        tok = mt.MotionTokenizer()
        enc = tok.encode(np.array([[0.25, -0.25, 0.75]]))
        print(enc.ids.tolist())
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[768, 256, 768]"  # 0.75 * 1024, 0.25 * 1024, 0.75 * 1024


def test_throughput_smoke():
    # the benchmark reports the real numbers; this only guards against an accidental Python loop
    import time

    xyz = np.random.default_rng(0).uniform(-0.6, 1.1, (200_000, 3))
    t0 = time.perf_counter()
    ids, _ = TOK.encode_ids(xyz)
    xyz_back = TOK.decode_ids(ids)
    dt = time.perf_counter() - t0
    assert xyz_back.shape == xyz.shape
    assert dt < 1.0, f"encode+decode of 200k waypoints took {dt:.2f}s"


@settings(max_examples=100, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 30).map(lambda n: 3 * n)), elements=st.integers(0, 1023)))
def test_clean_and_spaced_text_decode_alike(ids):
    # clean text takes the string-splitting fast path, spaced text the general parser: same answer
    clean = TOK.ids_to_text(ids)
    spaced = clean.replace("><", "> <")
    a, b = TOK.decode_text(clean), TOK.decode_text(spaced)
    np.testing.assert_array_equal(a.ids, ids)
    np.testing.assert_array_equal(b.ids, ids)
    np.testing.assert_array_equal(a.xyz, b.xyz)


@pytest.mark.parametrize(
    "text",
    [
        "<motion><motion_><motion_1><motion_2></motion>",
        "<motion><motion_99999999999999999999><motion_1><motion_2></motion>",
        "<motion><motion_1>x<motion_2><motion_3></motion>",
        "<motion><motion_\u0661><motion_1><motion_2></motion>",  # an Arabic-Indic digit
        "<motion><motion_1><motion_2><motion_-3></motion>",
    ],
)
def test_odd_text_is_rejected_in_strict_mode(text):
    with pytest.raises(ValueError, match="text"):
        TOK.decode_text(text)
