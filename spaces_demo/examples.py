"""Hand3D test-split examples shipped with the Space: export from a built dataset, tolerant loading.

A folder of PNGs plus one `examples.json`; the Space reads it without `datasets` or parquet, so it stays small
and loads on any Space hardware. A built Hand3D folder (`hand3d build`) is only needed to export.

    from spaces_demo.examples import export_examples, load_examples
    export_examples("hand3d", "spaces_demo/examples", n=4)      # 4 visual + 4 action rows of the test split
    examples = load_examples("spaces_demo/examples")            # [] when the folder is missing or empty
    examples[0].question, examples[0].target["labels"]

`examples.json` layout (a list; one object per example):

    {"id": str, "kind": "visual" | "action", "task_type": str, "source": str, "question": str,
     "images": [PNG file names in the folder], "target": {...} (Hand3D target struct, metrics.score_answer),
     "trajectory": [[x, y, z], ...] (action, camera frame of the shown frame, metres) or null,
     "K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] or null}

Hand3D rows carry no intrinsics (DESIGN.md §3 lists no K column), so `K` is taken from a row's `K` /
`intrinsics` column when a later dataset version has one, and is null otherwise; the app then uses
`default_intrinsics` (the synthetic source's mid field of view). Loading never raises on a bad entry: it is
skipped with a warning, because a Space must start even when one shipped example is damaged.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

__all__ = ["Example", "export_examples", "load_examples", "default_intrinsics", "DEFAULT_FOVY_DEG"]

logger = logging.getLogger(__name__)

EXAMPLES_FILE = "examples.json"
# Vertical field of view for images without intrinsics: the middle of the synthetic source's range
# (hand3d_dataset.sources.synth.SynthConfig.fovy_deg = 60-75 degrees), typical of head-mounted cameras.
DEFAULT_FOVY_DEG = 65.0
_MAX_EXAMPLE_FRAMES = 4  # the Space's frame limit; longer rows are cut to their last frames
# Action rows whose answer is text, not a trajectory: nothing for the Trajectory tab to show.
_TEXT_ANSWER_ACTION_TASKS = ("motion_translation",)


@dataclass
class Example:
    """One shipped example.

    images: frame paths (1-4); target: Hand3D target struct (labels, distance_m, rotation, angle_deg, ...);
    trajectory: (T, 3) wrist waypoints, camera frame of the shown frame, metres (action rows) or None;
    K: (3, 3) intrinsics of the frames or None (use `default_intrinsics`).
    """

    id: str  # Hand3D row id
    kind: str  # "visual" (Spatial QA tab) or "action" (Trajectory tab)
    task_type: str  # Hand3D task type, e.g. "spatial_relationship"
    source: str  # Hand3D source, e.g. "synth"
    question: str  # the user text of the row
    images: list[Path]  # absolute frame paths
    target: dict = field(default_factory=dict)  # structured ground truth
    trajectory: np.ndarray | None = None  # (T, 3) float64 or None
    K: np.ndarray | None = None  # (3, 3) float64 or None

    @property
    def label(self) -> str:
        """Dropdown text: short and unique."""
        q = self.question if len(self.question) <= 60 else self.question[:57] + "..."
        return f"{self.id} [{self.task_type}] {q}"


def default_intrinsics(height: int, width: int, fovy_deg: float = DEFAULT_FOVY_DEG) -> np.ndarray:
    """(3, 3) pinhole K for an image of (height, width) px: square pixels, principal point at the centre,
    `fy = (H / 2) / tan(fovy / 2)` (pixel centres at integers, as the synthetic source renders)."""
    if height < 1 or width < 1:
        raise ValueError(f"height, width: expected >= 1, got ({height}, {width})")
    if not 1.0 < fovy_deg < 179.0:
        raise ValueError(f"fovy_deg: expected a value in (1, 179), got {fovy_deg}")
    f = (height / 2.0) / math.tan(math.radians(fovy_deg) / 2.0)
    return np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


def _user_text(messages: list[dict]) -> str:
    for m in messages:
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content
            return "".join(c.get("text") or "" for c in content if c.get("type") == "text")
    return ""


def _row_intrinsics(row: dict) -> list | None:
    for key in ("K", "intrinsics"):
        value = row.get(key)
        if value is not None:
            K = np.asarray(value, dtype=np.float64)
            K = K[0] if K.ndim == 3 else K  # per-frame K: the shown frame's
            if K.shape == (3, 3) and np.isfinite(K).all():
                return K.tolist()
    return None


def export_examples(dataset_dir: str | Path, out_dir: str | Path, n: int = 4, seed: int = 0) -> list[dict]:
    """Write up to `n` Hand3D-visual and `n` Hand3D-action examples of the test split to `out_dir`.

    dataset_dir: a built Hand3D folder (or anything `load_dataset(dataset_dir, config)` reads). Rows are
    picked one task type at a time, round robin, so that every category shows up. Action rows without an
    image, and motion-translation rows (their answer is text), are skipped. Returns the JSON entries written.
    """
    from hand3d_dataset.loading import load_hand3d  # export-time only: the Space never needs `datasets`

    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    for kind in ("visual", "action"):
        try:
            ds = load_hand3d(dataset_dir, kind, split="test")  # content-keyed cache: this build's rows
        except (ValueError, FileNotFoundError) as e:
            logger.warning("no %s test split in %s (%s); skipped", kind, dataset_dir, e)
            continue
        entries += _export_split(ds, kind, out, n, seed, first_index=len(entries))
    (out / EXAMPLES_FILE).write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return entries


def _export_split(ds: Any, kind: str, out: Path, n: int, seed: int, first_index: int) -> list[dict]:
    """Up to n rows of one loaded split, round robin over task types, frames written as PNG."""
    entries: list[dict] = []
    by_task: dict[str, list[int]] = {}
    for i, (task, images) in enumerate(zip(ds["task_type"], ds["images"], strict=True)):
        if images and task not in _TEXT_ANSWER_ACTION_TASKS:
            by_task.setdefault(task, []).append(i)
    rng = np.random.default_rng(seed)
    queues = {t: list(rng.permutation(idx)) for t, idx in sorted(by_task.items())}
    picked: list[int] = []
    while len(picked) < n and any(queues.values()):
        for t in queues:
            if queues[t] and len(picked) < n:
                picked.append(int(queues[t].pop(0)))
    for i in picked:
        row = ds[i]
        names = []
        for j, image in enumerate(row["images"][-_MAX_EXAMPLE_FRAMES:]):
            name = f"{kind}-{first_index + len(entries):03d}-{j}.png"
            image.convert("RGB").save(out / name)
            names.append(name)
        trajectory = row.get("trajectory") or (row["target"] or {}).get("trajectory") or None
        entries.append(
            {
                "id": str(row["id"]),
                "kind": kind,
                "task_type": row["task_type"],
                "source": row["source"],
                "question": _user_text(row["messages"]),
                "images": names,
                "target": row["target"],
                "trajectory": trajectory if kind == "action" else None,
                "K": _row_intrinsics(row),
            }
        )
    return entries


def _parse_entry(entry: Any, folder: Path) -> Example:
    if not isinstance(entry, dict):
        raise ValueError(f"expected an object, got {type(entry).__name__}")
    kind = entry.get("kind")
    if kind not in ("visual", "action"):
        raise ValueError(f"kind: expected 'visual' or 'action', got {kind!r}")
    names = entry.get("images") or []
    if not 1 <= len(names) <= _MAX_EXAMPLE_FRAMES:
        raise ValueError(f"images: expected 1-{_MAX_EXAMPLE_FRAMES} frames, got {len(names)}")
    images = []
    for name in names:
        path = (folder / str(name)).resolve()
        if folder.resolve() not in path.parents:
            raise ValueError(f"images: {name!r} points outside the examples folder")
        with PIL.Image.open(path) as im:
            im.verify()  # a truncated or corrupt PNG fails here, not later in a request
        images.append(path)
    trajectory = entry.get("trajectory")
    if trajectory is not None:
        trajectory = np.asarray(trajectory, dtype=np.float64)
        if trajectory.ndim != 2 or trajectory.shape[1] != 3 or not np.isfinite(trajectory).all():
            raise ValueError(f"trajectory: expected finite (T, 3), got shape {trajectory.shape}")
    K = entry.get("K")
    if K is not None:
        K = np.asarray(K, dtype=np.float64)
        if K.shape != (3, 3) or not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise ValueError(f"K: expected a finite (3, 3) matrix with fx, fy > 0, got {K.tolist()}")
    target = entry.get("target") or {}
    if not isinstance(target, dict):
        raise ValueError(f"target: expected an object, got {type(target).__name__}")
    return Example(
        id=str(entry.get("id", "")),
        kind=kind,
        task_type=str(entry.get("task_type", "")),
        source=str(entry.get("source", "")),
        question=str(entry.get("question", "")),
        images=images,
        target=target,
        trajectory=trajectory,
        K=K,
    )


def load_examples(folder: str | Path) -> list[Example]:
    """The examples in `folder/examples.json`: [] when absent or unreadable; bad entries are skipped with a
    warning."""
    folder = Path(folder)
    path = folder / EXAMPLES_FILE
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        logger.warning("%s unreadable (%s); no examples", path, e)
        return []
    if not isinstance(entries, list):
        logger.warning("%s: expected a JSON list, got %s; no examples", path, type(entries).__name__)
        return []
    examples, seen = [], set()
    for i, entry in enumerate(entries):
        try:
            ex = _parse_entry(entry, folder)
        except (OSError, ValueError, TypeError, PIL.UnidentifiedImageError) as e:
            logger.warning("%s: example %d skipped: %s", path, i, e)
            continue
        if ex.id in seen:
            ex.id = f"{ex.id}#{i}"
        seen.add(ex.id)
        examples.append(ex)
    return examples
