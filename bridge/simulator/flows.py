"""Call flows as pure generators: a flow yields `Send` (a webhook) and `Ask` (a dialplan
component request) steps, is sent back each component's answer (None when there was no usable
one), and decides what happens next from it, the way Simotel's dialplan would. Nothing here does
I/O or reads a clock: the caller gives the start time, the random generator and a snapshot of
the PBX, and times in payloads are that start plus the simulated seconds that passed.

Simulated dialplan for incoming calls (docs/simotel/webhooks.md §5):
    SmartApi `s1` -> `Exit('<case>')` picks the next node: `s<N>` another SmartApi (with the
    digits a `GetData` collected as `data`), `exten` ExtenApi, `ivr` IvrApi, `queue` or a queue
    number, an extension number, `voicemail`; any other case ends the call after an
    announcement. A missing or bad answer takes output `e`, wired to the default queue.
    ExtenApi -> the extension it names rings (no usable answer: F, the call fails).
    IvrApi -> case 1: queue, 2: ExtenApi, else the call ends.
"""

from __future__ import annotations

import random
import re
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from bridge.simulator import media
from bridge.simulator.state import Record


@dataclass(frozen=True, slots=True)
class Send:
    event: str
    payload: Record
    after: float = 0.0  # simulated seconds since the previous step


@dataclass(frozen=True, slots=True)
class Ask:
    component: str  # SmartApi, ExtenApi, TrunkApi, IvrApi
    request: dict[str, str]
    after: float = 0.0


Step = Send | Ask
AskResult = Mapping[str, Any] | None
Flow = Generator[Step, AskResult, None]


@dataclass(frozen=True, slots=True)
class Pbx:
    """What a call needs to know about the PBX when it starts."""

    extensions: tuple[str, ...]
    queues: Mapping[str, tuple[str, ...]]  # queue number -> agents free to ring
    trunk: str = "SimotelTrunk"
    did: str = "02191001000"
    voicemail_box: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    kind: Literal["queue", "exten", "voicemail", "end", "failed"]
    target: str = ""


@dataclass(slots=True)
class Call:
    """One call's fixed facts and its simulated clock."""

    unique_id: str
    start: float
    rng: random.Random
    pbx: Pbx
    components: bool = True
    elapsed: float = 0.0

    def wait(self, seconds: float) -> float:
        """Let simulated time pass before the next step; returns it for the step's `after`."""
        self.elapsed += seconds
        return seconds

    def now(self) -> float:
        return self.start + self.elapsed

    def ring(self) -> float:
        return self.wait(self.rng.uniform(1.5, 6))

    def talk(self) -> float:
        return self.wait(self.rng.uniform(5, 40))

    def external(self) -> str:
        return "09" + "".join(self.rng.choice("0123456789") for _ in range(9))

    def component_request(self, src: str, dst: str, app: str, data: str = "") -> dict[str, str]:
        return {"src": src, "dst": dst, "data": data, "unique_id": self.unique_id, "app_name": app}


def new_state(
    c: Call, exten: str, state: str, participant: str = "", direction: str = "in", queue: str = ""
) -> Record:
    if state == "Idle":  # the documented Idle example carries nothing more
        return {"event_name": "NewState", "exten": exten, "state": "Idle", "unique_id": c.unique_id}
    return {
        "event_name": "NewState",
        "exten": exten,
        "state": state,
        "participant": participant,
        "direction": direction,
        "queue": queue,
        "unique_id": c.unique_id,
    }


def cdr(
    c: Call,
    src: str,
    dst: str,
    kind: str,
    disposition: str,
    wait: float,
    billsec: float,
    **extra: str,
) -> Record:
    answered = disposition == "ANSWERED"
    start = media.webhook_time(c.start)
    payload: Record = {
        "event_name": "Cdr",
        "starttime": start,
        "endtime": media.webhook_time(c.now()),
        "src": src,
        "dst": dst,
        "type": kind,
        "disposition": disposition,
        "duration": int(c.elapsed),
        "billsec": int(billsec),
        "wait": int(wait),
        "unique_id": c.unique_id,
    }
    if answered:
        payload["record"] = f"{media.gregorian(c.start)[:10].replace('-', '')}_{c.unique_id}.wav"
    payload.update(extra)
    return payload


