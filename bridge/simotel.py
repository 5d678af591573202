"""The Simotel API client: one shared `httpx.AsyncClient` per source, with its authentication,
timeouts, rate limit and retry loop. What to send and how to read the answer is decided by the
pure functions of `bridge.commands`; this module only moves bytes.

- Auth: HTTP Basic, `X-APIKEY`, or both (ApiSettings.auth). Secrets are never logged.
- Timeouts: explicit connect and read timeouts; report searches get `report_timeout`.
- TLS verification stays on unless `verify_tls: false`.
- Rate limit: a token bucket per source (`rate_limit` per second, `rate_burst`).
- Retries: only for retry-safe actions, on timeouts, transport errors and 5xx, with exponential
  backoff and jitter, at most `max_retries` times, never past the command's deadline.
- Errors: the text of an httpx/h11/ssl exception is never copied into a result (it can quote a
  request header, i.e. a secret): `describe_error` maps it to a fixed phrase and the class name.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import orjson

from bridge.catalog import Endpoint
from bridge.commands import HttpAnswer, HttpRequest, Outcome, interpret, transport_failure
from bridge.config import ApiSettings

USER_AGENT = "simotel-bridge"


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up. `reserve()` takes a token and says
    how long to wait for it; reservations queue up in call order."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def reserve(self) -> float:
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Delay before retry number `attempt` (1, 2, ...): exponential, capped, with the upper
    half jittered ("equal jitter")."""
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    return ceiling / 2 + rand() * ceiling / 2


# Most specific first: the first class the exception is an instance of names it.
_PHRASES: tuple[tuple[type[BaseException], str], ...] = (
    (httpx.ConnectTimeout, "connect timeout"),
    (httpx.ReadTimeout, "read timeout"),
    (httpx.WriteTimeout, "write timeout"),
    (httpx.PoolTimeout, "connection pool timeout"),
    (httpx.TimeoutException, "timeout"),
    (httpx.LocalProtocolError, "invalid request header"),
    (httpx.RemoteProtocolError, "protocol error from the server"),
    (httpx.ProxyError, "proxy error"),
    (httpx.UnsupportedProtocol, "unsupported protocol"),
    (httpx.ConnectError, "connect error"),
    (httpx.ReadError, "connection lost while reading"),
    (httpx.WriteError, "connection lost while writing"),
    (httpx.CloseError, "connection close error"),
    (httpx.DecodingError, "undecodable response"),
    (httpx.TooManyRedirects, "too many redirects"),
    (httpx.InvalidURL, "invalid url"),
    (httpx.TransportError, "transport error"),
    (httpx.HTTPError, "http client error"),
    (UnicodeError, "invalid request header"),  # a non-ASCII header value, before sending
)


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def describe_error(exc: BaseException) -> str:
    """A fixed phrase and the class name for an exception of the HTTP stack, never its text
    (an h11 error quotes the header value it refused, which may be the API key)."""
    chain = _causes(exc)
    if any(isinstance(e, ssl.SSLError | ssl.CertificateError) for e in chain):
        phrase = "tls error"
    elif any(isinstance(e, ConnectionRefusedError) for e in chain):
        phrase = "connection refused"
    elif any(isinstance(e, socket.gaierror) for e in chain):
        phrase = "name resolution failed"
    else:
        phrase = next((p for cls, p in _PHRASES if isinstance(exc, cls)), "unexpected error")
    return f"{phrase} ({type(exc).__name__})"


@dataclass(frozen=True, slots=True)
class Execution:
    outcome: Outcome
    attempts: int


