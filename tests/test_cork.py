"""bridge/cork.py: the writes of one event-loop turn leave together, in order; close() sends
what is pending, abort() drops it. Over a real socket pair."""

from __future__ import annotations

import asyncio
import socket

from bridge.cork import CorkedTransport


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


async def _pair() -> tuple[asyncio.Transport, _Recorder, list[bytes]]:
    """A transport whose send() calls are recorded, and the protocol reading the other end."""
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    sent: list[bytes] = []

    class _Counting(asyncio.Protocol):
        pass

    transport, _ = await loop.create_connection(_Counting, sock=left)
    original = transport.write

    def write(data: bytes | bytearray | memoryview) -> None:
        sent.append(bytes(data))
        original(data)

    transport.write = write  # type: ignore[method-assign]
    reader = _Recorder()
    await loop.create_connection(lambda: reader, sock=right)
    return transport, reader, sent


async def test_one_write_per_turn_in_order_close_flushes() -> None:
    loop = asyncio.get_running_loop()
    transport, reader, sent = await _pair()
    corked = CorkedTransport(transport, loop)
    corked.write(b"HTTP/1.1 200 OK\r\n\r\n")
    corked.write(b"body")
    assert sent == []  # nothing sent within the turn
    await asyncio.sleep(0)  # one turn of the loop: the flush scheduled by the first write
    assert sent == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    corked.write(b"last")
    corked.close()  # pending bytes go before the close
    async with asyncio.timeout(10):
        await reader.closed.wait()
    assert bytes(reader.data) == b"HTTP/1.1 200 OK\r\n\r\nbodylast"


async def test_abort_drops_what_is_pending() -> None:
    loop = asyncio.get_running_loop()
    transport, reader, sent = await _pair()
    corked = CorkedTransport(transport, loop)
    corked.write(b"never")
    corked.abort()
    async with asyncio.timeout(10):
        await reader.closed.wait()
    await asyncio.sleep(0)
    assert sent == [] and bytes(reader.data) == b""
