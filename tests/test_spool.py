"""The SQLite spool on its own: order, bounds, restart and crash durability. No broker."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.errors import PublishError
from bridge.spool import Spool, SpoolFull, record_size
from bridge.translate import OutgoingEvent

ROOT = Path(__file__).resolve().parent.parent


def event(n: int, *, call_id: str | None = "call-1", body: bytes | None = None) -> OutgoingEvent:
    headers = {"source": "simotel", "event": "NewState", "received_at": "2025-01-01T00:00:00"}
    if call_id is not None:
        headers["call_id"] = call_id
    return OutgoingEvent(
        exchange="simotel.events",
        routing_key="simotel.NewState",
        body=body if body is not None else b'{"n": %d, "x": "\xc3\xa9"}' % n,
        message_id=f"m-{n}",
        event="NewState",
        source="simotel",
        call_id=call_id,
        timestamp=1_700_000_000.25 + n,
        headers=headers,
    )


def open_spool(path: Path, **kw: int) -> Spool:
    return Spool(
        path,
        max_messages=kw.get("max_messages", 1000),
        max_bytes=kw.get("max_bytes", 10_000_000),
    )


def test_events_come_back_in_order_and_unchanged(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db")
    sent = [event(i, call_id=None if i == 3 else "c") for i in range(10)]
    seqs = [spool.append(e) for e in sent]
    assert seqs == sorted(seqs)
    got = spool.peek(100)
    assert [s.event for s in got] == sent
    assert [s.seq for s in got] == seqs
    assert spool.depth == 10
    assert spool.size_bytes == sum(record_size(e) for e in sent)
    spool.close()


def test_delete_through_removes_a_prefix(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db")
    seqs = [spool.append(event(i)) for i in range(5)]
    assert spool.delete_through(seqs[1]) == 2
    assert [s.event.message_id for s in spool.peek(10)] == ["m-2", "m-3", "m-4"]
    assert spool.depth == 3
    assert spool.delete_through(seqs[4]) == 3
    assert spool.peek(10) == []
    assert (spool.depth, spool.size_bytes, spool.oldest_spooled_at) == (0, 0, None)
    spool.close()


def test_oldest_spooled_at_follows_the_head(tmp_path: Path) -> None:
    now = [100.0]
    spool = Spool(tmp_path / "s.db", max_messages=10, max_bytes=100_000, clock=lambda: now[0])
    assert spool.oldest_spooled_at is None
    first = spool.append(event(0))
    now[0] = 105.0
    spool.append(event(1))
    assert spool.oldest_spooled_at == 100.0
    spool.delete_through(first)
    assert spool.oldest_spooled_at == 105.0
    spool.close()


def test_count_bound(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db", max_messages=3)
    seqs = [spool.append(event(i)) for i in range(3)]
    with pytest.raises(SpoolFull) as info:
        spool.append(event(3))
    assert info.value.reason == "messages"
    assert isinstance(info.value, PublishError)  # the ingress answers 503 for it
    assert spool.depth == 3
    spool.delete_through(seqs[0])
    spool.append(event(3))
    assert [s.event.message_id for s in spool.peek(10)] == ["m-1", "m-2", "m-3"]
    spool.close()


def test_byte_bound(tmp_path: Path) -> None:
    big = event(0, body=b"x" * 2000)
    small = event(1, body=b"{}")
    spool = open_spool(tmp_path / "s.db", max_bytes=2 * record_size(big) + record_size(small))
    spool.append(big)
    spool.append(big)
    with pytest.raises(SpoolFull) as info:
        spool.append(big)
    assert info.value.reason == "bytes"
    spool.append(small)  # a small one still fits
    assert spool.depth == 3
    spool.close()


def test_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    spool = open_spool(path)
    seqs = [spool.append(event(i)) for i in range(4)]
    spool.delete_through(seqs[0])
    size, oldest = spool.size_bytes, spool.oldest_spooled_at
    spool.close()
    again = open_spool(path)
    assert again.depth == 3
    assert (again.size_bytes, again.oldest_spooled_at) == (size, oldest)
    assert [s.event for s in again.peek(10)] == [event(i) for i in (1, 2, 3)]
    assert again.append(event(4)) > seqs[-1]
    again.close()


def test_wal_mode_and_one_owner(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    spool = open_spool(path)
    spool.append(event(0))
    with pytest.raises(SpoolFull) as info:
        Spool(path, max_messages=10, max_bytes=100_000, lock_timeout=0)
    assert info.value.reason == "locked"
    spool.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert open_spool(path).depth == 1


def test_every_returned_append_survives_sigkill(tmp_path: Path) -> None:
    """A child appends, reports each append that returned, then is killed with SIGKILL
    mid-stream: every reported event is in the spool afterwards, in order."""
    path = tmp_path / "s.db"
    child = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_spool import event, open_spool
        from pathlib import Path
        spool = open_spool(Path({str(path)!r}))
        for i in range(200):
            spool.append(event(i))
            print(i, flush=True)
            if i == 149:
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    reported = [int(line) for line in proc.stdout.split()]
    assert reported == list(range(150))
    spool = open_spool(path)
    assert [s.event.message_id for s in spool.peek(1000)] == [f"m-{i}" for i in reported]
    assert spool.depth == 150
    spool.close()
    assert not os.path.exists(str(path) + "-shm")  # exclusive mode keeps the WAL index private


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.one_of(st.just(-1), st.integers(0, 5)), max_size=40))
def test_behaves_like_a_bounded_fifo(
    tmp_path_factory: pytest.TempPathFactory, ops: list[int]
) -> None:
    """-1 appends; k >= 0 deletes through the k-th oldest (if present). Compared with a list."""
    path = tmp_path_factory.mktemp("fifo") / "s.db"
    spool = open_spool(path, max_messages=8)
    model: list[tuple[int, str]] = []
    n = 0
    for op in ops:
        if op < 0:
            ev = event(n)
            n += 1
            if len(model) >= 8:
                with pytest.raises(SpoolFull):
                    spool.append(ev)
            else:
                model.append((spool.append(ev), ev.message_id))
        elif op < len(model):
            assert spool.delete_through(model[op][0]) == op + 1
            del model[: op + 1]
        assert spool.depth == len(model)
        assert [(s.seq, s.event.message_id) for s in spool.peek(100)] == model
    spool.close()


def test_a_drained_spool_gives_its_disk_space_back(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db", max_messages=5000)
    last = 0
    for i in range(2000):
        last = spool.append(event(i, body=b"x" * 1000))
    files = list(tmp_path.iterdir())
    assert sum(f.stat().st_size for f in files) > 2_000_000
    spool.delete_through(last)
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) < 100_000
    spool.close()


def damage(path: Path, seq: int, **columns: object) -> None:
    """Overwrite columns of one spooled row behind the spool's back (a damaged file)."""
    db = sqlite3.connect(path)
    sets = ", ".join(f"{name} = ?" for name in columns)
    db.execute(f"UPDATE spool SET {sets} WHERE seq = ?", (*columns.values(), seq))
    db.commit()
    db.close()


