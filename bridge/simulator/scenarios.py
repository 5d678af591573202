"""The call scenarios the generator plays, as pure generators over `flows` (see its docstring
for the step protocol and the simulated dialplan): incoming calls through the dialplan to a
queue or an extension, agents dialling out, internal calls, originate, and the odd trunk state
change or received fax."""

from __future__ import annotations

from collections.abc import Generator

from bridge.simulator import media
from bridge.simulator.flows import (
    Ask,
    AskResult,
    Call,
    Flow,
    Route,
    Send,
    Step,
    cdr,
    dialplan,
    new_state,
)
from bridge.simulator.replies import OriginateRequest


def _connect(
    c: Call,
    caller: str,
    agents: list[str],
    queue: str = "",
) -> Generator[Step, AskResult, tuple[str | None, float]]:
    """Ring agents one after another until one answers: (agent or None, seconds waited)."""
    for i, agent in enumerate(agents[:3]):
        yield Send("NewState", new_state(c, agent, "Ringing", caller, "in", queue), c.wait(0.5))
        ring = c.ring()
        if c.rng.random() < (0.9 if i == len(agents[:3]) - 1 else 0.7):
            yield Send("NewState", new_state(c, agent, "InUse", caller, "in", queue), ring)
            return agent, c.elapsed
        yield Send("NewState", new_state(c, agent, "Idle"), ring)
    return None, c.elapsed


def inbound(c: Call) -> Flow:
    """Someone calls the PBX: IncomingCall, the dialplan's components, a queue or an extension
    ringing, talk (sometimes a transfer), hang-up with CdrQueue / Survey / Cdr."""
    caller = c.external()
    entry = {"entry_point": c.pbx.trunk}
    yield Send(
        "IncomingCall",
        {"event_name": "IncomingCall", "number": caller, "unique_id": c.unique_id, **entry},
    )
    route = yield from dialplan(c, caller)
    queue = route.target if route.kind == "queue" else ""
    if route.kind == "queue" and c.rng.random() < 0.1:
        yield Send(
            "ReservedCallInFront",
            {
                "event_name": "ReservedCallInFront",
                "event": "ReservedCallInFront",
                "queue_name": queue,
                "caller_id": caller,
                "date": media.webhook_time(c.now()),
            },
        )
    if route.kind in ("queue", "exten"):
        agents = list(c.pbx.queues.get(queue, ())) if queue else [route.target]
        c.rng.shuffle(agents)
        agent, wait = yield from _connect(c, caller, agents, queue)
        if agent is not None:
            yield from _talk_and_hang_up(c, caller, agent, queue, wait, entry)
            return
        route = Route("voicemail") if c.pbx.voicemail_box and c.rng.random() < 0.5 else route
        if route.kind != "voicemail":
            yield Send(
                "Cdr",
                cdr(
                    c, caller, queue or route.target, "incoming", "NO ANSWER", c.elapsed, 0, **entry
                ),
                c.wait(1),
            )
            return
    if route.kind == "voicemail" and c.pbx.voicemail_box:
        box = c.pbx.voicemail_box
        seconds = int(c.wait(c.rng.uniform(4, 20)))
        yield Send(
            "VoiceMail",
            {
                "event_name": "VoiceMail",
                "id": f"{c.rng.getrandbits(96):024x}",
                "number": box,
                "state": "SUCCESS",
                "date": media.webhook_time(c.now()),
                "filename": f"{box}_{int(c.now())}-vm-record-file-{c.rng.randint(1000, 9999)}.wav",
                "duration": str(seconds),
                "caller": caller,
            },
            seconds,
        )
    disposition = "FAILED" if route.kind == "failed" else "ANSWERED"
    c.wait(c.rng.uniform(3, 12))  # an announcement, then the caller hangs up
    yield Send(
        "Cdr",
        cdr(
            c,
            caller,
            c.pbx.did,
            "incoming",
            disposition,
            0,
            c.elapsed if disposition == "ANSWERED" else 0,
            **entry,
        ),
        0.5,
    )


