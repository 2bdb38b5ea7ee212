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

from evaluation.rollout import POLICY_KINDS, PolicySpec, RolloutConfig, evaluate_policies, policy_slug

__all__ = ["format_table7", "main", "paired_comparison", "parse_policy", "table7_main", "training_dataset"]


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


TABLE7_ROWS = (  # paper Table 7: (row, start checkpoint inside a main-job folder)
    ("VIPA-VLA", "vipa"),  # dual encoder + stages 1-2
    ("- Pretraining", "standins/vipa_init"),  # dual encoder, fresh fusion, no stages 1-2
    (
        "- Dual Encoder",
        "table7/single_encoder_stage2",
    ),  # the single-encoder backbone through stage 2, no 3D branch
    ("- Both", "single_encoder"),  # the single-encoder backbone alone
)


def paired_comparison(base: list[dict], other: list[dict]) -> dict:
    """Episodes paired by (task, seed): how often only `base` succeeded, only `other` did, and the exact two-sided
    sign-test p-value of that split (scipy's binomial test; 1.0 when no pair differs)."""
    from scipy.stats import binomtest

    theirs = {(r["task"], r["seed"]): bool(r["success"]) for r in other}
    only_base = only_other = 0
    for r in base:
        key = (r["task"], r["seed"])
        if key in theirs and bool(r["success"]) != theirs[key]:
            only_base += bool(r["success"])
            only_other += theirs[key]
    n = only_base + only_other
    p = binomtest(only_base, n, 0.5).pvalue if n else 1.0
    return {"only_base": only_base, "only_other": only_other, "p_value": float(p)}


def format_table7(summaries: dict[str, dict], tasks: list[str]) -> str:
    """The paper's Table 7 shape: rows the four starting points, columns the tasks and the average (success %),
    the drop against VIPA-VLA, and the paired split of episodes against VIPA-VLA."""
    names = list(summaries)
    base = summaries[names[0]]
    head = (
        "| Model | "
        + " | ".join(tasks)
        + " | Avg. (95 % CI) | paired vs VIPA-VLA (only VIPA / only this, p) |"
    )
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for name in names:
        s = summaries[name]
        cells = [f"{100 * s['per_task'][t]['success_rate']:.1f}" for t in tasks]
        avg = 100 * s["overall"]["success_rate"]
        lo, hi = (100 * x for x in s["overall"]["ci95"])
        delta = "" if name == names[0] else f" ({avg - 100 * base['overall']['success_rate']:+.1f})"
        if name == names[0]:
            paired = "—"
        else:
            c = paired_comparison(base["records"], s["records"])
            paired = f"{c['only_base']} / {c['only_other']}, p = {c['p_value']:.2g}"
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {avg:.1f}{delta} [{lo:.0f}, {hi:.0f}] | {paired} |"
        )
    return "\n".join(lines)


