"""API v4 behaviour of the simulated Simotel: `handle(state, service, body, upload)` turns one
request into a `Reply`, changing `state` like the real server would. Pure: no I/O, no clock
but the state's, no randomness but the state's generator.

Records (users, trunks, queues, lists, announcements, voicemail boxes, contacts, groups,
campaigns) follow one CRUD pattern with the documented oddities declared per resource:
`users/add` answers without the envelope, black/whitelist and contact adds answer `_id: null`,
`groups/update` answers the group, `campaigns/update` answers `{count: 0}`. Searches answer a
plain array or `{pagination, data}` as documented; reports and agent operations live in
`reports.py`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from bridge.catalog import CATALOG
from bridge.simulator import media, reports
from bridge.simulator.replies import (
    FAILED,
    NOT_FOUND,
    OriginateRequest,
    Reply,
    Upload,
    fail,
    file_reply,
    missing,
    ok,
)
from bridge.simulator.state import Record, SimState, numbers_in_csv, public

Handler = Callable[[SimState, dict[str, Any], Upload | None], Reply]
Events = tuple[tuple[str, Record], ...]


@dataclass(frozen=True, slots=True)
class Resource:
    table: str
    unique: str | None = None  # field that must be unique on add/update
    duplicate: str = ""  # the business error for a duplicate
    add_answer: Literal["id", "null_id", "users"] = "id"
    update_answer: Literal["empty", "object", "count"] = "empty"
    paged: bool = False
    sort: Mapping[str, int] = field(default_factory=lambda: {"date": -1})
    hidden: tuple[str, ...] = ()  # fields kept but not shown by search
    masked: tuple[str, ...] = ()  # fields shown as ******
    on_add: Callable[[SimState, Record], Events] | None = None
    on_remove: Callable[[SimState, Record], Events] | None = None


def _exten_event(name: str) -> Callable[[SimState, Record], Events]:
    def events(state: SimState, r: Record) -> Events:
        return ((name, {"event_name": name, "exten": r.get("number", ""), "state": "Unavailable"}),)

    return events


def _trunk_added(state: SimState, r: Record) -> Events:
    now = state.clock()
    return (
        (
            "TrunkAdded",
            {
                "event_name": "TrunkAdded",
                "state": "Unavailable",
                "last_time": now,
                "trunk_name": r.get("name", ""),
                "trunk_type": r.get("trunk_type", "SIP"),
                "last_time_sec": 0,
                "date": now,
            },
        ),
    )


def _trunk_removed(state: SimState, r: Record) -> Events:
    payload = {"event_name": "TrunkRemoved", "trunk_name": r.get("name", ""), "date": state.clock()}
    return (("TrunkRemoved", payload),)


RESOURCES: dict[str, Resource] = {
    "pbx/users": Resource(
        "users",
        "number",
        "This number already exists",
        add_answer="users",
        masked=("secret",),
        on_add=_exten_event("ExtenAdded"),
        on_remove=_exten_event("ExtenRemoved"),
    ),
    "pbx/trunks": Resource(
        "trunks",
        "name",
        "This trunk already exists",
        on_add=_trunk_added,
        on_remove=_trunk_removed,
    ),
    "pbx/queues": Resource("queues", "number", "this queue already exists"),
    "pbx/announcements": Resource("announcements"),
    "voicemails/voicemails": Resource("voicemails"),
    "pbx/blacklists": Resource("blacklists", add_answer="null_id"),
    "pbx/whitelists": Resource("whitelists", add_answer="null_id"),
    "autodialer/contacts": Resource("contacts", add_answer="null_id", paged=True, sort={"name": 1}),
    "autodialer/groups": Resource(
        "groups", update_answer="object", paged=True, hidden=("numbers",)
    ),
    "autodialer/campaigns": Resource("campaigns", update_answer="count", paged=True),
    "autodialer/announcements": Resource("ad_announcements"),
}


def get_path(body: Mapping[str, Any], dotted: str) -> Any:
    node: Any = body
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def check_required(service: str, body: Mapping[str, Any]) -> Reply | None:
    """The `success: 0` "Field '<name>':<value> is missing" for the first absent required
    field (the catalog's `required`), or None."""
    endpoint = CATALOG.get(service)
    required = endpoint.required if endpoint else ()
    if service in ("reports/quick/search", "reports/cdr/search") and get_path(
        body, "conditions.cuid"
    ):
        # Looking a call up by cuid is documented with an empty date_range.
        required = tuple(r for r in required if not r.startswith("date_range."))
    for name in required:
        if "[]." in name:
            array, item_key = name.split("[].", 1)
            for item in body.get(array) or ():
                value = item.get(item_key) if isinstance(item, Mapping) else None
                if _empty(value):
                    return missing(name, value)
        elif _empty(value := get_path(body, name)):
            return missing(name, value)
    return None


def handle(state: SimState, service: str, body: dict[str, Any], upload: Upload | None) -> Reply:
    """One request to `service` (a catalog path). The caller has done auth and parsing."""
    if "_id" not in body and "id" in body:
        # Simotel's own Postman collection sends `id` for faxes/download and trunks/update.
        body = {**body, "_id": body["id"]}
    if service.endswith("/upload"):
        return _upload(state, service, upload)
    problem = check_required(service, body)
    if problem is not None:
        return problem
    handler = HANDLERS.get(service)
    if handler is None:  # a catalog path without a handler would be a bug; answer like Simotel
        return fail(FAILED)
    return handler(state, body, upload)


# records


def _fields(body: Mapping[str, Any]) -> Record:
    return {k: v for k, v in body.items() if k not in ("_id", "id")}


def _duplicate(state: SimState, res: Resource, body: Mapping[str, Any], own: Any) -> bool:
    if res.unique is None or _empty(body.get(res.unique)):
        return False
    other = state.find_by(res.table, res.unique, body[res.unique])
    return other is not None and other["_id"] != own


def _add(res: Resource) -> Handler:
    def add(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
        if _duplicate(state, res, body, None):
            return fail(res.duplicate)
        fields: Record | None = _fields(body)
        if res.table == "groups":
            fields = _group_fields(state, _fields(body))
        elif res.table == "campaigns":
            fields = _campaign_fields(state, _fields(body))
        if fields is None:  # a group from a CSV that was never uploaded
            return fail(FAILED)
        record = state.insert(res.table, fields)
        events = res.on_add(state, record) if res.on_add else ()
        if res.table == "campaigns":
            events = _campaign_calls(state, record)
        if res.add_answer == "users":
            answer = {
                "status": "success",
                "message": "User created successfully",
                "user_id": str(record.get("number", "")),
            }
            return Reply(json=answer, events=events)
        _id = None if res.add_answer == "null_id" else record["_id"]
        return ok({"_id": _id}, events=events)

    return add


def _update(res: Resource) -> Handler:
    def update(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
        record = state.find(res.table, body["_id"])
        if record is None:
            return fail(FAILED)
        if _duplicate(state, res, body, record["_id"]):
            return fail(res.duplicate)
        fields = _fields(body)
        if res.table == "groups":
            fields = _group_fields(state, {**record, **fields}) or fields
        elif res.table == "campaigns":
            fields = _campaign_fields(state, fields, update=True)
        record.update(fields)
        if res.update_answer == "count":
            return ok({"count": 0})
        if res.update_answer == "object":
            return ok(
                {
                    "name": record.get("name"),
                    "numbers": record.get("numbers", []),
                    "description": record.get("description", ""),
                    "date": media.mongo_date(state.clock()),
                    "count": record.get("count", 0),
                }
            )
        return ok("")

    return update


def _remove(res: Resource) -> Handler:
    def remove(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
        record = state.remove(res.table, body["_id"])
        if record is None:
            return fail(FAILED)
        if res.table == "queues":
            for key in [k for k in state.members if k[0] == record.get("number")]:
                del state.members[key]
        return ok("", events=res.on_remove(state, record) if res.on_remove else ())

    return remove


def _view(state: SimState, res: Resource, record: Record) -> Record:
    out = {k: v for k, v in public(record).items() if k not in res.hidden}
    for key in res.masked:
        if key in out:
            out[key] = "******"
    if res.table == "users":
        out["queues"] = state.queues_of(str(record.get("number", "")))
    return out


def _search(res: Resource) -> Handler:
    def search(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
        found = reports.select(state.table(res.table), body)
        views = [_view(state, res, r) for r in found]
        if not res.paged:
            return ok(views)
        return ok(reports.page(views, body, res.sort))

    return search


def _group_fields(state: SimState, fields: Record) -> Record | None:
    numbers = [str(n) for n in fields.get("numbers") or []]
    if fields.get("filename"):
        stored = state.files.get(str(fields["filename"]))
        if stored is None or stored.data is None:
            return None
        numbers += numbers_in_csv(stored.data)
    return {**fields, "numbers": numbers, "count": len(numbers)}


def _campaign_fields(state: SimState, fields: Record, *, update: bool = False) -> Record:
    out = dict(fields)
    for key, iso in (("start", "isoStart"), ("end", "isoEnd")):
        ts = reports.parse_time(fields.get(key))
        if ts is not None:  # sent Gregorian, kept and answered Jalali
            out[key], out[iso] = media.jalali(ts), media.mongo_date(ts)
    if not update:
        count = len(fields.get("numbers") or [])
        for gid in fields.get("groups") or []:
            group = state.find("groups", gid)
            count += int(group.get("count", 0)) if group else 0
        out.update(count=count, repeat=0, status="waiting", hs="")
    return out


_CAUSES = {
    "ANSWERED": ("16", "Normal Clearing"),
    "NO ANSWER": ("19", "No answer"),
    "BUSY": ("17", "User busy"),
    "LOST": ("0", "Unknown"),
}


def _campaign_calls(state: SimState, campaign: Record) -> Events:
    """A campaign whose window is open dials its numbers: one AutoDialerReport each (the
    state learns them as autodialer reports and their CDRs)."""
    now = state.clock()
    start = int(campaign.get("isoStart", {}).get("$date", {}).get("$numberLong", 0)) / 1000
    end = int(campaign.get("isoEnd", {}).get("$date", {}).get("$numberLong", 0)) / 1000
    if not start <= now <= end:
        return ()
    numbers = list(campaign.get("numbers") or [])
    for gid in campaign.get("groups") or []:
        numbers += (state.find("groups", gid) or {}).get("numbers", [])
    events: list[tuple[str, Record]] = []
    for number in numbers[:50]:
        disposition = state.rng.choices(list(_CAUSES), (6, 2, 1, 1))[0]
        wait = state.rng.randint(2, 15)
        cause, text = _CAUSES[disposition]
        events.append(
            (
                "AutoDialerReport",
                {
                    "event_name": "AutoDialerReport",
                    "start": media.webhook_time(now),
                    "end": media.gregorian(now + wait),
                    "campaign_id": campaign["_id"],
                    "campaign": campaign.get("name", ""),
                    "interface_context": campaign.get("interface_context", ""),
                    "interface_text": campaign.get("interface_text", ""),
                    "number": str(number),
                    "disposition": disposition,
                    "try": 1,
                    "repeat": 0,
                    "billsec": state.rng.randint(3, 60) if disposition == "ANSWERED" else 0,
                    "wait": wait,
                    "tries": [
                        {
                            "cdr_id": state.new_id(),
                            "cause": cause,
                            "cause-txt": text,
                            "starttime": media.gregorian(now),
                            "disposition": disposition,
                            "wait": wait,
                        }
                    ],
                },
            )
        )
    return tuple(events)


# uploads and files

_UPLOADS = {  # service: (name prefix, name suffix, message)
    "pbx/announcements/upload": ("file", "_.wav", "1 file(s) uploaded successfully"),
    "autodialer/announcements/upload": ("file", "_.wav", "1 file(s) uploaded successfully"),
    "pbx/faxes/upload": ("sen_file", "_.tiff", "1 file(s) uploaded successfully"),
    "autodialer/groups/upload": ("file", ".csv", ""),
}


def _upload(state: SimState, service: str, upload: Upload | None) -> Reply:
    if upload is None:
        return missing("file", None)
    prefix, suffix, message = _UPLOADS[service]
    slug = re.sub(r"[^a-z0-9-]", "", re.sub(r"[\s_]+", "-", upload.filename.lower()))[:20]
    stamp = datetime.fromtimestamp(state.clock(), UTC).strftime("%Y%m%d%H%M%S")
    name = f"{prefix}-{stamp}-{state.rng.randint(10000, 99999)}-{slug}{suffix}"
    kind = "fax" if suffix.endswith("tiff") else "upload"
    state.add_file(name, kind, upload.content_type or "application/octet-stream", upload.data)
    return ok({"filename": name}, message)


def _download_audio(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
    stored = state.files.get(str(body["file"]))
    found = state.file_bytes(str(body["file"])) if stored and stored.kind == "audio" else None
    return file_reply(*found) if found else NOT_FOUND


def _download_fax(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
    record = state.find("faxes", body["_id"])
    found = state.file_bytes(str(record.get("file", ""))) if record else None
    return file_reply(*found) if found else NOT_FOUND


def _fax_add(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
    record = state.insert(
        "faxes",
        {
            "type": "outbox",
            "src": body.get("sender_id", ""),
            "dst": body.get("to", ""),
            "status": "SENDING",
            "file": body.get("file", ""),
            "description": body.get("description", ""),
            "ext": body.get("ext", ""),
            "trunk": body.get("trunk_name", ""),
            "channel": "",
        },
    )
    if "text" in body or record["file"] not in state.files:  # a text fax is rendered by the PBX
        record["file"] = f"sen_text-{record['_id']}.tiff"
        state.add_file(record["file"], "fax", "image/tiff")
    event = {
        "event_name": "OutgoingFax",
        "fax_id": record["_id"],
        "state": "SENDING",
        "unique_id": f"{int(state.clock())}.{state.rng.randint(100, 99999)}",
        "info": {
            "FAXSTATUS": None,
            "FAXSTATUSSTRING": None,
            "FAXERROR": None,
            "REMOTESTATIONID": None,
            "FAXPAGES": "1",
            "FAXBITRATE": "14400",
            "FAXRESOLUTION": "8031x7700",
            "REASON": "",
        },
        "date": media.webhook_time(state.clock()),
    }
    return ok({"_id": record["_id"]}, events=(("OutgoingFax", event),))


# actions


def _ping(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
    message = "Ping event will be sent to the event API address if it is enabled in the settings"
    return ok(None, message, events=(("Ping", {"event_name": "Ping"}),))


def _originate(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
    call_id = f"orig.call.{int(state.clock())}.{state.rng.randint(100000, 999999)}"
    request = OriginateRequest(
        originated_call_id=call_id,
        caller=str(body["caller"]),
        callee=str(body["callee"]),
        context=str(body["context"]),
        caller_id=str(body["caller_id"]),
        trunk_name=str(body.get("trunk_name") or ""),
        timeout=str(body.get("timeout") or "30"),
        call_limit=str(body.get("call_limit") or ""),
    )
    return ok({"originated_call_id": call_id}, None, originate=request)


def _ad_trunk_update(state: SimState, body: dict[str, Any], upload: Upload | None) -> Reply:
    record = state.find("ad_trunks", body["_id"])
    if record is None:
        return fail(FAILED)
    keys = ("title", "status", "wait_cache_length", "capacity", "dial_interval")
    record.update({k: body[k] for k in keys if k in body})
    return ok("")


def _search_table(table: str, sort: Mapping[str, int] | None = None) -> Handler:
    res = Resource(table, paged=sort is not None, sort=sort or {})
    return _search(res)


HANDLERS: dict[str, Handler] = {
    "setting/ping/act": _ping,
    "call/originate/act": _originate,
    "pbx/musiconholds/search": _search_table("musiconholds"),
    "voicemails/inbox/search": _search_table("inbox", {"date": -1}),
    "pbx/faxes/add": _fax_add,
    "pbx/faxes/search": _search_table("faxes", {"date": -1}),
    "pbx/faxes/download": _download_fax,
    "reports/audio/download": _download_audio,
    "voicemails/audio/download": _download_audio,
    "autodialer/trunks/search": _search_table("ad_trunks"),
    "autodialer/trunks/update": _ad_trunk_update,
    **reports.HANDLERS,
}
for _prefix, _res in RESOURCES.items():
    HANDLERS[f"{_prefix}/add"] = _add(_res)
    HANDLERS[f"{_prefix}/search"] = _search(_res)
    HANDLERS[f"{_prefix}/update"] = _update(_res)
    HANDLERS[f"{_prefix}/remove"] = _remove(_res)