def _talk_and_hang_up(
    c: Call, caller: str, agent: str, queue: str, wait: float, extra: dict[str, str]
) -> Flow:
    answered_at = c.elapsed
    after = c.talk()
    others = [e for q in c.pbx.queues.values() for e in q if e != agent]
    if others and c.rng.random() < 0.15:  # a blind transfer to a colleague
        to = c.rng.choice(others)
        yield Send(
            "Transfer",
            {
                "event_name": "Transfer",
                "unique_id": c.unique_id,
                "transferer": agent,
                "transferred_from": caller,
                "transferred_to": to,
            },
            after,
        )
        yield Send("NewState", new_state(c, agent, "Idle"), c.wait(0.2))
        yield Send("NewState", new_state(c, to, "Ringing", caller, "in", queue), c.wait(0.2))
        yield Send("NewState", new_state(c, to, "InUse", caller, "in", queue), c.ring())
        agent, after = to, c.talk()
    billsec = c.elapsed - answered_at
    yield Send("NewState", new_state(c, agent, "Idle"), after)
    if queue:
        record = cdr(c, caller, agent, "incoming", "ANSWERED", wait, billsec)["record"]
        yield Send(
            "CdrQueue",
            {
                "event_name": "CdrQueue",
                "unique_id": c.unique_id,
                "src": caller,
                "dst": agent,
                "queue": queue,
                "billsec": str(int(billsec)),
                "wait": str(int(wait)),
                "duration": str(int(c.elapsed)),
                "agent_wait": str(int(wait)),
                "disposition": "ANSWERED",
                "hangup": c.rng.choice(("caller", "agent")),
                "queue_status": "CONTINUE",
                "record": record,
                "answeredtime": media.webhook_time(c.start + answered_at),
                "ringtime": media.webhook_time(c.start + answered_at - 2),
                "starttime": media.webhook_time(c.start),
                "endtime": media.webhook_time(c.now()),
                "detail": [
                    {
                        "src": caller,
                        "dst": agent,
                        "billsec": str(int(billsec)),
                        "wait": str(int(wait)),
                        "disposition": "ANSWERED",
                        "comment": "",
                        "tries": "1",
                    }
                ],
            },
            c.wait(0.1),
        )
        if c.rng.random() < 0.3:
            yield Send(
                "Survey",
                {
                    "event": "Survey",
                    "unique_id": c.unique_id,
                    "src": caller,
                    "dst": agent,
                    "queue": queue,
                    "date": media.webhook_time(c.now()),
                    "point": c.rng.randint(1, 5),
                    "label": "MySurvey",
                },
                c.wait(c.rng.uniform(3, 8)),
            )
    yield Send(
        "Cdr", cdr(c, caller, agent, "incoming", "ANSWERED", wait, billsec, **extra), c.wait(0.5)
    )


def outbound(c: Call) -> Flow:
    """An agent dials out: NewState, TrunkApi picks the trunk, OutgoingCall, talk, Cdr."""
    agent = c.rng.choice(c.pbx.extensions)
    number = c.external()
    yield Send("NewState", {**new_state(c, agent, "InUse", number, "out"), "dialer": "yes"})
    trunk = c.pbx.trunk
    if c.components:
        answer = yield Ask("TrunkApi", c.component_request(agent, number, "TrunkApi"), c.wait(0.2))
        if answer and str(answer.get("ok")) == "1" and answer.get("trunk"):
            trunk, number = str(answer["trunk"]), str(answer.get("extension") or number)
    out = {"outgoing_point": trunk}
    yield Send(
        "OutgoingCall",
        {"event_name": "OutgoingCall", "number": number, "unique_id": c.unique_id, **out},
        c.wait(0.3),
    )
    wait = c.ring()
    disposition = c.rng.choices(("ANSWERED", "NO ANSWER", "BUSY"), (7, 2, 1))[0]
    billsec = c.talk() if disposition == "ANSWERED" else 0.0
    yield Send("NewState", new_state(c, agent, "Idle"), wait + billsec)
    yield Send(
        "Cdr", cdr(c, agent, number, "outgoing", disposition, wait, billsec, **out), c.wait(0.5)
    )


def internal(c: Call) -> Flow:
    """One extension calls another."""
    a, b = c.rng.sample(c.pbx.extensions, 2)
    yield Send("NewState", new_state(c, a, "InUse", b, "out"))
    yield Send("NewState", new_state(c, b, "Ringing", a, "in"), c.wait(0.3))
    wait = c.ring()
    answered = c.rng.random() < 0.8
    if answered:
        yield Send("NewState", new_state(c, b, "InUse", a, "in"), wait)
    billsec = c.talk() if answered else 0.0
    yield Send("NewState", new_state(c, b, "Idle"), billsec if answered else wait)
    yield Send("NewState", new_state(c, a, "Idle"), c.wait(0.1))
    yield Send(
        "Cdr",
        cdr(c, a, b, "local", "ANSWERED" if answered else "NO ANSWER", wait, billsec),
        c.wait(0.5),
    )


