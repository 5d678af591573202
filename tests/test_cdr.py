"""Cursor records -> webhook-shaped events (bridge.cdr) and the walk's decisions
(bridge.reconcile.plan_page): pure, no I/O."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from bridge import cdr
from bridge.reconcile import initial_cursor, plan_page, recovered_event
from tests.helpers.env import FIXTURES

# A CDR record as reports/cdr/ordered/id returns it (docs/simotel/api-v4.md: the record fields
# seen in the samples; Jalali `start`/`starttime`, Gregorian `answer`, `$date` endtime).
CDR_RECORD: dict[str, Any] = {
    "_id": "5fa2d7e02848da5a1f3c8e11",
    "type": "incoming",
    "cuid": "1610778618.378",
    "clid": '"09121234567"',
    "src": "09121234567",
    "dst": "101",
    "dcontext": "main_routing",
    "start": "1399-10-27 06:30:28",
    "answer": "2021-01-16 06:30:39",
    "duration": 38,
    "billsec": 27,
    "disposition": "ANSWERED",
    "uniqueid": "1610778618.378",
    "entry_point": "SimotelTrunk",
    "outgoing_point": "",
    "originated_call_id": "",
    "route": [{"type": "queue", "name": "902", "duration": 3, "date": {"$date": 1610778628000}}],
    "wait": 11,
    "starttime": "1399-10-27 06:30:28",
    "endtime": {"$date": {"$numberLong": "1610778666000"}},
    "record": "20210116_1610778618.378.mp3",
    "hangup": "caller",
    "ANSWERED": 1,
    "incoming": 1,
    "billsec_hhmmss": "00:00:27",
}

QUEUE_RECORD: dict[str, Any] = {
    "_id": {"$oid": "5ece68552848da53b2bb1665"},
    "duration": 34,
    "wait": 3,
    "agent_wait": 3,
    "billsec": 31,
    "queue_id": "1610782193.391",
    "src": "992",
    "dst": "993",
    "dst_name": "Sara",
    "cuid": "1610782193.391",
    "qnum": "902",
    "starttime": "1399-10-27 07:29:53",
    "endtime": {"$date": {"$numberLong": "1610782228794"}},
    "ringtime": {"$date": {"$numberLong": "1610782193382"}},
    "answeredtime": {"$date": 1610782196819},
    "queue_status": "CONTINUE",
    "disposition": "ANSWERED",
    "hangup": "agent",
    "ANSWERED": 1,
    "v": 0,
}


def test_jalali_and_mongo_times_are_read() -> None:
    # 1399-10-27 is 2021-01-16 (jdatetime); strings without a zone are UTC.
    expected = datetime(2021, 1, 16, 6, 30, 28, tzinfo=UTC).timestamp()
    assert cdr.to_epoch("1399-10-27 06:30:28") == expected
    assert cdr.to_epoch("2021-01-16 06:30:28") == expected
    assert cdr.to_epoch("2021-01-16T06:30:28Z") == expected
    assert cdr.to_epoch({"$date": {"$numberLong": "1610778628000"}}) == expected
    assert cdr.to_epoch({"$date": 1610778628000}) == expected
    assert cdr.to_epoch({"$date": "2021-01-16T06:30:28Z"}) == expected
    assert (
        cdr.to_epoch("1402-04-28 19:34:16")
        == datetime(2023, 7, 19, 19, 34, 16, tzinfo=UTC).timestamp()
    )
    for bad in ("", "yesterday", "1399-13-40 00:00:00", None, {"$date": None}, True, [1]):
        assert cdr.to_epoch(bad) is None
    assert cdr.plain({"$oid": "abc"}) == "abc"
    assert cdr.webhook_time(expected) == "2021-01-16 06:30:28.000000"


def test_cdr_record_becomes_the_cdr_webhook_fields() -> None:
    item = cdr.recover("cdr", CDR_RECORD)
    webhook = json.loads((FIXTURES / "event-Cdr.json").read_text())
    assert item.event == "Cdr" and item.call_id == "1610778618.378"
    f = item.fields
    # The webhook's names, and its types (integers in Cdr).
    assert set(webhook) - {"event_name"} <= set(f)
    assert f["event_name"] == "Cdr"
    assert f["unique_id"] == f["cuid"] == "1610778618.378"
    assert f["starttime"] == "2021-01-16 06:30:28.000000"
    assert f["endtime"] == "2021-01-16 06:31:06.000000"
    assert (f["src"], f["dst"], f["type"], f["disposition"]) == (
        "09121234567",
        "101",
        "incoming",
        "ANSWERED",
    )
    assert (f["duration"], f["billsec"], f["wait"]) == (38, 27, 11)
    assert f["record"] == "20210116_1610778618.378.mp3"
    assert (f["entry_point"], f["outgoing_point"]) == ("SimotelTrunk", "")
    assert "originated_call_id" not in f
    assert f[cdr.RAW_KEY] == CDR_RECORD
    assert item.message_id == "reconciled.cdr.5fa2d7e02848da5a1f3c8e11"


def test_queue_record_becomes_the_cdrqueue_webhook_fields() -> None:
    item = cdr.recover("queue", QUEUE_RECORD)
    webhook = json.loads((FIXTURES / "event-CdrQueue.json").read_text())
    f = item.fields
    assert item.event == "CdrQueue" and item.record_id == "5ece68552848da53b2bb1665"
    assert set(webhook) - {"event_name", "detail"} <= set(f)
    # Numbers as strings, as the CdrQueue webhook sends them.
    assert (f["billsec"], f["wait"], f["duration"], f["agent_wait"]) == ("31", "3", "34", "3")
    assert f["queue"] == "902" and f["hangup"] == "agent" and f["queue_status"] == "CONTINUE"
    assert f["starttime"] == "2021-01-16 07:29:53.000000"
    assert f["endtime"] == "2021-01-16 07:30:28.794000"
    assert f["ringtime"] == "2021-01-16 07:29:53.382000"
    assert f["answeredtime"] == "2021-01-16 07:29:56.819000"


def test_a_record_without_call_id_or_id_is_refused() -> None:
    with pytest.raises(cdr.RecordError):
        cdr.recover("cdr", {**CDR_RECORD, "cuid": "", "uniqueid": ""})
    with pytest.raises(cdr.RecordError):
        cdr.recover("cdr", {k: v for k, v in CDR_RECORD.items() if k != "_id"})


def test_message_ids_are_deterministic_and_bounded() -> None:
    assert cdr.message_id("cdr", "x" * 24) == cdr.message_id("cdr", "x" * 24)
    long = cdr.message_id("cdr", "a/" * 500)
    assert len(long) <= 64 and long.startswith("reconciled.cdr.")
    assert cdr.message_id("cdr", "a") != cdr.message_id("queue", "a")


def test_an_oversized_record_is_not_published_whole() -> None:
    item = cdr.recover("cdr", {**CDR_RECORD, "details": ["x" * 1000] * 100})
    assert item.fields[cdr.RAW_KEY] == {"_id": CDR_RECORD["_id"], "truncated": True}


def test_the_recovered_publish_is_the_ingress_publish_plus_origin() -> None:
    item = cdr.recover("cdr", CDR_RECORD)
    ev = recovered_event("simotel.events", "tehran", item, now=1_700_000_000.0)
    assert ev.routing_key == "tehran.Cdr"
    assert ev.message_id == item.message_id
    assert ev.headers["origin"] == "reconciled"
    assert ev.headers["call_id"] == "1610778618.378"
    assert ev.headers["source"] == "tehran" and ev.headers["event"] == "Cdr"
    assert orjson.loads(ev.body)["unique_id"] == "1610778618.378"
    props = ev.properties()
    assert props.message_type == "Cdr" and props.delivery_mode == 2


def _rec(i: int, at: float, cuid: str | None = None) -> dict[str, Any]:
    rid = f"{int(at):08x}{i:016x}"
    return {**CDR_RECORD, "_id": rid, "cuid": cuid or f"call.{i}", "uniqueid": "", "endtime": None}


def test_plan_stops_at_the_first_record_inside_the_grace() -> None:
    now = 1_700_000_000.0
    records = [_rec(1, now - 500), _rec(2, now - 300), _rec(3, now - 30), _rec(4, now - 400)]
    plan = plan_page("cdr", records, set(), now, grace_s=120, limit=100)
    assert [p.call_id for p in plan.publish] == ["call.1", "call.2"]
    assert plan.cursor == records[1]["_id"] and plan.held
    assert plan.held_age == pytest.approx(30)


def test_plan_skips_seen_calls_and_duplicates_but_moves_past_them() -> None:
    now = 1_700_000_000.0
    records = [_rec(1, now - 500), _rec(2, now - 500, "call.1"), _rec(3, now - 500)]
    plan = plan_page("cdr", records, {"Cdr:call.3"}, now, grace_s=0, limit=100)
    assert [p.call_id for p in plan.publish] == ["call.1"]
    assert plan.skipped == {"seen": 2}
    assert plan.cursor == records[2]["_id"] and not plan.held
    # Seen as a CdrQueue is not seen as a Cdr.
    plan = plan_page("cdr", records[:1], {"CdrQueue:call.1"}, now, grace_s=0, limit=100)
    assert len(plan.publish) == 1


def test_plan_respects_the_per_pass_limit() -> None:
    now = 1_700_000_000.0
    records = [_rec(i, now - 500) for i in range(5)]
    plan = plan_page("cdr", records, set(), now, grace_s=0, limit=2)
    assert len(plan.publish) == 2 and plan.held and plan.cursor == records[1]["_id"]


def test_initial_cursor() -> None:
    assert initial_cursor("beginning", 0) == ""
    assert initial_cursor("5d5e8d6a2848da45d1d94849", 0) == "5d5e8d6a2848da45d1d94849"
    now = initial_cursor("now", 1_700_000_000.5)
    assert len(now) == 24 and now[:8] == f"{1_700_000_000:08x}"
    # ObjectIds of earlier seconds sort before it, later ones after.
    assert f"{1_699_999_999:08x}ffffffffffffffff" < now < f"{1_700_000_000:08x}0000000000000001"
