"""The LIBERO client: conventions checked by hand (axis-angle against scipy, the 180-degree flip against
np.rot90), tasks, caps and errors without LIBERO; then, where `.venv-libero` exists (built by
evaluation/envs/libero/setup_venv.sh; skipped with that reason elsewhere), one task of each suite stepped
through a tiny stage-3 policy served by `vipa-serve` on loopback, the observations the server received compared
with the environment's own values, the action convention checked on the end effector, and `vipa-eval --env
libero` writing Meta-World's record format."""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from evaluation.envs.libero import LiberoConfig, LiberoSuite, libero_python
from evaluation.envs.libero.sim import flip_image, quat_to_axis_angle, state_from_raw
from evaluation.envs.libero.worker import read_frame, write_frame

REPO = Path(__file__).resolve().parents[1]


def _venv_python() -> str | None:
    try:
        return libero_python()
    except ImportError:
        return None


LIBERO_PY = _venv_python()
needs_libero = pytest.mark.skipif(
    LIBERO_PY is None,
    reason="no LIBERO environment: build .venv-libero with evaluation/envs/libero/setup_venv.sh "
    "(~810 MB download, ~1 min here) or set VIPA_LIBERO_PYTHON",
)


# ---- conventions, by hand ------------------------------------------------------------------------------------
def test_axis_angle_is_robosuites_convention_checked_with_scipy() -> None:
    rng = np.random.default_rng(0)
    quats = rng.normal(size=(200, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)  # both signs of w: angles over (0, 2 pi)
    for q in quats:
        aa = quat_to_axis_angle(q)
        # the same rotation as the quaternion (scipy reads (x, y, z, w) too)
        np.testing.assert_allclose(
            Rotation.from_rotvec(aa).as_matrix(), Rotation.from_quat(q).as_matrix(), atol=1e-9
        )
        # and not reduced to [0, pi]: the angle is 2 acos(w) as the LIBERO datasets were written
        assert math.isclose(np.linalg.norm(aa), 2 * math.acos(q[3]), abs_tol=1e-9)
    assert np.linalg.norm(quat_to_axis_angle(np.array([0.0, 0.0, -0.6, -0.8]))) > math.pi
    np.testing.assert_array_equal(quat_to_axis_angle(np.array([0.0, 0.0, 0.0, 1.0])), np.zeros(3))


def test_state_and_flip_by_hand() -> None:
    q = Rotation.from_euler("xyz", [0.3, -0.2, 2.5]).as_quat()  # (x, y, z, w)
    raw = {
        "robot0_eef_pos": np.array([0.1, -0.2, 1.1]),
        "robot0_eef_quat": q,
        "robot0_gripper_qpos": np.array([0.03, -0.029]),
    }
    state = state_from_raw(raw)
    assert state.dtype == np.float32 and state.shape == (8,)
    np.testing.assert_allclose(state[:3], [0.1, -0.2, 1.1], rtol=1e-6)
    np.testing.assert_allclose(
        Rotation.from_rotvec(state[3:6]).as_quat(canonical=True),
        Rotation.from_quat(q).as_quat(canonical=True),
        atol=1e-6,
    )
    np.testing.assert_allclose(state[6:], [0.03, -0.029], rtol=1e-6)
    image = np.random.default_rng(1).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    flipped = flip_image(image)
    np.testing.assert_array_equal(flipped, np.rot90(image, 2))
    assert flipped.flags.c_contiguous and flipped[0, 0].tolist() == image[4, 6].tolist()


def test_tasks_groups_caps_and_cameras() -> None:
    suite = LiberoSuite(image_size=64)
    pairs = suite.resolve_tasks("libero")
    assert len(pairs) == 40 and [g for g, _ in pairs[::10]] == [
        "libero_spatial",
        "libero_object",
        "libero_goal",
        "libero_10",
    ]
    assert suite.resolve_tasks("long,libero_10-3,goal")[:2] == [
        ("libero_10", "libero_10-0"),
        ("libero_10", "libero_10-1"),
    ]
    assert len(suite.resolve_tasks("long,libero_10-3,goal")) == 20  # duplicates dropped
    caps = {
        s: suite.make(f"{s}-0").max_steps
        for s in ("libero_spatial", "libero_object", "libero_goal", "libero_10")
    }
    assert caps == {"libero_spatial": 280, "libero_object": 280, "libero_goal": 300, "libero_10": 520}
    assert suite.make("libero_goal-9", max_steps=7).max_steps == 7
    assert suite.camera_keys == [
        "observation.images.image", "observation.images.image2", "observation.images.wrist_image",
    ]  # fmt: skip
    assert LiberoSuite(camera="agentview").camera_keys == ["observation.images.image"]
    assert (suite.state_dim, suite.action_dim) == (8, 7)
    assert suite.expert("libero_goal-0") is None


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: LiberoSuite().resolve_tasks("libero_goal-10"),
            "unknown LIBERO task or suite 'libero_goal-10'",
        ),
        (lambda: LiberoSuite().resolve_tasks("drawer-open-v3"), "suites: "),
        (lambda: LiberoSuite().make("libero_spatial"), "<suite>-<i>"),
        (lambda: LiberoConfig(camera="front"), "camera: expected 'agentview'"),
        (lambda: LiberoConfig(image_size=8), "image_size"),
        (lambda: LiberoConfig(max_steps=0), "max_steps"),
        (lambda: LiberoConfig(backend="docker"), "backend"),
    ],
)
def test_bad_options(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_missing_environment_says_how_to_build_it(tmp_path) -> None:
    suite = LiberoSuite(python=str(tmp_path / "nope" / "python"))
    with pytest.raises(ImportError, match=r"setup_venv\.sh.*VIPA_LIBERO_PYTHON"):
        suite.instruction("libero_goal-0")


def test_init_states_fall_back_to_a_full_unpickle_for_official_libero(tmp_path) -> None:
    """hf-libero's get_task_init_states is torch.load with PyTorch's default weights_only=True, which refuses
    LIBERO's pickled arrays; the fallback reads LIBERO's own file without that restriction."""
    import pickle
    from types import SimpleNamespace

    import torch

    from evaluation.envs.libero.sim import load_init_states

    states = np.random.default_rng(0).normal(size=(50, 92))
    (tmp_path / "libero_goal").mkdir()
    torch.save(states, tmp_path / "libero_goal" / "task.pruned_init")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "libero_goal" / "task.pruned_init")  # what the official package does

    class Official:
        def get_task(self, i):
            return SimpleNamespace(problem_folder="libero_goal", init_states_file="task.pruned_init")

        def get_task_init_states(self, i):
            return torch.load(tmp_path / "libero_goal" / "task.pruned_init")

    np.testing.assert_array_equal(load_init_states(Official(), 0, str(tmp_path)), states)
    bundled = SimpleNamespace(get_task_init_states=lambda i: states[:3].tolist())
    np.testing.assert_array_equal(load_init_states(bundled, 0, str(tmp_path)), states[:3])
    with pytest.raises(ValueError, match=r"expected \(N, D\) MuJoCo states"):
        load_init_states(SimpleNamespace(get_task_init_states=lambda i: np.zeros(5)), 0, str(tmp_path))


