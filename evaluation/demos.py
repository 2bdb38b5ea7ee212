"""Demonstrations from scripted experts, recorded as a LeRobot v3 dataset (the stage-3 writer): `vipa-demos`.

    vipa-demos metaworld --tasks drawer-open-v3,reach-v3 --episodes 20 --seed 0 --image-size 128 --out demos/mw

    from evaluation.demos import DemoConfig, record_demos
    report = record_demos(DemoConfig(out="demos/mw", tasks="drawer-open-v3", episodes=20))
    report["tasks"]["drawer-open-v3"]    # {"recorded": 20, "failed": 0, "seeds": [...], "failed_seeds": []}

Episode k of a task is the expert's attempt on seed `seed + k` (the seed fixes the scene); an attempt that does
not succeed within `max_steps` is dropped and counted (`failed`), never written. Each kept episode holds every
step up to and including the first success: `observation.images.image` (H, W, 3), `observation.state` (4,),
`action` (4,) (the expert's action as the environment executed it, clipped to [-1, 1]) and the task's
instruction as its task text.

The dataset's `meta/vipa_demos.json` lists the seeds of every task; evaluation checks against it
(`check_disjoint_seeds`) that no evaluation scene was seen in training. The dataset is recorded in
`<out>.partial/` and renamed to `out` when complete (a finished `out` is never rewritten: an existing one is a
`ValueError`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hand3d_dataset.atomic import write_json

__all__ = ["DEMOS_META", "DemoConfig", "check_disjoint_seeds", "demo_seeds", "main", "record_demos"]

DEMOS_META = "meta/vipa_demos.json"  # beside LeRobot's meta files: how the demonstrations were made


@dataclass
class DemoConfig:
    """What to record."""

    out: str  # dataset folder (must not exist yet)
    env: str = "metaworld"  # registry name in evaluation.envs.ENVIRONMENTS
    tasks: str = "drawer-open-v3"  # comma-separated task and group names
    episodes: int = 10  # expert attempts per task (failed ones are dropped)
    seed: int = 0  # seed of attempt 0 of every task; attempt k uses seed + k
    image_size: int = 128  # rendered camera side, px
    max_steps: int | None = None  # episode cap; None: the suite's default
    use_videos: bool = True  # AV1 MP4 per camera (LeRobot's layout); False: PNG images inside the parquet
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        if not isinstance(self.episodes, int) or self.episodes < 1:
            raise ValueError(f"episodes: expected an int >= 1, got {self.episodes!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")


def record_demos(cfg: DemoConfig) -> dict[str, Any]:
    """Record the expert's episodes of every task into a LeRobot v3 dataset at `cfg.out`; returns the report
    (also written to `out/meta/vipa_demos.json`)."""
    from tqdm.auto import tqdm

    from evaluation.envs import get_suite
    from training.lerobot_writer import LeRobotV3Writer

    out = Path(cfg.out)
    if out.exists():
        raise ValueError(f"out: {out} exists; demonstrations are written to a new folder")
    options: dict[str, Any] = {"image_size": cfg.image_size}
    if cfg.max_steps is not None:
        options["max_steps"] = cfg.max_steps
    suite = get_suite(cfg.env, **options)
    pairs = suite.resolve_tasks(cfg.tasks)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    size = cfg.image_size
    features = {
        **{k: {"dtype": "video", "shape": [size, size, 3], "names": None} for k in suite.camera_keys},
        "observation.state": {"dtype": "float32", "shape": [suite.state_dim], "names": None},
        "action": {"dtype": "float32", "shape": [suite.action_dim], "names": None},
    }
    writer = LeRobotV3Writer.create(
        tmp, fps=suite.fps, features=features, robot_type=f"{cfg.env}", use_videos=cfg.use_videos
    )
    report: dict[str, Any] = {"env": cfg.env, "config": asdict(cfg), "suite_options": options, "tasks": {}}
    t0 = time.time()
    bar = tqdm(total=len(pairs) * cfg.episodes, desc=f"{cfg.env} expert demos", disable=not cfg.progress)
    for _, task in pairs:
        env = suite.make(task)
        expert = suite.expert(task)
        if expert is None:
            raise ValueError(f"tasks: {task!r} has no scripted expert to record")
        instruction = suite.instruction(task)
        entry = {
            "instruction": instruction,
            "recorded": 0,
            "failed": 0,
            "seeds": [],
            "failed_seeds": [],
            "steps": [],
        }
        for k in range(cfg.episodes):
            seed = cfg.seed + k
            frames = []
            obs = env.reset(seed)
            success = False
            for _ in range(env.max_steps):
                action = np.clip(expert(env), -1.0, 1.0).astype(np.float32)
                frames.append(
                    {
                        **{c: obs[c] for c in suite.camera_keys},
                        "observation.state": obs["observation.state"],
                        "action": action,
                    }
                )
                obs, _, success, done, _ = env.step(action)
                if success or done:
                    break
            if success:
                for frame in frames:
                    writer.add_frame(frame, task=instruction)
                writer.save_episode()
                entry["recorded"] += 1
                entry["seeds"].append(seed)
                entry["steps"].append(len(frames))
            else:
                entry["failed"] += 1
                entry["failed_seeds"].append(seed)
            bar.update(1)
        env.close()
        report["tasks"][task] = entry
    bar.close()
    if not any(e["recorded"] for e in report["tasks"].values()):
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"no expert episode succeeded in {cfg.episodes} attempts per task; nothing recorded")
    writer.finalize()
    report["episodes"] = sum(e["recorded"] for e in report["tasks"].values())
    report["failed"] = sum(e["failed"] for e in report["tasks"].values())
    report["frames"] = sum(sum(e["steps"]) for e in report["tasks"].values())
    report["seconds"] = round(time.time() - t0, 1)
    write_json(report, tmp / DEMOS_META)
    os.replace(tmp, out)
    return report


def demo_seeds(dataset: str | os.PathLike) -> dict[str, list[int]] | None:
    """Task -> every seed tried for it (recorded or dropped) in a `vipa-demos` dataset; None for other datasets."""
    path = Path(dataset) / DEMOS_META
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    return {t: sorted(e["seeds"] + e["failed_seeds"]) for t, e in meta["tasks"].items()}


def check_disjoint_seeds(dataset: str | os.PathLike, tasks: list[str], seeds: list[int]) -> None:
    """`ValueError` when an evaluation scene (task, seed) was also a demonstration scene of `dataset`."""
    used = demo_seeds(dataset)
    if used is None:
        return
    clash = {t: sorted(set(used.get(t, ())) & set(seeds)) for t in tasks}
    clash = {t: s for t, s in clash.items() if s}
    if clash:
        first = {t: s[:5] for t, s in clash.items()}
        raise ValueError(
            f"seeds: evaluation seeds {first} of {len(clash)} task(s) were demonstration scenes of {dataset}; "
            f"evaluate on unseen seeds (e.g. --seed {max(max(v) for v in used.values()) + 1})"
        )


def main(argv: list[str] | None = None) -> int:
    """`vipa-demos ENV --tasks ... --episodes N --out DIR`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="vipa-demos", description=__doc__.split("\n\n")[0])
    parser.add_argument("env", help="environment suite (metaworld)")
    parser.add_argument(
        "--tasks", required=True, help="comma-separated tasks or groups (easy, mt10, drawer-open-v3, ...)"
    )
    parser.add_argument(
        "--episodes", type=int, default=10, help="expert attempts per task (failures dropped)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of attempt 0; attempt k uses seed + k")
    parser.add_argument("--image-size", type=int, default=128, help="camera side, px")
    parser.add_argument("--max-steps", type=int, default=None, help="episode cap (default: the suite's)")
    parser.add_argument(
        "--images", action="store_true", help="PNG frames in the parquet instead of AV1 videos"
    )
    parser.add_argument("--out", required=True, help="new dataset folder")
    args = parser.parse_args(argv)
    try:
        report = record_demos(
            DemoConfig(
                out=args.out, env=args.env, tasks=args.tasks, episodes=args.episodes, seed=args.seed,
                image_size=args.image_size, max_steps=args.max_steps, use_videos=not args.images,
            )
        )  # fmt: skip
    except (ValueError, ImportError) as e:
        print(f"vipa-demos: error: {e}", file=sys.stderr)
        return 2
    for task, e in report["tasks"].items():
        print(
            f"{task}: {e['recorded']} recorded, {e['failed']} failed expert episodes dropped {e['failed_seeds']}"
        )
    print(f"{report['episodes']} episodes, {report['frames']} frames in {report['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
