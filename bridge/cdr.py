"""Turning a record of Simotel's cursor endpoints into the event its webhook would have been:
pure functions over plain values, no I/O.

    reports/cdr/ordered/id    CDR records          -> a `Cdr` event
    reports/queue/ordered/id  queue_stat records   -> a `CdrQueue` event

Field names and formats are those of the webhooks (docs/simotel/webhooks.md, "Cdr" and "CdrQueue"):
times in the webhook's Gregorian `YYYY-MM-DD HH:MM:SS.ffffff` (UTC), numbers as the webhook types
them (integers in Cdr, strings in CdrQueue). Records carry Jalali date strings (`1402-04-28
19:34:16`), MongoDB extended JSON (`{"$date": {"$numberLong": "..."}}`, `{"$oid": "..."}`) and
Gregorian strings side by side (docs/simotel/api-v4.md §3.4); every form is read. Jalali dates are
converted with `jdatetime`. Clock times without a zone are UTC, as Simotel writes them by default.
The record itself goes, as it came, under `RAW_KEY`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import jdatetime
import orjson

from bridge.errors import RecordError as RecordError  # re-exported: defined in bridge.errors

Feed = Literal["cdr", "queue"]
FEEDS: tuple[Feed, ...] = ("cdr", "queue")

# The cursor endpoint and the event of each feed.
ENDPOINTS: dict[Feed, str] = {
    "cdr": "reports/cdr/ordered/id",
    "queue": "reports/queue/ordered/id",
}
EVENTS: dict[Feed, str] = {"cdr": "Cdr", "queue": "CdrQueue"}

RAW_KEY = "simotel_record"
MAX_ID = 64  # a record `_id` longer than this (ObjectIds are 24) is hashed into message ids
MAX_CALL_ID = 128  # as the ingress: longer is not a call id
MAX_RAW_BYTES = 64 * 1024  # a larger record is not published whole (see `recover`)

_OBJECT_ID = re.compile(r"^[0-9a-fA-F]{24}$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_DATETIME = re.compile(
    r"^\s*(\d{4})-(\d{1,2})-(\d{1,2})(?:[ T](\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?)?"
    r"\s*(Z|[+-]00:?00)?\s*$"
)


def plain(value: Any) -> Any:
    """`{"$oid": "x"}` -> "x"; `{"$date": ...}` -> epoch seconds; `{"$numberLong": "5"}` -> 5;
    anything else unchanged."""
    if isinstance(value, Mapping):
        if "$oid" in value:
            return str(value["$oid"])
        if "$date" in value:
            return to_epoch(value)
        if "$numberLong" in value or "$numberInt" in value:
            raw = value.get("$numberLong", value.get("$numberInt"))
            try:
                return int(str(raw))
            except ValueError:
                return None
    return value


def to_epoch(value: Any) -> float | None:
    """Seconds since the epoch for any time a record carries, or None when unreadable:
    `{"$date": {"$numberLong": ms}}`, `{"$date": ms}`, `{"$date": "ISO"}`, a Jalali or Gregorian
    `YYYY-MM-DD HH:MM[:SS[.ffffff]]` string (UTC), or a number of epoch seconds."""
    if isinstance(value, Mapping) and "$date" in value:
        inner = value["$date"]
        if isinstance(inner, Mapping):
            inner = inner.get("$numberLong", inner.get("$numberInt"))
        if isinstance(inner, bool):
            return None
        if isinstance(inner, int | float):
            return float(inner) / 1000
        if isinstance(inner, str):
            if inner.lstrip("-").isdigit():
                return int(inner) / 1000
            return _parse_text(inner)
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value > 0 else None
    if isinstance(value, str):
        return _parse_text(value)
    return None


def _parse_text(text: str) -> float | None:
    m = _DATETIME.match(text[:64])
    if m is None:
        return None
    y, mo, d = int(m[1]), int(m[2]), int(m[3])
    hh, mm, ss = int(m[4] or 0), int(m[5] or 0), int(m[6] or 0)
    micro = int((m[7] or "0").ljust(6, "0"))
    try:
        if y < 1700:  # Solar Hijri: the current year is about 1405
            g = jdatetime.date(y, mo, d).togregorian()
            y, mo, d = g.year, g.month, g.day
        return datetime(y, mo, d, hh, mm, ss, micro, tzinfo=UTC).timestamp()
    except ValueError:
        return None


def webhook_time(epoch: float | None) -> str:
    """`2021-01-16 06:30:37.471398`, as the webhooks write times; "" when unknown."""
    if epoch is None:
        return ""
    return f"{datetime.fromtimestamp(epoch, UTC):%Y-%m-%d %H:%M:%S.%f}"


def object_id_time(record_id: str) -> float | None:
    """The creation second an ObjectId carries (its first 4 bytes), None for other ids."""
    if _OBJECT_ID.match(record_id):
        return float(int(record_id[:8], 16))
    return None


def record_id(record: Mapping[str, Any]) -> str:
    rid = plain(record.get("_id"))
    if not isinstance(rid, str | int) or isinstance(rid, bool) or str(rid) == "":
        raise RecordError("the record has no _id")
    return str(rid)


def inserted_at(record: Mapping[str, Any]) -> float | None:
    """When Simotel stored the record, as well as the record tells: the latest of its
    ObjectId's second and its `endtime`. A record younger than the grace is left for its
    webhook."""
    times = []
    try:
        t = object_id_time(record_id(record))
        if t is not None:
            times.append(t)
    except RecordError:
        pass
    end = to_epoch(record.get("endtime"))
    if end is not None:
        times.append(end)
    return max(times) if times else None


def message_id(feed: Feed, rid: str) -> str:
    """Deterministic and bounded: the same record always gives the same message id, so a
    record published twice (a crash between the confirm and the cursor) de-duplicates."""
    if not _SAFE_ID.match(rid):
        rid = hashlib.sha256(rid.encode()).hexdigest()[:40]
    return f"reconciled.{feed}.{rid}"


def call_id(record: Mapping[str, Any]) -> str | None:
    """The call id the webhooks carry as `unique_id`: `cuid`, else `uniqueid`, else
    `queue_id` (queue records)."""
    for key in ("cuid", "uniqueid", "unique_id", "queue_id"):
        value = plain(record.get(key))
        if isinstance(value, str | int) and not isinstance(value, bool):
            text = str(value).strip()
            if text and len(text) <= MAX_CALL_ID:
                return text
    return None


def seen_key(event: str, cid: str) -> str:
    """What the state store remembers for "the `event` of call `cid` is on the exchange"."""
    return f"{event}:{cid}"


def _int(value: Any) -> int:
    value = plain(value)
    try:
        return int(float(str(value)))
    except (TypeError, ValueError):
        return 0


def _text(value: Any) -> str:
    value = plain(value)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return ""


def _start(record: Mapping[str, Any]) -> float | None:
    for key in ("starttime", "start"):
        t = to_epoch(record.get(key))
        if t is not None:
            return t
    return None


def _end(record: Mapping[str, Any], start: float | None, duration: int) -> float | None:
    end = to_epoch(record.get("endtime"))
    if end is None and start is not None:
        end = start + duration
    return end


def cdr_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """A CDR record as the fields of a `Cdr` webhook."""
    cid = call_id(record)
    if cid is None:
        raise RecordError("the record has no call id")
    duration = _int(record.get("duration"))
    start = _start(record)
    fields: dict[str, Any] = {
        "event_name": "Cdr",
        "unique_id": cid,
        "cuid": cid,
        "starttime": webhook_time(start),
        "endtime": webhook_time(_end(record, start, duration)),
        "src": _text(record.get("src")),
        "dst": _text(record.get("dst")),
        "type": _text(record.get("type")),
        "disposition": _text(record.get("disposition")),
        "duration": duration,
        "billsec": _int(record.get("billsec")),
        "wait": _int(record.get("wait")),
        "record": _text(record.get("record")),
        "entry_point": _text(record.get("entry_point")),
        "outgoing_point": _text(record.get("outgoing_point")),
    }
    originated = _text(record.get("originated_call_id"))
    if originated:
        fields["originated_call_id"] = originated
    return fields


def queue_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """A queue_stat record as the fields of a `CdrQueue` webhook (numbers as strings, as the
    webhook sends them)."""
    cid = call_id(record)
    if cid is None:
        raise RecordError("the record has no call id")
    duration = _int(record.get("duration"))
    nested = record.get("data") if isinstance(record.get("data"), Mapping) else {}
    assert isinstance(nested, Mapping)
    start = _start(record)
    if start is None:
        start = to_epoch(nested.get("start_time"))

    def when(key: str, nested_key: str) -> str:
        t = to_epoch(record.get(key))
        if t is None:
            t = to_epoch(nested.get(nested_key))
        return webhook_time(t)

    fields: dict[str, Any] = {
        "event_name": "CdrQueue",
        "unique_id": cid,
        "cuid": cid,
        "src": _text(record.get("src")),
        "dst": _text(record.get("dst")),
        "queue": _text(record.get("qnum")),
        "billsec": str(_int(record.get("billsec"))),
        "wait": str(_int(record.get("wait"))),
        "duration": str(duration),
        "agent_wait": str(_int(record.get("agent_wait"))),
        "disposition": _text(record.get("disposition")),
        "hangup": _text(record.get("hangup")),
        "queue_status": _text(record.get("queue_status")),
        "record": _text(record.get("record")),
        "answeredtime": when("answeredtime", "answered_time"),
        "ringtime": when("ringtime", "ring_time"),
        "starttime": webhook_time(start),
        "endtime": webhook_time(_end(record, start, duration)),
    }
    originated = _text(record.get("originated_call_id"))
    if originated:
        fields["originated_call_id"] = originated
    return fields


@dataclass(frozen=True, slots=True)
class Recovered:
    """One record to publish: its event, call id, message id and webhook-shaped fields."""

    feed: Feed
    record_id: str
    event: str
    call_id: str
    message_id: str
    fields: dict[str, Any]


def recover(feed: Feed, record: Mapping[str, Any]) -> Recovered:
    """The event for one record. Raises RecordError for a record that cannot be one.

    The raw record goes under `RAW_KEY`; one larger than MAX_RAW_BYTES (as JSON) is replaced
    there by `{"_id": ..., "truncated": true}`, so hostile or broken data cannot make a message
    grow without bound."""
    rid = record_id(record)
    fields = cdr_fields(record) if feed == "cdr" else queue_fields(record)
    try:
        raw_size = len(orjson.dumps(record))
    except TypeError:
        raw_size = MAX_RAW_BYTES + 1
    fields[RAW_KEY] = dict(record) if raw_size <= MAX_RAW_BYTES else {"_id": rid, "truncated": True}
    return Recovered(
        feed=feed,
        record_id=rid,
        event=EVENTS[feed],
        call_id=fields["unique_id"],
        message_id=message_id(feed, rid),
        fields=fields,
    )
