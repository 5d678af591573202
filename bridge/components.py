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

The pure part (validation, fallback resolution, deadlines) comes first; `ComponentRpc` is the
thin aio-pika adapter: one channel per process with publisher confirms (the only way aiormq
reports a returned mandatory publish) that also consumes `amq.rabbitmq.reply-to`, and a dict
correlation_id → Future.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import aio_pika
import aio_pika.exceptions
import orjson
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
)
from aiormq.exceptions import ChannelInvalidStateError
from prometheus_client import CollectorRegistry, Counter, Histogram

from bridge import wire
from bridge.amqp import Broker, Publisher, json_message
from bridge.client.answers import DIALPLAN_UNSAFE as DIALPLAN_UNSAFE  # re-exported: bridge.answers
from bridge.client.answers import AnswerFields
from bridge.client.answers import validate_answer as validate_answer
from bridge.config import ComponentSettings, Settings
from bridge.errors import BridgeError, ConfigError, WebhookError
from bridge.errors import InvalidAnswer as InvalidAnswer  # re-exported: defined in bridge.errors
from bridge.translate import OutgoingEvent, call_id, checked
from bridge.wire import COMPONENTS as COMPONENTS  # re-exported: defined in bridge.wire
from bridge.wire import ERROR_TYPE as ERROR_TYPE
from bridge.wire import (
    REPLY_TO,
    component_key,
    event_key,
    sanitise,
)
from bridge.wire import Component as Component

log = structlog.get_logger("bridge.components")

ComponentOutcome = Literal[
    "answered",
    "fallback-no-route",
    "fallback-timeout",
    "fallback-invalid",
    "fallback-unavailable",
    "fallback-overload",
]

# Used when nothing is configured. `{"ok": "0"}` is the official packages' explicit failure:
# SmartApi documents that a failed or incorrect reply leaves through output `e`, and ExtenApi /
# TrunkApi leave through `F`. Configure a real answer (an operator extension, an IVR case) for
# anything that must not fail.
DEFAULT_FALLBACK: AnswerFields = {"ok": "0"}
# Time kept back from the deadline to serialise and write the answer.
SEND_MARGIN_S = 0.003
_REMEMBER_EXPIRED = 4096
# Requests waiting for a responder at once, per process, before new ones get the fallback at
# once. A waiting call costs a future and a dict entry (well under a kilobyte), and every one
# ends at its deadline, so the number in flight is at most calls/s x deadline: 2048 is 2560
# calls per second at 800 ms, beyond any PBX. It is a memory guard, not a throttle.
DEFAULT_MAX_IN_FLIGHT = 2048
# Replies larger than this are refused before they are parsed. The largest valid answer (a
# SmartApi script of 64 commands) is about 20 KB.
DEFAULT_MAX_ANSWER_BYTES = 65536


# --- pure core ------------------------------------------------------------------------------


def resolve_fallback(cs: ComponentSettings, component: str, app_name: str) -> AnswerFields:
    """The most specific configured fallback: `Component.app_name` (as sent, then sanitised),
    then `Component`, then DEFAULT_FALLBACK. Configured fallbacks are checked at start-up."""
    for key in (f"{component}.{app_name}", f"{component}.{sanitise(app_name)}", component):
        if key in cs.fallbacks:
            return validate_answer(component, cs.fallbacks[key])
    return dict(DEFAULT_FALLBACK)


def deadline_s(cs: ComponentSettings, component: str) -> float:
    return cs.deadlines_ms.get(component, cs.deadline_ms) / 1000


def fallback_problems(settings: Settings) -> list[tuple[str, str]]:
    """Every configured fallback that is not a valid answer, as (config key, problem)."""
    problems = []
    for source, ss in settings.sources.items():
        for key, answer in ss.components.fallbacks.items():
            try:
                validate_answer(key.split(".", 1)[0], answer)
            except InvalidAnswer as exc:
                problems.append((f"sources.{source}.components.fallbacks.{key}", str(exc)))
    return problems


def decide(
    component: str,
    reply_type: str | None,
    body: bytes,
    max_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
) -> tuple[ComponentOutcome, AnswerFields | None, str]:
    """Turn a responder's reply into (outcome, answer or None for the fallback, reason). A
    reply over `max_bytes` is refused before anything is parsed."""
    if len(body) > max_bytes:
        return "fallback-invalid", None, f"the answer is over {max_bytes} bytes"
    if reply_type == ERROR_TYPE:
        return "fallback-invalid", None, "responder error: " + body[:200].decode(errors="replace")
    try:
        return "answered", validate_answer(component, orjson.loads(body)), ""
    except orjson.JSONDecodeError:
        return "fallback-invalid", None, "the answer is not JSON"
    except InvalidAnswer as exc:
        return "fallback-invalid", None, str(exc)


def event_name(component: str) -> str:
    """Event name under which a component request is also published to the events exchange
    (routing key `{source}.Component{Name}`, e.g. `simotel.ComponentSmartApi`)."""
    return f"Component{component}"


