"""The closed-loop runner on a scripted stand-in environment (no simulator): Wilson intervals against the roots of
their defining equation, success per task / group / overall by hand, resume from the episode records, faults of
the environment and of the policy recorded per episode (raise, NaN, timeout, a server that answers garbage or
does not answer), and the MP4 of the first episode decoded back."""

from __future__ import annotations

import json
import math
import time

import av
import numpy as np
import pytest
from scipy.optimize import brentq

import evaluation.rollout as rollout
from evaluation.envs import ENVIRONMENTS
from evaluation.policy import EmbodimentSpec
from evaluation.rollout import (
    PolicySpec,
    RolloutConfig,
    _Policy,
    evaluate_policies,
    evaluate_policy,
    run_episode,
    summarize,
    wilson_interval,
)
from evaluation.server import PolicyServer

CAM = "observation.images.image"


class LineEnv:
    """A 1-D task: the state's x moves by action[0] / 2 per step; success once x >= 1 (two full pushes)."""

    def __init__(self, task: str, max_steps: int, raise_seed: int | None, image_size: int) -> None:
        self.task, self.max_steps, self.raise_seed, self.size = task, max_steps, raise_seed, image_size
        self.x, self.seed, self.steps = 0.0, None, 0

    def _obs(self) -> dict:
        image = np.full((self.size, self.size, 3), int(min(self.x, 1.0) * 200), np.uint8)
        return {
            CAM: image,
            "observation.state": np.array([self.x, 0, 0, 0], np.float32),
            "task": "push right",
        }

    def reset(self, seed: int) -> dict:
        self.x, self.seed, self.steps = 0.0, seed, 0
        return self._obs()

    def step(self, action):
        if self.seed == self.raise_seed and self.steps == 1:
            raise RuntimeError("simulator exploded")
        action = np.asarray(action)
        if not np.isfinite(action).all():
            raise ValueError("non-finite")
        self.x += float(np.clip(action[0], -1, 1)) / 2
        self.steps += 1
        success = self.x >= 1.0
        return (
            self._obs(),
            float(self.x),
            success,
            self.steps >= self.max_steps,
            {"clipped": abs(action[0]) > 1},
        )

    def close(self) -> None:
        pass


class LineSuite:
    name, camera_keys, state_dim, action_dim, fps = "line", [CAM], 4, 4, 10
    GROUPS = {"g": ("a", "b")}

    def __init__(self, image_size: int = 16, max_steps: int = 6, raise_seed: int | None = None) -> None:
        self.image_size, self.max_steps, self.raise_seed = image_size, max_steps, raise_seed

    def resolve_tasks(self, spec: str):
        out = []
        for name in spec.split(","):
            if name in self.GROUPS:
                out += [(name, t) for t in self.GROUPS[name]]
            elif name in ("a", "b", "c"):
                out.append((name, name))
            else:
                raise ValueError(f"tasks: unknown {name!r}")
        return out

    def instruction(self, task: str) -> str:
        return "push right"

    def make(self, task: str, **options) -> LineEnv:
        return LineEnv(task, self.max_steps, self.raise_seed, self.image_size)

    def expert(self, task: str):
        return lambda env: np.array([1.0, 0, 0, 0], np.float32)


@pytest.fixture(autouse=True)
def line_suite(monkeypatch):
    monkeypatch.setitem(ENVIRONMENTS, "line", "tests.test_rollout:LineSuite")


def cfg(tmp_path, **kw) -> RolloutConfig:
    values = dict(
        out=str(tmp_path / "eval"), env="line", tasks="g", episodes=3, seed=10, image_size=16, progress=False
    )
    values.update(kw)
    return RolloutConfig(**values)


# ---- statistics ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, n", [(0, 5), (3, 10), (10, 10), (1, 1), (47, 50)])
def test_wilson_interval_solves_its_equation(k, n) -> None:
    """The Wilson bounds are the p with |k/n - p| = z sqrt(p (1 - p) / n)."""
    z, phat = 1.959963984540054, k / n

    def f(p):
        return (phat - p) ** 2 - z * z * p * (1 - p) / n

    inside = min(max(phat, 1e-9), 1 - 1e-9)  # f < 0 strictly between the roots
    lo = 0.0 if k == 0 else brentq(f, 1e-12, inside)
    hi = 1.0 if k == n else brentq(f, inside, 1 - 1e-12)
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-9) and got[1] == pytest.approx(hi, abs=1e-9)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes/n"):
        wilson_interval(4, 3)


