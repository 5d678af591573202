"""One budget for everything that reaches the wire: the limits of AMQP 0-9-1 as the bridge uses
them, and the functions that keep input inside them. Pure, no I/O.

Why it matters. A routing key, `message_id`, `correlation_id`, `type`, `app_id` or a header name
is a *shortstr*: 255 bytes of UTF-8 at most (aiormq refuses a longer one before sending). Header
values have no such limit, but every property and header travels in one content-header frame,
and a frame larger than the negotiated `frame_max` (131072 bytes by default on RabbitMQ) makes the
broker close the WHOLE CONNECTION, cutting every other request that shares it. So every value
that comes from input and reaches a property or a header goes through this module:

    shortstr(value, suffix)   an id or a key word, cut to fit 255 bytes with its suffix; a cut
                              value ends with a hash of the whole, so distinct inputs stay
                              distinct and the same input always gives the same result
    key_word(word)            a routing-key word taken from input (`app_name`): sanitised and cut
                              the same way by the bridge and by the responders that bind to it
    bound_headers(headers)    header values cut to HEADER_VALUE_MAX bytes (ANSWER_HEADER_MAX for
                              `answer`); the names of cut values are listed in `truncated`
    check(routing_key, props) the last line before a publish: raises WireError if the routing
                              key or the whole content header is over the budget
    for_log(value)            a value from input cut for a log line

A value is always cut at a UTF-8 character boundary, never in the middle of a character.

It is also the one place for the wire *vocabulary* the bridge and the client library
(`bridge.client`) share, so that the two can never drift apart (docs/contract.md §3, §4):

    COMPONENTS, Component       the dialplan components, in Simotel's spelling
    EVENTS_EXCHANGE ...         the default exchange and stream names
    sanitise, event_key,        the routing keys: `{source}.{Event}`,
    component_key, command_key  `{source}.{Component}.{app_name}`, `{source}.{action with .}`
    event_headers               the headers every event carries (source, event, received_at,
                                call_id)
    REPLY_TO, ERROR_TYPE        the reply queue and the type of a responder's failure reply

    APP_ID, json_message        the properties fixed for every body published
    TRACEPARENT, traceparent,   W3C trace context: a valid incoming `traceparent` is carried to
    new_traceparent             everything it causes; a webhook without one gets a new one

No I/O: the standard library, aio-pika's message type, pamqp (to measure a frame) and
bridge.errors only.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, get_args

import aio_pika
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from bridge.errors import WireError

SHORTSTR_MAX = 255
# One header value taken from input (app_name, call_id, ...). Generous for anything Simotel
# sends; a few of them stay far below the frame budget.
HEADER_VALUE_MAX = 1024
# The `answer` header of component events: the JSON sent to Simotel (a long SmartApi script).
ANSWER_HEADER_MAX = 8192
# The whole content-header frame (properties and headers). RabbitMQ's frame_max is 131072 by
# default (the AMQP minimum is 4096, only reached if a broker is configured so): a quarter of
# the default leaves room for the frame's own overhead and for anything added later.
FRAME_BUDGET = 32 * 1024
# A routing-key word from input: the source (at most 32), the component and the dots leave
# more than enough room under 255 bytes.
KEY_WORD_MAX = 128
# The header that lists the names of the values that were cut.
TRUNCATED = "truncated"

_HASH_CHARS = 16
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")

__all__ = ["WireError"]  # re-exported: callers catch it from here


def utf8_len(value: str) -> int:
    return len(value.encode("utf-8", "replace"))


def fit(value: str, limit: int) -> tuple[str, bool]:
    """`value` cut to at most `limit` bytes of UTF-8, at a character boundary, and whether it
    was changed. Characters that cannot be encoded (lone surrogates) count as changed and are
    replaced by `?`."""
    data = value.encode("utf-8", "replace")
    if len(data) <= limit:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return data.decode("utf-8"), True
        return value, False
    return data[:limit].decode("utf-8", "ignore"), True


def cut(value: str, limit: int) -> str:
    """`value` cut to at most `limit` bytes of UTF-8, at a character boundary (`fit` without
    the flag)."""
    return fit(value, limit)[0]


# A value from input written to a log line: enough to recognise it.
LOG_VALUE_MAX = 256


def for_log(value: object, limit: int = LOG_VALUE_MAX) -> object:
    """A value from input as it may appear in a log line: text cut to `limit` bytes (with a
    note of the full length); other values unchanged."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if not isinstance(value, str):
        value = repr(value)
    text, cut = fit(value, limit)
    return f"{text}...({len(value)} chars)" if cut else text


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:_HASH_CHARS]