def originate(c: Call, req: OriginateRequest, answer_rate: float) -> Flow:
    """What `call/originate/act` sets off: the first party rings; if it answers, the second is
    dialled and bridged; Cdr with `originated_call_id`. No answer: no Cdr (as documented)."""
    oid = {"originated_call_id": req.originated_call_id}
    first_is_exten = req.caller in c.pbx.extensions
    if first_is_exten:
        yield Send("NewState", new_state(c, req.caller, "Ringing", req.caller_id, "in"))
    else:
        yield Send(
            "OutgoingCall",
            {
                "event_name": "OutgoingCall",
                "number": req.caller,
                "unique_id": c.unique_id,
                "outgoing_point": req.trunk_name or c.pbx.trunk,
                **oid,
            },
        )
    ring = c.ring()
    if c.rng.random() >= answer_rate:
        if first_is_exten:
            yield Send("NewState", new_state(c, req.caller, "Idle"), ring)
        return
    if first_is_exten:
        yield Send("NewState", new_state(c, req.caller, "InUse", req.callee, "out"), ring)
    if req.callee in c.pbx.extensions:
        yield Send("NewState", new_state(c, req.callee, "Ringing", req.caller, "in"), c.wait(0.3))
        yield Send("NewState", new_state(c, req.callee, "InUse", req.caller, "in"), c.ring())
    else:
        yield Send(
            "OutgoingCall",
            {
                "event_name": "OutgoingCall",
                "number": req.callee,
                "unique_id": c.unique_id,
                "outgoing_point": req.trunk_name or c.pbx.trunk,
                **oid,
            },
            c.wait(0.3),
        )
    wait = c.elapsed
    talk = c.talk()
    if req.call_limit.isdigit():
        c.elapsed -= talk - min(talk, float(req.call_limit))
        talk = min(talk, float(req.call_limit))
    parties = [p for p in (req.caller, req.callee) if p in c.pbx.extensions]
    for i, exten in enumerate(parties):
        yield Send("NewState", new_state(c, exten, "Idle"), talk if i == 0 else c.wait(0.1))
    kind = "local" if len(parties) == 2 else "outgoing"
    yield Send(
        "Cdr",
        cdr(
            c,
            req.caller,
            req.callee,
            kind,
            "ANSWERED",
            wait,
            talk,
            outgoing_point=req.trunk_name or c.pbx.trunk,
            **oid,
        ),
        c.wait(0.5) + (0 if parties else talk),
    )


def trunk_state(c: Call) -> Flow:
    now = c.now()
    yield Send(
        "TrunkNewState",
        {
            "event_name": "TrunkNewState",
            "state": c.rng.choice(("Ok", "Unavailable", "Ok")),
            "last_time": now,
            "trunk_name": c.pbx.trunk,
            "trunk_type": "SIP",
            "last_time_sec": 0,
            "date": now,
        },
    )


def incoming_fax(c: Call) -> Flow:
    ok = c.rng.random() < 0.8
    yield Send(
        "IncomingFax",
        {
            "event_name": "IncomingFax",
            "fax_id": f"{c.rng.getrandbits(96):024x}",
            "entry_point": c.pbx.trunk,
            "unique_id": c.unique_id,
            "date": media.webhook_time(c.now()),
            "src": "021" + c.external()[3:],
            "dst": c.pbx.did[1:],
            "state": "SUCCESS" if ok else "FAILED",
            "description": {
                "REMOTESTATIONID": "unknown",
                "FAXRESOLUTION": "8031x7700",
                "FAXBITRATE": "9600",
                "FAXERROR": "None" if ok else "Unexpected message",
                "FAXSTATUS": "SUCCESS" if ok else "FAILED",
                "FAXPAGES": "1",
                "FAXSTATUSSTRING": "OK" if ok else "Unexpected message received",
            },
        },
    )


SCENARIOS = {
    "inbound": inbound,
    "outbound": outbound,
    "internal": internal,
    "trunk_state": trunk_state,
    "incoming_fax": incoming_fax,
}
WEIGHTS = {"inbound": 60, "outbound": 22, "internal": 10, "trunk_state": 4, "incoming_fax": 4}
