"""The documentation's own Sphinx extension: autodoc2's renderer, fitted, and checks.

* :class:`SeedRenderer` renders sphinx-autodoc2's pages for duckpool's two
  module paths (``conf.py`` names it).
* :func:`setup` adds a check that every public name is documented: each of
  the Duck framework's seed page, and each of ``duckpool.__all__``; and the
  ``duckpool-object`` directive (:class:`ReturnedObject`).
"""

from __future__ import annotations

import re
import typing as t
from pathlib import Path

from autodoc2.render.myst_ import MystRenderer
from docutils import nodes
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

if t.TYPE_CHECKING:
    from autodoc2.utils import ItemData
    from sphinx.application import Sphinx
    from sphinx.environment import BuildEnvironment

LOGGER = logging.getLogger(__name__)

#: The seed module's path: its page documents duckpool's objects under that name.
SEED_MODULE = "duck.utils.multiprocessing.processpool"

#: Base classes that are implementation, not API: the mixin that gives the
#: executor its submitting methods, a base that depends on the version.  A
#: base missing here and from the documented names fails the build (a broken
#: reference), on purpose.
HIDDEN_BASES = frozenset(
    {
        "duckpool._submitting.Submitting",
        # concurrent.futures.TimeoutError before 3.11, nothing since: the
        # docstring says a task timeout is both kinds of TimeoutError.
        "*_OLD_TIMEOUT_BASES",
    }
)

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

#: Names the private and dunder rules would hide, documented all the same.
SHOWN = frozenset({"duckpool.__version__"})

#: The ``(class, member)`` names the seed page shows (private ones included),
#: read from the seed page when the build starts (see :func:`setup`).
_seed_members: frozenset[tuple[str, ...]] = frozenset()

# A summary-table link to an object's duckpool location, on the seed page.
_SEED_LINK = re.compile(r"\{py:obj\}`(\w+) <duckpool\.[\w.]+>`")
_SIGNATURE = re.compile(r"^(`+\{py:class\} \w+)\(.*\)$")
_BASE = re.compile(r"\{py:obj\}`([^`]+)`")


class SeedRenderer(MystRenderer):
    """autodoc2's MyST pages, fitted to duckpool's two module paths.

    * The seed module re-exports objects defined in ``duckpool``; autodoc2
      lists them once more in an "External" table, which the seed page does
      not have, and names ``duckpool``'s objects as their canonical location,
      which the ``duckpool`` page documents already (a duplicate).  On the
      seed page they are documented under the seed's names only, with the
      private members that page shows, and its summary links to them.
    * ``duckpool.__version__`` is documented (:data:`SHOWN`).
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

    def is_hidden(self, item: ItemData) -> bool:
        if item["full_name"] in SHOWN:
            return False
        owner_and_name = tuple(item["full_name"].rsplit(".", 2)[-2:])
        if self._on_seed_page and owner_and_name in _seed_members:
            return False  # the seed page shows its private members: so does ours
        return bool(super().is_hidden(item))

    _on_seed_page = False

    def render_item(self, full_name: str) -> t.Iterable[str]:
        if full_name == SEED_MODULE:
            self._on_seed_page = True
            try:
                for line in self._render_item(full_name):
                    if line.startswith(":canonical: duckpool."):
                        continue
                    yield _SEED_LINK.sub(rf"{{py:obj}}`\1 <{SEED_MODULE}.\1>`", line)
            finally:
                self._on_seed_page = False
        else:
            yield from self._render_item(full_name)

    def _render_item(self, full_name: str) -> t.Iterable[str]:
        made_by_duckpool = full_name in MADE_BY_DUCKPOOL
        # The "Initialization" section shows the constructor's docstring: none
        # for a class users do not construct, nor where it would only be the
        # stdlib's own (an exception without an __init__ of its own).
        init = self.get_item(f"{full_name}.__init__")
        no_init_section = (
            made_by_duckpool
            or init is None
            or not init.get("doc")
            or bool(init.get("inherited") or init.get("doc_inherited"))
        )
        init_docstring = f"```{{autodoc2-docstring}} {full_name}.__init__"
        # Where a skipped "Initialization" section is: its rubric, what
        # follows it, the constructor's docstring block (if there is one).
        skipping = ""
        for number, line in enumerate(super().render_item(full_name)):
            if made_by_duckpool and number == 0:
                line = _SIGNATURE.sub(r"\1", line)
            if no_init_section:
                if skipping == "" and line == "```{rubric} Initialization":
                    skipping = "rubric"
                    continue
                if skipping == "rubric":
                    skipping = "after rubric" if line == "```" else "rubric"
                    continue
                if skipping == "after rubric":
                    if not line:
                        continue
                    if line.startswith(init_docstring):
                        skipping = "init"
                        continue
                    skipping = ""
                elif skipping == "init":
                    if line == "```":
                        skipping = ""
                    continue
            if line.startswith("Bases: "):
                bases = [b for b in line[len("Bases: ") :].split(", ") if not _hidden_base(b)]
                if not bases:
                    continue
                line = "Bases: " + ", ".join(bases)
            # A sentinel default reads as its name, not as a private module's.
            yield line.replace("= _futures.UNSET", "= UNSET")


def _hidden_base(rendered: str) -> bool:
    match = _BASE.fullmatch(rendered.strip())
    return match is not None and match.group(1).lstrip("~") in HIDDEN_BASES


# --- the build's own checks -----------------------------------------------------

_CANONICAL = re.compile(r"^:canonical: (\S+)$", re.MULTILINE)


def seed_page_names(page: str) -> list[str]:
    """Every name the Duck framework's page documents (its ``:canonical:`` lines)."""
    return _CANONICAL.findall(page)


