"""The worker against the real RabbitMQ (a fresh vhost per test) and a fake Simotel over real
HTTP: every result status, with the exact request Simotel received."""

from __future__ import annotations

import base64
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from bridge.config import Settings
from bridge.send import send_command
from tests.helpers.worker import (
    API_KEY,
    API_PASS,
    API_USER,
    Bus,
    FakeSimotel,
    header,
    held,
    ok,
    reply,
    running_worker,
    worker_settings,
)

ORIGINATE = {
    "caller": "557",
    "callee": "09155151515",
    "context": "outgoing_context",
    "caller_id": "557",
    "trunk_name": "trunk1",
    "timeout": "30",
}
BASIC = "Basic " + base64.b64encode(f"{API_USER}:{API_PASS}".encode()).decode()


async def test_ok_originate_exact_request(fake: FakeSimotel, cfg: Settings, bus: Bus) -> None:
    fake.on("call/originate/act", ok({"originated_call_id": "abc"}, "done"))
    async with running_worker(cfg):
        cid = await bus.send("call/originate/act", ORIGINATE, message_id="cmd-1")
        reply_msg = await bus.reply(cid)
        published = await bus.results.get()
    (req,) = fake.requests
    assert (req.method, req.path) == ("POST", "/api/v4/call/originate/act")
    assert req.headers["authorization"] == BASIC
    assert req.headers["x-apikey"] == API_KEY
    assert req.headers["content-type"] == "application/json"
    assert req.json == ORIGINATE
    body = orjson.loads(reply_msg.body)
    assert body == {
        "command_id": "cmd-1",
        "action": "call/originate/act",
        "source": "simotel",
        "status": "ok",
        "http_status": 200,
        "response": {"success": 1, "message": "done", "data": {"originated_call_id": "abc"}},
        "error": None,
        "attempts": 1,
        "duration_ms": body["duration_ms"],
    }
    assert reply_msg.correlation_id == cid and reply_msg.content_type == "application/json"
    assert published.routing_key == "simotel.call.originate.act"
    assert orjson.loads(published.body) == body
    assert await bus.queued_commands() == []  # acknowledged, nothing handed back
    assert bus.dead.empty()  # ok is never dead-lettered (the worker has stopped: all settled)


@pytest.mark.parametrize(
    ("auth", "prefix", "has_basic", "has_key"),
    [("basic", "api/v4", True, False), ("apikey", "api/v4.1", False, True)],
)
async def test_auth_modes_and_hosted_base_url(
    amqp: AbstractRobustConnection,
    amqp_url: str,
    tmp_path: Path,
    auth: str,
    prefix: str,
    has_basic: bool,
    has_key: bool,
) -> None:
    server = FakeSimotel()
    url = await server.start(prefix)
    try:
        settings = worker_settings(amqp_url, tmp_path, url, auth=auth)
        bus = await Bus(amqp, settings).start()
        async with running_worker(settings):
            result = await bus.call("setting/ping/act")
        assert result.status == "ok"
        (req,) = server.requests
        assert req.path == f"/{prefix}/setting/ping/act" and req.json == {}
        assert (req.headers.get("authorization") == BASIC) is has_basic
        assert ("authorization" in req.headers) is has_basic
        assert (req.headers.get("x-apikey") == API_KEY) is has_key
        assert ("x-apikey" in req.headers) is has_key
    finally:
        await server.stop()


async def test_failed_answers(fake: FakeSimotel, cfg: Settings, bus: Bus) -> None:
    fake.on("pbx/users/add", reply(200, {"success": 0, "message": "This number already exists"}))
    fake.on("pbx/queues/pauseagent", ok({"ok": 0, "message": "agent is not a member"}))
    fake.on("pbx/trunks/search", reply(403, {"success": 0, "message": "IP is not permitted"}))
    async with running_worker(cfg):
        add = await bus.call("pbx/users/add", {"name": "a", "number": "1"}, message_id="u1")
        pause = await bus.call("pbx/queues/pauseagent", {"queue": "600", "agent": "101"})
        denied = await bus.call("pbx/trunks/search", {"alike": "true"})
    assert (add.status, add.http_status, add.error) == ("failed", 200, "This number already exists")
    assert (pause.status, pause.error) == ("failed", "agent is not a member")
    assert (denied.status, denied.http_status) == ("failed", 403)
    assert denied.error == "HTTP 403: IP is not permitted"
    assert [r.json for r in fake.to("pbx/queues/pauseagent")] == [{"queue": "600", "agent": "101"}]
    assert len(fake.requests) == 3  # failed is never retried
    assert bus.dead.empty()  # failed is never dead-lettered


