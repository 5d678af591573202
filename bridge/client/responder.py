"""Answer Simotel dialplan components from your own service, over RabbitMQ.

    import aio_pika
    from bridge.client import ComponentRequest, ExtenApiAnswer, Responder

    async def route(req: ComponentRequest) -> ExtenApiAnswer:
        return ExtenApiAnswer(extension="120" if req.src.startswith("0915") else "100")

    connection = await aio_pika.connect_robust("amqp://guest:guest@127.0.0.1/")
    async with Responder(connection) as responder:
        await responder.subscribe("ExtenApi", "Extension API", route)
        await responder.wait_closed()   # or keep your own main loop running

Each subscription consumes a non-durable, auto-delete queue shared by every instance of the
service (so instances share the load); when the last instance goes away the queue goes too, and
the bridge answers Simotel with the fallback at once instead of waiting for the deadline.

Answers are typed and checked before they are sent with the same rules the bridge applies. A
SmartApi answer is a list of typed commands (`bridge.client.smartapi`), so a caller-supplied
value can never add a command. If the handler raises, the bridge is told at once and answers
with the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

import aio_pika
import aio_pika.exceptions
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from bridge import wire
from bridge.client import smartapi
from bridge.client.answers import validate_answer
from bridge.errors import InvalidAnswer
from bridge.wire import COMPONENTS, ERROR_TYPE, Component, component_key

# The standard library's logging (no structlog here): the service configures its own handlers.
log = logging.getLogger("bridge.client.responder")


@dataclass(frozen=True)
class ComponentRequest:
    """One component request as Simotel sent it (docs/simotel/webhooks.md §5.1)."""

    source: str
    component: str
    app_name: str
    src: str
    dst: str
    data: str  # digits entered earlier in the call (IvrApi, or after a SmartApi GetData)
    unique_id: str
    originated_call_id: str | None
    fields: Mapping[str, Any]  # everything Simotel sent, as sent
    deadline: datetime | None  # when the bridge stops waiting (UTC)
    traceparent: str | None = None  # W3C trace context of the call; the reply carries it

    def time_left(self) -> float:
        """Seconds until the bridge answers Simotel without us (inf when unknown), by this
        host's clock: only as good as the clocks' agreement."""
        if self.deadline is None:
            return float("inf")
        return self.deadline.timestamp() - time.time()

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage) -> ComponentRequest:
        body = orjson.loads(message.body)
        if not isinstance(body, dict):
            raise ValueError("a component request body must be a JSON object")
        headers = message.headers or {}

        def text(key: str) -> str:
            value = body.get(key)
            return "" if value is None else str(value)

        deadline = headers.get(wire.DEADLINE)
        return cls(
            source=str(headers.get(wire.SOURCE, "")),
            component=str(headers.get(wire.COMPONENT, message.type or "")),
            app_name=text("app_name"),
            src=text("src"),
            dst=text("dst"),
            data=text("data"),
            unique_id=text("unique_id") or text("cuid"),
            originated_call_id=text("originated_call_id") or None,
            fields=body,
            deadline=datetime.fromisoformat(deadline) if isinstance(deadline, str) else None,
            traceparent=wire.traceparent(headers.get(wire.TRACEPARENT)),
        )


@dataclass(frozen=True)
class SmartApiAnswer:
    commands: Sequence[smartapi.SmartApiCommand]
    component: Component = field(default="SmartApi", init=False)

    def __post_init__(self) -> None:
        _check(self)

    def to_json(self) -> dict[str, str]:
        return {"ok": "1", "commands": smartapi.build(self.commands)}


@dataclass(frozen=True)
class ExtenApiAnswer:
    extension: str
    component: Component = field(default="ExtenApi", init=False)

    def __post_init__(self) -> None:
        _check(self)

    def to_json(self) -> dict[str, str]:
        return {"ok": "1", "extension": self.extension}


@dataclass(frozen=True)
class TrunkApiAnswer:
    trunk: str
    extension: str
    call_limit: int
    component: Component = field(default="TrunkApi", init=False)

    def __post_init__(self) -> None:
        _check(self)

    def to_json(self) -> dict[str, str]:
        return {
            "ok": "1",
            "trunk": self.trunk,
            "extension": self.extension,
            "call_limit": str(self.call_limit),
        }


@dataclass(frozen=True)
class IvrApiAnswer:
    case: str
    component: Component = field(default="IvrApi", init=False)

    def __post_init__(self) -> None:
        _check(self)

    def to_json(self) -> dict[str, str]:
        return {"ok": "1", "case": self.case}


@dataclass(frozen=True)
class Fail:
    """An explicit failure (`{"ok": "0"}`), valid for every component."""

    component: None = field(default=None, init=False)

    def to_json(self) -> dict[str, str]:
        return {"ok": "0"}


ComponentAnswer = SmartApiAnswer | ExtenApiAnswer | TrunkApiAnswer | IvrApiAnswer | Fail
Answer = ComponentAnswer  # the old name, kept for one release


def _check(answer: SmartApiAnswer | ExtenApiAnswer | TrunkApiAnswer | IvrApiAnswer) -> None:
    """Builders refuse at once what the bridge would refuse (the bridge's own rules), so a
    handler fails where the bad value is made, not later as a fallback."""
    if isinstance(answer, TrunkApiAnswer) and (
        isinstance(answer.call_limit, bool) or not isinstance(answer.call_limit, int)
    ):
        raise InvalidAnswer("TrunkApiAnswer: call_limit must be an int")
    try:
        validate_answer(answer.component, answer.to_json())
    except InvalidAnswer as exc:
        raise InvalidAnswer(f"{type(answer).__name__}: {exc}") from None


Handler = Callable[[ComponentRequest], Awaitable[ComponentAnswer]]


def encode_answer(component: str, answer: ComponentAnswer) -> bytes:
    """The reply body for `answer`, checked with the bridge's own rules. Raises ValueError."""
    if answer.component is not None and answer.component != component:
        raise ValueError(f"a {type(answer).__name__} cannot answer {component}")
    return orjson.dumps(validate_answer(component, answer.to_json()))


def binding_key(source: str, component: str, app_name: str) -> str:
    """`*` is a wildcard for source and app_name; otherwise the key is the one the bridge
    publishes to (`topology.component_key`: app_name sanitised, a long one cut and hashed)."""
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {', '.join(COMPONENTS)}")
    if app_name == "*":
        return f"{source}.{component}.*"
    return component_key(source, component, app_name)


class Responder:
    """Subscriptions of one service on one connection (the caller owns the connection)."""

    def __init__(
        self,
        connection: AbstractConnection,
        *,
        exchange: str = wire.COMPONENTS_EXCHANGE,
        queue_prefix: str = wire.COMPONENTS_EXCHANGE,
        prefetch: int = 64,
    ) -> None:
        self.connection = connection
        self.exchange = exchange
        self.queue_prefix = queue_prefix
        self.prefetch = prefetch
        self._channels: list[AbstractChannel] = []
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    async def __aenter__(self) -> Responder:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def subscribe(
        self, component: str, app_name: str, handler: Handler, *, source: str = "*"
    ) -> str:
        """Answer `component` requests of `app_name` (`*`: all) from `source` (`*`: any) with
        `handler`. Returns the queue name."""
        key = binding_key(source, component, app_name)
        name = wire.shortstr(f"{self.queue_prefix}.{key.replace('*', 'any')}")
        channel = await self.connection.channel(publisher_confirms=False)
        self._channels.append(channel)
        await channel.set_qos(prefetch_count=self.prefetch)
        # Declared as the bridge declares it (idempotent), so either may start first.
        exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(name, durable=False, auto_delete=True)
        await queue.bind(exchange, routing_key=key)

        async def on_request(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._in_flight.add(task)
            try:
                async with message.process(ignore_processed=True):
                    await self._answer(channel, component, handler, message)
            finally:
                self._in_flight.discard(task)

        self._consumers.append((queue, await queue.consume(on_request)))
        return name

    async def _answer(
        self,
        channel: AbstractChannel,
        component: str,
        handler: Handler,
        message: AbstractIncomingMessage,
    ) -> None:
        if not message.reply_to or not message.correlation_id:
            log.warning("component request without reply_to/correlation_id dropped")
            return
        reply_type = "answer"
        try:
            # No deadline check here: it would compare two hosts' clocks. A late answer is
            # dropped (and counted) by the bridge; the broker discards expired requests.
            request = ComponentRequest.from_message(message)
            body = encode_answer(component, await handler(request))
        except Exception as exc:  # the top of this unit of work: tell the bridge at once
            log.exception("component handler failed (%s)", component)
            text, _ = wire.fit(f"{type(exc).__name__}: {exc}", 1000)
            reply_type, body = ERROR_TYPE, text.encode()
        trace = wire.traceparent((message.headers or {}).get(wire.TRACEPARENT))
        reply = aio_pika.Message(
            body,
            content_type="application/json",
            correlation_id=message.correlation_id,
            type=reply_type,
            headers={} if trace is None else {wire.TRACEPARENT: trace},
        )
        await channel.default_exchange.publish(reply, message.reply_to, mandatory=False)

    async def close(self, grace: float = 2.0) -> None:
        """Stop taking requests, let those in hand finish (bounded by `grace`), close."""
        for queue, tag in self._consumers:
            with contextlib.suppress(*aio_pika.exceptions.CONNECTION_EXCEPTIONS):
                await queue.cancel(tag)
        self._consumers.clear()
        if self._in_flight:
            _, late = await asyncio.wait(self._in_flight, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                log.warning("%d component requests cancelled at shutdown", len(late))
        for channel in self._channels:
            if not channel.is_closed:
                await channel.close()
        self._channels.clear()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()
