"""The SQLite reconcile store: the five methods of `ReconcileStore`, across a reopen."""

from __future__ import annotations

from pathlib import Path

from bridge.reconcile import ReconcileStore
from bridge.reconcile_store import SqliteReconcileStore


async def test_cursor_and_seen_survive_a_reopen_and_are_per_source(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "reconcile.sqlite3"
    store: ReconcileStore = await SqliteReconcileStore.open(path)
    assert await store.get_cursor("a", "cdr") is None
    await store.set_cursor("a", "cdr", "0001")
    await store.set_cursor("a", "cdr", "0002")
    await store.set_cursor("b", "cdr", "0009")
    await store.mark_seen("a", ["Cdr:1", "Cdr:2"], at=100.0)
    await store.mark_seen("a", ["Cdr:2"], at=300.0)  # seen again: kept with the later time
    await store.mark_seen("b", ["Cdr:3"], at=100.0)
    await store.mark_seen("a", [], at=1.0)
    assert isinstance(store, SqliteReconcileStore)
    await store.close()

    store = await SqliteReconcileStore.open(path)
    assert await store.get_cursor("a", "cdr") == "0002"
    assert await store.get_cursor("a", "queue") is None
    assert await store.get_cursor("b", "cdr") == "0009"
    assert await store.seen("a", ["Cdr:1", "Cdr:2", "Cdr:3", "CdrQueue:1"]) == {"Cdr:1", "Cdr:2"}
    assert await store.seen("a", []) == set()
    many = [f"Cdr:x{i}" for i in range(1200)]  # more ids than one statement takes
    await store.mark_seen("a", many, at=200.0)
    assert len(await store.seen("a", many)) == 1200
    assert await store.purge_seen(before=250.0) == 1 + 1200 + 1  # Cdr:1, the 1200, b's Cdr:3
    assert await store.seen("a", ["Cdr:1", "Cdr:2"]) == {"Cdr:2"}
    await store.close()
