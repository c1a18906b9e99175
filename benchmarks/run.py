"""Run duckpool's benchmark harness from a checkout: same as ``duckpool bench [args]``.

    python benchmarks/run.py --quick
    python benchmarks/run.py --libs duckpool,stdlib --metrics latency --markdown

The checkout's ``src/`` goes first on the import path, so this measures the
work tree's duckpool even when another copy is installed.  See README.md here.
"""

from __future__ import annotations

import os
import sys


def _run() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.normpath(os.path.join(here, "..", "src")))
    from duckpool._bench import main

    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_run())
