"""Searching, paging and cursors shared by every search, the report endpoints, and the queue
agent operations (runtime membership, with the nested `ok`/`Data` answers). Pure."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from bridge.simulator import media
from bridge.simulator.replies import DONE, FAILED, Reply, Upload, fail, ok
from bridge.simulator.state import Member, Record, SimState, public

Handler = Callable[[SimState, dict[str, Any], Upload | None], Reply]

ORDERED_PAGE = 20  # records per ordered/id call, as documented


def _truthy(value: Any) -> bool:
    return value in (True, 1, "1", "true", "True", "yes")


def _plain(value: Any) -> str:
    if isinstance(value, Mapping) and "$oid" in value:
        return str(value["$oid"])
    return str(value)


def parse_time(text: Any) -> float | None:
    """`2021-02-19 15:17` (or with seconds, or a date) as UTC epoch seconds; a Jalali date
    (`1399-12-01 15:17`) too, as Simotel reads both; None if unreadable."""
    from bridge.cdr import to_epoch

    return to_epoch(text) if isinstance(text, str) else None


def select(
    records: Iterable[Record], body: Mapping[str, Any], aliases: Mapping[str, str] | None = None
) -> list[Record]:
    """Records matching `conditions` (empty values mean no filter; `alike` means a
    case-insensitive substring, else equality) and `date_range` (Gregorian, UTC, minutes)."""
    aliases = aliases or {}
    conditions = body.get("conditions") or {}
    wanted = {
        aliases.get(k, k): str(v)
        for k, v in (conditions.items() if isinstance(conditions, Mapping) else ())
        if v not in (None, "")
    }
    alike = _truthy(body.get("alike"))
    dr = body.get("date_range") if isinstance(body.get("date_range"), Mapping) else {}
    start = parse_time(dr.get("from")) if dr else None
    end = parse_time(dr.get("to")) if dr else None
    out = []
    for r in records:
        if start is not None and r.get("__ts", 0) < start:
            continue
        if end is not None and r.get("__ts", 0) >= end + 60:
            continue
        if all(_match(r.get(k), v, alike) for k, v in wanted.items()):
            out.append(r)
    return out


def _match(value: Any, wanted: str, alike: bool) -> bool:
    if value is None:
        return False
    have = _plain(value)
    return wanted.lower() in have.lower() if alike else have == wanted


def _sort_key(field: str) -> Callable[[Record], tuple[int, float, str]]:
    def key(r: Record) -> tuple[int, float, str]:
        v = r.get(field)
        if isinstance(v, bool) or not isinstance(v, int | float):
            return (1, 0.0, "" if v is None else _plain(v))
        return (0, float(v), "")

    return key


def page(
    records: list[Record], body: Mapping[str, Any], default_sort: Mapping[str, int]
) -> dict[str, Any]:
    """`{pagination: {start, count, sorting, total}, data}` for a paginated search."""
    p = body.get("pagination") if isinstance(body.get("pagination"), Mapping) else {}
    start = max(int(p.get("start") or 0), 0) if p else 0
    count = int(p.get("count") or 20) if p else 20
    sorting = (p.get("sorting") if p else None) or dict(default_sort)
    ordered = list(records)
    for field, direction in reversed(list(sorting.items())):
        ordered.sort(key=_sort_key(field), reverse=int(direction) < 0)
    chunk = ordered[start : start + count] if count > 0 else ordered[start:]
    return {
        "pagination": {"start": start, "count": count, "sorting": sorting, "total": len(records)},
        "data": chunk,
    }


_REPORT_ALIASES = {"from": "src", "to": "dst", "queue": "qnum", "label": "label"}
_REPORTS: dict[str, tuple[str, str | None, dict[str, int]]] = {
    # service: (table, target, default sort)
    "reports/quick/search": ("cdr", None, {"starttime": -1}),
    "reports/cdr/search": ("cdr", "cdr", {"starttime": -1}),
    "reports/queue/search": ("queue_stat", "queue_stat", {"starttime": -1}),
    "reports/queue_details/search": ("queue_report", "queue", {"start": -1}),
    "reports/agent/search": ("agent", "agent", {"end": -1}),
    "reports/poll/search": ("poll", "poll", {"date": -1}),
    "autodialer/reports/search": ("ad_reports", None, {"date": -1}),
}


def _report(service: str) -> Handler:
    table, target, sort = _REPORTS[service]

    def search(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
        aliases = {} if table in ("agent", "ad_reports") else _REPORT_ALIASES
        found = [public(r) for r in select(state.table(table), body, aliases)]
        data = page(found, body, sort)
        if target is not None:
            data = {
                "pagination": data["pagination"],
                "target": target,
                "useGroupBy": False,
                "data": data["data"],
            }
        return ok(data, DONE)

    return search


def _ordered(table: str) -> Handler:
    def ordered(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
        after = str(body.get("_id") or "")
        rows = sorted(state.table(table), key=lambda r: str(r["_id"]))
        rows = [r for r in rows if str(r["_id"]) > after][:ORDERED_PAGE]
        last = rows[-1]["_id"] if rows else after
        return ok({"last_id": last, "data": [public(r) for r in rows]})

    return ordered


def _quick_info(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
    rows = [public(r) for r in state.table("queue_report") if r.get("cuid") == body["cuid"]]
    return ok(rows, DONE)


def _ad_report_info(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
    cdr = state.find("cdr", body["_id"])
    if cdr is None:
        return fail(FAILED)
    keys = ("dcontext", "amaflags", "channel", "duration", "wait")
    return ok({k: cdr.get(k) for k in keys})


# queue agents

_DONE_MESSAGES = {
    "add": "Added successfully",
    "pause": "Paused successfully",
    "resume": "UnPaused successfully",
    "remove": "Removed successfully",
}


def agent_op(state: SimState, op: str, item: Mapping[str, Any]) -> tuple[int, str]:
    """Apply one agent operation; (ok, message) like Asterisk's answer through Simotel."""
    queue, agent = str(item.get("queue", "")), str(item.get("agent", ""))
    key = (queue, agent)
    member = state.members.get(key)
    if op == "add":
        if state.find_by("queues", "number", queue) is None:
            return 0, "Unable to add interface to queue: No such queue"
        if member is not None:
            return 0, "Unable to add interface: Already there"
        source, penalty = str(item.get("source") or agent), str(item.get("penalty") or "")
        state.members[key] = Member(source, penalty, since=state.clock())
        return 1, _DONE_MESSAGES[op]
    if member is None:
        return (
            0,
            "Unable to remove interface: Not there" if op == "remove" else "Interface not found",
        )
    if op == "remove":
        del state.members[key]
        now = state.clock()
        duration = int(now - member.since)
        state.insert(
            "agent",
            {
                "type": "inout",
                "exten": agent,
                "qnum": queue,
                "start": media.jalali(member.since),
                "end": media.jalali(now),
                "duration": duration,
                "inout": 1,
                "inout_du": duration,
                "duration_hhmmss": media.hhmmss(duration),
            },
        )
    else:
        member.paused = op == "pause"
    return 1, _DONE_MESSAGES[op]


