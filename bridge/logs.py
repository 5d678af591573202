"""structlog, configured once: JSON lines when stderr is not a terminal, readable console output
when it is. Standard-library loggers (aio-pika, uvicorn, httpx) go through the same renderer.
A redaction step removes anything that looks like a secret before a line is written."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, Processor

from bridge.config import LogSettings

_SECRET_KEYS = re.compile(r"pass(word)?|secret|api_?key|token|authorization|cookie", re.I)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@", re.I)
_is_secret_key: dict[str, bool] = {}


def redact(_: Any, __: str, event_dict: EventDict) -> EventDict:
    """Blank secret-looking keys and strip credentials from URLs in every value. On the hot path
    (one line per webhook), so the key check is cached and only strings holding `@` are
    searched."""
    for key, value in event_dict.items():
        secret = _is_secret_key.get(key)
        if secret is None:
            secret = _is_secret_key[key] = bool(_SECRET_KEYS.search(key))
        if secret:
            event_dict[key] = "***"
        elif isinstance(value, str) and "@" in value:
            event_dict[key] = _URL_CREDENTIALS.sub(r"\g<scheme>***:***@", value)
    return event_dict


def configure(settings: LogSettings, *, stream: Any = None) -> None:
    stream = stream or sys.stderr
    as_json = settings.format == "json" or (settings.format == "auto" and not stream.isatty())
    level = getattr(logging, settings.level.upper())
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Our own lines skip the standard library: rendered straight to the stream (orjson for
    # JSON), which costs a fraction of a logging.Handler round trip per webhook.
    native: Processor
    factory: Any
    if as_json and hasattr(stream, "buffer"):
        native = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = structlog.BytesLoggerFactory(stream.buffer)
    else:
        native = renderer
        factory = structlog.PrintLoggerFactory(stream)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, redact, native],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, redact],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aio-pika is chatty about reconnects at INFO; its warnings still come through.
    for noisy in ("aiormq", "aio_pika", "httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


class Sampler:
    """Which accepted webhooks get an access log line: one in round(1 / rate), the first one
    included. `take()` returns 0 (no line) or the number of answers the line stands for."""

    def __init__(self, rate: float) -> None:
        self.every = 0 if rate <= 0 else max(1, round(1 / rate))
        self._left = 0

    def take(self) -> int:
        if self.every == 0:
            return 0
        if self._left:
            self._left -= 1
            return 0
        self._left = self.every - 1
        return self.every
