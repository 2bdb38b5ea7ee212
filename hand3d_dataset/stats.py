"""Per-source statistics of a Hand3D build, like the paper's Tables 1–2 (`hand3d stats DIR`).

    from hand3d_dataset.stats import dataset_stats, format_table, plot_stats
    stats = dataset_stats("hand3d")          # counts read from the parquet shards + report.json's skips
    print(format_table(stats))
    plot_stats(stats, "hand3d/stats.png")

The statistics, one structure for `hand3d build` (from its shard markers, `per_source_from_clips`) and
`hand3d stats` (from the parquet files, `dataset_stats`):

    {"sources": {name: {"clips_requested": int | None, "clips_done": int, "clips_skipped": int,
                        "skip_reasons": {reason kind: clips},
                        "tasks": {task_type: {"config": "visual" | "action", "clips": int,
                                              "rows": int, "train": int, "test": int}}}},
     "totals": {"visual": rows, "action": rows}}

`clips` of a task counts the clips with at least one row of that task; `train`/`test` are rows. The
share printed next to each count is of all rows of the same config (visual or action), as the
paper's tables give each dataset's share of Hand3D-visual and Hand3D-action. Skip reasons are
grouped by kind (`reason_kind`: numbers and bracketed values dropped), so a reason that differs only
by frame index or value counts once per kind.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

__all__ = [
    "VISUAL_TASK_TYPES",
    "reason_kind",
    "per_source_from_clips",
    "dataset_stats",
    "format_table",
    "plot_stats",
]

# Task types of the `visual` config (samples_visual.VISUAL_TASK_TYPES; repeated here so that reading
# statistics never imports the sample builders); every other task type is an `action` row.
VISUAL_TASK_TYPES = ("spatial_relationship", "task_completion", "hand_movement", "camera_movement")
SPLITS = ("train", "test")


def _config_of(task_type: str) -> str:
    return "visual" if task_type in VISUAL_TASK_TYPES else "action"


def reason_kind(reason: str) -> str:
    """Groups reasons for counting: "frame 3 object 'mug': degenerate box [..]" → "object: degenerate box",
    "frame 6: no hand in view, dropped" → "frame: no hand in view, dropped", "load failed: ..." → "load failed"."""
    head, _, rest = reason.partition(": ")
    if head.startswith("frame "):
        kind = "object" if " object " in head else "frame"
        detail = re.sub(r"\d+(\.\d+)?", "N", rest.split(" [")[0].split(" (")[0])
        return f"{kind}: {detail}"
    return head


def _totals(sources: dict) -> dict:
    totals = {"visual": 0, "action": 0}
    for s in sources.values():
        for t in s["tasks"].values():
            totals[t["config"]] += t["rows"]
    return totals


def per_source_from_clips(clips: list[dict], requested: dict[str, int] | None = None) -> dict:
    """Statistics from the runner's per-clip records (`build._write_shard`: clip_id, source, split,
    skipped, samples {task_type: rows}); `requested` maps a source to the clips it was asked for."""
    sources: dict = {}

    def entry(name: str) -> dict:
        return sources.setdefault(
            name,
            {
                "clips_requested": (requested or {}).get(name),
                "clips_done": 0,
                "clips_skipped": 0,
                "skip_reasons": Counter(),
                "tasks": {},
            },
        )

    for name in requested or {}:
        entry(name)
    for c in clips:
        e = entry(c.get("source") or "(unknown)")  # markers of builds older than per-source reports
        if c["skipped"] is not None:
            e["clips_skipped"] += 1
            e["skip_reasons"][reason_kind(c["skipped"])] += 1
            continue
        e["clips_done"] += 1
        for task, n in c["samples"].items():
            t = e["tasks"].setdefault(
                task, {"config": _config_of(task), "clips": 0, "rows": 0, "train": 0, "test": 0}
            )
            t["clips"] += n > 0
            t["rows"] += n
            t[c["split"]] += n
    for e in sources.values():
        e["skip_reasons"] = dict(sorted(e["skip_reasons"].items()))
        e["tasks"] = dict(sorted(e["tasks"].items()))
    return {"sources": dict(sorted(sources.items())), "totals": _totals(sources)}


def dataset_stats(out_dir: str | Path) -> dict:
    """Statistics of a built folder: rows and clips counted from `data/{visual,action}/{split}-*.parquet`
    (columns source, clip_id, task_type only); skips and requested clips from `report.json`'s
    `per_source` when present (a folder without a report has no skip counts, and says so).
    """
    import pyarrow.parquet as pq

    out = Path(out_dir)
    files = sorted((out / "data").glob("*/*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"out_dir: no parquet shards under {out / 'data'}; expected data/{{visual,action}}/{{train,test}}-*.parquet "
            "written by `hand3d build`"
        )
    rows: dict = defaultdict(lambda: defaultdict(Counter))  # source -> task -> split -> rows
    clips: dict = defaultdict(lambda: defaultdict(set))  # source -> task -> clip ids
    done: dict = defaultdict(set)  # source -> clip ids with any row
    for path in files:
        split = path.name.split("-", 1)[0]
        if split not in SPLITS:
            raise ValueError(f"{path}: expected a file named train-*.parquet or test-*.parquet")
        table = pq.read_table(path, columns=["source", "clip_id", "task_type"])
        for src, cid, task in zip(*(table.column(c).to_pylist() for c in ("source", "clip_id", "task_type"))):
            rows[src][task][split] += 1
            clips[src][task].add(cid)
            done[src].add(cid)
    report_path = out / "report.json"
    per_source = {}
    if report_path.exists():
        per_source = json.loads(report_path.read_text()).get("per_source", {}).get("sources", {})
    sources = {}
    for name in sorted(set(rows) | set(per_source)):
        rep = per_source.get(name, {})
        sources[name] = {
            "clips_requested": rep.get("clips_requested"),
            "clips_done": len(done[name]),
            "clips_skipped": rep.get("clips_skipped"),
            "skip_reasons": rep.get("skip_reasons", {}),
            "tasks": {
                task: {
                    "config": _config_of(task),
                    "clips": len(clips[name][task]),
                    "rows": sum(rows[name][task].values()),
                    **{s: rows[name][task][s] for s in SPLITS},
                }
                for task in sorted(rows[name])
            },
        }
    return {"sources": sources, "totals": _totals(sources)}


def format_table(stats: dict) -> str:
    """The statistics as a plain-text table (one line per source × task type, then skips per source)."""
    totals = stats["totals"]
    head = f"{'source':<12} {'config':<7} {'task type':<32} {'clips':>7} {'rows':>9} {'train':>9} {'test':>7} {'share':>7}"
    lines = [head, "-" * len(head)]
    for name, s in stats["sources"].items():
        for conf in ("visual", "action"):
            tasks = {k: v for k, v in s["tasks"].items() if v["config"] == conf}
            for task, t in tasks.items():
                share = 100 * t["rows"] / totals[conf] if totals[conf] else 0.0
                lines.append(
                    f"{name:<12} {conf:<7} {task:<32} {t['clips']:>7,} {t['rows']:>9,} "
                    f"{t['train']:>9,} {t['test']:>7,} {share:>6.1f}%"
                )
            if len(tasks) > 1:
                n = sum(t["rows"] for t in tasks.values())
                share = 100 * n / totals[conf] if totals[conf] else 0.0
                lines.append(
                    f"{name:<12} {conf:<7} {'(all)':<32} {'':>7} {n:>9,} "
                    f"{sum(t['train'] for t in tasks.values()):>9,} "
                    f"{sum(t['test'] for t in tasks.values()):>7,} {share:>6.1f}%"
                )
    lines.append(f"{'total':<12} {'visual':<7} {'':<32} {'':>7} {totals['visual']:>9,}")
    lines.append(f"{'total':<12} {'action':<7} {'':<32} {'':>7} {totals['action']:>9,}")
    lines.append("")
    for name, s in stats["sources"].items():
        req = s["clips_requested"]
        skipped = s["clips_skipped"]
        line = f"{name}: {s['clips_done']:,} clips annotated"
        line += f" of {req:,} requested" if req is not None else ""
        if skipped is None:
            line += "; skips unknown (no report.json per_source)"
        else:
            line += f"; {skipped:,} skipped"
            if s["skip_reasons"]:
                line += " (" + ", ".join(f"{k}: {v:,}" for k, v in s["skip_reasons"].items()) + ")"
        lines.append(line)
    return "\n".join(lines)


def plot_stats(stats: dict, path: str | Path) -> Path:
    """Bar chart of rows per task type, one bar group per config, stacked by source; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [4, 3]})
    for ax, conf in zip(axes, ("visual", "action")):
        tasks = sorted(
            {k for s in stats["sources"].values() for k, v in s["tasks"].items() if v["config"] == conf}
        )
        bottom = [0] * len(tasks)
        for i, (name, s) in enumerate(stats["sources"].items()):
            heights = [s["tasks"].get(k, {}).get("rows", 0) for k in tasks]
            if any(heights):  # one colour per source in both panels
                ax.bar(range(len(tasks)), heights, bottom=bottom, label=name, color=f"C{i % 10}")
                bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(range(len(tasks)), [k.replace("_", "\n") for k in tasks], fontsize=8)
        ax.set_title(f"Hand3D-{conf}: {stats['totals'][conf]:,} rows")
        ax.set_ylabel("rows")
        if tasks:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
