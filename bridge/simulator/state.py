"""The simulated Simotel's memory: plain dicts in insertion-ordered tables, no I/O.

Tables hold records as Simotel returns them (`_id` a 24-hex ObjectId, `date` Jalali) plus
hidden keys starting with `__` (`__ts`, the epoch used for date ranges), which never leave the
simulator. Reports are filled from the same webhooks the call generator sends (`learn`), so
`reports/cdr/search` finds the calls whose `Cdr` the bridge published and
`reports/audio/download` serves their recordings.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.simulator import media

Record = dict[str, Any]


@dataclass(slots=True)
class StoredFile:
    kind: str  # "audio", "fax", "upload"
    content_type: str
    data: bytes | None = None  # None: generated from the name when downloaded


@dataclass(slots=True)
class Member:
    source: str
    penalty: str = ""
    paused: bool = False
    since: float = 0.0  # when the agent joined the queue


def public(record: Record) -> Record:
    return {k: v for k, v in record.items() if not k.startswith("__")}


class SimState:
    def __init__(self, *, clock: Callable[[], float] = time.time, rng: random.Random | None = None):
        self.clock = clock
        self.rng = rng or random.Random()
        self.tables: dict[str, list[Record]] = {}
        self.files: dict[str, StoredFile] = {}
        self.members: dict[tuple[str, str], Member] = {}  # (queue number, agent) -> member
        self._machine = self.rng.getrandbits(40)
        self._counter = self.rng.getrandbits(16)

    # ids and records

    def new_id(self) -> str:
        """A MongoDB-style ObjectId: seconds, machine, counter. Later ids sort after earlier."""
        self._counter = (self._counter + 1) % 0x1000000
        return f"{int(self.clock()):08x}{self._machine:010x}{self._counter:06x}"

    def table(self, name: str) -> list[Record]:
        return self.tables.setdefault(name, [])

    def insert(self, table: str, fields: Record, *, ts: float | None = None) -> Record:
        now = self.clock() if ts is None else ts
        record: Record = {"_id": self.new_id(), **fields}
        record.setdefault("date", media.jalali(now))
        record["__ts"] = now
        self.table(table).append(record)
        return record

    def find(self, table: str, _id: Any) -> Record | None:
        return next((r for r in self.table(table) if r["_id"] == _id), None)

    def find_by(self, table: str, key: str, value: Any) -> Record | None:
        return next((r for r in self.table(table) if r.get(key) == value), None)

    def remove(self, table: str, _id: Any) -> Record | None:
        record = self.find(table, _id)
        if record is not None:
            self.table(table).remove(record)
        return record

    # queue members (runtime state, like Asterisk's)

    def agents_of(self, queue: str, *, include_paused: bool = False) -> list[str]:
        return [
            agent
            for (q, agent), m in self.members.items()
            if q == queue and (include_paused or not m.paused)
        ]

    def queues_of(self, agent: str) -> list[str]:
        return [q for (q, a) in self.members if a == agent]

    def extensions(self) -> list[str]:
        return [str(u["number"]) for u in self.table("users")]

    # files

    def add_file(self, name: str, kind: str, content_type: str, data: bytes | None = None) -> None:
        self.files[name] = StoredFile(kind, content_type, data)

    def file_bytes(self, name: str) -> tuple[bytes, str] | None:
        f = self.files.get(name)
        if f is None:
            return None
        if f.data is not None:
            return f.data, f.content_type
        if f.kind == "fax":
            return media.fax_tiff(name), f.content_type
        return media.tone_wav(name), f.content_type

    # learning from the webhooks the simulator sends

    def learn(self, event: str, payload: Record) -> None:
        """Keep what a real Simotel would keep after sending this event."""
        learner = _LEARNERS.get(event)
        if learner is not None:
            learner(self, payload)


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def _times(state: SimState, p: Record, duration: int) -> tuple[float, float]:
    """(start, end) of a call from its webhook's `starttime`/`endtime`, so the table and the
    webhooks agree; from the clock when the payload does not say."""
    from bridge.cdr import to_epoch

    end = to_epoch(p.get("endtime"))
    start = to_epoch(p.get("starttime"))
    if end is None:
        end = state.clock() if start is None else start + duration
    if start is None:
        start = end - duration
    return start, end


def _learn_cdr(state: SimState, p: Record) -> None:
    duration, billsec, wait = _int(p.get("duration")), _int(p.get("billsec")), _int(p.get("wait"))
    start, now = _times(state, p, duration)
    disposition = str(p.get("disposition", "ANSWERED"))
    call_type = str(p.get("type", "incoming"))
    record: Record = {
        "type": call_type,
        "cuid": p.get("unique_id", ""),
        "clid": f'"{p.get("src", "")}"',
        "src": p.get("src", ""),
        "dst": p.get("dst", ""),
        "dcontext": "main_routing",
        "channel": f"SIP/{p.get('src', '')}-0000{_int(state.rng.random() * 9999):04d}",
        "dstchannel": f"SIP/{p.get('dst', '')}",
        "lastapp": "Dial",
        "lastdata": "",
        "start": media.jalali(start),
        "answer": media.gregorian(start + wait),
        "duration": duration,
        "billsec": billsec,
        "disposition": disposition,
        "amaflags": 3,
        "accountcode": "",
        "uniqueid": p.get("unique_id", ""),
        "userfield": "",
        "sequence": 0,
        "comment": "",
        "did": p.get("dst", ""),
        "entry_point": p.get("entry_point", ""),
        "outgoing_point": p.get("outgoing_point", ""),
        "originated_call_id": p.get("originated_call_id", ""),
        "route": [],
        "details": [],
        "wait": wait,
        "starttime": media.jalali(start),
        "endtime": media.mongo_date(now),
        "record": p.get("record", ""),
        "hangup": "caller",
        disposition: 1,
        call_type: 1,
        "billsec_hhmmss": media.hhmmss(billsec),
        "wait_hhmmss": media.hhmmss(wait),
        "duration_hhmmss": media.hhmmss(duration),
    }
    if record["originated_call_id"]:
        record["comment"] = f"originated call: {record['originated_call_id']}"
    state.insert("cdr", record, ts=start)
    if p.get("record"):
        state.add_file(str(p["record"]), "audio", "audio/wav")


def _learn_cdr_queue(state: SimState, p: Record) -> None:
    duration, billsec, wait = _int(p.get("duration")), _int(p.get("billsec")), _int(p.get("wait"))
    start, now = _times(state, p, duration)
    disposition = str(p.get("disposition", "ANSWERED"))
    common: Record = {
        "duration": duration,
        "wait": wait,
        "billsec": billsec,
        "src": p.get("src", ""),
        "dst": p.get("dst", ""),
        "cuid": p.get("unique_id", ""),
        "qnum": p.get("queue", ""),
        "disposition": disposition,
        "hangup": p.get("hangup", "caller"),
        disposition: 1,
        "billsec_hhmmss": media.hhmmss(billsec),
        "wait_hhmmss": media.hhmmss(wait),
        "duration_hhmmss": media.hhmmss(duration),
        "record": p.get("record", ""),
    }
    stat = {
        **common,
        "agent_wait": _int(p.get("agent_wait")),
        "queue_id": p.get("unique_id", ""),
        "dst_name": p.get("dst", ""),
        "starttime": media.jalali(start),
        "endtime": media.mongo_date(now),
        "ringtime": media.mongo_date(start),
        "queue_status": p.get("queue_status", "CONTINUE"),
        "v": 0,
    }
    state.insert("queue_stat", stat, ts=start)
    report = {
        **common,
        "type": "queue_report",
        "queue_id": p.get("unique_id", ""),
        "tries": len(p.get("detail") or []) or 1,
        "last_try": media.mongo_date(now),
        "start": media.jalali(start),
        "dst_name": p.get("dst", ""),
    }
    state.insert("queue_report", report, ts=start)


def _learn_survey(state: SimState, p: Record) -> None:
    state.insert(
        "poll",
        {
            "uniqueid": p.get("unique_id", ""),
            "src": p.get("src", ""),
            "dst": p.get("dst", ""),
            "point": p.get("point", 0),
            "label": p.get("label", ""),
            "qnum": p.get("queue", ""),
        },
    )


def _learn_voicemail(state: SimState, p: Record) -> None:
    if p.get("state") != "SUCCESS":
        return
    box = state.find_by("voicemails", "number", p.get("number"))
    state.insert(
        "inbox",
        {
            "number": p.get("number", ""),
            "caller_id": p.get("caller", ""),
            "filename": p.get("filename", ""),
            "src": p.get("caller", ""),
            "voice_mail_id": {"$oid": box["_id"] if box else p.get("id", "")},
            "duration": p.get("duration", "0"),
            "read": False,
            "v": 0,
        },
    )
    state.add_file(str(p.get("filename", "")), "audio", "audio/wav")


def _learn_incoming_fax(state: SimState, p: Record) -> None:
    name = f"rec_fax-{p.get('unique_id', '')}.tiff"
    record = state.insert(
        "faxes",
        {
            "type": "inbox",
            "src": p.get("src", ""),
            "dst": p.get("dst", ""),
            "status": p.get("state", "SUCCESS"),
            "file": name,
            "description": "",
            "ext": "",
            "trunk": p.get("entry_point", ""),
            "channel": "",
        },
    )
    record["_id"] = p.get("fax_id", record["_id"])
    state.add_file(name, "fax", "image/tiff")


def _learn_autodialer(state: SimState, p: Record) -> None:
    campaign = state.find("campaigns", p.get("campaign_id"))
    disposition = str(p.get("disposition", ""))
    report = {
        **{k: v for k, v in p.items() if k != "event_name"},
        "campaign_id": {"$oid": p.get("campaign_id", "")},
        "trunk_manager_id": {"$oid": (campaign or {}).get("trunk_manager_id", "")},
        "announcement": (campaign or {}).get("announcement", ""),
        "status": "completed",
        "input": "",
        disposition: 1,
        "billsec_hhmmss": media.hhmmss(_int(p.get("billsec"))),
        "wait_hhmmss": media.hhmmss(_int(p.get("wait"))),
        "tries": [{**t, "cdr_id": {"$oid": t.get("cdr_id", "")}} for t in p.get("tries") or []],
    }
    state.insert("ad_reports", report)
    for t in p.get("tries") or []:  # the CDR fragment autodialer/reports/info answers
        cdr = state.insert(
            "cdr",
            {
                "type": "outgoing",
                "src": "autodialer",
                "dst": p.get("number", ""),
                "dcontext": "autodialer",
                "amaflags": 3,
                "channel": f"Local/{p.get('number')}",
                "duration": _int(p.get("billsec")) + _int(t.get("wait")),
                "wait": _int(t.get("wait")),
                "billsec": _int(p.get("billsec")),
                "disposition": t.get("disposition", ""),
                "cuid": "",
                "starttime": media.jalali(state.clock()),
            },
        )
        cdr["_id"] = t.get("cdr_id", cdr["_id"])


_LEARNERS: dict[str, Callable[[SimState, Record], None]] = {
    "AutoDialerReport": _learn_autodialer,
    "Cdr": _learn_cdr,
    "CdrQueue": _learn_cdr_queue,
    "Survey": _learn_survey,
    "VoiceMail": _learn_voicemail,
    "IncomingFax": _learn_incoming_fax,
}


# demo data

_PEOPLE = (
    "Sara Ahmadi",
    "Reza Karimi",
    "Maryam Hosseini",
    "Ali Rezaei",
    "Neda Moradi",
    "Hamid Jafari",
)


def seed(state: SimState) -> SimState:
    """Extensions 101-106, queues 902 (support) and 903 (sales) with agents, a trunk, hold music,
    a voicemail box with one message, a received fax and an autodialer trunk manager."""
    for i, name in enumerate(_PEOPLE):
        number = str(101 + i)
        state.insert(
            "users",
            {
                "name": name,
                "number": number,
                "secret": f"s3cret{number}",
                "user_type": "SIP",
                "active": "yes",
                "cid_number": number,
                "call_record": "yes",
                "context": "main_routing",
                "host": "dynamic",
                "type": "friend",
                "nat": "no",
                "port": "5060",
                "email": "",
                "description": "",
                "forward_policy": {"Busy": "", "No Answer": "", "UnAvailable": "", "All": ""},
            },
        )
    for number, name, agents in (("902", "support", _PEOPLE[:4]), ("903", "sales", _PEOPLE[3:])):
        state.insert(
            "queues",
            {
                "name": name,
                "number": number,
                "strategy": "rrmemory",
                "timeout": "15",
                "music": "default",
                "call_record": "yes",
            },
        )
        for person in agents:
            ext = str(101 + _PEOPLE.index(person))
            state.members[(number, ext)] = Member(ext, "0", since=state.clock())
    trunk = state.insert(
        "trunks",
        {
            "name": "SimotelTrunk",
            "trunk_type": "SIP",
            "active": "yes",
            "host": "192.0.2.10",
            "context": "from-pstn",
            "port": "5060",
        },
    )
    state.insert(
        "musiconholds",
        {
            "name": "default",
            "path": "/var/lib/asterisk/moh",
            "count": 2,
            "musics": [
                {
                    "file": f"track{i}.wav",
                    "size": "55.18 KB",
                    "date": media.jalali(0),
                    "type": "file",
                }
                for i in (1, 2)
            ],
        },
    )
    box = state.insert(
        "voicemails",
        {
            "name": "Front desk",
            "number": "5555",
            "password": "1234",
            "email": "",
            "send_email": "no",
        },
    )
    name = "5555_1609417639-vm-record-file-8766.wav"
    state.insert(
        "inbox",
        {
            "number": "5555",
            "caller_id": "09121234567",
            "filename": name,
            "src": "09121234567",
            "voice_mail_id": {"$oid": box["_id"]},
            "duration": "7",
            "read": False,
            "v": 0,
        },
    )
    state.add_file(name, "audio", "audio/wav")
    _learn_incoming_fax(
        state,
        {
            "fax_id": state.new_id(),
            "src": "02191015504",
            "dst": "2191015504",
            "state": "SUCCESS",
            "unique_id": "seed.1",
            "entry_point": "SimotelTrunk",
        },
    )
    state.insert(
        "ad_trunks",
        {
            "title": "main",
            "trunk_id": {"$oid": trunk["_id"]},
            "status": "active",
            "active_times": {str(d): [str(h) for h in range(8, 20)] for d in range(1, 8)},
            "capacity": "10",
            "dial_interval": "1",
            "wait_cache_length": "100",
            "current_capacity": 0,
            "current_wait_cache_length": 0,
        },
    )
    return state


def numbers_in_csv(data: bytes) -> list[str]:
    """The phone numbers in an uploaded group CSV (any column, digits and a leading +)."""
    out: list[str] = []
    for line in data.decode("utf-8", "replace").splitlines():
        out.extend(c.strip() for c in line.split(",") if c.strip().lstrip("+").isdigit())
    return out
