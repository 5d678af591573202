"""Fewer system calls on the hot path: the writes a connection makes in one turn of the event
loop leave in one `send()`.

An accepted event costs two socket writes besides the request's read: the publish to the
broker and the HTTP answer. Both libraries write as they go: aiormq's writer task writes each
publish's frames on their own (64 publishes in flight, 64 writes), and uvicorn writes an
answer's head and its body separately. `CorkedTransport` gathers what is written during one
turn of the loop and sends it at the end of the turn, in order; the receiver sees the same
bytes, sooner or later by less than one turn. `close()` sends what is pending first;
`abort()` drops it, as the transport would.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aiormq.connection import TLSTransportFactory, TransportFactory
from aiormq.exceptions import AMQPConnectionError
from yarl import URL


class CorkedTransport:
    """A transport whose writes within one event-loop turn are sent together."""

    __slots__ = ("_buffer", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._buffer:
            self._loop.call_soon(self._flush)
        self._buffer.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def _flush(self) -> None:
        if self._buffer:
            data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
            self._buffer.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._buffer))

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._buffer.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CorkedTCPTransportFactory(TransportFactory):
    """aiormq's plain TCP connection (`asyncio.open_connection`, step by step), its writes
    corked; `amqps://` URLs keep aiormq's TLS connection as it is."""

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if url.scheme == "amqps":
            return await TLSTransportFactory().create(url, **kwargs)
        kwargs.pop("ssl_context_provider", None)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**16, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.create_connection(
                lambda: protocol, cast(str, url.host), cast(int, url.port), **kwargs
            )
        except OSError as exc:
            raise AMQPConnectionError(*exc.args) from exc
        corked = cast(asyncio.Transport, CorkedTransport(transport, loop))
        return reader, asyncio.StreamWriter(corked, protocol, reader, loop)
