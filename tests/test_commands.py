"""The pure core of the worker: parsing commands, building requests, reading Simotel's answers,
shaping results. No broker, no server."""

from __future__ import annotations

import base64
import ssl
from datetime import UTC, datetime

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge import wire
from bridge.catalog import CATALOG, lookup
from bridge.commands import (
    Envelope,
    HttpAnswer,
    InvalidCommand,
    Result,
    build_request,
    command_deadline,
    copied_headers,
    delivery_count,
    describe_invalid,
    interpret,
    is_last_delivery,
    make_delivery_limit,
    needs_dead_letter,
    parse_command,
    parse_result,
    result_key,
    result_message,
    safe_id,
    transport_failure,
)
from bridge.simotel import TokenBucket, backoff_delay, describe_error

ONE = ("simotel",)
ORIGINATE = {"caller": "557", "callee": "09155151515", "context": "out", "caller_id": "557"}


def env(body: object, **kw: object) -> Envelope:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return Envelope(body=raw, **kw)  # type: ignore[arg-type]


def reason_of(e: Envelope, sources: tuple[str, ...] = ONE) -> str:
    with pytest.raises(InvalidCommand) as info:
        parse_command(e, sources)
    return info.value.reason


# --- parsing ---------------------------------------------------------------------------------


def test_valid_originate() -> None:
    cmd = parse_command(
        env(
            {"action": "call/originate/act", "data": ORIGINATE},
            message_id="m1",
            reply_to="rq",
            correlation_id="c1",
            routing_key="simotel.call.originate.act",
        ),
        ONE,
    )
    assert (cmd.action, cmd.source, cmd.command_id, cmd.message_id) == (
        "call/originate/act",
        "simotel",
        "m1",
        "m1",
    )
    assert cmd.data == ORIGINATE and cmd.file is None and not cmd.retry_safe
    assert (cmd.reply_to, cmd.correlation_id, cmd.deadline) == ("rq", "c1", None)
    assert cmd.routing_key == "simotel.call.originate.act"


def test_routing_key_form_of_action_and_missing_data() -> None:
    cmd = parse_command(env({"action": "setting.ping.act"}), ONE, fallback_id="gen")
    assert cmd.action == "setting/ping/act" and cmd.data == {} and cmd.command_id == "gen"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        ([1, 2], "not_an_object"),
        ("call/originate/act", "not_an_object"),
        ({"action": 5, "data": {}}, "bad_action"),
        ({"data": {}}, "bad_action"),
        ({"action": "../etc/passwd", "data": {}}, "unknown_action"),
        ({"action": "call/originate/act/../../../x", "data": {}}, "unknown_action"),
        ({"action": "/api/v4/call/originate/act", "data": {}}, "unknown_action"),
        ({"action": "http://evil.example/api/v4/setting/ping/act", "data": {}}, "unknown_action"),
        ({"action": "//evil.example/x", "data": {}}, "unknown_action"),
        ({"action": "pbx/users/search", "data": [1]}, "bad_data"),
        ({"action": "pbx/users/search", "data": "x"}, "bad_data"),
        ({"action": "pbx/users/search", "data": None}, "bad_data"),
        ({"action": "pbx/users/search", "data": {}, "dta": {}}, "unexpected_field"),
        ({"action": "call/originate/act", "data": ORIGINATE}, "missing_message_id"),
    ],
)
def test_invalid_commands(body: object, reason: str) -> None:
    assert reason_of(env(body)) == reason


def test_every_catalog_entry_parses() -> None:
    for path, ep in CATALOG.items():
        data: dict[str, object] = {}
        if ep.is_upload:
            data = {"file": {"filename": "a.wav", "content_base64": "AAAA"}}
        cmd = parse_command(env({"action": path, "data": data}, message_id="m"), ONE)
        assert cmd.endpoint is ep


@given(st.binary(max_size=200) | st.text(max_size=80).map(lambda a: orjson.dumps({"action": a})))
def test_parse_accepts_only_catalog_actions(raw: bytes) -> None:
    try:
        cmd = parse_command(Envelope(body=raw, message_id="m"), ONE)
    except InvalidCommand:
        return
    assert cmd.action in CATALOG


