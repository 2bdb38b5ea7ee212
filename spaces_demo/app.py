"""VIPA-VLA Gradio Space: spatial QA over 1-4 frames, and 3D wrist trajectories from motion tokens.

Serve the checkpoint `make demo` trains (`DEFAULT_MODEL`), another folder or a Hub repo id:

    python -m spaces_demo.app                      # VIPA_MODEL or outputs/demo/vipa, on 127.0.0.1:7860
    python -m spaces_demo.app --model my-org/vipa-vla --port 7861

Script it with `gradio_client` (both endpoints also return structured JSON):

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    question = "Where is the mug relative to the right hand?"
    answer, info = client.predict([handle_file("frame.png")], question, "", api_name="/spatial_qa")
    info["parsed"]["labels"], info["parsed"]["distance_m"]
    plot, overlay, traj = client.predict(handle_file("frame.png"), "Pick up the mug.", "",
                                         api_name="/predict_trajectory")
    traj["trajectory"]                                          # (T, 3) list, camera frame, metres

Trained or not: a checkpoint counts as trained only when its folder (or Hub repo) holds `TRAINING_MARKER`
(`training_summary.json`, a JSON object written by the training entry points next to `save_pretrained`'s
files). Without it the app still serves the model (tests and smoke runs use random weights) but every page
and every JSON answer carries an "untrained weights" warning, so random output is never shown as VIPA-VLA's.

Trajectories are decoded with constrained generation: after the prompt the assistant turn is opened with
`<motion>` and only bin tokens (and `</motion>` after a whole number of x, y, z triplets) may follow, so
every answer parses; `processor.decode_motion(..., strict=False)` then reads the waypoints.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import PIL.Image
import PIL.ImageDraw
import plotly.graph_objects as go
import torch

from evaluation.hand3d_test import MotionDecoding
from hand3d_dataset.cameras import project
from hand3d_dataset.language import describe_displacement
from hand3d_dataset.metrics import parse_answer, score_answer
from training.common import TRAINING_MARKER, load_model_and_processor

try:  # package import (python -m spaces_demo.app) or flat Space layout (python app.py)
    from .examples import DEFAULT_FOVY_DEG, Example, default_intrinsics, load_examples
except ImportError:  # pragma: no cover - the flat layout of a pushed Space
    from examples import DEFAULT_FOVY_DEG, Example, default_intrinsics, load_examples

__all__ = [
    "DEFAULT_MODEL",
    "TRAINING_MARKER",
    "Limits",
    "VipaDemo",
    "CheckpointNotFoundError",
    "checkpoint_status",
    "load_checkpoint",
    "build_app",
    "main",
]

DEFAULT_MODEL = "outputs/demo/vipa"  # the checkpoint `make demo` trains; VIPA_MODEL or --model override it
MODEL_ENV = "VIPA_MODEL"
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
DEFAULT_HOST = "127.0.0.1"  # loopback unless asked: the demo has no authentication
DEFAULT_PORT = 7860
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Question templates per Hand3D-visual category (the wording of hand3d_dataset.samples_visual).
QUESTION_TEMPLATES: dict[str, str] = {
    "spatial relationship": "Where is the mug relative to the right hand in the last frame?",
    "task completion": "The task is: pick up the mug. How should the right hand move in 3D to reach the mug?",
    "hand movement": "How did the right hand move between these two frames?",
    "camera movement": "How did the camera rotate between these two frames?",
}
DEFAULT_INSTRUCTION = (
    "Instruction: pick up the mug. Generate the 3D trajectory of the right hand's wrist from this frame."
)


@dataclass(frozen=True)
class Limits:
    """Input limits of one request (each breach is a readable `gr.Error`, never a crash)."""

    max_frames: int = 4  # frames per spatial question (the paper's Hand3D-visual uses 1-4)
    max_image_side: int = 4096  # pixels, either side of an uploaded image
    max_image_pixels: int = 4096 * 4096  # width x height, checked from the header before decoding
    max_file_size: str = "20mb"  # per uploaded file, enforced by gradio's upload route
    max_text_chars: int = 500  # question / instruction length
    max_new_tokens: int = 64  # answer length of a spatial question
    min_waypoints: int = 2  # a trajectory needs a start and an end
    max_waypoints: int = 16  # longest trajectory generated (3 motion tokens per waypoint)
    concurrency_limit: int = 2  # requests computed at once per endpoint (CPU Space: 2 cores)
    queue_max_size: int = 32  # waiting requests beyond this are refused with "queue full"
    overlay_max_side: int = 768  # the projected-trajectory image is drawn at most this large
    overlay_keep_s: float = 600.0  # our copies of output images are removed after this (gradio keeps its own)
    cache_max_age_s: int = 3600  # gradio's cache of uploads and outputs is pruned of files older than this


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint at the requested path; the message says how to make one."""