def test_summarize_by_hand() -> None:
    records = [
        {"task": "a", "group": "g", "success": True, "steps": 2},
        {"task": "a", "group": "g", "success": False, "steps": 6, "error": "nan_action: x"},
        {"task": "b", "group": "g", "success": True, "steps": 4},
        {"task": "c", "group": "h", "success": False, "steps": 6, "error": "timeout: over 1 s"},
    ]
    s = summarize(records)
    assert s["per_task"]["a"]["successes"] == 1 and s["per_task"]["a"]["n"] == 2
    assert s["per_task"]["a"]["mean_steps_success"] == 2.0
    assert s["per_group"]["g"]["successes"] == 2 and s["per_group"]["g"]["n"] == 3
    assert s["overall"]["success_rate"] == 0.5 and s["overall"]["errors"] == 2
    assert s["error_kinds"] == {"nan_action": 1, "timeout": 1}
    assert s["overall"]["ci95"] == list(wilson_interval(2, 4))


# ---- runs ------------------------------------------------------------------------------------------------------
def test_expert_and_noop_on_the_same_seeds(tmp_path) -> None:
    result = evaluate_policies([PolicySpec("expert"), PolicySpec("noop")], cfg(tmp_path))
    expert, noop = result["summaries"]["scripted expert"], result["summaries"]["no-op"]
    assert expert["overall"]["successes"] == 6 and noop["overall"]["successes"] == 0
    assert [r["steps"] for r in expert["records"]] == [2] * 6 and [r["steps"] for r in noop["records"]] == [
        6
    ] * 6
    assert [r["seed"] for r in expert["records"]] == [10, 11, 12] * 2 == [r["seed"] for r in noop["records"]]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["policies"]["scripted expert"]["per_group"]["g"]["success_rate"] == 1.0
    assert (tmp_path / "eval" / "success_per_task.png").stat().st_size > 1000
    assert "6/6 100%" in result["table"] and "0/6 0%" in result["table"]


def test_first_episode_video_decodes_to_every_frame(tmp_path) -> None:
    summary = evaluate_policy(PolicySpec("noop"), cfg(tmp_path, tasks="a", episodes=2, image_size=32))
    first, second = summary["records"]
    assert first["video"] and second["video"] is None
    with av.open(first["video"]) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == first["steps"] + 1 and frames[0].shape == (32, 32, 3)


def test_resume_runs_only_missing_episodes(tmp_path) -> None:
    c = cfg(tmp_path)
    first = evaluate_policy(PolicySpec("random", seed=3), c)
    (tmp_path / "eval" / "episodes" / "b" / "seed-000011.json").unlink()
    ran = []
    second = evaluate_policy(PolicySpec("random", seed=3), c, on_record=ran.append)
    assert [(r["task"], r["seed"]) for r in ran] == [("b", 11)]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(second["records"]) == strip(first["records"])  # the random floor is seeded per episode
    with pytest.raises(ValueError, match="other settings"):
        evaluate_policy(PolicySpec("random", seed=3), cfg(tmp_path, episodes=4))


def test_environment_fault_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(LineSuite.__init__, "__defaults__", (16, 6, 11))  # seed 11 raises at its second step
    summary = evaluate_policy(PolicySpec("expert"), cfg(tmp_path))
    errors = [r for r in summary["records"] if r["error"]]
    assert [(r["task"], r["seed"]) for r in errors] == [("a", 11), ("b", 11)]
    assert errors[0]["error"].startswith("env_error: step raised RuntimeError: simulator exploded")
    assert summary["overall"]["successes"] == 4 and summary["error_kinds"] == {"env_error": 2}


class _Const(_Policy):
    def __init__(self, action, sleep: float = 0.0) -> None:
        self.action, self.sleep = np.asarray(action, np.float32), sleep

    def act(self, observation, env):
        time.sleep(self.sleep)
        return self.action


def test_nan_actions_are_refused_and_counted() -> None:
    env = LineSuite().make("a")
    record = run_episode(env, _Const([math.nan, 0, 0, 0]), "g", 5, 0, action_dim=4)
    assert record["error"].startswith("nan_action") and record["steps"] == 0 and not record["success"]


def test_wrong_action_width_stops_the_run() -> None:
    env = LineSuite().make("a")
    with pytest.raises(ValueError, match=r"shape \(7,\); the environment takes \(4,\)"):
        run_episode(env, _Const(np.zeros(7)), "g", 5, 0, action_dim=4)


def test_hung_policy_times_out() -> None:
    env = LineSuite().make("a")
    tic = time.monotonic()
    record = run_episode(env, _Const([0.1, 0, 0, 0], sleep=30.0), "g", 5, 0, timeout_s=0.3, action_dim=4)
    assert record["error"] == "timeout: over 0.3 s" and time.monotonic() - tic < 5