async def test_users_add_status_success_shape(fake: FakeSimotel, cfg: Settings, bus: Bus) -> None:
    answer = {"status": "success", "message": "User created successfully", "user_id": "42"}
    fake.on("pbx/users/add", reply(200, answer))
    async with running_worker(cfg):
        result = await bus.call("pbx/users/add", {"name": "T", "number": "9"}, message_id="u2")
    assert (result.status, result.response) == ("ok", answer)


async def test_invalid_commands_are_rejected_and_dead_lettered(
    fake: FakeSimotel, cfg: Settings, bus: Bus
) -> None:
    cases: dict[str, dict[str, Any]] = {
        "invalid_json": dict(body=b'{"action": "setting/ping/act"'),
        "not_an_object": dict(body=b'["setting/ping/act"]'),
        "unknown_action": dict(action="pbx/users/drop"),
        "bad_action": dict(body=b'{"action": 12, "data": {}}'),
        "dotdot": dict(action="../../../etc/passwd"),
        "absolute": dict(action="http://evil.example/api/v4/setting/ping/act"),
        "rooted": dict(action="/api/v4/setting/ping/act"),
        "bad_data": dict(body=b'{"action": "pbx/users/search", "data": [1]}'),
        "unknown_source": dict(action="setting/ping/act", headers={"source": "nowhere"}),
        "bad_file": dict(action="pbx/faxes/upload", data={"file": "x"}, message_id="f1"),
    }
    expected_reason = {"dotdot": "unknown_action", "absolute": "unknown_action"}
    expected_reason["rooted"] = "unknown_action"
    async with running_worker(cfg):
        sent = {name: await bus.send(**kw) for name, kw in cases.items()}
        results = {name: await bus.result(cid) for name, cid in sent.items()}
        dead = [await bus.next_dead() for _ in cases]
    # (a command without message_id cannot be sent with aio-pika, which always sets one;
    # test_commands covers `missing_message_id`.)
    assert fake.requests == []  # nothing reached Simotel
    assert {name: r.status for name, r in results.items()} == dict.fromkeys(cases, "rejected")
    assert all(r.error and r.http_status is None and r.attempts == 0 for r in results.values())
    by_corr = {m.correlation_id: m for m in dead}
    for name, cid in sent.items():
        letter = by_corr[cid]
        assert header(letter, "status") == "rejected"
        assert header(letter, "reason") == expected_reason.get(name, name), name
        kw = cases[name]
        original = kw.get("body") or orjson.dumps(
            {"action": kw["action"], "data": kw.get("data", {})}
        )
        assert letter.body == original  # the command itself, as it was sent
    assert results["bad_file"].action == "pbx/faxes/upload"
    assert results["dotdot"].action is None
    assert dict(by_corr[sent["dotdot"]].headers or {}).get("action") is None
    assert await bus.queued_commands() == []


async def test_upload_is_multipart_file(fake: FakeSimotel, cfg: Settings, bus: Bus) -> None:
    audio = b"ID3\x03\x00fake mp3 bytes \x00\xff"
    fake.on("pbx/announcements/upload", ok({"filename": "file-1_.wav"}, "1 file(s) uploaded"))
    data = {"file": {"filename": "hello.mp3", "content_base64": base64.b64encode(audio).decode()}}
    async with running_worker(cfg):
        result = await bus.call("pbx/announcements/upload", data, message_id="up-1")
    assert result.status == "ok" and result.response["data"] == {"filename": "file-1_.wav"}
    (req,) = fake.requests
    assert (req.method, req.path) == ("POST", "/api/v4/pbx/announcements/upload")
    assert req.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert req.headers["authorization"] == BASIC and req.headers["x-apikey"] == API_KEY
    assert req.files == {"file": ("hello.mp3", "audio/mpeg", audio)}
    assert req.form == {} and req.json is None


