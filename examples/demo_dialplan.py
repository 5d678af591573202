"""The responder of the quick-start demo: answers the dialplan components of the built-in
simulator (`simotel-bridge simulate`), so the demo shows live call routing end to end.

Simulated dialplan: SmartApi "s1" greets and asks for a choice, SmartApi "s2" routes on the
digit (1: IVR, 2: an extension picked by ExtenApi, else the queue); ExtenApi picks an agent;
IvrApi sends menu choice 1 to the queue and anything else to an extension; TrunkApi dials
the number asked for.

    .venv/bin/python examples/demo_dialplan.py --amqp amqp://guest:guest@127.0.0.1/

It prints one line per routed call (`route`), so the demo's screen shows live call routing
beside the events and the command results.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime

import aio_pika
import orjson

from bridge.client import (
    ComponentAnswer,
    ComponentRequest,
    ExtenApiAnswer,
    IvrApiAnswer,
    Responder,
    SmartApiAnswer,
    TrunkApiAnswer,
)
from bridge.client.smartapi import Exit, GetData, PlayAnnouncement

_agents = itertools.cycle(("101", "102", "103"))
Handler = Callable[[ComponentRequest], Awaitable[ComponentAnswer]]


def shown(handler: Handler) -> Handler:
    """The handler, printing each request it answers and the answer it gave."""

    async def answer(req: ComponentRequest) -> ComponentAnswer:
        result = await handler(req)
        when = datetime.now().strftime("%H:%M:%S")
        head = "\x1b[34mroute \x1b[0m" if sys.stdout.isatty() else "route "
        key = f"{req.source}.{req.component}.{req.app_name}"
        asked = f"from={req.src} to={req.dst}" + (f" digits={req.data}" if req.data else "")
        gave = orjson.dumps(result.to_json()).decode()
        print(f"{when} {head} {' ' * 9}{key}  {asked} -> {gave}", flush=True)
        return result

    return answer


async def greet(req: ComponentRequest) -> ComponentAnswer:
    return SmartApiAnswer([PlayAnnouncement("welcome"), GetData("main-menu", 5, 1), Exit("s2")])


async def route(req: ComponentRequest) -> ComponentAnswer:
    case = {"1": "ivr", "2": "exten"}.get(req.data, "queue")
    return SmartApiAnswer([Exit(case)])


async def pick_agent(req: ComponentRequest) -> ComponentAnswer:
    return ExtenApiAnswer(next(_agents))


async def dial_out(req: ComponentRequest) -> ComponentAnswer:
    """TrunkApi (the originate scenario): dial the number asked for, for at most 5 minutes."""
    return TrunkApiAnswer("SimotelTrunk", req.dst, 300)


async def ivr(req: ComponentRequest) -> ComponentAnswer:
    return IvrApiAnswer("1" if req.data == "1" else "2")


async def main(url: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    connection = await aio_pika.connect_robust(url)
    async with connection, Responder(connection) as responder:
        await responder.subscribe("SmartApi", "s1", shown(greet))
        await responder.subscribe("SmartApi", "s2", shown(route))
        await responder.subscribe("ExtenApi", "ExtenApi", shown(pick_agent))
        await responder.subscribe("IvrApi", "IvrApi", shown(ivr))
        await responder.subscribe("TrunkApi", "TrunkApi", shown(dial_out))
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Responder for the simulator's dialplan")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1/")
    asyncio.run(main(parser.parse_args().amqp))
