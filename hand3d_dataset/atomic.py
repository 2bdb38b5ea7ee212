"""Atomic file writes: a reader (or a resumed run) never sees half a file.

    >>> import tempfile, json, pathlib
    >>> from hand3d_dataset.atomic import write_json
    >>> path = write_json({"steps": 3}, pathlib.Path(tempfile.mkdtemp()) / "out" / "summary.json")
    >>> json.loads(path.read_text())
    {'steps': 3}

Every module of the package that writes JSON, figures or other small files that a later phase or a
resumed run trusts goes through here: a temporary file in the same folder (same filesystem, so the final
`os.replace` is atomic on POSIX), removed again when writing fails.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_path", "write_json", "save_figure", "json_default"]


def json_default(obj: Any) -> Any:
    """JSON for numpy scalars and arrays and paths (what results dicts carry); anything else is refused."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling of `path` to write; it replaces `path` only when the block succeeds.

    The parent folder is created. The temporary name keeps the suffix (`.png`, `.parquet`) so writers that
    pick a format from the name still do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(obj: Any, path: str | os.PathLike, indent: int = 2, sort_keys: bool = False) -> Path:
    """Writes `obj` as JSON to `path` atomically and returns the path.

    NaN and inf are refused (`ValueError`): JSON has no such numbers, and a result that holds one is a bug
    to see, not a file to write."""
    path = Path(path)
    with atomic_path(path) as tmp:
        text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=json_default, allow_nan=False)
        tmp.write_text(text, encoding="utf-8")
    return path


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Saves a matplotlib figure as PNG atomically, closes it and returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path
