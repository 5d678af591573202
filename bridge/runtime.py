"""Running the roles: one process owns one broker connection, the HTTP server and, for `run`, the
worker too. Shutdown is ordered: stop accepting, drain with a bound, cancel what is left with a
logged reason, close connections. A second signal forces exit."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from bridge import httpserver
from bridge.amqp import Broker, Publisher
from bridge.components import ComponentMetrics, ComponentRpc
from bridge.config import Settings
from bridge.errors import ConfigError
from bridge.errors import RoleFailed as RoleFailed  # re-exported: defined in bridge.errors
from bridge.ingress import create_app, listener_guard
from bridge.metrics import Metrics
from bridge.signals import install_signals
from bridge.sink import EventSink, SpoolMetrics

log = structlog.get_logger("bridge.runtime")

__all__ = ["RoleFailed", "install_signals", "serve"]


async def serve(settings: Settings, roles: frozenset[str], stop: asyncio.Event) -> None:
    """Run the given roles ("ingress", "worker") until `stop` is set. Every role serves
    /healthz, /readyz and /metrics on the HTTP port; only the ingress serves webhooks.

    An ingress with the spool enabled starts even when the broker is down: it spools what it
    accepts and connects in the background. Otherwise a broker that does not answer within
    `amqp.connect_timeout` is a start-up error.

    Shutdown is ordered: the HTTP server stops accepting and gives open requests a few seconds;
    the spool gets a few seconds to drain; the worker (which watches `stop`) drains within its
    grace; a role still running after that bound is cancelled with a logged reason; the
    connections close last."""
    broker = Broker(
        settings.amqp,
        name=f"simotel-bridge {'+'.join(sorted(roles))}",
        history=settings.history,
        sources=settings.sources,
    )
    ingress = "ingress" in roles
    await broker.connect(wait=not (ingress and settings.spool.enabled))
    metrics = Metrics()
    tasks: list[asyncio.Task[Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(broker.close)
        stack.push_async_callback(_drain, tasks, settings.worker.shutdown_grace + 5)
        if "worker" in roles:
            if any(s.api is not None for s in settings.sources.values()):
                worker = _run_worker(settings, stop, broker, metrics)
                tasks.append(asyncio.create_task(worker, name="worker"))
            elif roles == {"worker"}:
                raise ConfigError([("sources", "no source has api settings: nothing to call")])
            else:
                log.warning("no source has api settings: the command worker is not started")
        publisher = Publisher(broker)
        await publisher.start()
        stack.push_async_callback(publisher.close)
        tasks.extend(_start_reconcilers(settings, roles, stop, broker, publisher, metrics))
        if ingress:
            sink = await EventSink.open(
                settings,
                publisher,
                SpoolMetrics(metrics.registry),
                confirm_latency=metrics.confirm_latency,
            )
            stack.push_async_callback(sink.close, 5.0)
        else:
            # A worker takes no events: it must not open (and lock) the ingress's spool file.
            sink = EventSink(publisher, None, SpoolMetrics(metrics.registry))
        components: ComponentRpc | None = None
        if ingress and settings.history.enabled:
            tasks.append(_watch_history(broker, metrics, stop))
        if ingress:
            components = ComponentRpc(
                broker,
                settings,
                ComponentMetrics(metrics.registry),
                events=sink,
                max_in_flight=max(s.components.max_in_flight for s in settings.sources.values()),
            )
            # Until the broker is there, component requests get their fallback at once.
            starter = asyncio.create_task(_start_when_connected(broker, components))
            tasks.append(starter)
            stack.push_async_callback(components.close)
            stack.callback(starter.cancel)
        if ingress:
            # The unrouted queue drops its oldest events when full: watched and reported.
            from bridge.unrouted import UnroutedWatch

            watch = UnroutedWatch(broker, settings.amqp, metrics.registry)
            watcher = asyncio.create_task(watch.run(stop), name="unrouted-watch")
            tasks.append(watcher)
            stack.callback(watcher.cancel)
        app = create_app(
            settings,
            sink=sink,
            metrics=metrics,
            components=components,
            broker_ready=lambda: broker.ready,
            webhooks=ingress,
        )
        host, port = settings.http.host, settings.http.port
        try:
            guard = listener_guard(settings, metrics, webhooks=ingress)
            reuse = settings.http.reuse_port
            served = httpserver.serve(app, host, port, graceful=5, guard=guard, reuse_port=reuse)
            url = await stack.enter_async_context(served)
        except OSError as exc:
            raise RoleFailed(f"cannot listen on {host}:{port}: {exc}") from exc
        stack.callback(stop.set)  # runs first on the way out: tells the worker to drain
        log.info("listening", roles=sorted(roles), url=url, broker=broker.ready)
        waiter = asyncio.create_task(stop.wait(), name="stop")
        while True:
            done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                break
            for t in done:
                tasks.remove(t)
                failure = t.exception() if not t.cancelled() else None
                if failure is not None or (t.get_name() == "worker" and not stop.is_set()):
                    waiter.cancel()
                    log.error("a role ended early", role=t.get_name(), error=repr(failure))
                    raise RoleFailed(f"{t.get_name()} ended early: {failure!r}")
    log.info("stopped")


async def _run_worker(
    settings: Settings, stop: asyncio.Event, broker: Broker, metrics: Metrics
) -> None:
    from bridge.worker import WorkerMetrics, run_worker

    if not await broker.connected_unless(stop):
        return
    await run_worker(settings, stop, broker=broker, metrics=WorkerMetrics(metrics.registry))


def _watch_history(broker: Broker, metrics: Metrics, stop: asyncio.Event) -> asyncio.Task[None]:
    """The history stream's metrics, refreshed in the background (bridge/historystats.py)."""
    from bridge.historystats import HistoryMetrics, watch

    history = HistoryMetrics(metrics.registry)
    return asyncio.create_task(watch(broker, history, stop), name="history-metrics")


def _start_reconcilers(
    settings: Settings,
    roles: frozenset[str],
    stop: asyncio.Event,
    broker: Broker,
    publisher: Publisher,
    metrics: Metrics,
) -> list[asyncio.Task[None]]:
    """The reconciler of every source that enables it, in the `reconcile` role and in `run`
    (ingress and worker together). Simotel being unreachable never touches /readyz."""
    enabled = [name for name, s in settings.sources.items() if s.reconcile.enabled]
    if not enabled:
        if roles == {"reconcile"}:
            raise ConfigError([("sources", "no source has reconcile.enabled: nothing to do")])
        return []
    from bridge.reconcile import run_reconcilers

    # The seen queues are declared by the Broker with the rest of the topology (it has the
    # sources), so what an ingress publishes is kept for the reconciler even while none runs.
    tasks: list[asyncio.Task[None]] = []
    if "reconcile" in roles or {"ingress", "worker"} <= roles:
        reconcilers = run_reconcilers(settings, enabled, stop, broker, publisher, metrics.registry)
        tasks.append(asyncio.create_task(reconcilers, name="reconcile"))
    return tasks


async def _start_when_connected(broker: Broker, components: ComponentRpc) -> None:
    await broker.wait_connected()
    await components.start()


async def _drain(tasks: list[asyncio.Task[Any]], bound: float) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=bound)
    for t in pending:
        log.warning("cancelling after the shutdown bound", role=t.get_name())
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
