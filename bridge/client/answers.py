"""A dialplan component's answer, checked before it is sent to Simotel: pure, no I/O.

The bridge checks every responder's answer with `validate_answer` (bridge.components), and the
client library's typed answers (bridge.client.responder) check themselves with it when they are
built, so a handler fails where a bad value is made and both sides apply the same rules.
Imports only the standard library and the bridge's pure modules (smartapi, errors).
"""

from __future__ import annotations

from typing import Any

from bridge.client import smartapi
from bridge.errors import InvalidAnswer

# An answer as it is sent to Simotel: string values, only the keys Simotel reads.
AnswerFields = dict[str, str]


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


def validate_answer(component: str, answer: object) -> AnswerFields:
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
