"""Scoring Hand3D-test answers (paper §4.4, Table 8, Figures 8-9): the part that needs no model.

    from hand3d_dataset.scoring import evaluate_predictions, load_rows, plot_figure8, trivial_baseline_predictions
    train, test = load_rows("hand3d", "visual", "train"), load_rows("hand3d", "visual", "test")
    baseline = evaluate_predictions(trivial_baseline_predictions(train, test), test)
    baseline["text"]["overall"]["direction_score"]
    plot_figure8({"baseline": baseline["text"]}, "eval/figure8.png")

Generating a model's answers and scoring them end to end is `evaluation.hand3d_test` (`hand3d evaluate`).

Rows are scored by what their answer is:

- text answers (every Hand3D-visual task type, and `motion_translation` of Hand3D-action) go through
  `metrics.evaluate_answers` against the structured `target`: direction score out of 3, distance error in
  metres, rotation accuracy and angle error for camera movement, unparseable counts; overall and per task.
- motion answers (`instructional_motion_generation`, `contextual_motion_prediction`) are decoded leniently
  (`MotionTokenizer.decode_text(strict=False)`) and compared with the row's ground-truth `trajectory` (T, 3),
  camera frame of the shown frame, metres. An output is *decodable* when at least one waypoint comes back; the
  errors are means over decodable outputs only, so read them with `decodable_fraction` beside them.
  Length mismatch: `waypoint_error_m` is the mean Euclidean error over the common prefix (the first
  min(T_pred, T_gt) waypoints; both start at the same frame, the shown one or, for contextual prediction,
  the one after it, so waypoint k is the same time step in both), `final_error_m` compares the two LAST
  points whatever the lengths (where the hand ends up), and mismatches are counted (`n_length_mismatch`,
  `mean_abs_length_diff`). No resampling: it would invent time steps the model never predicted.

Figure 8 is the histogram of direction scores and distance errors on the text rows; Figure 9 draws the
predicted (blue) and ground-truth (red) trajectories of a few motion rows. The dataset stores no camera
intrinsics per row, so Figure 9 shows the frame beside a 3D plot of the two trajectories; a row holding a
`K` column (3x3, pixels, of the stored image) is drawn projected onto its frame instead.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hand3d_dataset.atomic import save_figure
from hand3d_dataset.language import AXES, NO_MOVEMENT_TEXT, NO_ROTATION_TEXT
from hand3d_dataset.metrics import evaluate_answers
from processing_vipa.motion_tokenizer import MotionTokenizer

__all__ = [
    "CONFIGS",
    "MOTION_TASK_TYPES",
    "load_rows",
    "is_motion_row",
    "motion_metrics",
    "evaluate_predictions",
    "summarize",
    "finite",
    "trivial_baseline_predictions",
    "plot_figure8",
    "plot_figure9",
]

CONFIGS = ("visual", "action")
# Task types whose answer is a `<motion>` … `</motion>` trajectory (samples_action.py); all others are text.
MOTION_TASK_TYPES = ("instructional_motion_generation", "contextual_motion_prediction")
# Distance/angle decimals of the trivial baseline's answers: finer than the dataset's 2/1 so that rounding
# adds at most 0.5 mm / 0.05 degrees to its errors.
BASELINE_DISTANCE_DECIMALS = 3
BASELINE_ANGLE_DECIMALS = 1


# ---- data ---------------------------------------------------------------------------------------------------
def load_rows(
    dataset_dir: str | os.PathLike, config: str, split: str = "test", limit: int | None = None
) -> list[dict]:
    """Rows of one split of a `hand3d build` folder, images decoded to PIL, columns checked.

    Raises `ValueError` naming the folder, config and split when they are missing.
    """
    from hand3d_dataset.loading import load_hand3d

    if config not in CONFIGS:
        raise ValueError(f"config: expected one of {CONFIGS}, got {config!r}")
    ds = load_hand3d(dataset_dir, config, split=split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"dataset_dir: Hand3D-{config} split {split!r} in {str(dataset_dir)!r} is empty")
    return list(ds)


def _answer_text(row: Mapping) -> str:
    """Ground-truth answer: the text of the last assistant message."""
    for m in reversed(row["messages"]):
        if m["role"] == "assistant":
            return "".join(c.get("text") or "" for c in m["content"] if c.get("type") == "text")
    raise ValueError(f"row {row.get('id')!r}: no assistant message")


def _scoring_target(target: Mapping) -> dict:
    """The keys `metrics.score_answer` reads. Parquet structs give every row every key, and a camera row's
    labels come back as {x: None, y: None, z: None}: without a distance that is no displacement target."""
    out: dict = {}
    if target.get("distance_m") is not None:
        out["labels"], out["distance_m"] = target["labels"], target["distance_m"]
    if target.get("angle_deg") is not None:
        out["rotation"], out["angle_deg"] = target.get("rotation"), target["angle_deg"]
    return out


def is_motion_row(row: Mapping) -> bool:
    return row["task_type"] in MOTION_TASK_TYPES


# ---- metrics ------------------------------------------------------------------------------------------------
def motion_metrics(
    predictions: Sequence[str],
    trajectories: Sequence[Any],
    task_types: Sequence[str] | None = None,
    motion_tokenizer: MotionTokenizer | None = None,
) -> dict:
    """Trajectory errors of motion-token answers (see the module docstring for the length policy).

    predictions: N generated texts; trajectories: N ground-truth (T_i, 3) wrist waypoints, camera frame, metres.
    Returns {"overall": agg, "per_task": {task: agg}, "samples": [...]}; agg holds n, n_decodable,
    decodable_fraction, n_strict (exactly one clean span), waypoint_error_m and final_error_m (means over
    decodable outputs; None when none is), n_length_mismatch and mean_abs_length_diff (waypoints).
    """
    if len(predictions) != len(trajectories):
        raise ValueError(
            f"predictions/trajectories: lengths differ ({len(predictions)} vs {len(trajectories)})"
        )
    tok = motion_tokenizer or MotionTokenizer()
    samples = []
    for i, (text, gt) in enumerate(zip(predictions, trajectories)):
        g = np.asarray(gt, dtype=np.float64)
        if g.ndim != 2 or g.shape[1] != 3 or len(g) == 0 or not np.isfinite(g).all():
            raise ValueError(f"trajectories[{i}]: expected a finite (T >= 1, 3) array, got shape {g.shape}")
        if not isinstance(text, str):
            raise ValueError(f"predictions[{i}]: expected a str, got {type(text).__name__}")
        dec = tok.decode_text(text, strict=False)
        try:
            tok.decode_text(text, strict=True)
            strict = True
        except ValueError:
            strict = False
        p = dec.xyz
        s: dict = {"decodable": len(p) > 0, "strict": strict, "len_pred": len(p), "len_gt": len(g)}
        if len(p):
            n = min(len(p), len(g))
            s["waypoint_error_m"] = float(np.linalg.norm(p[:n] - g[:n], axis=1).mean())
            s["final_error_m"] = float(np.linalg.norm(p[-1] - g[-1]))
            s["predicted"] = p.tolist()
        if task_types is not None:
            s["task_type"] = task_types[i]
        samples.append(s)

    def agg(ss: list[dict]) -> dict:
        dec = [s for s in ss if s["decodable"]]

        def mean(key: str) -> float | None:
            return float(np.mean([s[key] for s in dec])) if dec else None

        return {
            "n": len(ss),
            "n_decodable": len(dec),
            "decodable_fraction": len(dec) / len(ss) if ss else None,
            "n_strict": sum(s["strict"] for s in ss),
            "waypoint_error_m": mean("waypoint_error_m"),
            "final_error_m": mean("final_error_m"),
            "n_length_mismatch": sum(s["len_pred"] != s["len_gt"] for s in dec),
            "mean_abs_length_diff": float(np.mean([abs(s["len_pred"] - s["len_gt"]) for s in dec]))
            if dec
            else None,
        }

    per_task = {}
    if task_types is not None:
        for tt in dict.fromkeys(task_types):
            per_task[tt] = agg([s for s in samples if s["task_type"] == tt])
    return {"overall": agg(samples), "per_task": per_task, "samples": samples}


def evaluate_predictions(
    predictions: Sequence[str], rows: Sequence[Mapping], motion_tokenizer: MotionTokenizer | None = None
) -> dict:
    """Scores N answers against N dataset rows (any mix of Hand3D-visual and -action rows).

    Returns {"n", "text": {"overall", "per_task", "samples"} or None, "motion": `motion_metrics` result or
    None}; text samples carry the row id, task type and prediction.
    """
    if isinstance(predictions, str):
        raise ValueError("predictions: expected a list of strings, got a single str")
    if len(predictions) != len(rows):
        raise ValueError(f"predictions/rows: lengths differ ({len(predictions)} vs {len(rows)})")
    text_i = [i for i, r in enumerate(rows) if not is_motion_row(r)]
    motion_i = [i for i, r in enumerate(rows) if is_motion_row(r)]
    result: dict = {"n": len(rows), "text": None, "motion": None}
    if text_i:
        res = evaluate_answers(
            [predictions[i] for i in text_i],
            [_scoring_target(rows[i]["target"]) for i in text_i],
            [rows[i]["task_type"] for i in text_i],
        )
        for i, s in zip(text_i, res["samples"]):
            s.update(id=rows[i].get("id"), prediction=predictions[i])
        result["text"] = res
    if motion_i:
        for i in motion_i:
            if "trajectory" not in rows[i]:
                raise ValueError(f"rows[{i}]: motion row {rows[i].get('id')!r} has no 'trajectory' column")
        res = motion_metrics(
            [predictions[i] for i in motion_i],
            [rows[i]["trajectory"] for i in motion_i],
            [rows[i]["task_type"] for i in motion_i],
            motion_tokenizer,
        )
        for i, s in zip(motion_i, res["samples"]):
            s.update(id=rows[i].get("id"), prediction=predictions[i])
        result["motion"] = res
    return result


# ---- trivial baseline ---------------------------------------------------------------------------------------
def _most_frequent(values: list) -> Any:
    """Most frequent value; ties go to the one seen first (Counter keeps insertion order)."""
    return Counter(values).most_common(1)[0][0]


def _baseline_text(rows: list[Mapping]) -> str:
    """Canonical answer of the most frequent label per axis / rotation and the mean distance / angle."""
    targets = [_scoring_target(r["target"]) for r in rows]
    parts = []
    disp = [t for t in targets if "distance_m" in t]
    if disp:
        labels = [_most_frequent([t["labels"][ax] for t in disp]) for ax in AXES]
        d = float(np.mean([t["distance_m"] for t in disp]))
        words = " and ".join(lab for lab in labels if lab)
        parts.append(f"{words or NO_MOVEMENT_TEXT}, {d:.{BASELINE_DISTANCE_DECIMALS}f} m")
    rot = [t for t in targets if "angle_deg" in t]
    if rot:
        label = _most_frequent([t["rotation"] for t in rot])
        a = float(np.mean([t["angle_deg"] for t in rot]))
        parts.append(f"{label or NO_ROTATION_TEXT}, {a:.{BASELINE_ANGLE_DECIMALS}f} degrees")
    return "; ".join(parts)


def _mean_trajectory(rows: list[Mapping]) -> np.ndarray:
    """(T_med, 3) per-step mean of the training trajectories, T_med their median length; each step averages
    the trajectories long enough to have it."""
    trajs = [np.asarray(r["trajectory"], dtype=np.float64) for r in rows]
    T = max(1, int(np.median([len(t) for t in trajs])))
    return np.stack([np.mean([t[k] for t in trajs if len(t) > k], axis=0) for k in range(T)])


def trivial_baseline_predictions(
    train_rows: Sequence[Mapping],
    test_rows: Sequence[Mapping],
    motion_tokenizer: MotionTokenizer | None = None,
) -> list[str]:
    """The "most frequent labels, mean distance" baseline of Table 8, per task type of the training rows.

    Text rows: the most frequent label of each axis (no label counts as a label) and the mean distance over the
    training rows of the same task type, written canonically ("left and down, 0.213 m"; all axes without
    label: "no significant movement, 0.213 m"); camera rows likewise with the rotation words and mean angle.
    Motion rows: the per-step mean training trajectory of the task type as motion tokens. A test task type
    absent from training uses all training rows of the same answer kind.
    """
    tok = motion_tokenizer or MotionTokenizer()
    by_task: dict[str, list[Mapping]] = {}
    for r in train_rows:
        by_task.setdefault(r["task_type"], []).append(r)
    cache: dict[str, str] = {}
    out = []
    for r in test_rows:
        tt = r["task_type"]
        if tt not in cache:
            pool = by_task.get(tt) or [t for t in train_rows if is_motion_row(t) == is_motion_row(r)]
            if not pool:
                raise ValueError(
                    f"train_rows: no training row to build a baseline answer for task type {tt!r}"
                )
            cache[tt] = tok.encode(_mean_trajectory(pool)).text if is_motion_row(r) else _baseline_text(pool)
        out.append(cache[tt])
    return out


# ---- figures ------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_figure8(text_results: Mapping[str, Mapping], path: str | os.PathLike) -> Path:
    """Figure 8: histograms of direction scores (left) and distance errors (right), one series per model.

    text_results: model name -> the "text" part of an `evaluate_predictions` result (its displacement samples
    are drawn; camera-only samples have no direction score).
    """
    plt = _pyplot()
    fig, (ax_dir, ax_dist) = plt.subplots(1, 2, figsize=(10, 3.8))
    series = {
        name: [s for s in res["samples"] if "direction_score" in s]
        for name, res in text_results.items()
        if res
    }
    errors = [s["distance_error_m"] for ss in series.values() for s in ss]
    top = max([0.05, *errors])
    bins = np.linspace(0.0, top, 16)
    width = 0.8 / max(1, len(series))
    for k, (name, ss) in enumerate(series.items()):
        scores = np.array([s["direction_score"] for s in ss])
        frac = [float(np.mean(scores == v)) if len(scores) else 0.0 for v in range(4)]
        ax_dir.bar(np.arange(4) - 0.4 + width * (k + 0.5), frac, width=width, label=name)
        ax_dist.hist([s["distance_error_m"] for s in ss], bins=bins, alpha=0.55, label=name)
    ax_dir.set(xticks=range(4), xlabel="direction score (axes correct of 3)", ylabel="fraction of samples")
    ax_dist.set(xlabel="distance error (m)", ylabel="samples")
    ax_dir.legend(fontsize=8)
    ax_dist.legend(fontsize=8)
    fig.suptitle("Hand3D-test: direction scores and distance errors")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_figure9(
    rows: Sequence[Mapping], predicted: Sequence[np.ndarray | None], path: str | os.PathLike
) -> Path:
    """Figure 9: predicted (blue) vs ground-truth (red) wrist trajectories of motion rows.

    rows: motion rows (their first image, `trajectory` and, when present, `K`); predicted: one (T, 3) array per
    row, camera frame, metres, or None when the output was undecodable. With a `K` column the trajectories are
    projected onto the frame; without one (the current Hand3D layout) the frame is shown beside a 3D plot.
    """
    from hand3d_dataset.cameras import project

    plt = _pyplot()
    n = len(rows)
    if n == 0:
        raise ValueError("rows: no motion rows to draw")
    fig = plt.figure(figsize=(7, 3.2 * n))
    for k, (row, pred) in enumerate(zip(rows, predicted)):
        gt = np.asarray(row["trajectory"], dtype=np.float64)
        K = row.get("K")
        ax_img = fig.add_subplot(n, 2, 2 * k + 1)
        if row["images"]:
            ax_img.imshow(np.asarray(row["images"][0].convert("RGB")))
        ax_img.set_title(f"{row['task_type']}\n{row.get('id', '')}", fontsize=7)
        ax_img.axis("off")
        if K is not None and row["images"]:
            for traj, color in ((gt, "red"), (pred, "blue")):
                if traj is not None and len(traj):
                    uv, _ = project(np.asarray(traj), np.asarray(K, dtype=np.float64).reshape(3, 3))
                    ax_img.plot(uv[:, 0], uv[:, 1], "-o", color=color, ms=2)
        ax3 = fig.add_subplot(n, 2, 2 * k + 2, projection="3d")
        ax3.plot(gt[:, 0], gt[:, 2], -gt[:, 1], "-o", color="red", ms=2, label="ground truth")
        if pred is not None and len(pred):
            p = np.asarray(pred)
            ax3.plot(p[:, 0], p[:, 2], -p[:, 1], "-o", color="blue", ms=2, label="predicted")
        else:
            ax3.set_title("prediction undecodable", fontsize=7)
        # camera frame drawn with z (depth) as the plot's y and image-up as the plot's z, so "up" looks up
        ax3.set(xlabel="x right (m)", ylabel="z forward (m)", zlabel="up, -y (m)")
        ax3.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)


# ---- end to end ---------------------------------------------------------------------------------------------
def summarize(res: dict) -> dict:
    """The Table 8 numbers of one config: text overall + motion overall, flat."""
    t = (res.get("text") or {}).get("overall") or {}
    m = (res.get("motion") or {}).get("overall") or {}
    return {
        "direction_score": t.get("direction_score"),
        "distance_error_m": t.get("distance_error_m"),
        "n_unparseable": t.get("n_unparseable"),
        "motion_waypoint_error_m": m.get("waypoint_error_m"),
        "motion_final_error_m": m.get("final_error_m"),
        "motion_decodable_fraction": m.get("decodable_fraction"),
    }


def finite(obj: Any) -> Any:
    """JSON has no NaN/inf: such floats (none are expected) become None rather than invalid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
