"""Data parallel over 1-thread processes vs one process: the main job's training steps (`cpu_demo.parallel`).

    python benchmarks/bench_data_parallel.py             # table of s/step and samples/s, ratios to 1 process
    python benchmarks/bench_data_parallel.py --steps 8   # shorter

For each training phase of the main job (CUT3R stand-in, backbone stand-in without its dense loss, stage 1
on cached CUT3R tokens; `bench_contention`'s worker, real stand-in sizes) three settings, all measured in
this run: one process of one thread at the old global batch (the baseline), two processes (gloo DDP) at the
same global batch (each rank half), and two processes at twice the global batch (each rank the baseline's
batch). The ratio that matters for the main job is samples/s against the baseline: the stand-ins' steps are
so small that a rank's fixed per-step cost (Python, kernel launches, the gradient all-reduce) does not halve
with its batch, so two ranks pay off most when each keeps a full batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_contention.py"
# phase -> the old global batch (clips for CUT3R, samples otherwise): the baseline's
BASE_BATCH = {"cut3r": 4, "backbone": 8, "stage1": 8}
SETTINGS = {  # name -> (processes, global batch as a multiple of the baseline's)
    "1 process, batch B (baseline)": (1, 1),
    "2 processes, batch B (B/2 each)": (2, 1),
    "2 processes, batch 2B (B each)": (2, 2),
}


def _run(phase: str, processes: int, batch: int, steps: int) -> float:
    sys.path.insert(0, str(ROOT))
    from cpu_demo.parallel import worker_environment

    env = worker_environment({**os.environ, "PYTHONPATH": str(ROOT)})
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [
        *launcher,
        str(BENCH),
        "--worker",
        phase,
        "--steps",
        str(steps),
        "--threads",
        "1",
        "--batch",
        str(batch),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{phase} x {processes} processes failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--steps", type=int, default=15, help="timed steps per phase and setting (after 3 warm-up)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = p.parse_args()
    from tqdm.auto import tqdm

    results: dict = {}
    jobs = [(ph, s) for ph in BASE_BATCH for s in SETTINGS]
    for phase, setting in tqdm(jobs, desc="data parallel", unit="run"):
        processes, mult = SETTINGS[setting]
        batch = BASE_BATCH[phase] * mult
        seconds = _run(phase, processes, batch, a.steps)
        results.setdefault(phase, {})[setting] = {"s_per_step": seconds, "samples_per_s": batch / seconds}
    width = max(len(s) for s in SETTINGS) + 2
    print(f"\n{'phase':<10}{'setting':<{width}}{'s/step':>10}{'samples/s':>12}{'x baseline':>12}")
    for phase, rows in results.items():
        base = next(iter(rows.values()))["samples_per_s"]
        for setting, r in rows.items():
            r["throughput_vs_baseline"] = r["samples_per_s"] / base
            print(
                f"{phase:<10}{setting:<{width}}{r['s_per_step']:>10.4f}{r['samples_per_s']:>12.1f}"
                f"{r['throughput_vs_baseline']:>11.2f}x"
            )
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
