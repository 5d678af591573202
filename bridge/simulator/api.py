"""The simulated API v4 over HTTP: a Starlette app whose one route checks what Simotel checks,
in Simotel's order (address, credentials, service, verb, permission, media type, body), injects
the configured faults, and hands the request to the pure `handlers.handle`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import random
import re
from typing import Any, Protocol

import orjson
import structlog
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from bridge.catalog import CATALOG
from bridge.simulator import faults, handlers, replies
from bridge.simulator.options import SimulatorOptions
from bridge.simulator.replies import OriginateRequest, Reply, Upload
from bridge.simulator.state import Record, SimState

log = structlog.get_logger("bridge.simulator.api")

# Every v4 sample uses POST, the ping page's JS and curl samples PUT, and clients send either
# (simotel-connect: PUT for most calls, multipart PUT for uploads, POST or GET for downloads).
# Simotel serves them alike, so does the simulator: POST and PUT everywhere, GET for downloads.
_METHODS = ("POST", "PUT")
_DOWNLOAD_METHODS = ("POST", "PUT", "GET")
_MAX_FIELDS = 1000  # form / query fields read at most


class ApiReactions(Protocol):
    """Where the PBX's reactions to API requests go (the call generator, in `run_simulator`)."""

    def emit(self, event: str, payload: Record) -> None: ...

    def originate(self, request: OriginateRequest) -> None: ...


