"""VIP routing for live calls: a service that answers Simotel's dialplan components through
simotel-bridge, without being reachable from the PBX.

Dialplan (Simotel side), each component's API Address pointing at the bridge:

    SmartApi "vip_route"  -> VIP callers hear a greeting and go to their account manager
                             (output "vip"); everyone else is asked for a customer number
                             (GetData) and leaves through "ask"
    SmartApi "vip_check"  -> after "ask": reads the digits back and routes to "vip" or "normal"
    ExtenApi "vip_exten"  -> the extension to ring for the current caller

Run it (the bridge and RabbitMQ must be up; start order does not matter):

    .venv/bin/python examples/vip_router.py --amqp amqp://guest:guest@127.0.0.1/

Every instance shares the same queues, so running two spreads the load. Stop it and the bridge
answers with the configured fallback at once.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aio_pika

from bridge.client import (
    ComponentAnswer,
    ComponentRequest,
    ExtenApiAnswer,
    Responder,
    SmartApiAnswer,
)
from bridge.client.smartapi import (
    ClearUserData,
    Exit,
    GetData,
    PlayAnnouncement,
    SayDigit,
    SetExten,
)

# A real service would ask its CRM; callers' numbers -> their account manager's extension.
ACCOUNT_MANAGERS = {"09155441": "120", "09121234567": "121"}
CUSTOMER_NUMBERS = {"4711": "120", "4712": "121"}


async def vip_route(req: ComponentRequest) -> ComponentAnswer:
    manager = ACCOUNT_MANAGERS.get(req.src)
    if manager is not None:
        return SmartApiAnswer([PlayAnnouncement("vip-welcome"), SetExten(manager), Exit("vip")])
    return SmartApiAnswer([GetData("enter-customer-number", 10, 4), Exit("ask")])


async def vip_check(req: ComponentRequest) -> ComponentAnswer:
    """`req.data` is whatever the caller typed. It goes back to Simotel only through typed
    commands: SayDigit accepts digits only, so anything else raises, and the bridge answers
    with the fallback at once. It can never become a command of its own."""
    manager = CUSTOMER_NUMBERS.get(req.data)
    if manager is None:
        return SmartApiAnswer([ClearUserData(), Exit("normal")])
    return SmartApiAnswer([SayDigit(req.data), SetExten(manager), Exit("vip")])


async def vip_exten(req: ComponentRequest) -> ComponentAnswer:
    return ExtenApiAnswer(ACCOUNT_MANAGERS.get(req.src, "100"))


async def subscribe(responder: Responder, source: str = "*") -> None:
    await responder.subscribe("SmartApi", "vip_route", vip_route, source=source)
    await responder.subscribe("SmartApi", "vip_check", vip_check, source=source)
    await responder.subscribe("ExtenApi", "vip_exten", vip_exten, source=source)


async def main(url: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    connection = await aio_pika.connect_robust(url)
    async with connection, Responder(connection) as responder:
        await subscribe(responder)
        print("vip_router: answering SmartApi vip_route/vip_check and ExtenApi vip_exten")
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="VIP routing for Simotel components")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1/")
    asyncio.run(main(parser.parse_args().amqp))
