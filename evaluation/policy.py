"""`VipaPolicy`: a stage-3 VIPA-VLA checkpoint run step by step in a control loop, with LeRobot's verbs.

A policy reads observations keyed like LeRobot (`observation.images.<camera>`, `observation.state`, `task`),
builds the same prompt and inputs as stage-3 training (`build_prompt`, `prepare_observation_inputs`: the
training collator calls them too, so both sides cannot drift apart), runs the VLM prefix once and N Euler steps
of the flow-matching head (`VipaForActionPrediction`), and returns actions in the dataset's units (the
checkpoint's processor holds the statistics, keyed by dataset `unnorm_key`).

- `predict_action_chunk(observation) -> (B, H, A)` (or `(H, A)` for one unbatched sample);
- `select_action(observation) -> (A,)` or `(B, A)`: pops one action from a queue refilled with the first
  `n_action_steps` actions of a new chunk whenever it runs empty (LeRobot's `select_action`); `reset()` empties
  it at the start of an episode.

Images: uint8 `(H, W, 3)` or float `(3, H, W)` / `(H, W, 3)` in [0, 1] (LeRobot's environment format), numpy or
torch; a leading batch axis makes a batch. `observation.state`: `(S,)` or `(B, S)` in robot units. `task`: a
string or a list of B strings. Results come back as numpy when the state came as numpy, as a CPU torch
tensor otherwise.

Usage (a folder written by `vipa-train stage3`):

    from evaluation.policy import VipaPolicy
    policy = VipaPolicy.from_pretrained("runs/stage3", unnorm_key="libero", n_action_steps=8)
    policy.reset()
    obs = {"observation.images.image": frame_uint8_hwc, "observation.state": state, "task": "open the drawer"}
    action = policy.select_action(obs)           # (A,) numpy, robot units

How a checkpoint knows its embodiments: `policy_config.json` beside the weights (written by stage 3) lists, per
`unnorm_key`, the camera keys in model frame order, the state/action keys and their widths in the dataset (the
head may be wider: several embodiments share one checkpoint; their state is zero-padded after normalisation and
the extra action dimensions are dropped before un-normalising).
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "POLICY_CONFIG",
    "EmbodimentSpec",
    "PolicyConfigFile",
    "VipaPolicy",
    "build_prompt",
    "has_spatial_branch",
    "prepare_observation_inputs",
    "read_policy_config",
    "zero_spatial_tokens",
]

# beside the weights: the embodiments a stage-3 checkpoint was trained on
POLICY_CONFIG = "policy_config.json"


@dataclass
class EmbodimentSpec:
    """What the policy needs to read one dataset's observations and write its actions."""

    unnorm_key: str  # name of the dataset's statistics in the processor
    camera_keys: list[str]  # `observation.images.<cam>` keys, in the order they enter the model as frames
    state_key: str = "observation.state"  # state feature of the dataset
    action_key: str = "action"  # action feature of the dataset
    state_dim: int = 0  # state width in the dataset (<= the head's state_dim; zero-padded up to it)
    action_dim: int = 0  # action width in the dataset (<= the head's action_dim; the rest is dropped)
    fps: float | None = None  # control rate the data was recorded at (an action per 1/fps seconds)
    n_action_steps: int | None = None  # actions executed per predicted chunk; None: the whole chunk

    def __post_init__(self) -> None:
        if not self.unnorm_key:
            raise ValueError(f"unnorm_key: expected a non-empty name, got {self.unnorm_key!r}")
        if not self.camera_keys:
            raise ValueError(f"camera_keys of {self.unnorm_key!r}: at least one camera is needed")
        for name in ("state_dim", "action_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} of {self.unnorm_key!r}: expected an int >= 1, got {value!r}")
        if self.n_action_steps is not None and self.n_action_steps < 1:
            raise ValueError(
                f"n_action_steps of {self.unnorm_key!r}: expected >= 1, got {self.n_action_steps}"
            )


@dataclass
class PolicyConfigFile:
    """Content of `policy_config.json`: every embodiment of the checkpoint, and which one is the default."""

    embodiments: dict[str, EmbodimentSpec] = field(default_factory=dict)  # by unnorm_key
    default_unnorm_key: str | None = None  # the dataset of the last stage-3 run

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": 1,
                "default_unnorm_key": self.default_unnorm_key,
                "embodiments": {k: asdict(v) for k, v in self.embodiments.items()},
            },
            indent=2,
        )

    def write(self, folder: str | os.PathLike) -> Path:
        """Write `folder/policy_config.json` atomically."""
        from hand3d_dataset.atomic import write_json

        return write_json(json.loads(self.to_json()), Path(folder) / POLICY_CONFIG)


