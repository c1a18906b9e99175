"""Make ``duck.utils.multiprocessing.processpool`` importable from duckpool.

Installed as a ``.pth`` hook, so it runs at interpreter start-up: it only
appends an import finder to ``sys.meta_path`` (no duckpool import happens
until the seed path is actually imported).

* Without the Duck framework installed, ``import duck.utils.multiprocessing.processpool``
  gives duckpool's API (``duck``, ``duck.utils`` and ``duck.utils.multiprocessing``
  become empty namespace packages).
* With the Duck framework installed, Duck's own modules win and nothing changes,
  unless ``DUCKPOOL_REPLACE_DUCK=1`` is set in the environment: then only the
  ``processpool`` module resolves to duckpool's, and the rest of Duck is untouched.
"""

# Only modules every interpreter has loaded by the time .pth files run: this
# runs at every start-up (spawned workers included), so any import here
# (even ``__future__``, or ``importlib.machinery``, whose package imports
# ``warnings``) would slow every Python process in the environment.  The
# annotations are strings for the same reason.
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import importlib.machinery
    import types
    from collections.abc import Sequence

SEED_MODULE = "duck.utils.multiprocessing.processpool"
_PARENTS = ("duck", "duck.utils", "duck.utils.multiprocessing")


class _ShimLoader:
    """Loads the seed module as a re-export of :mod:`duckpool._seed`."""

    def create_module(self, spec: "importlib.machinery.ModuleSpec") -> "types.ModuleType | None":
        return None

    def exec_module(self, module: "types.ModuleType") -> None:
        from duckpool import _seed

        module.__dict__.update(
            {name: getattr(_seed, name) for name in _seed.__all__},
            __all__=list(_seed.__all__),
            __doc__=_seed.__doc__,
        )


class DuckAliasFinder:
    """Finds the seed module path when no Duck framework provides it."""

    def __init__(self, *, provide_parents: bool) -> None:
        self.provide_parents = provide_parents

    def find_spec(
        self,
        fullname: str,
        path: "Sequence[str] | None" = None,
        target: "types.ModuleType | None" = None,
    ) -> "importlib.machinery.ModuleSpec | None":
        if fullname != SEED_MODULE and (fullname not in _PARENTS or not self.provide_parents):
            return None
        import importlib.machinery

        if fullname == SEED_MODULE:
            return _seed_spec(fullname)
        # A parent, reached only when no installed package provides it: this
        # finder sits at the end of sys.meta_path.
        return importlib.machinery.ModuleSpec(fullname, None, is_package=True)


def _seed_spec(fullname: str) -> "importlib.machinery.ModuleSpec":
    """The seed module's spec: ``duckpool/_seed.py`` run under the seed's name.

    A real module, then, with a ``__file__`` whose source ``inspect``,
    coverage and documentation tools can read; its names are duckpool's own
    objects (``_seed`` only imports them).  Where that file cannot be found
    (duckpool frozen or zipped), a loader that copies ``_seed``'s names.
    """
    import importlib.machinery
    import importlib.util

    from duckpool import _seed

    origin = getattr(_seed, "__file__", None)
    if origin and os.path.isfile(origin):
        spec = importlib.util.spec_from_file_location(fullname, origin)
        if spec is not None:
            return spec
    # A loader by protocol (create_module, exec_module), not by base class.
    return importlib.machinery.ModuleSpec(fullname, _ShimLoader())  # type: ignore[arg-type]


def install() -> None:
    """Register the finder once (idempotent)."""
    if any(isinstance(f, DuckAliasFinder) for f in sys.meta_path):
        return
    # At the end of sys.meta_path: reached only for names nothing else provides.
    sys.meta_path.append(DuckAliasFinder(provide_parents=True))
    if os.environ.get("DUCKPOOL_REPLACE_DUCK", "") not in ("", "0"):
        # At the front: the seed module resolves to duckpool's even when the
        # Duck framework is installed; Duck's other modules are untouched.
        sys.meta_path.insert(0, DuckAliasFinder(provide_parents=False))
