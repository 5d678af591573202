"""Turning a webhook into a publish: pure functions over plain values, no I/O.

Simotel delivers the same event in four forms (docs/simotel/webhooks.md §2.2): a JSON body
(G4/Rest4 POST), a query string (GET), a form body (v2/v3 POST) or a query string on a POST with
an empty body.
`parse_payload` reads all of them into one dict; `event_name` finds the name where each Simotel
version puts it; `build_event` fixes the routing key, properties and headers of docs/contract.md §4.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import aio_pika
import orjson
from aiormq import spec

from bridge import wire
from bridge.amqp import APP_ID, json_message
from bridge.errors import WebhookError, WireError
from bridge.wire import COMPONENTS as COMPONENTS  # re-exported: defined in bridge.wire
from bridge.wire import event_headers, event_key, sanitise

# Every event name Simotel documents (docs/simotel/webhooks.md §3), in the catalog's spelling.
# Names are matched case-insensitively (`CDR`, `cdr` -> `Cdr`); unknown names pass through,
# sanitised.
KNOWN_EVENTS: tuple[str, ...] = (
    "NewState",
    "IncomingCall",
    "OutgoingCall",
    "Transfer",
    "Cdr",
    "CdrQueue",
    "ExtenAdded",
    "ExtenRemoved",
    "IncomingFax",
    "OutgoingFax",
    "VoiceMail",
    "VoiceMailEmail",
    "Survey",
    "TrunkNewState",
    "TrunkAdded",
    "TrunkRemoved",
    "AutoDialerReport",
    "ReservedCallInFront",
    "Ping",
)
_BY_LOWER = {name.lower(): name for name in KNOWN_EVENTS}

_COMPONENTS_BY_LOWER = {name.lower(): name for name in COMPONENTS}

# Keys that carry the event name, in order of preference (Survey sends `event`).
_NAME_KEYS = ("event_name", "event")
# Keys that carry the call id: the examples say `unique_id`, the current tables `cuid`.
_CALL_ID_KEYS = ("unique_id", "cuid")


def canonical_event(name: str) -> str:
    """`CDR` -> `Cdr`; an unknown name keeps its spelling, restricted to `[A-Za-z0-9_]`."""
    return _BY_LOWER.get(name.lower()) or sanitise(name)


def canonical_component(name: str) -> str | None:
    return _COMPONENTS_BY_LOWER.get(name.lower())


def _pairs_to_dict(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Form/query pairs to a dict of strings; a key sent more than once keeps every value, in
    order, as a list."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            prev = out[key]
            if isinstance(prev, list):
                prev.append(value)
            else:
                out[key] = [prev, value]
        else:
            out[key] = value
    return out


@dataclass(frozen=True, slots=True)
class Payload:
    """The fields Simotel sent, and how: `form` is json, form or query. For JSON, `raw` is the
    body exactly as received, so it can be published unchanged."""

    fields: dict[str, Any]
    form: str
    raw: bytes | None = None


# Fields of one form or query string. Simotel sends a few dozen; reading a flood of tens of
# thousands would hold the event loop (for every other webhook) for a second or more.
MAX_FIELDS = 1000


def _pairs(text: str) -> list[tuple[str, str]]:
    """Form/query pairs, refusing a flood before reading it (WebhookError 400)."""
    if text.count("&") >= MAX_FIELDS:
        raise WebhookError(400, "too_many_fields", f"{MAX_FIELDS} fields at most")
    return parse_qsl(text, keep_blank_values=True, strict_parsing=True)


def parse_payload(content_type: str, body: bytes, query_string: str) -> Payload:
    """Read a webhook's fields from its body (JSON or form) or, when the body is empty, from
    its query string. Raises WebhookError(400) for anything unreadable, empty or a flood of
    more than MAX_FIELDS fields."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    stripped = body.strip()
    if stripped:
        if ctype == "application/x-www-form-urlencoded" or (
            ctype != "application/json" and not ctype.endswith("+json") and stripped[:1] != b"{"
        ):
            try:
                text = body.decode("utf-8")
                pairs = _pairs(text)
            except (UnicodeDecodeError, ValueError) as exc:
                raise WebhookError(400, "invalid_form", "the form body cannot be read") from exc
            fields = _pairs_to_dict(pairs)
            form = "form"
            raw = None
        else:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise WebhookError(
                    400, "invalid_json", f"the body is not valid JSON: {exc}"
                ) from exc
            if not isinstance(parsed, dict):
                raise WebhookError(400, "invalid_json", "the JSON body must be an object")
            fields, form, raw = parsed, "json", body
    elif query_string:
        try:
            pairs = _pairs(query_string)
        except ValueError as exc:
            raise WebhookError(400, "invalid_query", "the query string cannot be read") from exc
        fields, form, raw = _pairs_to_dict(pairs), "query", None
    else:
        raise WebhookError(400, "empty_payload", "the request carries no fields")
    if not fields:
        raise WebhookError(400, "empty_payload", "the request carries no fields")
    return Payload(fields=fields, form=form, raw=raw)


