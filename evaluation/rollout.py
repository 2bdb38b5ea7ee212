"""Closed-loop rollouts: a policy acts in an environment suite over fixed seeds; success per task, per group and
overall with 95 % Wilson intervals, one JSON record per episode, MP4 videos of the first episodes of each task.

    from evaluation.rollout import PolicySpec, RolloutConfig, evaluate_policy
    cfg = RolloutConfig(env="metaworld", tasks="drawer-open-v3,reach-v3", episodes=10, seed=1000, out="eval/")
    summary = evaluate_policy(PolicySpec("vipa", path="runs/stage3"), cfg)
    summary["overall"]          # {"n": 20, "successes": 17, "success_rate": 0.85, "ci95": [0.64, 0.95], ...}
    # the same from the shell: vipa-eval --policy runs/stage3 --env metaworld --tasks drawer-open-v3,reach-v3

Policies (`PolicySpec.kind`): `vipa` (a stage-3 checkpoint through `evaluation.policy.VipaPolicy`), `server` (a
`vipa-serve` at `host:port` through the torch-free client), and the references every table shows: `expert`
(the suite's scripted policy: the ceiling), `noop` (zero actions) and `random` (uniform in [-1, 1]: the floor).

Episode k of a task uses seed `cfg.seed + k`: the seed fixes the scene (object and goal positions), so two
policies evaluated with the same `seed` and `episodes` meet the same scenes and their results pair by seed.
An episode ends at the first success (LeRobot's convention) or at `max_steps`.

Faults: an environment or policy that raises mid-episode, a non-finite action (refused, never clipped) and an
episode over `episode_timeout_s` are recorded as that episode's `error` (a failure in the success rate, counted
apart in `errors`) and the run goes on; a policy that does not fit the suite (action or state width, cameras)
or a server that does not answer is a `ValueError` before the first episode. Finite actions outside [-1, 1]
are clipped by the environment and counted (`clipped_actions`).

Resuming: records are written atomically as `OUT/episodes/<task>/seed-<seed>.json`; a second call with the same
settings reads them back and runs only the missing episodes (other settings in the same folder are a
`ValueError`). Parallel: `num_workers > 1` runs environments (and a copy of the policy) in that many spawned
processes, one torch thread each.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hand3d_dataset.atomic import write_json

__all__ = [
    "POLICY_KINDS",
    "EpisodeTimeout",
    "PolicySpec",
    "RolloutConfig",
    "evaluate_policy",
    "format_success_table",
    "make_policy",
    "plot_success",
    "run_episode",
    "summarize",
    "wilson_interval",
]

POLICY_KINDS = ("vipa", "server", "expert", "noop", "random")
SERVER_WAIT_S = 10.0  # how long a policy server that does not answer yet may take to come up
VIDEO_FPS = 30  # playback rate of the rollout videos (Meta-World steps at 80 Hz: ~2.7x slow motion)


# ---- statistics ------------------------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (better than the normal one at 0 or n successes and
    at small n). `(0.0, 1.0)` for n = 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"successes/n: expected 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(records: list[dict]) -> dict[str, Any]:
    n = len(records)
    k = sum(bool(r["success"]) for r in records)
    lo, hi = wilson_interval(k, n)
    steps = [r["steps"] for r in records if r["success"]]
    return {
        "n": n,
        "successes": k,
        "success_rate": k / n if n else None,
        "ci95": [lo, hi],
        "errors": sum(r.get("error") is not None for r in records),
        "mean_steps_success": float(np.mean(steps)) if steps else None,
    }


def summarize(records: list[dict]) -> dict[str, Any]:
    """Success per task, per group and overall (episodes pooled) from episode records."""
    tasks: dict[str, list[dict]] = {}
    groups: dict[str, list[dict]] = {}
    for r in records:
        tasks.setdefault(r["task"], []).append(r)
        groups.setdefault(r["group"], []).append(r)
    per_task = {t: {"group": rs[0]["group"], **_rate(rs)} for t, rs in tasks.items()}
    errors: dict[str, int] = {}
    for r in records:
        if r.get("error"):
            kind = r["error"].split(":")[0]
            errors[kind] = errors.get(kind, 0) + 1
    return {
        "per_task": per_task,
        "per_group": {g: _rate(rs) for g, rs in groups.items()},
        "overall": _rate(records),
        "error_kinds": errors,
        "clipped_actions": int(sum(r.get("clipped_actions", 0) for r in records)),
    }


# ---- configuration ---------------------------------------------------------------------------------------------
@dataclass
class PolicySpec:
    """Which policy to run (picklable: worker processes build their own copy from it)."""

    kind: str  # one of POLICY_KINDS
    path: str | None = None  # vipa: the stage-3 checkpoint folder; server: "host:port"
    name: str | None = None  # name in tables and the output folder; None: derived from kind and path
    unnorm_key: str | None = (
        None  # vipa: the dataset statistics to act with (None: the checkpoint's only one)
    )
    n_action_steps: int | None = None  # vipa: actions executed per predicted chunk (None: the checkpoint's)
    num_inference_steps: int | None = None  # vipa: Euler steps of the flow head (None: the checkpoint's)
    noise_seed: int | None = (
        0  # vipa: flow noise seed per chunk (reproducible runs); None: torch's global RNG
    )
    seed: int = 0  # random: seed of the action generator (per episode: seed + episode seed)

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"policy kind: expected one of {POLICY_KINDS}, got {self.kind!r}")
        if self.kind in ("vipa", "server") and not self.path:
            raise ValueError(
                f"policy path: a {self.kind} policy needs a path (checkpoint folder or host:port)"
            )
        if self.kind == "server" and (not isinstance(self.path, str) or ":" not in self.path):
            raise ValueError(f"policy path: a server policy is 'host:port', got {self.path!r}")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "vipa":
            return f"VIPA-VLA ({Path(self.path).name})"
        if self.kind == "server":
            return f"server {self.path}"
        return {"expert": "scripted expert", "noop": "no-op", "random": "random"}[self.kind]


@dataclass
class RolloutConfig:
    """What to evaluate and where the results go."""

    out: str  # output folder: episodes/, videos/, summary.json
    env: str = "metaworld"  # registry name in evaluation.envs.ENVIRONMENTS
    tasks: str = "easy"  # comma-separated task and group names of the suite
    episodes: int = 10  # episodes per task
    seed: int = 1000  # seed of episode 0 of every task; episode k uses seed + k
    max_steps: int | None = None  # episode cap; None: the suite's default (Meta-World: 500)
    image_size: int = 128  # rendered camera side, px
    camera: str | None = None  # None: the suite's default camera
    num_workers: int = 1  # environment processes; 1: in this process
    videos_per_task: int = 1  # MP4s of the first episodes of each task (0: none)
    episode_timeout_s: float = 600.0  # wall-clock limit of one episode; over it the episode is an error
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        for name in ("episodes", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps: expected null or an int >= 1, got {self.max_steps!r}")
        if not isinstance(self.videos_per_task, int) or self.videos_per_task < 0:
            raise ValueError(f"videos_per_task: expected an int >= 0, got {self.videos_per_task!r}")
        if not self.episode_timeout_s > 0:
            raise ValueError(f"episode_timeout_s: expected > 0, got {self.episode_timeout_s!r}")

    def suite_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"image_size": self.image_size}
        if self.camera is not None:
            options["camera"] = self.camera
        if self.max_steps is not None:
            options["max_steps"] = self.max_steps
        return options

    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.episodes))


# ---- policies --------------------------------------------------------------------------------------------------
class _Policy:
    """What the episode loop calls: `reset(task, seed)` at the start of an episode, `act(obs, env) -> (A,)`."""

    def reset(self, task: str, seed: int) -> None:  # noqa: B027 - optional hook
        pass

    def act(self, observation: dict[str, Any], env: Any) -> np.ndarray:
        raise NotImplementedError


class _Expert(_Policy):
    def __init__(self, suite: Any) -> None:
        self.suite, self._fn, self._task = suite, None, None

    def reset(self, task: str, seed: int) -> None:
        if task != self._task:
            self._fn = self.suite.expert(task)
            self._task = task
            if self._fn is None:
                raise ValueError(f"policy: the {self.suite.name} suite has no scripted expert for {task!r}")

    def act(self, observation: dict[str, Any], env: Any) -> np.ndarray:
        return self._fn(env)


class _Noop(_Policy):
    def __init__(self, action_dim: int) -> None:
        self.action = np.zeros(action_dim, np.float32)

    def act(self, observation: dict[str, Any], env: Any) -> np.ndarray:
        return self.action.copy()


class _Random(_Policy):
    def __init__(self, action_dim: int, seed: int) -> None:
        self.action_dim, self.base, self.rng = action_dim, seed, np.random.default_rng(seed)

    def reset(self, task: str, seed: int) -> None:
        self.rng = np.random.default_rng([self.base, seed])  # the same actions for the same episode seed

    def act(self, observation: dict[str, Any], env: Any) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, self.action_dim).astype(np.float32)


class _Vipa(_Policy):
    def __init__(self, spec: PolicySpec, suite: Any) -> None:
        import torch

        from evaluation.policy import VipaPolicy

        self.policy = VipaPolicy.from_pretrained(
            spec.path,
            unnorm_key=spec.unnorm_key,
            device="cuda" if torch.cuda.is_available() else "cpu",
            n_action_steps=spec.n_action_steps,
            num_inference_steps=spec.num_inference_steps,
            noise_seed=spec.noise_seed,
        )
        emb = self.policy.spec
        _check_fit(
            f"checkpoint {spec.path!r} ({emb.unnorm_key!r})",
            suite,
            emb.action_dim,
            emb.state_dim,
            emb.camera_keys,
            emb.state_key,
        )
        self.camera_keys, self.state_key = emb.camera_keys, emb.state_key

    def reset(self, task: str, seed: int) -> None:
        self.policy.reset()

    def act(self, observation: dict[str, Any], env: Any) -> np.ndarray:
        obs = {k: observation[k] for k in (*self.camera_keys, self.state_key, "task")}
        return np.asarray(self.policy.select_action(obs), dtype=np.float32)


class _Server(_Policy):
    """A `vipa-serve` policy: chunks from the server, executed `n_action_steps` at a time (its metadata's)."""

    def __init__(self, spec: PolicySpec, suite: Any, connect_timeout: float | None = None) -> None:
        from evaluation.policy_client import PolicyClient

        host, port = spec.path.rsplit(":", 1)
        self.client = PolicyClient(host, int(port), timeout=60.0)
        try:
            self.client.health()
        except OSError as e:
            try:  # a server that is still loading its model gets a short grace period
                PolicyClient(host, int(port), timeout=2.0).wait_until_ready(connect_timeout or SERVER_WAIT_S)
            except OSError:
                raise ValueError(
                    f"policy server {spec.path}: does not answer ({e}); start it with `vipa-serve --model CKPT`"
                ) from e
        meta = self.client.metadata
        try:
            _check_fit(
                f"server {spec.path}", suite, int(meta["action_dim"]), int(meta["state_dim"]),
                list(meta["camera_keys"]), str(meta.get("state_key", "observation.state")),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ValueError) and str(e).startswith("policy:"):
                raise
            raise ValueError(
                f"policy server {spec.path}: metadata is not a policy description ({e}): {meta}"
            ) from e
        try:
            self.steps = int(spec.n_action_steps or meta.get("n_action_steps") or meta["horizon"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"policy server {spec.path}: metadata without n_action_steps/horizon: {meta}"
            ) from e
        self.action_dim = suite.action_dim
        self.queue: list[np.ndarray] = []

    def reset(self, task: str, seed: int) -> None:
        self.queue = []

    def act(self, observation: dict[str, Any], env: Any) -> np.ndarray:
        if not self.queue:
            reply = self.client.infer(observation)
            actions = reply.get("actions") if isinstance(reply, dict) else None
            actions = np.asarray(actions, dtype=np.float32) if actions is not None else None
            if actions is None or actions.ndim != 2 or actions.shape[0] < 1:
                raise _BadPolicyOutput(f"server reply without an (H, A) 'actions' array: {str(reply)[:200]}")
            self.queue = list(actions[: self.steps])
        return self.queue.pop(0)


class _BadPolicyOutput(ValueError):
    """The policy answered something that is not an action (a fault of the policy, recorded per episode)."""


class EpisodeTimeout(BaseException):
    """An episode ran past `episode_timeout_s` (raised by a timer inside the episode loop; a BaseException so
    that the loop's handlers of simulator and policy faults do not take it for one of those)."""


def _check_fit(
    what: str, suite: Any, action_dim: int, state_dim: int, camera_keys: list[str], state_key: str
) -> None:
    problems = []
    if action_dim != suite.action_dim:
        problems.append(
            f"it outputs {action_dim}-D actions, the {suite.name} environment takes {suite.action_dim}"
        )
    if state_dim != suite.state_dim or state_key != "observation.state":
        problems.append(
            f"it reads a {state_dim}-D {state_key!r}, the environment gives a {suite.state_dim}-D 'observation.state'"
        )
    missing = [k for k in camera_keys if k not in suite.camera_keys]
    if missing:
        problems.append(f"it reads cameras {missing}, the environment renders {suite.camera_keys}")
    if problems:
        raise ValueError(f"policy: {what} does not fit the {suite.name} environment: {'; '.join(problems)}")


def make_policy(spec: PolicySpec, suite: Any) -> _Policy:
    """The episode-loop policy of `spec` for `suite` (a `ValueError` when it does not fit the suite)."""
    if spec.kind == "vipa":
        return _Vipa(spec, suite)
    if spec.kind == "server":
        return _Server(spec, suite)
    if spec.kind == "expert":
        return _Expert(suite)
    if spec.kind == "noop":
        return _Noop(suite.action_dim)
    return _Random(suite.action_dim, spec.seed)


# ---- one episode -----------------------------------------------------------------------------------------------
class _Deadline:
    """Raises `EpisodeTimeout` in the episode loop after `seconds` (a SIGALRM timer where this is the main thread
    of the process, so a hung call is interrupted too; elsewhere checked between steps)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.end = seconds, time.monotonic() + seconds
        self.use_signal = threading.current_thread() is threading.main_thread() and hasattr(
            signal, "setitimer"
        )

    def _fire(self, signum: int, frame: Any) -> None:
        raise EpisodeTimeout(f"over {self.seconds:g} s")

    def __enter__(self) -> _Deadline:
        if self.use_signal:
            self._old = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise EpisodeTimeout(f"over {self.seconds:g} s")

    def __exit__(self, *exc: Any) -> None:
        if self.use_signal:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old)


def run_episode(
    env: Any,
    policy: _Policy,
    group: str,
    seed: int,
    episode: int,
    timeout_s: float = 600.0,
    video_path: str | os.PathLike | None = None,
    action_dim: int | None = None,
) -> dict[str, Any]:
    """Run one episode; returns its record (seed, steps, success, reward, error, ...). Faults of the environment
    or the policy become the record's `error`; a policy whose actions have the wrong width raises ValueError."""
    record: dict[str, Any] = {
        "task": env.task, "group": group, "episode": episode, "seed": int(seed), "steps": 0, "success": False,
        "success_step": None, "reward_sum": 0.0, "reward_max": None, "error": None, "clipped_actions": 0,
        "seconds": None, "video": None, "instruction": None,
    }  # fmt: skip
    frames: list[np.ndarray] = []
    t0 = time.perf_counter()
    camera = None
    try:
        with _Deadline(timeout_s) as deadline:
            try:
                obs = env.reset(seed)
                policy.reset(env.task, seed)
            except (EpisodeTimeout, _BadPolicyOutput):
                raise
            except Exception as e:  # noqa: BLE001 - any simulator fault is this episode's record
                raise _EnvFault(f"env_error: reset raised {type(e).__name__}: {e}") from e
            record["instruction"] = obs.get("task")
            camera = next((k for k in obs if k.startswith("observation.images.")), None)
            if video_path is not None and camera is not None:
                frames.append(obs[camera])
            for _ in range(env.max_steps):
                deadline.check()
                try:
                    action = policy.act(obs, env)
                except (EpisodeTimeout, _BadPolicyOutput):
                    raise
                except ValueError as e:
                    raise _PolicyFault(f"policy_error: {type(e).__name__}: {e}") from e
                except Exception as e:  # noqa: BLE001 - a server that went away, a crashed model
                    raise _PolicyFault(f"policy_error: {type(e).__name__}: {e}") from e
                action = np.asarray(action, dtype=np.float64).reshape(-1)
                if action_dim is not None and action.shape != (action_dim,):
                    raise _BadPolicyOutput(
                        f"policy returned actions of shape {action.shape}; the environment takes ({action_dim},)"
                    )
                if not np.isfinite(action).all():
                    raise _PolicyFault(
                        f"nan_action: non-finite action {action.tolist()} at step {record['steps']}"
                    )
                try:
                    obs, reward, success, done, info = env.step(action)
                except Exception as e:  # noqa: BLE001
                    raise _EnvFault(f"env_error: step raised {type(e).__name__}: {e}") from e
                record["steps"] += 1
                record["reward_sum"] += float(reward)
                record["reward_max"] = max(float(reward), record["reward_max"] or -math.inf)
                record["clipped_actions"] += int(bool(info.get("clipped", False)))
                if video_path is not None and camera is not None:
                    frames.append(obs[camera])
                if success:
                    record["success"], record["success_step"] = True, record["steps"]
                    break
                if done:
                    break
    except EpisodeTimeout as e:
        record["error"] = f"timeout: {e}"
    except (_EnvFault, _PolicyFault) as e:
        record["error"] = str(e)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    if video_path is not None and len(frames) > 1:
        record["video"] = str(write_video(frames, video_path))
    return record


class _EnvFault(Exception):
    pass


class _PolicyFault(Exception):
    pass


def write_video(frames: list[np.ndarray], path: str | os.PathLike, fps: int = VIDEO_FPS) -> Path:
    """An H.264 MP4 (plays in browsers) of (H, W, 3) uint8 frames, written atomically; odd sizes are cropped
    by one pixel (yuv420p needs even sides)."""
    from training.video_io import VideoStreamWriter

    h, w = frames[0].shape[:2]
    h2, w2 = h - h % 2, w - w % 2
    writer = VideoStreamWriter(path, fps, w2, h2, codec="libx264", crf=23, gop=fps)
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[:h2, :w2]))
    return writer.close()