async def test_download_bytes_as_body(
    fake: FakeSimotel, amqp: AbstractRobustConnection, amqp_url: str, tmp_path: Path
) -> None:
    audio = bytes(range(256)) * 8  # 2048 bytes
    fake.on("reports/audio/download", reply(200, body=audio, ctype="audio/mpeg"))
    fake.on("pbx/faxes/download", reply(200, body=audio * 2, ctype="image/tiff"))
    fake.on("voicemails/audio/download", reply(404, body=b"<h1>Not Found</h1>", ctype="text/html"))
    settings = worker_settings(amqp_url, tmp_path, fake.url, max_download_bytes=3000)
    bus = await Bus(amqp, settings).start()
    async with running_worker(settings):
        cid = await bus.send("reports/audio/download", {"file": "20200921_1.mp3"})
        message = await bus.reply(cid)
        big = await bus.call("pbx/faxes/download", {"_id": "64b0"}, message_id="fx")
        missing = await bus.call("voicemails/audio/download", {"file": "nope.wav"})
        letter = await bus.next_dead()
    assert message.body == audio and message.content_type == "audio/mpeg"
    assert header(message, "status") == "ok" and header(message, "http_status") == 200
    assert header(message, "action") == "reports/audio/download"
    assert header(message, "attempts") == 1 and header(message, "content_length") == 2048
    assert fake.to("reports/audio/download")[0].json == {"file": "20200921_1.mp3"}
    assert (big.status, big.file) == ("error", None)
    assert big.error == "the file is larger than api.max_download_bytes"
    assert (header(letter, "status"), header(letter, "reason")) == ("error", "too_large")
    assert (missing.status, missing.http_status) == ("failed", 404)
    assert len(fake.requests) == 3  # a too-large download is not retried


async def test_5xx_then_recovery_for_retry_safe(fake: FakeSimotel, cfg: Settings, bus: Bus) -> None:
    fake.on(
        "pbx/users/search",
        reply(503, {"success": 0, "message": "busy"}),
        reply(502, body=b"<h1>Bad Gateway</h1>", ctype="text/html"),
        ok([{"_id": "1", "number": "101"}]),
    )
    async with running_worker(cfg):
        result = await bus.call("pbx/users/search", {"alike": "true"}, message_id="s1")
    assert (result.status, result.attempts, result.http_status) == ("ok", 3, 200)
    assert [r.json for r in fake.requests] == [{"alike": "true"}] * 3
    assert bus.dead.empty()


async def test_timeout_is_retried_for_retry_safe(
    fake: FakeSimotel, amqp: AbstractRobustConnection, amqp_url: str, tmp_path: Path
) -> None:
    fake.on("pbx/queues/resumeagent", held(fake.gate()), ok({"ok": 1, "message": "UnPaused"}))
    settings = worker_settings(amqp_url, tmp_path, fake.url, read_timeout=0.3)
    bus = await Bus(amqp, settings).start()
    async with running_worker(settings):
        result = await bus.call("pbx/queues/resumeagent", {"queue": "600", "agent": "101"})
    assert (result.status, result.attempts) == ("ok", 2)
    assert len(fake.to("pbx/queues/resumeagent")) == 2