def test_worker_frames_by_hand() -> None:
    stream = io.BytesIO()
    write_frame(stream, b"abc")
    write_frame(stream, b"")
    assert stream.getvalue() == struct.pack(">I", 3) + b"abc" + b"\x00\x00\x00\x00"
    stream.seek(0)
    assert read_frame(stream) == b"abc" and read_frame(stream) == b"" and read_frame(stream) is None
    assert read_frame(io.BytesIO(struct.pack(">I", 5) + b"ab")) is None  # truncated: the worker is gone


def test_worker_process_without_libero_reports_it_and_restarts_after_a_crash() -> None:
    """The worker protocol end to end with an interpreter that has no LIBERO (this one): the import error
    comes back as the request's error, the process keeps serving, and a killed worker is replaced."""
    import sys

    suite = LiberoSuite(python=sys.executable, backend="process")
    with pytest.raises(RuntimeError, match="simulator error: ModuleNotFoundError: No module named 'libero'"):
        suite.describe("libero_goal")
    worker = suite._backend
    first = worker.proc.pid
    with pytest.raises(ValueError, match="unknown request 'nope'"):
        worker.request({"cmd": "nope"})  # the same process still answers
    assert worker.proc.pid == first
    worker.proc.kill()
    worker.proc.wait()
    with pytest.raises(ValueError, match="unknown request"):
        worker.request({"cmd": "nope"})  # a fresh worker took over
    assert worker.proc.pid != first
    proc = worker.proc
    suite.close()
    assert proc.poll() is not None  # the worker ended with its suite


