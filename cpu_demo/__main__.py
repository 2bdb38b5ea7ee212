"""`python -m cpu_demo`: the main job (see `cpu_demo.main_job`)."""

import sys

from cpu_demo.main_job import main

sys.exit(main())
