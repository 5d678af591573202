"""Commands, the pure core of the worker (docs/contract.md §4): no I/O, only plain values.

    Envelope  --parse_command-->  Command  --build_request-->  HttpRequest
    HttpAnswer  --interpret-->  Outcome  --make_result-->  Result  --result_message--> AMQP parts

A command names an endpoint of the catalog and nothing else, so whatever a message says, the
worker only ever calls `base_url + endpoint.path` for a catalogued endpoint. Anything invalid
raises `InvalidCommand`, which becomes a `rejected` result and is never sent to Simotel.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from bridge import wire
from bridge.catalog import Endpoint, lookup
from bridge.errors import InvalidCommand as InvalidCommand  # re-exported: defined in bridge.errors
from bridge.wire import command_key

Status = Literal["ok", "failed", "error", "rejected", "expired", "unknown"]
STATUSES: tuple[Status, ...] = ("ok", "failed", "error", "rejected", "expired", "unknown")

_BODY_KEYS = frozenset({"action", "data"})
_AGENT_OPS = frozenset(
    f"pbx/queues/{batch}{op}agent"
    for batch in ("", "batch")
    for op in ("add", "pause", "resume", "remove")
)
_SNIPPET = 300
# A command's message_id becomes the result's and, as `{id}:dead`, the dead letter's message_id
# (an AMQP shortstr: 255 bytes). Longer ids are refused (`bad_message_id`).
MAX_ID_BYTES = 200
MAX_HEADER_TEXT = 512  # bytes of a text (an error) copied into a header
MAX_COPIED_HEADERS = 4096  # bytes of a command's own headers copied into its dead letter
_MAX_QUOTED = 80  # characters of a hostile value quoted in an error
# A MIME type: type "/" subtype, then optional ";" parameters, all printable ASCII.
_TOKEN = r"[A-Za-z0-9!#$&^_.+-]{1,64}"
_MIME = re.compile(rf"{_TOKEN}/{_TOKEN}([ \t]*;[ \t]*[ -~]{{1,100}})?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_FILENAME_BYTES = 255


def safe_id(value: str, limit: int = MAX_ID_BYTES) -> str:
    """An id that fits `limit` bytes: `value` itself when it does, else its head and a hash of
    the whole (stable, so the same over-long id always maps to the same one)."""
    return wire.shortstr(value, limit=limit)


def quoted(value: Any) -> str:
    """A value from a message, for an error text: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= _MAX_QUOTED else text[: _MAX_QUOTED - 3] + "..."


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the worker needs from an AMQP delivery, as plain values."""

    body: bytes
    routing_key: str = ""
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    expiration: float | None = None  # seconds (the AMQP property, as aio-pika decodes it)
    timestamp: float | None = None  # epoch seconds (the AMQP property)
    redelivered: bool = False
    received_at: float = 0.0  # epoch seconds


@dataclass(frozen=True, slots=True)
class UploadFile:
    filename: str
    content: bytes
    content_type: str


@dataclass(frozen=True, slots=True)
class Command:
    command_id: str
    message_id: str | None
    endpoint: Endpoint
    source: str
    data: dict[str, Any]
    file: UploadFile | None
    reply_to: str | None
    correlation_id: str | None
    deadline: float | None  # epoch seconds
    redelivered: bool

    @property
    def action(self) -> str:
        return self.endpoint.path

    @property
    def retry_safe(self) -> bool:
        return self.endpoint.retry_safe

    @property
    def routing_key(self) -> str:
        return command_key(self.source, self.action)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """What to send: `method` to `base_url + path`, a JSON body or a multipart `file` field."""

    method: str
    path: str
    json: dict[str, Any] | None
    file: UploadFile | None
    form: dict[str, str]
    slow: bool  # report search: use the report read timeout
    download: bool


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    content_type: str
    body: bytes
    too_large: bool = False  # a download over the size limit: body is incomplete


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt's (or the whole execution's) outcome, before it becomes a Result."""

    status: Status
    http_status: int | None = None
    response: Any = None
    error: str | None = None
    reason: str | None = None
    retryable: bool = False
    file: bytes | None = None
    content_type: str | None = None


