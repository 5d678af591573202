"""The simulated API v4: every catalog endpoint, driven with the request bodies of Simotel's own
Postman collection, answers in its documented shape; plus the documented errors, state, files
and faults."""

from __future__ import annotations

import io
import json
import re
import time
import wave
from typing import Any

import httpx
import pytest

from bridge.catalog import CATALOG
from bridge.simulator import media
from bridge.simulator.options import Faults, SimulatorOptions
from tests.helpers.env import FIXTURES
from tests.helpers.simulator import (
    PostmanRequest,
    api_client,
    postman_credentials,
    postman_requests,
)

OBJECT_ID = re.compile(r"^[0-9a-f]{24}$")
POSTMAN = postman_requests()
USER, PASSWORD, KEY = postman_credentials()
OPTIONS = SimulatorOptions(
    port=0, event_url=None, username=USER, password=PASSWORD, api_key=KEY, seed=3
)
# Which table each resource's update/remove ids come from (found by searching after the add).
_RESOURCES = (
    "pbx/users",
    "pbx/trunks",
    "pbx/queues",
    "pbx/blacklists",
    "pbx/whitelists",
    "pbx/announcements",
    "voicemails/voicemails",
    "autodialer/contacts",
    "autodialer/groups",
    "autodialer/campaigns",
    "autodialer/announcements",
)
_UPLOADS = {
    "pbx/announcements/upload": ("welcome.wav", media.tone_wav("w"), "audio/wav"),
    "autodialer/announcements/upload": ("promo.wav", media.tone_wav("p"), "audio/wav"),
    "pbx/faxes/upload": ("contract.tiff", media.fax_tiff("c"), "image/tiff"),
    "autodialer/groups/upload": ("numbers.csv", b"09121111111\n09122222222,x\n", "text/csv"),
}


def test_the_collection_covers_the_catalog() -> None:
    paths = [r.path for r in POSTMAN]
    assert len(paths) == len(set(paths)) == 80
    assert set(paths) == set(CATALOG)


def _ordered(requests: list[PostmanRequest]) -> list[PostmanRequest]:
    """add, then search, then update, then remove, so the update and remove find a record."""
    rank = {"upload": 0, "add": 1, "search": 2, "update": 3, "remove": 4}
    return sorted(requests, key=lambda r: rank.get(r.path.rsplit("/", 1)[1], 2))


def _envelope(answer: Any) -> Any:
    assert set(answer) == {"success", "message", "data"}, answer
    assert answer["success"] == 1, answer
    assert answer["message"] is None or isinstance(answer["message"], str)
    return answer["data"]


def _check_paginated(data: Any, *, target: str | None) -> None:
    assert set(data["pagination"]) == {"start", "count", "sorting", "total"}
    assert isinstance(data["data"], list)
    assert data["pagination"]["total"] >= len(data["data"])
    if target is not None:
        assert data["target"] == target and data["useGroupBy"] is False


_PAGED = {
    "pbx/faxes/search": None,
    "voicemails/inbox/search": None,
    "reports/quick/search": None,
    "reports/cdr/search": "cdr",
    "reports/queue/search": "queue_stat",
    "reports/queue_details/search": "queue",
    "reports/agent/search": "agent",
    "reports/poll/search": "poll",
    "autodialer/campaigns/search": None,
    "autodialer/contacts/search": None,
    "autodialer/groups/search": None,
    "autodialer/reports/search": None,
}


def _check_shape(path: str, response: httpx.Response) -> None:
    kind = CATALOG[path].kind
    if kind == "download":  # the collection asks for files this PBX never had
        assert response.status_code == 404
        assert not response.headers["content-type"].startswith("application/json")
        return
    assert response.status_code == 200, response.text
    answer = response.json()
    if path == "pbx/users/add":  # documented: not the envelope
        assert answer == {
            "status": "success",
            "message": "User created successfully",
            "user_id": "999999",
        }
        return
    data = _envelope(answer)
    verb = path.rsplit("/", 1)[1]
    if kind == "upload":
        assert re.match(
            r"^(sen_)?file-\d{14}-\d+-[a-z0-9-]+(_\.wav|_\.tiff|\.csv)$", data["filename"]
        )
    elif path in ("pbx/blacklists/add", "pbx/whitelists/add", "autodialer/contacts/add"):
        assert data == {"_id": None}
    elif verb == "add":
        assert set(data) == {"_id"} and OBJECT_ID.match(data["_id"])
    elif path == "autodialer/groups/update":
        assert data["name"] == "test_group_new" and data["numbers"] == ["1111", "2222", "3333"]
        assert data["count"] == 3 and "$date" in data["date"]
    elif path == "autodialer/campaigns/update":
        assert data == {"count": 0}
    elif verb in ("update", "remove"):
        assert data == ""
    elif path in _PAGED:
        _check_paginated(data, target=_PAGED[path])
    elif path.endswith("/ordered/id"):
        assert set(data) == {"last_id", "data"} and isinstance(data["data"], list)
    elif re.search(r"/batch\w+agent$", path):
        assert data["ok"] in (0, 1) and len(data["Data"]) == 3
        number_key = "agents" if verb == "batchaddagent" else "agent"
        assert {number_key, "queue", "message", "ok"} <= set(data["Data"][0])
    elif verb.endswith("agent"):
        assert set(data) == {"message", "ok"}
    elif path == "call/originate/act":
        assert answer["message"] is None
        assert re.match(r"^orig\.call\.\d+\.\d+$", data["originated_call_id"])
    elif path == "setting/ping/act":
        assert data is None
    elif path == "autodialer/reports/info":
        assert set(data) == {"dcontext", "amaflags", "channel", "duration", "wait"}
    else:  # plain searches and reports/quick/info answer an array
        assert isinstance(data, list), (path, data)


