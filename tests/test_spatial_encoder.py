"""CUT3R encoder: parity with the official implementation (stored fixture), recurrence, padding, RoPE, poses.

The fixture `tests/fixtures/cut3r_small_*` holds random weights in the official key layout (CUT3R/CUT3R at
8bc15dc9, a small DPT config) and the outputs the official code computed for them on a 3-frame clip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from scipy.spatial.transform import Rotation

from modeling_vipa.configuration_cut3r import Cut3rConfig
from modeling_vipa.spatial_encoder import Cut3rEncoder, Cut3rRotaryEmbedding2D, pose_encoding_to_matrix
from training.convert_cut3r import convert_state_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HEAD_FIELDS = ("enc_num_heads", "ray_enc_num_heads", "dec_num_heads", "state_dec_num_heads")


def load_fixture_model() -> tuple[Cut3rEncoder, dict[str, np.ndarray]]:
    path = FIXTURES / "cut3r_small_reference.safetensors"
    with safe_open(str(path), "pt") as f:
        heads = {k: int(v) for k, v in f.metadata().items() if k in HEAD_FIELDS}
    weights, config = convert_state_dict(load_file(str(path)), **heads)
    model = Cut3rEncoder(config).eval()
    model.load_state_dict(weights, strict=True)
    return model, dict(np.load(FIXTURES / "cut3r_small_io.npz"))


def normalise(pixels_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> the reference's input scaling, [-1, 1]."""
    return (torch.from_numpy(pixels_uint8).float() / 255 - 0.5) / 0.5


@pytest.fixture(scope="module")
def fixture_model():
    return load_fixture_model()


def test_matches_official_implementation(fixture_model):
    model, ref = fixture_model
    with torch.no_grad():
        out = model(normalise(ref["pixels_uint8"]), return_world=True)
    for name in ("tokens", "pts3d_self", "conf", "camera_pose", "conf_world"):
        ours = getattr(out, name).numpy()
        assert ours.shape == ref[name].shape, name
        np.testing.assert_allclose(ours, ref[name], atol=1e-5, rtol=0, err_msg=name)
    # The clip really is recurrent: frames 1, 2 are not what they would be as first frames.
    with torch.no_grad():
        alone = model(normalise(ref["pixels_uint8"][:, 2:3]))
    assert np.abs(alone.tokens[:, 0].numpy() - ref["tokens"][:, 2]).max() > 1e-3


def test_padding_frames_do_not_touch_the_state(fixture_model):
    model, ref = fixture_model
    pixels = normalise(ref["pixels_uint8"])  # (2, 3, 3, H, W)
    # Clip 0 = frames (0, 1) then padding; clip 1 = padding, then frames (0, 1) of clip 1.
    batch = torch.stack([pixels[0], torch.cat([torch.zeros_like(pixels[1, :1]), pixels[1, :2]])])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    with torch.no_grad():
        out = model(batch, frame_mask=mask)
        clip0 = model(pixels[:1, :2])
        clip1 = model(pixels[1:, :2])
    for name in ("tokens", "pts3d_self", "conf", "camera_pose"):
        got = getattr(out, name)
        torch.testing.assert_close(got[0, :2], getattr(clip0, name)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1, 1:], getattr(clip1, name)[0], atol=1e-5, rtol=0)
        assert got[0, 2].abs().max() == 0 and got[1, 0].abs().max() == 0, name


def test_each_call_starts_from_the_initial_state_and_heads_are_optional(fixture_model):
    model, ref = fixture_model
    pixels = normalise(ref["pixels_uint8"])
    with torch.no_grad():
        first = model(pixels)
        light = model(pixels, return_heads=False)
    np.testing.assert_allclose(first.tokens.numpy(), ref["tokens"], atol=1e-5, rtol=0)
    torch.testing.assert_close(light.tokens, first.tokens, atol=0, rtol=0)
    assert light.pts3d_self is None and light.conf is None and light.camera_pose is None


