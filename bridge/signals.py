"""Signal handling for every command that runs until it is stopped (the roles, tail, replay,
the simulator): the first SIGINT / SIGTERM sets `stop` (a graceful stop), a second one exits
at once with `second_exit_code`, for a shutdown that hangs or an impatient operator."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import structlog

log = structlog.get_logger("bridge.signals")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def install_signals(stop: asyncio.Event, *, second_exit_code: int = 1) -> None:
    """First SIGINT/SIGTERM: set `stop`. Second: `os._exit(second_exit_code)`."""
    loop = asyncio.get_running_loop()

    def handle(sig: signal.Signals) -> None:
        # Act first, log after: a log line that cannot be written must not block a stop.
        if stop.is_set():
            os._exit(second_exit_code)
        stop.set()
        with contextlib.suppress(Exception):
            log.info("stopping (a second signal exits at once)", signal=sig.name)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, handle, sig)