def test_clipped_actions_are_counted() -> None:
    env = LineSuite().make("a")
    record = run_episode(env, _Const([3.0, 0, 0, 0]), "g", 5, 0, action_dim=4)
    assert record["success"] and record["steps"] == 2 and record["clipped_actions"] == 2


# ---- a policy server that misbehaves ---------------------------------------------------------------------------
class _ServedStub:
    """What PolicyServer needs from a policy: `spec`, `horizon`, `n_action_steps`, `predict_action_chunk`."""

    def __init__(self, chunk, action_dim: int = 4) -> None:
        self.spec = EmbodimentSpec("line", [CAM], state_dim=4, action_dim=action_dim)
        self.horizon, self.n_action_steps, self.chunk = 2, 2, chunk

    def predict_action_chunk(self, observation):
        return self.chunk(observation) if callable(self.chunk) else self.chunk


@pytest.fixture
def serve():
    servers = []

    def start(stub):
        server = PolicyServer(stub, port=0).start()
        servers.append(server)
        return f"127.0.0.1:{server.port}"

    yield start
    for s in servers:
        s.stop()


def test_server_policy_acts_like_the_same_actions_in_process(tmp_path, serve) -> None:
    address = serve(_ServedStub(np.array([[1, 0, 0, 0], [1, 0, 0, 0]], np.float32)))
    summary = evaluate_policy(PolicySpec("server", path=address), cfg(tmp_path))
    assert summary["overall"]["successes"] == 6 and all(r["steps"] == 2 for r in summary["records"])


def test_server_nan_actions_are_counted(tmp_path, serve) -> None:
    address = serve(_ServedStub(np.full((2, 4), np.nan, np.float32)))
    summary = evaluate_policy(PolicySpec("server", path=address), cfg(tmp_path))
    assert summary["error_kinds"] == {"nan_action": 6} and summary["overall"]["successes"] == 0


def test_server_garbage_stops_with_a_clear_message(tmp_path, serve) -> None:
    address = serve(_ServedStub(np.zeros(3, np.float32)))  # not an (H, A) chunk
    with pytest.raises(ValueError, match="without an \\(H, A\\) 'actions' array"):
        evaluate_policy(PolicySpec("server", path=address), cfg(tmp_path))


def test_server_failing_mid_run_is_a_policy_error(tmp_path, serve) -> None:
    def chunk(observation):
        if observation["observation.state"][0] > 0.2:
            raise RuntimeError("GPU fell off")
        return np.array([[0.5, 0, 0, 0], [0.5, 0, 0, 0]], np.float32)

    summary = evaluate_policy(PolicySpec("server", path=serve(_ServedStub(chunk))), cfg(tmp_path))
    assert summary["error_kinds"] == {"policy_error": 6}
    assert "inference failed: RuntimeError: GPU fell off" in summary["records"][0]["error"]


def test_server_for_another_robot_is_refused_before_any_episode(tmp_path, serve) -> None:
    address = serve(_ServedStub(np.zeros((2, 7), np.float32), action_dim=7))
    with pytest.raises(ValueError, match="outputs 7-D actions, the line environment takes 4"):
        evaluate_policy(PolicySpec("server", path=address), cfg(tmp_path))
    assert not (tmp_path / "eval" / "episodes").exists()


def test_server_down_is_a_clear_error(tmp_path, monkeypatch) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(rollout, "SERVER_WAIT_S", 0.5)
    with pytest.raises(ValueError, match=f"policy server 127.0.0.1:{port}: does not answer"):
        evaluate_policy(PolicySpec("server", path=f"127.0.0.1:{port}"), cfg(tmp_path))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: PolicySpec("magic"), "policy kind"),
        (lambda: PolicySpec("vipa"), "needs a path"),
        (lambda: PolicySpec("server", path="localhost"), "host:port"),
        (lambda: RolloutConfig(out="x", episodes=0), "episodes"),
        (lambda: RolloutConfig(out="x", seed=-1), "seed"),
        (lambda: RolloutConfig(out="x", episode_timeout_s=0), "episode_timeout_s"),
    ],
)
def test_bad_settings(build, match) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_checkpoint_that_does_not_fit_is_refused(tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    spec = EmbodimentSpec("libero", ["observation.images.agentview"], state_dim=8, action_dim=7)
    from evaluation.policy import PolicyConfigFile

    PolicyConfigFile({"libero": spec}, "libero").write(ckpt)
    with pytest.raises(ValueError, match="outputs 7-D actions.*8-D 'observation.state'.*agentview"):
        evaluate_policy(PolicySpec("vipa", path=str(ckpt)), cfg(tmp_path))
