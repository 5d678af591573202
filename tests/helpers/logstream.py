"""A stream to configure the logs with in tests, read back as JSON lines."""

from __future__ import annotations

import io

import orjson


class LogStream(io.StringIO):
    """A text stream with a bytes buffer underneath, like sys.stderr when piped (the logs write
    our own lines to the buffer, third-party lines as text)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = io.BytesIO()

    @property
    def buffer(self) -> io.BytesIO:
        return self.bytes

    def isatty(self) -> bool:
        return False

    def text(self) -> str:
        return self.bytes.getvalue().decode() + self.getvalue()

    def lines(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in self.text().splitlines() if line.strip()]

    def hooks(self) -> list[dict[str, object]]:
        """The one-line summaries of webhooks."""
        return [line for line in self.lines() if line.get("event") == "webhook"]