def shortstr(value: str, suffix: str = "", *, limit: int = SHORTSTR_MAX, sep: str = "~") -> str:
    """`value + suffix` as a shortstr. Unchanged when it fits; otherwise `value` is cut and
    ends with `sep` and 16 hex characters of its SHA-256, so that two different long values
    never share a result and the same value always gets the same one (ids stay usable for
    de-duplication). E.g. a dead letter's id: `shortstr(message_id, ":dead")`.
    `suffix` is ours and must fit in `limit` with room for the hash."""
    room = limit - utf8_len(suffix)
    if room < _HASH_CHARS + len(sep):
        raise ValueError(f"the suffix {suffix!r} leaves no room under {limit} bytes")
    text, cut = fit(value, room)
    if not cut:
        return text + suffix
    head, _ = fit(value, room - _HASH_CHARS - len(sep))
    return f"{head}{sep}{_digest(value)}{suffix}"


def sanitise(word: str) -> str:
    """Restrict a name taken from a request to `[A-Za-z0-9_]` (anything else becomes `_`), so it
    can never add a level or a wildcard to a routing key. Empty becomes `_`."""
    return _UNSAFE.sub("_", word) or "_"


def key_word(word: str, limit: int = KEY_WORD_MAX) -> str:
    """A routing-key word taken from input: restricted to `[A-Za-z0-9_]` (so it can never add
    a level or a wildcard; empty becomes `_`) and at most `limit` characters, a longer one
    ending with `_` and a hash of the whole. The bridge publishes with it and the responders
    bind with it, so both always agree."""
    clean = sanitise(word)
    if len(clean) <= limit:
        return clean
    return shortstr(clean, limit=limit, sep="_")


