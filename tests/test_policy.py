"""VipaPolicy: LeRobot-style observations in, actions in the dataset's units out; normalisation and padding checked
against the dataset's own stats.json by hand, the action queue, batches, numpy / torch, and bad observations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluation.policy import VipaPolicy
from tests.test_stage3 import TASK, episode_arrays, save_init, tiny_recipe, write_dataset
from training.stage3 import train_stage3

CAM = "observation.images.front"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A stage-3 output whose head is wider than the data (state 8 > 6, action 7 > 5): padding is exercised."""
    root = tmp_path_factory.mktemp("policy")
    write_dataset(root / "toy", [episode_arrays()])
    save_init(root / "init")
    recipe = tiny_recipe(max_steps=1, state_dim=8, action_dim=7)
    train_stage3(root / "init", root / "toy", root / "out", recipe=recipe)
    return root


def observation(t: int = 0):
    state, _, images = episode_arrays()
    return {CAM: images[t], "observation.state": state[t], "task": TASK}


class Spy:
    """Replaces `model.predict_action`: records its inputs, returns a fixed normalised chunk."""

    def __init__(
        self, policy: VipaPolicy, chunk: torch.Tensor | None = None, zero_noise: bool = False
    ) -> None:
        self.real, self.calls, self.chunk = policy.model.predict_action, [], chunk
        self.zero_noise = zero_noise
        policy.model.predict_action = self

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if self.zero_noise:  # the same start for every sample: a batch row must equal the sample alone
            head = self.real.__self__.config.action_head_config
            shape = (kwargs["state"].shape[0], head.horizon, head.action_dim)
            kwargs["noise"] = torch.zeros(shape, device=kwargs["state"].device)
            kwargs.pop("generator", None)
        if self.chunk is None:
            return self.real(**kwargs)
        return self.chunk.expand(kwargs["state"].shape[0], -1, -1).clone()


