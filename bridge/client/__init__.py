"""The consumer library: what a service of yours needs to work with the bridge over RabbitMQ.

    from bridge.client import Responder, ExtenApiAnswer      # answer dialplan components
    from bridge.client import smartapi                       # build SmartApi scripts
    from bridge.client import send_command                   # send a command, get its result
    from bridge.client import history_window, parse_when     # read the event history

Modules:
    responder   Responder, ComponentRequest and the typed answers (docs/components.md)
    smartapi    the SmartApi command language: typed commands, builder, parser
    answers     the rules a component answer must follow (the bridge applies the same)
    send        send_command: one command to the worker, its result back (docs/worker.md)
    history     reading a time window of the `simotel.history` stream (docs/history.md)

It imports only aio-pika, orjson and the standard library, plus the bridge's small pure modules
(`bridge.wire`, the names and routing keys shared with the bridge; `bridge.errors`;
`bridge.catalog` and `bridge.commands` for commands and results): never the bridge's
configuration, pydantic, yaml, prometheus, starlette, httpx or structlog. A test keeps it so.
"""

from __future__ import annotations

# Order matters: smartapi and answers are used by responder.
from bridge.client import smartapi
from bridge.client.answers import AnswerFields, validate_answer
from bridge.client.history import (
    HISTORY_STREAM,
    HistoryError,
    event_time,
    history_window,
    parse_when,
)
from bridge.client.responder import (
    Answer,
    ComponentAnswer,
    ComponentRequest,
    ExtenApiAnswer,
    Fail,
    Handler,
    IvrApiAnswer,
    Responder,
    SmartApiAnswer,
    TrunkApiAnswer,
)
from bridge.client.send import send_command
from bridge.commands import Result
from bridge.errors import BridgeError, InvalidAnswer, PublishError, SmartApiError, Unroutable
from bridge.wire import COMPONENTS, Component

__all__ = [
    "COMPONENTS",
    "HISTORY_STREAM",
    "Answer",
    "AnswerFields",
    "BridgeError",
    "Component",
    "ComponentAnswer",
    "ComponentRequest",
    "ExtenApiAnswer",
    "Fail",
    "Handler",
    "HistoryError",
    "InvalidAnswer",
    "IvrApiAnswer",
    "PublishError",
    "Responder",
    "Result",
    "SmartApiAnswer",
    "SmartApiError",
    "TrunkApiAnswer",
    "Unroutable",
    "event_time",
    "history_window",
    "parse_when",
    "send_command",
    "smartapi",
    "validate_answer",
]
