"""The embedded CPU default (`make demo`): stand-in models for the pretrained parts and the main job.

Users of real weights never import this package; nothing in `modeling_vipa`, `processing_vipa`,
`hand3d_dataset`, `training` or `evaluation` imports it (a test checks). `python -m cpu_demo` runs the main job.

    >>> from cpu_demo import openmp_environment
    >>> openmp_environment({})
    {'OMP_WAIT_POLICY': 'PASSIVE'}
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["openmp_environment"]


def openmp_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """OpenMP settings for the main job's tiny kernels, to apply before torch is imported.

    Passive wait: a thread that reaches a barrier first sleeps instead of spinning. The stand-ins' kernels
    are microseconds long, so with active waiting a thread whose partner was descheduled by another process
    burns its core at every barrier (a 40x slowdown was measured with one of two cores busy elsewhere;
    `benchmarks/bench_contention.py`). A value the user set is kept.
    """
    return {} if "OMP_WAIT_POLICY" in environ else {"OMP_WAIT_POLICY": "PASSIVE"}