@dataclass(frozen=True, slots=True)
class Result:
    command_id: str
    action: str | None
    source: str | None
    status: Status
    http_status: int | None = None
    response: Any = None
    error: str | None = None
    attempts: int = 0
    duration_ms: int = 0
    reason: str | None = None  # dead-letter reason (not part of the result body)
    file: bytes | None = None
    content_type: str | None = None

    def fields(self) -> dict[str, Any]:
        """The result body of docs/contract.md §4, in its order."""
        return {
            "command_id": self.command_id,
            "action": self.action,
            "source": self.source,
            "status": self.status,
            "http_status": self.http_status,
            "response": self.response,
            "error": self.error,
            "attempts": self.attempts,
            "duration_ms": self.duration_ms,
        }

    def to_json(self) -> bytes:
        """For the state store: the fields plus the reason (a file is never stored)."""
        return orjson.dumps({**self.fields(), "reason": self.reason})

    @classmethod
    def from_json(cls, raw: bytes) -> Result:
        d = orjson.loads(raw)
        status = d["status"]
        if status not in STATUSES:
            raise ValueError(f"stored result has status {status!r}")
        return cls(
            command_id=d["command_id"],
            action=d["action"],
            source=d["source"],
            status=status,
            http_status=d["http_status"],
            response=d["response"],
            error=d["error"],
            attempts=d["attempts"],
            duration_ms=d["duration_ms"],
            reason=d.get("reason"),
        )


# ---------------------------------------------------------------------------------------------
# parsing


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def resolve_source(env: Envelope, sources: Collection[str]) -> str:
    """The header `source`, else the routing key's first word when it names a source, else the
    only source. `sources` are the sources with API settings."""
    if "source" in env.headers:
        named = _text(env.headers["source"])
        if named is None or named not in sources:
            raise InvalidCommand(
                "unknown_source", f"header source {quoted(named)} is not configured"
            )
        return named
    first = env.routing_key.split(".", 1)[0]
    if first in sources:
        return first
    if len(sources) == 1:
        return next(iter(sources))
    raise InvalidCommand("unknown_source", "the command names no configured source")


