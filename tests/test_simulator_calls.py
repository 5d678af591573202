"""The call generator: flows are valid call histories (pure, many seeds); over real HTTP the
generator sends them in every delivery form with Basic auth, calls the components and follows
their answers; originate and API side effects produce the webhooks a real PBX would."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import httpx
import pytest

from bridge.httpserver import serve
from bridge.simulator import SimulatorOptions, flows, scenarios, simulator
from bridge.simulator.options import DELIVERIES, Delivery
from bridge.simulator.replies import OriginateRequest
from tests.helpers.simulator import Receiver, check_call_order

PBX = flows.Pbx(
    extensions=("101", "102", "103", "104", "105"),
    queues={"902": ("101", "102", "103"), "903": ("104", "105")},
    voicemail_box="5555",
)


def _run(flow: flows.Flow, answer: Any) -> tuple[list[tuple[str, dict[str, Any]]], list[flows.Ask]]:
    """Drive a flow with `answer(ask)` for each component request; (events, asks)."""
    events: list[tuple[str, dict[str, Any]]] = []
    asks: list[flows.Ask] = []
    reply: flows.AskResult = None
    try:
        step = next(flow)
        while True:
            if isinstance(step, flows.Send):
                assert step.after >= 0
                events.append((step.event, step.payload))
                reply = None
            else:
                asks.append(step)
                reply = answer(step)
            step = flow.send(reply)
    except StopIteration:
        return events, asks


def _random_answer(rng: random.Random) -> Any:
    options: dict[str, list[Any]] = {
        "SmartApi": [
            None,
            {"ok": "1", "commands": "Exit('go-s2')"},
            {"ok": "1", "commands": "GetData('f', 5, 2);Exit('ivr')"},
            {"ok": "1", "commands": "Exit('exten')"},
            {"ok": "1", "commands": "Exit('903')"},
            {"ok": "1", "commands": "Playback('bye');Exit('b')"},
            {"ok": 0},
        ],
        "ExtenApi": [None, {"ok": "1", "extension": "104"}, {"ok": "1", "extension": "999"}],
        "IvrApi": [None, {"ok": "1", "case": "1"}, {"ok": "1", "case": "2"}],
        "TrunkApi": [None, {"ok": "1", "trunk": "T2", "extension": "0912", "call_limit": "60"}],
    }
    return lambda ask: rng.choice(options[ask.component])


@pytest.mark.parametrize("scenario", sorted(scenarios.SCENARIOS))
def test_every_flow_is_a_valid_call_history(scenario: str) -> None:
    for seed in range(300):
        rng = random.Random(seed)
        call = flows.Call(f"1700000000.{seed}", 1_700_000_000.0, rng, PBX)
        events, _ = _run(scenarios.SCENARIOS[scenario](call), _random_answer(random.Random(seed)))
        assert events, scenario
        check_call_order(events, call.unique_id)


def test_originate_flow() -> None:
    req = OriginateRequest(
        "orig.call.1700000000.123456", "101", "09121234567", "main_routing", "101", "T1", "30", "20"
    )
    for seed in range(100):
        call = flows.Call("1700000000.9", 1_700_000_000.0, random.Random(seed), PBX)
        events, asks = _run(scenarios.originate(call, req, answer_rate=0.5), lambda a: None)
        check_call_order(events, "1700000000.9")
        names = [n for n, _ in events]
        assert not asks and names[0] == "NewState" and events[0][1]["state"] == "Ringing"
        if "Cdr" in names:  # answered: the callee was dialled out, the Cdr names the originate
            assert events[-1][1]["originated_call_id"] == req.originated_call_id
            assert int(events[-1][1]["billsec"]) <= 20  # call_limit
            outgoing = dict(events)["OutgoingCall"]
            assert outgoing["number"] == "09121234567"
            assert outgoing["originated_call_id"] == req.originated_call_id
        else:  # the first party never answered: no Cdr, as documented
            assert names == ["NewState", "NewState"]


def test_smartapi_answers_lead_the_call() -> None:
    answers = {
        "s1": {"ok": "1", "commands": "PlayAnnouncement('w');GetData('m', 10, 1);Exit('go-s2')"},
        "s2": {"ok": "1", "commands": "Exit('exten');"},
        "ExtenApi": {"ok": "1", "extension": "105"},
    }
    call = flows.Call("1700000000.1", 1_700_000_000.0, random.Random(1), PBX)
    events, asks = _run(
        scenarios.inbound(call),
        lambda a: answers[a.request["app_name"] if a.component == "SmartApi" else a.component],
    )
    assert [(a.component, a.request["app_name"]) for a in asks] == [
        ("SmartApi", "s1"),
        ("SmartApi", "s2"),
        ("ExtenApi", "ExtenApi"),
    ]
    assert asks[0].request["data"] == "" and len(asks[1].request["data"]) == 1  # GetData digits
    assert set(asks[0].request) == {"src", "dst", "data", "unique_id", "app_name"}
    ringing = [p["exten"] for n, p in events if n == "NewState" and p["state"] == "Ringing"]
    assert ringing[0] == "105"


def test_no_component_answer_takes_output_e_to_the_queue() -> None:
    call = flows.Call("1700000000.2", 1_700_000_000.0, random.Random(2), PBX)
    events, asks = _run(scenarios.inbound(call), lambda a: None)
    assert [a.request["app_name"] for a in asks] == ["s1"]
    ringing = [p for n, p in events if n == "NewState" and p["state"] == "Ringing"]
    assert ringing and all(p["queue"] == "902" and p["exten"] in PBX.queues["902"] for p in ringing)


# over HTTP


def _options(url: str, delivery: Delivery = "g4", **kw: Any) -> SimulatorOptions:
    return SimulatorOptions(
        port=0,
        event_url=f"{url}/webhooks/simotel/events",
        webhook_username="simotel",
        webhook_password="secret",
        delivery=delivery,
        time_scale=0,
        seed=11,
        **kw,
    )


@pytest.mark.parametrize("delivery", DELIVERIES)
async def test_a_call_over_http_in_every_delivery_form(delivery: Delivery) -> None:
    receiver = Receiver(
        {
            "SmartApi": {"ok": "1", "commands": "Exit('exten')"},
            "ExtenApi": {"ok": "1", "extension": "104"},
        }
    )
    async with serve(receiver.app) as url, simulator(_options(url, delivery)) as sim:
        unique_id = await sim.calls.call("inbound")
    events = receiver.events()
    check_call_order([(r.name, r.payload) for r in events], unique_id)
    assert events[0].name == "IncomingCall" and events[-1].name == "Cdr"
    expected = "Basic " + base64.b64encode(b"simotel:secret").decode()
    assert {r.authorization for r in receiver.got} == {expected}
    for r in events:
        if delivery == "rest4":
            assert r.path == f"/webhooks/simotel/events/{r.name}" and r.method == "POST"
        else:
            assert r.path == "/webhooks/simotel/events"
        assert r.method == ("GET" if delivery == "get" else "POST")
        if delivery in ("g4", "rest4"):
            assert r.content_type == "application/json"
        if delivery in ("get", "form"):
            assert all(isinstance(v, str) for v in r.payload.values())
    components = [(r.name, r.payload["app_name"]) for r in receiver.got if r.kind == "component"]
    assert components == [("SmartApi", "s1"), ("ExtenApi", "ExtenApi")]
    ringing = [
        r.payload["exten"]
        for r in events
        if r.name == "NewState" and r.payload["state"] == "Ringing"
    ]
    assert ringing[0] == "104"
    cdr = events[-1].payload
    if int(cdr["billsec"]):  # answered: the recording can be downloaded from the API
        assert cdr["record"] in sim.state.files


async def test_calls_arrive_at_the_configured_rate() -> None:
    receiver = Receiver()
    options = _options("", calls_per_minute=6000)
    async with serve(receiver.app) as url:
        options = _options(url, calls_per_minute=6000)
        async with simulator(options) as sim:
            import asyncio

            stop = asyncio.Event()
            runner = asyncio.create_task(sim.calls.run(stop))
            await receiver.wait_for(lambda r: sum(e.name == "Cdr" for e in r.events()) >= 3)
            stop.set()
            await asyncio.wait_for(runner, 5)
    ids = {e.payload["unique_id"] for e in receiver.events() if e.name == "Cdr"}
    assert len(ids) >= 3 and all(
        i.split(".")[0].isdigit() and i.split(".")[1].isdigit() for i in ids
    )


async def test_originate_produces_its_webhooks() -> None:
    receiver = Receiver()
    async with serve(receiver.app) as url:
        options = _options(url, originate_delay=0.05, originate_answer_rate=1.0, calls_per_minute=0)
        async with (
            simulator(options) as sim,
            httpx.AsyncClient(
                base_url=sim.api_url,
                auth=("apiuser", "change-me"),
                headers={"X-APIKEY": "change-me"},
            ) as api,
        ):
            answer = (
                await api.post(
                    "call/originate/act",
                    json={
                        "caller": "101",
                        "callee": "09155151515",
                        "context": "main_routing",
                        "caller_id": "101",
                        "trunk_name": "SimotelTrunk",
                        "timeout": "30",
                    },
                )
            ).json()
            call_id = answer["data"]["originated_call_id"]
            await receiver.wait_for(lambda r: any(e.name == "Cdr" for e in r.events()))
            cdr = next(e.payload for e in receiver.events() if e.name == "Cdr")
            found = (
                await api.post(
                    "reports/quick/search",
                    json={
                        "alike": "false",
                        "conditions": {"cuid": cdr["unique_id"]},
                        "date_range": {},
                    },
                )
            ).json()
            record = await api.post("reports/audio/download", json={"file": cdr["record"]})
    events = [(e.name, e.payload) for e in receiver.events()]
    check_call_order(events, cdr["unique_id"])
    names = [n for n, _ in events]
    assert names[:2] == ["NewState", "NewState"] and "OutgoingCall" in names
    assert events[0][1]["exten"] == "101" and events[0][1]["state"] == "Ringing"
    for name, payload in events:
        if name in ("OutgoingCall", "Cdr"):
            assert payload["originated_call_id"] == call_id
    assert found["data"]["data"][0]["originated_call_id"] == call_id
    assert found["data"]["data"][0]["comment"] == f"originated call: {call_id}"
    assert record.status_code == 200 and record.content[:4] == b"RIFF"


async def test_api_requests_send_the_pbx_events() -> None:
    receiver = Receiver()
    async with (
        serve(receiver.app) as url,
        simulator(_options(url, calls_per_minute=0)) as sim,
        httpx.AsyncClient(
            base_url=sim.api_url,
            auth=("apiuser", "change-me"),
            headers={"X-APIKEY": "change-me"},
        ) as api,
    ):
        await api.post("pbx/users/add", json={"name": "N", "number": "170", "secret": "s"})
        await api.post("setting/ping/act", json={})
        await api.post("pbx/faxes/add", json={"to": "02188776655", "text": "hello"})
        await receiver.wait_for(lambda r: len(r.events()) >= 3)
    got = {e.name: e.payload for e in receiver.events()}
    assert got["ExtenAdded"] == {"event_name": "ExtenAdded", "exten": "170", "state": "Unavailable"}
    assert got["Ping"] == {"event_name": "Ping"}
    assert got["OutgoingFax"]["state"] == "SENDING"
    assert json.dumps(got)  # plain JSON all the way


async def test_a_running_campaign_reports_each_number() -> None:
    receiver = Receiver()
    async with (
        serve(receiver.app) as url,
        simulator(_options(url, calls_per_minute=0)) as sim,
        httpx.AsyncClient(
            base_url=sim.api_url,
            auth=("apiuser", "change-me"),
            headers={"X-APIKEY": "change-me"},
        ) as api,
    ):
        trunk = (await api.post("autodialer/trunks/search", json={"alike": "true"})).json()
        await api.post(
            "autodialer/campaigns/add",
            json={
                "name": "spring",
                "trunk_manager_id": trunk["data"][0]["_id"],
                "numbers": ["09121110001", "09121110002"],
                "start": "2000-01-01 00:00",
                "end": "2100-01-01 00:00",
            },
        )
        await receiver.wait_for(lambda r: len(r.events()) >= 2)
        reports = (
            await api.post(
                "autodialer/reports/search",
                json={"alike": "false", "conditions": {"number": "09121110002"}},
            )
        ).json()
        cdr_id = reports["data"]["data"][0]["tries"][0]["cdr_id"]["$oid"]
        info = (await api.post("autodialer/reports/info", json={"_id": cdr_id})).json()
    got = [e.payload for e in receiver.events()]
    assert [(e["event_name"], e["number"], e["campaign"]) for e in got] == [
        ("AutoDialerReport", "09121110001", "spring"),
        ("AutoDialerReport", "09121110002", "spring"),
    ]
    assert info["success"] == 1 and info["data"]["dcontext"] == "autodialer"


@pytest.mark.parametrize(
    "events",
    [
        [
            ("NewState", {"exten": "1", "state": "InUse", "unique_id": "a"}),
            ("NewState", {"exten": "1", "state": "Ringing", "unique_id": "a"}),
        ],
        [("NewState", {"exten": "1", "state": "Ringing", "unique_id": "a"})],  # never Idle
        [("IncomingCall", {"unique_id": "b"})],  # another call's id
        [
            (
                "Cdr",
                {"unique_id": "a", "duration": 1, "billsec": 0, "starttime": "1", "endtime": "2"},
            ),
            ("IncomingCall", {"unique_id": "a"}),
        ],
    ],
)
def test_the_order_check_rejects_invalid_histories(events: list[tuple[str, Any]]) -> None:
    with pytest.raises(AssertionError):
        check_call_order(events, "a")