def check_auth(
    options: SimulatorOptions, authorization: str | None, api_key: str | None
) -> Reply | None:
    """401 `...is missing` when neither credential is sent, `...is invalid` when what the
    account's mode needs is wrong or absent; None when the request may pass."""
    if not authorization and not api_key:
        return replies.AUTH_MISSING
    basic_ok = False
    if authorization and authorization[:6].lower() == "basic ":
        try:
            user, _, password = (
                base64.b64decode(authorization[6:], validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            user, password = "", ""
        basic_ok = hmac.compare_digest(
            user.encode(), options.username.encode()
        ) & hmac.compare_digest(password.encode(), options.password.encode())
    key_ok = api_key is not None and hmac.compare_digest(api_key.encode(), options.api_key.encode())
    if (options.auth in ("basic", "both") and not basic_ok) or (
        options.auth in ("apikey", "both") and not key_ok
    ):
        return replies.AUTH_INVALID
    return None


def ip_allowed(options: SimulatorOptions, host: str | None) -> bool:
    if not options.allowed_ips:
        return True
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(c, strict=False) for c in options.allowed_ips)


class _Api:
    def __init__(
        self, state: SimState, options: SimulatorOptions, sink: ApiReactions | None
    ) -> None:
        self.state = state
        self.options = options
        self.sink = sink
        self.base = "/" + options.base_path.strip("/") + "/"
        self.rng = random.Random(None if options.seed is None else options.seed + 1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        path = "/" + "/".join(p for p in request.url.path.split("/") if p)  # `//api/v4` works too
        service = path[len(self.base) :] if (path + "/").startswith(self.base) else None
        decision = faults.NO_FAULT
        if service is None:
            reply = replies.NOT_FOUND
        else:
            reply, decision = await self._answer(request, service)
        if decision.delay:
            await asyncio.sleep(decision.delay)  # injected latency
        if decision.outcome == "drop":  # the answer starts, then the connection goes away
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"4096"),
                    ],
                }
            )
            log.info("api", service=service, fault="drop")
            return
        log.info("api", service=service, status=reply.status, fault=decision.outcome)
        await self._send(reply, send)

    async def _answer(self, request: Request, service: str) -> tuple[Reply, faults.Decision]:
        opts = self.options
        if not ip_allowed(opts, request.client.host if request.client else None):
            return replies.IP_DENIED, faults.NO_FAULT
        denied = check_auth(
            opts, request.headers.get("authorization"), request.headers.get("x-apikey")
        )
        if denied is not None:
            return denied, faults.NO_FAULT
        endpoint = CATALOG.get(service)
        if endpoint is None:
            return replies.NO_SERVICE, faults.NO_FAULT
        allowed = _DOWNLOAD_METHODS if endpoint.is_download else _METHODS
        if request.method not in allowed:
            return replies.METHOD_NOT_ALLOWED, faults.NO_FAULT
        if service in opts.denied_paths:
            return replies.access_denied(service), faults.NO_FAULT
        parsed = await _read(request, upload=endpoint.is_upload)
        if isinstance(parsed, Reply):
            return parsed, faults.NO_FAULT
        body, upload = parsed
        decision = faults.decide(opts.faults, self.rng)
        if decision.outcome == "error":
            reply = Reply(
                status=decision.status,
                raw=b"<html><body><h1>%d</h1></body></html>" % decision.status,
                content_type="text/html",
            )
            return reply, decision
        if decision.outcome == "failure":
            return replies.fail(replies.FAILED), decision
        reply = handlers.handle(self.state, service, body, upload)
        self._react(reply)
        return reply, decision

    def _react(self, reply: Reply) -> None:
        if self.sink is None:
            return
        for event, payload in reply.events:
            self.sink.emit(event, payload)
        if reply.originate is not None:
            self.sink.originate(reply.originate)

    @staticmethod
    async def _send(reply: Reply, send: Send) -> None:
        body = reply.raw if reply.raw is not None else orjson.dumps(reply.json)
        headers = [
            (b"content-type", reply.content_type.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _read(request: Request, *, upload: bool) -> tuple[dict[str, Any], Upload | None] | Reply:
    """The request's parameters, as Simotel reads them: the query string, overridden by a JSON
    object body or a form (urlencoded or multipart, `a[b]=c` nesting as PHP reads it); the
    multipart `file` of an upload. 415 / 400 as Simotel."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = nest(list(request.query_params.multi_items())[:_MAX_FIELDS])
    if upload and media != "multipart/form-data":
        return replies.UNSUPPORTED_MEDIA
    if media in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            async with request.form(max_files=1, max_fields=_MAX_FIELDS) as form:
                fields: list[tuple[str, str]] = []
                file: Upload | None = None
                for key, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        if key == "file" and file is None:
                            data = await value.read()
                            file = Upload(value.filename or "file", value.content_type or "", data)
                    else:
                        fields.append((key, value))
                return {**query, **nest(fields)}, file
        except Exception:  # python-multipart's parse errors are not one class
            return replies.BAD_CONTENT
    raw = await request.body()
    if not raw.strip():
        return query, None
    if media != "application/json" and not media.endswith("+json"):
        return replies.UNSUPPORTED_MEDIA
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return replies.BAD_CONTENT
    if not isinstance(body, dict):
        return replies.BAD_CONTENT
    return {**query, **body}, None


_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


def nest(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Form or query pairs as PHP reads them: `conditions[from]=1` is `{"conditions": {"from":
    "1"}}`, `numbers[]=1&numbers[]=2` a list; a plain key sent twice keeps the last value."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        head, _, rest = key.partition("[")
        parts = [head, *_BRACKETS.findall("[" + rest)] if rest else [head]
        node: Any = out
        for i, part in enumerate(parts[:8]):  # a bounded depth
            last = i == len(parts) - 1 or i == 7
            if isinstance(node, list):
                if last:
                    node.append(value)
                    break
                node.append({})
                node = node[-1]
                continue
            if last:
                node[part] = value
                break
            nxt = parts[i + 1]
            child = node.get(part)
            if nxt == "":
                if not isinstance(child, list):
                    child = node[part] = []
            elif not isinstance(child, dict):
                child = node[part] = {}
            node = child
    return out


def create_api_app(
    state: SimState, options: SimulatorOptions, sink: ApiReactions | None = None
) -> Starlette:
    """The API v4 app. `sink` receives the webhooks API requests cause (ExtenAdded, Ping,
    OutgoingFax, ...) and originate requests; without one they are dropped."""
    return Starlette(routes=[Route("/{path:path}", _Api(state, options, sink))])
