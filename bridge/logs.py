"""structlog, configured once: JSON lines when stderr is not a terminal, readable console output
when it is. Standard-library loggers (aio-pika, uvicorn, httpx) go through the same renderer.
A redaction step removes anything that looks like a secret before a line is written."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog
from structlog.typing import EventDict, Processor

from bridge.config import LogSettings

_SECRET_KEYS = re.compile(r"pass(word)?|secret|api_?key|token|authorization|cookie", re.I)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@", re.I)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub(r"\g<scheme>***:***@", value)
    return value


def redact(_: Any, __: str, event_dict: EventDict) -> EventDict:
    """Blank secret-looking keys and strip credentials from URLs in every value."""
    for key in list(event_dict):
        if _SECRET_KEYS.search(key):
            event_dict[key] = "***"
        else:
            event_dict[key] = _scrub(event_dict[key])
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
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            redact,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
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
