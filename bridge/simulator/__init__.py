"""A Simotel in a box (`simotel-bridge simulate`): the API v4 server and a call generator that
sends webhooks and calls dialplan components the way Simotel does.

    options.py   SimulatorOptions, Faults
    state.py     the in-memory PBX (records, queue members, files); learns from its own webhooks
    handlers.py  API v4 requests -> replies (pure); reports.py: searches, reports, agents
    replies.py   reply values and Simotel's error answers
    api.py       the Starlette app: auth, checks, faults, then handlers
    faults.py    fault decisions (latency, 5xx, success 0, dropped connections)
    flows.py     call flows as pure generators of webhooks and component requests
    calls.py     sends them over HTTP, at a rate, and plays originate
    media.py     WAV/TIFF files and Jalali dates
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import structlog

from bridge.httpserver import serve
from bridge.simulator.api import create_api_app
from bridge.simulator.calls import CallGenerator
from bridge.simulator.options import DELIVERIES, Delivery, Faults, SimulatorOptions
from bridge.simulator.state import SimState, seed

__all__ = [
    "DELIVERIES",
    "CallGenerator",
    "Delivery",
    "Faults",
    "RunningSimulator",
    "SimState",
    "SimulatorOptions",
    "run_simulator",
    "simulator",
]

log = structlog.get_logger("bridge.simulator")


@dataclass(frozen=True, slots=True)
class RunningSimulator:
    api_url: str  # e.g. http://127.0.0.1:8081/api/v4/
    state: SimState
    calls: CallGenerator


@contextlib.asynccontextmanager
async def simulator(options: SimulatorOptions) -> AsyncIterator[RunningSimulator]:
    """The API served and the generator ready (not yet placing calls: see `run_simulator`)."""
    rng = random.Random(options.seed)
    state = SimState(rng=random.Random(rng.random()))
    if options.seed_data:
        seed(state)
    async with httpx.AsyncClient() as client:
        calls = CallGenerator(state, options, client, random.Random(rng.random()))
        app = create_api_app(state, options, calls)
        try:
            async with serve(app, options.host, options.port) as url:
                yield RunningSimulator(url + "/" + options.base_path.strip("/") + "/", state, calls)
        finally:
            await calls.aclose()


async def run_simulator(options: SimulatorOptions, stop: asyncio.Event) -> None:
    """Serve the API and place calls until `stop` is set."""
    async with simulator(options) as sim:
        log.info(
            "simulator running",
            api=sim.api_url,
            events=options.event_url,
            components=options.components_base,
            delivery=options.delivery,
            calls_per_minute=options.calls_per_minute,
        )
        if options.event_url:
            await sim.calls.run(stop)
        else:
            await stop.wait()
    log.info("simulator stopped", webhooks_sent=sim.calls.sent)
