#!/usr/bin/env bash
# Builds duckpool's documentation site into docs/_build/html.
#
#   pip install ".[docs]" && bash scripts/docs.sh     then open docs/_build/html/index.html
#   bash scripts/docs.sh PYTHON                        with that interpreter (CI: the test venv)
#
# Warnings are errors (-W), and every cross-reference must resolve (-n): a
# broken link, a docstring that is not valid reST, or a public name missing
# from the API reference (docs/_ext/duckpool_docs.py checks the seed page's
# names and duckpool.__all__) fails the build.  The build reads the source
# statically (sphinx-autodoc2), needs no network and starts no worker.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

python="${1:-python3}"
if ! "$python" -c 'import sphinx, myst_parser, autodoc2, furo' 2>/dev/null; then
    echo "docs.sh: $python lacks the documentation tools: pip install \".[docs]\"" >&2
    exit 1
fi
# -E: a fresh environment each time, so the API pages follow the source.
exec "$python" -m sphinx -E -n -W --keep-going -q -b html docs docs/_build/html