@pytest.mark.parametrize(
    "columns",
    [
        {"headers": b"\xff not json"},
        {"headers": b"[1, 2]"},
        {"body": "text, not bytes"},
        {"timestamp": "yesterday"},
        {"call_id": b"\x00a blob"},
    ],
)
def test_an_undecodable_row_is_quarantined_and_the_rest_come_back_in_order(
    tmp_path: Path, columns: dict[str, object]
) -> None:
    path = tmp_path / "s.db"
    spool = open_spool(path)
    seqs = [spool.append(event(n)) for n in range(5)]
    spool.close()
    damage(path, seqs[1], **columns)
    spool = open_spool(path)
    batch, moved = spool.next_batch(3)
    assert moved == 1
    assert [s.event.message_id for s in batch] == ["m-0", "m-2", "m-3"]
    assert (spool.depth, spool.quarantine_depth, spool.dead_copies_pending) == (4, 1, 1)
    [q] = spool.quarantined()
    assert q.seq == seqs[1] and q.reason.startswith("undecodable: ")
    assert q.dead_copy == "pending"
    # Every column is kept as it was, for a later look.
    for name, value in columns.items():
        assert getattr(q, name) == value
    spool.delete_through(batch[-1].seq)
    assert [s.event.message_id for s in spool.peek(10)] == ["m-4"]
    spool.close()
    reopened = open_spool(path)
    assert (reopened.depth, reopened.quarantine_depth) == (1, 1)


