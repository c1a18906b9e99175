"""Functions the large-buffer tests run in worker processes (importable under spawn)."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any


def echo(value: Any) -> Any:
    return value


def describe(value: Any) -> tuple[str, int, str, bool]:
    """What the worker received: type, size, digest, and whether it is read-only."""
    view = memoryview(value)
    return type(value).__name__, view.nbytes, hashlib.sha256(view).hexdigest(), view.readonly


def echo_view(value: memoryview) -> tuple[memoryview, str, tuple[int, ...], bool]:
    """A memoryview back, with the format, shape and read-only flag it arrived with."""
    return value, value.format, value.shape, value.readonly


def make_bytes(size: int, seed: int) -> bytes:
    """``size`` bytes that differ from one seed to the next."""
    return pattern(size, seed)


def pattern(size: int, seed: int) -> bytes:
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    return (block * (size // len(block) + 1))[:size]


def several(size: int) -> tuple[bytes, bytearray, list[bytes], dict[str, bytes]]:
    """A result holding large buffers at the depths that travel out of band."""
    return (
        pattern(size, 1),
        bytearray(pattern(size, 2)),
        [pattern(size, 3)],
        {"k": pattern(size, 4)},
    )


def block_then_echo(gate: str, started: str, value: Any) -> Any:
    """Say "running" by creating ``started``, wait for ``gate``, then echo ``value``."""
    Path(started).touch()
    deadline = time.monotonic() + 30
    while not Path(gate).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} did not appear")
        time.sleep(0.005)
    return value


def die_holding(value: Any) -> None:
    """Be SIGKILLed with a large argument received (and a large result unsent)."""
    os.kill(os.getpid(), signal.SIGKILL)


def shared_areas() -> int:
    """How many shared-area memfds this worker has open (an fd may appear twice)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            if "duckpool-buffers" in target:
                found.add(os.stat(f"/proc/self/fd/{name}").st_ino)
        except OSError:
            continue
    return len(found)