def bound_headers(
    headers: Mapping[str, Any], limits: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """The headers with every text value cut to its limit (`limits[name]`, else
    HEADER_VALUE_MAX bytes) and every name to a shortstr. If anything was cut, the header
    `truncated` lists the names, so a consumer knows the full value is in the body."""
    out: dict[str, Any] = {}
    cut: list[str] = []
    for name, value in headers.items():
        key, key_cut = fit(name, SHORTSTR_MAX)
        if isinstance(value, str):
            value, value_cut = fit(value, (limits or {}).get(name, HEADER_VALUE_MAX))
            if value_cut:
                cut.append(key)
        if key_cut and key not in cut:
            cut.append(key)
        out[key] = value
    if cut:
        out[TRUNCATED] = cut
    return out


def header_frame_size(properties: Basic.Properties, body_size: int = 0) -> int:
    """The size in bytes of the content-header frame these properties make (the frame's
    header and end octet included)."""
    return len(ContentHeader(0, body_size, properties).marshal()) + 8


def _estimate(value: Any) -> int:
    """An upper bound of the encoded size of one field-table value (no encoding done)."""
    if isinstance(value, str | bytes):
        return 5 + (utf8_len(value) if isinstance(value, str) else len(value))
    if isinstance(value, Mapping):
        return 5 + sum(1 + utf8_len(str(k)) + _estimate(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return 5 + sum(_estimate(v) for v in value)
    return 9 + (len(str(value)) if not isinstance(value, bool | int | float) else 0)


def check(routing_key: str, properties: Basic.Properties) -> None:
    """Raise WireError unless a message with these can be published safely. Cheap for the
    usual message (an upper bound of the size is computed first); only a message near the
    budget is encoded to measure it exactly."""
    if utf8_len(routing_key) > SHORTSTR_MAX:
        raise WireError(f"the routing key is over {SHORTSTR_MAX} bytes")
    for name in ("message_id", "correlation_id", "message_type", "app_id", "reply_to", "user_id"):
        value = getattr(properties, name, None)
        if isinstance(value, str) and utf8_len(value) > SHORTSTR_MAX:
            raise WireError(f"the property {name} is over {SHORTSTR_MAX} bytes")
    for key in properties.headers or {}:
        if utf8_len(key) > SHORTSTR_MAX:
            raise WireError(f"a header name is over {SHORTSTR_MAX} bytes")
    if 14 * 256 + _estimate(properties.headers or {}) <= FRAME_BUDGET:
        return
    try:
        size = header_frame_size(properties)
    except (ValueError, TypeError, UnicodeError) as exc:
        raise WireError(f"the properties cannot be encoded: {type(exc).__name__}") from None
    if size > FRAME_BUDGET:
        raise WireError(f"the properties take {size} bytes, over the budget of {FRAME_BUDGET}")


# --- the vocabulary ---------------------------------------------------------------------------

Component = Literal["SmartApi", "ExtenApi", "TrunkApi", "IvrApi"]
COMPONENTS: tuple[Component, ...] = get_args(Component)

# The `app_id` of every message the bridge and the client library publish.
APP_ID = "simotel-bridge"

# The default names (`amqp.exchanges` in the configuration may change the exchanges').
EVENTS_EXCHANGE = "simotel.events"
COMPONENTS_EXCHANGE = "simotel.components"
COMMANDS_EXCHANGE = "simotel.commands"
RESULTS_EXCHANGE = "simotel.results"
DEAD_EXCHANGE = "simotel.dead"
HISTORY_STREAM = "simotel.history"

# RabbitMQ's direct reply-to: where the bridge takes component answers.
REPLY_TO = "amq.rabbitmq.reply-to"
# The message type of a responder's reply that says "I failed": the fallback is taken at once.
ERROR_TYPE = "error"

# Header names every event carries (docs/contract.md §4).
SOURCE = "source"
EVENT = "event"
RECEIVED_AT = "received_at"
CALL_ID = "call_id"


# The component request headers (docs/contract.md §4), beside the event headers above.
COMPONENT = "component"
APP_NAME = "app_name"
DEADLINE = "deadline"

# W3C trace context (https://www.w3.org/TR/trace-context/): the header, on every message.
TRACEPARENT = "traceparent"
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def traceparent(value: object) -> str | None:
    """`value` if it is a valid version-00 `traceparent` (lower-case hex, a trace id and a
    parent id that are not all zeros), else None: a malformed one is dropped, never carried."""
    if not isinstance(value, str) or len(value) != 55:
        return None
    m = _TRACEPARENT.fullmatch(value)
    if m is None or m.group(1) != "00":
        return None
    if m.group(2) == "0" * 32 or m.group(3) == "0" * 16:
        return None
    return value


def new_traceparent() -> str:
    """A new trace: random trace and parent ids, flag `sampled` (01), so that a consumer whose
    sampler follows its parent records what the bridge started."""
    ids = os.urandom(24).hex()  # one system call for both ids (the ingress hot path)
    return f"00-{ids[:32]}-{ids[32:]}-01"


def event_key(source: str, event: str) -> str:
    """The routing key of an event: `{source}.{EventName}`."""
    return f"{source}.{event}"


def component_key(source: str, component: str, app_name: str | None) -> str:
    """`app_name` becomes one routing-key word (`key_word`: sanitised, at most 128 characters, a
    longer one cut and ended with a hash of the whole). The bridge publishes and the responders
    bind with this same function, so they always agree."""
    return f"{source}.{component}.{key_word(app_name or '')}"


def command_key(source: str, action: str) -> str:
    """The routing key of a command (and its result): `{source}.{action, / replaced by .}`."""
    return f"{source}.{action.replace('/', '.')}"


def received_at(when: float) -> str:
    """A receive time (epoch seconds) as the `received_at` header writes it."""
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds")


def event_headers(
    source: str, event: str, received: float, call_id: str | None, trace: str | None = None
) -> dict[str, Any]:
    """The headers every event carries; `call_id` only when there is one, `traceparent` when
    `trace` is given. Not yet bounded: callers add their own and pass the whole through
    `bound_headers`."""
    headers: dict[str, Any] = {SOURCE: source, EVENT: event, RECEIVED_AT: received_at(received)}
    if call_id is not None:
        headers[CALL_ID] = call_id
    if trace is not None:
        headers[TRACEPARENT] = trace
    return headers


def component_request_headers(
    source: str,
    component: str,
    app_name: str,
    deadline: datetime,
    call_id: str | None,
    trace: str | None = None,
) -> dict[str, Any]:
    """The headers of a component request (the responder reads them back), bounded."""
    headers: dict[str, Any] = {
        SOURCE: source,
        COMPONENT: component,
        APP_NAME: app_name,
        DEADLINE: deadline.isoformat(timespec="milliseconds"),
    }
    if call_id:
        headers[CALL_ID] = call_id
    if trace is not None:
        headers[TRACEPARENT] = trace
    return bound_headers(headers)


def json_message(
    body: bytes,
    *,
    message_id: str,
    type: str | None = None,
    headers: dict[str, Any] | None = None,
    timestamp: float | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    expiration_ms: int | None = None,
    content_type: str = "application/json",
    persistent: bool = True,
) -> aio_pika.Message:
    """A message with the properties the contract fixes for every body we publish."""
    return aio_pika.Message(
        body,
        content_type=content_type,
        delivery_mode=(
            aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        ),
        message_id=message_id,
        type=type,
        app_id=APP_ID,
        headers=headers or {},
        timestamp=timestamp,
        correlation_id=correlation_id,
        reply_to=reply_to,
        expiration=(expiration_ms / 1000) if expiration_ms is not None else None,
    )
