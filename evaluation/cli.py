"""`vipa-eval`: closed-loop success rates of a policy, next to the scripted expert (ceiling) and a floor.

    vipa-eval --policy runs/stage3 --env metaworld --tasks easy --episodes 10 --seed 1000 --out eval/
    vipa-eval --policy server:127.0.0.1:8000 --tasks drawer-open-v3 --episodes 20     # a running vipa-serve
    vipa-eval --policy expert --tasks mt10 --episodes 10 --no-references               # the experts alone

Prints a table (rows: tasks, groups, overall; cells `successes/n rate% [95 % Wilson CI]`), and writes
`OUT/results.json`, `OUT/success_per_task.png` and per policy `OUT/<policy>/{summary.json, episodes/, videos/}`.
The references (`--references expert,random` by default; `noop` also exists) run on the same tasks and seeds.
An interrupted run continues from its episode records when started again with the same arguments.
For a stage-3 checkpoint trained on `vipa-demos` data (its `training_summary.json` names the dataset), the
evaluation seeds are checked against the demonstration seeds first: a scene seen in training is an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from evaluation.rollout import POLICY_KINDS, PolicySpec, RolloutConfig, evaluate_policies

__all__ = ["main", "parse_policy", "training_dataset"]


def parse_policy(value: str, **vipa_options) -> PolicySpec:
    """`expert` | `noop` | `random` | `server:HOST:PORT` | a stage-3 checkpoint folder."""
    if value in ("expert", "noop", "random"):
        return PolicySpec(value)
    if value.startswith("server:"):
        return PolicySpec("server", path=value[len("server:") :])
    if not Path(value).is_dir():
        raise ValueError(
            f"--policy: {value!r} is neither a checkpoint folder nor one of expert, noop, random, server:HOST:PORT"
        )
    return PolicySpec("vipa", path=value, **vipa_options)


def training_dataset(checkpoint: str | os.PathLike) -> list[str]:
    """The dataset folders a stage-3 checkpoint was trained on (from its `training_summary.json`), or []."""
    path = Path(checkpoint) / "training_summary.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text()).get("dataset")
    if not isinstance(data, str):
        return []
    return [d.strip() for d in data.split(",") if d.strip() and Path(d.strip()).is_dir()]


def main(argv: list[str] | None = None) -> int:
    """The `vipa-eval` command; returns the exit status (2 on bad input, with the reason on stderr)."""
    parser = argparse.ArgumentParser(prog="vipa-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--policy", required=True, help="checkpoint folder, server:HOST:PORT, expert, noop or random"
    )
    parser.add_argument("--env", default="metaworld", help="environment suite (default metaworld)")
    parser.add_argument(
        "--tasks",
        default="easy",
        help="comma-separated tasks or groups (easy, medium, hard, very_hard, mt10, mt50, NAME-v3)",
    )
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task")
    parser.add_argument(
        "--seed", type=int, default=1000, help="seed of episode 0 of each task (episode k: seed + k)"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="episode cap (default: the suite's, 500)")
    parser.add_argument(
        "--image-size", type=int, default=128, help="camera side, px (use the demonstrations')"
    )
    parser.add_argument("--num-workers", type=int, default=1, help="environment processes")
    parser.add_argument("--videos", type=int, default=1, help="MP4s of the first episodes of each task")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per episode before it is an error"
    )
    parser.add_argument(
        "--references", default="expert,random", help="reference policies on the same seeds ('' for none)"
    )
    parser.add_argument("--no-references", action="store_true", help="same as --references ''")
    parser.add_argument("--name", default=None, help="the policy's name in the table")
    parser.add_argument("--unnorm-key", default=None, help="checkpoint: which dataset statistics to act with")
    parser.add_argument(
        "--n-action-steps", type=int, default=None, help="checkpoint: actions executed per chunk"
    )
    parser.add_argument(
        "--demos",
        default=None,
        help="demonstration dataset whose seeds must not be evaluated (default: the checkpoint's)",
    )
    parser.add_argument("--out", default="eval", help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        spec = parse_policy(args.policy, unnorm_key=args.unnorm_key, n_action_steps=args.n_action_steps)
        if args.name:
            spec.name = args.name
        refs = [] if args.no_references else [r.strip() for r in args.references.split(",") if r.strip()]
        bad = [r for r in refs if r not in POLICY_KINDS or r in ("vipa", "server")]
        if bad:
            raise ValueError(f"--references: {bad} are not reference policies (expert, noop, random)")
        specs = [spec] + [PolicySpec(r) for r in refs if r != spec.kind]
        cfg = RolloutConfig(
            out=args.out, env=args.env, tasks=args.tasks, episodes=args.episodes, seed=args.seed,
            max_steps=args.max_steps, image_size=args.image_size, num_workers=args.num_workers,
            videos_per_task=args.videos, episode_timeout_s=args.timeout, progress=not args.no_progress,
        )  # fmt: skip
        from evaluation.demos import check_disjoint_seeds
        from evaluation.envs import get_suite

        tasks = [t for _, t in get_suite(cfg.env, **cfg.suite_options()).resolve_tasks(cfg.tasks)]
        demos = [args.demos] if args.demos else (training_dataset(spec.path) if spec.kind == "vipa" else [])
        for dataset in demos:
            check_disjoint_seeds(dataset, tasks, cfg.seeds())
        result = evaluate_policies(specs, cfg)
    except (ValueError, ImportError) as e:
        print(f"vipa-eval: error: {e}", file=sys.stderr)
        return 2
    print(
        f"\n{cfg.env}: {len(tasks)} task(s) x {cfg.episodes} episodes, seeds {cfg.seed}..{cfg.seed + cfg.episodes - 1}\n"
    )
    print(result["table"])
    print(f"\nresults: {Path(cfg.out) / 'results.json'}; plot: {result['plot']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
