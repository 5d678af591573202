"""Several broker URLs (`amqp.urls`): the first that answers is used, and the connection moves to
another when its node goes away, declaring the topology there and carrying on. Quorum
replication (`amqp.quorum_replicas`) is declared only when set."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from bridge import topology
from bridge.amqp import Broker, Publisher, endpoint, json_message
from bridge.config import Settings, load_settings
from bridge.errors import ConfigError, PublishError
from tests.helpers import broker_node
from tests.helpers.broker_node import PrivateBroker, free_port
from tests.helpers.env import AMQP_HOST, make_settings
from tests.helpers.taps import drain

private_broker = broker_node.private_broker


def _amqp(**amqp: object) -> Settings:
    return load_settings(
        data={"amqp": amqp, "sources": {"s": {"webhook": {"allow_unauthenticated": True}}}},
        environ={},
    )


def test_urls_are_validated_without_echoing_them() -> None:
    s = _amqp(urls=["amqp://u:p@a:5672/v", "amqps://u:p@b/v"])
    assert s.amqp.endpoints() == ("amqp://u:p@a:5672/v", "amqps://u:p@b/v")
    assert "p@" not in repr(s.amqp)
    assert _amqp().amqp.endpoints() == ("amqp://guest:guest@127.0.0.1:5672/",)
    with pytest.raises(ConfigError) as bad:
        _amqp(urls=["amqp://u:p@a/", "http://u:hunter2@b/"])
    assert "entry 1" in str(bad.value) and "hunter2" not in str(bad.value)
    with pytest.raises(ConfigError, match="either url or urls"):
        _amqp(url="amqp://a/", urls=["amqp://b/"])
    with pytest.raises(ConfigError):
        _amqp(urls=[f"amqp://h{i}/" for i in range(17)])
    # From the environment, as a YAML flow list.
    env = {"SIMOTEL_BRIDGE__AMQP__URLS": "[amqp://a:1/, amqp://b:2/]"}
    s = load_settings(
        data={"sources": {"s": {"webhook": {"allow_unauthenticated": True}}}}, environ=env
    )
    assert s.amqp.endpoints() == ("amqp://a:1/", "amqp://b:2/")
    assert endpoint("amqp://user:secret@node-2:5673/vh") == "node-2:5673"


def test_quorum_replicas_only_when_set() -> None:
    args = topology.queue(_amqp().amqp, "simotel.commands").arguments
    assert "x-quorum-initial-group-size" not in args
    args = topology.queue(_amqp(quorum_replicas=3).amqp, "simotel.commands").arguments
    assert args["x-quorum-initial-group-size"] == 3


async def test_a_dead_url_first_is_skipped(
    vhost: str, tmp_path: Path, amqp: AbstractRobustConnection, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"amqp://guest:dead-secret@127.0.0.1:{free_port()}/{vhost}"
    live = f"amqp://guest:guest@{AMQP_HOST}/{vhost}"
    settings = make_settings(
        live, tmp_path, amqp={"urls": [dead, live], "connect_timeout": 3, "publish_timeout": 5}
    )
    broker = Broker(settings.amqp)
    await broker.connect()
    try:
        assert broker.node == AMQP_HOST
        publisher = Publisher(broker)
        await publisher.publish("simotel.commands", "s.x", json_message(b"{}", message_id="m1"))
    finally:
        await broker.close()
    assert [m.message_id for m in await drain(amqp, "simotel.commands")] == ["m1"]
    assert "dead-secret" not in capsys.readouterr().out


async def test_no_url_answers(tmp_path: Path) -> None:
    urls = [f"amqp://guest:s3cret@127.0.0.1:{free_port()}/" for _ in range(2)]
    settings = make_settings(urls[0], tmp_path, amqp={"urls": urls, "connect_timeout": 2})
    with pytest.raises(PublishError) as failed:
        await Broker(settings.amqp).connect()
    assert str(failed.value).count("cannot connect") == 2
    assert "s3cret" not in str(failed.value)


@pytest.mark.broker
@pytest.mark.disruptive
async def test_moves_to_the_next_node_when_its_node_is_killed(
    private_broker: PrivateBroker, vhost: str, tmp_path: Path, amqp: AbstractRobustConnection
) -> None:
    """Two independent brokers stand in for two nodes: the first one is killed, and the same
    connection object (so every channel and consumer of the process) carries on on the second.
    (The real cluster is in test_cluster.py.)"""
    first = private_broker.url
    second = f"amqp://guest:guest@{AMQP_HOST}/{vhost}"
    settings = make_settings(
        first,
        tmp_path,
        amqp={"urls": [first, second], "heartbeat": 2, "connect_timeout": 3, "publish_timeout": 3},
    )
    # Nodes of a cluster share their definitions: the second "node" has the topology already
    # (a consumer's binding restored there needs its exchange).
    declared = Broker(make_settings(second, tmp_path).amqp)
    await declared.connect()
    await declared.close()
    broker = Broker(settings.amqp)
    await broker.connect()
    publisher = Publisher(broker)
    await publisher.start()
    # A consumer on a robust channel: aio-pika restores it on the new node.
    got: asyncio.Queue[str] = asyncio.Queue()
    channel = await broker.channel(confirms=False)
    queue = await channel.declare_queue(f"q-{uuid.uuid4().hex[:6]}", auto_delete=True)
    await queue.bind("simotel.results", "#")

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await got.put(str(message.message_id))

    await queue.consume(on_message, no_ack=True)
    try:
        assert broker.node == f"127.0.0.1:{private_broker.port}"
        await publisher.publish("simotel.results", "s.r", json_message(b"{}", message_id="r1"))
        assert await asyncio.wait_for(got.get(), 10) == "r1"
        moved = asyncio.Event()
        broker.connection.reconnect_callbacks.add(lambda _: moved.set())
        await asyncio.to_thread(private_broker.stop, kill=True)
        await asyncio.wait_for(moved.wait(), 60)  # channels are restored before this is called
        await publisher.publish("simotel.results", "s.r", json_message(b"{}", message_id="r2"))
        assert broker.node == AMQP_HOST
        assert await asyncio.wait_for(got.get(), 20) == "r2"
    finally:
        await publisher.close()
        await broker.close()


@pytest.mark.broker
async def test_quorum_replicas_declared_on_the_broker(vhost: str, tmp_path: Path) -> None:
    url = f"amqp://guest:guest@{AMQP_HOST}/{vhost}"
    settings = make_settings(url, tmp_path, amqp={"url": url, "quorum_replicas": 1})
    broker = Broker(settings.amqp)
    await broker.connect()
    await broker.close()
    listed = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "arguments"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    line = next(x for x in listed.stdout.splitlines() if x.startswith("simotel.commands"))
    assert "x-quorum-initial-group-size" in line


@pytest.mark.broker
async def test_another_replication_than_the_queue_has_is_a_clear_config_error(
    vhost: str, tmp_path: Path
) -> None:
    url = f"amqp://guest:guest@{AMQP_HOST}/{vhost}"
    first = Broker(make_settings(url, tmp_path, amqp={"url": url, "quorum_replicas": 1}).amqp)
    await first.connect()
    await first.close()
    with pytest.raises(ConfigError) as refused:
        await Broker(make_settings(url, tmp_path).amqp).connect()
    assert "x-quorum-initial-group-size" in str(refused.value)
    assert refused.value.problems[0][0] == "amqp"
