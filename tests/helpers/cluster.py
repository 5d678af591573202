"""A private 3-node RabbitMQ cluster on this machine, for tests that kill a node under load.

Built on `tests/helpers/broker_node.py`'s `PrivateBroker`: each node has its own node name, AMQP and
distribution ports, data and log directories, under one temporary directory; the system broker
(127.0.0.1:5672) is never touched. The three nodes share an Erlang cookie of their own (a
private HOME holding `.erlang.cookie`, which rabbitmqctl reads too) and form the cluster with
config-based peer discovery (`classic_config`, the three node names): the first node boots,
the other two start in parallel and join it. `cluster_partition_handling = pause_minority`, as
docs/scaling.md recommends for three nodes.

    def test_x(rmq_cluster: Cluster) -> None:
        rmq_cluster.urls                  # one amqp:// URL per node
        rmq_cluster.nodes[1].stop(kill=True)
        rmq_cluster.nodes[1].start()      # rejoins on its data; wait_members(3) to be sure

`rmq_cluster` is module-scoped (one cluster per test module) and killed whatever happens.
Its start took 19-35 s on this (loaded, 2-core) machine; `start_seconds` keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers.broker_node import PrivateBroker

SIZE = 3


class Progress:
    """Waiting on what a test's own tasks and consumers collect: each of them calls `bump()`
    after a change, and `until()` re-checks its condition at every bump, bounded."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self._changed.set()

    async def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


class ClusterNode(PrivateBroker):
    def __init__(self, base: Path, cookie_home: Path) -> None:
        super().__init__(base)
        self.env["HOME"] = str(cookie_home)

    def configure(self, peers: list[str]) -> None:
        lines = [
            f"listeners.tcp.default = 127.0.0.1:{self.port}",
            "loopback_users = none",
            "log.console = false",
            "log.file.level = warning",
            "cluster_partition_handling = pause_minority",
            "cluster_formation.peer_discovery_backend = classic_config",
            # Without a lock, a node waits a random 5-60 s before discovery by default.
            "cluster_formation.randomized_startup_delay_range.min = 0",
            "cluster_formation.randomized_startup_delay_range.max = 1",
        ]
        lines += [
            f"cluster_formation.classic_config.nodes.{i} = {n}" for i, n in enumerate(peers, 1)
        ]
        (self.base / "rabbitmq.conf").write_text("\n".join(lines) + "\n")


class Cluster:
    def __init__(self, base: Path) -> None:
        self.base = base
        home = base / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)
        self.nodes = []
        for i in range(SIZE):
            (base / f"n{i}").mkdir()
            self.nodes.append(ClusterNode(base / f"n{i}", home))
        names = [n.node for n in self.nodes]
        for n in self.nodes:
            n.configure(names)
        self.start_seconds = 0.0

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> float:
        started = time.monotonic()
        self.nodes[0].start()
        with ThreadPoolExecutor(SIZE - 1) as pool:
            list(pool.map(lambda n: n.start(), self.nodes[1:]))
        self.wait_members(SIZE)
        self.start_seconds = time.monotonic() - started
        return self.start_seconds

    def running_nodes(self, via: ClusterNode | None = None) -> list[str]:
        """The node names the cluster reports running, asked of `via` (a running node)."""
        node = via or next(n for n in self.nodes if n.running)
        out = node.ctl("eval", "rabbit_nodes:all_running().", timeout=30).stdout
        return [name for name in (n.node for n in self.nodes) if name in out]

    def wait_members(self, count: int, timeout: float = 90.0) -> None:
        """Wait until `count` nodes are running in one cluster (bounded poll of the cluster's
        own view: there is no event to wait on from outside)."""
        deadline = time.monotonic() + timeout
        while len(self.running_nodes()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster has not {count} running nodes; see {self.base}")
            time.sleep(0.5)

    def node_on_port(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def kill(self) -> None:
        for n in self.nodes:
            n.kill()


@contextlib.contextmanager
def rabbitmq_cluster() -> Iterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="bridge-rmq-cluster-"))
    cluster = Cluster(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.kill()
        if os.environ.get("SIMOTEL_BRIDGE_KEEP_CLUSTER") is None:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def rmq_cluster() -> Iterator[Cluster]:
    """A running private 3-node RabbitMQ cluster for one test module, killed afterwards."""
    with rabbitmq_cluster() as cluster:
        yield cluster
