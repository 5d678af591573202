"""Serve an ASGI app with uvicorn inside the running event loop, on a socket bound before the
server starts, so the address (port 0: any free port) is known at once and nobody has to wait
for "started". Signals stay with the caller.

The listener defends itself before the app sees a request (docs/security.md). uvicorn's
httptools protocol has no bound on the size of a request's headers (httptools keeps a partial
header line in memory however long it grows), no time limit on reading headers or a body, and
no limit on open connections: `_GuardedProtocol` adds them.

- At most `max_connections` open connections: the next one is answered 503 and closed at once,
  before anything is read from it.
- The request line and headers together may not exceed `max_header_bytes` (431), one header
  line `max_header_line_bytes` (431; the request line: 414). Bytes over the budget are never
  handed to the parser, so a header flood costs at most the budget per connection.
- The headers must arrive within `header_timeout` of the connection (or of the first byte of a
  following request on a kept-alive connection), the body within `body_timeout` after the
  headers: else 408 and the connection is closed (the app sees a disconnect).
- `early(peer, path)` is asked once the request line is read, before the headers are complete
  and before the body: a refusal it returns is answered at once and the app never runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.parse
from asyncio import TimerHandle
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
import structlog
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from bridge.config import HttpSettings
from bridge.errors import WebhookError

log = structlog.get_logger("bridge.httpserver")


@dataclass(frozen=True)
class Limits:
    """The listener's limits; the defaults are HttpSettings' defaults."""

    max_header_bytes: int = 32_768
    max_header_line_bytes: int = 8_192
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    max_connections: int = 1024

    @classmethod
    def of(cls, http: HttpSettings) -> Limits:
        return cls(
            max_header_bytes=http.max_header_bytes,
            max_header_line_bytes=http.max_header_line_bytes,
            header_timeout=http.header_timeout_s,
            body_timeout=http.body_timeout_s,
            max_connections=http.max_connections,
        )


def _nothing(reason: str) -> None:
    return None


@dataclass(frozen=True)
class Guard:
    """What the listener enforces. `early(peer, path)` gets the socket peer address and the
    request path once the request line is read, and may return the refusal to answer;
    `refused(reason)` is told of every request or connection the listener itself refuses."""

    limits: Limits = Limits()
    early: Callable[[str | None, str], WebhookError | None] | None = None
    refused: Callable[[str], None] = _nothing


class _GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of `guard` (set on a per-server subclass)."""

    guard: Guard = Guard()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._in_headers = True
        self._header_bytes = 0
        self._early_done = False
        self.url = b""
        self._header_timer: TimerHandle | None = None
        self._body_timer: TimerHandle | None = None

    # Connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.guard.limits.max_connections:
            self._refuse(503, "too_many_connections", "too many connections", b"retry-after: 1\r\n")
            return
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        limit = self.guard.limits.max_header_bytes
        while data and not self._refused:
            if not self._in_headers:
                super().data_received(data)
                return
            budget = limit - self._header_bytes
            if len(data) <= budget:
                self._header_bytes += len(data)
                super().data_received(data)
                self._after_request_line()
                return
            # Only the budget reaches the parser; the rest is the body if the headers end
            # within it, and a refusal if they do not.
            head, data = data[:budget], data[budget:]
            self._header_bytes += len(head)
            if head:
                super().data_received(head)
                self._after_request_line()
            if self._in_headers and not self._refused and not self.transport.is_closing():
                self._refuse(431, "header_too_large", f"the headers are over {limit} bytes")

    def _unsupported_upgrade_warning(self) -> None:
        # No WebSocket is served (ws="none"): an Upgrade header is answered as plain HTTP,
        # without uvicorn's two warning lines per request (anyone could flood the log).
        return None

    # Parser callbacks

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._early_done = False
        self._start_header_timer()

    def on_url(self, url: bytes) -> None:
        if self._refused:
            return
        super().on_url(url)
        if len(self.url) > self.guard.limits.max_header_line_bytes:
            self._refuse(414, "uri_too_long", "the request line is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        if len(name) + len(value) > self.guard.limits.max_header_line_bytes:
            self._refuse(431, "header_too_large", "a header line is too long")
            return
        self._check_early()
        if not self._refused:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._check_early()
        if self._refused:
            return
        self._cancel(self._header_timer)
        self._header_timer = None
        self._in_headers = False
        super().on_headers_complete()
        self._body_timer = self.loop.call_later(self.guard.limits.body_timeout, self._body_late)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._cancel(self._body_timer)
        self._body_timer = None
        self._in_headers = True
        self._header_bytes = 0
        super().on_message_complete()

    # The guard

    def _after_request_line(self) -> None:
        """The early check as soon as the request line is complete (the parser reports a
        header only when the next one starts)."""
        if self._early_done or self._refused or not self._in_headers or not self.url:
            return
        method = self.parser.get_method() if self.parser is not None else b""
        # METHOD SP URL SP HTTP/1.1 CRLF, all of it received for this request.
        if method and self._header_bytes >= len(method) + len(self.url) + 12:
            self._check_early()

    def _check_early(self) -> None:
        if self._early_done or self.guard.early is None:
            return
        self._early_done = True
        try:
            raw = httptools.parse_url(self.url).path
        except httptools.HttpParserInvalidURLError:
            return  # the parser and the app refuse it in their own way
        path = urllib.parse.unquote(raw.decode("ascii", "replace"))
        refusal = self.guard.early(self.client[0] if self.client else None, path)
        if refusal is not None:
            self._refuse(refusal.status, refusal.reason, refusal.detail)

    def _start_header_timer(self) -> None:
        if self._header_timer is None:
            timeout = self.guard.limits.header_timeout
            self._header_timer = self.loop.call_later(timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        self._refuse(408, "header_timeout", "the headers did not arrive in time")

    def _body_late(self) -> None:
        self._body_timer = None
        self._refuse(408, "body_timeout", "the body did not arrive in time")

    @staticmethod
    def _cancel(timer: TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    def _cancel_timers(self) -> None:
        self._cancel(self._header_timer)
        self._cancel(self._body_timer)
        self._header_timer = self._body_timer = None

    def _refuse(self, status: int, reason: str, detail: str, extra: bytes = b"") -> None:
        """Answer `status` (unless a response is already on its way) and close; nothing more
        from this connection is parsed."""
        if self._refused:
            return
        self._refused = True
        self._cancel_timers()
        self.guard.refused(reason)
        peer = self.client[0] if self.client else None
        log.info("connection refused", reason=reason, status=status, peer=peer)
        if self.transport.is_closing():
            return
        # Answer only a request that has none yet: the current one, or a new request's
        # headers on a kept-alive connection. After an early answer (e.g. 401 before the body
        # was read), the connection is just closed.
        cycle = self.cycle
        waiting = cycle is None or not cycle.response_started
        if waiting or (self._in_headers and cycle is not None and cycle.response_complete):
            body = orjson.dumps({"error": reason, "detail": detail})
            self.transport.write(
                b"".join(
                    [
                        STATUS_LINE[status],
                        b"content-type: application/json\r\n",
                        b"content-length: %d\r\n" % len(body),
                        b"connection: close\r\n",
                        extra,
                        b"\r\n",
                        body,
                    ]
                )
            )
        self.transport.close()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the process's signal handling belongs to whoever runs us


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    graceful: float = 2.0,
    guard: Guard | None = None,
    reuse_port: bool = False,
) -> AsyncIterator[str]:
    """Run `app` while the block runs; yields its base URL, e.g. `http://127.0.0.1:40123`.
    Binding happens before anything else, so a taken port fails here with OSError (unless every
    process on it sets `reuse_port`). On exit, open requests get `graceful` seconds to finish.
    `guard`: the listener's limits (the defaults when omitted)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if reuse_port:
        # Several processes bound to one port; the kernel spreads new connections over them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    protocol = type("GuardedProtocol", (_GuardedProtocol,), {"guard": guard or Guard()})
    config = uvicorn.Config(
        app,
        lifespan="off",
        http=protocol,
        ws="none",  # no WebSocket route: no upgrade handling either
        server_header=False,  # no "server: uvicorn" on every answer
        # The app decides whom to believe (http.trusted_proxies); uvicorn's default would
        # rewrite the client address from X-Forwarded-For for any peer on 127.0.0.1.
        proxy_headers=False,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(graceful)),
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"uvicorn {host}:{port}")
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    try:
        yield f"http://{shown}:{bound}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=graceful + 3)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            sock.close()