def _missing_message(path: str) -> str:
    return (
        f"No VIPA-VLA checkpoint at {path!r}. Train the demo checkpoint with `make demo` (it writes "
        f"{DEFAULT_MODEL}), or pass another one with --model PATH_OR_REPO_ID or the {MODEL_ENV} variable."
    )


def checkpoint_status(path: str | os.PathLike) -> dict:
    """{"path", "trained": bool, "summary": dict | None, "message": str} from `TRAINING_MARKER`.

    A local folder is read directly; a Hub repo id is asked for the marker file (offline or absent reads as
    untrained).
    """
    path = str(path)
    summary = None
    marker = Path(path) / TRAINING_MARKER
    if not marker.is_file() and not Path(path).exists() and _REPO_ID.match(path):
        try:
            from huggingface_hub import hf_hub_download

            marker = Path(hf_hub_download(path, TRAINING_MARKER))
        except Exception:  # offline, private, or simply no marker: all read as "not marked trained"
            marker = None
    if marker is not None and marker.is_file():
        try:
            summary = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            summary = None
    trained = isinstance(summary, dict)
    if trained:
        message = f"Checkpoint `{path}`: {describe_training(summary, marker)}"
    else:
        message = (
            f"⚠️ **Untrained weights**: `{path}` has no `{TRAINING_MARKER}`, so its answers and "
            "trajectories are random and say nothing about VIPA-VLA. Train the demo checkpoint with "
            "`make demo`."
        )
    return {"path": path, "trained": trained, "summary": summary if trained else None, "message": message}


_STAGE_DATA = {1: "Hand3D-visual", 2: "Hand3D-action", 3: "robot demonstrations"}  # what each stage trains on


def describe_training(summary: dict, marker: Path | None = None) -> str:
    """One sentence from a training marker: what was trained (stage, steps, data, recipe, final loss), on what,
    and when (the marker's `finished` time, else the file's modification time)."""
    stage = summary.get("stage")
    what = summary.get("model") or (f"VIPA-VLA after stage {stage}" if stage else "a trained checkpoint")
    data = summary.get("dataset") or summary.get("data") or _STAGE_DATA.get(stage)
    parts = []
    if stage is not None and summary.get("steps") is not None:
        parts.append(
            f"stage {stage} ran {summary['steps']} optimiser steps" + (f" on {data}" if data else "")
        )
    elif data:
        parts.append(f"trained on {data}")
    if summary.get("recipe") and isinstance(summary["recipe"], str):
        parts.append(f"recipe {summary['recipe']}")
    loss = summary.get("final_loss", summary.get("loss_last"))
    if isinstance(loss, (int, float)):
        parts.append(f"final loss {loss:.3f}")
    if summary.get("built_on_stand_ins") or summary.get("stand_in"):
        parts.append("built on CPU stand-ins of InternVL and CUT3R (not the paper's weights)")
    when = summary.get("finished")
    if not when and marker is not None and marker.is_file():
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(marker.stat().st_mtime))
    sentence = f"{what}, trained" + (": " + ", ".join(parts) if parts else "")
    return sentence + (f"; finished {when}." if when else ".")


def load_checkpoint(path: str | os.PathLike) -> tuple[Any, Any, dict]:
    """(model, processor, status) through the package's one checkpoint loader with the checkpoint's own code
    (`trust_remote_code`, as a user of a published checkpoint runs it); `CheckpointNotFoundError` when nothing
    is there."""
    path = str(path)
    if not Path(path).exists() and not _REPO_ID.match(path):
        raise CheckpointNotFoundError(_missing_message(path))
    try:
        model, processor = load_model_and_processor(path, remote_code=True)
    except (OSError, ValueError) as e:
        if isinstance(e, ValueError) and "config.json" not in str(e):
            raise
        raise CheckpointNotFoundError(f"{_missing_message(path)} ({e})") from e
    return model.eval(), processor, checkpoint_status(path)


def _error(message: str) -> gr.Error:
    return gr.Error(message, title="Input rejected")