def test_source_resolution() -> None:
    body = {"action": "setting/ping/act", "data": {}}
    two = ("tehran", "mashhad")
    assert parse_command(env(body, headers={"source": "mashhad"}), two).source == "mashhad"
    assert parse_command(env(body, headers={"source": b"tehran"}), two).source == "tehran"
    assert parse_command(env(body, routing_key="tehran.setting.ping.act"), two).source == "tehran"
    assert parse_command(env(body, routing_key="simotel.commands"), ONE).source == "simotel"
    assert reason_of(env(body, routing_key="simotel.commands"), two) == "unknown_source"
    assert reason_of(env(body, headers={"source": "nowhere"}), two) == "unknown_source"
    assert reason_of(env(body, headers={"source": "nowhere"}), ONE) == "unknown_source"


def test_deadlines() -> None:
    at = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()
    assert command_deadline(env({}, headers={"deadline": "2030-01-02T03:04:05Z"})) == at
    assert command_deadline(env({}, headers={"deadline": "2030-01-02T03:04:05"})) == at
    assert command_deadline(env({}, headers={"deadline": "2030-01-02T06:34:05+03:30"})) == at
    assert command_deadline(env({}, expiration=10.0, timestamp=100.0, received_at=500.0)) == 110.0
    assert command_deadline(env({}, expiration=10.0, received_at=500.0)) == 510.0
    both = env({}, expiration=10.0, timestamp=at - 5, headers={"deadline": "2030-01-02T03:04:05Z"})
    assert command_deadline(both) == at
    body = {"action": "setting/ping/act"}
    assert reason_of(env(body, headers={"deadline": "tomorrow"})) == "bad_deadline"
    assert reason_of(env(body, headers={"deadline": 17})) == "bad_deadline"


def test_upload_file_and_form() -> None:
    content = b"RIFF....WAVEfmt "
    data = {
        "file": {"filename": "hello.wav", "content_base64": base64.b64encode(content).decode()},
        "note": "x",
    }
    cmd = parse_command(
        env({"action": "pbx/announcements/upload", "data": data}, message_id="u"), ONE
    )
    assert cmd.file is not None
    assert (cmd.file.filename, cmd.file.content, cmd.file.content_type) == (
        "hello.wav",
        content,
        "audio/x-wav",
    )
    req = build_request(cmd)
    assert req.json is None and req.file == cmd.file and req.form == {"note": "x"}


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"file": "x.wav"},
        {"file": {"filename": "x.wav"}},
        {"file": {"filename": "", "content_base64": "AAAA"}},
        {"file": {"filename": "x.wav", "content_base64": "not base64!"}},
        # CR/LF would write headers of their own into the multipart part
        {"file": {"filename": "x.wav", "content_base64": "AAAA", "content_type": "a/b\r\nX: 1"}},
        {"file": {"filename": "x.wav", "content_base64": "AAAA", "content_type": "a/b;\nX"}},
        {"file": {"filename": "x.wav\r\nX: 1", "content_base64": "AAAA"}},
        {"file": {"filename": "x\x00.wav", "content_base64": "AAAA"}},
        {"file": {"filename": "x" * 256, "content_base64": "AAAA"}},
        {"file": {"filename": "x.wav", "content_base64": "AAAA", "content_type": "nonsense"}},
        {"file": {"filename": "x.wav", "content_base64": "AAAA", "content_type": 7}},
    ],
)
def test_upload_without_a_usable_file(data: dict[str, object]) -> None:
    e = env({"action": "pbx/faxes/upload", "data": data}, message_id="u")
    assert reason_of(e) == "bad_file"


def test_upload_content_type_with_parameters_is_kept() -> None:
    data = {
        "file": {"filename": "f.tif", "content_base64": "AAAA", "content_type": "image/tiff; x=1"}
    }
    cmd = parse_command(env({"action": "pbx/faxes/upload", "data": data}, message_id="u"), ONE)
    assert cmd.file is not None and cmd.file.content_type == "image/tiff; x=1"


@pytest.mark.parametrize("size", [201, 255])
def test_an_over_long_message_id_is_refused(size: int) -> None:
    e = env({"action": "setting/ping/act"}, message_id="m" * size)
    assert reason_of(e) == "bad_message_id"
    assert parse_command(env({"action": "setting/ping/act"}, message_id="m" * 200), ONE)


