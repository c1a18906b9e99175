"""duckpool under a real Duck framework install, with ``DUCKPOOL_REPLACE_DUCK=1``.

The Duck framework (``duckframework`` on PyPI) is installed once, without its
dependencies, into a directory of its own (kept under
``~/.cache/duckpool-tests``): it cannot share the suite's venv, where the seed
path must resolve to duckpool's without the switch.  A small Duck program
then runs in a child interpreter, with that directory on its path, under
each start method.  Offline, the tests skip, saying so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DUCK_RELEASE = "2.3.2"
_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "duckpool-tests"

PROGRAM = textwrap.dedent(
    """
    import json, multiprocessing, sys
    import duck
    import duck.utils.multiprocessing.processpool as processpool

    def square(x):
        return x * x

    if __name__ == "__main__":
        manager = processpool.get_or_create_process_manager("duck-renders")
        manager.start(2, mp_context=multiprocessing.get_context(sys.argv[1]))
        try:
            results = [manager.submit_task(square, i).result(30) for i in range(10)]
        finally:
            manager.stop()
        print(json.dumps({
            "results": results,
            "seed_file": processpool.__file__,
            "duck_file": duck.__file__,
            "manager_module": type(manager).__module__,
        }))
    """
)


@pytest.fixture(scope="module")
def duck_install() -> Path:
    """A directory holding the Duck framework (and nothing else)."""
    target = _CACHE / f"duckframework-{DUCK_RELEASE}"
    if not (target / "duck" / "__init__.py").exists():
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
        command += ["--no-compile", "--disable-pip-version-check", "--target", str(partial)]
        done = subprocess.run(
            [*command, f"duckframework=={DUCK_RELEASE}"],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"could not install duckframework {DUCK_RELEASE}: {done.stderr[-500:]}")
        try:
            partial.rename(target)
        except OSError:  # another run got there first
            assert (target / "duck" / "__init__.py").exists()
    return target


def _run(duck_install: Path, *args: str, replace: bool) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ)
    # Duck first; whatever path the suite itself runs with (src/ in a checkout) after.
    path = [str(duck_install), *filter(None, [environment.get("PYTHONPATH")])]
    environment["PYTHONPATH"] = os.pathsep.join(path)
    environment.pop("DUCKPOOL_REPLACE_DUCK", None)
    if replace:
        environment["DUCKPOOL_REPLACE_DUCK"] = "1"
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )


def test_a_duck_program_runs_on_duckpool_with_the_switch_on(
    duck_install: Path, start_method: str, tmp_path: Path
) -> None:
    import json

    program = tmp_path / "duck_program.py"
    program.write_text(PROGRAM)
    done = _run(duck_install, str(program), start_method, replace=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["results"] == [i * i for i in range(10)]
    # The pool module is duckpool's (a real module with its source); the rest
    # of Duck is Duck's own.
    assert Path(report["seed_file"]).parts[-2:] == ("duckpool", "_seed.py")
    assert Path(report["duck_file"]).is_relative_to(duck_install)
    assert report["manager_module"] == "duckpool._manager"


def test_without_the_switch_duck_keeps_its_own_pool_module(duck_install: Path) -> None:
    done = _run(
        duck_install,
        "-c",
        "import duck.utils.multiprocessing.processpool as p; print(p.__file__)",
        replace=False,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == (
        duck_install / "duck" / "utils" / "multiprocessing" / "processpool.py"
    )
