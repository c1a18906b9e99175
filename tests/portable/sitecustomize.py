"""Start-up hook of the portable-paths test run: hide Linux's own facilities.

``scripts/test.sh`` runs one whole suite with this directory on ``PYTHONPATH``
and ``DUCKPOOL_TEST_PORTABLE=1``: every interpreter of that run (pytest, and
each worker, zygote and child script it starts) then lacks pidfds, memfds and
epoll, as on macOS and the BSDs, so duckpool's fallbacks for them run on every
change.  Without the variable, this hook does nothing.
"""

import os

if os.environ.get("DUCKPOOL_TEST_PORTABLE") == "1":
    import select
    import signal

    for _module, _name in (
        (os, "pidfd_open"),
        (os, "memfd_create"),
        (signal, "pidfd_send_signal"),
        (select, "epoll"),
    ):
        if hasattr(_module, _name):
            delattr(_module, _name)
