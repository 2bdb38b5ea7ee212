"""The `hand3d` command line.

    hand3d convert-mano MANO_RIGHT.pkl MANO_RIGHT.npz   # one-time, pickle-free copy of a MANO model
    hand3d walkthrough                                  # geometry tour on the real fixtures
    hand3d build --source synth --num-clips 100 --out hand3d --num-workers 2   # build Hand3D (resumable)
    hand3d build --sources synth:,hot3d:HOT3D/ --out hand3d        # one dataset from several sources
    hand3d build --engine ray --ray-address auto --num-workers 64  # the same build on a Ray cluster
    hand3d stats hand3d                                 # per-source table (paper Tables 1-2) + stats.png
    hand3d publish hand3d [--repo-id my-org/hand3d]     # dataset card (+ upload to the Hub)
    hand3d evaluate --model runs/stage2 --data hand3d --out eval   # Hand3D-test metrics + Figures 8-9

Each sub-command imports its heavy modules lazily so that `hand3d --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _convert_mano(args: argparse.Namespace) -> int:
    from hand3d_dataset.mano import convert_mano

    dst = convert_mano(args.src, args.dst)
    print(f"wrote {dst}")
    return 0


def _walkthrough(args: argparse.Namespace) -> int:
    from hand3d_dataset.walkthrough import run_walkthrough

    return run_walkthrough(fixtures=args.fixtures)


def _build(args: argparse.Namespace) -> int:
    from hand3d_dataset.build import BuildConfig, build

    cfg = BuildConfig(
        source=args.source,
        source_root=None if args.source_root is None else str(args.source_root),
        sources=args.sources,
        object_position=args.object_position,
        object_source=args.object_source,
        num_clips=args.num_clips,
        out=str(args.out),
        num_workers=args.num_workers,
        seed=args.seed,
        image_size=args.image_size,
        frames=args.frames,
        test_fraction=args.test_fraction,
        shard_size=args.shard_size,
        estimator=args.estimator,
        detector=args.detector,
        device=args.device,
        progress=not args.no_progress,
        engine=args.engine,
        ray_address=args.ray_address,
    )
    try:
        report = build(cfg)
    except (ImportError, ConnectionError) as e:
        if cfg.engine != "ray":
            raise
        print(f"hand3d build: error: {e}", file=sys.stderr)  # the missing extra, or no cluster at the address
        return 2
    rate = report["this_run"]["clips_per_min"]
    print(
        f"hand3d build: {report['clips_done']} clips annotated, {report['clips_skipped']} skipped "
        f"({report['skip_reasons']}); samples {report['samples_per_category']}; "
        f"clipping rate {report['clipping']['rate']:.4f}; "
        + (f"{rate} clips/min; " if rate else "")
        + f"report: {Path(cfg.out) / 'report.json'}"
    )
    from hand3d_dataset.stats import format_table

    print(format_table(report["per_source"]))
    return 0


def _stats(args: argparse.Namespace) -> int:
    from hand3d_dataset.stats import dataset_stats, format_table, plot_stats

    stats = dataset_stats(args.dir)
    print(format_table(stats))
    if not args.no_plot:
        path = plot_stats(stats, args.plot or Path(args.dir) / "stats.png")
        print(f"hand3d stats: wrote {path}")
    if args.json is not None:
        args.json.write_text(json.dumps(stats, indent=1))
        print(f"hand3d stats: wrote {args.json}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from hand3d_dataset.publish import publish

    card = publish(args.dir, repo_id=args.repo_id, private=args.private)
    print(
        f"wrote {card}"
        + (f"; pushed to https://huggingface.co/datasets/{args.repo_id}" if args.repo_id else "")
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from evaluation.hand3d_test import evaluate_model_dir  # the model half lives in evaluation/

    result = evaluate_model_dir(
        args.model,
        args.data,
        split=args.split,
        config=args.config,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        out_dir=args.out,
        progress=not args.no_progress,
    )
    for cfg, res in result["configs"].items():
        s = res["summary"]
        line = f"hand3d evaluate: {cfg} {args.split} ({res['n']} rows)"
        if s["direction_score"] is not None:
            line += f"; direction score {s['direction_score']:.2f}/3"
        if s["distance_error_m"] is not None:
            line += f"; distance error {s['distance_error_m']:.3f} m"
        if s["n_unparseable"] is not None:
            line += f"; unparseable {s['n_unparseable']}"
        if s["motion_decodable_fraction"] is not None:
            line += f"; motion decodable {s['motion_decodable_fraction']:.2f}"
            if s["motion_waypoint_error_m"] is not None:
                line += (
                    f", waypoint error {s['motion_waypoint_error_m']:.3f} m, "
                    f"final error {s['motion_final_error_m']:.3f} m"
                )
        print(line)
    for cfg, why in result["skipped"].items():
        print(f"hand3d evaluate: {cfg} skipped: {why}")
    if "results_json" in result:
        print(f"hand3d evaluate: wrote {result['results_json']} and {sorted(result['plots'].values())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hand3d", description="Hand3D toolkit of the VIPA-VLA package.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "convert-mano",
        help="convert an official MANO .pkl into a pickle-free .npz",
        description="Reads an official MANO model file with a restricted unpickler (arrays only; "
        "anything else is refused) and writes the same arrays to an .npz that loads without pickle.",
    )
    p.add_argument("src", type=Path, help="MANO_RIGHT.pkl or MANO_LEFT.pkl")
    p.add_argument("dst", type=Path, help="output .npz path")
    p.set_defaults(func=_convert_mano)

    p = sub.add_parser("walkthrough", help="run the geometry walkthrough on the real fixtures")
    p.add_argument(
        "--fixtures",
        type=Path,
        default=None,
        help="folder with real/rhd, real/interhand2.6m, real/hot3d (default: ../shared/fixtures)",
    )
    p.set_defaults(func=_walkthrough)

    p = sub.add_parser(
        "build",
        help="build Hand3D (visual + action) as sharded parquet; re-running resumes",
        description="Annotates clips of a source (paper §3.2.1) into data/{visual,action}/{train,test}-*.parquet, "
        "a README dataset card and report.json. Finished shards are kept when re-run with the same settings.",
    )
    p.add_argument("--source", default="synth", help="source adapter (default: synth)")
    p.add_argument(
        "--source-root", type=Path, default=None, help="dataset folder of a real source (e.g. hot3d)"
    )
    p.add_argument(
        "--sources",
        default=None,
        help="several sources in one dataset, replacing --source/--source-root: comma-separated "
        "name:ROOT[:WEIGHT] (synth takes no root: 'synth:'), WEIGHT in (0, 1] the stable share of that "
        "source's clips kept, e.g. synth:,hot3d:HOT3D/,arctic:/data/arctic:0.5",
    )
    p.add_argument(
        "--object-position",
        default="centre",
        choices=["centre", "surface"],
        help="object positions in the rows: the estimated volumetric centre, or the visible-surface "
        "centre (default: centre)",
    )
    p.add_argument(
        "--object-source",
        default="auto",
        choices=["auto", "pose", "estimate"],
        help="where object positions come from: the dataset's object poses where it has them, else the "
        "estimator and detector (auto, the default); the poses only, without estimator or detector (pose); "
        "or always the estimator and detector (estimate)",
    )
    p.add_argument("--num-clips", type=int, default=100, help="number of clips (default: 100)")
    p.add_argument("--out", type=Path, default=Path("hand3d"), help="output folder (default: ./hand3d)")
    p.add_argument("--num-workers", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the source and the samples (default: 0)")
    p.add_argument("--image-size", type=int, default=448, help="rendered image side in pixels (default: 448)")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (default: 8)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of clips in test (default: 0.1)")
    p.add_argument("--shard-size", type=int, default=16, help="clips per parquet shard (default: 16)")
    p.add_argument(
        "--estimator",
        default="gt-depth",
        help="point clouds: gt-depth (synth), cut3r:<converted folder> or depth-anything:<folder|hub id> "
        "(default: gt-depth)",
    )
    p.add_argument(
        "--detector",
        default="gt-boxes",
        help="object boxes: gt-boxes (synth) or grounding-dino:<folder|hub id> (default: gt-boxes)",
    )
    p.add_argument("--device", default="cpu", help="device of a learnt estimator/detector (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="local: this machine (--num-workers processes); ray: a Ray cluster, Ray Data stages with "
        "--num-workers tasks / actors each (pip install 'vipa-vla[ray]'); same output (default: local)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="with --engine ray: 'auto' (the cluster of this node) or ray://HOST:PORT (Ray Client); "
        "default: start a private local Ray instance of --num-workers CPUs",
    )
    p.set_defaults(func=_build)

    p = sub.add_parser(
        "stats",
        help="per-source statistics of a built folder (paper Tables 1-2) and a plot",
        description="Counts clips and rows per source and task type from DIR/data/*/*.parquet (with train/test "
        "rows and each source's share of its config), skips by reason from DIR/report.json; prints the table "
        "and writes a bar chart (PNG).",
    )
    p.add_argument("dir", type=Path, help="folder written by `hand3d build`")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: DIR/stats.png)")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    p.add_argument("--json", type=Path, default=None, help="also write the statistics as JSON here")
    p.set_defaults(func=_stats)

    p = sub.add_parser(
        "publish",
        help="write the dataset card of a built folder and optionally push it to the Hub",
        description="Writes DIR/README.md (YAML configs visual/action with train/test files, statistics like "
        "the paper's Tables 1-2, license, citation); with --repo-id uploads the folder with huggingface_hub.",
    )
    p.add_argument("dir", type=Path, help="folder written by `hand3d build`")
    p.add_argument(
        "--repo-id", default=None, help="Hub dataset repo, e.g. my-org/hand3d (default: no upload)"
    )
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.set_defaults(func=_publish)

    p = sub.add_parser(
        "evaluate",
        help="Hand3D-test evaluation of a VIPA checkpoint (Table 8, Figures 8-9)",
        description="Greedy, batched generation on a Hand3D split; direction score (of 3), distance error (m) "
        "and unparseable answers per task type and overall; motion-token answers decoded to trajectories "
        "(waypoint and final-point error in metres, decodable fraction). With --out: results.json, "
        "figure8.png (score/error histograms), figure9.png (predicted vs ground-truth trajectories).",
    )
    p.add_argument("--model", type=Path, required=True, help="checkpoint folder (model + processor)")
    p.add_argument("--data", type=Path, required=True, help="folder written by `hand3d build`")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument(
        "--config",
        default="auto",
        choices=["auto", "visual", "action", "both"],
        help="dataset config; auto = visual, plus action when the model has motion tokens (default: auto)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call (default: 8)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generation budget (default: 64, and at least 3 x longest trajectory + 4 for motion rows)",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each config")
    p.add_argument("--out", type=Path, default=None, help="output folder for results.json and the figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # User errors (bad file, bad arguments) read better as one line than as a traceback.
        print(f"hand3d {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