def component_event(
    exchange: str,
    source: str,
    component: str,
    fields: dict[str, Any],
    message_id: str,
    outcome: ComponentOutcome,
    answer: AnswerFields,
    now: float | None = None,
    *,
    trace: str | None = None,
) -> OutgoingEvent:
    """A component request as an event (publish_as_event): the fields as Simotel sent them,
    the event headers of docs/contract.md §4, plus `component`, `app_name`, `outcome` and
    `answer`."""
    received = time.time() if now is None else now
    name = event_name(component)
    cid = call_id(fields)
    headers = {
        **wire.event_headers(source, name, received, cid, trace),
        "component": component,
        "app_name": str(fields.get("app_name") or ""),
        "outcome": outcome,
        "answer": orjson.dumps(answer).decode(),
    }
    # The body keeps every field as sent; a header over its budget is cut and listed in
    # `truncated`, so the event can always be published (and never blocks the spool).
    return checked(
        OutgoingEvent(
            exchange=exchange,
            routing_key=event_key(source, name),
            body=orjson.dumps(fields),
            message_id=message_id,
            event=name,
            source=source,
            call_id=cid,
            timestamp=received,
            headers=wire.bound_headers(headers, {"answer": wire.ANSWER_HEADER_MAX}),
        )
    )


class EventAcceptor(Protocol):
    """Where component events go (the ingress's sink: broker confirm or the local spool)."""

    async def accept(self, event: OutgoingEvent) -> str: ...


# --- metrics --------------------------------------------------------------------------------


class ComponentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "simotel_bridge_component_requests",
            "Component requests by outcome",
            ["source", "component", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "simotel_bridge_component_latency_seconds",
            "Time from the request reaching the bridge to the answer being ready",
            ["component", "outcome"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 2.0),
            registry=registry,
        )
        self.oversized = Counter(
            "simotel_bridge_component_oversized_answers",
            "Answers refused unparsed because they were over max_answer_bytes",
            ["component"],
            registry=registry,
        )
        self.late = Counter(
            "simotel_bridge_component_late_answers",
            "Answers that arrived after their deadline (dropped)",
            ["component"],
            registry=registry,
        )
        self.events_failed = Counter(
            "simotel_bridge_component_events_failed",
            "Component requests that could not be published as events",
            ["source"],
            registry=registry,
        )


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
        self._events = events
        self._publisher: Publisher | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._pending: dict[str, tuple[asyncio.Future[tuple[str | None, bytes]], str]] = {}
        self._expired: OrderedDict[str, str] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._replies = False
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
        # aio-pika restores consumers only of queues it declared, and the reply-to pseudo-queue
        # cannot be declared: consume again whenever the robust channel is reopened.
        channel.close_callbacks.add(self._on_channel_closed)
        if isinstance(channel, AbstractRobustChannel):
            channel.reopen_callbacks.add(self._on_channel_reopened)
        wants_events = any(s.components.publish_as_event for s in self.settings.sources.values())
        if wants_events and self._events is None:
            self._publisher = Publisher(self.broker)
            await self._publisher.start()
            self._events = _PublisherSink(self._publisher)

    async def close(self, grace: float = 5.0) -> None:
        """Wait (bounded) for event publishes in flight, then close the channel."""
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                log.warning("component events not published at shutdown", count=len(late))
        if self._publisher is not None:
            await self._publisher.close()
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _consume_replies(self) -> None:
        assert self._channel is not None
        queue = await self._channel.get_queue(REPLY_TO, ensure=False)
        await queue.consume(self._on_reply, no_ack=True)
        self._replies = True

    def _on_channel_closed(self, _: object, exc: BaseException | None = None) -> None:
        """Calls waiting on this channel cannot get their reply any more: fall back now."""
        self._replies = False
        for future, _component in self._pending.values():
            if not future.done():
                future.set_exception(ChannelInvalidStateError(f"channel closed: {exc!r}"))

    async def _on_channel_reopened(self, _: object) -> None:
        await self._consume_replies()
        log.info("component replies consumed again after a reconnect")

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
        if ss.components.publish_as_event and self._events is not None:
            task = asyncio.create_task(
                self._publish_event(source, component, fields, cid, outcome, answer, trace)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
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
                    headers=wire.component_request_headers(
                        source,
                        component,
                        app_name,
                        datetime.fromtimestamp(time.time() + left_ms / 1000, UTC),
                        call_id(fields),
                        trace,
                    ),
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

    async def _publish_event(
        self,
        source: str,
        component: str,
        fields: dict[str, Any],
        message_id: str,
        outcome: ComponentOutcome,
        answer: AnswerFields,
        trace: str,
    ) -> None:
        assert self._events is not None
        event = component_event(
            self.settings.amqp.exchanges.events,
            source,
            component,
            fields,
            message_id,
            outcome,
            answer,
            trace=trace,
        )
        try:
            await self._events.accept(event)
        except BridgeError as exc:
            self.metrics.events_failed.labels(source).inc()
            log.warning("component event not published", source=source, error=str(exc))


class _PublisherSink:
    """Publishes an event and waits for the confirm (used when no sink is given)."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    async def accept(self, event: OutgoingEvent) -> str:
        await self.publisher.publish(event.exchange, event.routing_key, event.to_message())
        return "broker"
