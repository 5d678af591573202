"""Several ingress processes on one port (`http.workers: N`, docs/scaling.md).

`simotel-bridge ingress` (or `run`) with `http.workers` above 1 does not serve itself: it starts
N child processes of the same command, each listening on `http.port` with SO_REUSEPORT (the
kernel spreads connections over them) and each on its own spool file, derived from
`spool.path`: `var/spool.sqlite3` becomes `var/spool-1.sqlite3` ... `var/spool-N.sqlite3`. A
spool is one process's: its order and its replay are that process's, as with one process.

- `run`: only the ingress is multiplied. Child 1 runs `run` (ingress, worker, reconcilers);
  children 2..N run `ingress`. One command worker per process group, as with one process.
- A child that exits while the supervisor is not stopping is started again, with the same
  index, so on the same spool (what it accepted and had not published is replayed first),
  after a pause that doubles from 0.5 s to 30 s while children keep dying at once.
- SIGTERM/SIGINT: forwarded to every child, which stops in its own order (stop accepting,
  drain, close); children still running after the bound are killed with a logged reason. A
  second signal kills the children at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from bridge.config import Settings
from bridge.errors import ConfigError

log = structlog.get_logger("bridge.supervisor")

ENV = "SIMOTEL_BRIDGE__"
BACKOFF = (0.5, 30.0)
# A child that lived this long before dying is restarted after the shortest pause.
STEADY_S = 30.0


def spool_path(path: str, index: int) -> str:
    """The spool file of child `index`: `var/spool.sqlite3` -> `var/spool-2.sqlite3`."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{index}{p.suffix}"))


@dataclass(frozen=True)
class Child:
    """One child process to keep running: its index, its command and its settings overrides."""

    index: int
    command: str
    env: dict[str, str]

    def argv(self, config: Path | None) -> list[str]:
        tail = ["-c", str(config)] if config is not None else []
        return [sys.executable, "-m", "bridge.cli", self.command, *tail]


def plan(settings: Settings, command: str) -> list[Child]:
    """The children for `command` ("ingress" or "run") under `settings.http.workers`."""
    n = settings.http.workers
    if settings.http.port == 0:
        raise ConfigError([("http.port", "http.workers above 1 needs a fixed port")])
    children = []
    for index in range(1, n + 1):
        env = {
            f"{ENV}HTTP__WORKERS": "1",
            f"{ENV}HTTP__REUSE_PORT": "true",
            f"{ENV}SPOOL__PATH": spool_path(settings.spool.path, index),
        }
        child_command = command if index == 1 else "ingress"
        children.append(Child(index, child_command, env))
    return children


class Supervisor:
    def __init__(
        self,
        children: Sequence[Child],
        config: Path | None,
        *,
        grace: float,
        backoff: tuple[float, float] = BACKOFF,
    ) -> None:
        self.children = list(children)
        self.config = config
        self.grace = grace
        self.backoff = backoff
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.procs: dict[int, asyncio.subprocess.Process] = {}

    def install_signals(self) -> None:
        """First SIGINT/SIGTERM: stop the children in order. Second: kill them."""
        loop = asyncio.get_running_loop()

        def handle(sig: signal.Signals) -> None:
            if self.stop.is_set():
                self.force.set()
                self._signal_all(signal.SIGKILL)
                return
            self.stop.set()
            with contextlib.suppress(Exception):
                log.info("stopping the ingress processes", signal=sig.name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, handle, sig)

    async def run(self) -> None:
        keepers = [
            asyncio.create_task(self._keep(c), name=f"child-{c.index}") for c in self.children
        ]
        try:
            await self.stop.wait()
        finally:
            self._signal_all(signal.SIGTERM)
            _, pending = await asyncio.wait(keepers, timeout=self.grace)
            if pending:
                for index, proc in self.procs.items():
                    if proc.returncode is None:
                        log.warning("killing after the shutdown bound", child=index, pid=proc.pid)
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                await asyncio.wait(pending, timeout=10)
            for task in keepers:
                task.cancel()
        log.info("stopped")

    async def _keep(self, child: Child) -> None:
        """Run `child` until the supervisor stops, starting it again when it dies."""
        pause = self.backoff[0]
        while not self.stop.is_set():
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *child.argv(self.config), env={**os.environ, **child.env}
            )
            self.procs[child.index] = proc
            log.info(
                "child started",
                child=child.index,
                pid=proc.pid,
                command=child.command,
                spool=child.env[f"{ENV}SPOOL__PATH"],
            )
            code = await proc.wait()
            if self.stop.is_set():
                log.info("child stopped", child=child.index, pid=proc.pid, code=code)
                return
            if time.monotonic() - started >= STEADY_S:
                pause = self.backoff[0]
            log.error(
                "child died, starting it again on its spool",
                child=child.index,
                pid=proc.pid,
                code=code,
                pause_s=pause,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), pause)
            pause = min(pause * 2, self.backoff[1])

    def _signal_all(self, sig: signal.Signals) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)


async def supervise(settings: Settings, command: str, config: Path | None) -> None:
    """`simotel-bridge ingress|run` with `http.workers` above 1, until SIGTERM/SIGINT."""
    sup = Supervisor(plan(settings, command), config, grace=settings.worker.shutdown_grace + 20)
    sup.install_signals()
    log.info(
        "supervising ingress processes",
        workers=settings.http.workers,
        port=settings.http.port,
        command=command,
    )
    await sup.run()