def _readable_errors(fn: Callable) -> Callable:
    """A `ValueError` from the processor or the metrics (they name the argument) becomes a gr.Error with that
    message; anything else stays gradio's generic error, which is logged on the server."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:  # already readable (gr.Error subclasses ValueError)
            raise
        except ValueError as e:
            raise _error(str(e)) from e

    return wrapper


@dataclass
class VipaDemo:
    """The two predictions behind the Space, usable without a server.

    model: a `VipaForConditionalGeneration`; processor: its `VipaProcessor` (with motion tokens for
    trajectories); status: `checkpoint_status(...)`; examples: shipped Hand3D test examples.
    """

    model: Any  # VipaForConditionalGeneration, eval mode
    processor: Any  # VipaProcessor
    status: dict  # checkpoint_status(...)
    examples: list[Example] = field(default_factory=list)  # load_examples(EXAMPLES_DIR)
    limits: Limits = field(default_factory=Limits)  # request limits

    def __post_init__(self) -> None:
        self._by_id = {ex.id: ex for ex in self.examples}
        self._overlay_dir = Path(tempfile.mkdtemp(prefix="vipa-space-"))

    def save_overlay(self, image: PIL.Image.Image) -> str:
        """PNG path for an output image, named by its content and written atomically.

        gradio caches a returned PIL image under its content hash with a plain (truncating) write, so two
        requests with the same output race and a download can read an empty file (seen with 8 concurrent
        callers). A returned path is copied into the cache under a temporary name and renamed, which is safe.
        Files older than `overlay_keep_s` are removed here: gradio has copied them into its cache long before.
        """
        now = time.time()
        for old in self._overlay_dir.glob("*.png"):
            try:
                if now - old.stat().st_mtime > self.limits.overlay_keep_s:
                    old.unlink()
            except OSError:  # removed by a concurrent request
                pass
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        path = self._overlay_dir / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
        if not path.exists():
            tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return str(path)

    # ---- inputs ---------------------------------------------------------------------------------------
    def example(self, example_id: str | None, kind: str) -> Example | None:
        if not example_id:
            return None
        ex = self._by_id.get(str(example_id))
        if ex is None or ex.kind != kind:
            known = [e.id for e in self.examples if e.kind == kind][:8]
            raise _error(f"example_id: no {kind} example {example_id!r}; known: {known}")
        return ex

    def load_frame(self, file: Any, name: str) -> PIL.Image.Image:
        """An uploaded file (path, or a gradio file dict) -> RGB image, or a readable gr.Error."""
        if isinstance(file, dict):
            file = file.get("path") or file.get("name")
        if isinstance(file, PIL.Image.Image):
            return self._checked_rgb(file, name)
        if not isinstance(file, (str, os.PathLike)) or not Path(file).is_file():
            raise _error(f"{name}: no uploaded file (got {type(file).__name__})")
        try:
            # lazy: open() reads the header only, so the size is checked before anything is decoded
            with PIL.Image.open(file) as image:
                return self._checked_rgb(image, name)
        except gr.Error:
            raise
        except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
            raise _error(f"{name}: not a readable image ({type(e).__name__}: {e})") from None

    def _checked_rgb(self, image: PIL.Image.Image, name: str) -> PIL.Image.Image:
        w, h = image.size
        lim = self.limits
        if max(w, h) > lim.max_image_side or w * h > lim.max_image_pixels:
            raise _error(
                f"{name}: image of {w}x{h} px is too large (at most {lim.max_image_side} px a side and "
                f"{lim.max_image_pixels / 1e6:.1f} megapixels)"
            )
        image.load()  # a truncated file fails here (OSError), inside load_frame's handler
        return self.processor.load_rgb(image, name)  # RGBA on white, grayscale to RGB; 16-bit: ValueError

    def check_text(self, text: Any, name: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise _error(f"{name}: please enter some text")
        if len(text) > self.limits.max_text_chars:
            raise _error(f"{name}: {len(text)} characters, at most {self.limits.max_text_chars} are accepted")
        if "<" in text and re.search(r"<(image|img|/img|IMG_CONTEXT|\|im_\w+\|)>", text):
            raise _error(f"{name}: special tokens such as <image> are not accepted in the text")
        return text.strip()

    def _prompt(self, n_frames: int, text: str) -> str:
        messages = [
            {"role": "user", "content": [{"type": "image"}] * n_frames + [{"type": "text", "text": text}]}
        ]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _model_info(self) -> dict:
        # "checkpoint", not "path": gradio_client reads any {"path": ...} dict as a file to download
        info = {"checkpoint": self.status["path"], "trained": self.status["trained"]}
        if not self.status["trained"]:
            info["warning"] = f"untrained weights: no {TRAINING_MARKER} in the checkpoint"
        return info

    # ---- spatial QA ------------------------------------------------------------------------------------
    @_readable_errors
    def spatial_qa(self, frames: Any, question: str | None, example_id: str | None = "") -> tuple[str, dict]:
        """1-4 frames + a question -> (answer, {"answer", "parsed", "ground_truth", "score", ...}).

        With `example_id` the example's frames are used (uploads ignored) and its question when none is given;
        the answer is then scored against the example's structured target (metrics.score_answer).
        """
        ex = self.example(example_id, "visual")
        if ex is not None:
            paths: list = list(ex.images)
            question = question if question and question.strip() else ex.question
        else:
            paths = [frames] if isinstance(frames, (str, os.PathLike, dict)) else list(frames or [])
        if not paths:
            raise _error("frames: upload 1 to 4 frames or pick an example")
        if len(paths) > self.limits.max_frames:
            raise _error(f"frames: {len(paths)} uploaded, at most {self.limits.max_frames} are accepted")
        question = self.check_text(question, "question")
        images = [self.load_frame(p, f"frame {i + 1}") for i, p in enumerate(paths)]
        batch = self.processor(images=images, text=self._prompt(len(images), question), return_tensors="pt")
        tok = self.processor.tokenizer
        with torch.inference_mode():
            out = self.model.generate(
                **batch,
                max_new_tokens=self.limits.max_new_tokens,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        answer = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        parsed = parse_answer(answer)
        result: dict = {
            "answer": answer,
            "parsed": {
                "labels": parsed.labels,
                "distance_m": parsed.distance_m,
                "rotation": parsed.rotation if parsed.rotation_found else None,
                "angle_deg": parsed.angle_deg,
            },
            "question": question,
            "num_frames": len(images),
            "example_id": ex.id if ex else None,
            "ground_truth": None,
            "score": None,
            "model": self._model_info(),
        }
        if ex is not None and ex.target:
            result["ground_truth"] = {
                k: ex.target.get(k) for k in ("text", "labels", "distance_m", "rotation", "angle_deg")
            }
            try:
                score = score_answer(answer, ex.target)
                score.pop("parsed", None)
                result["score"] = score
            except ValueError as e:  # a damaged shipped target must not take the answer down with it
                result["score"] = {"error": str(e)}
        return answer, result

    # ---- trajectory --------------------------------------------------------------------------------------
    def generate_motion(self, image: PIL.Image.Image, instruction: str) -> tuple[np.ndarray, str]:
        """One frame + instruction -> ((T, 3) waypoints, camera frame, metres; the motion-token text)."""
        proc = self.processor
        if not proc.has_motion_tokens:
            raise _error("model: this checkpoint's processor has no motion tokens (stage 2 adds them)")
        decoding = MotionDecoding(self.limits.min_waypoints, self.limits.max_waypoints)
        text = self._prompt(1, instruction) + decoding.prompt_suffix(proc)
        batch = proc(images=[image], text=text, return_tensors="pt")
        prompt_len = batch["input_ids"].shape[1]
        with torch.inference_mode():
            out = self.model.generate(
                **batch,
                do_sample=False,
                pad_token_id=proc.tokenizer.pad_token_id,
                **decoding.generate_kwargs(proc, prompt_len),
            )
        ids = [proc.motion_start_token_id] + out[0, prompt_len:].tolist()
        xyz = proc.decode_motion(ids, strict=False)
        motion_text = "".join(proc.tokenizer.convert_ids_to_tokens(ids))
        return np.asarray(xyz, dtype=np.float64).reshape(-1, 3), motion_text

    @_readable_errors
    def predict_trajectory(
        self, frame: Any, instruction: str | None, example_id: str | None = ""
    ) -> tuple[go.Figure, str, dict]:
        """A frame + instruction -> (plotly 3D figure, PNG path of the frame with the trajectory drawn, JSON).

        JSON: trajectory (T, 3) list, uv (T, 2) pixels (None behind the camera), K and where it came from,
        predicted net motion in words, and for examples the ground truth, its mean/final waypoint errors.
        """
        ex = self.example(example_id, "action")
        if ex is not None:
            frame = ex.images[0]
            instruction = instruction if instruction and instruction.strip() else ex.question
        if isinstance(frame, (list, tuple)):
            if len(frame) != 1:
                raise _error(f"frame: upload exactly one frame, got {len(frame)}")
            frame = frame[0]
        if frame is None:
            raise _error("frame: upload a frame or pick an example")
        instruction = self.check_text(instruction, "instruction")
        image = self.load_frame(frame, "frame")
        xyz, motion_text = self.generate_motion(image, instruction)
        if ex is not None and ex.K is not None:
            K, k_source = ex.K, "example"
        else:
            K, k_source = (
                default_intrinsics(image.height, image.width),
                f"default (fovy {DEFAULT_FOVY_DEG:g} deg)",
            )
        gt = ex.trajectory if ex is not None else None
        uv, in_front = project(xyz, K) if len(xyz) else (np.zeros((0, 2)), np.zeros(0, bool))
        result: dict = {
            "trajectory": xyz.tolist(),
            "num_waypoints": int(len(xyz)),
            "uv": [p.tolist() if ok else None for p, ok in zip(uv, in_front, strict=True)],
            "K": np.asarray(K).tolist(),
            "K_source": k_source,
            "motion_text": motion_text,
            "net_motion": describe_displacement(xyz[-1] - xyz[0]).text if len(xyz) >= 2 else None,
            "instruction": instruction,
            "example_id": ex.id if ex else None,
            "ground_truth": gt.tolist() if gt is not None else None,
            "errors_m": None,
            "model": self._model_info(),
        }
        if gt is not None and len(gt) and len(xyz):
            n = min(len(gt), len(xyz))  # lengths differ: compare the common prefix, and the two endpoints
            result["errors_m"] = {
                "mean_waypoint": float(np.linalg.norm(xyz[:n] - gt[:n], axis=1).mean()),
                "final_waypoint": float(np.linalg.norm(xyz[-1] - gt[-1])),
                "compared_waypoints": int(n),
            }
        return trajectory_figure(xyz, gt), self.save_overlay(self.overlay(image, xyz, gt, K)), result

    def overlay(
        self, image: PIL.Image.Image, xyz: np.ndarray, gt: np.ndarray | None, K: np.ndarray
    ) -> PIL.Image.Image:
        """The frame with the trajectories drawn at their projections (prediction orange, truth cyan).

        xyz, gt: (T, 3) camera frame, metres; K: (3, 3) of `image`. Drawn on a copy scaled to
        `overlay_max_side`, the pixels scaled with it.
        """
        scale = min(1.0, self.limits.overlay_max_side / max(image.size))
        canvas = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        draw = PIL.ImageDraw.Draw(canvas)
        r = max(3, round(max(canvas.size) / 100))
        for pts, colour in ((gt, (0, 200, 255)), (xyz, (255, 140, 0))):
            if pts is None or not len(pts):
                continue
            uv, ok = project(pts, K)
            uv = [tuple((p * scale).tolist()) for p in uv[ok]]
            if len(uv) >= 2:
                draw.line(uv, fill=colour, width=max(2, r // 2))
            if uv:
                (x0, y0), (x1, y1) = uv[0], uv[-1]
                draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), outline=colour, fill=(40, 200, 40))
                draw.rectangle((x1 - r, y1 - r, x1 + r, y1 + r), outline=colour, fill=(220, 40, 40))
        return canvas


def trajectory_figure(xyz: np.ndarray, gt: np.ndarray | None = None) -> go.Figure:
    """Interactive 3D plot of (T, 3) camera-frame waypoints; plotted as (x, z, -y) so that up is up.

    Start: green circle, end: red square; the ground truth (when given) is a second, dashed trace.
    """
    fig = go.Figure()
    for pts, name, colour, dash in (
        (xyz, "prediction", "darkorange", "solid"),
        (gt, "ground truth", "teal", "dash"),
    ):
        if pts is None or not len(pts):
            continue
        x, y, z = pts[:, 0], pts[:, 2], -pts[:, 1]
        fig.add_trace(
            go.Scatter3d(
                x=x, y=y, z=z, mode="lines+markers", name=name,
                line={"color": colour, "width": 5, "dash": dash}, marker={"size": 3, "color": colour},
            )
        )  # fmt: skip
        for i, label, symbol, c in ((0, "start", "circle", "green"), (-1, "end", "square", "red")):
            fig.add_trace(
                go.Scatter3d(
                    x=[x[i]], y=[y[i]], z=[z[i]], mode="markers", name=f"{name} {label}",
                    marker={"size": 7, "color": c, "symbol": symbol, "line": {"color": colour, "width": 2}},
                )
            )  # fmt: skip
    fig.update_layout(
        scene={
            "xaxis_title": "x right (m)",
            "yaxis_title": "z forward (m)",
            "zaxis_title": "-y up (m)",
            "aspectmode": "data",
        },
        margin={"l": 0, "r": 0, "t": 30, "b": 0},
        title="Wrist trajectory, camera frame of the shown frame",
        legend={"orientation": "h"},
    )
    return fig


ROLLOUTS_ENV = (
    "VIPA_ROLLOUTS"  # folder of a closed-loop evaluation (vipa-eval --out, or the main job's robot/eval)
)


def default_rollouts_dir(model_path: str | None) -> Path | None:
    """`VIPA_ROLLOUTS`, else the main job's `robot/eval` beside a local checkpoint folder; None when absent."""
    env = os.environ.get(ROLLOUTS_ENV)
    if env:
        return Path(env)
    if model_path and Path(model_path).is_dir():
        guess = Path(model_path).resolve().parent / "robot" / "eval"
        if (guess / "results.json").is_file():
            return guess
    return None