# ---- many episodes ---------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _worker_init(env_name: str, options: dict[str, Any], spec: PolicySpec, threads: int | None) -> None:
    if threads and spec.kind == "vipa":  # one torch thread per environment process (the others: no torch)
        import torch

        torch.set_num_threads(threads)
    from evaluation.envs import get_suite

    suite = get_suite(env_name, **options)
    _WORKER.update(suite=suite, spec=spec, policy=None, envs={})


def _worker_policy() -> _Policy:
    if _WORKER["policy"] is None:
        _WORKER["policy"] = make_policy(_WORKER["spec"], _WORKER["suite"])
    return _WORKER["policy"]


def _worker_episode(job: tuple[str, str, int, int, str | None, float]) -> dict[str, Any]:
    group, task, episode, seed, video, timeout_s = job
    suite = _WORKER["suite"]
    env = _WORKER["envs"].get(task)
    if env is None:
        env = _WORKER["envs"][task] = suite.make(task)
    return run_episode(env, _worker_policy(), group, seed, episode, timeout_s, video, suite.action_dim)


def _worker_close() -> None:
    for env in _WORKER.get("envs", {}).values():
        env.close()
    _WORKER.clear()


def _record_path(out: Path, task: str, seed: int) -> Path:
    return out / "episodes" / task / f"seed-{seed:06d}.json"


