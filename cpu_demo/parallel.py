"""Data-parallel main-job phases: N worker processes of one thread each, synchronised once per optimiser step.

The stand-ins' kernels are microseconds long, so a second OpenMP thread inside one process gains less than its
barriers cost (and, with one core busy elsewhere, spins at every barrier: `benchmarks/bench_contention.py`).
Two processes of one thread each, data parallel over gloo (DDP: each rank takes half of the global batch, the
gradients are averaged once per step), use both cores of a 2-core machine and never wait at a kernel barrier.
The global batch, the learning-rate schedule and the number of steps stay those of one process; only which
samples land in which step changes.

- `demo_processes()`: how many ranks the main job uses: min(2, CPUs this process may use), or
  `$VIPA_DEMO_PROCESSES` (1: every phase in the main process, as before).
- `launch(phase, args, processes)`: runs `python -m cpu_demo.phase_worker PHASE ARGS...` under torchrun
  (`torch.distributed.run --standalone`), each rank one torch thread with passive OpenMP waiting.
- `run_lanes(jobs, processes)`: independent phases (e.g. evaluation, the 3D probe, robot demonstrations), one
  `cpu_demo.phase_worker` process each, `processes` at a time; returns each one's seconds.
- `rank_and_world()`: this process's rank and the number of ranks (0, 1 outside a launch).

    >>> rank_and_world()
    (0, 1)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence

__all__ = ["PROCESSES_ENV", "demo_processes", "launch", "run_lanes", "rank_and_world"]

PROCESSES_ENV = "VIPA_DEMO_PROCESSES"  # user override of the main job's data-parallel ranks (1: no launch)
MAX_PROCESSES = 2  # ranks the main job uses at most (its smallest global batch, 4 CUT3R clips, splits evenly)


def demo_processes(environ: dict[str, str] | None = None) -> int:
    """Ranks of the main job's data-parallel phases: `$VIPA_DEMO_PROCESSES`, else min(2, usable CPUs)."""
    from training.common import available_cpus

    environ = os.environ if environ is None else environ
    value = environ.get(PROCESSES_ENV)
    if value:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_PROCESSES:
            raise ValueError(f"{PROCESSES_ENV}: expected an int in 1..{MAX_PROCESSES}, got {value!r}")
        return n
    return max(1, min(MAX_PROCESSES, available_cpus()))


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: from torch.distributed once initialised, else torchrun's
    RANK / WORLD_SIZE, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def worker_environment(environ: dict[str, str]) -> dict[str, str]:
    """The environment of each rank: one torch / OpenMP thread, passive waiting, no tokenizer threads."""
    return {
        **environ,
        "OMP_NUM_THREADS": "1",
        "VIPA_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def launch(phase: str, args: Sequence[str], processes: int) -> None:
    """Run main-job phase `phase` (`cpu_demo.phase_worker`) on `processes` ranks under torchrun; raises a
    RuntimeError naming the phase when a rank fails (its traceback is on stderr above)."""
    if processes < 2:
        raise ValueError(
            f"processes: launch runs 2 or more ranks, got {processes} (call the phase in process)"
        )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc_per_node", str(processes), "-m", "cpu_demo.phase_worker", phase, *map(str, args),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=worker_environment(dict(os.environ)))
    if result.returncode:
        raise RuntimeError(
            f"main job phase {phase!r}: a rank of the {processes}-process launch failed (exit status "
            f"{result.returncode}; its traceback is above). Rerun to resume, or set {PROCESSES_ENV}=1 to run "
            "the phase in one process"
        )


def run_lanes(
    jobs: dict[str, tuple[str, Sequence[str]]], processes: int, poll_s: float = 0.2
) -> dict[str, float]:
    """Run independent phases (label -> (phase, args) of `cpu_demo.phase_worker`) as separate processes, at
    most `processes` at once, in the given order; returns label -> seconds from its start to its end.

    Only the first lane shows progress bars (tqdm's bars of several processes would overwrite each other).
    When one fails, the others are stopped and a RuntimeError names it (its traceback is on stderr above).
    """
    if processes < 1:
        raise ValueError(f"processes: expected >= 1, got {processes}")
    pending = list(jobs.items())
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    seconds: dict[str, float] = {}
    base = worker_environment(dict(os.environ))
    first = True
    try:
        while pending or running:
            while pending and len(running) < processes:
                label, (phase, args) = pending.pop(0)
                env = base if first else {**base, "TQDM_DISABLE": "1"}
                first = False
                cmd = [sys.executable, "-m", "cpu_demo.phase_worker", phase, *map(str, args)]
                running[label] = (subprocess.Popen(cmd, env=env), time.time())
            time.sleep(poll_s)
            for label, (proc, start) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[label]
                if code:
                    raise RuntimeError(
                        f"main job phase {label!r} failed (exit status {code}; its traceback is above). Rerun "
                        f"to resume, or set {PROCESSES_ENV}=1 to run the phases one after the other in process"
                    )
                seconds[label] = time.time() - start
    finally:
        for proc, _ in running.values():  # a failure elsewhere: stop the rest
            proc.terminate()
            proc.wait()
    return seconds