def load_rollouts(folder: str | os.PathLike | None) -> dict | None:
    """The closed-loop evaluation in `folder` (`results.json` and each policy's `summary.json`): {"table",
    "videos": [{"label", "path", "policy", "task", "instruction", "seed", "success", "steps", "task_rate"}]}, or
    None when there is none. Damaged or missing files leave out what they held, never fail the Space."""
    if folder is None or not (Path(folder) / "results.json").is_file():
        return None
    try:
        results = json.loads((Path(folder) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    videos = []
    for summary_path in sorted(Path(folder).glob("*/summary.json")):
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            continue
        policy = summary.get("policy", summary_path.parent.name)
        for r in summary.get("records", []):
            path = r.get("video")
            if not path or not Path(path).is_file():
                continue
            task_stats = summary.get("per_task", {}).get(r["task"], {})
            outcome = (
                f"success in {r['steps']} steps"
                if r["success"]
                else (r.get("error") or f"failure ({r['steps']} steps)")
            )
            videos.append(
                {
                    "label": f"{policy} · {r['task']} · seed {r['seed']} · {outcome}",
                    "path": str(path), "policy": policy, "task": r["task"], "instruction": r.get("instruction"),
                    "seed": r["seed"], "success": bool(r["success"]), "steps": r["steps"],
                    "task_rate": (task_stats.get("successes"), task_stats.get("n")),
                }
            )  # fmt: skip
    order = list(results.get("policies", {}))  # the evaluated policy first, then the references
    videos.sort(
        key=lambda v: (order.index(v["policy"]) if v["policy"] in order else len(order), v["task"], v["seed"])
    )
    return {"table": results.get("table", ""), "videos": videos, "folder": str(folder)}


def _rollout_caption(video: dict) -> str:
    k, n = video["task_rate"]
    rate = f"{k}/{n} episodes of this task succeeded for {video['policy']}" if n else ""
    outcome = "**success**" if video["success"] else "**failure**"
    return (
        f'Task `{video["task"]}`: "{video["instruction"] or video["task"]}" · seed {video["seed"]} · {outcome} '
        f"after {video['steps']} steps. {rate}"
    )


def _banner(status: dict) -> str:
    css_class = "trained" if status["trained"] else "untrained"
    return f'<div id="vipa-model-status" class="{css_class}">\n\n{status["message"]}\n\n</div>'


def build_app(
    model: str | os.PathLike | Any | None = None,
    processor: Any = None,
    *,
    training_summary: dict | None = None,
    examples_dir: str | os.PathLike | None = EXAMPLES_DIR,
    limits: Limits | None = None,
    rollouts_dir: str | os.PathLike | None = None,
) -> gr.Blocks:
    """The Space as a `gr.Blocks` (queue configured; call `.launch()`).

    model: a checkpoint path or Hub repo id (default: `VIPA_MODEL`, else `DEFAULT_MODEL`), or a loaded
    `VipaForConditionalGeneration` together with its `processor`; for objects, `training_summary` (what
    `TRAINING_MARKER` holds) marks them trained. Raises `CheckpointNotFoundError` when no checkpoint is there.
    rollouts_dir: a closed-loop evaluation to play in the "Robot rollouts" tab (default: `default_rollouts_dir`).
    """
    path = None
    if model is None or isinstance(model, (str, os.PathLike)):
        path = str(model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
        model, processor, status = load_checkpoint(path)
    else:
        if processor is None:
            raise ValueError("processor: required when model is a model object, got None")
        status = checkpoint_status("<in-memory model>")
        if training_summary is not None:
            status.update(trained=True, summary=training_summary, message="In-memory model: trained.")
    examples = load_examples(examples_dir) if examples_dir else []
    demo = VipaDemo(model.eval(), processor, status, examples, limits or Limits())
    lim = demo.limits
    visual = [(ex.label, ex.id) for ex in examples if ex.kind == "visual"]
    action = [(ex.label, ex.id) for ex in examples if ex.kind == "action"]
    none_choice = [("(none: use my upload)", "")]
    # the first visit opens on a test example, so the first click on Ask answers something
    first_visual = demo._by_id[visual[0][1]] if visual else None
    rollouts = load_rollouts(rollouts_dir if rollouts_dir is not None else default_rollouts_dir(path))

    with gr.Blocks(
        title="VIPA-VLA: spatial QA and 3D trajectories",
        delete_cache=(
            lim.cache_max_age_s,
            lim.cache_max_age_s,
        ),  # (how often, how old): a Space runs for weeks
    ) as app:
        gr.Markdown(
            "# VIPA-VLA\nSpatial-aware vision-language-action model (visual-physical alignment from human "
            "videos). Ask where a hand is relative to an object, or predict the 3D wrist trajectory."
        )
        gr.Markdown(_banner(status))
        with gr.Tab("Spatial QA", id="spatial-qa"):
            with gr.Row():
                with gr.Column():
                    qa_files = gr.File(
                        label=f"Frames (1-{lim.max_frames}, in time order)",
                        file_count="multiple",
                        file_types=["image"],
                        type="filepath",
                        elem_id="qa-frames",
                    )
                    qa_example = gr.Dropdown(
                        none_choice + visual,
                        value=first_visual.id if first_visual else "",
                        label="Or a Hand3D test example (uploads are used when none is chosen)",
                        elem_id="qa-example",
                    )
                    qa_preview = gr.Gallery(
                        value=[str(p) for p in first_visual.images] if first_visual else None,
                        label="Example frames",
                        columns=4,
                        height=160,
                        interactive=False,
                    )
                    qa_template = gr.Dropdown(
                        [""] + list(QUESTION_TEMPLATES), value="", label="Question template (category)"
                    )
                    qa_question = gr.Textbox(
                        value=first_visual.question if first_visual else "",
                        label="Question",
                        max_length=lim.max_text_chars,
                        lines=2,
                        elem_id="qa-question",
                    )
                    qa_button = gr.Button("Ask", variant="primary", elem_id="qa-ask")
                with gr.Column():
                    qa_answer = gr.Textbox(label="Answer", interactive=False, elem_id="qa-answer")
                    qa_json = gr.JSON(
                        label="Parsed direction and distance, ground truth and score", elem_id="qa-json"
                    )
        with gr.Tab("Trajectory", id="trajectory"):
            with gr.Row():
                with gr.Column():
                    tr_file = gr.File(
                        label="Frame",
                        file_count="single",
                        file_types=["image"],
                        type="filepath",
                        elem_id="traj-frame",
                    )
                    tr_example = gr.Dropdown(none_choice + action, value="", label="Or a Hand3D test example")
                    tr_instruction = gr.Textbox(
                        label="Instruction", value=DEFAULT_INSTRUCTION, max_length=lim.max_text_chars, lines=2
                    )
                    tr_button = gr.Button("Predict trajectory", variant="primary", elem_id="traj-predict")
                    gr.Markdown(
                        "Projection: examples use their camera intrinsics K when the dataset has them; "
                        "uploads (and examples without K) use a pinhole K with a "
                        f"{DEFAULT_FOVY_DEG:g} degree vertical field of view, square pixels and the "
                        "principal point at the image centre. Waypoints: wrist xyz in the camera frame "
                        "of the frame (x right, y down, z forward, metres). "
                        "Prediction orange, ground truth cyan; start green circle, end red square."
                    )
                with gr.Column():
                    tr_plot = gr.Plot(label="3D trajectory", elem_id="traj-plot")
                    tr_overlay = gr.Image(
                        label="Projected onto the frame",
                        type="filepath",
                        interactive=False,
                        elem_id="traj-overlay",
                    )
                    tr_json = gr.JSON(label="Trajectory (camera frame, metres)", elem_id="traj-json")
        with gr.Tab("Robot rollouts", id="rollouts"):
            if rollouts is None:
                gr.Markdown(
                    "No closed-loop evaluation here yet. `make demo` runs one (Meta-World: expert "
                    "demonstrations, stage 3, rollouts on unseen seeds; phases 10-12), and `vipa-eval --policy "
                    f"CKPT --out DIR` another; serve it with `--rollouts DIR` or ${ROLLOUTS_ENV}."
                )
            else:
                choices = [(v["label"], v["path"]) for v in rollouts["videos"]]
                first = rollouts["videos"][0] if rollouts["videos"] else None
                gr.Markdown(
                    "Closed-loop Meta-World evaluation (cells: successes/episodes, rate, 95 % Wilson interval; "
                    "every policy meets the same scenes):\n\n```\n" + rollouts["table"] + "\n```",
                    elem_id="rollout-table",
                )
                ro_choice = gr.Dropdown(
                    choices,
                    value=first["path"] if first else None,
                    label="Rollout video",
                    elem_id="rollout-choice",
                )
                ro_video = gr.Video(
                    value=first["path"] if first else None,
                    label="Rollout",
                    interactive=False,
                    elem_id="rollout-video",
                )
                ro_caption = gr.Markdown(_rollout_caption(first) if first else "", elem_id="rollout-caption")
                by_path = {v["path"]: v for v in rollouts["videos"]}
                ro_choice.change(
                    lambda p: (p, _rollout_caption(by_path[p])) if p in by_path else (None, ""),
                    ro_choice,
                    [ro_video, ro_caption],
                    api_visibility="private",
                )
        gr.Markdown(
            f"Limits: {lim.max_frames} frames, {lim.max_image_side} px a side, {lim.max_file_size} per file, "
            f"{lim.max_text_chars} characters. API: `/spatial_qa`, `/predict_trajectory` (see 'Use via API')."
        )

        def show_example(example_id: str) -> tuple[list, str]:
            ex = demo._by_id.get(example_id) if example_id else None
            return ([str(p) for p in ex.images], ex.question) if ex else ([], gr.skip())

        qa_example.change(show_example, qa_example, [qa_preview, qa_question], api_visibility="private")
        # an upload means "my frames": the preselected example would otherwise take precedence
        qa_files.upload(lambda: "", None, qa_example, api_visibility="private")
        qa_template.change(
            lambda k: QUESTION_TEMPLATES.get(k, gr.skip()) if k else gr.skip(),
            qa_template,
            qa_question,
            api_visibility="private",
        )
        tr_example.change(
            lambda i: demo._by_id[i].question if i in demo._by_id else gr.skip(),
            tr_example,
            tr_instruction,
            api_visibility="private",
        )
        qa_button.click(
            demo.spatial_qa,
            [qa_files, qa_question, qa_example],
            [qa_answer, qa_json],
            api_name="spatial_qa",
            api_description="1-4 frames and a question -> answer and JSON (parsed labels, distance, score).",
        )
        tr_button.click(
            demo.predict_trajectory,
            [tr_file, tr_instruction, tr_example],
            [tr_plot, tr_overlay, tr_json],
            api_name="predict_trajectory",
            api_description="A frame and an instruction -> 3D plot, projected frame, JSON (trajectory).",
        )
    app.queue(max_size=lim.queue_max_size, default_concurrency_limit=lim.concurrency_limit)
    app.vipa_demo = demo  # for scripts and tests: the predictions without a server
    app.vipa_rollouts = rollouts  # the closed-loop evaluation the Robot rollouts tab plays (None: none)
    return app


def main(argv: list[str] | None = None) -> int:
    """CLI `python -m spaces_demo.app [--model PATH] [--host 127.0.0.1] [--port N]`; returns the exit code."""
    parser = argparse.ArgumentParser(description="Serve the VIPA-VLA demo (Gradio).")
    parser.add_argument(
        "--model",
        default=None,
        help=f"checkpoint folder or Hub repo id (default: ${MODEL_ENV} or {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--host", default=os.environ.get("GRADIO_SERVER_NAME", DEFAULT_HOST), help="interface to bind"
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT)), help="port"
    )
    parser.add_argument(
        "--examples", default=str(EXAMPLES_DIR), help="folder with examples.json (export_examples)"
    )
    parser.add_argument(
        "--rollouts",
        default=None,
        help=f"closed-loop evaluation folder to play (default: ${ROLLOUTS_ENV} or the main job's)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    try:
        app = build_app(args.model, examples_dir=args.examples, rollouts_dir=args.rollouts)
    except CheckpointNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = app.vipa_demo.status
    print(
        ("trained checkpoint: " if status["trained"] else "WARNING untrained weights: ") + status["path"],
        flush=True,
    )
    _, url, _ = app.launch(
        server_name=args.host,
        server_port=args.port,
        max_file_size=app.vipa_demo.limits.max_file_size,
        # the example frames shown in the gallery, and the rollout videos
        allowed_paths=[str(args.examples)] + ([app.vipa_rollouts["folder"]] if app.vipa_rollouts else []),
        prevent_thread_lock=True,
        quiet=True,
    )
    print(f"VIPA-VLA demo running on {url or f'http://{args.host}:{args.port}/'}", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