# ---- the real simulator through vipa-serve -------------------------------------------------------------------
SUITE_TASKS = ("libero_spatial-0", "libero_object-0", "libero_goal-0", "libero_10-0")


class _Recorder:
    """A served policy that keeps every observation the server received."""

    def __init__(self, policy) -> None:
        self.policy, self.spec = policy, policy.spec
        self.horizon, self.n_action_steps = policy.horizon, policy.n_action_steps
        self.seen: list[dict] = []

    def predict_action_chunk(self, observation):
        self.seen.append(observation)
        return self.policy.predict_action_chunk(observation)


def build_libero_checkpoint(root: Path) -> Path:
    """A tiny stage-3 checkpoint (`root/ckpt`) on a LIBERO-shaped dataset: the agent view and the wrist as
    `observation.images.image` / `image2`, 8-D state, 7-D actions (one training step: only the shapes matter)."""
    from tests.tiny_assets import build_tiny_model, build_tiny_processor
    from training.lerobot_writer import LeRobotV3Writer
    from training.stage3 import load_stage3_recipe, train_stage3

    features = {
        "observation.images.image": {"dtype": "image", "shape": [32, 32, 3], "names": None},
        "observation.images.image2": {"dtype": "image", "shape": [32, 32, 3], "names": None},
        "observation.state": {"dtype": "float32", "shape": [8], "names": None},
        "action": {"dtype": "float32", "shape": [7], "names": None},
    }
    rng = np.random.default_rng(0)
    writer = LeRobotV3Writer.create(root / "libero", fps=20, features=features, use_videos=False)
    for _ in range(6):
        writer.add_frame(
            {
                "observation.images.image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                "observation.images.image2": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                "observation.state": rng.normal(size=8).astype(np.float32),
                "action": rng.uniform(-1, 1, 7).astype(np.float32),
            },
            task="pick up the bowl",
        )
    writer.save_episode()
    writer.finalize()
    processor = build_tiny_processor(norm_stats={})
    model = build_tiny_model(processor, seed=0)
    model.save_pretrained(root / "init")
    processor.save_pretrained(root / "init")
    train_stage3(
        root / "init", root / "libero", root / "ckpt", recipe=load_stage3_recipe("cpu-tiny", max_steps=1)
    )
    return root / "ckpt"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny LIBERO-shaped checkpoint behind `vipa-serve`'s server on loopback, recording what it receives."""
    from evaluation.policy import VipaPolicy
    from evaluation.server import PolicyServer

    root = build_libero_checkpoint(tmp_path_factory.mktemp("libero"))
    recorder = _Recorder(VipaPolicy.from_pretrained(root, device="cpu", noise_seed=0))
    server = PolicyServer(recorder, host="127.0.0.1", port=0).start()
    yield recorder, server
    server.stop()


