"""Every argument check of the public calls, in one message style.

A bad argument fails at the call site, before anything is queued or
started, with an error that names the argument and the value it got:
``TypeError`` for a value of the wrong kind, ``ValueError`` for one out of
range (``max_workers must be greater than 0, got 0``).  Each check returns
the value to use.  The executors (local and Dask), the manager and the
shutdown helpers call these; this module imports nothing above them.

At import it loads nothing the shutdown helpers would not load anyway
(``duckpool.drain_all`` may be imported long before any pool exists): a
check that needs ``pickle``, ``multiprocessing`` or ``_admission`` imports
it when it runs, once a pool is being made and they are loaded already.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext

__all__ = [
    "BACKENDS",
    "check_accepted_task_types",
    "check_admission",
    "check_backend",
    "check_callable",
    "check_chunksize",
    "check_cluster_arguments",
    "check_drain_timeout",
    "check_initargs",
    "check_mp_context",
    "check_name_prefix",
    "check_offered_task_types",
    "check_one_of",
    "check_picklable",
    "check_positive_int",
    "check_task_callable",
    "check_task_type",
    "check_timeout",
    "check_type_limits",
    "default_max_workers",
]

#: The manager's backends: this machine's worker processes, or a Dask cluster.
BACKENDS = ("local", "dask")


def default_max_workers() -> int:
    """The CPUs this process may use: its CPU affinity, capped by its
    cgroup's CPU quota rounded up, at least 1 (``_cpus.cpu_budget`` says why)."""
    from duckpool._cpus import cpu_budget

    return cpu_budget().workers


def check_positive_int(
    name: str,
    value: Any,
    *,
    allow_none: bool = True,
    wrong_type: type[Exception] = TypeError,
) -> Optional[int]:
    """An int >= 1 (or None, if allowed).

    ``wrong_type``: what a value that is not an int raises (the manager's
    ``start`` documents ``ValueError`` for any bad ``max_workers``).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be greater than 0, got {value!r}")
    return value


def check_buffersize(value: Any) -> Optional[int]:
    """``map``'s ``buffersize``, checked as Python 3.14's executors check it
    (same errors, same messages, a bool counting as an int)."""
    if value is None:
        return None
    if not isinstance(value, int):
        raise TypeError("buffersize must be an integer or None")
    if value < 1:
        raise ValueError("buffersize must be None or > 0")
    return value


def check_timeout(name: str, value: Any) -> Optional[float]:
    """Seconds > 0, or None for no limit."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be greater than 0 seconds, got {value!r}")
    return float(value)


def check_drain_timeout(value: Any) -> float:
    """A drain's seconds, >= 0 (0: stop what is left at once).

    ``ValueError`` whatever is wrong with it, as ``drain_all`` documents.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"timeout must be a number of seconds >= 0, got {value!r}")
    return float(value)


def check_one_of(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return str(value)


def check_callable(name: str, value: Any) -> None:
    """A callable, or None."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable, got {value!r}")


def check_task_callable(fn: Any, caller: str = "submit()") -> None:
    """What ``submit`` (or ``caller``) runs."""
    if not callable(fn):
        raise TypeError(f"{caller} needs a callable, got {fn!r}")


def check_initargs(value: Any) -> tuple[Any, ...]:
    """``initargs``: the initializer's arguments, any iterable of them; None
    for none (as a configuration that defaults both settings to None passes
    them, which the standard library takes when there is no initializer)."""
    if value is None:
        return ()
    try:
        return tuple(value)
    except TypeError:
        raise TypeError(
            f"initargs must be an iterable of the initializer's arguments (a tuple), got {value!r}"
        ) from None


def check_picklable(name: str, value: Any) -> None:
    """A value that must reach worker processes."""
    import pickle

    try:
        pickle.dumps(value)
    except Exception as exc:
        raise TypeError(f"{name} must be picklable, got {value!r}: {exc}") from exc


