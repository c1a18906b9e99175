"""The docutils parser for duckpool's docstrings (Google style, in reST).

duckpool's docstrings use Google-style sections (``Args:``, ``Returns:``,
``Raises:``, ``Attributes:``).  sphinx-autodoc2 hands a docstring to the
docutils parser it is told to use; this one converts those sections to reST
with Sphinx's napoleon first, then parses the result as reST.
"""

from __future__ import annotations

from docutils import nodes
from docutils.parsers import rst
from sphinx.ext.napoleon import Config
from sphinx.ext.napoleon.docstring import GoogleDocstring

# Attributes as ``:ivar:`` fields, not ``.. attribute::`` directives: autodoc2
# documents a class's attributes itself, and two descriptions of one
# attribute would be a duplicate.
_CONFIG = Config(napoleon_use_ivar=True, napoleon_use_rtype=False)


class Parser(rst.Parser):
    """reST, after napoleon's conversion of Google-style sections."""

    supported = ("duckpool_docstrings",)

    def parse(self, inputstring: str, document: nodes.document) -> None:
        super().parse(str(GoogleDocstring(inputstring, _CONFIG)), document)
