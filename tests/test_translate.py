"""The pure core of the ingress: payload forms, event names, call ids, routing keys, headers."""

from __future__ import annotations

from datetime import datetime

import orjson
import pytest

from bridge import translate
from bridge.errors import WebhookError


def test_json_body_is_kept_byte_for_byte() -> None:
    body = b'{"event_name": "Cdr",  "billsec": 9, "unique_id": "1610778618.378"}'
    payload = translate.parse_payload("application/json", body, "ignored=1")
    assert payload.form == "json"
    assert payload.fields == {"event_name": "Cdr", "billsec": 9, "unique_id": "1610778618.378"}
    event = translate.build_event("simotel.events", "simotel", "Cdr", payload, now=0.0)
    assert event.body == body


def test_json_without_content_type_is_recognised() -> None:
    payload = translate.parse_payload("", b' {"event_name": "Ping"}', "")
    assert payload.form == "json"


def test_form_body_values_are_strings_and_repeats_kept() -> None:
    payload = translate.parse_payload(
        "application/x-www-form-urlencoded; charset=utf-8",
        b"event_name=NewState&exten=991&state=&tag=a&tag=b",
        "",
    )
    assert payload.form == "form"
    assert payload.fields == {
        "event_name": "NewState",
        "exten": "991",
        "state": "",
        "tag": ["a", "b"],
    }


def test_query_string_used_when_body_empty() -> None:
    payload = translate.parse_payload("", b"", "event_name=NewState&exten=991&state=Unavailable")
    assert payload.form == "query"
    assert payload.fields["exten"] == "991"
    event = translate.build_event("x", "simotel", "NewState", payload, now=0.0)
    assert orjson.loads(event.body) == {
        "event_name": "NewState",
        "exten": "991",
        "state": "Unavailable",
    }


@pytest.mark.parametrize(
    ("ctype", "body", "query", "reason"),
    [
        ("application/json", b"{not json", "", "invalid_json"),
        ("application/json", b"[1, 2]", "", "invalid_json"),
        ("application/json", b"{}", "", "empty_payload"),
        ("", b"", "", "empty_payload"),
        ("", b"   ", "", "empty_payload"),
        ("application/x-www-form-urlencoded", b"\xff\xfe=1", "", "invalid_form"),
        ("application/x-www-form-urlencoded", b"novalue", "", "invalid_form"),
    ],
)
def test_unreadable_payloads_are_400(ctype: str, body: bytes, query: str, reason: str) -> None:
    with pytest.raises(WebhookError) as info:
        translate.parse_payload(ctype, body, query)
    assert info.value.status == 400
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("fields", "path", "expected"),
    [
        ({"event_name": "Cdr"}, None, "Cdr"),
        ({"event_name": "CDR"}, None, "Cdr"),
        ({"event_name": "newstate"}, None, "NewState"),
        ({"event": "Survey"}, None, "Survey"),
        ({"event_name": "ReservedCallInFront", "event": "ReservedCallInFront"}, None,
         "ReservedCallInFront"),
        ({"campaign_id": "x"}, "autodialerreport", "AutoDialerReport"),
        ({"event_name": "Cdr"}, "cdr", "Cdr"),
        ({"event_name": "Brand New.Event*#"}, None, "Brand_New_Event__"),
        ({"event_name": "  Ping "}, None, "Ping"),
    ],
)  # fmt: skip
def test_event_names(fields: dict[str, str], path: str | None, expected: str) -> None:
    assert translate.event_name(fields, path) == expected


@pytest.mark.parametrize("fields", [{"exten": "1"}, {"event_name": ""}, {"event_name": 5}])
def test_no_event_name_is_400(fields: dict[str, object]) -> None:
    with pytest.raises(WebhookError) as info:
        translate.event_name(fields, None)
    assert (info.value.status, info.value.reason) == (400, "no_event_name")