# components


_EXIT = re.compile(r"Exit\(\s*['\"‘’]?([^'\"‘’)]*)['\"‘’]?\s*\)")
_GETDATA = re.compile(r"GetData\(([^)]*)\)")


def parse_smartapi(answer: AskResult) -> tuple[str | None, int | None]:
    """(the Exit case, the max digits of a GetData) of a SmartApi answer; case None when the
    answer is missing, not ok or has no Exit (Simotel then takes output `e`)."""
    if not answer or str(answer.get("ok")) != "1" or not isinstance(answer.get("commands"), str):
        return None, None
    commands = answer["commands"]
    digits = None
    if m := _GETDATA.search(commands):
        args = [a.strip() for a in m.group(1).split(",")]
        digits = int(args[2]) if len(args) > 2 and args[2].isdigit() else 1
    exit_ = _EXIT.search(commands)
    return (exit_.group(1).strip() if exit_ else None), digits


def next_node(case: str | None, pbx: Pbx) -> str | Route:
    """Where an Exit case leads in the simulated dialplan (module docstring)."""
    default = Route("queue", next(iter(pbx.queues), ""))
    if case is None or case.lower() in ("e", "go-e"):
        return default
    name = case[3:] if case.lower().startswith("go-") else case
    low = name.lower()
    if re.fullmatch(r"s\d+", low):
        return low
    if low in ("exten", "extenapi", "extension"):
        return "exten"
    if low in ("ivr", "ivrapi"):
        return "ivr"
    if low == "queue":
        return default
    if name in pbx.queues:
        return Route("queue", name)
    if name in pbx.extensions:
        return Route("exten", name)
    if low in ("voicemail", "vm"):
        return Route("voicemail")
    return Route("end")


def dialplan(c: Call, caller: str) -> Generator[Step, AskResult, Route]:
    """Walk the components an incoming call meets; returns where the call goes."""
    if not c.components:
        return Route("queue", next(iter(c.pbx.queues), ""))
    node: str | Route = "s1"
    data = ""
    for _ in range(6):  # a dialplan that loops ends the call
        if isinstance(node, Route):
            return node
        if node == "exten":
            answer = yield Ask(
                "ExtenApi", c.component_request(caller, c.pbx.did, "ExtenApi", data), c.wait(0.2)
            )
            exten = (
                str(answer.get("extension", "")) if answer and str(answer.get("ok")) == "1" else ""
            )
            return Route("exten", exten) if exten in c.pbx.extensions else Route("failed")
        if node == "ivr":
            data = c.rng.choice("1123")
            answer = yield Ask(
                "IvrApi",
                c.component_request(caller, c.pbx.did, "IvrApi", data),
                c.wait(c.rng.uniform(2, 5)),
            )
            ivr_case = (
                str(answer.get("case", "")) if answer and str(answer.get("ok")) == "1" else ""
            )
            ivr_routes: dict[str, str | Route] = {
                "1": Route("queue", next(iter(c.pbx.queues), "")),
                "2": "exten",
            }
            node = ivr_routes.get(ivr_case, Route("end"))
            continue
        answer = yield Ask(
            "SmartApi", c.component_request(caller, c.pbx.did, node, data), c.wait(0.3)
        )
        case, digits = parse_smartapi(answer)
        if digits is not None:
            data = "".join(c.rng.choice("0123456789") for _ in range(max(digits, 1)))
            c.wait(c.rng.uniform(2, 6))
        node = next_node(case, c.pbx)
    return Route("end")