async def test_every_postman_request_is_answered_in_the_documented_shape() -> None:
    async with api_client(OPTIONS) as (client, state):
        for name in ("Cdr", "CdrQueue", "Survey"):  # one finished call in the reports
            state.learn(name, json.loads((FIXTURES / f"event-{name}.json").read_text()))
        seen: set[str] = set()
        for request in _ordered(POSTMAN):
            body = dict(request.body)
            prefix, verb = request.path.rsplit("/", 1)
            if prefix in _RESOURCES and verb in ("update", "remove"):
                table = {**{p: t for p, t in zip(_RESOURCES, _TABLES, strict=True)}}[prefix]
                body["_id"] = state.table(table)[-1]["_id"]  # what the add created
            elif request.path == "autodialer/reports/info":
                body["_id"] = state.table("cdr")[-1]["_id"]
            elif request.path == "autodialer/trunks/update":
                body["_id"] = state.table("ad_trunks")[0]["_id"]
            if request.mode == "formdata":
                response = await client.post(request.path, files={"file": _UPLOADS[request.path]})
            else:
                response = await client.post(request.path, json=body)
            _check_shape(request.path, response)
            seen.add(request.path)
        assert seen == set(CATALOG)


_TABLES = (
    "users",
    "trunks",
    "queues",
    "blacklists",
    "whitelists",
    "announcements",
    "voicemails",
    "contacts",
    "groups",
    "campaigns",
    "ad_announcements",
)


# authentication and HTTP errors


@pytest.mark.parametrize(
    ("mode", "basic", "key", "status", "message"),
    [
        ("both", None, None, 401, "BasicAuth or ApiKey is missing"),
        ("both", ("apiuser", "change-me"), None, 401, "BasicAuth or ApiKey is invalid"),
        ("both", None, "change-me", 401, "BasicAuth or ApiKey is invalid"),
        ("both", ("apiuser", "wrong"), "change-me", 401, "BasicAuth or ApiKey is invalid"),
        ("both", ("apiuser", "change-me"), "wrong", 401, "BasicAuth or ApiKey is invalid"),
        ("both", ("apiuser", "change-me"), "change-me", 200, None),
        ("basic", ("apiuser", "change-me"), None, 200, None),
        ("basic", None, "change-me", 401, "BasicAuth or ApiKey is invalid"),
        ("apikey", None, "change-me", 200, None),
        ("apikey", ("apiuser", "change-me"), "nope", 401, "BasicAuth or ApiKey is invalid"),
    ],
)
async def test_authentication(
    mode: Any, basic: tuple[str, str] | None, key: str | None, status: int, message: str | None
) -> None:
    options = SimulatorOptions(port=0, event_url=None, auth=mode)
    async with api_client(options, auth=False) as (client, _):
        headers = {"X-APIKEY": key} if key else {}
        response = await client.post(
            "setting/ping/act", json={}, auth=basic or httpx.USE_CLIENT_DEFAULT, headers=headers
        )
    assert response.status_code == status
    if message is not None:
        assert response.json() == {"success": 0, "message": message, "data": None}
    else:
        assert response.json()["success"] == 1


