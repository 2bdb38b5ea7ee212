"""`python -m cpu_demo`: the main job (see `cpu_demo.main_job`)."""

import os
import sys

from cpu_demo import openmp_environment

os.environ.update(openmp_environment(os.environ))  # before torch is imported: libgomp reads it once

from cpu_demo.main_job import main  # noqa: E402

sys.exit(main())
