"""docs/asyncapi.yaml agrees with the code: topology, result body, statuses, event headers and
properties, dead-letter headers, and the fixtures its examples are taken from. No broker needed."""

from __future__ import annotations

import json
import os
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge import cdr, topology, wire
from bridge.commands import STATUSES, Envelope, Result, needs_dead_letter, result_message
from bridge.config import COMPONENTS, AmqpSettings, HistorySettings, SourceSettings
from bridge.reconcile import recovered_event
from bridge.replay import REPLAYED_HEADER, replayed
from bridge.settle import dead_letter
from bridge.translate import KNOWN_EVENTS, Payload, build_event
from tests.helpers.node_tools import node_modules

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.yaml"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@cache
def _load() -> dict[str, Any]:
    doc = yaml.safe_load(DOC_PATH.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


@pytest.fixture
def doc() -> dict[str, Any]:
    return _load()


def resolve(doc: dict[str, Any], node: Any) -> Any:
    """Follow local `$ref`s until a node that is not a reference."""
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        node = doc
        for part in ref[2:].split("/"):
            node = node[part]
    return node


def message(doc: dict[str, Any], name: str) -> dict[str, Any]:
    msg: dict[str, Any] = doc["components"]["messages"][name]
    return msg


def schema(doc: dict[str, Any], msg: dict[str, Any], key: str) -> dict[str, Any]:
    node: dict[str, Any] = resolve(doc, msg[key])
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_document_shape_and_every_ref_resolves(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"].startswith("3.")
    refs = _refs(doc)
    assert refs
    for ref in refs:
        assert resolve(doc, {"$ref": ref}) is not None
    for name, op in doc["operations"].items():
        channel = op["channel"]["$ref"]
        for m in op.get("messages", []):
            assert m["$ref"].startswith(channel + "/messages/"), name


# A source that reconciles, named as the document's parameter: its queue and bindings come out
# as `simotel.reconcile.{source}` and `{source}.Cdr`, as the document writes them.
RECONCILING = {
    "{source}": SourceSettings.model_validate(
        {
            "webhook": {"username": "u", "password": "p"},
            "api": {
                "base_url": "http://simotel.invalid/api/v4/",
                "username": "u",
                "password": "p",
                "api_key": "k",
            },
            "reconcile": {"enabled": True},
        }
    )
}


def test_topology_names_and_types(doc: dict[str, Any]) -> None:
    # The defaults (history on), and a source with reconciliation on.
    topo = topology.build(AmqpSettings(), HistorySettings(), sources=RECONCILING)
    assert topology.reconcile_queue_name("{source}") in {q.name for q in topo.queues}
    exchanges: dict[str, str] = {}
    queues: dict[str, dict[str, Any]] = {}
    for channel in doc["channels"].values():
        amqp = channel["bindings"]["amqp"]
        if amqp["is"] == "queue":
            q = amqp["queue"]
            assert q["durable"] is True
            queues[q["name"]] = channel
        elif amqp["exchange"]["type"] != "default":
            ex = amqp["exchange"]
            assert ex["durable"] is True
            assert exchanges.setdefault(ex["name"], ex["type"]) == ex["type"]
    assert exchanges == {e.name: e.type.value for e in topo.exchanges}
    assert set(queues) == {q.name for q in topo.queues}
    for q in topo.queues:
        assert queues[q.name].get("x-amqp-arguments", {}) == q.arguments, q.name
        bound = [
            {"exchange": b.exchange, "routing_key": b.routing_key}
            for b in topo.bindings
            if b.queue == q.name
        ]
        assert queues[q.name]["x-amqp-bindings"] == bound, q.name
    for e in topo.exchanges:
        declared = [
            c.get("x-amqp-arguments", {})
            for c in doc["channels"].values()
            if c["bindings"]["amqp"].get("exchange", {}).get("name") == e.name
        ]
        assert e.arguments in declared, e.name


def test_routing_key_parameters(doc: dict[str, Any]) -> None:
    channels = doc["channels"]
    assert channels["events"]["address"] == wire.event_key("{source}", "{EventName}")
    assert channels["componentRequests"]["address"] == "{source}.{Component}.{app_name}"
    assert channels["results"]["address"] == wire.command_key("{source}", "{action}")
    params = doc["components"]["parameters"]
    assert tuple(params["EventName"]["examples"]) == KNOWN_EVENTS
    assert tuple(params["Component"]["enum"]) == COMPONENTS
    assert "call.originate.act" in params["action"]["examples"]
    assert topology.sanitise("Extension API") in params["app_name"]["examples"]


def test_result_fields_and_statuses(doc: dict[str, Any]) -> None:
    keys = list(Result("id", "call/originate/act", "simotel", "ok").fields())
    payload = schema(doc, message(doc, "Result"), "payload")
    assert list(payload["properties"]) == keys
    assert payload["required"] == keys
    status = resolve(doc, payload["properties"]["status"])
    assert tuple(status["enum"]) == STATUSES
    # The JSON body of a result is exactly these keys.
    body, ctype, _ = result_message(Result("id", "call/originate/act", "simotel", "failed"))
    assert list(json.loads(body)) == keys
    assert ctype == "application/json"


def test_result_headers(doc: dict[str, Any]) -> None:
    plain = Result("id", "pbx/users/search", "simotel", "ok", http_status=200, attempts=1)
    _, _, headers = result_message(plain)
    described = schema(doc, message(doc, "Result"), "headers")
    assert set(headers) == set(described["properties"])
    assert set(described["required"]) <= set(headers)
    # A download with every optional field set shows every header that can appear.
    download = Result(
        "id",
        "reports/audio/download",
        "simotel",
        "ok",
        http_status=200,
        response={"note": "x"},
        error="x",
        attempts=1,
        duration_ms=5,
        file=b"RIFF",
        content_type="audio/wav",
    )
    body, ctype, headers = result_message(download)
    assert (body, ctype) == (b"RIFF", "audio/wav")
    described = schema(doc, message(doc, "DownloadResult"), "headers")
    assert set(headers) == set(described["properties"])
    assert set(described["required"]) <= set(headers)


def test_event_headers_and_properties(doc: dict[str, Any]) -> None:
    with_call = build_event(
        "simotel.events",
        "simotel",
        "Cdr",
        Payload({"event_name": "Cdr", "unique_id": "1.2"}, "json"),
    )
    without = build_event(
        "simotel.events", "simotel", "Ping", Payload({"event_name": "Ping"}, "json")
    )
    for name in ("Cdr", "NewState", "IncomingCall", "Survey", "Event"):
        msg = message(doc, name)
        headers = schema(doc, msg, "headers")
        assert list(headers["properties"]) == list(with_call.headers), name
        assert headers["required"] == list(without.headers), name
        props = schema(doc, msg, "x-amqp-properties")
        sent = with_call.to_message()
        assert props["properties"]["content_type"]["const"] == sent.content_type
        assert props["properties"]["delivery_mode"]["const"] == sent.delivery_mode.value
        assert props["properties"]["app_id"]["const"] == sent.app_id
        assert set(props["required"]) == {
            "content_type",
            "delivery_mode",
            "message_id",
            "type",
            "app_id",
            "timestamp",
        }
        assert sent.type == with_call.event


def _recovered(feed: cdr.Feed) -> Any:
    from tests.test_cdr import CDR_RECORD, QUEUE_RECORD

    item = cdr.recover(feed, CDR_RECORD if feed == "cdr" else QUEUE_RECORD)
    return recovered_event("simotel.events", "simotel", item, 1_700_000_000.0)


def _properties(doc: dict[str, Any], node: dict[str, Any]) -> set[str]:
    """Every property a payload schema names, through `allOf` and `$ref`s."""
    node = resolve(doc, node)
    names = set(node.get("properties", {}))
    for part in node.get("allOf", []):
        names |= _properties(doc, part)
    return names


def _required(doc: dict[str, Any], node: dict[str, Any]) -> set[str]:
    node = resolve(doc, node)
    names = set(node.get("required", []))
    for part in node.get("allOf", []):
        names |= _required(doc, part)
    return names


@pytest.mark.parametrize(
    ("feed", "name"), [("cdr", "ReconciledCdr"), ("queue", "ReconciledCdrQueue")]
)
def test_reconciled_event_headers_properties_and_body(
    doc: dict[str, Any], feed: cdr.Feed, name: str
) -> None:
    import re

    event = _recovered(feed)
    msg = message(doc, name)
    assert msg["bindings"]["amqp"]["messageType"] == event.event == cdr.EVENTS[feed]
    headers = schema(doc, msg, "headers")
    # Exactly the headers sent, every one of them always (a recovered event always has a call).
    assert list(headers["properties"]) == list(event.headers)
    assert headers["required"] == list(event.headers)
    assert headers["properties"]["origin"]["const"] == event.headers["origin"] == "reconciled"
    assert event.event in headers["properties"]["event"]["enum"]
    # A webhook's event has no `origin`: the plain events' headers do not name it.
    assert "origin" not in schema(doc, message(doc, "Cdr"), "headers")["properties"]
    props = schema(doc, msg, "x-amqp-properties")
    sent = event.to_message()
    assert props["properties"]["content_type"]["const"] == sent.content_type
    assert props["properties"]["delivery_mode"]["const"] == sent.delivery_mode.value
    assert props["properties"]["app_id"]["const"] == sent.app_id
    assert sent.type in props["properties"]["type"]["enum"]
    assert re.fullmatch(props["properties"]["message_id"]["pattern"], sent.message_id or "")
    assert set(props["required"]) == set(
        schema(doc, message(doc, "Cdr"), "x-amqp-properties")["required"]
    )
    body = json.loads(sent.body)
    assert cdr.RAW_KEY in body and cdr.RAW_KEY in _required(doc, msg["payload"])
    assert set(body) <= _properties(doc, msg["payload"]), set(body) - _properties(
        doc, msg["payload"]
    )
    assert _required(doc, msg["payload"]) <= set(body)
    assert (
        body["event_name"]
        == resolve(doc, msg["payload"])["allOf"][1]["properties"]["event_name"]["const"]
    )
    # Both are on the events exchange and in the reconciler's seen queue.
    for channel in ("events", "reconcileQueue"):
        assert doc["channels"][channel]["messages"][name] == {
            "$ref": f"#/components/messages/{name}"
        }


class _Stored:
    """An event as read back from the history stream (the attributes `replayed` reads)."""

    def __init__(self, event: Any) -> None:
        sent = event.to_message()
        self.body = sent.body
        self.headers = {**event.headers, "x-stream-offset": 7}
        attrs = (
            "content_type",
            "content_encoding",
            "delivery_mode",
            "priority",
            "correlation_id",
            "reply_to",
            "message_id",
            "timestamp",
            "type",
            "app_id",
        )
        for attr in attrs:
            setattr(self, attr, getattr(sent, attr))


def test_replayed_event_headers(doc: dict[str, Any]) -> None:
    headers = schema(doc, message(doc, "ReplayedEvent"), "headers")
    assert headers["properties"][REPLAYED_HEADER]["const"] is True
    # The fullest: a recovered event replayed (every header that can appear, in order).
    again = replayed(_Stored(_recovered("cdr")))  # type: ignore[arg-type]
    assert list(headers["properties"]) == list(again.headers)
    assert again.headers[REPLAYED_HEADER] is True
    # The leanest: a webhook event without a call id; the required headers are exactly its own.
    ping = build_event("simotel.events", "simotel", "Ping", Payload({"event_name": "Ping"}, "json"))
    lean = replayed(_Stored(ping))  # type: ignore[arg-type]
    assert headers["required"] == list(lean.headers)
    assert lean.message_id == ping.message_id and lean.type == ping.event


def test_dead_letter_headers(doc: dict[str, Any]) -> None:
    env = Envelope(body=b"{}", message_id="m1", headers={"deadline": "2025-01-01T00:00:00"})
    result = Result(
        "m1", "call/originate/act", "simotel", "expired", error="deadline passed", reason="deadline"
    )
    sent = dead_letter(env, result)
    described = schema(doc, message(doc, "DeadCommand"), "headers")
    added = set(sent.headers) - set(env.headers)
    assert added == set(described["properties"])
    assert set(described["required"]) <= added
    dead_statuses = [s for s in STATUSES if needs_dead_letter(s)]
    assert described["properties"]["status"]["enum"] == dead_statuses
    props = schema(doc, message(doc, "DeadCommand"), "x-amqp-properties")["properties"]
    assert props["type"]["const"] == sent.type
    assert props["delivery_mode"]["const"] == sent.delivery_mode.value


@pytest.mark.parametrize("name", ["Cdr", "NewState", "IncomingCall", "Survey"])
def test_event_examples_are_the_fixtures(doc: dict[str, Any], name: str) -> None:
    fixture = json.loads((FIXTURES / f"event-{name}.json").read_text(encoding="utf-8"))
    (example,) = message(doc, name)["examples"]
    assert example["payload"] == fixture
    event = build_event("simotel.events", "simotel", name, Payload(fixture, "json"))
    assert set(example["headers"]) == set(event.headers)
    assert example["headers"]["call_id"] == event.call_id


@pytest.mark.parametrize("component", COMPONENTS)
def test_component_answer_examples_are_the_fixtures(doc: dict[str, Any], component: str) -> None:
    fixture = json.loads(
        (FIXTURES / f"component-{component}-response.json").read_text(encoding="utf-8")
    )
    msg = message(doc, f"{component}Answer")
    assert fixture in [e["payload"] for e in msg["examples"]]
    answer = resolve(doc, msg["payload"]["oneOf"][0])
    assert set(answer["required"]) == set(fixture)


def test_official_parser_finds_no_error() -> None:
    """The official AsyncAPI parser (@asyncapi/parser from npm, as the AsyncAPI tools use it)
    reads the document with no error (warnings and hints are allowed)."""
    modules = node_modules()
    script = Path(__file__).resolve().parent / "node-tools" / "asyncapi-check.cjs"
    done = subprocess.run(
        ["node", str(script), str(DOC_PATH)],
        env={**os.environ, "NODE_PATH": str(modules)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    diagnostics = json.loads(done.stdout)
    errors = [d for d in diagnostics if d["severity"] == 0]
    assert errors == [], errors