class SimotelClient:
    """The client of one source. `transport` lets tests and benchmarks inject one."""

    def __init__(
        self,
        source: str,
        api: ApiSettings,
        *,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
        rand: Callable[[], float] = random.random,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.source = source
        self.api = api
        self._rand = rand
        self._observe = observe
        self.bucket = TokenBucket(api.rate_limit, api.rate_burst)
        headers = {"User-Agent": USER_AGENT}
        auth: httpx.Auth | None = None
        if api.auth in ("basic", "both"):
            assert api.username is not None and api.password is not None  # config validates
            auth = httpx.BasicAuth(api.username, api.password.get_secret_value())
        if api.auth in ("apikey", "both"):
            assert api.api_key is not None
            headers["X-APIKEY"] = api.api_key.get_secret_value()
        self._timeout = httpx.Timeout(
            connect=api.connect_timeout,
            read=api.read_timeout,
            write=api.read_timeout,
            pool=api.read_timeout,
        )
        self._report_timeout = httpx.Timeout(
            connect=api.connect_timeout,
            read=api.report_timeout,
            write=api.read_timeout,
            pool=api.report_timeout,
        )
        self._http = httpx.AsyncClient(
            base_url=api.base_url,
            auth=auth,
            headers=headers,
            timeout=self._timeout,
            verify=api.verify_tls,
            follow_redirects=False,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def _build(self, req: HttpRequest) -> httpx.Request:
        timeout = self._report_timeout if req.slow else self._timeout
        extensions = {"timeout": timeout.as_dict()}
        if req.file is not None:
            files = {"file": (req.file.filename, req.file.content, req.file.content_type)}
            return self._http.build_request(
                req.method, req.path, data=req.form, files=files, extensions=extensions
            )
        return self._http.build_request(
            req.method,
            req.path,
            content=orjson.dumps(req.json if req.json is not None else {}),
            headers={"Content-Type": "application/json"},
            extensions=extensions,
        )

    async def send_once(self, req: HttpRequest) -> HttpAnswer:
        """One HTTP exchange. Downloads are streamed and cut at `max_download_bytes`."""
        request = self._build(req)
        response = await self._http.send(request, stream=True)
        try:
            ctype = response.headers.get("content-type", "")
            limit = self.api.max_download_bytes
            if not req.download:
                return HttpAnswer(response.status_code, ctype, await response.aread())
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                return HttpAnswer(response.status_code, ctype, b"", too_large=True)
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    return HttpAnswer(response.status_code, ctype, b"", too_large=True)
                chunks.append(chunk)
            return HttpAnswer(response.status_code, ctype, b"".join(chunks))
        finally:
            await response.aclose()

    async def attempt(self, endpoint: Endpoint, req: HttpRequest) -> Outcome:
        """One attempt, as an outcome (never raises for HTTP or network trouble)."""
        started = time.perf_counter()
        try:
            answer = await self.send_once(req)
        except httpx.TimeoutException as exc:
            outcome = transport_failure("timeout", describe_error(exc))
        except httpx.LocalProtocolError as exc:  # refused before sending: retrying cannot help
            outcome = transport_failure("client", describe_error(exc))
        except httpx.TransportError as exc:
            outcome = transport_failure("transport", describe_error(exc))
        except Exception as exc:  # httpx.HTTPError, or a request that cannot even be built
            outcome = transport_failure("client", describe_error(exc))
        else:
            outcome = interpret(endpoint, answer)
        if self._observe is not None:
            self._observe(endpoint.kind, time.perf_counter() - started)
        return outcome

    async def execute(
        self,
        endpoint: Endpoint,
        req: HttpRequest,
        *,
        deadline: float | None = None,
        wall: Callable[[], float] = time.time,
    ) -> Execution:
        """Send, retrying a retry-safe endpoint on retryable outcomes. An attempt is never
        started past `deadline` (epoch seconds): before the first one that is `expired`."""
        retries = self.api.max_retries if endpoint.retry_safe else 0
        attempts = 0
        last: Outcome | None = None
        while True:
            await self.bucket.acquire()
            if deadline is not None and wall() >= deadline:
                if last is None:
                    expired = Outcome("expired", error="deadline passed", reason="deadline")
                    return Execution(expired, 0)
                return Execution(last, attempts)
            attempts += 1
            last = await self.attempt(endpoint, req)
            if not last.retryable or attempts > retries:
                return Execution(last, attempts)
            delay = backoff_delay(
                attempts, self.api.retry_base_delay, self.api.retry_max_delay, self._rand
            )
            if deadline is not None and wall() + delay >= deadline:
                return Execution(last, attempts)
            await asyncio.sleep(delay)