async def test_bounded_retries_end_in_error(
    fake: FakeSimotel, amqp: AbstractRobustConnection, amqp_url: str, tmp_path: Path
) -> None:
    fake.on("pbx/users/search", reply(503, {"success": 0, "message": "overloaded"}))
    fake.on("pbx/users/add", reply(500, {"success": 0, "message": "boom"}))
    settings = worker_settings(amqp_url, tmp_path, fake.url, max_retries=2)
    bus = await Bus(amqp, settings).start()
    async with running_worker(settings):
        search = await bus.call("pbx/users/search", {"alike": "true"})
        add = await bus.call("pbx/users/add", {"name": "x"}, message_id="add-1")
        letters = [await bus.next_dead(), await bus.next_dead()]
    assert (search.status, search.attempts, search.http_status) == ("error", 3, 503)
    assert search.error == "HTTP 503: overloaded"
    assert len(fake.to("pbx/users/search")) == 3  # 1 + max_retries
    assert (add.status, add.attempts) == ("error", 1)  # not retry-safe: never retried
    assert len(fake.to("pbx/users/add")) == 1
    assert sorted((header(m, "status"), header(m, "reason")) for m in letters) == [
        ("error", "http_5xx"),
        ("error", "http_5xx"),
    ]


async def test_duplicate_message_id_gets_first_result(
    fake: FakeSimotel, cfg: Settings, bus: Bus
) -> None:
    fake.on("call/originate/act", ok({"originated_call_id": "first"}), ok({"x": "second"}))
    fake.on("pbx/users/search", ok(["first"]), ok(["second"]))
    async with running_worker(cfg):
        one = await bus.call("call/originate/act", ORIGINATE, message_id="dup-1")
        two = await bus.call("call/originate/act", ORIGINATE, message_id="dup-1")
        s1 = await bus.call("pbx/users/search", {"alike": "true"}, message_id="dup-2")
        s2 = await bus.call("pbx/users/search", {"alike": "true"}, message_id="dup-2")
    assert one == two and one.response["data"] == {"originated_call_id": "first"}
    assert s1 == s2 and s1.response["data"] == ["first"]
    assert len(fake.to("call/originate/act")) == 1 and len(fake.to("pbx/users/search")) == 1


async def test_concurrent_duplicates_share_one_execution(
    fake: FakeSimotel, cfg: Settings, bus: Bus
) -> None:
    gate = fake.gate()
    fake.on("call/originate/act", held(gate, ok({"originated_call_id": "only"})))
    async with running_worker(cfg):
        first = await bus.send("call/originate/act", ORIGINATE, message_id="same")
        await fake.wait_for("call/originate/act")
        second = await bus.send("call/originate/act", ORIGINATE, message_id="same")
        gate.set()
        a, b = await bus.result(first), await bus.result(second)
    assert a == b and a.status == "ok"
    assert len(fake.to("call/originate/act")) == 1


async def test_expired_commands_are_never_executed(
    fake: FakeSimotel, cfg: Settings, bus: Bus
) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    async with running_worker(cfg):
        by_header = await bus.call(
            "call/originate/act", ORIGINATE, message_id="late-1", headers={"deadline": past}
        )
        # published an hour ago with 60 s to live: the broker still holds it, but it is late
        by_expiration = await bus.call(
            "pbx/users/search",
            {"alike": "true"},
            expiration=60,
            timestamp=datetime.now(UTC) - timedelta(hours=1),
        )
        letters = [await bus.next_dead(), await bus.next_dead()]
    assert by_header.status == by_expiration.status == "expired"
    assert by_header.attempts == 0 and by_header.error == "deadline passed"
    assert fake.requests == []
    assert [(header(m, "status"), header(m, "reason")) for m in letters] == [
        ("expired", "deadline"),
        ("expired", "deadline"),
    ]


async def test_slow_report_search_does_not_delay_originate(
    fake: FakeSimotel, amqp: AbstractRobustConnection, amqp_url: str, tmp_path: Path
) -> None:
    gate = fake.gate()
    fake.on("reports/cdr/search", held(gate, ok({"pagination": {}, "data": []})))
    fake.on("call/originate/act", ok({"originated_call_id": "fast"}))
    settings = worker_settings(
        amqp_url, tmp_path, fake.url, worker={"prefetch": 4, "report_prefetch": 1}
    )
    bus = await Bus(amqp, settings).start()
    search = {"alike": "true", "date_range": {"from": "2024-01-01 00:00", "to": "2024-01-02 00:00"}}
    async with running_worker(settings):
        reports = [await bus.send("reports/cdr/search", search) for _ in range(3)]
        await fake.wait_for("reports/cdr/search")
        originate = await bus.call("call/originate/act", ORIGINATE, message_id="o-1")
        # the originate is done while the report lane is still stuck on its first search
        assert originate.status == "ok"
        assert len(fake.to("reports/cdr/search")) == 1 and not gate.is_set()
        assert all(not bus.replies[cid].done() for cid in reports)
        gate.set()
        done = [await bus.result(cid) for cid in reports]
    assert [r.status for r in done] == ["ok"] * 3
    assert len(fake.to("reports/cdr/search")) == 3