def test_safe_id_and_fit() -> None:
    assert safe_id("abc") == "abc"
    long = "é" * 150  # 300 bytes
    cut = safe_id(long)
    assert len(cut.encode()) <= 200 and cut == safe_id(long) and cut != safe_id(long + "x")
    assert len(f"{cut}:dead".encode()) <= 255
    assert wire.cut("é" * 10, 5) == "éé"


def test_hostile_values_are_quoted_short_in_errors() -> None:
    huge = "x" * 100_000
    for e in (
        env({"action": "setting/ping/act"}, headers={"source": huge}),
        env({"action": "setting/ping/act"}, headers={"deadline": huge}),
        env({"action": huge}),
        env({"action": "setting/ping/act", huge: 1}),
    ):
        with pytest.raises(InvalidCommand) as info:
            parse_command(e, ONE)
        assert len(info.value.detail) < 200


def test_dead_letter_headers_are_bounded() -> None:
    assert copied_headers({"a": "b"}) == {"a": "b"}
    assert copied_headers({"a": "x" * 5000}) == {"headers_dropped": True}
    result = Result("c", "pbx/faxes/download", "simotel", "error", error="e" * 10_000, file=b"")
    _, _, headers = result_message(result)
    assert len(headers["error"].encode()) <= 512


def test_describe_invalid() -> None:
    assert describe_invalid(env(b"nope"), ONE) == (None, "simotel")
    e = env({"action": "call/originate/act"}, headers={"source": "x"})
    assert describe_invalid(e, ONE) == ("call/originate/act", None)
    assert result_key(None, None) == "_.rejected"
    assert result_key("simotel", None) == "simotel.rejected"
    assert result_key("simotel", "pbx/users/add") == "simotel.pbx.users.add"


# --- requests --------------------------------------------------------------------------------


def test_build_request_json_and_lanes() -> None:
    cmd = parse_command(env({"action": "reports/cdr/search", "data": {"alike": "true"}}), ONE)
    req = build_request(cmd)
    assert (req.method, req.path, req.json, req.file, req.slow, req.download) == (
        "POST",
        "reports/cdr/search",
        {"alike": "true"},
        None,
        True,
        False,
    )
    dl = build_request(parse_command(env({"action": "reports/audio/download"}), ONE))
    assert dl.download and dl.slow  # downloads of recordings run in the report lane
    assert not build_request(parse_command(env({"action": "pbx/queues/pauseagent"}), ONE)).slow


# --- answers ---------------------------------------------------------------------------------


def ans(status: int, body: object, ctype: str = "application/json") -> HttpAnswer:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return HttpAnswer(status, ctype, raw)


def ep(path: str):  # type: ignore[no-untyped-def]
    e = lookup(path)
    assert e is not None
    return e


def test_interpret_envelopes() -> None:
    search = ep("pbx/users/search")
    ok = interpret(search, ans(200, {"success": 1, "message": "", "data": []}))
    assert (ok.status, ok.http_status, ok.response["data"], ok.error) == ("ok", 200, [], None)
    assert interpret(search, ans(200, {"success": "1", "data": []})).status == "ok"
    no = interpret(search, ans(200, {"success": 0, "message": "This number already exists"}))
    assert (no.status, no.error, no.retryable) == ("failed", "This number already exists", False)
    assert interpret(search, ans(200, {"success": "0"})).status == "failed"
    weird = interpret(search, ans(200, {"success": "maybe"}))
    assert (weird.status, weird.reason) == ("error", "bad_response")
    assert interpret(search, ans(200, {"data": []})).reason == "bad_response"
    assert interpret(search, ans(200, [1])).reason == "bad_response"
    html = interpret(search, ans(200, b"<html>proxy</html>", "text/html"))
    assert (html.status, html.reason, html.retryable) == ("error", "bad_response", False)


def test_interpret_users_add_shape() -> None:
    add = ep("pbx/users/add")
    ok = interpret(add, ans(200, {"status": "success", "message": "User created", "user_id": "7"}))
    assert ok.status == "ok" and ok.response["user_id"] == "7"
    no = interpret(add, ans(200, {"status": "error", "message": "exists"}))
    assert (no.status, no.error) == ("failed", "exists")


