"""The HTTP surface Simotel talks to (docs/contract.md §2): event webhooks in G and Rest mode,
dialplan components, and the health, readiness and metrics endpoints.

The app is thin: it checks the caller (source, address, credentials, size), reads the payload
with `translate`, and hands the result to its collaborators: a sink that makes an event durable
(broker confirm, or the local spool) and a component handler that answers a live call.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import time
from base64 import b64decode, b64encode
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from bridge import httpserver, translate, wire
from bridge.config import Settings, SourceSettings
from bridge.errors import WebhookError
from bridge.eventroute import EventRoute, IngressApp
from bridge.logs import Sampler
from bridge.metrics import Metrics
from bridge.translate import OutgoingEvent

log = structlog.get_logger("bridge.ingress")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class EventSink(Protocol):
    """Makes an accepted event durable; returns where it went ("broker" or "spool"). Raises
    PublishError when neither the broker nor the spool can take it."""

    async def accept(self, event: OutgoingEvent) -> str: ...

    def status(self) -> dict[str, Any]: ...


class ComponentHandler(Protocol):
    """Answers a live call's component request within its deadline (`received_at` is the
    `time.monotonic()` at which the request arrived)."""

    async def handle(
        self,
        source: str,
        component: str,
        fields: dict[str, Any],
        *,
        received_at: float | None = None,
    ) -> dict[str, Any]: ...


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


@dataclass(frozen=True)
class _Gate:
    """Who may call one source's webhooks."""

    user_digest: bytes | None
    pass_digest: bytes | None
    networks: tuple[IpNetwork, ...]
    # The digest of the canonical header (`Basic base64(user:password)`), what Simotel sends:
    # one hash and one comparison on the hot path. Any other spelling takes the full check.
    header_digest: bytes | None = None

    @classmethod
    def of(cls, source: SourceSettings) -> _Gate:
        hook = source.webhook
        user = pw = header = None
        if hook.username and hook.password is not None:
            secret = hook.password.get_secret_value().encode()
            user = _digest(hook.username.encode())
            pw = _digest(secret)
            header = _digest(b"Basic " + b64encode(hook.username.encode() + b":" + secret))
        nets = tuple(ipaddress.ip_network(c, strict=False) for c in hook.allowed_ips)
        return cls(user, pw, nets, header)

    def address_allowed(self, address: str | None) -> bool:
        if not self.networks:
            return True
        return address is not None and _in(address, self.networks)

    def credentials_ok(self, authorization: str | bytes | None) -> bool:
        """HTTP Basic, compared in constant time: both digests are always compared, and the
        comparison time does not depend on where the strings differ."""
        if self.user_digest is None or self.pass_digest is None:
            return True
        if isinstance(authorization, str):
            authorization = authorization.encode("latin-1", "replace")
        if (
            authorization
            and self.header_digest is not None
            and hmac.compare_digest(_digest(authorization), self.header_digest)
        ):
            return True
        user, pw = b"", b""
        if authorization and authorization[:6].lower() == b"basic ":
            try:
                decoded = b64decode(authorization[6:].strip(), validate=True)
            except ValueError:
                decoded = b""
            user, _, pw = decoded.partition(b":")
        ok_user = hmac.compare_digest(_digest(user), self.user_digest)
        ok_pass = hmac.compare_digest(_digest(pw), self.pass_digest)
        return ok_user & ok_pass


def client_address(request: Request, proxies: tuple[IpNetwork, ...]) -> str | None:
    """The socket peer, unless it is a trusted proxy: then the nearest address in
    X-Forwarded-For that is not itself a trusted proxy."""
    peer = request.client.host if request.client else None
    return peer_address(peer, request.headers.getlist("x-forwarded-for"), proxies)


def peer_address(
    peer: str | None, forwarded_lines: list[str], proxies: tuple[IpNetwork, ...]
) -> str | None:
    """`client_address` over plain values: the socket peer and the X-Forwarded-For lines."""
    if peer is not None and (ip := _ip(peer)) is not None:
        peer = str(ip)
    if peer is None or not proxies:
        return peer
    if not _in(peer, proxies):
        return peer
    # Every X-Forwarded-For line, in order: a proxy may add its own line after the client's.
    forwarded = ",".join(forwarded_lines)
    if not forwarded:
        return peer
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        if not _in(hop, proxies):
            ip = _ip(hop)
            return str(ip) if ip is not None else hop
    return peer


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address, with an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a dual-stack
    socket reports for an IPv4 peer) as the IPv4 address it is, so IPv4 CIDRs match it."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _in(address: str, nets: tuple[IpNetwork, ...]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip in n for n in nets)


# The webhook routes' source segment, as the router reads it.
_WEBHOOK_PATH = re.compile(r"^/webhooks/([^/]+)/(?:events|components)(?:/|$)")


def early_check(settings: Settings) -> Callable[[str | None, str], WebhookError | None]:
    """The listener's check of a request's socket peer against the source's `allowed_ips`,
    once the request line is read: before the headers are complete and before the body. A
    peer that is a trusted proxy is left to the app (the client is in X-Forwarded-For), and
    the app checks every request again."""
    gates = {name: _Gate.of(src) for name, src in settings.sources.items()}
    proxies = tuple(ipaddress.ip_network(c, strict=False) for c in settings.http.trusted_proxies)

    def check(peer: str | None, path: str) -> WebhookError | None:
        match = _WEBHOOK_PATH.match(path)
        gate = gates.get(match.group(1)) if match else None
        if gate is None or not gate.networks or peer is None or _in(peer, proxies):
            return None
        if gate.address_allowed(peer):
            return None
        return WebhookError(403, "address_not_allowed", "this address may not call this source")

    return check