def command_deadline(env: Envelope) -> float | None:
    """The earliest of the `deadline` header (ISO 8601; no zone means UTC) and the `expiration`
    property counted from the message `timestamp` (or, without one, from its receipt)."""
    candidates: list[float] = []
    raw = env.headers.get("deadline")
    if raw is not None:
        if isinstance(raw, datetime):
            when = raw
        else:
            text = _text(raw)
            try:
                when = datetime.fromisoformat(text or "")
            except ValueError:
                raise InvalidCommand(
                    "bad_deadline", f"header deadline {quoted(raw)} is not an ISO 8601 time"
                ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        candidates.append(when.timestamp())
    if env.expiration is not None:
        start = env.timestamp if env.timestamp is not None else env.received_at
        candidates.append(start + env.expiration)
    return min(candidates) if candidates else None


def _upload_file(data: dict[str, Any]) -> tuple[UploadFile, dict[str, str]]:
    spec = data.get("file")
    if not isinstance(spec, dict):
        raise InvalidCommand(
            "bad_file", 'an upload needs data.file = {"filename": ..., "content_base64": ...}'
        )
    name, content = spec.get("filename"), spec.get("content_base64")
    if not isinstance(name, str) or not name or not isinstance(content, str):
        raise InvalidCommand("bad_file", "data.file needs filename and content_base64 strings")
    try:
        raw = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidCommand("bad_file", "data.file.content_base64 is not valid base64") from None
    # Both go into the multipart part's headers: a CR/LF there would add headers of its own.
    if _CONTROL.search(name) or len(name.encode()) > MAX_FILENAME_BYTES:
        raise InvalidCommand(
            "bad_file", "data.file.filename has control characters or is over 255 bytes"
        )
    ctype = spec.get("content_type")
    if ctype not in (None, "") and (not isinstance(ctype, str) or not _MIME.fullmatch(ctype)):
        raise InvalidCommand("bad_file", "data.file.content_type is not a MIME type (type/subtype)")
    if not ctype:
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    form: dict[str, str] = {}
    for key, value in data.items():
        if key == "file":
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise InvalidCommand(
                "bad_data", f"upload field {quoted(key)} must be a string or number"
            )
        form[key] = str(value)
    return UploadFile(name, raw, ctype), form


def parse_command(env: Envelope, sources: Collection[str], *, fallback_id: str = "") -> Command:
    """Validate a delivery into a Command, or raise InvalidCommand. `command_id` is the
    message_id, or `fallback_id` for a (retry-safe) command without one."""
    if env.message_id and len(env.message_id.encode()) > MAX_ID_BYTES:
        raise InvalidCommand(
            "bad_message_id", f"message_id is over {MAX_ID_BYTES} bytes (the result keeps a cut id)"
        )
    try:
        body = orjson.loads(env.body)
    except orjson.JSONDecodeError:
        raise InvalidCommand("invalid_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidCommand("not_an_object", "the body must be a JSON object")
    extra = sorted(set(body) - _BODY_KEYS)
    if extra:
        raise InvalidCommand("unexpected_field", f"unexpected top-level fields {quoted(extra)}")
    action = body.get("action")
    if not isinstance(action, str):
        raise InvalidCommand("bad_action", "action must be a string")
    endpoint = lookup(action)
    if endpoint is None:
        raise InvalidCommand("unknown_action", f"{quoted(action)} is not a Simotel API v4 action")
    data = body.get("data", {})
    if not isinstance(data, dict):
        raise InvalidCommand("bad_data", "data must be a JSON object")
    source = resolve_source(env, sources)
    message_id = env.message_id or None
    if not endpoint.retry_safe and message_id is None:
        raise InvalidCommand(
            "missing_message_id", f"{endpoint.path} is not retry-safe: message_id is required"
        )
    upload, form = _upload_file(data) if endpoint.is_upload else (None, {})
    return Command(
        command_id=message_id or fallback_id,
        message_id=message_id,
        endpoint=endpoint,
        source=source,
        data=form if endpoint.is_upload else data,
        file=upload,
        reply_to=env.reply_to or None,
        correlation_id=env.correlation_id,
        deadline=command_deadline(env),
        redelivered=env.redelivered,
    )


def describe_invalid(env: Envelope, sources: Collection[str]) -> tuple[str | None, str | None]:
    """Best-effort (action, source) of a rejected command, for its result. The action is the
    catalog's spelling, or None when it is not in the catalog."""
    action: str | None = None
    try:
        body = orjson.loads(env.body)
        if isinstance(body, dict) and isinstance(body.get("action"), str):
            ep = lookup(body["action"])
            action = ep.path if ep is not None else None
    except orjson.JSONDecodeError:
        pass
    try:
        source: str | None = resolve_source(env, sources)
    except InvalidCommand:
        source = None
    return action, source


def result_key(source: str | None, action: str | None) -> str:
    """Routing key of a result (and of its dead letter): `{source}.{action}`; a command whose
    action is not in the catalog is `{source}.rejected` (`_` for no source)."""
    return command_key(source or "_", action) if action else f"{source or '_'}.rejected"


def is_expired(deadline: float | None, now: float) -> bool:
    return deadline is not None and now >= deadline


# ---------------------------------------------------------------------------------------------
# request and response


def build_request(cmd: Command) -> HttpRequest:
    ep = cmd.endpoint
    return HttpRequest(
        method=ep.method,
        path=ep.path,
        json=None if ep.is_upload else cmd.data,
        file=cmd.file,
        form=cmd.data if ep.is_upload else {},
        slow=ep.lane == "slow",
        download=ep.is_download,
    )


def _truthy(value: Any) -> bool | None:
    """Simotel's 1/0 flags come as ints, strings or booleans; None when it is neither."""
    if value in (1, "1", True):
        return True
    if value in (0, "0", False):
        return False
    return None


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _snippet(body: bytes) -> str:
    return body[:_SNIPPET].decode("utf-8", "replace")


def _agent_failures(data: Any) -> list[str]:
    """The messages of failed agent operations (`data.ok`, `data.Data[].ok`)."""
    failures: list[str] = []
    if not isinstance(data, dict):
        return failures
    if "ok" in data and _truthy(data["ok"]) is not True:
        failures.append(str(data.get("message") or "agent operation failed"))
    items = data.get("Data")
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and "ok" in item and _truthy(item["ok"]) is not True:
                who = item.get("agent", item.get("agents", "?"))
                why = item.get("message") or "failed"
                failures.append(f"{who}@{item.get('queue', '?')}: {why}")
    return failures


def _envelope(endpoint: Endpoint, status: int, doc: Any) -> Outcome:
    """A 2xx JSON answer: `success` 1/0, or the users/add `{status: "success"}` shape."""
    if not isinstance(doc, dict):
        return Outcome("error", status, doc, "Simotel answered with no JSON object", "bad_response")
    message = doc.get("message")
    if "success" in doc:
        flag = _truthy(doc["success"])
        if flag is None:
            return Outcome("error", status, doc, "unreadable success flag", "bad_response")
        if not flag:
            return Outcome("failed", status, doc, str(message or "Simotel said success=0"))
        if endpoint.path in _AGENT_OPS:
            failures = _agent_failures(doc.get("data"))
            if failures:
                return Outcome("failed", status, doc, "; ".join(failures))
        return Outcome("ok", status, doc)
    if "status" in doc:  # pbx/users/add answers {status, message, user_id}
        if doc["status"] == "success":
            return Outcome("ok", status, doc)
        return Outcome("failed", status, doc, str(message or f"status {doc['status']!r}"))
    return Outcome("error", status, doc, "Simotel's answer has no success flag", "bad_response")


def interpret(endpoint: Endpoint, answer: HttpAnswer) -> Outcome:
    """Map Simotel's HTTP answer to an outcome (docs/simotel/api-v4.md §2, §7)."""
    code = answer.status
    ctype = answer.content_type.split(";", 1)[0].strip().lower()
    is_json = ctype == "application/json" or ctype.endswith("+json")
    if 500 <= code <= 599:
        doc = _json(answer.body)
        detail = doc.get("message") if isinstance(doc, dict) else None
        error = f"HTTP {code}: {detail or _snippet(answer.body)}"
        # 501 is Simotel's own "Requested service does not exist": permanent, never retried.
        return Outcome("error", code, doc, error, "http_5xx", retryable=code != 501)
    if 400 <= code <= 499:
        doc = _json(answer.body)
        if isinstance(doc, dict) and doc.get("message"):
            error = f"HTTP {code}: {doc['message']}"
        elif code == 404 and endpoint.is_download:
            error = "HTTP 404: file not found"
        else:
            error = f"HTTP {code}: {_snippet(answer.body)}"
        return Outcome("failed", code, doc, error)
    if not 200 <= code <= 299:
        error = f"unexpected HTTP {code} (check base_url)"
        return Outcome("error", code, None, error, f"http_{code}")
    if endpoint.is_download and not is_json:
        if answer.too_large:
            return Outcome(
                "error", code, None, "the file is larger than api.max_download_bytes", "too_large"
            )
        return Outcome("ok", code, None, file=answer.body, content_type=ctype or None)
    doc = _json(answer.body)
    if doc is None and answer.body.strip() not in (b"null", b""):
        return Outcome("error", code, None, f"not JSON: {_snippet(answer.body)}", "bad_response")
    return _envelope(endpoint, code, doc)


def transport_failure(kind: Literal["timeout", "transport", "client"], detail: str) -> Outcome:
    """No HTTP answer: a timeout or a broken connection (retryable), or a client-side error."""
    return Outcome("error", None, None, f"{kind}: {detail}", kind, retryable=kind != "client")


# ---------------------------------------------------------------------------------------------
# results


def make_result(cmd: Command, outcome: Outcome, attempts: int, duration_ms: int) -> Result:
    return Result(
        command_id=cmd.command_id,
        action=cmd.action,
        source=cmd.source,
        status=outcome.status,
        http_status=outcome.http_status,
        response=outcome.response,
        error=outcome.error,
        attempts=attempts,
        duration_ms=duration_ms,
        reason=outcome.reason,
        file=outcome.file,
        content_type=outcome.content_type,
    )


def make_rejected(cmd: Command, reason: str, detail: str) -> Result:
    """A valid command the worker will not run (e.g. its message_id names another command)."""
    return Result(cmd.command_id, cmd.action, cmd.source, "rejected", error=detail, reason=reason)


def make_unknown(cmd: Command) -> Result:
    """A command that is not retry-safe and may already have been sent: never sent again."""
    return Result(
        cmd.command_id,
        cmd.action,
        cmd.source,
        "unknown",
        error="interrupted while in flight: it may or may not have run, so it is not sent again",
        reason="interrupted",
    )


def make_expired(cmd: Command) -> Result:
    return Result(
        cmd.command_id,
        cmd.action,
        cmd.source,
        "expired",
        error="deadline passed",
        reason="deadline",
    )


UNPUBLISHABLE = "result_unpublishable"


def safe_result(result: Result, why: str) -> Result:
    """What is published instead of a result the broker refuses: the same command, status and
    HTTP status, without its response or file, saying why (reason `result_unpublishable`)."""
    return replace(
        result,
        response=None,
        file=None,
        content_type=None,
        error=wire.cut(f"the result could not be published, its response is left out: {why}", 500),
        reason=UNPUBLISHABLE,
    )


def delivery_count(env: Envelope) -> int:
    """How often the quorum queue delivered this command before: its `x-delivery-count` header
    (absent or 0 on the first delivery, then 1, 2, ... after each return, whether a nack with
    requeue or a channel that closed with the command unacknowledged)."""
    value = env.headers.get("x-delivery-count")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def is_last_delivery(env: Envelope, limit: int) -> bool:
    """True when the queue will not deliver this command again: RabbitMQ (3.10+) dead-letters
    a returned message whose count, after the return, exceeds `x-delivery-limit`, so a delivery
    whose count already equals the limit is the last one (with limit 5: counts 0..5, six)."""
    return delivery_count(env) >= limit


def make_delivery_limit(
    command_id: str,
    action: str | None,
    source: str | None,
    *,
    deliveries: int,
    may_have_run: bool,
) -> Result:
    """The result of a command on its last allowed delivery that would otherwise be handed back
    once more: `unknown` when it is not retry-safe and may already have reached Simotel, else
    `error`; reason `delivery_limit` either way."""
    if may_have_run:
        status: Status = "unknown"
        error = (
            f"delivered {deliveries} times without finishing, and it may or may not have run: "
            "not handed back again (amqp.commands_delivery_limit)"
        )
    else:
        status = "error"
        error = (
            f"delivered {deliveries} times without finishing: not handed back again "
            "(amqp.commands_delivery_limit)"
        )
    return Result(command_id, action, source, status, error=error, reason="delivery_limit")


def copied_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """A command's own headers, to copy into its dead letter: all of them when they are small
    (MAX_COPIED_HEADERS bytes as JSON), else none and `headers_dropped: true` (but a valid
    `traceparent` all the same: the trace goes on)."""
    try:
        size = len(orjson.dumps(dict(headers), default=repr))
    except (TypeError, orjson.JSONEncodeError):
        size = MAX_COPIED_HEADERS + 1
    if size <= MAX_COPIED_HEADERS:
        return dict(headers)
    return {"headers_dropped": True, **trace_headers(headers)}


def trace_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The W3C trace context a command carries (`traceparent`, when valid), to carry on to its
    result, reply and dead letter; empty when there is none."""
    trace = wire.traceparent(headers.get(wire.TRACEPARENT))
    return {} if trace is None else {wire.TRACEPARENT: trace}


def needs_dead_letter(status: Status) -> bool:
    """Every command that does not end `ok` or `failed` also goes to the dead-letter exchange."""
    return status not in ("ok", "failed")


def result_message(
    result: Result, command_headers: Mapping[str, Any] | None = None
) -> tuple[bytes, str, dict[str, Any]]:
    """(body, content_type, headers) of a result message. A download's bytes are the body and
    the JSON fields go in headers (None left out, `response` as JSON text). The command's
    trace context (from `command_headers`) is carried."""
    headers: dict[str, Any] = {
        "command_id": result.command_id,
        "status": result.status,
        "source": result.source,
        "action": result.action,
        **trace_headers(command_headers or {}),
    }
    if result.file is not None:
        for key, value in result.fields().items():
            if key == "response":
                value = orjson.dumps(value).decode() if value is not None else None
            if isinstance(value, str):
                value = wire.cut(value, MAX_HEADER_TEXT)
            headers[key] = value
        headers["content_length"] = len(result.file)
        body, ctype = result.file, result.content_type or "application/octet-stream"
    else:
        body, ctype = orjson.dumps(result.fields()), "application/json"
    return body, ctype, {k: v for k, v in headers.items() if v is not None}


def parse_result(body: bytes, content_type: str | None, headers: Mapping[str, Any]) -> Result:
    """The inverse of `result_message`, for `send` and tests."""
    ctype = (content_type or "").split(";", 1)[0]
    if ctype == "application/json" and "content_length" not in headers:
        d = orjson.loads(body)
        file = None
    else:
        d = {k: _text(v) if isinstance(v, bytes) else v for k, v in headers.items()}
        d["response"] = orjson.loads(d["response"]) if d.get("response") else None
        file = body
    status = d["status"]
    if status not in STATUSES:
        raise ValueError(f"result status {status!r}")
    return Result(
        command_id=d.get("command_id") or "",
        action=d.get("action"),
        source=d.get("source"),
        status=status,
        http_status=d.get("http_status"),
        response=d.get("response"),
        error=d.get("error"),
        attempts=int(d.get("attempts") or 0),
        duration_ms=int(d.get("duration_ms") or 0),
        file=file,
        content_type=content_type if file is not None else None,
    )
