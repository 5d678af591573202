"""Shared fixtures. Tests that need RabbitMQ use the real broker on this machine, each in a vhost
of its own (created with rabbitmqctl, deleted afterwards), so the default topology names can be
used as they are and no test ever sees another's messages."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aio_pika
import pytest

from bridge.config import Settings
from tests.helpers.env import AMQP_HOST, FIXTURES, make_settings, rabbitmqctl, rabbitmqctl_path

if TYPE_CHECKING:
    from tests.helpers.worker import Bus, FakeSimotel

# Kept importable from here for tests written before tests.helpers.env.
__all__ = ["AMQP_HOST", "BROKER_FIXTURES", "FIXTURES", "make_settings"]

_pending_deletes: list[subprocess.Popen[bytes]] = []

# Every rabbitmqctl call starts an Erlang VM (about a second of CPU), so vhosts are made and
# deleted in batches, one VM per batch: each test still gets a vhost no other test has used.
_VHOST_BATCH = 16
_fresh_vhosts: list[str] = []
_used_vhosts: list[str] = []


def _erlang_names(names: list[str]) -> str:
    return "[" + ",".join(f'<<"{n}">>' for n in names) + "]"


def _make_vhosts(count: int) -> list[str]:
    """`count` new vhosts, guest given full rights, in one rabbitmqctl call."""
    names = [f"test-{uuid.uuid4().hex[:12]}" for _ in range(count)]
    rabbitmqctl(
        "eval",
        'lists:foreach(fun(N) -> ok = rabbit_vhost:add(N, <<"tests">>), '
        'ok = rabbit_auth_backend_internal:set_permissions(<<"guest">>, N, <<".*">>, '
        '<<".*">>, <<".*">>, <<"tests">>) end, ' + _erlang_names(names) + "), ok.",
    )
    return names


def _delete_vhosts(names: list[str]) -> None:
    """Delete in the background, one rabbitmqctl call for the lot."""
    code = f'[rabbit_vhost:delete(N, <<"tests">>) || N <- {_erlang_names(names)}], ok.'
    _pending_deletes.append(
        subprocess.Popen(
            [rabbitmqctl_path(), "eval", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    )


@pytest.fixture
def vhost() -> Iterator[str]:
    """A fresh vhost for one test, guest given full rights; deleted after the test."""
    if not _fresh_vhosts:
        _fresh_vhosts.extend(_make_vhosts(_VHOST_BATCH))
    name = _fresh_vhosts.pop()
    yield name
    _used_vhosts.append(name)
    if len(_used_vhosts) >= _VHOST_BATCH:
        _delete_vhosts(_used_vhosts[:])
        _used_vhosts.clear()


# A test that uses one of these fixtures needs RabbitMQ: it is marked `broker` by that alone, so
# `-m "not broker"` runs exactly the tests that need no broker, and no file has to remember it.
BROKER_FIXTURES = frozenset({"vhost", "private_broker"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _used_vhosts or _fresh_vhosts:
        _delete_vhosts(_used_vhosts + _fresh_vhosts)
    for p in _pending_deletes:
        p.wait(timeout=60)


@pytest.fixture
def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@{AMQP_HOST}/{vhost}"


@pytest.fixture
def settings(amqp_url: str, tmp_path: Path) -> Settings:
    return make_settings(amqp_url, tmp_path)


@pytest.fixture
async def amqp(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A plain aio-pika connection to the test vhost, for the test's own consumers."""
    conn = await aio_pika.connect_robust(amqp_url)
    try:
        yield conn
    finally:
        await conn.close()


# The worker tests' collaborators, shared by test_worker*.py.
@pytest.fixture
async def fake() -> AsyncIterator[FakeSimotel]:
    """A fake Simotel over real HTTP, recording every request it receives."""
    from tests.helpers.worker import FakeSimotel  # it imports this module

    server = FakeSimotel()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def cfg(amqp_url: str, tmp_path: Path, fake: FakeSimotel) -> Settings:
    from tests.helpers.worker import worker_settings

    return worker_settings(amqp_url, tmp_path, fake.url)


@pytest.fixture
async def bus(amqp: aio_pika.abc.AbstractRobustConnection, cfg: Settings) -> Bus:
    from tests.helpers.worker import Bus

    return await Bus(amqp, cfg).start()


# PostgreSQL (the shared command state): a database of its own per test on the machine's server,
# dropped afterwards. Tests that use it carry the `postgres` marker.
PG_SERVER = os.environ.get("SIMOTEL_BRIDGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database; dropped (connections and all) after."""
    import psycopg

    name = f"sbtest_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
