"""The thin, I/O side of the call generator: turns flow steps into HTTP requests to the bridge
(events in one of the four delivery forms, component requests with Simotel's 1 s patience),
paces them in real time, starts calls at the configured rate, and plays what API requests set
off (originate, ExtenAdded, Ping, ...). Everything it sends is also learnt by the state, so
reports and recordings match the webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Mapping
from typing import Any

import httpx
import orjson
import structlog

from bridge.simulator import flows, scenarios
from bridge.simulator.options import Delivery, SimulatorOptions
from bridge.simulator.replies import OriginateRequest
from bridge.simulator.state import Record, SimState

log = structlog.get_logger("bridge.simulator.calls")

# The longest a simulated call lasts (simulated seconds); calls under a time_scale below 1 start
# this much earlier (scaled), so that their times are never ahead of the clock.
MAX_CALL_S = 300.0


def _flat(payload: Mapping[str, Any]) -> dict[str, str]:
    """Query/form values are strings; nested values travel as JSON text
    (docs/simotel/webhooks.md leaves their encoding open)."""
    out: dict[str, str] = {}
    for key, value in payload.items():
        if value is None:
            out[key] = ""
        elif isinstance(value, dict | list):
            out[key] = orjson.dumps(value).decode()
        else:
            out[key] = str(value)
    return out


def event_request(url: str, delivery: Delivery, event: str, payload: Record) -> httpx.Request:
    """The request Simotel sends for one event: G4 JSON POST to the configured address, Rest4
    JSON POST to `<address>/<EventName>`, a GET with a query string, or a form POST."""
    if delivery == "rest4":
        return httpx.Request("POST", f"{url.rstrip('/')}/{event}", json=payload)
    return _request(url, delivery, payload)


def component_request(
    base: str, delivery: Delivery, component: str, request: Mapping[str, str]
) -> httpx.Request:
    return _request(f"{base}/{component}", delivery, request)


def _request(url: str, delivery: Delivery, payload: Mapping[str, Any]) -> httpx.Request:
    if delivery == "get":
        return httpx.Request("GET", url, params=_flat(payload))
    if delivery == "form":
        return httpx.Request("POST", url, data=_flat(payload))
    return httpx.Request("POST", url, json=payload)


class CallGenerator:
    """Plays flows against the bridge. Also the API's `ApiReactions`."""

    def __init__(
        self,
        state: SimState,
        options: SimulatorOptions,
        client: httpx.AsyncClient,
        rng: random.Random | None = None,
    ) -> None:
        self.state = state
        self.options = options
        self.client = client
        self.rng = rng or random.Random(options.seed)
        self.busy: set[str] = set()
        self.sent = 0
        self.dropped = 0
        self.drop_rng = random.Random(None if options.seed is None else options.seed + 2)
        self._seq = self.rng.randint(100, 999)
        self._tasks: set[asyncio.Task[None]] = set()
        self._auth: httpx.BasicAuth | None = None
        if options.webhook_username:
            self._auth = httpx.BasicAuth(options.webhook_username, options.webhook_password or "")

    # the PBX's view

    def pbx(self) -> flows.Pbx:
        queues = {
            str(q["number"]): tuple(
                a for a in self.state.agents_of(str(q["number"])) if a not in self.busy
            )
            for q in self.state.table("queues")
        }
        trunks = self.state.table("trunks")
        box = self.state.table("voicemails")
        return flows.Pbx(
            extensions=tuple(self.state.extensions()),
            queues=queues,
            trunk=str(trunks[0]["name"]) if trunks else "SimotelTrunk",
            voicemail_box=str(box[0]["number"]) if box else None,
        )

    def new_call(self) -> flows.Call:
        """A call starting now, with the next `<epoch>.<seq>` unique id. With `time_scale`
        below 1 simulated time runs ahead of the clock, so the call starts in the past (by at
        most MAX_CALL_S): no time in a webhook or a record is ever in the future."""
        self._seq += 1
        now = self.state.clock()
        scale = self.options.time_scale
        start = now - (1 - scale) * MAX_CALL_S if scale < 1 else now
        return flows.Call(
            f"{int(start)}.{self._seq}",
            start,
            random.Random(self.rng.random()),
            self.pbx(),
            components=self.options.components_base is not None,
        )

    # playing

    async def play(self, flow: flows.Flow, call: flows.Call | None = None) -> None:
        """Run one flow to its end, pacing its steps by `time_scale`. With the flow's `call`,
        no webhook leaves before the clock reaches the times it carries."""
        answer: flows.AskResult = None
        try:
            step = next(flow)
            while True:
                if step.after > 0 and self.options.time_scale > 0:
                    await asyncio.sleep(step.after * self.options.time_scale)  # simulated time
                if call is not None and isinstance(step, flows.Send):
                    ahead = call.now() - self.state.clock()
                    if ahead > 0:
                        await asyncio.sleep(ahead)  # pacing: a time in a webhook is never ahead
                if isinstance(step, flows.Send):
                    self._track(step.payload)
                    await self.deliver(step.event, step.payload)
                    answer = None
                else:
                    answer = await self.ask(step.component, step.request)
                step = flow.send(answer)
        except StopIteration:
            return

    def _track(self, payload: Record) -> None:
        if payload.get("event_name") == "NewState":
            exten = str(payload.get("exten"))
            if payload.get("state") == "Idle":
                self.busy.discard(exten)
            else:
                self.busy.add(exten)

    async def deliver(self, event: str, payload: Record) -> None:
        """Send one event webhook, best effort and once, like Simotel; the state learns it.
        A share `drop_webhooks` of them is lost on the way (the reports still have them)."""
        self.state.learn(event, payload)
        if not self.options.event_url:
            return
        if self.options.drop_webhooks and self.drop_rng.random() < self.options.drop_webhooks:
            self.dropped += 1
            log.info(
                "webhook dropped (fault)", webhook_event=event, call_id=payload.get("unique_id")
            )
            return
        request = event_request(self.options.event_url, self.options.delivery, event, payload)
        try:
            response = await self.client.send(self._authed(request), auth=self._auth)
            self.sent += 1
            log.info(
                "webhook",
                webhook_event=event,
                status=response.status_code,
                call_id=payload.get("unique_id"),
            )
        except httpx.HTTPError as exc:
            log.warning("webhook not delivered", webhook_event=event, error=repr(exc))

    async def ask(self, component: str, request: Mapping[str, str]) -> flows.AskResult:
        """A component request; None when there is no usable answer within the timeout."""
        base = self.options.components_base
        if base is None:
            return None
        http = component_request(base, self.options.delivery, component, request)
        try:
            response = await self.client.send(self._authed(http), auth=self._auth)
            answer = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("component failed", component=component, error=repr(exc))
            return None
        log.info("component", component=component, app_name=request.get("app_name"), answer=answer)
        return answer if isinstance(answer, dict) else None

    def _authed(self, request: httpx.Request) -> httpx.Request:
        request.extensions["timeout"] = httpx.Timeout(
            self.options.component_timeout if "/components/" in str(request.url) else 5.0
        ).as_dict()
        return request

    async def call(self, scenario: str = "inbound") -> str:
        """Place one call (a name in scenarios.SCENARIOS), wait for its end; its unique id."""
        c = self.new_call()
        too_few = 1 if scenario == "outbound" else 2 if scenario == "internal" else 0
        if len(c.pbx.extensions) < too_few:
            scenario = "inbound"
        await self.play(scenarios.SCENARIOS[scenario](c), c)
        return c.unique_id

    # background work

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("simulated call failed", exc_info=task.exception())

    def emit(self, event: str, payload: Record) -> None:
        """ApiReactions: an event an API request caused (sent in the background)."""
        self._spawn(self.deliver(event, payload))

    def originate(self, request: OriginateRequest) -> None:
        """ApiReactions: play an originate's webhooks after `originate_delay`."""
        self._spawn(self._originate(request))

    async def _originate(self, request: OriginateRequest) -> None:
        await asyncio.sleep(self.options.originate_delay)  # the PBX starts dialling
        c = self.new_call()
        await self.play(scenarios.originate(c, request, self.options.originate_answer_rate), c)

    async def run(self, stop: asyncio.Event) -> None:
        """Start calls at `calls_per_minute` (Poisson arrivals; the first at once) until stop."""
        rate = self.options.calls_per_minute
        if rate <= 0:
            await stop.wait()
            return
        names, weights = zip(*scenarios.WEIGHTS.items(), strict=True)
        delay = 0.0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
                return
            self._spawn(self.call(self.rng.choices(names, weights)[0]))
            delay = self.rng.expovariate(rate / 60)

    async def aclose(self, grace: float = 2.0) -> None:
        """Let calls in progress finish for `grace` seconds, then cancel the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            log.info("calls cancelled at shutdown", count=len(pending))
            await asyncio.wait(pending, timeout=grace)
