"""Root pytest configuration: the module docstring examples (`--doctest-modules`, see pyproject.toml) run in a
fresh temporary folder, so an example that writes `hand3d/` or `runs/` never touches the repository."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before any example imports mujoco (see tests/conftest.py)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _doctests_in_a_temporary_folder(request: pytest.FixtureRequest, tmp_path, monkeypatch) -> None:
    if isinstance(request.node, pytest.DoctestItem):
        monkeypatch.chdir(tmp_path)
