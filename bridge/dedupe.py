"""Moved to `bridge.state` (the interface and its SQLite and PostgreSQL implementations); this
name stays for existing imports."""

from bridge.state import Record, State
from bridge.state.sqlite import SqliteStateStore as StateStore

__all__ = ["Record", "State", "StateStore"]
