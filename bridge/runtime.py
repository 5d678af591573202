"""Running the roles: one process owns one broker connection, the HTTP server and, for `run`, the
worker too. Shutdown is ordered: stop accepting, drain with a bound, cancel what is left with a
logged reason, close connections. A second signal forces exit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

import structlog

from bridge import httpserver
from bridge.amqp import Broker, Publisher
from bridge.components import ComponentMetrics, ComponentRpc
from bridge.config import Settings
from bridge.errors import BridgeError, ConfigError
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
        latency = await self.publisher.publish_raw(
            event.exchange, event.routing_key, event.body, event.properties(), mandatory=False
        )
        self.metrics.confirm_latency.observe(latency)
        return "broker"

    def status(self) -> dict[str, Any]:
        return {"mode": "broker"}


class RoleFailed(BridgeError):
    """A role (HTTP server, worker) stopped on its own; the process exits non-zero."""


def install_signals(stop: asyncio.Event) -> None:
    """First SIGINT/SIGTERM: graceful stop. Second: exit at once."""
    loop = asyncio.get_running_loop()

    def handle(sig: signal.Signals) -> None:
        # Act first, log after: a log line that cannot be written must not block a stop.
        if stop.is_set():
            os._exit(1)
        stop.set()
        with contextlib.suppress(Exception):
            log.info("stopping (a second signal exits at once)", signal=sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle, sig)


async def serve(settings: Settings, roles: frozenset[str], stop: asyncio.Event) -> None:
    """Run the given roles ("ingress", "worker") until `stop` is set. Every role serves
    /healthz, /readyz and /metrics on the HTTP port; only the ingress serves webhooks.

    Shutdown is ordered: the HTTP server stops accepting and gives open requests a few seconds;
    the worker (which watches `stop`) drains within its grace; a role still running after that
    bound is cancelled with a logged reason; the connections close last."""
    broker = Broker(settings.amqp, name=f"simotel-bridge {'+'.join(sorted(roles))}")
    await broker.connect()
    metrics = Metrics()
    tasks: list[asyncio.Task[Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(broker.close)
        stack.push_async_callback(_drain, tasks, settings.worker.shutdown_grace + 5)
        if "worker" in roles:
            if any(s.api is not None for s in settings.sources.values()):
                from bridge.worker import WorkerMetrics, run_worker

                worker_metrics = WorkerMetrics(metrics.registry)
                worker = run_worker(settings, stop, broker=broker, metrics=worker_metrics)
                tasks.append(asyncio.create_task(worker, name="worker"))
            elif roles == {"worker"}:
                raise ConfigError([("sources", "no source has api settings: nothing to call")])
            else:
                log.warning("no source has api settings: the command worker is not started")
        publisher = Publisher(broker)
        await publisher.start()
        stack.push_async_callback(publisher.close)
        sink = DirectSink(publisher, metrics)
        components: ComponentRpc | None = None
        if "ingress" in roles:
            components = ComponentRpc(
                broker,
                settings,
                ComponentMetrics(metrics.registry),
                events=sink,
                max_in_flight=max(s.components.max_in_flight for s in settings.sources.values()),
            )
            await components.start()
            stack.push_async_callback(components.close)
        app = create_app(
            settings,
            sink=sink,
            metrics=metrics,
            components=components,
            broker_ready=lambda: broker.ready,
            webhooks="ingress" in roles,
        )
        host, port = settings.http.host, settings.http.port
        try:
            url = await stack.enter_async_context(httpserver.serve(app, host, port, graceful=5))
        except OSError as exc:
            raise RoleFailed(f"cannot listen on {host}:{port}: {exc}") from exc
        stack.callback(stop.set)  # runs first on the way out: tells the worker to drain
        log.info("listening", roles=sorted(roles), url=url)
        waiter = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        for t in done:
            if t is not waiter:
                failure = t.exception() if not t.cancelled() else None
                log.error("a role ended early", role=t.get_name(), error=repr(failure))
                raise RoleFailed(f"{t.get_name()} ended early: {failure!r}")
    log.info("stopped")


async def _drain(tasks: list[asyncio.Task[Any]], bound: float) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=bound)
    for t in pending:
        log.warning("cancelling after the shutdown bound", role=t.get_name())
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