def _check_documented(app: Sphinx, env: BuildEnvironment) -> None:
    """Warn (an error under ``-W``) for a public name the API pages miss.

    Every name of the seed page (its classes' private members included) must
    be documented under the seed module's path, and every name in
    ``duckpool.__all__`` under ``duckpool``.
    """
    documented = set(env.get_domain("py").objects)  # type: ignore[attr-defined]
    seed_page = Path(app.config.duckpool_seed_page).read_text(encoding="utf-8")
    expected = seed_page_names(seed_page)
    expected += [f"duckpool.{name}" for name in app.config.duckpool_public_names]
    for name in expected:
        if name not in documented:
            LOGGER.warning("%s is public but the API reference does not document it", name)


def _read_seed_members(app: Sphinx, config: t.Any) -> None:
    """What the seed page shows of each class, for :class:`SeedRenderer`."""
    global _seed_members
    page = Path(config.duckpool_seed_page).read_text(encoding="utf-8")
    _seed_members = frozenset(
        tuple(name.rsplit(".", 2)[-2:]) for name in seed_page_names(page) if name.count(".") > 4
    )


class ReturnedObject(SphinxDirective):
    """``{duckpool-object} duckpool._module.Class``: one class, as the API pages render it.

    For the objects the API hands out under no public name (``objects.md``).
    autodoc2's own ``autodoc2-object`` renders a class inside the context of
    that same class, which doubles its name in every link target
    (``duckpool._futures.duckpool._futures.PoolFuture.PoolFuture``); this one
    sets the module alone.
    """

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        from autodoc2.sphinx.utils import (
            get_all_analyser,
            get_database,
            load_config,
            nested_parse_generated,
        )

        full_name = self.arguments[0]
        database = get_database(self.env)
        if full_name not in database:
            raise self.error(f"duckpool-object: {full_name} is not in the API's analysis")
        renderer = SeedRenderer(
            database,
            load_config(self.env.app, location=(self.env.docname, self.lineno)),
            all_resolver=get_all_analyser(self.env),
            standalone=True,
        )
        content = list(renderer.render_item(full_name))
        source, line = self.get_source_info()
        context = self.env.ref_context
        saved = context.get("py:module"), context.get("py:class")
        context["py:module"] = full_name.rsplit(".", 1)[0]
        context.pop("py:class", None)
        try:
            parsed = nested_parse_generated(self.state, content, source, line, match_titles=True)
        finally:
            context["py:module"], context["py:class"] = saved
        return list(parsed.children)


def setup(app: Sphinx) -> dict[str, object]:
    """Register the build's checks and directive (the renderer is named in ``conf.py``)."""
    app.add_directive("duckpool-object", ReturnedObject)
    app.add_config_value("duckpool_seed_page", "", "env")
    app.add_config_value("duckpool_public_names", [], "env")
    app.connect("config-inited", _read_seed_members)
    app.connect("env-check-consistency", _check_documented)
    return {"parallel_read_safe": True, "env_version": 1}
