"""The event webhooks' hot path: a plain ASGI handler in front of Starlette.

Every accepted Simotel event passes here, so nothing is done per request that does not change
the answer: the path is matched once with one regular expression (no router, no middleware,
no Request object), the headers are read in one pass, the credentials are checked against a
digest computed at start, the answers' bytes and the metric series are made once, and the
access log line of an accepted event is only rendered for the sample `log.access_sample`
asks for (a refusal or a failure is always logged; the counters count everything).

What it does, and in which order, is the contract of docs/contract.md §2 and is the same as before:
source (404), address (403), credentials (401), size (413), payload (400), then the sink
(broker or spool; 503 when neither takes the event).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson
import structlog
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Receive, Scope, Send

from bridge import translate, wire
from bridge.config import Settings
from bridge.errors import PublishError, WebhookError
from bridge.logs import Sampler
from bridge.metrics import Metrics, event_label
from bridge.translate import OutgoingEvent

# The event routes: /webhooks/{source}/events, .../events/ and .../events/{event}, exactly as
# Starlette's router reads them (a segment is one or more characters other than `/`).
EVENT_PATH = re.compile(r"/webhooks/([^/]+)/events(?:/([^/]+)?)?")

_JSON = (b"content-type", b"application/json")
_CHALLENGE = (b"www-authenticate", b'Basic realm="simotel-bridge"')
_ACCEPTED = b'{"status":"accepted","message_id":"'
# Every answer's status, as the label of simotel_bridge_webhook_seconds: a closed set.
_STATUSES = (200, 400, 401, 403, 404, 413, 499, 500, 503)


class Gate(Protocol):
    @property
    def networks(self) -> tuple[Any, ...]: ...

    def address_allowed(self, address: str | None) -> bool: ...

    def credentials_ok(self, authorization: str | bytes | None) -> bool: ...


class Sink(Protocol):
    async def accept(self, event: OutgoingEvent) -> str: ...


class EventRoute:
    """`await route(scope, receive, send, source, path_event)` answers one event webhook."""

    def __init__(
        self,
        settings: Settings,
        *,
        sink: Sink,
        metrics: Metrics,
        gates: Mapping[str, Gate],
        address: Callable[[str | None, list[str]], str | None],
        sampler: Sampler,
    ) -> None:
        self.sink = sink
        self.gates = gates
        self.address = address
        self.sampler = sampler
        # One logger per app, bound on first use: the configuration at that time is the one
        # kept (structlog caches it), not that of whoever logged first in the process.
        self.log = structlog.get_logger("bridge.ingress")
        self.limit = settings.http.max_body_bytes
        self.exchange = settings.amqp.exchanges.events
        self.rejected = metrics.rejected
        self._accepted: Counter = metrics.accepted
        self._accepted_series: dict[tuple[str, str, str], Any] = {}
        latency: Histogram = metrics.request_latency
        self._latency = {status: latency.labels(str(status)) for status in _STATUSES}
        self._latency_other = latency.labels("other")
        self._too_large = WebhookError(413, "too_large", f"the body is over {self.limit} bytes")

    def _accepted_inc(self, source: str, name: str, outcome: str) -> None:
        # Bounded: sources come from the settings, names through event_label, two outcomes.
        key = (source, event_label(name), outcome)
        series = self._accepted_series.get(key)
        if series is None:
            series = self._accepted_series[key] = self._accepted.labels(*key)
        series.inc()

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, source: str, path_event: str | None
    ) -> None:
        started = time.perf_counter()
        status, outcome = 500, "error"
        event: OutgoingEvent | None = None
        form: str | None = None
        error: str | None = None
        try:
            try:
                event, form = await self._admit(scope, receive, source, path_event)
                try:
                    outcome = await self.sink.accept(event)
                except PublishError as exc:
                    self.rejected.labels("unavailable").inc()
                    outcome, status, error = "unavailable", 503, str(exc)
                    body = b'{"error":"unavailable","detail":"the event cannot be stored"}'
                    await _answer(send, 503, body)
                    return
                self._accepted_inc(source, event.event, outcome)
                status = 200
                await _answer(send, 200, b'%s%s"}' % (_ACCEPTED, event.message_id.encode()))
            except WebhookError as exc:
                outcome, status = exc.reason, exc.status
                self.rejected.labels(exc.reason).inc()
                body = orjson.dumps({"error": exc.reason, "detail": exc.detail})
                await _answer(send, exc.status, body, _CHALLENGE if exc.status == 401 else None)
        except Exception as exc:  # a defect: answered 500 and logged with its traceback
            status, outcome, error = 500, "error", repr(exc)
            self.log.exception("webhook failed", source=source)
            with contextlib.suppress(Exception):  # unless the answer was already on its way
                await _answer(send, 500, b'{"error":"internal","detail":"internal error"}')
        finally:
            elapsed = time.perf_counter() - started
            self._latency.get(status, self._latency_other).observe(elapsed)
            sampled = self.sampler.take() if status == 200 else 1
            if sampled:
                fields: dict[str, Any] = {
                    "source": source,
                    "path_event": wire.for_log(path_event),
                    "outcome": outcome,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                }
                if event is not None:
                    fields.update(
                        event_name=event.event,
                        message_id=event.message_id,
                        call_id=event.call_id,
                        form=form,
                    )
                if error is not None:
                    fields["error"] = error
                if status == 200:
                    if sampled > 1:
                        fields["sampled"] = sampled  # this line stands for `sampled` answers
                    self.log.info("webhook", **fields)
                elif status >= 500:
                    self.log.warning("webhook", **fields)
                else:
                    self.log.info("webhook", **fields)

    async def _admit(
        self, scope: Scope, receive: Receive, source: str, path_event: str | None
    ) -> tuple[OutgoingEvent, str]:
        """Source, address, credentials, size, payload: in that order; raises WebhookError."""
        gate = self.gates.get(source)
        if gate is None:
            raise WebhookError(404, "unknown_source", f"no source named {source!r}")
        authorization: bytes | None = None
        content_type = b""
        declared: bytes | None = None
        forwarded: list[str] = []
        trace: bytes | None = None
        seen_type = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is None:
                    authorization = value
            elif name == b"content-type":
                if not seen_type:
                    content_type, seen_type = value, True
            elif name == b"content-length":
                if declared is None:
                    declared = value
            elif name == b"x-forwarded-for":
                forwarded.append(value.decode("latin-1"))
            elif name == b"traceparent" and trace is None:
                trace = value
        if gate.networks:
            client = scope.get("client")
            if not gate.address_allowed(self.address(client[0] if client else None, forwarded)):
                raise WebhookError(
                    403, "address_not_allowed", "this address may not call this source"
                )
        if not gate.credentials_ok(authorization):
            raise WebhookError(401, "unauthorized", "wrong or missing credentials")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise self._too_large
        body = await self._body(receive)
        query = b""
        if not body.strip():
            query = scope.get("query_string", b"")
        try:
            query_text = query.decode()
        except UnicodeDecodeError:
            raise WebhookError(400, "invalid_query", "the query string cannot be read") from None
        payload = translate.parse_payload(content_type.decode("latin-1"), body, query_text)
        name = translate.event_name(payload.fields, path_event)
        # A valid W3C traceparent is carried to the event; without one the event starts a trace.
        traceparent = trace.decode("latin-1") if trace is not None else None
        event = translate.build_event(self.exchange, source, name, payload, traceparent=traceparent)
        return event, payload.form

    async def _body(self, receive: Receive) -> bytes:
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            body: bytes = message.get("body", b"")  # the common case: one message
            if len(body) > self.limit:
                raise self._too_large
            return body
        chunks: list[bytes] = []
        size = 0
        while True:
            if message["type"] == "http.disconnect":
                # The client left (or the listener cut it off) mid-body: nothing to answer,
                # nothing published; 499 is only what the log line and the metric show.
                raise WebhookError(499, "client_disconnected", "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise self._too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
            message = await receive()


async def _answer(
    send: Send, status: int, body: bytes, extra: tuple[bytes, bytes] | None = None
) -> None:
    headers = [(b"content-length", b"%d" % len(body)), _JSON]
    if extra is not None:
        headers.append(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class IngressApp:
    """The ASGI app: event webhooks straight to `events`, everything else (components,
    health, readiness, metrics, lifespan, wrong methods, unknown paths) to Starlette."""

    def __init__(self, router: ASGIApp, events: EventRoute | None) -> None:
        self.router = router
        self.events = events
        self._match = EVENT_PATH.fullmatch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.events is not None and scope["type"] == "http":
            method = scope["method"]
            if method == "POST" or method == "GET":
                match = self._match(scope["path"])
                if match is not None:
                    await self.events(scope, receive, send, match[1], match[2])
                    return
        await self.router(scope, receive, send)
