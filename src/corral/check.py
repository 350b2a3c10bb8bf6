"""`corral-check`: lint (ruff), types (mypy), tests (pytest), the same locally and in CI.

Extra arguments go to pytest, e.g. `corral-check -m "not slow"`.
"""

from __future__ import annotations

import subprocess
import sys


def main() -> None:
    python = sys.executable
    steps = [
        [python, "-m", "ruff", "check", "src", "tests", "bench"],
        [python, "-m", "ruff", "format", "--check", "src", "tests", "bench"],
        [python, "-m", "mypy"],
        [python, "-m", "pytest", *sys.argv[1:]],
    ]
    for step in steps:
        print("==>", " ".join(step[2:]), flush=True)
        code = subprocess.call(step)
        if code != 0:
            sys.exit(code)


if __name__ == "__main__":
    main()
