"""Helpers shared by the simulator tests (not a test module)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from bridge.httpserver import serve
from bridge.simulator.api import ApiReactions, create_api_app
from bridge.simulator.options import SimulatorOptions
from bridge.simulator.state import SimState, seed
from tests.helpers.env import FIXTURES

COLLECTION = FIXTURES / "postman_collection.json"


@dataclass(frozen=True)
class PostmanRequest:
    path: str
    mode: str  # raw | formdata
    body: dict[str, Any]


def postman_requests() -> list[PostmanRequest]:
    collection = json.loads(COLLECTION.read_text("utf-8"))
    out: list[PostmanRequest] = []

    def walk(items: list[dict[str, Any]]) -> None:
        for item in items:
            if "item" in item:
                walk(item["item"])
                continue
            request = item["request"]
            raw_url = request["url"]["raw"] if isinstance(request["url"], dict) else request["url"]
            path = raw_url.split("{{api_v4_address}}/", 1)[1]
            body = request.get("body") or {}
            mode = body.get("mode", "raw")
            out.append(PostmanRequest(path, mode, json.loads(body["raw"]) if mode == "raw" else {}))

    walk(collection["item"])
    return out


def postman_credentials() -> tuple[str, str, str]:
    variables = {v["key"]: v["value"] for v in json.loads(COLLECTION.read_text())["variable"]}
    return variables["auth_user"], variables["auth_pass"], variables["api_key"]


@asynccontextmanager
async def api_client(
    options: SimulatorOptions | None = None,
    state: SimState | None = None,
    sink: ApiReactions | None = None,
    *,
    auth: bool = True,
) -> AsyncIterator[tuple[httpx.AsyncClient, SimState]]:
    """The simulated API served by uvicorn on a free port, and a client with its credentials."""
    options = options or SimulatorOptions(port=0, event_url=None, seed=7)
    state = state if state is not None else seed(SimState(rng=random.Random(7)))
    async with serve(create_api_app(state, options, sink)) as url:
        kwargs: dict[str, Any] = {}
        if auth:
            kwargs = {
                "auth": (options.username, options.password),
                "headers": {"X-APIKEY": options.api_key},
            }
        async with httpx.AsyncClient(base_url=url + options.base_path, timeout=5, **kwargs) as c:
            yield c, state


# A small webhook receiver (a stand-in for the bridge's ingress), served by uvicorn.


@dataclass
class Received:
    kind: str  # "event" or "component"
    name: str  # event name (from the path or the payload) or component
    method: str
    path: str
    content_type: str
    authorization: str | None
    payload: dict[str, Any]


class Receiver:
    """Records every webhook and component request; answers components from `answers`."""

    def __init__(self, answers: dict[str, dict[str, Any]] | None = None) -> None:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        self.answers = answers or {}
        self.got: list[Received] = []
        self._changed = asyncio.Event()

        async def receive(request: Request) -> JSONResponse:
            ctype = request.headers.get("content-type", "")
            if ctype.startswith("application/json"):
                payload = await request.json()
            elif ctype.startswith("application/x-www-form-urlencoded"):
                async with request.form() as form:
                    payload = {k: str(v) for k, v in form.items()}
            else:
                payload = dict(request.query_params)
            parts = request.url.path.rstrip("/").split("/")
            kind = "component" if "components" in parts else "event"
            name = (
                parts[-1]
                if parts[-1] not in ("events",)
                else str(payload.get("event_name") or payload.get("event"))
            )
            self.got.append(
                Received(
                    kind,
                    name,
                    request.method,
                    request.url.path,
                    ctype,
                    request.headers.get("authorization"),
                    payload,
                )
            )
            self._changed.set()
            if kind == "component":
                return JSONResponse(self.answers.get(name, {"ok": "0"}))
            return JSONResponse({"ok": True})

        paths = [
            "/webhooks/simotel/events",
            "/webhooks/simotel/events/{name}",
            "/webhooks/simotel/components/{name}",
        ]
        self.app = Starlette(routes=[Route(p, receive, methods=["GET", "POST"]) for p in paths])

    def events(self) -> list[Received]:
        return [r for r in self.got if r.kind == "event"]

    async def wait_for(self, predicate: Any, timeout: float = 10) -> None:
        """Wait (bounded) until predicate(self) is true; checked after every request."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()


def check_call_order(events: list[tuple[str, dict[str, Any]]], unique_id: str) -> None:
    """The invariants of one call's events: one call id; NewState moves each extension
    Idle -> Ringing -> InUse -> Idle (or straight to InUse when it dials); every extension ends
    Idle; CdrQueue and Survey before the one Cdr, which is last."""
    names = [n for n, _ in events]
    for name, payload in events:
        if "unique_id" in payload:
            assert payload["unique_id"] == unique_id, (name, payload)
    state: dict[str, str] = {}
    allowed = {"Ringing": {"Idle"}, "InUse": {"Ringing", "Idle"}, "Idle": {"Ringing", "InUse"}}
    for name, payload in events:
        if name == "NewState":
            exten, new = payload["exten"], payload["state"]
            assert state.get(exten, "Idle") in allowed[new], (exten, state.get(exten), new, names)
            state[exten] = new
        if name == "Transfer":
            assert state.get(payload["transferer"]) == "InUse", names
    assert all(s == "Idle" for s in state.values()), (state, names)
    if "Cdr" in names:
        assert names.count("Cdr") == 1 and names[-1] == "Cdr", names
        cdr = events[-1][1]
        assert int(cdr["duration"]) >= int(cdr["billsec"]) >= 0
        assert cdr["starttime"] <= cdr["endtime"]
    for before in ("CdrQueue", "Survey"):
        if before in names:
            assert names.index(before) < names.index("Cdr"), names
    if "IncomingCall" in names:
        assert names[0] == "IncomingCall", names
