"""vipa-serve and its torch-free client on loopback: the same actions as an in-process call, a health check, errors
that keep the connection, the numpy codec, and the `vipa-serve` command in its own process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from evaluation.policy import VipaPolicy
from evaluation.policy_client import PolicyClient, PolicyServerError, pack, unpack
from evaluation.server import PolicyServer
from tests.test_stage3 import TASK, episode_arrays, save_init, tiny_recipe, write_dataset
from training.stage3 import train_stage3

CAM = "observation.images.front"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    write_dataset(root / "toy", [episode_arrays()])
    save_init(root / "init")
    train_stage3(root / "init", root / "toy", root / "out", recipe=tiny_recipe(max_steps=1))
    return root / "out"


def observation(t: int = 0) -> dict:
    state, _, images = episode_arrays()
    return {CAM: images[t], "observation.state": state[t], "task": TASK}


@pytest.fixture(scope="module")
def served(checkpoint):
    policy = VipaPolicy.from_pretrained(checkpoint, device="cpu", noise_seed=7)
    server = PolicyServer(policy, host="127.0.0.1", port=0).start()
    yield policy, server
    server.stop()


def test_client_gets_the_in_process_actions(served) -> None:
    policy, server = served
    with PolicyClient("127.0.0.1", server.port) as client:
        assert client.metadata["camera_keys"] == [CAM] and client.metadata["action_dim"] == 5
        for t in (0, 4):
            reply = client.infer(observation(t))
            expected = policy.predict_action_chunk(observation(t))
            assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (4, 5)
            np.testing.assert_array_equal(reply["actions"], expected)
            assert reply["server_timing"]["infer_ms"] > 0


def test_health_and_bad_input_keep_the_connection(served) -> None:
    _, server = served
    client = PolicyClient("127.0.0.1", server.port)
    health = client.health()
    assert health["status"] == "ok" and health["unnorm_key"] == "toy"
    bad = observation()
    bad["observation.state"] = np.zeros(9, np.float32)
    with pytest.raises(PolicyServerError, match=r"bad observation: .*expected \(6,\)"):
        client.infer(bad)
    with pytest.raises(PolicyServerError, match="NaN or inf"):
        client.infer({**observation(), "observation.state": np.full(6, np.nan, np.float32)})
    assert client.infer(observation())["actions"].shape == (4, 5)  # same connection, still serving
    assert client.health()["errors"] >= 2
    client.close()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8),
        np.array([True, False]),
        np.arange(5, dtype=">i8"),  # big-endian in, the same values out
        np.array(2.5),  # 0-d
        np.zeros((0, 3), np.float64),
        np.arange(6, dtype=np.float64).reshape(2, 3).T,  # not C-contiguous
    ],
)
def test_codec_round_trip(array) -> None:
    out = unpack(pack({"x": array, "n": np.int64(3), "s": "text", "nested": [array]}))
    assert out["n"] == 3 and out["s"] == "text"
    for got in (out["x"], out["nested"][0]):
        assert got.shape == array.shape and got.dtype.kind == array.dtype.kind
        np.testing.assert_array_equal(got, array)
        assert got.flags.writeable


def test_codec_rejects_objects() -> None:
    with pytest.raises(TypeError, match="dtype object"):
        pack({"x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(TypeError, match="cannot send"):
        pack({"x": object()})


def test_client_imports_no_torch() -> None:
    code = "import sys, evaluation.policy_client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_vipa_serve_command_on_loopback(checkpoint) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "evaluation.server",
        "--policy",
        str(checkpoint),
        "--port",
        str(port),
        "--seed",
        "7",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = PolicyClient("127.0.0.1", port, timeout=60)
        client.wait_until_ready(timeout=90)
        reply = client.infer(observation(2))
        expected = VipaPolicy.from_pretrained(checkpoint, device="cpu", noise_seed=7).predict_action_chunk(
            observation(2)
        )
        np.testing.assert_allclose(reply["actions"], expected, rtol=1e-5, atol=1e-6)
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
