"""Watching `simotel.unrouted`: the alternate exchange's queue keeps events nobody is bound for,
up to `amqp.unrouted_max_length`; past that the broker drops the OLDEST of them (`x-max-length`
with the default `drop-head` overflow). That is the queue's documented behaviour, not a loss of
an accepted event the ingress could prevent: the event was confirmed, routed by the broker to
the only place that matched, and kept there as long as room allowed.

It is kept this way on purpose. `x-overflow: reject-publish` would make the broker nack a
publish while the queue is full, and the ingress would then spool the event and, once the spool
is full, answer 503 to every webhook: one forgotten binding would stop the whole ingress. And
changing the arguments of an existing queue makes every later declaration fail.

So the loss is made visible instead: `UnroutedWatch` reads the queue's depth cheaply (a passive
declare) every `interval` seconds, exports it as gauges, and logs a warning when the queue comes
near its bound and when it is full (and so dropping).
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from prometheus_client import CollectorRegistry, Gauge

from bridge.amqp import Broker, close_quietly
from bridge.config import AmqpSettings

log = structlog.get_logger("bridge.unrouted")

CHECK_INTERVAL = 30.0
NEAR = 0.8  # share of the bound from which a warning is logged


class UnroutedWatch:
    def __init__(
        self,
        broker: Broker,
        amqp: AmqpSettings,
        registry: CollectorRegistry,
        *,
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self.broker = broker
        self.queue = amqp.queues.unrouted
        self.bound = amqp.unrouted_max_length
        self.interval = interval
        self.depth = Gauge(
            "simotel_bridge_unrouted_depth",
            "Events waiting in simotel.unrouted (no binding matched them), read periodically",
            registry=registry,
        )
        self.full = Gauge(
            "simotel_bridge_unrouted_full",
            "1 while simotel.unrouted is at amqp.unrouted_max_length: its oldest events are "
            "being dropped",
            registry=registry,
        )
        self._state = "ok"

    async def check_once(self) -> int | None:
        """Read the depth now (None if the broker cannot tell), update the gauges, and log a
        warning when the state changes to near-full or full."""
        if not self.broker.ready:
            return None
        channel = await self.broker.channel(confirms=False)
        try:
            async with asyncio.timeout(10):
                queue = await channel.declare_queue(self.queue, passive=True)
            depth = queue.declaration_result.message_count
        finally:
            await close_quietly(channel)
        if depth is None:
            return None
        self.depth.set(depth)
        state = "full" if depth >= self.bound else "near" if depth >= NEAR * self.bound else "ok"
        self.full.set(1 if state == "full" else 0)
        if state != self._state:
            if state == "full":
                log.warning(
                    "simotel.unrouted is full: its oldest events are being dropped (bind a "
                    "queue for them, or raise amqp.unrouted_max_length)",
                    depth=depth,
                    max_length=self.bound,
                )
            elif state == "near":
                log.warning("simotel.unrouted is near its bound", depth=depth, bound=self.bound)
            else:
                log.info("simotel.unrouted is below its bound again", depth=depth)
            self._state = state
        return depth

    async def run(self, stop: asyncio.Event) -> None:
        """Check every `interval` seconds until `stop` is set. Never raises: a failed check is
        logged and tried again at the next interval."""
        while not stop.is_set():
            try:
                await self.check_once()
            except Exception as exc:
                log.warning("cannot read the depth of simotel.unrouted", error=repr(exc)[:300])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await stop.wait()
