"""The RabbitMQ topology as data, next to the routing-key scheme, and one function that declares
it. Declaring is idempotent: every role declares everything at every start, so the roles can
start in any order and a fresh vhost needs no manual set-up.

Routing keys (CONTRACT §3):
    events              {source}.{EventName}                 simotel.Cdr
    component requests  {source}.{Component}.{app_name}      simotel.SmartApi.vip_route
    commands / results  {source}.{action, / replaced by .}   simotel.call.originate.act
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel

from bridge import wire
from bridge.config import AmqpSettings

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def sanitise(word: str) -> str:
    """Restrict a name taken from a request to `[A-Za-z0-9_]` (anything else becomes `_`), so it
    can never add a level or a wildcard to a routing key. Empty becomes `_`."""
    return _UNSAFE.sub("_", word) or "_"


def event_key(source: str, event: str) -> str:
    return f"{source}.{event}"


def component_key(source: str, component: str, app_name: str | None) -> str:
    """`app_name` becomes one routing-key word (`wire.key_word`: sanitised, at most 128
    characters, a longer one cut and ended with a hash of the whole). The bridge publishes and
    the responders bind with this same function, so they always agree."""
    return f"{source}.{component}.{wire.key_word(app_name or '')}"


def command_key(source: str, action: str) -> str:
    return f"{source}.{action.replace('/', '.')}"


@dataclass(frozen=True)
class Exchange:
    name: str
    type: aio_pika.ExchangeType
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Binding:
    queue: str
    exchange: str
    routing_key: str


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]
    bindings: tuple[Binding, ...]


def build(amqp: AmqpSettings) -> Topology:
    ex, q = amqp.exchanges, amqp.queues
    topic = aio_pika.ExchangeType.TOPIC
    return Topology(
        exchanges=(
            # The alternate exchange first: events must never be declared without it.
            Exchange(ex.unrouted, aio_pika.ExchangeType.FANOUT),
            Exchange(ex.events, topic, {"alternate-exchange": ex.unrouted}),
            Exchange(ex.components, topic),
            Exchange(ex.commands, topic),
            Exchange(ex.results, topic),
            Exchange(ex.dead, topic),
        ),
        queues=(
            Queue(
                q.commands,
                {
                    "x-queue-type": "quorum",
                    # Poison messages cannot loop: past the limit the broker dead-letters them.
                    "x-delivery-limit": amqp.commands_delivery_limit,
                    "x-dead-letter-exchange": ex.dead,
                    "x-dead-letter-routing-key": "delivery-limit",
                },
            ),
            Queue(q.dead, {"x-max-length": amqp.dead_max_length}),
            Queue(q.unrouted, {"x-max-length": amqp.unrouted_max_length}),
        ),
        bindings=(
            Binding(q.commands, ex.commands, "#"),
            Binding(q.dead, ex.dead, "#"),
            Binding(q.unrouted, ex.unrouted, ""),
        ),
    )


def queue(amqp: AmqpSettings, name: str) -> Queue:
    """The declaration of one of the topology's queues (for consumers that declare it on a
    robust channel, so it is restored with them after a reconnect)."""
    for q in build(amqp).queues:
        if q.name == name:
            return q
    raise KeyError(name)


async def declare(channel: AbstractChannel, amqp: AmqpSettings) -> Topology:
    """Declare every exchange, queue and binding; safe to run at every start."""
    topo = build(amqp)
    for e in topo.exchanges:
        await channel.declare_exchange(e.name, e.type, durable=True, arguments=e.arguments)
    for qu in topo.queues:
        await channel.declare_queue(qu.name, durable=True, arguments=qu.arguments)
    for b in topo.bindings:
        queue = await channel.get_queue(b.queue, ensure=False)
        await queue.bind(b.exchange, routing_key=b.routing_key)
    return topo
