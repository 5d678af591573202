"""The HTTP listener under attack, over real sockets (docs/security.md): header floods, slow
clients, stalled and abandoned bodies, too many connections, addresses that are not allowed
(checked before the headers are read) and IPv4-mapped peers. Every request the listener cuts
off publishes nothing: the next normal webhook is the only message that arrives."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import yaml
from aio_pika.abc import AbstractRobustConnection
from starlette.requests import Request

from bridge.amqp import Broker, Publisher
from bridge.config import Settings
from bridge.httpserver import serve
from bridge.ingress import client_address, create_app, early_check, listener_guard
from bridge.metrics import Metrics
from bridge.sink import EventSink, SpoolMetrics
from tests.helpers.broker_node import free_port
from tests.helpers.env import make_settings
from tests.helpers.taps import tap

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parent.parent
AUTH = "Basic " + base64.b64encode(b"simotel:secret").decode()
# The bound within which anything the listener should do must have happened (a loaded machine).
BOUND = 8.0


@dataclass
class Served:
    host: str
    port: int
    metrics: Metrics

    def rejected(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "simotel_bridge_webhooks_rejected_total", {"reason": reason}
        )
        return value or 0.0


@contextlib.asynccontextmanager
async def served(settings: Settings, host: str = "127.0.0.1") -> AsyncIterator[Served]:
    """The ingress as `simotel-bridge ingress` serves it: real sink, real listener."""
    broker = Broker(settings.amqp)
    await broker.connect()
    publisher = Publisher(broker)
    await publisher.start()
    metrics = Metrics()
    sink = await EventSink.open(
        settings, publisher, SpoolMetrics(metrics.registry), confirm_latency=metrics.confirm_latency
    )
    app = create_app(settings, sink=sink, metrics=metrics, broker_ready=lambda: broker.ready)
    try:
        async with serve(app, host, 0, guard=listener_guard(settings, metrics)) as url:
            parts = urlsplit(url)
            assert parts.port is not None
            yield Served(host, parts.port, metrics)
    finally:
        await sink.close()
        await publisher.close()
        await broker.close()


def _settings(amqp_url: str, tmp_path: Path, **http: Any) -> Settings:
    limits = {"header_timeout_s": 1.0, "body_timeout_s": 1.0, **http}
    return make_settings(amqp_url, tmp_path, http={"host": "127.0.0.1", "port": 0, **limits})


async def _until(predicate: Callable[[], bool], bound: float = BOUND) -> None:
    """Wait, bounded, until `predicate` holds. The server's rejection counter is the only thing
    a refused request leaves behind (it publishes nothing), so it is polled."""
    async with asyncio.timeout(bound):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def _read_all(reader: asyncio.StreamReader, bound: float = BOUND) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed);
    fails if it is still open after `bound`."""
    data = b""
    async with asyncio.timeout(bound):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


def _status(answer: bytes) -> int | None:
    return int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else None


async def _webhook_arrives_alone(served: Served, amqp: AbstractRobustConnection, t: Any) -> None:
    """A normal webhook after an attack is served, and it is the only event published."""
    async with httpx.AsyncClient(base_url=f"http://{served.host}:{served.port}") as client:
        resp = await client.post(
            "/webhooks/simotel/events",
            content=orjson.dumps({"event_name": "Ping", "marker": "after"}),
            headers={"authorization": AUTH, "content-type": "application/json"},
        )
    assert resp.status_code == 200, resp.text
    messages = await t.wait_for(1)
    assert [orjson.loads(m.body)["marker"] for m in messages] == ["after"]


def _head(path: str = "/webhooks/simotel/events", *extra: bytes) -> bytes:
    return b"".join(
        [f"POST {path} HTTP/1.1\r\nHost: bridge\r\n".encode(), *extra, b"Authorization: ",
         AUTH.encode(), b"\r\nContent-Type: application/json\r\n"]
    )  # fmt: skip


# --- header size -------------------------------------------------------------------------------

BIG_LINE = b"X-Big: " + b"a" * 9000 + b"\r\n"
MANY_LINES = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(1000))