@needs_libero
@pytest.mark.slow
def test_each_suite_steps_through_the_server_with_lerobots_conventions(served) -> None:
    from evaluation.rollout import PolicySpec, make_policy, run_episode

    recorder, server = served
    suite = LiberoSuite(image_size=64, raw=True, max_steps=3)
    policy = make_policy(PolicySpec("server", path=f"127.0.0.1:{server.port}"), suite)
    for task in SUITE_TASKS:
        env = suite.make(task)
        recorder.seen.clear()
        seed = 53  # initial state 53 % 50 = 3
        record = run_episode(env, policy, task.rsplit("-", 1)[0], seed, 0, timeout_s=600, action_dim=7)
        assert record["error"] is None, record["error"]
        assert record["steps"] == 3 and env.init_state == 3 and record["seed"] == 53
        assert env.episode_fields() == {
            "suite": task.rsplit("-", 1)[0],
            "task_id": 0,
            "task_name": env.name,
            "init_state": 3,
        }
        # the first observation the server received: the settled initial state, as the environment has it
        seen = recorder.seen[0]
        raw = env.reset_raw
        assert seen["task"] == env.instruction and len(seen["task"]) > 10
        for key, view in (
            ("observation.images.image", "agentview"),
            ("observation.images.image2", "wrist"),
            ("observation.images.wrist_image", "wrist"),
        ):
            assert seen[key].dtype == np.uint8 and seen[key].shape == (64, 64, 3)
            np.testing.assert_array_equal(seen[key], np.rot90(raw["images"][view], 2))  # both axes flipped
        state = seen["observation.state"]
        assert state.dtype == np.float32 and state.shape == (8,)
        np.testing.assert_allclose(state[:3], raw["eef_pos"], rtol=1e-6)
        np.testing.assert_allclose(state[6:], raw["gripper_qpos"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            Rotation.from_rotvec(state[3:6]).as_matrix(),
            Rotation.from_quat(raw["eef_quat"]).as_matrix(),
            atol=1e-5,
        )
        assert math.isclose(
            np.linalg.norm(state[3:6]), 2 * math.acos(np.clip(raw["eef_quat"][3], -1, 1)), abs_tol=1e-5
        )

    # 7-D actions: +x moves the end effector along world +x; +1 on the gripper closes the fingers
    env = suite.make("libero_spatial-0", max_steps=50)
    state0 = env.reset(0)["observation.state"]
    for _ in range(4):
        obs, *_ = env.step(np.array([1.0, 0, 0, 0, 0, 0, 1.0]))
    dx = obs["observation.state"][:3] - state0[:3]
    assert dx[0] > 0.01 and abs(dx[0]) > 3 * max(abs(dx[1]), abs(dx[2])), dx
    assert obs["observation.state"][6] - obs["observation.state"][7] < state0[6] - state0[7] - 0.005
    _, _, _, _, info = env.step(np.array([2.0, 0, 0, 0, 0, 0, -1.0]))
    assert info["clipped"] and info["init_state"] == 0
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.array([np.nan] * 7))
    suite.close()


@needs_libero
@pytest.mark.slow
def test_vipa_eval_env_libero_writes_metaworlds_records(served, tmp_path, monkeypatch) -> None:
    from evaluation import envs
    from evaluation.cli import main

    recorder, server = served
    monkeypatch.setitem(envs.ENVIRONMENTS, "libero", "evaluation.envs.libero:LiberoSuite")
    out = tmp_path / "eval"
    argv = [
        "--env", "libero", "--policy", f"server:127.0.0.1:{server.port}", "--tasks", "libero_goal-1",
        "--episodes", "1", "--seed", "0", "--max-steps", "2", "--image-size", "32", "--references", "",
        "--videos", "1", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    (summary_path,) = out.glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    (record,) = summary["records"]
    assert record["task"] == "libero_goal-1" and record["group"] == "libero_goal" and record["seed"] == 0
    assert record["error"] is None and record["steps"] == 2 and record["success"] is False
    assert summary["overall"]["n"] == 1 and summary["overall"]["ci95"][0] == 0.0
    assert Path(record["video"]).is_file()
    episode = summary_path.parent / "episodes" / "libero_goal-1" / "seed-000000.json"
    assert json.loads(episode.read_text()) == record
    assert main(argv) == 0  # resumed: the record is read back, nothing reruns
    assert json.loads(episode.read_text()) == record
