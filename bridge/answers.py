"""The pure part of the dialplan components (SmartApi, ExtenApi, TrunkApi, IvrApi): what an
answer must look like, which fallback applies, how a responder's reply is judged, and what a
request and its audit event carry. No I/O here; `bridge.components` is the aio-pika adapter that
publishes the request and waits for the reply.

Simotel reads only a few keys of an answer, and puts some of them into the dialplan: every
answer is checked and re-rendered (`validate_answer`) before it is sent, whatever a responder or
the configuration says.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from bridge import wire
from bridge.client.answers import DIALPLAN_UNSAFE as DIALPLAN_UNSAFE  # the rules: client side
from bridge.client.answers import AnswerFields as AnswerFields
from bridge.client.answers import validate_answer as validate_answer
from bridge.config import ComponentSettings, Settings
from bridge.errors import InvalidAnswer as InvalidAnswer  # defined in bridge.errors
from bridge.translate import OutgoingEvent, call_id, checked
from bridge.wire import COMPONENTS as COMPONENTS  # defined in bridge.wire
from bridge.wire import ERROR_TYPE as ERROR_TYPE
from bridge.wire import Component as Component
from bridge.wire import event_key, sanitise

ComponentOutcome = Literal[
    "answered",
    "fallback-no-route",
    "fallback-timeout",
    "fallback-invalid",
    "fallback-unavailable",
    "fallback-overload",
]
# Older names, kept importable for one release.
Outcome = ComponentOutcome
Answer = AnswerFields

# Used when nothing is configured. `{"ok": "0"}` is the official packages' explicit failure:
# SmartApi documents that a failed or incorrect reply leaves through output `e`, and ExtenApi /
# TrunkApi leave through `F`. Configure a real answer (an operator extension, an IVR case) for
# anything that must not fail.
DEFAULT_FALLBACK: AnswerFields = {"ok": "0"}
# Replies larger than this are refused before they are parsed. The largest valid answer (a
# SmartApi script of 64 commands) is about 20 KB.
DEFAULT_MAX_ANSWER_BYTES = 65536


def resolve_fallback(cs: ComponentSettings, component: str, app_name: str) -> Answer:
    """The most specific configured fallback: `Component.app_name` (as sent, then sanitised),
    then `Component`, then DEFAULT_FALLBACK. Configured fallbacks are checked at start-up."""
    for key in (f"{component}.{app_name}", f"{component}.{sanitise(app_name)}", component):
        if key in cs.fallbacks:
            return validate_answer(component, cs.fallbacks[key])
    return dict(DEFAULT_FALLBACK)


def deadline_s(cs: ComponentSettings, component: str) -> float:
    return cs.deadlines_ms.get(component, cs.deadline_ms) / 1000


def fallback_problems(settings: Settings) -> list[tuple[str, str]]:
    """Every configured fallback that is not a valid answer, as (config key, problem)."""
    problems = []
    for source, ss in settings.sources.items():
        for key, answer in ss.components.fallbacks.items():
            try:
                validate_answer(key.split(".", 1)[0], answer)
            except InvalidAnswer as exc:
                problems.append((f"sources.{source}.components.fallbacks.{key}", str(exc)))
    return problems


def decide(
    component: str,
    reply_type: str | None,
    body: bytes,
    max_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
) -> tuple[Outcome, Answer | None, str]:
    """Turn a responder's reply into (outcome, answer or None for the fallback, reason). A
    reply over `max_bytes` is refused before anything is parsed."""
    if len(body) > max_bytes:
        return "fallback-invalid", None, f"the answer is over {max_bytes} bytes"
    if reply_type == ERROR_TYPE:
        return "fallback-invalid", None, "responder error: " + body[:200].decode(errors="replace")
    try:
        return "answered", validate_answer(component, orjson.loads(body)), ""
    except orjson.JSONDecodeError:
        return "fallback-invalid", None, "the answer is not JSON"
    except InvalidAnswer as exc:
        return "fallback-invalid", None, str(exc)


def event_name(component: str) -> str:
    """Event name under which a component request is also published to the events exchange
    (routing key `{source}.Component{Name}`, e.g. `simotel.ComponentSmartApi`)."""
    return f"Component{component}"


def component_event(
    exchange: str,
    source: str,
    component: str,
    fields: dict[str, Any],
    message_id: str,
    outcome: ComponentOutcome,
    answer: AnswerFields,
    now: float | None = None,
    *,
    trace: str | None = None,
) -> OutgoingEvent:
    """A component request as an event (publish_as_event): the fields as Simotel sent them,
    the event headers of docs/contract.md §4, plus `component`, `app_name`, `outcome` and
    `answer`."""
    received = time.time() if now is None else now
    name = event_name(component)
    cid = call_id(fields)
    headers = {
        **wire.event_headers(source, name, received, cid, trace),
        "component": component,
        "app_name": str(fields.get("app_name") or ""),
        "outcome": outcome,
        "answer": orjson.dumps(answer).decode(),
    }
    # The body keeps every field as sent; a header over its budget is cut and listed in
    # `truncated`, so the event can always be published (and never blocks the spool).
    return checked(
        OutgoingEvent(
            exchange=exchange,
            routing_key=event_key(source, name),
            body=orjson.dumps(fields),
            message_id=message_id,
            event=name,
            source=source,
            call_id=cid,
            timestamp=received,
            headers=wire.bound_headers(headers, {"answer": wire.ANSWER_HEADER_MAX}),
        )
    )


def request_headers(
    source: str,
    component: str,
    app_name: str,
    fields: dict[str, Any],
    left_ms: int,
    trace: str | None = None,
) -> dict[str, Any]:
    """The headers of a component request: who asks, the deadline its answer must meet, and
    the trace it belongs to (the responder reads them back with the same names)."""
    deadline = datetime.fromtimestamp(time.time() + left_ms / 1000, UTC)
    return wire.component_request_headers(
        source, component, app_name, deadline, call_id(fields), trace
    )