def test_interpret_agent_operations() -> None:
    pause = ep("pbx/queues/pauseagent")
    good = {"success": 1, "data": {"ok": 1, "message": "Paused successfully"}}
    assert interpret(pause, ans(200, good)).status == "ok"
    bad = interpret(pause, ans(200, {"success": 1, "data": {"ok": 0, "message": "not member"}}))
    assert (bad.status, bad.error) == ("failed", "not member")
    batch = ep("pbx/queues/batchpauseagent")
    items = [
        {"agent": "101", "queue": "600", "ok": 1, "message": "Paused successfully"},
        {"agent": "102", "queue": "600", "ok": 0, "message": "no such agent"},
    ]
    out = interpret(batch, ans(200, {"success": 1, "data": {"ok": 1, "Data": items}}))
    assert (out.status, out.error) == ("failed", "102@600: no such agent")
    # not an agent operation: data.ok means nothing
    assert (
        interpret(ep("pbx/users/search"), ans(200, {"success": 1, "data": {"ok": 0}})).status
        == "ok"
    )


@pytest.mark.parametrize("code", [400, 401, 403, 405, 415])
def test_interpret_client_errors_are_failed(code: int) -> None:
    out = interpret(ep("pbx/users/search"), ans(code, {"success": 0, "message": "Access denied"}))
    assert (out.status, out.http_status, out.retryable) == ("failed", code, False)
    assert out.error == f"HTTP {code}: Access denied"


def test_interpret_server_errors_are_retryable_errors() -> None:
    out = interpret(ep("pbx/users/search"), ans(502, b"<h1>Bad Gateway</h1>", "text/html"))
    assert (out.status, out.reason, out.retryable) == ("error", "http_5xx", True)
    assert out.error == "HTTP 502: <h1>Bad Gateway</h1>"
    gone = interpret(ep("pbx/users/search"), ans(501, {"success": 0, "message": "no service"}))
    assert (gone.status, gone.error, gone.retryable) == ("error", "HTTP 501: no service", False)
    redirect = interpret(ep("pbx/users/search"), ans(302, b""))
    assert (redirect.status, redirect.retryable) == ("error", False)
    assert transport_failure("timeout", "ReadTimeout").retryable
    assert not transport_failure("client", "InvalidURL").retryable


def test_interpret_downloads() -> None:
    audio = ep("reports/audio/download")
    out = interpret(audio, HttpAnswer(200, "audio/mpeg", b"ID3\x00bytes"))
    assert (out.status, out.file, out.content_type, out.response) == (
        "ok",
        b"ID3\x00bytes",
        "audio/mpeg",
        None,
    )
    no = interpret(audio, ans(200, {"success": 0, "message": "file not found"}))
    assert (no.status, no.file) == ("failed", None)
    missing = interpret(audio, HttpAnswer(404, "text/html", b"<html>Not Found</html>"))
    assert (missing.status, missing.error) == ("failed", "HTTP 404: file not found")
    big = interpret(audio, HttpAnswer(200, "audio/wav", b"", too_large=True))
    assert (big.status, big.reason, big.retryable) == ("error", "too_large", False)


# --- results ---------------------------------------------------------------------------------


def test_result_message_json_and_back() -> None:
    r = Result("m1", "pbx/users/search", "simotel", "ok", 200, {"success": 1}, None, 1, 12)
    body, ctype, headers = result_message(r)
    assert ctype == "application/json"
    assert orjson.loads(body) == {
        "command_id": "m1",
        "action": "pbx/users/search",
        "source": "simotel",
        "status": "ok",
        "http_status": 200,
        "response": {"success": 1},
        "error": None,
        "attempts": 1,
        "duration_ms": 12,
    }
    assert headers == {
        "command_id": "m1",
        "status": "ok",
        "source": "simotel",
        "action": "pbx/users/search",
    }
    assert parse_result(body, ctype, headers) == r


def test_result_message_download() -> None:
    r = Result(
        "m2",
        "reports/audio/download",
        "simotel",
        "ok",
        200,
        None,
        None,
        1,
        5,
        file=b"\x00\x01",
        content_type="audio/mpeg",
    )
    body, ctype, headers = result_message(r)
    assert (body, ctype) == (b"\x00\x01", "audio/mpeg")
    assert headers["http_status"] == 200 and headers["content_length"] == 2
    assert "response" not in headers and "error" not in headers
    back = parse_result(body, ctype, headers)
    assert (back.file, back.status, back.attempts, back.content_type) == (
        b"\x00\x01",
        "ok",
        1,
        "audio/mpeg",
    )