def listener_guard(
    settings: Settings, metrics: Metrics, *, webhooks: bool = True
) -> httpserver.Guard:
    """The HTTP listener's limits (settings.http) and early address check, counting what it
    refuses in `simotel_bridge_webhooks_rejected`."""

    def refused(reason: str) -> None:
        metrics.rejected.labels(reason).inc()

    return httpserver.Guard(
        limits=httpserver.Limits.of(settings.http),
        early=early_check(settings) if webhooks else None,
        refused=refused,
    )


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise WebhookError(413, "too_large", f"the body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise WebhookError(413, "too_large", f"the body is over {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # The client left (or the listener cut it off) mid-body: nothing to answer, nothing
        # published; 499 is only what the log line and the metric show.
        raise WebhookError(499, "client_disconnected", "the client went away") from None
    return b"".join(chunks)


def create_app(
    settings: Settings,
    *,
    sink: EventSink,
    metrics: Metrics,
    components: ComponentHandler | None = None,
    broker_ready: Callable[[], bool] = lambda: True,
    webhooks: bool = True,
    lifespan: Any = None,
) -> IngressApp:
    """The ingress app. It owns no connection: the caller's lifespan does. The event webhooks
    are served by `EventRoute` in front of Starlette, which serves everything else."""
    gates = {name: _Gate.of(src) for name, src in settings.sources.items()}
    proxies = tuple(ipaddress.ip_network(c, strict=False) for c in settings.http.trusted_proxies)
    limit = settings.http.max_body_bytes
    sampler = Sampler(settings.log.access_sample)

    async def admit(request: Request) -> tuple[str, translate.Payload]:
        """Source, address, credentials, size, payload: in that order; raises WebhookError."""
        source = request.path_params["source"]
        gate = gates.get(source)
        if gate is None:
            raise WebhookError(404, "unknown_source", f"no source named {source!r}")
        if not gate.address_allowed(client_address(request, proxies)):
            raise WebhookError(403, "address_not_allowed", "this address may not call this source")
        if not gate.credentials_ok(request.headers.get("authorization")):
            raise WebhookError(401, "unauthorized", "wrong or missing credentials")
        body = await _read_body(request, limit)
        payload = translate.parse_payload(
            request.headers.get("content-type", ""), body, request.url.query
        )
        return source, payload

    def refuse(exc: WebhookError) -> Response:
        metrics.rejected.labels(exc.reason).inc()
        headers = (
            {"WWW-Authenticate": 'Basic realm="simotel-bridge"'} if exc.status == 401 else None
        )
        return _json(exc.status, {"error": exc.reason, "detail": exc.detail}, headers)

    events = EventRoute(
        settings,
        sink=sink,
        metrics=metrics,
        gates=gates,
        address=lambda peer, forwarded: peer_address(peer, forwarded, proxies),
        sampler=sampler,
    )

    async def event_webhook(scope: Scope, receive: Receive, send: Send) -> None:
        """The event routes through Starlette: only for what the front door does not take
        (Starlette answers a wrong method 405 before this runs)."""
        params = scope["path_params"]
        await events(scope, receive, send, params["source"], params.get("event"))

    async def component_webhook(request: Request) -> Response:
        started = time.perf_counter()
        arrived = time.monotonic()
        fields: dict[str, Any] = {"source": request.path_params["source"]}
        status = 500
        try:
            component = translate.canonical_component(request.path_params["component"])
            if component is None:
                raise WebhookError(404, "unknown_component", "no such component")
            fields["component"] = component
            source, payload = await admit(request)
            if components is None:
                raise WebhookError(404, "components_disabled", "components are not served here")
            fields["app_name"] = wire.for_log(payload.fields.get("app_name"))
            fields["call_id"] = translate.call_id(payload.fields)
            answer = await components.handle(source, component, payload.fields, received_at=arrived)
            status = 200
            return _json(200, answer)
        except WebhookError as exc:
            status = exc.status
            fields["outcome"] = exc.reason
            return refuse(exc)
        finally:
            log.info(
                "component",
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                **fields,
            )

    async def healthz(request: Request) -> Response:
        return _json(200, {"status": "alive"})

    async def readyz(request: Request) -> Response:
        ready = broker_ready()
        metrics.broker_up.set(1 if ready else 0)
        body: dict[str, Any] = {"broker": "connected" if ready else "disconnected"}
        body.update(sink.status())
        ok = ready or body.get("mode") == "spool"
        body["status"] = "ready" if ok else "not_ready"
        return _json(200 if ok else 503, body)

    async def metrics_endpoint(request: Request) -> Response:
        metrics.broker_up.set(1 if broker_ready() else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    methods = ["GET", "POST"]
    routes = [
        Route("/webhooks/{source}/events", event_webhook, methods=methods),
        Route("/webhooks/{source}/events/", event_webhook, methods=methods),
        Route("/webhooks/{source}/events/{event}", event_webhook, methods=methods),
        Route("/webhooks/{source}/components/{component}", component_webhook, methods=methods),
    ]
    if not webhooks:
        routes = []
    routes += [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    router = Starlette(routes=routes, lifespan=lifespan)
    return IngressApp(router, events if webhooks else None)
