"""The answers of the simulated API as plain values (no Starlette here), and the few shapes
every endpoint shares: the `{success, message, data}` envelope, business errors, 404s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge.simulator.state import Record

DONE = "Requested operation is done successfully"
FAILED = "Requested operation failed"


@dataclass(frozen=True, slots=True)
class Upload:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class OriginateRequest:
    originated_call_id: str
    caller: str
    callee: str
    context: str
    caller_id: str
    trunk_name: str = ""
    timeout: str = "30"
    call_limit: str = ""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int = 200
    json: Any = None  # the JSON answer, when `raw` is None
    raw: bytes | None = None  # a file, or a non-JSON page
    content_type: str = "application/json"
    # webhooks the PBX sends because of this request: (EventName, payload)
    events: tuple[tuple[str, Record], ...] = ()
    originate: OriginateRequest | None = None


def ok(data: Any = "", message: str | None = "", **extra: Any) -> Reply:
    return Reply(json={"success": 1, "message": message, "data": data}, **extra)


def fail(message: str, status: int = 200) -> Reply:
    return Reply(status=status, json={"success": 0, "message": message, "data": None})


def missing(name: str, value: Any) -> Reply:
    return fail(f"Field '{name}':{'None' if value is None else value} is missing")


def file_reply(data: bytes, content_type: str) -> Reply:
    return Reply(raw=data, content_type=content_type)


NOT_FOUND = Reply(
    status=404,
    raw=b'<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2.0//EN">\n<html><head>\n'
    b"<title>404 Not Found</title>\n</head><body>\n<h1>Not Found</h1>\n"
    b"<p>The requested URL was not found on this server.</p>\n</body></html>\n",
    content_type="text/html; charset=iso-8859-1",
)

# HTTP-level errors with Simotel's messages (docs/simotel/api-v4.md §2.2).
BAD_CONTENT = fail("Unable to parse content", 400)
AUTH_MISSING = fail("BasicAuth or ApiKey is missing", 401)
AUTH_INVALID = fail("BasicAuth or ApiKey is invalid", 401)
IP_DENIED = fail("IP is not permitted", 403)
METHOD_NOT_ALLOWED = fail("Method not allowed", 405)
UNSUPPORTED_MEDIA = fail("Unsupported Media Type", 415)
NO_SERVICE = fail("Requested service does not exist", 501)


def access_denied(service: str) -> Reply:
    return fail(f"/{service};Access denied", 403)