def test_quarantined_rows_count_against_the_bounds_until_dropped(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db", max_messages=3)
    seqs = [spool.append(event(n)) for n in range(3)]
    assert spool.quarantine(seqs[0], "refused: test")
    assert spool.depth == 2 and spool.quarantine_depth == 1 and spool.full
    with pytest.raises(SpoolFull) as info:
        spool.append(event(9))
    assert info.value.reason == "messages" and "1 quarantined" in str(info.value)
    assert spool.drop([seqs[0], 12345]) == 1
    assert spool.quarantine_depth == 0 and not spool.full
    spool.append(event(9))


def test_requeue_puts_quarantined_rows_back_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    spool = open_spool(path)
    seqs = [spool.append(event(n)) for n in range(4)]
    spool.quarantine(seqs[0], "refused: a")
    spool.quarantine(seqs[2], "refused: b")
    size = spool.size_bytes + spool.quarantine_bytes
    new = spool.requeue([seqs[2], 999])
    assert len(new) == 1 and new[0] > seqs[3]
    assert [s.event.message_id for s in spool.peek(10)] == ["m-1", "m-3", "m-2"]
    assert spool.requeue() == [new[0] + 1]
    assert [s.event.message_id for s in spool.peek(10)] == ["m-1", "m-3", "m-2", "m-0"]
    assert (spool.depth, spool.quarantine_depth) == (4, 0)
    assert spool.size_bytes == size
    spool.close()
    assert open_spool(path).depth == 4


def test_a_dead_copy_is_given_up_after_its_attempts(tmp_path: Path) -> None:
    spool = open_spool(tmp_path / "s.db")
    a, b = spool.append(event(0)), spool.append(event(1))
    spool.quarantine(a, "refused: x")
    spool.quarantine(b, "refused: y")
    assert spool.dead_copies_pending == 2
    assert spool.mark_dead_copy(a, sent=True, give_up_after=2) == "sent"
    assert spool.mark_dead_copy(b, sent=False, give_up_after=2) == "pending"
    assert spool.mark_dead_copy(b, sent=False, give_up_after=2) == "failed"
    assert spool.dead_copies_pending == 0
    assert [(q.seq, q.dead_copy, q.dead_attempts) for q in spool.quarantined()] == [
        (a, "sent", 1),
        (b, "failed", 2),
    ]
    assert spool.pending_dead_copies(10) == []


def spool_config(tmp_path: Path) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(f"""\
            sources:
              simotel:
                webhook: {{username: simotel, password: secret}}
            spool:
              path: {tmp_path / "spool.sqlite3"}
            """)
    )
    return config


def test_spool_command_lists_requeues_and_drops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bridge.cli import main

    config = str(spool_config(tmp_path))
    spool = open_spool(tmp_path / "spool.sqlite3")
    seqs = [spool.append(event(n)) for n in range(3)]
    spool.quarantine(seqs[0], "refused: ChannelNotFoundEntity")
    spool.quarantine(seqs[2], "undecodable: JSONDecodeError")
    # While the bridge holds the spool, the command changes nothing and says why.
    assert main(["spool", "requeue", "--all", "-c", config]) == 1
    assert "in use by a running bridge" in capsys.readouterr().err
    spool.close()

    assert main(["spool", "list", "-c", config]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["id"], r["reason"], r["message_id"]) for r in rows] == [
        (seqs[0], "refused: ChannelNotFoundEntity", "m-0"),
        (seqs[2], "undecodable: JSONDecodeError", "m-2"),
    ]
    assert "2 quarantined, 1 spooled" in err
    assert main(["spool", "requeue", "-c", config]) == 2  # neither ids nor --all
    capsys.readouterr()
    assert main(["spool", "requeue", str(seqs[2]), "-c", config]) == 0
    assert main(["spool", "drop", "--all", "-c", config]) == 0
    assert "1 event(s) deleted" in capsys.readouterr().out
    spool = open_spool(tmp_path / "spool.sqlite3")
    assert [s.event.message_id for s in spool.peek(10)] == ["m-1", "m-2"]
    assert spool.quarantine_depth == 0
    spool.close()
