"""The README's geometry example runs as written, and the `hand3d` console script works."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
HAND3D = Path(sys.executable).parent / "hand3d"


def test_readme_geometry_example_runs_and_prints_what_it_says(tmp_path):
    block = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    script = tmp_path / "example.py"
    script.write_text(block)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # The comments in the README state these outputs; they must stay true.
    assert lines[0] == "3.0 21"
    assert lines[2] == "left and forward, 0.18 m"
    assert lines[3] == "turn left, 11.5 degrees"


def test_cli_help_lists_subcommands():
    out = subprocess.run([str(HAND3D), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "convert-mano" in out.stdout and "walkthrough" in out.stdout


def test_cli_convert_mano_missing_file_is_a_one_line_error(tmp_path):
    out = subprocess.run(
        [str(HAND3D), "convert-mano", str(tmp_path / "nope.pkl"), str(tmp_path / "x.npz")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "nope.pkl" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(not (FIXTURES / "real").is_dir(), reason=f"real fixtures not found at {FIXTURES}")
def test_walkthrough_on_real_fixtures_reports_dataset_facts():
    out = subprocess.run([str(HAND3D), "walkthrough"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    # Facts from the fixtures' README, not from our code: every InterHand joint lands in its box.
    for row in re.findall(r"image\d+\.jpg\s*│\s*(\d+)\s*│\s*(\d+)/(\d+)", text):
        assert row[0] == row[1] == row[2]
    assert len(re.findall(r"image\d+\.jpg", text)) == 4
    assert re.search(r"recovered scale\s*│\s*2\.70", text), text