async def test_graceful_shutdown_finishes_in_flight(
    fake: FakeSimotel, cfg: Settings, bus: Bus
) -> None:
    gate = fake.gate()
    fake.on("pbx/users/search", held(gate, ok(["late but fine"])))
    async with running_worker(cfg) as stop:
        cid = await bus.send("pbx/users/search", {"alike": "true"})
        await fake.wait_for("pbx/users/search")
        stop.set()  # shutdown begins with the request in flight
        gate.set()
        result = await bus.result(cid)
    assert result.status == "ok" and result.response["data"] == ["late but fine"]
    assert await bus.queued_commands() == []


async def test_shutdown_grace_hands_back_what_is_left(
    fake: FakeSimotel, amqp: AbstractRobustConnection, amqp_url: str, tmp_path: Path
) -> None:
    fake.on("pbx/users/search", held(fake.gate()))  # never answers while the worker runs
    settings = worker_settings(amqp_url, tmp_path, fake.url, worker={"shutdown_grace": 0.3})
    bus = await Bus(amqp, settings).start()
    started = time.monotonic()
    async with running_worker(settings):
        cid = await bus.send("pbx/users/search", {"alike": "true"})
        await fake.wait_for("pbx/users/search")
    assert time.monotonic() - started < 5  # bounded by shutdown_grace, not the read timeout
    assert not bus.replies[cid].done()
    (left,) = await bus.queued_commands()  # handed back: a later worker will run it
    assert left.correlation_id == cid and left.redelivered


async def test_send_command(fake: FakeSimotel, cfg: Settings, bus: Bus) -> None:
    fake.on("pbx/users/search", ok([{"number": "101"}]))
    async with running_worker(cfg):
        result = await send_command(cfg, "pbx/users/search", {"alike": "true"}, timeout=10)
    assert result.status == "ok" and result.response["data"] == [{"number": "101"}]
    assert result.source == "simotel" and result.action == "pbx/users/search"
    (req,) = fake.requests
    assert req.json == {"alike": "true"}


async def test_transport_errors_are_retried_then_error(
    amqp: AbstractRobustConnection, amqp_url: str, tmp_path: Path
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api/v4/"
    settings = worker_settings(amqp_url, tmp_path, url, max_retries=2)
    bus = await Bus(amqp, settings).start()
    async with running_worker(settings):
        search = await bus.call("pbx/users/search", {"alike": "true"})
        add = await bus.call("pbx/users/add", {"name": "x"}, message_id="a-1")
        letters = [await bus.next_dead(), await bus.next_dead()]
    assert (search.status, search.attempts, search.http_status) == ("error", 3, None)
    assert search.error is not None and search.error.startswith("transport: ")
    assert search.error.endswith("(ConnectError)")
    assert (add.status, add.attempts) == ("error", 1)
    assert {header(m, "reason") for m in letters} == {"transport"}


async def test_rate_limit_spaces_requests(
    fake: FakeSimotel, amqp: AbstractRobustConnection, amqp_url: str, tmp_path: Path
) -> None:
    settings = worker_settings(amqp_url, tmp_path, fake.url, rate_limit=10, rate_burst=1)
    bus = await Bus(amqp, settings).start()
    async with running_worker(settings):
        sent = [await bus.send("setting/ping/act") for _ in range(5)]
        results = [await bus.result(cid) for cid in sent]
    assert [r.status for r in results] == ["ok"] * 5
    arrivals = [r.at for r in fake.requests]
    # 1 token at once, then one per 100 ms: 5 requests span at least 400 ms
    assert arrivals[-1] - arrivals[0] >= 0.4 - 0.02
