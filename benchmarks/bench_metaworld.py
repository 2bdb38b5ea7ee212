"""Meta-World closed-loop benchmarks (issue 15 §7), measured in one run, printed as ratios against baselines of the
same run.

(a) steps/s of one environment with one rendered camera at our settings (`fast_render`: shadows and
    multisampling off; 128^2 and 64^2) vs LeRobot's defaults (480^2, shadows on) and vs no rendering at all;
(b) episodes/min of the closed loop (`evaluation.rollout.evaluate_policy`, the random policy, full-length
    episodes, 64^2) with 1 vs 2 environment processes;
(c) closed-loop policy overhead: the wall time of an episode with the tiny VIPA policy (a stage-3 checkpoint of
    the test config, trained 2 steps on expert demonstrations) vs the scripted expert on the same seeds and the
    same number of steps.

Usage:

    python benchmarks/bench_metaworld.py                 # all three, ~2-3 min on 2 idle cores
    python benchmarks/bench_metaworld.py --only render --steps 200
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evaluation.envs.metaworld import MetaWorldSuite  # noqa: E402

TASK = "drawer-open-v3"


def steps_per_second(suite: MetaWorldSuite, steps: int, render: bool) -> float:
    """Steps/s of zero actions on one environment (rendering the camera each step, or not)."""
    env = suite.make(TASK)
    env.reset(0)
    if not render:  # Meta-World's own step without our observation (no camera image)
        raw = env._env
        tic = time.perf_counter()
        for _ in range(steps):
            if raw.curr_path_length >= raw.max_path_length:
                raw.reset()
            raw.step(np.zeros(4, np.float32))
        rate = steps / (time.perf_counter() - tic)
    else:
        tic = time.perf_counter()
        done = False
        for _ in range(steps):
            if done:
                env.reset(0)
            _, _, _, done, _ = env.step(np.zeros(4))
        rate = steps / (time.perf_counter() - tic)
    env.close()
    return rate


def bench_render(steps: int) -> None:
    rows = [
        ("LeRobot default: 480^2, shadows on", MetaWorldSuite(image_size=480, fast_render=False), True),
        ("ours: 480^2, fast_render", MetaWorldSuite(image_size=480), True),
        ("ours: 128^2, fast_render", MetaWorldSuite(image_size=128), True),
        ("ours: 64^2, fast_render", MetaWorldSuite(image_size=64), True),
        ("128^2, shadows on", MetaWorldSuite(image_size=128, fast_render=False), True),
        ("no rendering", MetaWorldSuite(image_size=64), False),
    ]
    results = []
    for name, suite, render in rows:
        n = max(20, steps // 5) if "shadows on" in name else steps
        results.append((name, steps_per_second(suite, n, render)))
    base = results[0][1]
    print("\n(a) Meta-World steps/s, one camera per step (drawer-open-v3, zero actions)\n")
    print(f"{'setting':<38}{'steps/s':>10}{'vs LeRobot default':>20}")
    for name, rate in results:
        print(f"{name:<38}{rate:>10.1f}{rate / base:>19.1f}x")


def bench_workers(episodes: int) -> None:
    from evaluation.rollout import PolicySpec, RolloutConfig, evaluate_policy

    print("\n(b) closed-loop episodes/min (random policy, 150-step episodes, 64^2, drawer-open + reach)\n")
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            cfg = RolloutConfig(
                out=f"{tmp}/w{workers}", tasks="drawer-open-v3,reach-v3", episodes=episodes, max_steps=150,
                image_size=64, num_workers=workers, videos_per_task=0, progress=False,
            )  # fmt: skip
            tic = time.perf_counter()
            evaluate_policy(PolicySpec("random"), cfg)
            rates[workers] = 2 * episodes / (time.perf_counter() - tic) * 60
    print(f"{'environment processes':<24}{'episodes/min':>14}{'vs 1 process':>14}")
    for workers, rate in rates.items():
        print(f"{workers:<24}{rate:>14.1f}{rate / rates[1]:>13.2f}x")
    print("(process start-up and one policy copy per process included: what a user waits for)")


def bench_policy_overhead(episodes: int) -> None:
    import torch

    from evaluation.demos import DemoConfig, record_demos
    from evaluation.rollout import PolicySpec, _Expert, make_policy, run_episode
    from tests.test_stage3 import save_init, tiny_recipe
    from training.stage3 import train_stage3

    torch.set_num_threads(1)
    suite = MetaWorldSuite(image_size=64, max_steps=100)
    with tempfile.TemporaryDirectory() as tmp:
        record_demos(DemoConfig(out=f"{tmp}/demos", tasks=TASK, episodes=2, image_size=64, max_steps=100, use_videos=False, progress=False))  # fmt: skip
        save_init(Path(tmp) / "init")
        train_stage3(Path(tmp) / "init", f"{tmp}/demos", f"{tmp}/s3", recipe=tiny_recipe(max_steps=2))
        vipa = make_policy(PolicySpec("vipa", path=f"{tmp}/s3"), suite)
        env = suite.make(TASK)
        times = {"scripted expert": [], "tiny VIPA policy": []}
        steps = {"scripted expert": [], "tiny VIPA policy": []}
        for seed in range(1000, 1000 + episodes):
            for name, policy in (("scripted expert", _Expert(suite)), ("tiny VIPA policy", vipa)):
                record = run_episode(env, policy, TASK, seed, 0, action_dim=4)
                times[name].append(record["seconds"])
                steps[name].append(record["steps"])
        env.close()
    per_step = {k: sum(times[k]) / sum(steps[k]) * 1000 for k in times}
    base = per_step["scripted expert"]
    print(f"\n(c) closed-loop policy overhead ({TASK}, 64^2, {episodes} seeds, one torch thread)\n")
    print(f"{'policy':<20}{'ms per step':>14}{'vs expert':>12}{'steps':>8}")
    for name, ms in per_step.items():
        print(f"{name:<20}{ms:>14.2f}{ms / base:>11.1f}x{sum(steps[name]):>8}")
    print(
        "(the expert's per-step time is the environment's: stepping and rendering; the difference is the policy)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("render", "workers", "policy"), default=None)
    parser.add_argument("--steps", type=int, default=300, help="steps per rendering setting")
    parser.add_argument("--episodes", type=int, default=4, help="episodes per task (b) or seeds (c)")
    args = parser.parse_args(argv)
    if args.only in (None, "render"):
        bench_render(args.steps)
    if args.only in (None, "workers"):
        bench_workers(args.episodes)
    if args.only in (None, "policy"):
        bench_policy_overhead(args.episodes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