def evaluate_policy(
    spec: PolicySpec,
    cfg: RolloutConfig,
    on_record: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every episode of `cfg` with the policy of `spec`; writes `cfg.out/summary.json` and
    returns it (`per_task`, `per_group`, `overall`, `records`, settings)."""
    from evaluation.envs import get_suite

    out = Path(cfg.out)
    suite = get_suite(cfg.env, **cfg.suite_options())
    pairs = suite.resolve_tasks(cfg.tasks)
    settings = {
        "policy": asdict(spec), "env": cfg.env, "tasks": [t for _, t in pairs], "seeds": cfg.seeds(),
        "suite_options": cfg.suite_options(),
    }  # fmt: skip
    config_path = out / "run_config.json"
    if config_path.is_file():
        saved = json.loads(config_path.read_text())
        if saved != json.loads(json.dumps(settings)):
            raise ValueError(
                f"out: {out} holds an evaluation with other settings ({config_path}); use another folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    write_json(settings, config_path)

    records: dict[tuple[str, int], dict] = {}
    jobs = []
    for group, task in pairs:
        for k, seed in enumerate(cfg.seeds()):
            path = _record_path(out, task, seed)
            if path.is_file():
                records[(task, seed)] = json.loads(path.read_text())
                continue
            video = str(out / "videos" / task / f"seed-{seed:06d}.mp4") if k < cfg.videos_per_task else None
            jobs.append((group, task, k, seed, video, cfg.episode_timeout_s))

    def keep(record: dict) -> None:
        write_json(record, _record_path(out, record["task"], record["seed"]))
        records[(record["task"], record["seed"])] = record
        if on_record is not None:
            on_record(record)

    if jobs:
        _check_policy_before_run(spec, suite)
        bar = _progress(len(jobs), f"{spec.label} on {cfg.env}", cfg.progress)
        try:
            if cfg.num_workers == 1:
                _worker_init(cfg.env, cfg.suite_options(), spec, None)
                try:
                    for job in jobs:
                        keep(_worker_episode(job))
                        bar.update(1)
                        bar.set_postfix(success=_running_rate(records))
                finally:
                    _worker_close()
            else:
                _run_parallel(jobs, cfg, spec, keep, bar, records)
        finally:
            bar.close()
    ordered = [records[(t, s)] for _, t in pairs for s in cfg.seeds()]
    summary = {
        "policy": spec.label,
        "kind": spec.kind,
        **summarize(ordered),
        "settings": settings,
        "records": ordered,
    }
    write_json(summary, out / "summary.json")
    return summary


def _check_policy_before_run(spec: PolicySpec, suite: Any) -> None:
    """Fail before any episode when the policy cannot run here (a checkpoint that does not fit, a server that
    does not answer): every episode would fail the same way."""
    if spec.kind == "vipa":
        from evaluation.policy import read_policy_config

        config = read_policy_config(spec.path)
        if not (Path(spec.path) / "config.json").is_file() or not config.embodiments:
            raise ValueError(
                f"policy: {spec.path!r} is not a stage-3 checkpoint (config.json + policy_config.json)"
            )
        key = spec.unnorm_key or config.default_unnorm_key or next(iter(config.embodiments))
        if key not in config.embodiments:
            raise ValueError(f"policy: unnorm_key {key!r} is not one of {sorted(config.embodiments)}")
        emb = config.embodiments[key]
        _check_fit(
            f"checkpoint {spec.path!r} ({key!r})",
            suite,
            emb.action_dim,
            emb.state_dim,
            emb.camera_keys,
            emb.state_key,
        )
    elif spec.kind == "server":
        policy = _Server(spec, suite)
        policy.client.close()


def _running_rate(records: dict) -> str:
    n = len(records)
    return f"{sum(r['success'] for r in records.values())}/{n}"


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def _run_parallel(
    jobs: list[tuple], cfg: RolloutConfig, spec: PolicySpec, keep: Callable, bar: Any, records: dict
) -> None:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = mp.get_context("spawn")  # a fresh interpreter per worker: no forked GL or torch thread state
    with ProcessPoolExecutor(
        cfg.num_workers,
        mp_context=context,
        initializer=_worker_init,
        initargs=(cfg.env, cfg.suite_options(), spec, 1),
    ) as pool:
        pending = {pool.submit(_worker_episode, job) for job in jobs}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    keep(future.result())  # a fatal error (policy does not fit) propagates here
                    bar.update(1)
                    bar.set_postfix(success=_running_rate(records))
        except BaseException:
            for future in pending:
                future.cancel()
            raise


# ---- tables and plots ------------------------------------------------------------------------------------------
def _cell(stats: dict | None) -> str:
    if not stats or not stats["n"]:
        return "n/a"
    lo, hi = stats["ci95"]
    return f"{stats['successes']}/{stats['n']} {100 * stats['success_rate']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def format_success_table(summaries: dict[str, dict]) -> str:
    """Rows: tasks, groups, overall; columns: policies; cells `k/n rate% [95 % CI]`."""
    names = list(summaries)
    tasks = list(dict.fromkeys(t for s in summaries.values() for t in s["per_task"]))
    groups = list(dict.fromkeys(g for s in summaries.values() for g in s["per_group"]))
    rows = [(t, [summaries[n]["per_task"].get(t) for n in names]) for t in tasks]
    rows += [
        (f"group {g}", [summaries[n]["per_group"].get(g) for n in names]) for g in groups if g not in tasks
    ]
    rows.append(("overall", [summaries[n]["overall"] for n in names]))
    cells = [[_cell(c) for c in cs] for _, cs in rows]
    first = max(len("task"), *(len(r[0]) for r in rows)) + 2
    widths = [max(len(n), *(len(c[i]) for c in cells)) + 2 for i, n in enumerate(names)]
    lines = ["task".ljust(first) + "".join(n.rjust(w) for n, w in zip(names, widths))]
    lines.append("-" * len(lines[0]))
    for (label, _), cs in zip(rows, cells):
        lines.append(label.ljust(first) + "".join(c.rjust(w) for c, w in zip(cs, widths)))
    errors = {n: s.get("error_kinds") for n, s in summaries.items() if s.get("error_kinds")}
    if errors:
        lines.append(f"errors (counted as failures): {errors}")
    return "\n".join(lines)


def plot_success(summaries: dict[str, dict], path: str | os.PathLike) -> Path:
    """Bar chart of success per task (and overall) for each policy, with 95 % Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hand3d_dataset.atomic import save_figure

    names = list(summaries)
    tasks = list(dict.fromkeys(t for s in summaries.values() for t in s["per_task"])) + ["overall"]
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks) + 2), 4.0))
    x = np.arange(len(tasks))
    for i, name in enumerate(names):
        s = summaries[name]
        stats = [s["per_task"].get(t) if t != "overall" else s["overall"] for t in tasks]
        rate = np.array([st["success_rate"] if st and st["n"] else np.nan for st in stats])
        lo = np.array([st["ci95"][0] if st else np.nan for st in stats])
        hi = np.array([st["ci95"][1] if st else np.nan for st in stats])
        err = np.maximum(
            0.0, np.vstack([np.nan_to_num(rate - lo), np.nan_to_num(hi - rate)])
        )  # float rounding
        ax.bar(
            x + (i - (len(names) - 1) / 2) * width,
            np.nan_to_num(rate),
            width,
            yerr=err,
            capsize=3,
            label=name,
        )
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (95 % Wilson CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def policy_slug(label: str) -> str:
    """A folder name for a policy label ("VIPA-VLA (stage3)" -> "vipa_vla_stage3")."""
    slug = "".join(c if c.isalnum() else "_" for c in label.lower())
    return "_".join(p for p in slug.split("_") if p)[:60] or "policy"


def evaluate_policies(specs: list[PolicySpec], cfg: RolloutConfig) -> dict[str, Any]:
    """Every policy of `specs` on the same tasks and seeds, each in `cfg.out/<slug>/`; writes
    `cfg.out/results.json` (summaries without the records) and `cfg.out/success_per_task.png`."""
    from dataclasses import replace

    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"policies: two share a name in {labels}; give them distinct names")
    summaries = {}
    for spec in specs:
        summaries[spec.label] = evaluate_policy(
            spec, replace(cfg, out=str(Path(cfg.out) / policy_slug(spec.label)))
        )
    out = Path(cfg.out)
    plot = plot_success(summaries, out / "success_per_task.png")
    results = {
        "policies": {k: {kk: vv for kk, vv in v.items() if kk != "records"} for k, v in summaries.items()},
        "plot": str(plot),
        "table": format_success_table(summaries),
    }
    write_json(results, out / "results.json")
    return {"summaries": summaries, "plot": str(plot), "table": results["table"]}
