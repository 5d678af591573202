"""Serve an ASGI app with uvicorn inside the running event loop, on a socket bound before the
server starts, so the address (port 0: any free port) is known at once and nobody has to wait
for "started". Signals stay with the caller."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Generator

import uvicorn
from starlette.types import ASGIApp


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the process's signal handling belongs to whoever runs us


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    graceful: float = 2.0,
    reuse_port: bool = False,
) -> AsyncIterator[str]:
    """Run `app` while the block runs; yields its base URL, e.g. `http://127.0.0.1:40123`.
    Binding happens before anything else, so a taken port fails here with OSError (unless every
    process on it sets `reuse_port`). On exit, open requests get `graceful` seconds to finish."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if reuse_port:
        # Several processes bound to one port; the kernel spreads new connections over them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    config = uvicorn.Config(
        app,
        lifespan="off",
        # The app decides whom to believe (http.trusted_proxies); uvicorn's default would
        # rewrite the client address from X-Forwarded-For for any peer on 127.0.0.1.
        proxy_headers=False,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(graceful)),
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"uvicorn {host}:{port}")
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    try:
        yield f"http://{shown}:{bound}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=graceful + 3)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            sock.close()
