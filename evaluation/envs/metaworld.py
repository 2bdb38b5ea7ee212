"""Meta-World v3 in process (the embedded closed-loop benchmark): 50 Sawyer tasks, one camera, 4-D actions.

    from evaluation.envs.metaworld import MetaWorldSuite
    suite = MetaWorldSuite(image_size=128)
    env = suite.make("drawer-open-v3", max_steps=150)
    obs = env.reset(seed=1000)          # the seed fixes the drawer's (and the goal's) position
    expert = suite.expert("drawer-open-v3")
    obs, reward, success, done, info = env.step(expert(env))

Conventions (LeRobot's `lerobot/envs/metaworld.py`, so datasets and policies trained there read the same):
- camera `corner2` by default, moved to (0.75, 0.075, 0.7) as LeRobot does, and its image rotated by 180 degrees
  (MuJoCo's offscreen image of that camera comes out upside down and mirrored); `observation.images.image`.
- `observation.state`: the end-effector position (x, y, z, metres, world frame) and the gripper opening
  (finger distance / 0.1 m, clipped to [0, 1]): the first 4 numbers of Meta-World's observation.
- actions: 4-D in [-1, 1] (end-effector displacement x, y, z scaled by 1/100 m per step by Meta-World, and
  the gripper effort); finite actions outside the box are clipped (counted in `info["clipped"]`), non-finite
  ones are refused with a `ValueError` (the rollout records the episode as an error).
- success: Meta-World's own `info["success"]`; the episode ends at `max_steps` (Meta-World's cap is 500).

Seeds: Meta-World ignores `reset(seed=...)`; here `reset(seed)` seeds the environment's own generator
(`env.seed`, Meta-World's `seeded_rand_vec` path), which then draws the object and goal positions, so a seed
gives the same scene in any process. Tasks and groups: the 50 v3 tasks, `mt10` / `mt50` (Meta-World's own
lists) and the difficulty groups `easy` / `medium` / `hard` / `very_hard` of Seo et al. 2022 ("Masked World
Models for Visual Control", Appendix), the split LeRobot and SmolVLA report on.

Rendering on CPU (llvmpipe): the default visual settings draw a 4096^2 shadow map every frame (~4 steps/s at
128^2); `fast_render=True` (default) turns shadows and multisampling off (`model.vis.quality.shadowsize = 0`,
`offsamples = 0`), ~8x faster; the geometry and the camera are unchanged (benchmarks/bench_metaworld.py).

MuJoCo version: Meta-World 3.1.1 pins mujoco 3.3.0; this project uses MuJoCo 4 (the synth Hand3D source renders
with it). The one incompatibility is `SawyerMocapBase.reset_mocap_welds`, which writes 11 numbers into each
weld row of `model.eq_data`, which has 12 columns since MuJoCo 4. `_patch_mocap_welds` (applied on import)
writes those 11 numbers into the first 11 columns and leaves the 12th at the model's value; it is installed
only for the exact Meta-World version whose function it replaces (tests/test_metaworld.py fails when
Meta-World changes, so the patch is reviewed, not silently carried over). Install Meta-World without its pin:
`pip install --no-deps metaworld==3.1.1` (its other runtime needs, gymnasium and imageio, come with the
`robot` extra).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DIFFICULTY_GROUPS",
    "INSTRUCTIONS",
    "METAWORLD_VERSION",
    "MetaWorldConfig",
    "MetaWorldEnv",
    "MetaWorldSuite",
    "import_metaworld",
]

METAWORLD_VERSION = "3.1.1"  # the Meta-World release the compatibility patch was written and checked for
# sha256 of `inspect.getsource(SawyerMocapBase.reset_mocap_welds)` in that release: the function the patch replaces
RESET_MOCAP_WELDS_SHA256 = "8239815454fd030b4b758e3c3c36485a16039512e023826720bbf08552ebe36c"
_WELD_DATA = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 5.0)  # Meta-World's weld row (11 numbers)
LEROBOT_CORNER2_POS = (0.75, 0.075, 0.7)  # LeRobot's corner2 camera position
CAMERA_KEY = "observation.images.image"
STATE_KEY = "observation.state"
_INSTALL = (
    "Meta-World is needed here and is not installed: pip install --no-deps metaworld==3.1.1 "
    "(its mujoco==3.3.0 pin clashes with this project's MuJoCo 4; a compatibility fix is applied on import) and "
    'pip install "vipa-vla[robot]" for gymnasium and imageio'
)

# One instruction per task, written for this project from Meta-World's task names and the task descriptions of
# the Meta-World paper (Yu et al., CoRL 2019, Appendix A), as imperative sentences a person would say.
INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the nut and put it onto the peg",
    "basketball-v3": "pick up the ball and dunk it into the basket",
    "bin-picking-v3": "move the puck from one bin into the other bin",
    "box-close-v3": "pick up the lid and close the box with it",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "reach over the wall and press the button from the top",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "go around the wall and press the button",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug out from under the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial half a turn",
    "disassemble-v3": "pick the nut up off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock clockwise",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock counterclockwise",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-close-v3": "turn the faucet handle clockwise to close it",
    "faucet-open-v3": "turn the faucet handle counterclockwise to open it",
    "hammer-v3": "hammer the nail into the wall",
    "hand-insert-v3": "put the gripper into the hole",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up a quarter turn",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "pull the peg out of the hole sideways",
    "pick-out-of-hole-v3": "pick the puck up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "pick-place-wall-v3": "pick up the puck, carry it over the wall and place it at the goal",
    "plate-slide-back-side-v3": "slide the plate out of the cabinet from the side",
    "plate-slide-back-v3": "slide the plate back out of the cabinet",
    "plate-slide-side-v3": "slide the plate into the cabinet from the side",
    "plate-slide-v3": "slide the plate into the cabinet",
    "push-back-v3": "push the puck backwards to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "reach-v3": "move the gripper to the goal",
    "reach-wall-v3": "reach over the wall to the goal",
    "shelf-place-v3": "pick up the puck and put it on the shelf",
    "soccer-v3": "kick the ball into the goal",
    "stick-pull-v3": "grab the stick and pull the box with it",
    "stick-push-v3": "grab the stick and push the box with it",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-close-v3": "slide the window closed",
    "window-open-v3": "slide the window open",
}

# Seo et al. 2022 (Masked World Models), Appendix: the difficulty split LeRobot / SmolVLA evaluate on.
DIFFICULTY_GROUPS: dict[str, tuple[str, ...]] = {
    "easy": (
        "button-press-v3", "button-press-topdown-v3", "button-press-topdown-wall-v3", "button-press-wall-v3",
        "coffee-button-v3", "dial-turn-v3", "door-close-v3", "door-lock-v3", "door-open-v3", "door-unlock-v3",
        "drawer-close-v3", "drawer-open-v3", "faucet-close-v3", "faucet-open-v3", "handle-press-v3",
        "handle-press-side-v3", "handle-pull-v3", "handle-pull-side-v3", "lever-pull-v3", "plate-slide-v3",
        "plate-slide-back-v3", "plate-slide-back-side-v3", "plate-slide-side-v3", "reach-v3", "reach-wall-v3",
        "window-close-v3", "window-open-v3", "peg-unplug-side-v3",
    ),
    "medium": (
        "basketball-v3", "bin-picking-v3", "box-close-v3", "coffee-pull-v3", "coffee-push-v3", "hammer-v3",
        "peg-insert-side-v3", "push-wall-v3", "soccer-v3", "sweep-v3", "sweep-into-v3",
    ),
    "hard": ("assembly-v3", "hand-insert-v3", "pick-out-of-hole-v3", "pick-place-v3", "push-v3", "push-back-v3"),
    "very_hard": ("shelf-place-v3", "disassemble-v3", "stick-pull-v3", "stick-push-v3", "pick-place-wall-v3"),
}  # fmt: skip


def _weld_patch(self: Any) -> None:
    """`SawyerMocapBase.reset_mocap_welds` for MuJoCo >= 4: Meta-World's 11 weld numbers in the first 11 columns
    of each weld row of `eq_data` (12 columns since MuJoCo 4; the 12th keeps the model's value)."""
    import mujoco

    model = self.model
    if model.nmocap > 0 and model.eq_data is not None:
        for i in range(model.eq_data.shape[0]):
            if model.eq_type[i] == mujoco.mjtEq.mjEQ_WELD:
                model.eq_data[i, : len(_WELD_DATA)] = _WELD_DATA


def source_sha256(fn: Callable) -> str:
    """sha256 of a function's source text (what the compatibility patch checks before replacing it)."""
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def _patch_mocap_welds(metaworld: Any) -> bool:
    """Install `_weld_patch` when MuJoCo's eq_data is wider than Meta-World writes; True when installed."""
    import mujoco
    from metaworld.sawyer_xyz_env import SawyerMocapBase

    if SawyerMocapBase.reset_mocap_welds is _weld_patch:
        return True
    if mujoco.mjNEQDATA == len(_WELD_DATA):  # the MuJoCo Meta-World was written for: nothing to fix
        return False
    version = getattr(metaworld, "__version__", None) or _dist_version()
    if version != METAWORLD_VERSION:
        raise ImportError(
            f"metaworld {version} is installed; this project's MuJoCo {mujoco.__version__} fix was checked for "
            f"metaworld {METAWORLD_VERSION} only: pip install --no-deps metaworld=={METAWORLD_VERSION}"
        )
    SawyerMocapBase._reset_mocap_welds_original = SawyerMocapBase.reset_mocap_welds
    SawyerMocapBase.reset_mocap_welds = _weld_patch
    return True


def _dist_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("metaworld")
    except PackageNotFoundError:
        return None


def import_metaworld() -> Any:
    """`metaworld` with the MuJoCo 4 compatibility fix installed, or an ImportError saying how to install it."""
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; an explicit setting wins
    try:
        import metaworld
        import metaworld.policies  # noqa: F401  (the scripted experts)
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    _patch_mocap_welds(metaworld)
    # the experts' gains saturate on purpose (the environment clips to [-1, 1]); one warning per step is noise
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)
    return metaworld