def test_unknown_names_cannot_add_routing_levels_or_wildcards() -> None:
    name = translate.canonical_event("a.b#c*d e/f")
    assert name == "a_b_c_d_e_f"
    assert translate.canonical_event("") == "_"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"unique_id": "1610778618.378"}, "1610778618.378"),
        ({"cuid": "1.2"}, "1.2"),
        ({"unique_id": "1.1", "cuid": "2.2"}, "1.1"),
        ({"unique_id": "", "cuid": "2.2"}, "2.2"),
        ({"unique_id": 1610778618.5}, "1610778618.5"),
        ({"unique_id": None}, None),
        ({"unique_id": True}, None),
        ({}, None),
    ],
)
def test_call_id(fields: dict[str, object], expected: str | None) -> None:
    assert translate.call_id(fields) == expected


def test_build_event_properties_and_headers() -> None:
    payload = translate.Payload(fields={"event_name": "Cdr", "cuid": "9.9"}, form="query")
    event = translate.build_event("simotel.events", "tehran", "Cdr", payload, now=1700000000.25)
    assert event.routing_key == "tehran.Cdr"
    assert event.headers["source"] == "tehran"
    assert event.headers["event"] == "Cdr"
    assert event.headers["call_id"] == "9.9"
    received = datetime.fromisoformat(event.headers["received_at"])
    assert received.utcoffset() is not None and received.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert received.timestamp() == 1700000000.25
    message = event.to_message()
    assert message.delivery_mode == 2
    assert message.type == "Cdr"
    assert message.app_id == "simotel-bridge"
    assert message.content_type == "application/json"
    assert message.message_id == event.message_id


def test_message_ids_are_unique() -> None:
    payload = translate.Payload(fields={"event_name": "Ping"}, form="query")
    ids = {translate.build_event("x", "s", "Ping", payload).message_id for _ in range(1000)}
    assert len(ids) == 1000


def test_components_matched_case_insensitively() -> None:
    assert translate.canonical_component("smartapi") == "SmartApi"
    assert translate.canonical_component("EXTENAPI") == "ExtenApi"
    assert translate.canonical_component("Other") is None


def test_direct_properties_match_the_message() -> None:
    """The ingress publishes `properties()` directly; it must say what `to_message()` says."""
    payload = translate.Payload(fields={"event_name": "Cdr", "unique_id": "1.1"}, form="json")
    event = translate.build_event("x", "s", "Cdr", payload, now=1700000000.7)
    direct, via_message = event.properties(), event.to_message().properties
    for name in (
        "content_type",
        "delivery_mode",
        "message_id",
        "message_type",
        "app_id",
        "headers",
    ):
        assert getattr(direct, name) == getattr(via_message, name), name
    assert direct.timestamp is not None and via_message.timestamp is not None
    assert int(direct.timestamp.timestamp()) == int(via_message.timestamp.timestamp())


def test_names_and_call_ids_that_could_not_travel_are_kept_out() -> None:
    """A routing key is 255 bytes at most and headers must fit one frame: an over-long event
    name is refused (400) before anything could be spooled; an over-long call id is left out
    of the headers (it stays in the body)."""
    with pytest.raises(WebhookError) as info:
        translate.event_name({}, "X" * (translate.MAX_EVENT_NAME + 1))
    assert (info.value.status, info.value.reason) == (400, "event_name_too_long")
    assert translate.event_name({}, "X" * translate.MAX_EVENT_NAME) == "X" * 200
    assert translate.call_id({"unique_id": "1" * 129, "cuid": "2.2"}) == "2.2"
    assert translate.call_id({"unique_id": "1" * 300_000}) is None
    assert translate.call_id({"unique_id": "1" * 128}) == "1" * 128


def test_a_flood_of_fields_is_refused_before_it_is_read() -> None:
    flood = "a=1&" * translate.MAX_FIELDS + "event_name=Cdr"
    for body, query in ((flood.encode(), ""), (b"", flood)):
        with pytest.raises(WebhookError) as exc:
            translate.parse_payload("application/x-www-form-urlencoded", body, query)
        assert (exc.value.status, exc.value.reason) == (400, "too_many_fields")
    ok = "a=1&" * (translate.MAX_FIELDS - 2) + "event_name=Cdr"
    assert len(translate.parse_payload("", b"", ok).fields["a"]) == translate.MAX_FIELDS - 2
