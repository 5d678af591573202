"""The consumer library `bridge.client`: light to import, one vocabulary with the bridge, and
`send_command` working from a URL alone against the real RabbitMQ."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

import bridge.client
from bridge import topology, wire
from bridge.client import responder
from bridge.commands import Result, result_message
from bridge.errors import BridgeError, InvalidCommand, Unroutable

ROOT = Path(__file__).resolve().parent.parent

# What a routing service must not have to install or load to use the client library.
HEAVY = (
    "bridge.config",
    "bridge.amqp",
    "bridge.topology",
    "pydantic",
    "yaml",
    "prometheus_client",
    "starlette",
    "httpx",
    "structlog",
    "uvicorn",
)


def test_importing_the_client_loads_none_of_the_server_modules() -> None:
    code = (
        "import sys, bridge.client\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_the_old_import_paths_are_the_client_objects() -> None:
    import bridge.history
    import bridge.responder
    import bridge.smartapi

    assert bridge.responder.Responder is bridge.client.Responder
    assert bridge.responder.Answer is bridge.client.ComponentAnswer
    assert bridge.smartapi.Exit is bridge.client.smartapi.Exit
    assert bridge.smartapi.Command is bridge.client.smartapi.SmartApiCommand
    assert bridge.history.history_window is bridge.client.history_window


def test_a_long_app_name_binds_the_key_the_bridge_publishes_to() -> None:
    app_name = "route " * 60
    key = responder.binding_key("simotel", "SmartApi", app_name)
    assert key == topology.component_key("simotel", "SmartApi", app_name)
    assert wire.utf8_len(key) <= wire.SHORTSTR_MAX
    assert key.rsplit(".", 1)[1] == wire.key_word(app_name)


def test_components_are_named_once() -> None:
    from bridge import components, config, translate

    assert bridge.client.COMPONENTS is wire.COMPONENTS
    assert components.COMPONENTS is wire.COMPONENTS
    assert config.COMPONENTS is wire.COMPONENTS
    assert translate.COMPONENTS is wire.COMPONENTS


async def test_send_command_needs_only_a_url_and_the_names(
    amqp_url: str, amqp: AbstractRobustConnection
) -> None:
    """A stand-in worker on a queue bound to the commands exchange answers on `reply_to`."""
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(
        "my.commands", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue("my.commands.q", durable=True)
    await queue.bind(exchange, routing_key="#")
    seen: list[AbstractIncomingMessage] = []

    async def work(message: AbstractIncomingMessage) -> None:
        seen.append(message)
        command = orjson.loads(message.body)
        result = Result(
            command_id=message.message_id or "",
            action=command["action"],
            source=str((message.headers or {}).get("source")),
            status="ok",
            http_status=200,
            response={"success": True},
        )
        body, ctype, headers = result_message(result)
        assert message.reply_to is not None
        await channel.default_exchange.publish(
            aio_pika.Message(
                body, content_type=ctype, headers=headers, correlation_id=message.correlation_id
            ),
            message.reply_to,
        )
        await message.ack()

    await queue.consume(work)
    result = await bridge.client.send_command(
        amqp_url,
        "pbx/users/search",
        {"alike": "true"},
        source="pbx2",
        exchange="my.commands",
        timeout=20,
        message_id="m-1",
    )
    assert result.status == "ok"
    assert result.command_id == "m-1"
    assert result.response == {"success": True}
    (message,) = seen
    assert message.routing_key == "pbx2.pbx.users.search"
    assert message.app_id == wire.APP_ID
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert (message.headers or {})["source"] == "pbx2"
    assert "deadline" in (message.headers or {})


async def test_send_command_to_an_exchange_nothing_is_bound_to_is_unroutable(
    amqp_url: str, amqp: AbstractRobustConnection
) -> None:
    channel = await amqp.channel()
    await channel.declare_exchange(
        wire.COMMANDS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    with pytest.raises(Unroutable):
        await asyncio.wait_for(
            bridge.client.send_command(amqp_url, "pbx/users/search", {}, source="s", timeout=20),
            60,
        )


async def test_an_unknown_action_is_refused_before_connecting() -> None:
    # No broker listens on port 1: the action is refused before any connection is tried.
    with pytest.raises(InvalidCommand) as caught:
        await bridge.client.send_command("amqp://127.0.0.1:1/", "no/such/action", {}, source="s")
    assert caught.value.reason == "unknown_action"
    assert isinstance(caught.value, BridgeError)
