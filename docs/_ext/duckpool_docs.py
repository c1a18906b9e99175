"""The documentation's own Sphinx extension: autodoc2's renderer, fitted, and checks.

* :class:`SeedRenderer` renders sphinx-autodoc2's pages for duckpool's two
  module paths (``conf.py`` names it).
* :func:`setup` adds a check that every public name is documented: each of
  the Duck framework's seed page, and each of ``duckpool.__all__``.
"""

from __future__ import annotations

import re
import typing as t
from pathlib import Path

from autodoc2.render.myst_ import MystRenderer
from sphinx.util import logging

if t.TYPE_CHECKING:
    from autodoc2.utils import ItemData
    from sphinx.application import Sphinx
    from sphinx.environment import BuildEnvironment

LOGGER = logging.getLogger(__name__)

#: The seed module's path: its page documents duckpool's objects under that name.
SEED_MODULE = "duck.utils.multiprocessing.processpool"

#: Base classes that are implementation, not API: a mixin that shares code
#: between the executor and the Dask executor.  A base missing here and from
#: the documented names fails the build (a broken reference), on purpose.
HIDDEN_BASES = frozenset({"duckpool._submitting.Submitting"})

#: Classes the API hands out but users never construct (see objects.md): their
#: pages show no constructor signature.
MADE_BY_DUCKPOOL = frozenset(
    {
        "duckpool._futures.PoolFuture",
        "duckpool._options.TaskOptions",
        "duckpool._manager.ManagerOptions",
        "duckpool._map.MapResults",
    }
)

_SIGNATURE = re.compile(r"^(`+\{py:class\} \w+)\(.*\)$")
_BASE = re.compile(r"\{py:obj\}`([^`]+)`")


class SeedRenderer(MystRenderer):
    """autodoc2's MyST pages, fitted to duckpool's two module paths.

    * The seed module re-exports objects defined in ``duckpool``; autodoc2
      lists them once more in an "External" table, which the seed page does
      not have, and names ``duckpool``'s objects as their canonical location,
      which the ``duckpool`` page documents already (a duplicate).  On the
      seed page they are documented under the seed's names only.
    * A class's "Bases:" line leaves out the mixins in :data:`HIDDEN_BASES`,
      and the class documents their methods as its own.
    * Classes in :data:`MADE_BY_DUCKPOOL` show no constructor (no signature,
      no "Initialization"), nor do classes whose constructor has no
      docstring of its own.
    """

    def get_children(
        self, item: ItemData, types: set[str] | None = None, *, omit_hidden: bool = True
    ) -> t.Iterable[ItemData]:
        if types == {"external"}:
            return
        own = list(super().get_children(item, types, omit_hidden=omit_hidden))
        yield from own
        if item["type"] not in ("class", "exception"):
            return
        # A hidden mixin's methods are the class's own API: document them in it.
        names = {child["full_name"].rsplit(".", 1)[-1] for child in own}
        for base in item.get("bases", []):
            if base not in HIDDEN_BASES:
                continue
            mixin = self.get_item(base)
            if mixin is None:
                continue
            for child in super().get_children(mixin, types, omit_hidden=omit_hidden):
                name = child["full_name"].rsplit(".", 1)[-1]
                if name not in names:
                    names.add(name)
                    yield child

    def render_item(self, full_name: str) -> t.Iterable[str]:
        on_seed_page = full_name == SEED_MODULE
        made_by_duckpool = full_name in MADE_BY_DUCKPOOL
        # The "Initialization" section shows the constructor's docstring: none
        # for a class users do not construct, nor where it would only be the
        # stdlib's own (an exception without an __init__ of its own).
        init = self.get_item(f"{full_name}.__init__")
        no_init_section = made_by_duckpool or (
            init is not None and (not init.get("doc") or bool(init.get("doc_inherited")))
        )
        skipping = ""  # in a skipped section: "rubric", then "init"
        for number, line in enumerate(super().render_item(full_name)):
            if made_by_duckpool and number == 0:
                line = _SIGNATURE.sub(r"\1", line)
            if no_init_section:
                if line == "```{rubric} Initialization":
                    skipping = "rubric"
                init_docstring = f"```{{autodoc2-docstring}} {full_name}.__init__"
                if skipping == "rubric" and line.startswith(init_docstring):
                    skipping = "init"
                elif skipping == "init" and line == "```":
                    skipping = ""
                    continue
                if skipping:
                    continue
            if on_seed_page and line.startswith(":canonical: duckpool."):
                continue
            if line.startswith("Bases: "):
                bases = [b for b in line[len("Bases: ") :].split(", ") if not _hidden_base(b)]
                if not bases:
                    continue
                line = "Bases: " + ", ".join(bases)
            yield line


def _hidden_base(rendered: str) -> bool:
    match = _BASE.fullmatch(rendered.strip())
    return match is not None and match.group(1).lstrip("~") in HIDDEN_BASES


# --- the build's own checks -----------------------------------------------------

_CANONICAL = re.compile(r"^:canonical: (\S+)$", re.MULTILINE)


def seed_page_names(page: str) -> list[str]:
    """The public names the Duck framework's page documents (its ``:canonical:`` lines).

    Private and dunder members the page shows (``_worker_init``, ``__repr__``)
    are the original's implementation, not API, and are left out.
    """
    return [
        name for name in _CANONICAL.findall(page) if not name.rsplit(".", 1)[-1].startswith("_")
    ]


def _check_documented(app: Sphinx, env: BuildEnvironment) -> None:
    """Warn (an error under ``-W``) for a public name the API pages miss.

    Every name of the seed page must be documented under the seed module's
    path, and every name in ``duckpool.__all__`` under ``duckpool``.
    """
    documented = set(env.get_domain("py").objects)  # type: ignore[attr-defined]
    seed_page = Path(app.config.duckpool_seed_page).read_text(encoding="utf-8")
    expected = seed_page_names(seed_page)
    expected += [f"duckpool.{name}" for name in app.config.duckpool_public_names]
    for name in expected:
        if name not in documented:
            LOGGER.warning("%s is public but the API reference does not document it", name)


def setup(app: Sphinx) -> dict[str, object]:
    """Register the build's checks (the renderer is named in ``conf.py``)."""
    app.add_config_value("duckpool_seed_page", "", "env")
    app.add_config_value("duckpool_public_names", [], "env")
    app.connect("env-check-consistency", _check_documented)
    return {"parallel_read_safe": True, "env_version": 1}
