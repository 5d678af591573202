"""The wire budget (bridge.wire): pure functions, no broker."""

from __future__ import annotations

import pytest
from aiormq import spec

from bridge import topology, wire
from bridge.components import component_event
from bridge.errors import WebhookError
from bridge.responder import binding_key
from bridge.translate import Payload, build_event


def test_fit_cuts_at_a_character_boundary() -> None:
    assert wire.fit("abc", 3) == ("abc", False)
    assert wire.fit("ééé", 5) == ("éé", True)  # 2 bytes each: never half a character
    assert wire.fit("😀x", 3) == ("", True)
    text, cut = wire.fit("a\udcffb", 10)  # a lone surrogate cannot be encoded
    assert cut and text == "a?b"


@pytest.mark.parametrize("value", ["x" * 300, "é" * 200, "id-" + "😀" * 80, "a" * 252])
def test_shortstr_keeps_long_ids_distinct_and_stable(value: str) -> None:
    out = wire.shortstr(value, ":dead")
    assert len(out.encode()) <= 255 and out.endswith(":dead")
    assert wire.shortstr(value, ":dead") == out
    assert wire.shortstr(value + "z", ":dead") != out
    assert wire.shortstr("short", ":dead") == "short:dead"


def test_shortstr_needs_room_for_the_hash() -> None:
    with pytest.raises(ValueError, match="no room"):
        wire.shortstr("x", "s" * 250)


def test_key_word_is_the_same_for_the_bridge_and_the_responders() -> None:
    long = "vip route " * 40
    key = topology.component_key("simotel", "SmartApi", long)
    assert len(key.encode()) <= 255
    assert key == binding_key("simotel", "SmartApi", long)
    assert key != topology.component_key("simotel", "SmartApi", long + "2")
    assert binding_key("*", "SmartApi", long).split(".")[2] == key.split(".")[2]
    assert topology.component_key("s", "ExtenApi", "vip route.1") == "s.ExtenApi.vip_route_1"


def test_bound_headers_cut_and_flag() -> None:
    out = wire.bound_headers({"source": "s", "app_name": "é" * 2000, "n": 3})
    assert out["source"] == "s" and out["n"] == 3
    assert len(out["app_name"].encode()) <= wire.HEADER_VALUE_MAX
    assert out[wire.TRUNCATED] == ["app_name"]
    assert wire.TRUNCATED not in wire.bound_headers({"a": "b"})


def test_check_refuses_what_the_broker_would_refuse() -> None:
    wire.check("a.b", spec.Basic.Properties(headers={"a": "x" * 1000}))
    with pytest.raises(wire.WireError, match="routing key"):
        wire.check("a" * 256, spec.Basic.Properties())
    with pytest.raises(wire.WireError, match="message_id"):
        wire.check("a", spec.Basic.Properties(message_id="m" * 256))
    with pytest.raises(wire.WireError, match="budget"):
        wire.check("a", spec.Basic.Properties(headers={"a": "x" * 200_000}))
    props = spec.Basic.Properties(headers={"a": "x" * 10_000})
    assert 10_000 < wire.header_frame_size(props) < 10_100


def test_component_event_with_a_huge_app_name_fits_the_budget() -> None:
    fields = {"app_name": "a" * 300_000, "unique_id": "1.2"}
    event = component_event("simotel.events", "s", "SmartApi", fields, "m1", "answered", {})
    assert wire.header_frame_size(event.properties()) <= wire.FRAME_BUDGET
    assert event.headers[wire.TRUNCATED] == ["app_name"]
    assert b"a" * 300_000 in event.body


def test_an_event_that_cannot_be_published_is_refused_not_spooled() -> None:
    payload = Payload(fields={"x": "1"}, form="json", raw=b'{"x": "1"}')
    with pytest.raises(WebhookError) as exc:
        build_event("simotel.events", "s", "E" * 300, payload)
    assert exc.value.status == 400
    assert build_event("simotel.events", "s", "E" * 200, payload).routing_key == "s." + "E" * 200


def test_values_from_input_are_cut_for_log_lines() -> None:
    assert wire.for_log("vip") == "vip"
    assert wire.for_log(None) is None and wire.for_log(3) == 3
    long = wire.for_log("a" * 300_000)
    assert isinstance(long, str) and len(long) < 300 and long.endswith("(300000 chars)")
    listed = wire.for_log(["x" * 10_000])
    assert isinstance(listed, str) and len(listed) < 300
