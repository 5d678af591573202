"""Dialplan components (SmartApi, ExtenApi, TrunkApi, IvrApi) answered over RabbitMQ.

Simotel calls a component URL during a live call and waits one second
(docs/simotel/webhooks.md §5). The bridge publishes the request to `simotel.components` with
routing key `{source}.{Component}.{app_name}`, `reply_to` = RabbitMQ direct reply-to, a
`correlation_id` and an `expiration` equal to the time left, and answers Simotel before the
deadline with either the responder's (validated) answer or the configured fallback:

    answered              a valid answer arrived in time
    fallback-no-route     no queue is bound to the key: the broker returned the mandatory
                          publish, so the fallback goes out at once
    fallback-timeout      no answer before the deadline (a later answer is dropped and counted)
    fallback-invalid      the answer is not valid for the component (or over
                          `max_answer_bytes`, refused before it is parsed), or the responder
                          failed
    fallback-unavailable  the broker connection is not usable
    fallback-overload     `max_in_flight` requests are already waiting: a memory guard far above
                          what a healthy bridge holds (a waiting call costs a future and a dict
                          entry), so hundreds of calls can wait on a healthy responder

Everything from the request that reaches the wire (the routing key, the `app_name` and `call_id`
headers, the audit event of `publish_as_event`) is bounded by `bridge.wire`, so no request can
make the broker close the connection that every call and event share. An answer is checked
within the deadline whatever the responder sends: its size before it is parsed, the SmartApi
script's length and command count while it is parsed.

The pure part (validation, fallback resolution, deadlines, request headers, the audit event) is
`bridge.answers`; `ComponentRpc` is the thin aio-pika adapter: one channel per process with
publisher confirms (the only way aiormq reports a returned mandatory publish) that also consumes
`amq.rabbitmq.reply-to`, and a dict correlation_id → Future. `ComponentEvents` is the
`publish_as_event` side channel; the metrics are `bridge.metrics.ComponentMetrics`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from typing import Any, Protocol

import aio_pika
import aio_pika.exceptions
import orjson
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from aiormq.exceptions import ChannelInvalidStateError

from bridge import wire
from bridge.amqp import Broker, Publisher, json_message, on_reopen
from bridge.answers import (
    COMPONENTS,
    DEFAULT_FALLBACK,
    DEFAULT_MAX_ANSWER_BYTES,
    DIALPLAN_UNSAFE,
    ERROR_TYPE,
    Answer,
    AnswerFields,
    Component,
    ComponentOutcome,
    InvalidAnswer,
    Outcome,
    component_event,
    deadline_s,
    decide,
    event_name,
    fallback_problems,
    request_headers,
    resolve_fallback,
    validate_answer,
)
from bridge.config import ComponentSettings, Settings
from bridge.errors import BridgeError, ConfigError, WebhookError
from bridge.metrics import ComponentMetrics
from bridge.translate import OutgoingEvent
from bridge.wire import REPLY_TO, component_key

# The pure part lives in bridge.answers; these names are kept importable from here.
__all__ = [
    "COMPONENTS",
    "DEFAULT_FALLBACK",
    "DEFAULT_MAX_ANSWER_BYTES",
    "DEFAULT_MAX_IN_FLIGHT",
    "DIALPLAN_UNSAFE",
    "ERROR_TYPE",
    "REPLY_TO",
    "Answer",
    "AnswerFields",
    "Component",
    "ComponentEvents",
    "ComponentMetrics",
    "ComponentOutcome",
    "ComponentRpc",
    "EventAcceptor",
    "InvalidAnswer",
    "Outcome",
    "component_event",
    "deadline_s",
    "decide",
    "event_name",
    "fallback_problems",
    "resolve_fallback",
    "validate_answer",
]

log = structlog.get_logger("bridge.components")

# Time kept back from the deadline to serialise and write the answer.
SEND_MARGIN_S = 0.003
_REMEMBER_EXPIRED = 4096
# Requests waiting for a responder at once, per process, before new ones get the fallback at
# once. A waiting call costs a future and a dict entry (well under a kilobyte), and every one
# ends at its deadline, so the number in flight is at most calls/s x deadline: 2048 is 2560
# calls per second at 800 ms, beyond any PBX. It is a memory guard, not a throttle.
DEFAULT_MAX_IN_FLIGHT = 2048


class EventAcceptor(Protocol):
    """Where component events go (the ingress's sink: broker confirm or the local spool)."""

    async def accept(self, event: OutgoingEvent) -> str: ...


# --- the RPC adapter ------------------------------------------------------------------------


class ComponentRpc:
    """Answers component requests through RabbitMQ. `start()` before `handle()`, `close()` at
    the end. One instance per process: it owns one channel and one reply-to consumer."""

    def __init__(
        self,
        broker: Broker,
        settings: Settings,
        metrics: ComponentMetrics,
        *,
        events: EventAcceptor | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        problems = fallback_problems(settings)
        if problems:
            raise ConfigError(problems)
        self.broker = broker
        self.settings = settings
        self.metrics = metrics
        self.events = ComponentEvents(settings.amqp.exchanges.events, metrics, events)
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._pending: dict[str, tuple[asyncio.Future[tuple[str | None, bytes]], str]] = {}
        self._expired: OrderedDict[str, str] = OrderedDict()
        self._parked: set[asyncio.Task[Any]] = set()  # consuming replies again after a reconnect
        self._replies = False
        self._closing = False
        self.max_in_flight = max_in_flight

    @property
    def ready(self) -> bool:
        ch = self._channel
        return self.broker.ready and self._replies and ch is not None and not ch.is_closed

    async def start(self) -> None:
        self._channel = channel = await self.broker.channel(confirms=True)
        name = self.settings.amqp.exchanges.components
        self._exchange = await channel.get_exchange(name, ensure=False)
        await self._consume_replies()
        # The reply-to pseudo-queue cannot be declared, so aio-pika does not restore its
        # consumer: consume again whenever the robust channel is reopened.
        channel.close_callbacks.add(self._on_channel_closed)
        on_reopen(
            channel,
            self._consume_replies_again,
            self._parked,
            what="component replies",
            stopped=lambda: self._closing,
        )
        if any(s.components.publish_as_event for s in self.settings.sources.values()):
            await self.events.start(self.broker)

    async def close(self, grace: float = 5.0) -> None:
        """Wait (bounded) for event publishes in flight, then close the channel."""
        self._closing = True
        for task in list(self._parked):
            task.cancel()
        await self.events.close(grace)
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _consume_replies(self) -> None:
        assert self._channel is not None
        queue = await self._channel.get_queue(REPLY_TO, ensure=False)
        await queue.consume(self._on_reply, no_ack=True)
        self._replies = True

    async def _consume_replies_again(self) -> None:
        await self._consume_replies()
        log.info("component replies consumed again after a reconnect")

    def _on_channel_closed(self, _: object, exc: BaseException | None = None) -> None:
        """Calls waiting on this channel cannot get their reply any more: fall back now."""
        self._replies = False
        for future, _component in self._pending.values():
            if not future.done():
                future.set_exception(ChannelInvalidStateError(f"channel closed: {exc!r}"))

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        cid = message.correlation_id or ""
        entry = self._pending.get(cid)
        if entry is not None and not entry[0].done():
            entry[0].set_result((message.type, message.body))
            return
        component = self._expired.get(cid, "unknown")
        self.metrics.late.labels(component).inc()
        log.info("late component answer dropped", correlation_id=cid, component=component)

    async def handle(
        self,
        source: str,
        component: str,
        fields: dict[str, Any],
        *,
        received_at: float | None = None,
        traceparent: object = None,
    ) -> dict[str, Any]:
        """The answer for Simotel, ready before the deadline. `received_at` is the
        `time.monotonic()` at which the request arrived (default: now). A valid `traceparent`
        (W3C) is carried to the request and its event; without one the request starts a trace."""
        ss = self.settings.sources.get(source)
        if ss is None:
            raise WebhookError(404, "unknown_source", f"no source named {source!r}")
        if component not in COMPONENTS:
            raise WebhookError(404, "unknown_component", f"no component named {component!r}")
        loop = asyncio.get_running_loop()
        now = loop.time()
        started = now if received_at is None else now - (time.monotonic() - received_at)
        wait_until = started + deadline_s(ss.components, component) - SEND_MARGIN_S
        app_name = str(fields.get("app_name") or "")

        cid = uuid.uuid4().hex
        trace = wire.traceparent(traceparent) or wire.new_traceparent()
        answer: AnswerFields | None = None
        if len(self._pending) >= self.max_in_flight:
            outcome: ComponentOutcome = "fallback-overload"
            reason = f"{len(self._pending)} requests in flight"
        else:
            outcome, answer, reason = await self._ask(
                cid, source, component, app_name, fields, wait_until, ss.components, trace
            )
        if answer is None:
            answer = resolve_fallback(ss.components, component, app_name)

        elapsed = loop.time() - started
        self.metrics.requests.labels(source, component, outcome).inc()
        self.metrics.latency.labels(component, outcome).observe(elapsed)
        ctx = dict(
            source=source, component=component, app_name=wire.for_log(app_name), outcome=outcome
        )
        if outcome in ("answered", "fallback-overload"):  # the ingress logs every request
            log.debug("component answered", **ctx, ms=round(elapsed * 1000, 2))
        else:
            log.info("component fallback", **ctx, reason=reason, ms=round(elapsed * 1000, 2))
        if ss.components.publish_as_event:
            self.events.publish(source, component, fields, cid, outcome, answer, trace)
        return answer

    async def _ask(
        self,
        cid: str,
        source: str,
        component: str,
        app_name: str,
        fields: dict[str, Any],
        wait_until: float,
        cs: ComponentSettings,
        trace: str,
    ) -> tuple[ComponentOutcome, AnswerFields | None, str]:
        """Publish the request and wait for the reply until `wait_until` (loop time)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[str | None, bytes]] = loop.create_future()
        self._pending[cid] = (future, component)
        try:
            async with asyncio.timeout_at(wait_until):
                if not self.ready or self._exchange is None:
                    raise aio_pika.exceptions.AMQPConnectionError("broker not ready")
                left_ms = int((wait_until - loop.time()) * 1000)
                if left_ms < 1:
                    raise TimeoutError
                message = json_message(
                    orjson.dumps(fields),
                    message_id=cid,
                    type=component,
                    correlation_id=cid,
                    reply_to=REPLY_TO,
                    expiration_ms=left_ms,
                    persistent=False,
                    timestamp=time.time(),
                    headers=request_headers(source, component, app_name, fields, left_ms, trace),
                )
                key = component_key(source, component, app_name)
                wire.check(key, message.properties)
                await self._exchange.publish(message, key, mandatory=True)
                reply_type, body = await future
            if len(body) > cs.max_answer_bytes:
                self.metrics.oversized.labels(component).inc()
            return decide(component, reply_type, body, cs.max_answer_bytes)
        except wire.WireError as exc:  # bounded above: the last line, never expected
            return "fallback-invalid", None, f"the request cannot be sent: {exc}"
        except aio_pika.exceptions.PublishError:
            return "fallback-no-route", None, "no responder bound"
        except TimeoutError:
            self._expired[cid] = component
            while len(self._expired) > _REMEMBER_EXPIRED:
                self._expired.popitem(last=False)
            return "fallback-timeout", None, "no answer before the deadline"
        except (
            aio_pika.exceptions.DeliveryError,
            RuntimeError,
            *aio_pika.exceptions.CONNECTION_EXCEPTIONS,
        ) as exc:
            return "fallback-unavailable", None, repr(exc)
        finally:
            self._pending.pop(cid, None)


# --- the event side channel (publish_as_event) ---------------------------------------------


class ComponentEvents:
    """Each component request also published as an event (`publish_as_event`), in the
    background: an event never delays an answer, and one that cannot be published is counted
    and logged, never raised. Goes to the given sink (the ingress's: broker or spool), or, when
    there is none, to a publisher of its own started by `start()`."""

    def __init__(
        self, exchange: str, metrics: ComponentMetrics, sink: EventAcceptor | None = None
    ) -> None:
        self.exchange = exchange
        self.metrics = metrics
        self._sink = sink
        self._publisher: Publisher | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, broker: Broker) -> None:
        if self._sink is None:
            self._publisher = Publisher(broker)
            await self._publisher.start()
            self._sink = _PublisherSink(self._publisher)

    def publish(
        self,
        source: str,
        component: str,
        fields: dict[str, Any],
        message_id: str,
        outcome: ComponentOutcome,
        answer: AnswerFields,
        trace: str,
    ) -> None:
        if self._sink is None:
            return
        event = component_event(
            self.exchange, source, component, fields, message_id, outcome, answer, trace=trace
        )
        task = asyncio.create_task(self._accept(self._sink, event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, sink: EventAcceptor, event: OutgoingEvent) -> None:
        try:
            await sink.accept(event)
        except BridgeError as exc:
            self.metrics.events_failed.labels(event.source).inc()
            log.warning("component event not published", source=event.source, error=str(exc))

    async def close(self, grace: float) -> None:
        """Wait (bounded) for the events in flight, then close the own publisher."""
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                log.warning("component events not published at shutdown", count=len(late))
        if self._publisher is not None:
            await self._publisher.close()


class _PublisherSink:
    """Publishes an event and waits for the confirm (used when no sink is given)."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    async def accept(self, event: OutgoingEvent) -> str:
        await self.publisher.publish(event.exchange, event.routing_key, event.to_message())
        return "broker"
