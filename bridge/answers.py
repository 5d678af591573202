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
from typing import Any, Literal, get_args

import orjson

from bridge import smartapi, wire
from bridge.config import ComponentSettings, Settings
from bridge.topology import event_key, sanitise
from bridge.translate import OutgoingEvent, call_id, checked

Component = Literal["SmartApi", "ExtenApi", "TrunkApi", "IvrApi"]
COMPONENTS: tuple[Component, ...] = get_args(Component)
Outcome = Literal[
    "answered",
    "fallback-no-route",
    "fallback-timeout",
    "fallback-invalid",
    "fallback-unavailable",
    "fallback-overload",
]
Answer = dict[str, str]

# Used when nothing is configured. `{"ok": "0"}` is the official packages' explicit failure:
# SmartApi documents that a failed or incorrect reply leaves through output `e`, and ExtenApi /
# TrunkApi leave through `F`. Configure a real answer (an operator extension, an IVR case) for
# anything that must not fail.
DEFAULT_FALLBACK: Answer = {"ok": "0"}
# Message type a responder uses to say "I failed": the fallback is taken at once.
ERROR_TYPE = "error"
# Replies larger than this are refused before they are parsed. The largest valid answer (a
# SmartApi script of 64 commands) is about 20 KB.
DEFAULT_MAX_ANSWER_BYTES = 65536


class InvalidAnswer(ValueError):
    """A responder's answer cannot be sent to Simotel."""


def _text(answer: dict[str, Any], key: str) -> str:
    value = answer.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidAnswer(f"{key!r} must be a string")
    return value


def _dialable(answer: dict[str, Any], key: str) -> str:
    value = _text(answer, key)
    if not smartapi.DIALABLE.fullmatch(value):
        raise InvalidAnswer(f"{key!r} must match {smartapi.DIALABLE.pattern}, got {value!r}")
    return value


# Characters the dialplan gives a meaning to where TrunkApi's trunk and IvrApi's case end up:
# `&` joins dial targets, `${...}` expands a variable or a function, `|` is the old separator.
DIALPLAN_UNSAFE = frozenset("&${}|")


def _safe(answer: dict[str, Any], key: str) -> str:
    """A text value of a TrunkApi / IvrApi answer: SmartApi's text rules (no quotes, separators,
    look-alikes or control characters) and none of DIALPLAN_UNSAFE."""
    try:
        value = smartapi.check_text(_text(answer, key), repr(key))
    except smartapi.SmartApiError as exc:
        raise InvalidAnswer(str(exc)) from None
    bad = DIALPLAN_UNSAFE.intersection(value)
    if bad:
        raise InvalidAnswer(f"{key!r} must not contain {''.join(sorted(bad))!r}")
    return value


def validate_answer(component: str, answer: object) -> Answer:
    """Check an answer against what `component` needs and return it in canonical form: string
    values, only the keys Simotel reads, SmartApi commands re-rendered from the parsed script.
    `{"ok": "0"}` (explicit failure) is valid for every component. Raises InvalidAnswer."""
    if not isinstance(answer, dict):
        raise InvalidAnswer("the answer must be a JSON object")
    ok = answer.get("ok")
    if ok in ("0", 0) and not isinstance(ok, bool):
        return {"ok": "0"}
    if ok not in ("1", 1) or isinstance(ok, bool):
        raise InvalidAnswer('"ok" must be "1" (or "0" for an explicit failure)')
    if component == "ExtenApi":
        return {"ok": "1", "extension": _dialable(answer, "extension")}
    if component == "TrunkApi":
        limit = _text(answer, "call_limit")
        if not limit.isascii() or not limit.isdigit() or len(limit) > 7:
            raise InvalidAnswer(f"'call_limit' must be a number of seconds, got {limit!r}")
        return {
            "ok": "1",
            "trunk": _safe(answer, "trunk"),
            "extension": _dialable(answer, "extension"),
            "call_limit": str(int(limit)),
        }
    if component == "IvrApi":
        return {"ok": "1", "case": _safe(answer, "case")}
    if component == "SmartApi":
        try:
            script = smartapi.build(smartapi.parse(_text(answer, "commands")))
        except smartapi.SmartApiError as exc:
            raise InvalidAnswer(f"'commands': {exc}") from None
        return {"ok": "1", "commands": script}
    raise InvalidAnswer(f"unknown component {component!r}")


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
    outcome: Outcome,
    answer: Answer,
    now: float | None = None,
) -> OutgoingEvent:
    """A component request as an event (publish_as_event): the fields as Simotel sent them,
    the event headers of CONTRACT §4, plus `component`, `app_name`, `outcome` and `answer`."""
    received = time.time() if now is None else now
    name = event_name(component)
    headers = {
        "source": source,
        "event": name,
        "received_at": datetime.fromtimestamp(received, UTC).isoformat(timespec="microseconds"),
        "component": component,
        "app_name": str(fields.get("app_name") or ""),
        "outcome": outcome,
        "answer": orjson.dumps(answer).decode(),
    }
    cid = call_id(fields)
    if cid is not None:
        headers["call_id"] = cid
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
    source: str, component: str, app_name: str, fields: dict[str, Any], left_ms: int
) -> dict[str, Any]:
    """The headers of a component request: who asks, and the deadline its answer must meet."""
    deadline = datetime.fromtimestamp(time.time() + left_ms / 1000, UTC)
    headers: dict[str, Any] = {
        "source": source,
        "component": component,
        "app_name": app_name,
        "deadline": deadline.isoformat(timespec="milliseconds"),
    }
    cid = call_id(fields)
    if cid:
        headers["call_id"] = cid
    return wire.bound_headers(headers)
