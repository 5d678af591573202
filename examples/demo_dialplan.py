"""The responder of the quick-start demo: answers the dialplan components of the built-in
simulator (`simotel-bridge simulate`), so the demo shows live call routing end to end.

Simulated dialplan: SmartApi "s1" greets and asks for a choice, SmartApi "s2" routes on the
digit (1: IVR, 2: an extension picked by ExtenApi, else the queue); ExtenApi picks an agent;
IvrApi sends menu choice 1 to the queue and anything else to an extension; TrunkApi dials
the number asked for.

    .venv/bin/python examples/demo_dialplan.py --amqp amqp://guest:guest@127.0.0.1/
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal

import aio_pika

from bridge.responder import (
    Answer,
    ComponentRequest,
    ExtenApiAnswer,
    IvrApiAnswer,
    Responder,
    SmartApiAnswer,
    TrunkApiAnswer,
)
from bridge.smartapi import Exit, GetData, PlayAnnouncement

_agents = itertools.cycle(("101", "102", "103"))


async def greet(req: ComponentRequest) -> Answer:
    return SmartApiAnswer([PlayAnnouncement("welcome"), GetData("main-menu", 5, 1), Exit("s2")])


async def route(req: ComponentRequest) -> Answer:
    case = {"1": "ivr", "2": "exten"}.get(req.data, "queue")
    return SmartApiAnswer([Exit(case)])


async def pick_agent(req: ComponentRequest) -> Answer:
    return ExtenApiAnswer(next(_agents))


async def dial_out(req: ComponentRequest) -> Answer:
    """TrunkApi (the originate scenario): dial the number asked for, for at most 5 minutes."""
    return TrunkApiAnswer("SimotelTrunk", req.dst, 300)


async def ivr(req: ComponentRequest) -> Answer:
    return IvrApiAnswer("1" if req.data == "1" else "2")


async def main(url: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    connection = await aio_pika.connect_robust(url)
    async with connection, Responder(connection) as responder:
        await responder.subscribe("SmartApi", "s1", greet)
        await responder.subscribe("SmartApi", "s2", route)
        await responder.subscribe("ExtenApi", "ExtenApi", pick_agent)
        await responder.subscribe("IvrApi", "IvrApi", ivr)
        await responder.subscribe("TrunkApi", "TrunkApi", dial_out)
        print("demo_dialplan: answering SmartApi s1/s2, ExtenApi, IvrApi, TrunkApi", flush=True)
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Responder for the simulator's dialplan")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1/")
    asyncio.run(main(parser.parse_args().amqp))
