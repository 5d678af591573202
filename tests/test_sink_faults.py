"""Nothing accepted is lost (issue 5), shown against a private RabbitMQ node that the tests stop,
kill, freeze and start (never the shared system broker): webhooks keep flowing at a steady rate,
every event answered is on the queue afterwards, each call's events in the order they were sent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from bridge.config import Settings
from tests.helpers import broker_node
from tests.helpers.broker_node import PrivateBroker
from tests.helpers.env import make_settings
from tests.helpers.sink import (
    Traffic,
    check_delivery,
    declare_audit,
    open_stack,
    percentile,
    read_queue,
    sink_sender,
)

pytestmark = [pytest.mark.disruptive, pytest.mark.broker, pytest.mark.timeout(150)]

private_broker = broker_node.private_broker

ROOT = Path(__file__).resolve().parent.parent
PUBLISH_TIMEOUT = 1.0
# An accept may wait for one publish timeout and then one spool write, never more.
ACCEPT_BOUND = PUBLISH_TIMEOUT + 1.0


def fault_settings(url: str, tmp_path: Path) -> Settings:
    amqp: dict[str, Any] = {"url": url, "publish_timeout": PUBLISH_TIMEOUT, "heartbeat": 2}
    return make_settings(url, tmp_path, amqp=amqp)


@pytest.mark.parametrize("how", ["graceful", "sigkill"])
async def test_steady_webhooks_through_a_broker_restart(
    private_broker: PrivateBroker, tmp_path: Path, how: str
) -> None:
    url = private_broker.url
    await declare_audit(url)
    stack = await open_stack(fault_settings(url, tmp_path))
    try:
        async with Traffic(sink_sender(stack.sink), calls=20, rate_per_call=10) as traffic:  # 200/s
            await traffic.wait_for("broker", 200, timeout=10)
            await asyncio.to_thread(private_broker.stop, kill=how == "sigkill")
            await traffic.wait_for("spool", 200, timeout=10)
            await asyncio.to_thread(private_broker.start)
            # Back to the broker: the spool drained while the traffic went on.
            await traffic.wait_for("broker", 200, timeout=30)
        assert await stack.sink.wait_drained(30)
    finally:
        await stack.close()
    got = await read_queue(url)
    delivery = check_delivery(traffic.sent, got)
    answered = sum(len(ids) for ids in traffic.sent.values())
    print(
        f"\n{how}: answered={answered} outcomes={dict(traffic.outcomes)} on_queue={len(got)} "
        f"duplicates={delivery.duplicates} p99={percentile(traffic.latencies, 99) * 1000:.1f}ms "
        f"max={max(traffic.latencies) * 1000:.1f}ms replayed="
        f"{stack.metric('simotel_bridge_spool_replayed_total'):.0f} "
        f"node_start_s={private_broker.start_seconds}"
    )
    assert traffic.outcomes["refused"] == 0
    assert delivery.ok, delivery
    assert max(traffic.latencies) < ACCEPT_BOUND
    assert stack.metric("simotel_bridge_spool_replayed_total") >= 200


async def test_a_hung_broker_never_hangs_the_ingress(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """SIGSTOP the broker: the connection stays open but nothing answers. Accepts still return
    within the publish timeout (to the spool); the heartbeat notices the dead connection; once
    the broker runs again everything is delivered."""
    url = private_broker.url
    await declare_audit(url)
    stack = await open_stack(fault_settings(url, tmp_path))
    try:
        async with Traffic(sink_sender(stack.sink), calls=10, rate_per_call=10) as traffic:
            await traffic.wait_for("broker", 100, timeout=10)
            private_broker.freeze()
            try:
                await traffic.wait_for("spool", 100, timeout=15)
                loop = asyncio.get_running_loop()
                frozen_at = loop.time()
                while stack.broker.ready:  # the heartbeat must notice (2 s heartbeat)
                    assert loop.time() - frozen_at < 20, "dead connection not detected"
                    await traffic.wait_for("spool", 1, timeout=5)
            finally:
                private_broker.thaw()
            await traffic.wait_for("broker", 100, timeout=40)
        assert await stack.sink.wait_drained(30)
    finally:
        await stack.close()
    got = await read_queue(url)
    delivery = check_delivery(traffic.sent, got)
    print(
        f"\nfrozen: outcomes={dict(traffic.outcomes)} duplicates={delivery.duplicates} "
        f"max={max(traffic.latencies) * 1000:.0f}ms"
    )
    assert delivery.ok, delivery
    assert traffic.outcomes["refused"] == 0
    assert max(traffic.latencies) < ACCEPT_BOUND


async def test_a_bridge_killed_with_events_spooled_delivers_them_after_restart(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """A bridge process spools while the broker is down and is killed with SIGKILL in the
    middle of it. After a restart (broker back, new process on the same spool), every event it
    had answered is delivered, in order per call."""
    url = private_broker.url
    await declare_audit(url)
    workdir = tmp_path / "bridge"
    workdir.mkdir()
    with (tmp_path / "child.log").open("wb") as child_log:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            f"import asyncio, sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from tests.helpers.sink import child_main; "
            f"asyncio.run(child_main({url!r}, {str(workdir)!r}))",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=child_log,
            cwd=ROOT,
        )
    answered: dict[str, list[str]] = {}
    try:
        assert child.stdout is not None and child.stdin is not None
        async with asyncio.timeout(30):
            assert await child.stdout.readline() == b"ready\n"
        await asyncio.to_thread(private_broker.stop, kill=True)
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        count = 0
        async with asyncio.timeout(30):
            while count < 500:
                message_id, outcome = (await child.stdout.readline()).decode().split()
                assert outcome == "spool"
                answered.setdefault(message_id.split("/")[0], []).append(message_id)
                count += 1
        os.kill(child.pid, signal.SIGKILL)  # while it is still spooling
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    await asyncio.to_thread(private_broker.start)
    stack = await open_stack(fault_settings(url, workdir))
    try:
        left = stack.sink.status()["spool_depth"]
        assert left >= count
        assert await stack.sink.wait_drained(30)
    finally:
        await stack.close()
    got = await read_queue(url)
    delivery = check_delivery(answered, got)
    print(f"\nkilled: answered={count} spooled_at_restart={left} on_queue={len(got)}")
    assert delivery.ok, delivery