def read_policy_config(folder: str | os.PathLike) -> PolicyConfigFile:
    """`policy_config.json` of a checkpoint folder; an empty one when the file is absent (not a stage-3 output)."""
    path = Path(folder) / POLICY_CONFIG
    if not path.is_file():
        return PolicyConfigFile()
    try:
        data = json.loads(path.read_text())
        specs = {k: EmbodimentSpec(**v) for k, v in data["embodiments"].items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid policy config ({e})") from e
    return PolicyConfigFile(specs, data.get("default_unnorm_key"))


def build_prompt(processor: Any, task: str, num_views: int) -> str:
    """The stage-3 prompt: one user turn with `num_views` images then the task text, and the assistant's opening
    (the action queries follow it). ChatML, as stages 1-2 saw their questions.

    Args:
        processor: a `VipaProcessor` (its chat template).
        task: the instruction, e.g. "put the bowl on the plate".
        num_views: cameras of the sample, 1 to `processor.max_frames`.
    """
    if not isinstance(task, str) or not task.strip():
        raise ValueError(f"task: expected a non-empty instruction string, got {task!r}")
    content = [{"type": "image"}] * num_views + [{"type": "text", "text": task.strip()}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def prepare_observation_inputs(
    processor: Any, frames: list[list[Any]], tasks: list[str]
) -> dict[str, torch.Tensor]:
    """Model inputs of a batch of observations (what training and the policy both feed the VLM prefix).

    Args:
        frames: per sample, its camera images in model frame order (uint8 (H, W, 3) or float in [0, 1]).
        tasks: per sample, the instruction.

    Returns:
        `input_ids, attention_mask (B, L)`, `pixel_values (F, 3, S, S)`, `spatial_pixel_values (B, T, 3, Hs, Ws)`,
        `spatial_frame_mask (B, T)`, torch tensors on CPU.
    """
    if len(frames) != len(tasks):
        raise ValueError(f"frames/tasks: {len(frames)} image groups for {len(tasks)} tasks")
    prompts = [build_prompt(processor, task, len(views)) for views, task in zip(frames, tasks, strict=True)]
    batch = processor(images=[list(views) for views in frames], text=prompts, return_tensors="pt")
    return {k: batch[k] for k in processor.model_input_names}


def zero_spatial_tokens(model: Any, spatial_pixel_values: torch.Tensor) -> torch.Tensor:
    """Zero CUT3R tokens `(B, T, 1 + N_s, d_s)` in CUT3R's layout for `spatial_pixel_values` (B, T, 3, Hs, Ws).

    For a checkpoint without a 3D branch (fusion alpha = 0): `V_f = V_sem + 0 * F_spa` whatever CUT3R returns,
    so CUT3R need not run; these stand in for its output exactly.
    """
    config = model.config.spatial_config
    batch, frames, _, height, width = spatial_pixel_values.shape
    tokens = 1 + (height // config.patch_size) * (width // config.patch_size)
    return spatial_pixel_values.new_zeros(batch, frames, tokens, config.hidden_size)


def has_spatial_branch(model: Any) -> bool:
    """False for a single-encoder model: `config.use_spatial_branch` off, or the fusion's alpha exactly 0."""
    if not getattr(model.config, "use_spatial_branch", True):
        return False
    return float(model.model.fusion.alpha.detach().float().cpu()) != 0.0


def _to_numpy(name: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected an array, got {type(value).__name__} ({e})") from e


def _image_hwc(name: str, image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 or float; a channel-first (3, H, W) image is transposed."""
    if image.ndim != 3:
        raise ValueError(f"{name}: expected an (H, W, 3) or (3, H, W) image, got shape {image.shape}")
    if image.shape[-1] == 3:
        return image
    if image.shape[0] == 3:
        return np.moveaxis(image, 0, -1)
    raise ValueError(f"{name}: expected an (H, W, 3) or (3, H, W) image, got shape {image.shape}")


class VipaPolicy:
    """A stage-3 checkpoint as a policy (see the module docstring).

    Args:
        model: a `VipaForActionPrediction` (eval mode, on `device`).
        processor: its `VipaProcessor`, with statistics for `spec.unnorm_key`.
        spec: the embodiment (cameras, widths, unnorm_key).
        n_action_steps: actions taken from each chunk by `select_action` (1 to the horizon).
        num_inference_steps: N Euler steps; the head's configured value when None.
        noise_seed: when given, every chunk starts from noise drawn from a generator seeded with it, so the same
            observation always gives the same chunk (reproducible evaluation; the server's `--seed`); else the
            global torch RNG, as LeRobot's policies.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        spec: EmbodimentSpec,
        n_action_steps: int | None = None,
        num_inference_steps: int | None = None,
        noise_seed: int | None = None,
    ) -> None:
        head = model.config.action_head_config
        if spec.state_dim > head.state_dim or spec.action_dim > head.action_dim:
            raise ValueError(
                f"embodiment {spec.unnorm_key!r}: state/action widths {spec.state_dim}/{spec.action_dim} exceed "
                f"the head's {head.state_dim}/{head.action_dim}"
            )
        processor.resolve_unnorm_key(spec.unnorm_key)  # a clear error when the statistics are missing
        steps = n_action_steps if n_action_steps is not None else spec.n_action_steps or head.horizon
        if not 1 <= steps <= head.horizon:
            raise ValueError(f"n_action_steps: expected 1 to the horizon {head.horizon}, got {steps}")
        self.model = model
        self.processor = processor
        self.spec = spec
        self.n_action_steps = int(steps)
        self.num_inference_steps = num_inference_steps
        self.noise_seed = noise_seed
        self.horizon = int(head.horizon)
        self.device = next(model.parameters()).device
        self.uses_spatial = has_spatial_branch(model)
        self._queue: deque[np.ndarray] = deque()
        self._queue_batch: int | None = None

    # ---- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        unnorm_key: str | None = None,
        device: str | torch.device | None = None,
        n_action_steps: int | None = None,
        num_inference_steps: int | None = None,
        noise_seed: int | None = None,
    ) -> VipaPolicy:
        """Load a stage-3 output folder (weights, processor, `policy_config.json`).

        unnorm_key: which dataset's units to act in; the only one (or the last trained) when None.
        device: "cuda" when available, else "cpu", when None.
        """
        from modeling_vipa.modeling_vipa import VipaForActionPrediction
        from training.common import load_model_and_processor

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ValueError(f"path: no checkpoint (config.json) in {str(folder)!r}")
        config = read_policy_config(folder)
        if not config.embodiments:
            raise ValueError(
                f"path: {str(folder)!r} has no {POLICY_CONFIG}; it is not a stage-3 output (train it with "
                "`vipa-train stage3`)"
            )
        if unnorm_key is None:
            if len(config.embodiments) == 1:
                unnorm_key = next(iter(config.embodiments))
            elif config.default_unnorm_key in config.embodiments:
                unnorm_key = config.default_unnorm_key
            else:
                raise ValueError(f"unnorm_key: choose one of {sorted(config.embodiments)}")
        if unnorm_key not in config.embodiments:
            raise ValueError(f"unnorm_key: {unnorm_key!r} is not one of {sorted(config.embodiments)}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, processor = load_model_and_processor(
            folder, model_class=VipaForActionPrediction, device=device
        )
        model.eval()
        spec = config.embodiments[unnorm_key]
        return cls(model, processor, spec, n_action_steps, num_inference_steps, noise_seed)

    # ---- LeRobot verbs ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget queued actions (call at the start of every episode)."""
        self._queue.clear()
        self._queue_batch = None

    def select_action(self, observation: dict[str, Any]) -> np.ndarray | torch.Tensor:
        """The next action: `(A,)` for one sample, `(B, A)` for a batch; a new chunk is predicted when the
        queue is empty and its first `n_action_steps` actions are queued."""
        frames, tasks, state, batched, as_numpy = self._parse(observation)
        batch = len(tasks)
        if self._queue and self._queue_batch != batch:
            raise ValueError(
                f"observation: batch of {batch} while {len(self._queue)} actions for a batch of "
                f"{self._queue_batch} are queued; call reset() between episodes"
            )
        if not self._queue:
            chunk = self._predict(frames, tasks, state)  # (B, H, A) numpy
            self._queue.extend(chunk[:, : self.n_action_steps].transpose(1, 0, 2))
            self._queue_batch = batch
        action = self._queue.popleft()  # (B, A)
        action = action if batched else action[0]
        return action if as_numpy else torch.from_numpy(np.ascontiguousarray(action))

    def predict_action_chunk(
        self, observation: dict[str, Any], generator: torch.Generator | None = None
    ) -> np.ndarray | torch.Tensor:
        """A chunk of H actions in the dataset's units: `(B, H, A)`, or `(H, A)` for one unbatched sample."""
        frames, tasks, state, batched, as_numpy = self._parse(observation)
        chunk = self._predict(frames, tasks, state, generator)
        chunk = chunk if batched else chunk[0]
        return chunk if as_numpy else torch.from_numpy(chunk)

    # ---- internals -------------------------------------------------------------------------------------------
    def _parse(
        self, observation: dict[str, Any]
    ) -> tuple[list[list[np.ndarray]], list[str], np.ndarray, bool, bool]:
        """(frames per sample, tasks, raw state (B, S) float64, batched?, numpy output?) with every check."""
        if not isinstance(observation, dict):
            raise ValueError(
                f"observation: expected a dict of LeRobot features, got {type(observation).__name__}"
            )
        spec = self.spec
        missing = [k for k in (*spec.camera_keys, spec.state_key, "task") if k not in observation]
        if missing:
            raise ValueError(
                f"observation: missing {missing}; this policy ({spec.unnorm_key!r}) reads {spec.camera_keys}, "
                f"{spec.state_key!r} and 'task'; got keys {sorted(observation)}"
            )
        raw_state = observation[spec.state_key]
        as_numpy = not isinstance(raw_state, torch.Tensor)
        state = _to_numpy(spec.state_key, raw_state).astype(np.float64)
        batched = state.ndim == 2
        if state.ndim not in (1, 2) or state.shape[-1] != spec.state_dim:
            raise ValueError(
                f"{spec.state_key}: expected ({spec.state_dim},) or (B, {spec.state_dim}) for {spec.unnorm_key!r}, "
                f"got shape {state.shape}"
            )
        if not np.isfinite(state).all():
            raise ValueError(f"{spec.state_key}: contains NaN or inf")
        state = state if batched else state[None]
        batch = state.shape[0]
        task = observation["task"]
        tasks = [task] * batch if isinstance(task, str) else list(task)
        if len(tasks) != batch:
            raise ValueError(f"task: {len(tasks)} instructions for a batch of {batch}")
        frames: list[list[np.ndarray]] = [[] for _ in range(batch)]
        for key in spec.camera_keys:
            images = _to_numpy(key, observation[key])
            if images.ndim != (4 if batched else 3):
                what = "(B, H, W, 3) or (B, 3, H, W)" if batched else "(H, W, 3) or (3, H, W)"
                raise ValueError(
                    f"{key}: expected {what} to match {spec.state_key}, got shape {images.shape}"
                )
            images = images if batched else images[None]
            if images.shape[0] != batch:
                raise ValueError(f"{key}: batch {images.shape[0]}, but {spec.state_key} has {batch}")
            for b in range(batch):
                frames[b].append(_image_hwc(f"{key}[{b}]", images[b]))
        return frames, tasks, state, batched, as_numpy

    @torch.inference_mode()
    def _predict(
        self,
        frames: list[list[np.ndarray]],
        tasks: list[str],
        state: np.ndarray,
        generator: torch.Generator | None = None,
    ) -> np.ndarray:
        """(B, H, A) float32 actions in the dataset's units."""
        spec, head = self.spec, self.model.config.action_head_config
        inputs = prepare_observation_inputs(self.processor, frames, tasks)
        norm_state = np.asarray(self.processor.normalize_state(state, spec.unnorm_key), dtype=np.float32)
        padded = np.zeros((state.shape[0], head.state_dim), dtype=np.float32)
        padded[:, : spec.state_dim] = norm_state
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if generator is None and self.noise_seed is not None:
            generator = torch.Generator(self.device).manual_seed(self.noise_seed)
        if not self.uses_spatial:  # no 3D branch: CUT3R's output cannot matter, do not run it
            inputs["spatial_tokens"] = zero_spatial_tokens(self.model, inputs.pop("spatial_pixel_values"))
        autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            chunk = self.model.predict_action(
                **inputs,
                state=torch.from_numpy(padded).to(self.device),
                num_steps=self.num_inference_steps,
                generator=generator,
                return_normalized=True,
            )
        chunk = chunk.float().cpu().numpy()[..., : spec.action_dim]
        return np.asarray(self.processor.unnormalize_actions(chunk, spec.unnorm_key), dtype=np.float32)