def test_rope_is_a_rotation_of_channel_pairs():
    """Independent form: channel pairs (j, j + Q) of each half as complex numbers times exp(i pos theta_j)."""
    torch.manual_seed(0)
    base, D = 100.0, 16
    x = torch.randn(2, 3, 5, D, dtype=torch.float64)
    pos = torch.tensor([[[-1, -1], [0, 0], [0, 3], [2, 1], [7, 5]]] * 2)
    got = Cut3rRotaryEmbedding2D(base)(x.float(), pos).double()
    Q = D // 4
    theta = base ** (-np.arange(Q) / Q)
    want = np.empty(x.shape)
    for axis in range(2):
        half = x[..., axis * D // 2 : (axis + 1) * D // 2].numpy()
        z = (half[..., :Q] + 1j * half[..., Q:]) * np.exp(1j * pos[:, None, :, axis, None].numpy() * theta)
        want[..., axis * D // 2 : (axis + 1) * D // 2] = np.concatenate([z.real, z.imag], axis=-1)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_pose_encoding_to_matrix_matches_scipy():
    rng = np.random.default_rng(0)
    q = Rotation.random(4, random_state=1).as_quat(scalar_first=True)
    t = rng.normal(size=(4, 3))
    T = pose_encoding_to_matrix(torch.from_numpy(np.concatenate([t, q], axis=1))).numpy()
    np.testing.assert_allclose(T[:, :3, :3], Rotation.from_quat(q, scalar_first=True).as_matrix(), atol=1e-12)
    np.testing.assert_allclose(T[:, :3, 3], t)
    np.testing.assert_allclose(T[:, 3], np.tile([0, 0, 0, 1.0], (4, 1)))
    with pytest.raises(ValueError, match="camera_pose"):
        pose_encoding_to_matrix(torch.zeros(4, 6))


def test_pose_output_is_a_unit_quaternion_with_non_negative_real_part(fixture_model):
    model, ref = fixture_model
    with torch.no_grad():
        pose = model(normalise(ref["pixels_uint8"])).camera_pose
    np.testing.assert_allclose(pose[..., 3:].norm(dim=-1).numpy(), 1.0, atol=1e-6)
    assert (pose[..., 3] >= 0).all()


def test_tiny_config_shapes_and_save_reload(tmp_path):
    torch.manual_seed(0)
    model = Cut3rEncoder(Cut3rConfig.tiny()).eval()
    x = torch.randn(2, 2, 3, 64, 32)
    with torch.no_grad():
        out = model(x)
    assert out.tokens.shape == (2, 2, 1 + 4 * 2, model.config.hidden_size)
    assert out.pts3d_self.shape == (2, 2, 64, 32, 3) and out.conf.shape == (2, 2, 64, 32)
    assert out.camera_pose.shape == (2, 2, 7) and (out.conf >= 1).all()
    model.save_pretrained(tmp_path)
    reloaded = Cut3rEncoder.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).pts3d_self, out.pts3d_self, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("pixels", "mask", "match"),
    [
        (torch.zeros(2, 3, 64, 64), None, "pixel_values"),
        (torch.zeros(1, 2, 3, 60, 64), None, "multiples of patch_size"),
        (torch.full((1, 2, 3, 64, 64), float("nan")), None, "NaN"),
        (torch.zeros(1, 2, 3, 64, 64), torch.ones(1, 3, dtype=torch.bool), "frame_mask"),
        (torch.zeros(1, 2, 3, 64, 64), torch.ones(1, 2), "frame_mask"),
    ],
)
def test_bad_inputs_raise(pixels, mask, match):
    model = Cut3rEncoder(Cut3rConfig.tiny())
    with pytest.raises(ValueError, match=match):
        model(pixels, frame_mask=mask)


def test_config_validation_and_round_trip():
    config = Cut3rConfig()
    assert (config.hidden_size, config.state_size, config.enc_depth, config.dec_depth) == (768, 768, 24, 12)
    assert Cut3rConfig.from_dict(Cut3rConfig.tiny().to_dict()).dpt_layer_dims == (8, 16, 16, 32)
    with pytest.raises(ValueError, match="enc_num_heads"):
        Cut3rConfig(enc_num_heads=5)
    with pytest.raises(ValueError, match="head_type"):
        Cut3rConfig(head_type="linear")
    with pytest.raises(ValueError, match="dpt_layer_dims"):
        Cut3rConfig(dpt_layer_dims=(1, 2, 3))
