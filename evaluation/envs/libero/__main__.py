"""`python -m evaluation.envs.libero [SUITE ...]`: LIBERO's tasks as `vipa-eval --tasks` names them, with their
instructions (asked of the LIBERO simulator; the four suites of Table 3 by default).

    python -m evaluation.envs.libero libero_goal
    libero_goal-0	open the middle drawer of the cabinet
    ...
"""

from __future__ import annotations

import sys

from evaluation.envs.libero import LiberoSuite
from evaluation.envs.libero.sim import SUITES


def main(argv: list[str] | None = None) -> int:
    suites = (sys.argv[1:] if argv is None else argv) or list(SUITES)
    suite = LiberoSuite()
    try:
        for name in suites:
            for i, task in enumerate(suite.describe(name)):
                print(f"{name}-{i}\t{task['language']}")
    except (ValueError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        suite.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
