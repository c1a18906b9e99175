"""The pipe that interrupts the dispatcher's wait, from any thread, and its tag."""

from __future__ import annotations

import os
import threading

#: The tag of the wakeup pipe.
WAKEUP = object()


class Wakeup:
    """The pipe that interrupts the dispatcher's wait, from any thread."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        # Its own lock: once the pipe is closed its number may belong to
        # another file, which a stray write would corrupt.  Reentrant: a
        # finalizer may wake the dispatcher (``PoolCore.abandon``) from
        # inside a wake-up or a close of the same thread, interrupted by the
        # garbage collector; the others only ever hold it for one write or close.
        self.lock = threading.RLock()
        self.closed = False

    def wake(self) -> None:
        with self.lock:
            if self.closed:
                return
            try:
                os.write(self.write_fd, b"\0")
            except OSError:
                pass  # the pipe is full: a wake-up is already due

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except OSError:
            pass

    def close(self) -> bool:
        """Close the pipe; False if it already was."""
        with self.lock:
            if self.closed:
                return False
            self.closed = True
            for fd in (self.read_fd, self.write_fd):
                try:
                    os.close(fd)
                except OSError:
                    pass
            return True

    def forget_after_fork(self) -> None:
        """In a forked child: never write to (or close) the parent's pipe."""
        self.closed = True
        self.lock = threading.RLock()
