"""The ASGI example under uvicorn with 2 server workers: a burst, then SIGTERM.

Every accepted request gets an answer (a result, 429 when saturated, 502 for
a crashed worker, 504 for a timeout), and after SIGTERM no process is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import process_gone, wait_until

psutil = pytest.importorskip("psutil")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

# Seconds per start method; what it adds to the pool tests does not depend on
# the Python version, so scripts/test.sh leaves it out on 3.9.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get_accepted(url: str) -> tuple[int, Any]:
    """``_get``, again while the answer is 429 (busy), as a client would retry."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        status, body = _get(url)
        if status != 429 or time.monotonic() > deadline:
            return status, body
        time.sleep(0.05)  # a client's back-off; the answer itself is what is waited for


def _stream(url: str, headers: dict[str, str]) -> list[Any]:
    """The JSON lines a streaming endpoint sends (retried while busy: 429)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            request = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return [json.loads(line) for line in response.read().splitlines()]
        except urllib.error.HTTPError as exc:
            if exc.code != 429 or time.monotonic() > deadline:
                raise
        time.sleep(0.05)  # a client's back-off


def _server_up(url: str) -> bool:
    try:
        return _get(url)[0] == 200
    except OSError:
        return False


def test_a_burst_is_answered_and_sigterm_leaves_no_process(start_method: str) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, DUCKPOOL_EXAMPLE_START_METHOD=start_method)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "examples.asgi_app:app",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_until(lambda: _server_up(f"{base}/fib?n=5"), TIMEOUT, interval=0.1)
        paths = ["/fib?n=18"] * 24 + ["/crash"] * 4 + ["/slow?seconds=3"] * 2
        with ThreadPoolExecutor(12) as clients:
            answers = list(clients.map(lambda path: (path, *_get(base + path)), paths))
        for path, status, body in answers:
            expected = {"/fib": 200, "/crash": 502, "/slow": 504}[path.split("?")[0]]
            assert status in (expected, 429), (path, status, body)
            if status == 200:
                assert body["result"] == 2584
        assert sum(status == 200 for _, status, _ in answers) >= 1
        # The server workers whose pools have started: each answer names the
        # one that gave it (a pool starts with its first task).
        served = {body["server_pid"] for _, _, body in answers}
        if not any(status == 502 for _, status, _ in answers):
            # Every crash of the burst met a saturated pool (429, a matter
            # of timing): one more, alone, must fail with the worker's death.
            status, body = _get_accepted(f"{base}/crash")
            assert status == 502, body
            served.add(body["server_pid"])
        # The pools healed: work still goes through after the crashes.
        status, body = _get(f"{base}/fib?n=10")
        assert (status, body["result"]) == (200, 55)
        served.add(body["server_pid"])
        stats = _get(f"{base}/stats")[1]
        assert stats["max_workers"] == 2
        # A long task streams its progress; the request's id reaches it.
        lines = _stream(f"{base}/report?rows=300", {"X-Request-ID": "req-test-7"})
        *updates, last = lines
        assert last["result"]["rows"] == 300, lines
        assert updates and all(u["total"] == 300 for u in updates), lines
        assert [u["done"] for u in updates] == sorted(u["done"] for u in updates)

        master = psutil.Process(server.pid)
        seen: dict[int, int] = {}  # pool workers by server worker, at the last look

        def pool_workers(server_worker: Any) -> int:
            count = 0
            for process in server_worker.children(recursive=True):
                command = process.cmdline()
                # Workers only (example-compute-0, -1), not the zygote and
                # its standby (example-compute-zygote, ...-zygote-standby).
                count += (
                    bool(command) and re.fullmatch(r"example-compute-\d+", command[0]) is not None
                )
            return count

        def pools_full() -> bool:
            """Every started pool has its 2 workers again (a crashed one's
            replacement may still be starting: under spawn that takes a while)."""
            try:
                counts = {child.pid: pool_workers(child) for child in master.children()}
            except psutil.NoSuchProcess:
                return False
            seen.clear()
            seen.update(counts)
            return served <= counts.keys() and all(
                count == 2 or (count == 0 and pid not in served) for pid, count in counts.items()
            )

        try:
            wait_until(pools_full, TIMEOUT)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; pool workers of each server worker: {seen}") from None
        members = [server.pid] + [p.pid for p in master.children(recursive=True)]
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=TIMEOUT)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(TIMEOUT)
    assert "Traceback" not in output, output
    # Logged in a pool worker, forwarded to its server worker's logging.
    assert "request req-test-7: building a report of 300 rows" in output, output
    wait_until(lambda: all(process_gone(pid) for pid in members), TIMEOUT)