async def test_http_errors_as_documented() -> None:
    options = SimulatorOptions(port=0, event_url=None, denied_paths=("pbx/users/add",))
    async with api_client(options) as (client, _):
        r = await client.post("pbx/users/add", json={"name": "a", "number": "1", "secret": "s"})
        assert (r.status_code, r.json()["message"]) == (403, "/pbx/users/add;Access denied")
        r = await client.get("pbx/users/search")
        assert (r.status_code, r.json()["message"]) == (405, "Method not allowed")
        r = await client.delete("pbx/users/search")
        assert (r.status_code, r.json()["message"]) == (405, "Method not allowed")
        r = await client.post(
            "pbx/users/search", content=b"alike=true", headers={"content-type": "text/plain"}
        )
        assert (r.status_code, r.json()["message"]) == (415, "Unsupported Media Type")
        r = await client.post("pbx/announcements/upload", json={"file": "x"})
        assert (r.status_code, r.json()["message"]) == (415, "Unsupported Media Type")
        r = await client.post(
            "pbx/users/search", content=b'{"alike": ', headers={"content-type": "application/json"}
        )
        assert (r.status_code, r.json()["message"]) == (400, "Unable to parse content")
        r = await client.post("pbx/users/find", json={})
        assert (r.status_code, r.json()["message"]) == (501, "Requested service does not exist")
        r = await client.post(str(client.base_url.copy_with(path="/index.php")), json={})
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
        r = await client.put("setting/ping/act", json={})  # the ping page's other verb
        assert r.status_code == 200


async def test_ip_allow_list() -> None:
    options = SimulatorOptions(port=0, event_url=None, allowed_ips=("10.0.0.0/8",))
    async with api_client(options) as (client, _):
        r = await client.post("setting/ping/act", json={})
    assert (r.status_code, r.json()["message"]) == (403, "IP is not permitted")


# business behaviour and state


async def test_business_errors_and_state() -> None:
    async with api_client() as (client, state):
        user = {"name": "Bob", "number": "150", "secret": "x"}
        assert (await client.post("pbx/users/add", json=user)).json()["status"] == "success"
        again = (await client.post("pbx/users/add", json=user)).json()
        assert again == {"success": 0, "message": "This number already exists", "data": None}
        r = (await client.post("pbx/users/add", json={"name": "Ann", "secret": "x"})).json()
        assert r == {"success": 0, "message": "Field 'number':None is missing", "data": None}
        r = (await client.post("pbx/trunks/add", json={"name": "SimotelTrunk"})).json()
        assert r["message"] == "This trunk already exists"
        r = (await client.post("pbx/queues/search", json={})).json()
        assert r["message"] == "Field 'alike':None is missing"
        found = (
            await client.post(
                "pbx/users/search", json={"alike": "false", "conditions": {"number": "150"}}
            )
        ).json()
        assert [u["name"] for u in found["data"]] == ["Bob"] and found["data"][0][
            "secret"
        ] == "******"
        _id = found["data"][0]["_id"]
        r = (await client.post("pbx/users/update", json={"_id": _id, "name": "Robert"})).json()
        assert r["success"] == 1 and (state.find("users", _id) or {}).get("name") == "Robert"
        assert (await client.post("pbx/users/remove", json={"_id": _id})).json()["success"] == 1
        r = (await client.post("pbx/users/remove", json={"_id": _id})).json()
        assert r == {"success": 0, "message": "Requested operation failed", "data": None}


async def test_queue_agents_are_runtime_state() -> None:
    async with api_client() as (client, state):

        async def call(path: str, body: dict[str, Any]) -> Any:
            return _envelope((await client.post(f"pbx/queues/{path}", json=body)).json())

        member = {"queue": "902", "source": "106", "agent": "106", "penalty": "1"}
        assert await call("addagent", member) == {"message": "Added successfully", "ok": 1}
        assert (await call("addagent", member))["ok"] == 0
        users = _envelope(
            (
                await client.post(
                    "pbx/users/search", json={"alike": "false", "conditions": {"number": "106"}}
                )
            ).json()
        )
        assert users[0]["queues"] == ["903", "902"]
        assert await call("pauseagent", member) == {"message": "Paused successfully", "ok": 1}
        assert "106" not in state.agents_of("902")
        assert await call("resumeagent", member) == {"message": "UnPaused successfully", "ok": 1}
        assert await call("removeagent", member) == {"message": "Removed successfully", "ok": 1}
        assert (await call("pauseagent", member))["ok"] == 0
        batch = await call(
            "batchaddagent",
            {
                "agents": [
                    {"queue": "902", "source": "106", "agent": "106"},
                    {"queue": "999", "source": "107", "agent": "107"},
                ]
            },
        )
        assert batch["ok"] == 0 and [i["ok"] for i in batch["Data"]] == [1, 0]
        assert batch["Data"][0]["agents"] == "106"
        r = await client.post(
            "reports/agent/search",
            json={
                "alike": "true",
                "date_range": {"from": "2000-01-01 00:00", "to": "2100-01-01 00:00"},
                "conditions": {"exten": "106"},
            },
        )
        assert _envelope(r.json())["data"][0]["type"] == "inout"