# Routing keys are at most 255 bytes (source names at most 32), and AMQP headers must fit one
# frame: longer names and call ids are not Simotel's, and would block the spool's head. The wire
# budget (bridge.wire) bounds every header and checks every event before it is accepted.
MAX_EVENT_NAME = 200
MAX_CALL_ID = 128


def event_name(fields: dict[str, Any], path_name: str | None) -> str:
    """Rest mode: the name in the path. G mode: `event_name`, else `event` (Survey)."""
    name = None
    if path_name:
        name = canonical_event(path_name)
    else:
        for key in _NAME_KEYS:
            value = fields.get(key)
            if isinstance(value, str) and value.strip():
                name = canonical_event(value.strip())
                break
    if name is None:
        raise WebhookError(
            400, "no_event_name", "no event name: send event_name, or use /events/{Name}"
        )
    if len(name) > MAX_EVENT_NAME:
        raise WebhookError(400, "event_name_too_long", f"event names are {MAX_EVENT_NAME} at most")
    return name


def call_id(fields: dict[str, Any]) -> str | None:
    """`unique_id`, else `cuid`, as text; None when absent, empty, or too long to be a call id
    (the value stays in the body either way)."""
    for key in _CALL_ID_KEYS:
        value = fields.get(key)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            text = str(value)
            if text and len(text) <= MAX_CALL_ID:
                return text
    return None


@dataclass(frozen=True, slots=True)
class OutgoingEvent:
    """One accepted event, ready to publish (and, if the broker cannot take it, to spool)."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    event: str
    source: str
    call_id: str | None
    timestamp: float
    headers: dict[str, Any] = field(default_factory=dict)

    def to_message(self) -> aio_pika.Message:
        return json_message(
            self.body,
            message_id=self.message_id,
            type=self.event,
            headers=dict(self.headers),
            timestamp=self.timestamp,
        )

    def properties(self) -> spec.Basic.Properties:
        """The AMQP properties of `to_message()`, built directly (the ingress hot path)."""
        return spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            message_id=self.message_id,
            message_type=self.event,
            app_id=APP_ID,
            headers=dict(self.headers),
            timestamp=datetime.fromtimestamp(int(self.timestamp), UTC),
        )


def build_event(
    exchange: str,
    source: str,
    name: str,
    payload: Payload,
    *,
    now: float | None = None,
    message_id: str | None = None,
    traceparent: object = None,
) -> OutgoingEvent:
    """The publish for one event webhook: routing key `{source}.{EventName}`, the body as sent,
    and the properties and headers of docs/contract.md §4, inside the wire budget (`bridge.wire`):
    raises WebhookError(400) for an event that could not be published. A valid `traceparent`
    (the webhook's W3C trace context header) is carried; without one the event starts a trace."""
    received = time.time() if now is None else now
    cid = call_id(payload.fields)
    trace = wire.traceparent(traceparent) or wire.new_traceparent()
    headers = event_headers(source, name, received, cid, trace)
    body = payload.raw if payload.raw is not None else orjson.dumps(payload.fields)
    return checked(
        OutgoingEvent(
            exchange=exchange,
            routing_key=event_key(source, name),
            body=body,
            message_id=message_id or str(uuid.uuid4()),
            event=name,
            source=source,
            call_id=cid,
            timestamp=received,
            headers=wire.bound_headers(headers),
        )
    )


def checked(event: OutgoingEvent) -> OutgoingEvent:
    """`event` if the broker can take it (bridge.wire); else WebhookError(400), so that an
    event that could never be published is neither answered 200 nor spooled."""
    try:
        wire.check(event.routing_key, event.properties())
    except WireError as exc:
        raise WebhookError(400, "over_wire_budget", str(exc)) from None
    return event