@dataclass
class MetaWorldConfig:
    """Options of a Meta-World environment (defaults: LeRobot's conventions, CPU-friendly rendering)."""

    camera: str = "corner2"  # MuJoCo camera rendered as observation.images.image
    image_size: int = 480  # rendered image side, px (LeRobot: 480)
    flip: bool | None = None  # rotate the image by 180 degrees; None: for corner2 only (LeRobot)
    camera_pos: tuple[float, float, float] | None = None  # None: LeRobot's corner2 position for corner2
    fast_render: bool = True  # shadows and multisampling off (same scene, ~8x faster on llvmpipe)
    max_steps: int = 500  # episode cap (Meta-World's max_path_length)

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size: expected an int in [16, 1024], got {self.image_size!r}")
        if not isinstance(self.max_steps, int) or not 1 <= self.max_steps <= 500:
            raise ValueError(
                f"max_steps: expected an int in [1, 500] (Meta-World's cap), got {self.max_steps!r}"
            )
        if self.camera_pos is not None and len(self.camera_pos) != 3:
            raise ValueError(f"camera_pos: expected (x, y, z) or None, got {self.camera_pos!r}")


class MetaWorldEnv:
    """One Meta-World task with LeRobot-style observations (see the module docstring).

    Attributes after `reset`/`step`: `raw_observation` (39,) float64, Meta-World's own observation (what its
    scripted experts read); `steps`, the steps taken in this episode.
    """

    def __init__(self, task: str, config: MetaWorldConfig, instruction: str) -> None:
        metaworld = import_metaworld()
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS, ML1_ARGS_KWARGS

        if task not in ALL_V3_ENVIRONMENTS:
            raise ValueError(f"task: {task!r} is not a Meta-World v3 task")
        del metaworld
        self.task, self.config, self.instruction = task, config, instruction
        self.max_steps = config.max_steps
        env = ALL_V3_ENVIRONMENTS[task](
            render_mode="rgb_array",
            camera_name=config.camera,
            width=config.image_size,
            height=config.image_size,
        )
        kwargs = {k: v for k, v in ML1_ARGS_KWARGS[task]["kwargs"].items() if k != "task_id"}
        env._set_task_inner(**kwargs)
        # Meta-World's MT setting: the goal is part of its observation (the experts need it; the policy never
        # sees it: its state is the end effector and gripper only)
        env._partially_observable = False
        env.__dict__.pop("sawyer_observation_space", None)  # a cached_property of the old observability
        env._set_task_called = True
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True  # object and goal positions from env.np_random, seeded in reset()
        env.max_path_length = config.max_steps
        camera_id = env.model.camera(config.camera).id if config.camera else None
        pos = config.camera_pos
        if pos is None and config.camera == "corner2":
            pos = LEROBOT_CORNER2_POS
        if pos is not None and camera_id is not None:
            env.model.cam_pos[camera_id] = pos
        if config.fast_render:
            env.model.vis.quality.shadowsize = 0
            env.model.vis.quality.offsamples = 0
        self.flip = config.flip if config.flip is not None else config.camera == "corner2"
        self._env = env
        self.raw_observation: np.ndarray | None = None
        self.steps = 0

    def _observation(self, raw: np.ndarray) -> dict[str, Any]:
        image = self._env.render()
        if self.flip:
            image = image[::-1, ::-1]
        self.raw_observation = raw
        return {
            CAMERA_KEY: np.ascontiguousarray(image, dtype=np.uint8),
            STATE_KEY: np.asarray(raw[:4], dtype=np.float32),
            "task": self.instruction,
        }

    def reset(self, seed: int) -> dict[str, Any]:
        """A new episode; `seed` (int >= 0) fixes the object and goal positions."""
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        self._env.seed(int(seed))
        raw, _ = self._env.reset()
        self.steps = 0
        return self._observation(raw)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        """One control step. Returns (observation, reward, success, done, info); `done` at `max_steps`."""
        if self.raw_observation is None:
            raise ValueError("step: call reset(seed) first")
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (4,):
            raise ValueError(
                f"action: Meta-World takes 4 numbers (dx, dy, dz, gripper), got shape {action.shape}"
            )
        if not np.isfinite(action).all():
            raise ValueError(f"action: non-finite values {action.tolist()} (refused, not clipped)")
        clipped = bool(np.any(np.abs(action) > 1.0))
        raw, reward, _, truncated, info = self._env.step(np.clip(action, -1.0, 1.0).astype(np.float32))
        self.steps += 1
        info = {"success": bool(info.get("success", 0.0)), "clipped": clipped}
        done = bool(truncated) or self.steps >= self.max_steps
        return self._observation(raw), float(reward), info["success"], done, info

    def close(self) -> None:
        self._env.close()


