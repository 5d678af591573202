"""The topology: declared in full by every role at every start, idempotently."""

from __future__ import annotations

from aio_pika.abc import AbstractRobustConnection

from bridge import topology
from bridge.amqp import Broker, Publisher
from bridge.config import Settings
from bridge.translate import Payload, build_event
from tests.helpers.taps import drain


def test_routing_keys() -> None:
    assert topology.event_key("tehran", "Cdr") == "tehran.Cdr"
    assert topology.component_key("s", "SmartApi", "vip route.1") == "s.SmartApi.vip_route_1"
    assert topology.component_key("s", "ExtenApi", None) == "s.ExtenApi._"
    assert topology.command_key("s", "call/originate/act") == "s.call.originate.act"


async def test_declare_twice_then_route_through_the_alternate_exchange(
    settings: Settings, amqp: AbstractRobustConnection
) -> None:
    for _ in range(2):  # a second start declares everything again without complaint
        broker = Broker(settings.amqp)
        await broker.connect()
        await broker.close()
    broker = Broker(settings.amqp)
    await broker.connect()
    publisher = Publisher(broker)
    await publisher.start()
    try:
        event = build_event(
            "simotel.events", "simotel", "Ping", Payload({"event_name": "Ping"}, "json")
        )
        await publisher.publish(event.exchange, event.routing_key, event.to_message())
    finally:
        await publisher.close()
        await broker.close()
    kept = await drain(amqp, "simotel.unrouted")
    assert [m.message_id for m in kept] == [event.message_id]
    channel = await amqp.channel()
    for queue in ("simotel.commands", "simotel.dead", "simotel.unrouted"):
        await channel.declare_queue(queue, passive=True)  # raises if it does not exist
    await channel.close()
