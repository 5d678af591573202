"""`simotel-bridge send ACTION [JSON]`: publish one command, wait for its result.

The work is done by `bridge.client.send_command` (a URL or a connection, and the names); this
module takes the names and the broker from the bridge's configuration. Importing
`send_command` from here for a service of your own is kept for one release: use
`bridge.client.send_command`, which needs no configuration.
"""

from __future__ import annotations

from typing import Any

from bridge import client
from bridge.amqp import Broker
from bridge.commands import InvalidCommand, Result
from bridge.config import Settings


async def send_command(
    settings: Settings,
    action: str,
    data: dict[str, Any],
    *,
    source: str | None = None,
    timeout: float = 30.0,
    message_id: str | None = None,
) -> Result:
    """Publish one command, wait for its result (at most `timeout` seconds, which is also the
    command's deadline) and return it. A download's bytes are in `Result.file`.
    Raises InvalidCommand (unknown action/source), PublishError, TimeoutError."""
    client.send.action_path(action)  # an unknown action is refused before connecting
    if source is None:
        if len(settings.sources) != 1:
            raise InvalidCommand("unknown_source", "several sources are configured: name one")
        source = next(iter(settings.sources))
    elif source not in settings.sources:
        raise InvalidCommand("unknown_source", f"source {source!r} is not configured")
    # The bridge's Broker, as before: it tries every configured node within connect_timeout
    # (PublishError when none answers) and declares the topology, so a command sent before any
    # worker started waits in its queue instead of coming back unroutable.
    broker = Broker(settings.amqp, name="simotel-bridge send")
    await broker.connect()
    try:
        return await client.send_command(
            broker.connection,
            action,
            data,
            source=source,
            exchange=settings.amqp.exchanges.commands,
            timeout=timeout,
            message_id=message_id,
        )
    finally:
        await broker.close()