class MetaWorldSuite:
    """The Meta-World task family (`evaluation.envs.EnvSuite`); options go to every environment it makes."""

    name = "metaworld"
    camera_keys = [CAMERA_KEY]
    state_dim = 4
    action_dim = 4
    fps = 80  # LeRobot's render_fps for Meta-World (frame_skip 5 x 2.5 ms timestep)

    def __init__(self, **options: Any) -> None:
        self.config = MetaWorldConfig(**options)

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Group name -> tasks: the difficulty groups, `mt10`, `mt50`."""
        mt10 = (
            "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
            "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
        )  # fmt: skip  # Meta-World's MT10 (metaworld.env_dict.MT10_V3)
        return {**DIFFICULTY_GROUPS, "mt10": mt10, "mt50": tuple(sorted(INSTRUCTIONS))}

    def resolve_tasks(self, spec: str) -> list[tuple[str, str]]:
        """(group, task) pairs of "easy", "drawer-open-v3,reach-v3", "mt10", ...; a task named alone is its own
        group; duplicates are dropped (first occurrence kept)."""
        names = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else []
        if not names:
            raise ValueError(f"tasks: expected task or group names separated by commas, got {spec!r}")
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        groups = self.groups
        for name in names:
            if name in groups:
                pairs = [(name, t) for t in groups[name]]
            elif name in INSTRUCTIONS:
                pairs = [(name, name)]
            else:
                raise ValueError(
                    f"tasks: unknown Meta-World task or group {name!r}; groups: {sorted(groups)}; tasks: "
                    f"the 50 v3 names such as 'drawer-open-v3' (see evaluation.envs.metaworld.INSTRUCTIONS)"
                )
            for group, task in pairs:
                if task not in seen:
                    seen.add(task)
                    out.append((group, task))
        return out

    def instruction(self, task: str) -> str:
        if task not in INSTRUCTIONS:
            raise ValueError(f"task: {task!r} is not a Meta-World v3 task")
        return INSTRUCTIONS[task]

    def make(self, task: str, **options: Any) -> MetaWorldEnv:
        """An environment for `task`; `options` override the suite's (e.g. `max_steps`)."""
        config = MetaWorldConfig(**{**self.config.__dict__, **options}) if options else self.config
        return MetaWorldEnv(task, config, self.instruction(task))

    def expert(self, task: str) -> Callable[[MetaWorldEnv], np.ndarray]:
        """Meta-World's scripted policy for `task` as `fn(env) -> (4,) action` (reads `env.raw_observation`)."""
        import_metaworld()
        from metaworld.policies import ENV_POLICY_MAP

        if task not in ENV_POLICY_MAP:
            raise ValueError(f"task: no scripted expert for {task!r}")
        policy = ENV_POLICY_MAP[task]()

        def act(env: MetaWorldEnv) -> np.ndarray:
            return np.asarray(policy.get_action(env.raw_observation), dtype=np.float32)

        return act
