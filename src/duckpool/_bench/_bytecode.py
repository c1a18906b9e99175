"""The measured libraries as ``pip install`` leaves them: byte-compiled.

``pip install`` byte-compiles what it installs, unless told not to
(``--no-compile``); an interpreter then reads each module's cached bytecode
and never compiles it again.  Where both ``--no-compile`` and
``PYTHONDONTWRITEBYTECODE`` are in force (a CI image, a test environment),
nothing is ever cached: every new interpreter compiles from source each
module it imports, and a spawned worker pays that at every start (about a
third of a duckpool worker's start on a 2-core host).  The standard library
is always compiled, so that would measure the peers and duckpool in a state
no ordinary install is in, against a baseline that is not.

Before measuring, the bench compiles what is not compiled yet: the package
each library imports, and the distributions it belongs to and requires.
"""

from __future__ import annotations

import compileall
import importlib.util
import os
import re
from typing import Iterable

#: A requirement's distribution name (what precedes its version, extras, marker).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: Modules compiled already by this process (the walk through the installed
#: distributions takes about half a second: once is enough).
_done: set[str] = set()


def compile_libraries(modules: Iterable[str]) -> list[str]:
    """Byte-compile the packages of ``modules`` and of what they require.

    Returns the paths compiled now (those whose cached bytecode was missing
    or stale); a path that cannot be written to is left as it is.  A module
    is looked at once per process.
    """
    paths: set[str] = set()
    seen: set[str] = set()  # distributions walked (shared requirements once)
    for module in modules:
        if module in _done:
            continue
        _done.add(module)
        paths.update(_package_files(module))
        for distribution in _distributions_of(module):
            paths.update(_distribution_files(distribution, seen))
    compiled = []
    for path in sorted(paths):
        if _cached(path):
            continue
        if compileall.compile_file(path, quiet=2, force=True) and _cached(path):
            compiled.append(path)
    return compiled


def _cached(path: str) -> bool:
    """Would an import of ``path`` use its cached bytecode (as importlib judges)?"""
    try:
        with open(importlib.util.cache_from_source(path), "rb") as file:
            header = file.read(16)
        source = os.stat(path)
    except (OSError, ValueError, NotImplementedError):
        return False
    if len(header) < 16 or header[:4] != importlib.util.MAGIC_NUMBER:
        return False
    flags = int.from_bytes(header[4:8], "little")
    if flags & ~0b11:
        return False  # (flags importlib rejects)
    if flags & 0b01:  # hash-based: checked against the source at import, or never
        if not flags & 0b10:
            return True
        try:
            with open(path, "rb") as file:
                return header[8:16] == importlib.util.source_hash(file.read())
        except OSError:
            return False
    mtime, size = int.from_bytes(header[8:12], "little"), int.from_bytes(header[12:16], "little")
    return mtime == int(source.st_mtime) & 0xFFFFFFFF and size == source.st_size & 0xFFFFFFFF


def _package_files(module: str) -> list[str]:
    """The ``.py`` files of the package (or module) ``module`` is imported from."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [
            os.path.join(directory, name)
            for location in spec.submodule_search_locations
            for directory, _, names in os.walk(location)
            for name in names
            if name.endswith(".py")
        ]
    return [spec.origin] if spec.origin and spec.origin.endswith(".py") else []


def _distributions_of(module: str) -> list[str]:
    """The installed distributions that provide the top-level ``module``."""
    from importlib import metadata

    top = module.partition(".")[0]
    if hasattr(metadata, "packages_distributions"):  # Python 3.10+ (top_level.txt first)
        names = list(metadata.packages_distributions().get(top, []))
        if names:
            return names
    names = []
    for distribution in metadata.distributions():
        files = distribution.files or ()
        name = distribution.metadata["Name"]
        if name and any(file.parts and file.parts[0] in (top, f"{top}.py") for file in files):
            names.append(name)
    return names


def _distribution_files(name: str, seen: set[str]) -> list[str]:
    """The ``.py`` files of distribution ``name`` and of every distribution it
    requires (extras aside), as installed; none of those in ``seen`` (which
    gains them)."""
    from importlib import metadata

    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return []
    seen.add(key)
    try:
        distribution = metadata.distribution(name)
    except (metadata.PackageNotFoundError, ValueError):
        return []
    files = [str(file.locate()) for file in distribution.files or () if str(file).endswith(".py")]
    for requirement in distribution.requires or ():
        if "extra" in requirement.partition(";")[2]:
            continue  # (an optional extra's)
        match = _NAME.match(requirement)
        if match:
            files += _distribution_files(match.group(0), seen)
    return files