def _agent(op: str) -> Handler:
    def single(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
        done, message = agent_op(state, op, body)
        return ok({"message": message, "ok": done})

    return single


def _batch(op: str) -> Handler:
    def batch(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
        items: list[dict[str, Any]] = []
        for item in body.get("agents") or []:
            done, message = agent_op(state, op, item)
            if op == "add":  # the answer names the agent number `agents`
                items.append(
                    {
                        "agents": item.get("agent"),
                        "source": item.get("source"),
                        "queue": item.get("queue"),
                        "penalty": item.get("penalty", ""),
                        "message": message,
                        "ok": done,
                    }
                )
            else:
                items.append(
                    {
                        "agent": item.get("agent"),
                        "queue": item.get("queue"),
                        "message": message,
                        "ok": done,
                    }
                )
        return ok({"ok": int(all(i["ok"] for i in items)), "Data": items})

    return batch


HANDLERS: dict[str, Handler] = {
    **{service: _report(service) for service in _REPORTS},
    "reports/cdr/ordered/id": _ordered("cdr"),
    "reports/queue/ordered/id": _ordered("queue_stat"),
    "reports/queue_details/ordered/id": _ordered("queue_report"),
    "autodialer/reports/ordered/id": _ordered("ad_reports"),
    "reports/quick/info": _quick_info,
    "autodialer/reports/info": _ad_report_info,
    **{f"pbx/queues/{op}agent": _agent(op) for op in _DONE_MESSAGES},
    **{f"pbx/queues/batch{op}agent": _batch(op) for op in _DONE_MESSAGES},
}
