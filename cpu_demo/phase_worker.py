"""A main-job phase in its own process: one rank of a data-parallel phase (`cpu_demo.parallel.launch` starts one
per rank under torchrun), or one of several independent phases running at once (`cpu_demo.parallel.run_lanes`).

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m cpu_demo.phase_worker \\
        cut3r outputs/demo/job_config.json '{"paths": {"init": "...", "out": "..."}, "extra": {}}'

The job's settings come from the run's `job_config.json` (written by the main job before any phase), so every
process runs with exactly the parent's configuration (`cpu_demo.main_job.run_phase`; in a data-parallel phase,
rank 0 writes the outputs).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """`PHASE JOB_CONFIG SPEC_JSON` -> runs this rank's share of the phase; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m cpu_demo.phase_worker PHASE JOB_CONFIG.json SPEC_JSON", file=sys.stderr)
        return 2
    from cpu_demo import openmp_environment

    os.environ.update(openmp_environment(os.environ))  # before torch is imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from cpu_demo.main_job import MainJobConfig, run_phase
    from cpu_demo.standins import StandinConfig
    from training.common import configure_threads

    name, job_path, spec = argv[0], Path(argv[1]), json.loads(argv[2])
    job = json.loads(job_path.read_text())
    configure_threads(1)
    run_phase(
        name, MainJobConfig(**job["main_job"]), StandinConfig(**job["standins"]), spec["paths"], spec["extra"]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