@pytest.mark.parametrize("extra", [BIG_LINE, MANY_LINES], ids=["one-long-line", "many-lines"])
async def test_headers_over_the_limits_get_431_and_publish_nothing(
    amqp_url: str, tmp_path: Path, amqp: AbstractRobustConnection, extra: bytes
) -> None:
    settings = _settings(amqp_url, tmp_path)
    async with served(settings) as srv, tap(amqp, "simotel.events", "#") as t:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        body = orjson.dumps({"event_name": "Ping", "marker": "attack"})
        with contextlib.suppress(ConnectionError):
            writer.write(_head("/webhooks/simotel/events", extra))
            writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        answer = await _read_all(reader)
        writer.close()
        assert _status(answer) in (431, None), answer[:200]
        await _until(lambda: srv.rejected("header_too_large") == 1)
        await _webhook_arrives_alone(srv, amqp, t)


async def test_an_endless_header_is_cut_at_the_budget(amqp_url: str, tmp_path: Path) -> None:
    """20 MB of one header line that never ends: the connection is closed after the budget
    (32 KiB by default), not after the 20 MB."""
    settings = _settings(amqp_url, tmp_path, header_timeout_s=60.0)
    async with served(settings) as srv:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        sent = 0

        async def flood() -> None:
            nonlocal sent
            writer.write(_head() + b"X-Flood: ")
            chunk = b"a" * 65536
            with contextlib.suppress(ConnectionError):
                while sent < 20 * 1024 * 1024:
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)

        flooding = asyncio.create_task(flood())
        answer = await _read_all(reader)
        await asyncio.wait_for(flooding, BOUND)
        writer.close()
        assert _status(answer) in (431, None)
        assert sent < 20 * 1024 * 1024, "the server read the whole flood"
        assert srv.rejected("header_too_large") == 1


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_memory_stays_bounded_under_a_header_flood(amqp_url: str, tmp_path: Path) -> None:
    """The real `simotel-bridge ingress` process: 10 connections each sending a 20 MB header
    that never ends. Its peak resident memory grows by a few MB at most (it grew by over
    200 MB without the header budget)."""
    port = free_port()
    config = tmp_path / "ingress.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "amqp": {"url": amqp_url},
                "http": {"host": "127.0.0.1", "port": port},
                "log": {"format": "json", "level": "warning"},
                "sources": {"simotel": {"webhook": {"username": "simotel", "password": "secret"}}},
                "spool": {"path": str(tmp_path / "spool.sqlite3")},
            }
        )
    )
    log = tmp_path / "ingress.log"
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.cli", "ingress", "-c", str(config),
            stdout=out, stderr=out, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async with asyncio.timeout(30):
                while True:  # a process that is starting: nothing to await but its port
                    assert proc.returncode is None, log.read_text()
                    try:
                        if (await client.get("/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
            before = _rss_kib(proc.pid, "VmRSS")

            async def flood() -> int:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                sent = 0
                chunk = b"a" * 65536
                with contextlib.suppress(ConnectionError):
                    writer.write(_head() + b"X-Flood: ")
                    while sent < 20 * 1024 * 1024:
                        writer.write(chunk)
                        await writer.drain()
                        sent += len(chunk)
                return sent

            floods = [asyncio.create_task(flood()) for _ in range(10)]
            # Every flood ends: cut off by the server, or (without a header budget) sent whole
            # and held open by the server.
            sent = await asyncio.wait_for(asyncio.gather(*floods), 90)
            peak = _rss_kib(proc.pid, "VmHWM")
            assert (await client.get("/healthz")).status_code == 200
        grown_mib = (peak - before) / 1024
        assert grown_mib < 40, f"peak RSS grew by {grown_mib:.0f} MiB ({before} KiB before)"
        assert max(sent) < 20 * 1024 * 1024
        assert "Traceback" not in log.read_text()
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)


# --- slow clients -------------------------------------------------------------------------------


async def test_a_slowloris_client_is_cut_off_after_the_header_timeout(
    amqp_url: str, tmp_path: Path
) -> None:
    settings = _settings(amqp_url, tmp_path)  # header_timeout_s: 1
    async with served(settings) as srv:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        started = time.monotonic()

        async def drip() -> None:
            # The attacker's pace: one header byte every 100 ms, for ever.
            with contextlib.suppress(ConnectionError):
                writer.write(b"POST /webhooks/simotel/events HTTP/1.1\r\nX-Slow: ")
                while not writer.is_closing():
                    writer.write(b"a")
                    await writer.drain()
                    await asyncio.sleep(0.1)

        dripping = asyncio.create_task(drip())
        try:
            answer = await _read_all(reader)
        finally:
            dripping.cancel()
            writer.close()
        elapsed = time.monotonic() - started
        assert _status(answer) in (408, None), answer
        assert 0.9 < elapsed < 1 + BOUND
        assert srv.rejected("header_timeout") == 1

        # A connection that sends nothing at all is closed the same way.
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        assert _status(await _read_all(reader)) in (408, None)
        writer.close()
        assert srv.rejected("header_timeout") == 2


async def test_a_stalled_body_gets_408_and_publishes_nothing(
    amqp_url: str, tmp_path: Path, amqp: AbstractRobustConnection, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(amqp_url, tmp_path)  # body_timeout_s: 1
    async with served(settings) as srv, tap(amqp, "simotel.events", "#") as t:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        started = time.monotonic()
        writer.write(_head() + b"Content-Length: 100\r\n\r\n" + b'{"event_name": "Pi')
        await writer.drain()
        answer = await _read_all(reader)
        writer.close()
        assert _status(answer) in (408, None), answer
        assert time.monotonic() - started < 1 + BOUND
        assert srv.rejected("body_timeout") == 1
        await _until(lambda: srv.rejected("client_disconnected") == 1)
        await _webhook_arrives_alone(srv, amqp, t)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_client_that_leaves_mid_body_is_handled_quietly(
    amqp_url: str, tmp_path: Path, amqp: AbstractRobustConnection, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(amqp_url, tmp_path, body_timeout_s=60.0)
    async with served(settings) as srv, tap(amqp, "simotel.events", "#") as t:
        for path in ("/webhooks/simotel/events", "/webhooks/simotel/components/ExtenApi"):
            _, writer = await asyncio.open_connection(srv.host, srv.port)
            writer.write(_head(path) + b"Content-Length: 1000\r\n\r\n" + b'{"event_name": "Pi')
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        await _until(lambda: srv.rejected("client_disconnected") == 2)
        await _webhook_arrives_alone(srv, amqp, t)
    # No 500 attempted (uvicorn logs one as "Exception in ASGI application"), no traceback.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# --- connections and addresses -----------------------------------------------------------------


async def test_connections_over_the_limit_are_refused_at_once(
    amqp_url: str, tmp_path: Path
) -> None:
    settings = _settings(amqp_url, tmp_path, max_connections=5, header_timeout_s=60.0)
    async with served(settings) as srv:
        held = [await asyncio.open_connection(srv.host, srv.port) for _ in range(5)]
        for _, writer in held:
            writer.write(b"GET /healthz HTTP/1.1\r\n")  # and never more
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n")
        answer = await _read_all(reader)
        writer.close()
        assert _status(answer) in (503, None), answer
        assert time.monotonic() - started < BOUND
        assert srv.rejected("too_many_connections") == 1
        # One held connection leaves: a new one is served again.
        held.pop()[1].close()
        async with httpx.AsyncClient(base_url=f"http://{srv.host}:{srv.port}") as client:
            async with asyncio.timeout(BOUND):
                while True:  # until the server has seen the close
                    try:
                        if (await client.get("/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.05)
        for _, w in held:
            w.close()


async def test_an_address_not_allowed_is_refused_before_its_headers_are_read(
    amqp_url: str, tmp_path: Path
) -> None:
    hook = {"username": "simotel", "password": "secret", "allowed_ips": ["10.1.0.0/16"]}
    settings = make_settings(
        amqp_url,
        tmp_path,
        http={"host": "127.0.0.1", "port": 0, "header_timeout_s": 60.0},
        sources={"simotel": {"webhook": hook}},
    )
    async with served(settings) as srv:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        # The request line and one header; the rest of the headers never comes.
        writer.write(b"POST /webhooks/simotel/events HTTP/1.1\r\nHost: bridge\r\n")
        await writer.drain()
        answer = await _read_all(reader)
        writer.close()
        assert _status(answer) == 403, answer
        assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "address_not_allowed"
        assert srv.rejected("address_not_allowed") == 1


def test_the_early_check_leaves_trusted_proxies_unknown_sources_and_other_paths_to_the_app(
    tmp_path: Path,
) -> None:
    hook = {"username": "u", "password": "p", "allowed_ips": ["10.1.0.0/16"]}
    settings = make_settings(
        "amqp://guest:guest@127.0.0.1/",
        tmp_path,
        http={"trusted_proxies": ["192.168.0.1/32"]},
        sources={
            "locked": {"webhook": hook},
            "open": {"webhook": {"username": "u", "password": "p"}},
        },
    )
    check = early_check(settings)
    refused = check("127.0.0.1", "/webhooks/locked/components/SmartApi")
    assert refused is not None and refused.status == 403
    assert check("::ffff:10.1.2.3", "/webhooks/locked/events") is None  # IPv4-mapped
    assert check("10.1.2.3", "/webhooks/locked/events/Cdr") is None
    assert check("192.168.0.1", "/webhooks/locked/events") is None  # a proxy: headers decide
    assert check("127.0.0.1", "/webhooks/open/events") is None
    assert check("127.0.0.1", "/webhooks/nope/events") is None
    assert check("127.0.0.1", "/healthz") is None


def _request(peer: str, forwarded: str | None = None) -> Request:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    return Request({"type": "http", "client": (peer, 1234), "headers": headers})


def test_ipv4_mapped_addresses_match_ipv4_cidrs() -> None:
    import ipaddress

    proxies = (ipaddress.ip_network("127.0.0.1/32"),)
    assert client_address(_request("::ffff:10.0.0.7"), ()) == "10.0.0.7"
    # A mapped proxy address is trusted; a mapped client address in the header is unmapped.
    assert client_address(_request("::ffff:127.0.0.1", "::ffff:10.1.2.3"), proxies) == "10.1.2.3"
    assert client_address(_request("::ffff:127.0.0.1", "10.1.2.3, ::ffff:127.0.0.1"), proxies) == (
        "10.1.2.3"
    )


def _dual_stack() -> bool:
    """Whether this machine can listen on `::` and take IPv4 clients there."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::", 0))
            return sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    except OSError:
        return False


@pytest.mark.skipif(not _dual_stack(), reason="no dual-stack IPv6 socket here")
async def test_an_ipv4_client_of_a_dual_stack_listener_matches_an_ipv4_allow_list(
    amqp_url: str, tmp_path: Path
) -> None:
    hook = {"username": "simotel", "password": "secret", "allowed_ips": ["127.0.0.0/8"]}
    settings = make_settings(
        amqp_url, tmp_path, http={"host": "::", "port": 0}, sources={"simotel": {"webhook": hook}}
    )
    async with served(settings, host="::") as srv:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.port}") as client:
            resp = await client.post(
                "/webhooks/simotel/events",
                json={"event_name": "Ping"},
                headers={"authorization": AUTH},
            )
        assert resp.status_code == 200, resp.text


async def test_a_body_that_stalls_after_an_early_answer_gets_one_answer_and_a_close(
    amqp_url: str, tmp_path: Path
) -> None:
    settings = _settings(amqp_url, tmp_path)  # body_timeout_s: 1
    async with served(settings) as srv:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        # Wrong credentials: 401 before the body is read; the body then never comes.
        writer.write(
            b"POST /webhooks/simotel/events HTTP/1.1\r\nHost: bridge\r\n"
            b"Authorization: Basic Zm9vOmJhcg==\r\nContent-Length: 100\r\n\r\n{"
        )
        await writer.drain()
        answer = await _read_all(reader)
        writer.close()
        assert _status(answer) == 401
        assert answer.count(b"HTTP/1.1 ") == 1, answer
        assert srv.rejected("body_timeout") == 1


async def test_an_upgrade_request_is_plain_http_and_logs_nothing(
    amqp_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(amqp_url, tmp_path)
    async with served(settings) as srv:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: bridge\r\nConnection: Upgrade, close\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        answer = await _read_all(reader)
        writer.close()
    assert _status(answer) == 200, answer
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