def test_result_store_roundtrip_and_dead_letter_rule() -> None:
    r = Result("m", "a/b/c", "s", "error", 503, {"x": 1}, "HTTP 503", 4, 900, reason="http_5xx")
    assert Result.from_json(r.to_json()) == r
    assert [s for s in ("ok", "failed", "error", "rejected", "expired", "unknown")
            if needs_dead_letter(s)] == ["error", "rejected", "expired", "unknown"]  # fmt: skip


# --- rate limit and backoff ------------------------------------------------------------------


def test_delivery_count_and_last_delivery() -> None:
    """RabbitMQ 3.10 quorum queues: no header (or 0) on the first delivery, 1, 2, ... after each
    return; a return that takes the count past x-delivery-limit dead-letters the message."""
    body = {"action": "setting/ping/act"}
    first, zero = env(body), env(body, headers={"x-delivery-count": 0})
    assert delivery_count(first) == delivery_count(zero) == 0
    assert delivery_count(env(body, headers={"x-delivery-count": "5"})) == 0  # not a count
    counts = [env(body, headers={"x-delivery-count": n}) for n in range(1, 7)]
    assert [delivery_count(e) for e in counts] == [1, 2, 3, 4, 5, 6]
    assert not is_last_delivery(first, 5)
    assert [is_last_delivery(e, 5) for e in counts] == [False] * 4 + [True] * 2
    assert is_last_delivery(zero, 0) and not is_last_delivery(zero, 1)


def test_delivery_limit_results() -> None:
    gone = make_delivery_limit(
        "c1", "pbx/users/search", "simotel", deliveries=6, may_have_run=False
    )
    sent = make_delivery_limit(
        "c2", "call/originate/act", "simotel", deliveries=6, may_have_run=True
    )
    assert (gone.status, gone.reason, gone.attempts) == ("error", "delivery_limit", 0)
    assert (sent.status, sent.reason) == ("unknown", "delivery_limit")
    assert gone.error is not None and "delivered 6 times" in gone.error
    assert sent.error is not None and "may or may not have run" in sent.error
    assert needs_dead_letter(gone.status) and needs_dead_letter(sent.status)


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=2, clock=lambda: now[0])
    assert [bucket.reserve() for _ in range(4)] == pytest.approx([0, 0, 0.1, 0.2])
    now[0] = 1.0  # refilled, but never beyond the burst
    assert [bucket.reserve() for _ in range(3)] == pytest.approx([0, 0, 0.1])
    assert TokenBucket(rate=0, burst=1).reserve() == 0


def test_backoff_delay() -> None:
    assert backoff_delay(1, 0.2, 5, lambda: 0.0) == pytest.approx(0.1)
    assert backoff_delay(1, 0.2, 5, lambda: 1.0) == pytest.approx(0.2)
    assert backoff_delay(3, 0.2, 5, lambda: 1.0) == pytest.approx(0.8)
    assert backoff_delay(10, 0.2, 5, lambda: 0.5) == pytest.approx(3.75)


def _chained(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (httpx.ConnectTimeout("timed out to secret-host"), "connect timeout (ConnectTimeout)"),
        (httpx.ReadTimeout("secret"), "read timeout (ReadTimeout)"),
        (
            httpx.LocalProtocolError("Illegal header value b'the-secret\\n'"),
            "invalid request header (LocalProtocolError)",
        ),
        (
            _chained(httpx.ConnectError("secret"), ConnectionRefusedError(111, "refused")),
            "connection refused (ConnectError)",
        ),
        (
            _chained(httpx.ConnectError("secret"), ssl.SSLCertVerificationError("secret")),
            "tls error (ConnectError)",
        ),
        (
            httpx.RemoteProtocolError("secret"),
            "protocol error from the server (RemoteProtocolError)",
        ),
        (
            UnicodeEncodeError("ascii", "the-secreté", 10, 11, "secret"),
            "invalid request header (UnicodeEncodeError)",
        ),
        (RuntimeError("secret"), "unexpected error (RuntimeError)"),
    ],
)
def test_http_errors_are_described_without_their_text(exc: BaseException, text: str) -> None:
    assert describe_error(exc) == text