async def test_paging_cursor_and_cuid_lookup() -> None:
    async with api_client() as (client, state):
        cdr = json.loads((FIXTURES / "event-Cdr.json").read_text())
        for i in range(25):
            state.learn("Cdr", {**cdr, "unique_id": f"1610778618.{i}"})
        body = {
            "alike": "true",
            "date_range": {"from": "2000-01-01 00:00", "to": "2100-01-01 00:00"},
            "pagination": {"start": 20, "count": 20, "sorting": {}},
        }
        data = _envelope((await client.post("reports/cdr/search", json=body)).json())
        assert data["pagination"]["total"] == 25 and len(data["data"]) == 5
        walked: list[str] = []
        last = ""
        for _ in range(4):
            page = _envelope(
                (await client.post("reports/cdr/ordered/id", json={"_id": last})).json()
            )
            if not page["data"]:
                assert page["last_id"] == last  # the end: nothing more, the cursor stays
                break
            walked += [r["cuid"] for r in page["data"]]
            last = page["last_id"]
        assert walked == [f"1610778618.{i}" for i in range(25)]
        by_cuid = {"alike": "false", "conditions": {"cuid": "1610778618.7"}, "date_range": {}}
        data = _envelope((await client.post("reports/quick/search", json=by_cuid)).json())
        assert [r["cuid"] for r in data["data"]] == ["1610778618.7"]
        assert data["data"][0]["ANSWERED"] == 1 and data["data"][0]["local"] == 1


async def test_downloads() -> None:
    async with api_client() as (client, state):
        state.learn("Cdr", json.loads((FIXTURES / "event-Cdr.json").read_text()))
        r = await client.post(
            "reports/audio/download", json={"file": "20210116_1610778618.378.mp3"}
        )
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        with wave.open(io.BytesIO(r.content)) as w:
            assert (w.getnchannels(), w.getframerate()) == (1, 8000) and w.getnframes() > 0
        r = await client.post("reports/audio/download", json={"file": "nope.wav"})
        assert r.status_code == 404
        fax_id = state.table("faxes")[0]["_id"]
        r = await client.post("pbx/faxes/download", json={"_id": fax_id})
        assert r.status_code == 200 and r.content[:4] == b"II*\x00"
        assert r.headers["content-type"] == "image/tiff"
        r = await client.post("pbx/faxes/download", json={"_id": "0" * 24})
        assert r.status_code == 404
        r = (await client.post("reports/audio/download", json={})).json()
        assert r == {"success": 0, "message": "Field 'file':None is missing", "data": None}


async def test_upload_then_use() -> None:
    async with api_client() as (client, state):
        r = await client.post(
            "autodialer/groups/upload",
            files={"file": ("My List.csv", b"0912111\n0912222\n", "text/csv")},
        )
        answer = r.json()
        assert answer["message"] == "" and answer["data"]["filename"].endswith("-my-listcsv.csv")
        r = await client.post(
            "autodialer/groups/add", json={"name": "g", "filename": answer["data"]["filename"]}
        )
        group = state.find("groups", _envelope(r.json())["_id"])
        assert group is not None and group["count"] == 2
        r = await client.post(
            "pbx/faxes/upload", data={"other": "x"}, files={"nofile": ("a", b"b", "text/plain")}
        )
        assert r.json()["message"] == "Field 'file':None is missing"


# faults


async def test_fault_5xx_does_not_execute() -> None:
    options = SimulatorOptions(port=0, event_url=None, faults=Faults(error_rate=1.0))
    async with api_client(options) as (client, state):
        before = len(state.table("users"))
        r = await client.post("pbx/users/add", json={"name": "a", "number": "160", "secret": "s"})
        assert r.status_code in (500, 502, 503) and len(state.table("users")) == before


async def test_fault_failure_answers_success_0() -> None:
    options = SimulatorOptions(port=0, event_url=None, faults=Faults(failure_rate=1.0))
    async with api_client(options) as (client, _):
        r = await client.post("setting/ping/act", json={})
    assert r.json() == {"success": 0, "message": "Requested operation failed", "data": None}


async def test_fault_drop_executes_then_drops() -> None:
    options = SimulatorOptions(port=0, event_url=None, faults=Faults(drop_rate=1.0))
    async with api_client(options) as (client, state):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("pbx/users/add", json={"name": "a", "number": "161", "secret": "s"})
        assert state.find_by("users", "number", "161") is not None  # it did happen


async def test_fault_latency() -> None:
    options = SimulatorOptions(port=0, event_url=None, faults=Faults(latency_ms=300))
    async with api_client(options) as (client, _):
        started = time.monotonic()
        r = await client.post("setting/ping/act", json={})
        assert r.status_code == 200 and time.monotonic() - started >= 0.3


def test_jalali_dates() -> None:
    # The CDR sample: `answer` 2022-12-02 (Gregorian) and `start` 1401-09-11 (Jalali).
    assert media.gregorian_to_jalali(2022, 12, 2) == (1401, 9, 11)
    assert media.gregorian_to_jalali(2024, 3, 20) == (1403, 1, 1)  # Nowruz
    assert media.jalali(1610778637) == "1399-10-27 06:30:37"
