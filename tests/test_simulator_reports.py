"""The simulator's CDR and queue tables agree with the webhooks it sends (same ids and times),
its times are never ahead of the clock, and a share of webhooks can be dropped."""

from __future__ import annotations

import time
from typing import Any

from bridge import cdr
from bridge.httpserver import serve
from bridge.simulator import SimulatorOptions, simulator
from tests.helpers.simulator import Receiver

ANSWERS = {
    "SmartApi": {"ok": "1", "commands": "Exit('queue')"},
}


def _options(url: str, **kw: Any) -> SimulatorOptions:
    base: dict[str, Any] = {
        "port": 0,
        "event_url": f"{url}/webhooks/simotel/events",
        "webhook_username": "simotel",
        "webhook_password": "secret",
        "time_scale": 0,
        "seed": 5,
    }
    base.update(kw)
    return SimulatorOptions(**base)


async def test_tables_match_the_webhooks_and_no_time_is_in_the_future() -> None:
    receiver = Receiver(ANSWERS)
    async with serve(receiver.app) as url, simulator(_options(url)) as sim:
        ids = [await sim.calls.call("inbound") for _ in range(6)]
        ids += [await sim.calls.call("outbound") for _ in range(2)]
        async with sim_client(sim) as client:
            ordered = (await client.post("reports/cdr/ordered/id", json={"_id": ""})).json()
            queue = (await client.post("reports/queue/ordered/id", json={"_id": ""})).json()
    received_at = time.time()
    cdrs = {r.payload["unique_id"]: r.payload for r in receiver.events() if r.name == "Cdr"}
    assert set(cdrs) == set(ids)
    rows = ordered["data"]["data"]
    assert [r["cuid"] for r in rows] == [c for c in ids if c in cdrs]
    for row in rows:
        hook = cdrs[row["cuid"]]
        fields = cdr.cdr_fields(row)
        # The same call, the same times (the record keeps whole seconds) and durations.
        for key in ("starttime", "endtime"):
            assert abs(cdr.to_epoch(fields[key]) - cdr.to_epoch(hook[key])) < 1.0, key  # type: ignore[operator]
        assert (fields["duration"], fields["billsec"], fields["disposition"]) == (
            hook["duration"],
            hook["billsec"],
            hook["disposition"],
        )
        assert row[hook["disposition"]] == 1 and row[hook["type"]] == 1
        assert isinstance(row["endtime"]["$date"]["$numberLong"], str)
    # Times true to the clock: nothing ends after the webhook carrying it was received.
    for r in receiver.events():
        for key in ("endtime", "date", "starttime"):
            if isinstance(r.payload.get(key), str):
                assert cdr.to_epoch(r.payload[key]) <= received_at, (r.name, key)  # type: ignore[operator]
    queue_rows = queue["data"]["data"]
    hooks = {r.payload["unique_id"] for r in receiver.events() if r.name == "CdrQueue"}
    assert queue_rows and {r["cuid"] for r in queue_rows} == hooks


async def test_a_time_scale_below_one_keeps_times_in_the_past() -> None:
    receiver = Receiver(ANSWERS)
    # Simulated time runs 1000 times faster than the clock: the call starts in the past.
    async with serve(receiver.app) as url, simulator(_options(url, time_scale=0.001)) as sim:
        await sim.calls.call("internal")
    for r in receiver.events():
        if r.name == "Cdr":
            assert cdr.to_epoch(r.payload["endtime"]) <= time.time()  # type: ignore[operator]


async def test_a_share_of_webhooks_is_dropped_but_kept_in_the_tables() -> None:
    receiver = Receiver(ANSWERS)
    async with serve(receiver.app) as url, simulator(_options(url, drop_webhooks=0.5)) as sim:
        ids = [await sim.calls.call("internal") for _ in range(20)]
        rows = sim.state.table("cdr")
    sent = {r.payload["unique_id"] for r in receiver.events() if r.name == "Cdr"}
    assert sim.calls.dropped > 0
    assert 0 < len(sent) < len(ids)
    assert {r["cuid"] for r in rows} == set(ids)


def sim_client(sim: Any) -> Any:
    import httpx

    return httpx.AsyncClient(
        base_url=sim.api_url, auth=("apiuser", "change-me"), headers={"X-APIKEY": "change-me"}
    )