def check_name_prefix(value: Any) -> Optional[str]:
    """``process_name_prefix``: a str, or None for the default names."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"process_name_prefix must be a str or None, got {value!r}")
    return value


def check_mp_context(value: Any) -> Optional[BaseContext]:
    """``mp_context``: a multiprocessing context, or None for the default one.

    The ``multiprocessing`` module itself, which the standard library's
    executor takes as its default context, is that context.
    """
    import multiprocessing
    from multiprocessing.context import BaseContext

    if value is multiprocessing:
        return multiprocessing.get_context()
    if value is not None and not isinstance(value, BaseContext):
        raise TypeError(f"mp_context must be a multiprocessing context, got {value!r}")
    return value


def check_admission(
    max_pending: Any, on_saturated: Any, block_timeout: Any
) -> tuple[Optional[int], Optional[float]]:
    """Admission control: ``max_pending`` (None: unbounded) and ``block_timeout``."""
    from duckpool._admission import POLICIES

    check_one_of("on_saturated", on_saturated, POLICIES)
    timeout = check_timeout("block_timeout", block_timeout)
    if max_pending is None:
        return None, timeout
    if isinstance(max_pending, bool) or not isinstance(max_pending, int):
        raise TypeError(f"max_pending must be an int or None, got {max_pending!r}")
    if max_pending < 0:
        raise ValueError(f"max_pending must be >= 0, got {max_pending!r}")
    return max_pending, timeout


def check_type_limits(limits: Any) -> Optional[dict[str, int]]:
    """``type_limits``: a mapping of task type to a positive int."""
    if limits is None:
        return None
    if not isinstance(limits, Mapping):
        raise TypeError(f"type_limits must be a mapping of task type to int, got {limits!r}")
    checked = {}
    for kind, limit in limits.items():
        if not isinstance(kind, str):
            raise TypeError(f"type_limits keys must be task types (str), got {kind!r}")
        value = check_positive_int(f"type_limits[{kind!r}]", limit, allow_none=False)
        assert value is not None
        checked[kind] = value
    return checked


def check_task_type(value: Any) -> Optional[str]:
    """One task's type (``options(task_type=...)``)."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"task_type must be a str or None, got {value!r}")
    return value


def check_min_workers(value: Any, max_workers: int) -> Optional[int]:
    """An elastic pool's ``min_workers``: an int from 0 to ``max_workers``, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"min_workers must be an int or None, got {value!r}")
    if not 0 <= value <= max_workers:
        raise ValueError(
            f"min_workers must be from 0 to max_workers ({max_workers}), got {value!r}"
        )
    return value


def check_priority(value: Any) -> int:
    """A task's priority: any int (higher goes first among queued tasks)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"priority must be an int, got {value!r}")
    return value


def check_retries(value: Any) -> int:
    """How many times a task may be run again after its worker died or it timed out."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"retries must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"retries must be 0 or more, got {value!r}")
    return value


def check_ordered(value: Any) -> bool:
    """``map``'s ``ordered``: a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"ordered must be True or False, got {value!r}")
    return value


def check_accepted_task_types(task_type: Any) -> Optional[frozenset[str]]:
    """A manager's ``task_type``: the set of types it accepts, or None for any."""
    if task_type is None:
        return None
    if isinstance(task_type, str):
        return frozenset((task_type,))
    if isinstance(task_type, Collection) and not isinstance(task_type, (bytes, Mapping)):
        types = frozenset(task_type)
        if types and all(isinstance(t, str) for t in types):
            return types
    raise TypeError(
        f"task_type must be a str, a non-empty collection of str, or None, got {task_type!r}"
    )


def check_offered_task_types(task_types: Optional[Iterable[str]]) -> tuple[str, ...]:
    """The task types a Dask LocalCluster's workers offer (as resources)."""
    if task_types is None:
        return ()
    if isinstance(task_types, str):
        raise TypeError(f"task_types must be a list of str, not a str: use [{task_types!r}]")
    types = tuple(task_types)
    for task_type in types:
        if not isinstance(task_type, str) or not task_type:
            raise TypeError(f"task_types must hold non-empty str, got {task_type!r}")
    return types


def check_cluster_arguments(
    address: Any, task_types: tuple[str, ...], cluster_options: Any
) -> None:
    """Refuse the LocalCluster's own settings for an existing Dask cluster."""
    if address is not None and task_types:
        raise ValueError(
            f"task_types={list(task_types)!r} applies to the LocalCluster started when "
            "address is None; the workers of an existing cluster offer the resources "
            'they were started with (dask worker --resources "render=1")'
        )
    if address is not None and cluster_options:
        raise ValueError(
            "cluster_options applies only to the LocalCluster started when address is None"
        )


def check_backend(backend: Any, address: Any, local_only: Mapping[str, Any]) -> str:
    """A manager's ``backend``, and the options given that it does not take.

    ``local_only``: the options, by name, that only a local pool takes
    (given unless None); ``address`` is the Dask backend's only.
    """
    check_one_of("backend", backend, BACKENDS)
    if backend == "local" and address is not None:
        raise ValueError(
            f"address applies to backend='dask' only, got address={address!r} with backend='local'"
        )
    if backend == "dask":
        refused = [name for name, value in local_only.items() if value is not None]
        if refused:
            verb = "applies" if len(refused) == 1 else "apply"
            raise ValueError(
                f"{', '.join(refused)} {verb} to backend='local' only, not backend='dask' "
                "(the Dask cluster starts, names and schedules its own workers)"
            )
    return str(backend)


def check_chunksize(value: Any) -> Optional[int]:
    """``map``'s ``chunksize``: an int >= 1, or None for the executor's default."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"chunksize must be >= 1 or None, got {value!r}")
    return value
