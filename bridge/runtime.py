"""Running the roles: one process owns one broker connection, the HTTP server and, for `run`, the
worker too. Shutdown is ordered: stop accepting, drain with a bound, cancel what is left with a
logged reason, close connections. A second signal forces exit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

import structlog
import uvicorn

from bridge.amqp import Broker, Publisher
from bridge.config import Settings
from bridge.ingress import create_app
from bridge.metrics import Metrics
from bridge.translate import OutgoingEvent

log = structlog.get_logger("bridge.runtime")


class DirectSink:
    """Publishes each event and waits for the confirm; a failure is the caller's 503. Used when
    the spool is disabled."""

    def __init__(self, publisher: Publisher, metrics: Metrics) -> None:
        self.publisher = publisher
        self.metrics = metrics

    async def accept(self, event: OutgoingEvent) -> str:
        latency = await self.publisher.publish(
            event.exchange, event.routing_key, event.to_message(), mandatory=False
        )
        self.metrics.confirm_latency.observe(latency)
        return "broker"

    def status(self) -> dict[str, Any]:
        return {"mode": "broker"}


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the runtime owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def install_signals(stop: asyncio.Event) -> None:
    """First SIGINT/SIGTERM: graceful stop. Second: exit at once."""
    loop = asyncio.get_running_loop()

    def handle(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("second signal, exiting now", signal=sig.name)
            os._exit(1)
        log.info("stopping", signal=sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle, sig)


async def serve(settings: Settings, roles: frozenset[str], stop: asyncio.Event) -> None:
    """Run the given roles ("ingress", "worker") until `stop` is set."""
    broker = Broker(settings.amqp, name=f"simotel-bridge {'+'.join(sorted(roles))}")
    await broker.connect()
    closers: list[Any] = []
    tasks: list[asyncio.Task[Any]] = []
    server: _Server | None = None
    try:
        if "ingress" in roles:
            publisher = Publisher(broker)
            await publisher.start()
            closers.append(publisher.close)
            metrics = Metrics()
            sink = DirectSink(publisher, metrics)
            app = create_app(
                settings, sink=sink, metrics=metrics, broker_ready=lambda: broker.ready
            )
            config = uvicorn.Config(
                app,
                host=settings.http.host,
                port=settings.http.port,
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=10,
            )
            server = _Server(config)
            tasks.append(asyncio.create_task(server.serve(), name="http"))
            log.info("ingress listening", host=settings.http.host, port=settings.http.port)
        waiter = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not waiter and t.exception() is not None:
                log.error("a role failed", task=t.get_name(), error=repr(t.exception()))
        waiter.cancel()
    finally:
        if server is not None:
            server.should_exit = True
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=settings.worker.shutdown_grace + 5)
            for t in pending:
                log.warning("cancelling after the shutdown bound", task=t.get_name())
                t.cancel()
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                await close()
        await broker.close()
        log.info("stopped")
