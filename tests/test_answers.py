"""Component answers, fallbacks and deadlines (`bridge.answers`): the pure core, no broker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.answers import (
    COMPONENTS,
    DEFAULT_FALLBACK,
    InvalidAnswer,
    component_event,
    deadline_s,
    decide,
    fallback_problems,
    resolve_fallback,
    validate_answer,
)
from bridge.config import ComponentSettings
from bridge.responder import (
    Answer,
    ExtenApiAnswer,
    Fail,
    IvrApiAnswer,
    SmartApiAnswer,
    TrunkApiAnswer,
    binding_key,
    encode_answer,
)
from bridge.smartapi import Exit, PlayAnnouncement
from tests.helpers.env import FIXTURES, make_settings


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


@pytest.mark.parametrize("component", COMPONENTS)
def test_the_documented_answers_are_valid_as_they_are(component: str) -> None:
    answer = fixture(f"component-{component}-response.json")
    assert validate_answer(component, answer) == answer


def test_step2_smartapi_answer_is_rendered_canonically() -> None:
    answer = fixture("component-SmartApi-response-step2.json")
    assert validate_answer("SmartApi", answer) == {"ok": "1", "commands": "Exit('go-b')"}


def test_numbers_become_strings_and_unknown_keys_are_dropped() -> None:
    answer = {"ok": 1, "trunk": "T1", "extension": 9151412541, "call_limit": 300, "x": "y"}
    assert validate_answer("TrunkApi", answer) == {
        "ok": "1",
        "trunk": "T1",
        "extension": "9151412541",
        "call_limit": "300",
    }


@pytest.mark.parametrize("component", COMPONENTS)
def test_explicit_failure_is_valid_everywhere(component: str) -> None:
    assert validate_answer(component, {"ok": 0}) == {"ok": "0"}
    assert validate_answer(component, {"ok": "0", "extension": "1"}) == {"ok": "0"}


@pytest.mark.parametrize(
    ("component", "answer", "problem"),
    [
        ("ExtenApi", [], "JSON object"),
        ("ExtenApi", {"extension": "120"}, '"ok"'),
        ("ExtenApi", {"ok": True, "extension": "120"}, '"ok"'),
        ("ExtenApi", {"ok": "yes", "extension": "120"}, '"ok"'),
        ("ExtenApi", {"ok": "1"}, "'extension' must be a string"),
        ("ExtenApi", {"ok": "1", "exten": "120"}, "'extension'"),
        ("ExtenApi", {"ok": "1", "extension": "120&SIP/x"}, "'extension' must match"),
        ("ExtenApi", {"ok": "1", "extension": ""}, "'extension' must match"),
        ("TrunkApi", {"ok": "1", "trunk": "T", "extension": "1"}, "'call_limit'"),
        ("TrunkApi", {"ok": "1", "trunk": "T", "extension": "1", "call_limit": "-5"}, "seconds"),
        ("TrunkApi", {"ok": "1", "trunk": "T", "extension": "1", "call_limit": "٣٠"}, "seconds"),
        ("TrunkApi", {"ok": "1", "trunk": "a,b", "extension": "1", "call_limit": "3"}, "','"),
        ("IvrApi", {"ok": "1"}, "'case'"),
        ("IvrApi", {"ok": "1", "case": "x\n"}, "white space"),
        ("SmartApi", {"ok": "1"}, "'commands'"),
        ("SmartApi", {"ok": "1", "commands": "PlayAnnouncement('a')"}, "Exit"),
        ("SmartApi", {"ok": "1", "commands": "Exit('a');Hangup()"}, "unknown command"),
        ("Voicemail", {"ok": "1"}, "unknown component"),
    ],
)
def test_invalid_answers_are_refused(component: str, answer: Any, problem: str) -> None:
    with pytest.raises(InvalidAnswer, match=problem.replace("(", r"\(")):
        validate_answer(component, answer)


def test_decide_maps_replies_to_outcomes() -> None:
    good = orjson.dumps({"ok": "1", "case": "3"})
    assert decide("IvrApi", "answer", good) == ("answered", {"ok": "1", "case": "3"}, "")
    assert decide("IvrApi", None, b"not json")[:2] == ("fallback-invalid", None)
    assert decide("IvrApi", None, b'{"ok":"1"}')[:2] == ("fallback-invalid", None)
    outcome, answer, reason = decide("IvrApi", "error", b"KeyError: 'x'")
    assert (outcome, answer) == ("fallback-invalid", None)
    assert "KeyError" in reason


def test_fallbacks_resolve_from_most_specific_to_default() -> None:
    cs = ComponentSettings(
        fallbacks={
            "ExtenApi": {"ok": "1", "extension": "100"},
            "ExtenApi.Extension API": {"ok": "1", "extension": "200"},
            "ExtenApi.vip_route": {"ok": "1", "extension": "300"},
        }
    )
    assert resolve_fallback(cs, "ExtenApi", "Extension API") == {"ok": "1", "extension": "200"}
    assert resolve_fallback(cs, "ExtenApi", "vip route") == {"ok": "1", "extension": "300"}
    assert resolve_fallback(cs, "ExtenApi", "other") == {"ok": "1", "extension": "100"}
    assert resolve_fallback(cs, "IvrApi", "other") == DEFAULT_FALLBACK
    assert resolve_fallback(cs, "IvrApi", "other") is not DEFAULT_FALLBACK


def test_deadlines_per_component() -> None:
    cs = ComponentSettings(deadline_ms=700, deadlines_ms={"SmartApi": 500})
    assert deadline_s(cs, "SmartApi") == 0.5
    assert deadline_s(cs, "IvrApi") == 0.7
    assert deadline_s(ComponentSettings(), "IvrApi") == 0.8


def test_invalid_configured_fallbacks_are_reported_with_their_key(tmp_path: Path) -> None:
    settings = make_settings(
        "amqp://guest:guest@127.0.0.1/",
        tmp_path,
        sources={
            "simotel": {
                "webhook": {"allow_unauthenticated": True},
                "components": {
                    "fallbacks": {
                        "SmartApi": {"ok": "1", "commands": "Exit('e')"},
                        "SmartApi.s1": {"ok": "1", "commands": "Exit(e)"},
                        "IvrApi": {"ok": "1"},
                    }
                },
            }
        },
    )
    problems = fallback_problems(settings)
    assert [key for key, _ in problems] == [
        "sources.simotel.components.fallbacks.SmartApi.s1",
        "sources.simotel.components.fallbacks.IvrApi",
    ]


def test_component_event_keeps_the_request_and_adds_the_outcome() -> None:
    fields = fixture("component-IvrApi-request.json")
    event = component_event(
        "simotel.events", "tehran", "IvrApi", fields, "m1", "answered", {"ok": "1", "case": "3"},
        now=0.0,
    )  # fmt: skip
    assert event.routing_key == "tehran.ComponentIvrApi"
    assert orjson.loads(event.body) == fields
    assert event.call_id == "1610778618.378"
    assert event.headers["outcome"] == "answered"
    assert json.loads(event.headers["answer"]) == {"ok": "1", "case": "3"}
    assert event.headers["app_name"] == "IvrApi"
    assert event.to_message().message_id == "m1"


# --- the responder's typed answers ------------------------------------------------------------


def test_typed_answers_encode_to_the_documented_json() -> None:
    cases: list[tuple[str, Answer]] = [
        ("ExtenApi", ExtenApiAnswer("120")),
        ("TrunkApi", TrunkApiAnswer("NasimTrunk", "09151412541", 300)),
        ("IvrApi", IvrApiAnswer("3")),
    ]
    for component, typed in cases:
        assert orjson.loads(encode_answer(component, typed)) == fixture(
            f"component-{component}-response.json"
        )
    smart = SmartApiAnswer([PlayAnnouncement("welcome-file"), Exit("go-s2")])
    assert orjson.loads(encode_answer("SmartApi", smart)) == {
        "ok": "1",
        "commands": "PlayAnnouncement('welcome-file');Exit('go-s2')",
    }
    assert orjson.loads(encode_answer("IvrApi", Fail())) == {"ok": "0"}


def test_a_typed_answer_for_another_component_or_invalid_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot answer"):
        encode_answer("IvrApi", ExtenApiAnswer("120"))
    with pytest.raises(InvalidAnswer):  # refused by the builder itself
        ExtenApiAnswer("120,SIP/evil")


@pytest.mark.parametrize("bad", ["a&b", "${SHELL}", "x|y", "{x}", "a$b", "a\uff07b", "a\u061bb"])
def test_trunk_and_case_values_refuse_dialplan_characters(bad: str) -> None:
    with pytest.raises(InvalidAnswer):
        validate_answer("TrunkApi", {"ok": "1", "trunk": bad, "extension": "1", "call_limit": "9"})
    with pytest.raises(InvalidAnswer):
        validate_answer("IvrApi", {"ok": "1", "case": bad})
    with pytest.raises(InvalidAnswer):
        TrunkApiAnswer(bad, "100", 60)
    with pytest.raises(InvalidAnswer):
        IvrApiAnswer(bad)
    assert validate_answer("IvrApi", {"ok": "1", "case": "sales-2"})["case"] == "sales-2"


@pytest.mark.parametrize("limit", ["\u0661\u0662", "\u00b2", "1e3", True])
def test_call_limit_is_ascii_digits(limit: object) -> None:
    answer = {"ok": "1", "trunk": "t", "extension": "1", "call_limit": limit}
    with pytest.raises(InvalidAnswer):
        validate_answer("TrunkApi", answer)
    with pytest.raises(InvalidAnswer):
        TrunkApiAnswer("t", "1", limit)  # type: ignore[arg-type]


def test_a_reply_over_the_cap_is_refused_before_parsing() -> None:
    big = b'{"ok": "1", "case": "' + b"x" * 70_000 + b'"}'
    assert decide("IvrApi", None, big)[0:2] == ("fallback-invalid", None)
    assert "over 65536 bytes" in decide("IvrApi", None, big)[2]
    assert decide("IvrApi", None, b"\xff" * 70_000, max_bytes=1024)[2].startswith(
        "the answer is over"
    )
    assert decide("IvrApi", None, b'{"ok": "1", "case": "7"}')[0] == "answered"


def test_binding_keys() -> None:
    assert binding_key("*", "ExtenApi", "Extension API") == "*.ExtenApi.Extension_API"
    assert binding_key("tehran", "SmartApi", "*") == "tehran.SmartApi.*"
    with pytest.raises(ValueError, match="component"):
        binding_key("*", "Smartapi", "x")