def table7_main(argv: list[str] | None = None) -> int:
    """`vipa-eval table7 --run outputs/demo`: paper Table 7 at CPU scale from a main-job folder (see README)."""
    parser = argparse.ArgumentParser(
        prog="vipa-eval table7",
        description="Stage 3 on the same Meta-World demonstrations from four starting points (VIPA-VLA; - pretraining; "
        "- dual encoder; - both), same steps and seeds, evaluated closed loop on the same unseen seeds.",
    )
    parser.add_argument(
        "--run", default="outputs/demo", help="a finished `make demo` folder (python -m cpu_demo)"
    )
    parser.add_argument("--steps", type=int, default=None, help="stage-3 steps (default: the main job's)")
    parser.add_argument(
        "--stage2-steps",
        type=int,
        default=None,
        help="stage-2 steps of the single encoder (default: the main job's)",
    )
    parser.add_argument(
        "--episodes", type=int, default=None, help="episodes per task (default: the main job's)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="first evaluation seed (default: the main job's)"
    )
    parser.add_argument("--num-workers", type=int, default=2, help="environment processes")
    parser.add_argument("--out", default=None, help="output folder (default RUN/table7)")
    args = parser.parse_args(argv)
    try:
        result = run_table7(args)
    except (ValueError, ImportError, FileNotFoundError) as e:
        print(f"vipa-eval table7: error: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print(f"\nresults: {result['path']}", flush=True)
    return 0


def run_table7(args: argparse.Namespace) -> dict:
    """Train (or reuse) the four stage-3 policies and evaluate them with the references; returns the table."""
    from dataclasses import asdict

    from evaluation.demos import check_disjoint_seeds
    from evaluation.rollout import RolloutConfig, evaluate_policies
    from hand3d_dataset.atomic import write_json
    from training.common import TRAINING_MARKER, load_recipe
    from training.stage3 import latest_checkpoint, train_stage3

    run = Path(args.run)
    job_path = run / "job_config.json"
    if not job_path.is_file() or not (run / "robot" / "demos").is_dir():
        raise ValueError(
            f"--run: {run} is not a finished main-job folder with Meta-World demonstrations (make demo)"
        )
    job = json.loads(job_path.read_text())["main_job"]
    steps = args.steps or job["robot_stage3_steps"]
    out = Path(args.out or run / "table7")
    demos = run / "robot" / "demos"
    single_stage2 = run / "table7" / "single_encoder_stage2"
    if not (
        single_stage2 / TRAINING_MARKER
    ).is_file():  # stage 1 trains only the fusion: nothing without a branch
        from training.stage2 import train_stage2

        recipe = load_recipe("cpu-tiny", max_steps=args.stage2_steps or job["stage2_steps"])
        resume = single_stage2.is_dir() and any(
            p.name.startswith("checkpoint-") for p in single_stage2.iterdir()
        )
        train_stage2(run / "single_encoder", run / "hand3d", single_stage2, recipe=recipe, resume=resume)
    policies = []
    for name, start in TABLE7_ROWS:
        folder = out / policy_slug(name) / "stage3"
        if (
            name == "VIPA-VLA"
            and steps == job["robot_stage3_steps"]
            and (run / "runs" / "stage3" / TRAINING_MARKER).is_file()
        ):
            folder = run / "runs" / "stage3"  # the main job's own stage 3: same start, recipe, steps and seed
        if not (folder / TRAINING_MARKER).is_file():
            resume = latest_checkpoint(folder) is not None
            train_stage3(run / start, demos, folder, recipe="cpu-tiny", resume=resume, max_steps=steps)
        policies.append(PolicySpec("vipa", path=str(folder), name=name))
    cfg = RolloutConfig(
        out=str(out / "eval"), env="metaworld", tasks=job["robot_tasks"],
        episodes=args.episodes or job["robot_eval_episodes"], seed=args.seed if args.seed is not None else job["robot_eval_seed"],
        max_steps=job["robot_max_steps"], image_size=job["robot_image_size"], num_workers=args.num_workers,
        videos_per_task=1, progress=True,
    )  # fmt: skip
    tasks = [t.strip() for t in job["robot_tasks"].split(",")]
    check_disjoint_seeds(demos, tasks, cfg.seeds())
    result = evaluate_policies(policies + [PolicySpec("expert"), PolicySpec("random")], cfg)
    rows = {p.label: result["summaries"][p.label] for p in policies}
    # the references on the same seeds close the table (ceiling and floor), compared with VIPA-VLA like the rows
    markdown = format_table7(
        {**rows, **{k: result["summaries"][k] for k in ("scripted expert", "random")}}, tasks
    )
    report = {
        "rows": {k: {kk: vv for kk, vv in v.items() if kk != "records"} for k, v in rows.items()},
        "paired_vs_vipa": {k: paired_comparison(rows["VIPA-VLA"]["records"], v["records"]) for k, v in rows.items() if k != "VIPA-VLA"},
        "stage3_steps": steps, "settings": asdict(cfg), "markdown": markdown,
    }  # fmt: skip
    path = write_json(report, out / "table7.json")
    (out / "table7.md").write_text(markdown + "\n")
    return {"markdown": markdown, "path": str(path)}


def _demo_options(dataset: str | os.PathLike) -> dict:
    """The suite options (image_size, max_steps) a `vipa-demos` dataset was recorded with; {} for others."""
    from evaluation.demos import DEMOS_META

    path = Path(dataset) / DEMOS_META
    return json.loads(path.read_text()).get("suite_options", {}) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    """The `vipa-eval` command; returns the exit status (2 on bad input, with the reason on stderr).
    `vipa-eval table7 ...` runs the Table-7 ablation (`table7_main`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table7"]:
        return table7_main(argv[1:])
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
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="episode cap (default: the checkpoint's demonstrations', else 500)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="camera side, px (default: the checkpoint's demonstrations', else 128)",
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
        demos = [args.demos] if args.demos else (training_dataset(spec.path) if spec.kind == "vipa" else [])
        # the scenes as the policy saw them in training: the camera size and episode cap of its demonstrations
        recorded = _demo_options(demos[0]) if demos else {}
        image_size = args.image_size or recorded.get("image_size") or 128
        max_steps = args.max_steps or recorded.get("max_steps")
        cfg = RolloutConfig(
            out=args.out, env=args.env, tasks=args.tasks, episodes=args.episodes, seed=args.seed,
            max_steps=max_steps, image_size=image_size, num_workers=args.num_workers,
            videos_per_task=args.videos, episode_timeout_s=args.timeout, progress=not args.no_progress,
        )  # fmt: skip
        from evaluation.demos import check_disjoint_seeds
        from evaluation.envs import get_suite

        tasks = [t for _, t in get_suite(cfg.env, **cfg.suite_options()).resolve_tasks(cfg.tasks)]
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