def test_state_normalised_and_padded_actions_unnormalised_by_hand(checkpoint) -> None:
    policy = VipaPolicy.from_pretrained(checkpoint / "out", device="cpu")
    stats = json.loads((checkpoint / "toy" / "meta" / "stats.json").read_text())
    s_mean, s_std = np.array(stats["observation.state"]["mean"]), np.array(stats["observation.state"]["std"])
    a_mean, a_std = np.array(stats["action"]["mean"]), np.array(stats["action"]["std"])
    z = torch.linspace(-2, 2, 4 * 7).reshape(1, 4, 7)  # the head's normalised output, 7 wide
    spy = Spy(policy, z)
    obs = observation(3)
    chunk = policy.predict_action_chunk(obs)
    state = spy.calls[0]["state"][0].numpy()
    np.testing.assert_allclose(
        state[:6], (obs["observation.state"] - s_mean) / (s_std + 1e-6), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(state[6:], 0.0)  # padded dimensions of the head
    expected = z[0, :, :5].numpy() * (a_std + 1e-6) + a_mean  # the extra 2 action dims are dropped
    assert chunk.shape == (4, 5) and isinstance(chunk, np.ndarray)
    np.testing.assert_allclose(chunk, expected, rtol=1e-5, atol=1e-5)


def test_select_action_pops_a_queue_of_n_action_steps(checkpoint) -> None:
    policy = VipaPolicy.from_pretrained(checkpoint / "out", device="cpu", n_action_steps=3, noise_seed=0)
    chunk = policy.predict_action_chunk(observation())
    spy = Spy(policy)
    policy.reset()
    taken = [policy.select_action(observation()) for _ in range(3)]
    assert len(spy.calls) == 1
    np.testing.assert_allclose(np.stack(taken), chunk[:3], rtol=1e-6, atol=1e-6)
    policy.select_action(observation())  # the queue ran empty: a new chunk
    assert len(spy.calls) == 2
    policy.reset()
    policy.select_action(observation())
    assert len(spy.calls) == 3


def test_batches_torch_and_channel_first_images(checkpoint) -> None:
    policy = VipaPolicy.from_pretrained(checkpoint / "out", device="cpu")
    Spy(policy, zero_noise=True)
    one, two = observation(0), observation(5)
    batch = {
        CAM: np.stack([one[CAM], two[CAM]]),
        "observation.state": np.stack([one["observation.state"], two["observation.state"]]),
        "task": [TASK, TASK],
    }
    chunks = policy.predict_action_chunk(batch)
    assert chunks.shape == (2, 4, 5)
    np.testing.assert_allclose(chunks[0], policy.predict_action_chunk(one), rtol=1e-5, atol=1e-5)
    # torch in, torch out; LeRobot's environment format: float (3, H, W) in [0, 1]
    as_torch = {
        CAM: torch.from_numpy(two[CAM]).permute(2, 0, 1).float() / 255.0,
        "observation.state": torch.from_numpy(two["observation.state"]),
        "task": TASK,
    }
    out = policy.predict_action_chunk(as_torch)
    assert isinstance(out, torch.Tensor) and out.shape == (4, 5)
    np.testing.assert_allclose(out.numpy(), chunks[1], rtol=1e-5, atol=1e-5)
    actions = policy.select_action(batch)
    assert actions.shape == (2, 5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o.pop(CAM), r"missing \['observation.images.front'\]"),
        (
            lambda o: o.update({"observation.state": np.zeros(7)}),
            r"expected \(6,\) or \(B, 6\).*got shape \(7,\)",
        ),
        (lambda o: o.update({"observation.state": np.full(6, np.nan)}), "NaN or inf"),
        (lambda o: o.update({"task": ["a", "b"]}), "2 instructions for a batch of 1"),
        (lambda o: o.update({CAM: np.zeros((32, 32))}), r"\(H, W, 3\) or \(3, H, W\)"),
        (lambda o: o.update({"task": ""}), "non-empty instruction"),
    ],
)
def test_bad_observations(checkpoint, change, message) -> None:
    policy = VipaPolicy.from_pretrained(checkpoint / "out", device="cpu")
    obs = observation()
    change(obs)
    with pytest.raises(ValueError, match=message):
        policy.predict_action_chunk(obs)


def test_batch_change_needs_reset_and_loading_errors(checkpoint) -> None:
    policy = VipaPolicy.from_pretrained(checkpoint / "out", device="cpu", n_action_steps=2)
    policy.select_action(observation())
    one = observation()
    batch = {
        CAM: np.stack([one[CAM]] * 2),
        "observation.state": np.stack([one["observation.state"]] * 2),
        "task": TASK,
    }
    with pytest.raises(ValueError, match="call reset"):
        policy.select_action(batch)
    with pytest.raises(ValueError, match="unnorm_key: 'libero' is not one of"):
        VipaPolicy.from_pretrained(checkpoint / "out", unnorm_key="libero")
    with pytest.raises(ValueError, match="not a stage-3 output"):
        VipaPolicy.from_pretrained(checkpoint / "init")
    with pytest.raises(ValueError, match="n_action_steps"):
        VipaPolicy.from_pretrained(checkpoint / "out", n_action_steps=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu(checkpoint) -> None:
    """The same chunk on the GPU (bf16 autocast where supported) as on the CPU, from the same (zero) noise."""
    cpu = VipaPolicy.from_pretrained(checkpoint / "out", device="cpu")
    gpu = VipaPolicy.from_pretrained(checkpoint / "out", device="cuda")
    Spy(cpu, zero_noise=True)
    Spy(gpu, zero_noise=True)
    a, b = cpu.predict_action_chunk(observation()), gpu.predict_action_chunk(observation())
    assert isinstance(b, np.ndarray) and b.shape == a.shape
    np.testing.assert_allclose(b, a, rtol=0.05, atol=0.05 * float(np.abs(a).max()))
