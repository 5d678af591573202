"""Real clients against the simulator: the PyPI client `simotel-connect` (a dev dependency; it is
synchronous, so it runs in a thread while the simulator serves in the event loop) sends PUT with
a JSON body for most calls, multipart PUT for uploads and POST (or GET) with query parameters for
downloads. Every one of the 80 API v4 calls is served in those shapes, and in the form and
query-string shapes PHP clients send; `date_range` takes Jalali dates."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from simotel_connect import Simotel
from simotel_connect.exceptions import SimotelAPIError

from bridge.catalog import CATALOG
from bridge.simulator import SimState, SimulatorOptions, media
from bridge.simulator.state import seed
from tests.helpers.simulator import api_client, postman_requests

OPTIONS = SimulatorOptions(port=0, event_url=None, seed=3)
UPLOADS = {
    "pbx/announcements/upload": ("welcome.wav", media.tone_wav("w")),
    "autodialer/announcements/upload": ("promo.wav", media.tone_wav("p")),
    "pbx/faxes/upload": ("contract.tiff", media.fax_tiff("c")),
    "autodialer/groups/upload": ("numbers.csv", b"09121111111\n09122222222\n"),
}


def connect(api_url: str) -> Simotel:
    host_port = api_url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.split(":")
    sm = Simotel(
        host=host,
        port=int(port),
        scheme="http",
        api_key=OPTIONS.api_key,
        username=OPTIONS.username,
        password=OPTIONS.password,
        timeout=10,
    )
    sm._client.debug = False  # it prints every request as curl otherwise
    return sm


def state_with_calls() -> SimState:
    state = seed(SimState(rng=random.Random(3)))
    state.learn(
        "Cdr",
        {
            "event_name": "Cdr",
            "unique_id": "1610778618.378",
            "src": "991",
            "dst": "993",
            "type": "local",
            "disposition": "ANSWERED",
            "duration": 20,
            "billsec": 9,
            "wait": 11,
            "starttime": "2021-01-16 06:30:37.471398",
            "endtime": "2021-01-16 06:30:57.471398",
        },
    )
    return state


async def test_every_call_of_simotel_connect_is_served(tmp_path: Path) -> None:
    """All 80: JSON PUT, multipart PUT, downloads by POST with query parameters and by GET."""
    bodies = {r.path: r.body for r in postman_requests()}
    assert set(bodies) == set(CATALOG)
    statuses: dict[str, str] = {}
    async with api_client(OPTIONS, state_with_calls()) as (client, _):
        sm = connect(str(client.base_url))
        http = sm._client

        def call(path: str) -> str:
            endpoint = CATALOG[path]
            body = bodies[path]
            try:
                if endpoint.is_upload:
                    name, data = UPLOADS[path]
                    (tmp_path / name).write_bytes(data)
                    http.upload(path, "file", str(tmp_path / name), {})
                elif endpoint.is_download:
                    params = {k: str(v) for k, v in body.items()}
                    for method in ("POST", "GET"):
                        try:
                            http.download(path, params=params, method=method)
                        except Exception as exc:  # 404 for a file that is not there is fine
                            if "404" not in str(exc):
                                raise
                else:
                    http.request(path, body, method="PUT")
            except SimotelAPIError:
                return "answered: success 0"  # a business answer: the service was reached
            return "answered"

        for path in sorted(CATALOG):
            statuses[path] = await asyncio.to_thread(call, path)
    assert len(statuses) == 80
    assert set(statuses.values()) <= {"answered", "answered: success 0"}
    # Most calls are accepted outright with the collection's bodies; the others name records
    # that do not exist (the collection's own ids), and Simotel answers those with success 0.
    assert sum(v == "answered" for v in statuses.values()) >= 50, statuses


async def test_the_cursor_and_search_calls_of_simotel_connect() -> None:
    async with api_client(OPTIONS, state_with_calls()) as (client, _):
        sm = connect(str(client.base_url))
        # cdr_ordered: a POST download with `id` in the query string and `{}` as the body.
        raw = await asyncio.to_thread(sm.reports.cdr_ordered, "")
        page = orjson.loads(raw)["data"]
        assert [r["cuid"] for r in page["data"]] == ["1610778618.378"]
        assert page["last_id"] == page["data"][0]["_id"]
        again = orjson.loads(await asyncio.to_thread(sm.reports.cdr_ordered, page["last_id"]))
        assert again["data"]["data"] == []
        # Jalali dates in date_range: 1399-10-27 is 2021-01-16.
        found = await asyncio.to_thread(
            sm.reports.cdr_search,
            from_date="1399-10-27 00:00",
            to_date="1399-10-27 23:59",
            alike="true",
            method="PUT",
        )
        assert [r["cuid"] for r in found.data["data"]] == ["1610778618.378"]
        outside = await asyncio.to_thread(
            sm.reports.cdr_search,
            from_date="1399-10-28 00:00",
            to_date="1399-10-29 00:00",
            alike=True,
        )
        assert outside.data["data"] == []


@pytest.mark.parametrize("shape", ["form", "query", "multipart"])
async def test_parameters_from_a_form_or_the_query_string(shape: str) -> None:
    fields = {
        "alike": "true",
        "conditions[cuid]": "1610778618.378",
        "date_range[from]": "2021-01-16 00:00",
        "date_range[to]": "2021-01-17 00:00",
        "pagination[start]": "0",
        "pagination[count]": "20",
    }
    async with api_client(OPTIONS, state_with_calls()) as (client, _):
        kwargs: dict[str, Any]
        if shape == "form":
            kwargs = {"data": fields}
        elif shape == "query":
            kwargs = {"params": fields}
        else:
            kwargs = {"data": fields, "files": {"unused": ("x.txt", b"x")}}
        r = await client.put("reports/cdr/search", **kwargs)
        assert r.status_code == 200, r.text
        assert [x["cuid"] for x in r.json()["data"]["data"]] == ["1610778618.378"]
        r = await client.post("reports/cdr/search", **kwargs)
        assert r.json()["data"]["pagination"]["count"] == 20


async def test_verbs_outside_put_and_post_are_refused() -> None:
    async with api_client(OPTIONS, state_with_calls()) as (client, _):
        assert (await client.get("reports/cdr/search")).status_code == 405
        assert (await client.patch("reports/cdr/search", json={})).status_code == 405
        r = await client.get("reports/audio/download", params={"file": "nope.wav"})
        assert r.status_code == 404  # a download by GET is served: the file is not there
