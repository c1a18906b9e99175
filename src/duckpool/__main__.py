"""``python -m duckpool``: the ``duckpool`` command line (see :mod:`duckpool._cli`)."""

import sys

from duckpool._cli import main

if __name__ == "__main__":
    sys.exit(main())
