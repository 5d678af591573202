"""The RabbitMQ topology as data, next to the routing-key scheme, and one function that declares
it. Declaring is idempotent: every role declares everything at every start, so the roles can
start in any order and a fresh vhost needs no manual set-up.

Routing keys (docs/contract.md §3; the functions live in `bridge.wire`, re-exported here):
    events              {source}.{EventName}                 simotel.Cdr
    component requests  {source}.{Component}.{app_name}      simotel.SmartApi.vip_route
    commands / results  {source}.{action, / replaced by .}   simotel.call.originate.act
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aio_pika.exceptions
from aio_pika.abc import AbstractChannel

from bridge.config import AmqpSettings, HistorySettings, SourceSettings
from bridge.errors import ConfigError
from bridge.wire import HISTORY_STREAM
from bridge.wire import command_key as command_key  # re-exported: the keys live in bridge.wire
from bridge.wire import component_key as component_key
from bridge.wire import event_key as event_key
from bridge.wire import sanitise as sanitise


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


def quorum_arguments(amqp: AmqpSettings) -> dict[str, Any]:
    """Replication of every quorum queue. Only when `amqp.quorum_replicas` is set: RabbitMQ
    (3.10 checked) refuses a redeclaration whose `x-quorum-initial-group-size` differs from the
    queue's, absent included, so a default would break queues created without it."""
    if amqp.quorum_replicas is None:
        return {}
    return {"x-quorum-initial-group-size": amqp.quorum_replicas}


def build(
    amqp: AmqpSettings,
    history: HistorySettings | None = None,
    *,
    sources: Mapping[str, SourceSettings] | None = None,
) -> Topology:
    """The whole topology. The history stream is in it when `history` is given and enabled:
    a caller that does not know the history settings leaves the stream alone (it cannot know
    its retention arguments, and declaring others would fail on an existing stream). With
    `sources`, also what their enabled features need (reconciliation)."""
    ex, q = amqp.exchanges, amqp.queues
    topic = aio_pika.ExchangeType.TOPIC
    extra = reconcile_topology(amqp, sources or {})
    core = Topology(
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
                    **quorum_arguments(amqp),
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
    core = Topology(core.exchanges, core.queues + extra.queues, core.bindings + extra.bindings)
    if history is None or not history.enabled:
        return core
    return Topology(
        core.exchanges,
        (*core.queues, history_stream(history)),
        (*core.bindings, Binding(HISTORY_STREAM, ex.events, history.pattern)),
    )


_RETENTION_CHANGED = (
    "the stream simotel.history exists with other arguments than history.max_age / max_bytes "
    "say; a stream's arguments cannot change: put the old values back and change retention "
    "with a policy (docs/history.md, 'Changing retention'), or delete the stream"
)

# Retention removes whole segments: smaller ones follow max_age and max_bytes more closely.
_SEGMENT_BYTES = 100 * 1024 * 1024


def history_stream(history: HistorySettings) -> Queue:
    """The stream's declaration. Its arguments cannot change once it exists: a redeclaration
    with others fails (PRECONDITION_FAILED); retention is changed with a policy instead."""
    return Queue(
        HISTORY_STREAM,
        {
            "x-queue-type": "stream",
            "x-max-age": history.max_age,
            "x-max-length-bytes": history.max_bytes,
            "x-stream-max-segment-size-bytes": min(_SEGMENT_BYTES, max(history.max_bytes // 4, 1)),
        },
    )


# Reconciliation (docs/reconcile.md): per source with `reconcile.enabled`, a durable queue of the
# Cdr and CdrQueue events on the exchange, which tells the reconciler what was delivered.
RECONCILE_EVENTS = ("Cdr", "CdrQueue")


def reconcile_queue_name(source: str) -> str:
    return f"simotel.reconcile.{source}"


def reconcile_topology(amqp: AmqpSettings, sources: Mapping[str, SourceSettings]) -> Topology:
    queues: list[Queue] = []
    bindings: list[Binding] = []
    for name, src in sorted(sources.items()):
        if not src.reconcile.enabled:
            continue
        qname = reconcile_queue_name(name)
        queues.append(Queue(qname, {"x-max-length": src.reconcile.queue_max_length}))
        bindings.extend(
            Binding(qname, amqp.exchanges.events, event_key(name, event))
            for event in RECONCILE_EVENTS
        )
    return Topology((), tuple(queues), tuple(bindings))


def queue(amqp: AmqpSettings, name: str) -> Queue:
    """The declaration of one of the topology's queues (for consumers that declare it on a
    robust channel, so it is restored with them after a reconnect)."""
    for q in build(amqp).queues:
        if q.name == name:
            return q
    raise KeyError(name)


async def declare(
    channel: AbstractChannel,
    amqp: AmqpSettings,
    history: HistorySettings | None = None,
    *,
    sources: Mapping[str, SourceSettings] | None = None,
) -> Topology:
    """Declare every exchange, queue and binding; safe to run at every start."""
    topo = build(amqp, history, sources=sources)
    for e in topo.exchanges:
        await channel.declare_exchange(e.name, e.type, durable=True, arguments=e.arguments)
    for qu in topo.queues:
        try:
            await channel.declare_queue(qu.name, durable=True, arguments=qu.arguments)
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            if qu.name != HISTORY_STREAM:
                raise
            raise ConfigError([("history", _RETENTION_CHANGED)]) from exc
    for b in topo.bindings:
        queue = await channel.get_queue(b.queue, ensure=False)
        await queue.bind(b.exchange, routing_key=b.routing_key)
    return topo


def definitions(topo: Topology, vhost: str = "/") -> dict[str, Any]:
    """The topology as RabbitMQ definitions JSON (the format of `rabbitmqctl
    import_definitions` and the management API), every object in `vhost`. Pure: built only from
    `topo`, the same data `declare` declares from, so whatever `build` adds is exported too.
    No users, permissions or secrets: the operator grants those."""
    return {
        "vhosts": [{"name": vhost}],
        "exchanges": [
            {
                "name": e.name,
                "vhost": vhost,
                "type": e.type.value,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": dict(e.arguments),
            }
            for e in topo.exchanges
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": dict(q.arguments),
            }
            for q in topo.queues
        ],
        "bindings": [
            {
                "source": b.exchange,
                "vhost": vhost,
                "destination": b.queue,
                "destination_type": "queue",
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for b in topo.bindings
        ],
    }
