"""Closed-loop environments: the `RobotEnv` protocol and the registry of environment suites.

    >>> from evaluation.envs import ENVIRONMENTS
    >>> sorted(ENVIRONMENTS)
    ['libero', 'metaworld']

A suite (`get_suite(name)`) knows its tasks and makes one environment per task; `vipa-eval` and `vipa-demos`
only talk to these two protocols, so other environments (LIBERO through the policy server, a real robot) plug
in by adding a line to `ENVIRONMENTS`. Modules are imported lazily: a suite's simulator is needed only when it
is used.

The protocols (the one place they are written down):

`EnvSuite`
- `name: str`; `camera_keys: list[str]` (LeRobot keys `observation.images.<cam>`, model frame order);
  `state_dim: int`; `action_dim: int`; `fps: int` (control rate, for videos and datasets).
- `resolve_tasks(spec: str) -> list[tuple[str, str]]`: (group, task) pairs of a comma-separated list of task
  names and group names; an unknown name is a `ValueError` listing what exists.
- `instruction(task) -> str`: the language instruction of a task.
- `make(task, **options) -> RobotEnv`; `expert(task) -> Callable[[RobotEnv], np.ndarray]` or None.

`RobotEnv`
- `reset(seed: int) -> dict`: the observation after reset; the seed fixes the initial object and goal
  positions (the same seed gives the same scene on any machine).
- `step(action (action_dim,) float) -> (observation, reward, success, done, info)`; `done` once the episode
  cap is reached; `success` from the simulator's own success test.
- observations: `{camera_key: (H, W, 3) uint8, "observation.state": (state_dim,) float32, "task": str}`.
- `max_steps: int` (episode cap); `close()`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["ENVIRONMENTS", "EnvSuite", "RobotEnv", "get_suite"]


@runtime_checkable
class RobotEnv(Protocol):
    """One environment instance running one task; see the module docstring for the contract."""

    task: str
    max_steps: int

    def reset(self, seed: int) -> dict[str, Any]: ...

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]: ...

    def close(self) -> None: ...


@runtime_checkable
class EnvSuite(Protocol):
    """A family of tasks sharing one robot (cameras, state and action widths); see the module docstring."""

    name: str
    camera_keys: list[str]
    state_dim: int
    action_dim: int
    fps: int

    def resolve_tasks(self, spec: str) -> list[tuple[str, str]]: ...

    def instruction(self, task: str) -> str: ...

    def make(self, task: str, **options: Any) -> RobotEnv: ...

    def expert(self, task: str) -> Callable[[RobotEnv], np.ndarray] | None: ...


ENVIRONMENTS: dict[str, str] = {  # registry name -> "module:class"
    "libero": "evaluation.envs.libero:LiberoSuite",  # simulator in .venv-libero worker processes (make libero-venv)
    "metaworld": "evaluation.envs.metaworld:MetaWorldSuite",
}


def get_suite(name: str, **kwargs: Any) -> EnvSuite:
    """The suite registered as `name`, constructed with `kwargs` (e.g. `camera`, `image_size`)."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"env: unknown environment {name!r}; available: {sorted(ENVIRONMENTS)}")
    module, cls = ENVIRONMENTS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
