"""`bridge.signals`: the first SIGTERM / SIGINT asks for a graceful stop, a second one exits at
once with the command's code (1 for the roles, 130 for tail / replay / the simulator)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

# Stops gracefully on the first signal, then hangs: only a second signal ends it.
PROGRAM = """
import asyncio, sys
from bridge.signals import install_signals

async def main() -> None:
    stop = asyncio.Event()
    install_signals(stop, second_exit_code=int(sys.argv[1]))
    print("ready", flush=True)
    await stop.wait()
    print("stopping", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.parametrize(("first", "code"), [(signal.SIGTERM, 1), (signal.SIGINT, 130)])
def test_first_signal_stops_and_a_second_exits_at_once(first: signal.Signals, code: int) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", PROGRAM, str(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        _signal_twice(proc, first, code)


def _signal_twice(proc: subprocess.Popen[str], first: signal.Signals, code: int) -> None:
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(first)
        lines = iter(proc.stdout.readline, "")  # ends if the process exits
        assert "stopping" in (line.strip() for line in lines)  # structlog logs to stdout too
        assert proc.poll() is None  # a graceful stop, not an exit
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
