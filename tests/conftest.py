"""Test-session settings that must exist before any test module imports its libraries."""

import os

# MuJoCo chooses its GL backend when first imported; a test's `pytest.importorskip("mujoco")` can run
# before the synth source sets this, so set it for the whole session here.
os.environ.setdefault("MUJOCO_GL", "egl")
# Nothing in the suite may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
