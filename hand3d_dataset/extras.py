"""Optional dependencies behind the package's extras, imported with an error that names the extra.

    >>> from hand3d_dataset.extras import require
    >>> require("json", "train").__name__            # an installed module comes back as is
    'json'
    >>> require("no_such_module_xyz", "robot")       # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ImportError: no_such_module_xyz is needed here and is not installed: pip install "vipa-vla[robot]"

Core (`pip install vipa-vla`) is what `import modeling_vipa`, the processor and the Hand3D toolkit need. The
extras (pyproject.toml): `train` (trl, peft, accelerate: stages 1-3), `sim` (mujoco: the synth source),
`sources` (PyAV, h5py: the real Hand3D sources' videos and HDF5), `robot` (PyAV, msgpack, websockets:
LeRobot datasets, the policy server), `demo` (gradio, plotly: the Space),
`ray` (the distributed Hand3D build), `dev` (tests, lint).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "require"]

EXTRAS = ("train", "sim", "sources", "robot", "demo", "ray", "dev")


def require(module: str, extra: str) -> ModuleType:
    """`importlib.import_module(module)`, or an `ImportError` saying which extra installs it."""
    if extra not in EXTRAS:
        raise ValueError(f"extra: expected one of {EXTRAS}, got {extra!r}")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ImportError(
            f'{top} is needed here and is not installed: pip install "vipa-vla[{extra}]"'
        ) from e
