"""Files the simulated Simotel serves: call recordings (a short WAV tone, made with the stdlib
`wave` module) and faxes (a small, valid, uncompressed bilevel TIFF at fax width), plus the
calendar Simotel answers in (Jalali date strings)."""

from __future__ import annotations

import io
import math
import struct
import wave
import zlib
from datetime import UTC, datetime


def tone_wav(name: str, seconds: float = 1.0, rate: int = 8000) -> bytes:
    """A mono 16-bit WAV of a sine tone; the pitch depends on `name`, so different recordings
    sound different but the same recording is always the same bytes."""
    freq = 300 + zlib.crc32(name.encode()) % 600
    frames = int(seconds * rate)
    samples = (int(12000 * math.sin(2 * math.pi * freq * i / rate)) for i in range(frames))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", s) for s in samples))
    return buf.getvalue()


FAX_WIDTH = 1728  # pixels per line of a standard fax page


def fax_tiff(name: str, lines: int = 48) -> bytes:
    """A little-endian baseline bilevel TIFF (no compression, WhiteIsZero), FAX_WIDTH wide,
    with a few black bars whose position depends on `name`."""
    row_bytes = FAX_WIDTH // 8
    seed = zlib.crc32(name.encode())
    rows = []
    for y in range(lines):
        on = (y // 4 + seed) % 3 == 0
        rows.append(
            (b"\xff" * (row_bytes // 4) + b"\x00" * (row_bytes - row_bytes // 4))
            if on
            else b"\x00" * row_bytes
        )
    pixels = b"".join(rows)
    entries = [  # tag, type (3 SHORT, 4 LONG, 5 RATIONAL), count, value
        (256, 4, 1, FAX_WIDTH),
        (257, 4, 1, lines),
        (258, 3, 1, 1),
        (259, 3, 1, 1),
        (262, 3, 1, 0),
        (273, 4, 1, 0),  # strip offset, patched below
        (277, 3, 1, 1),
        (278, 4, 1, lines),
        (279, 4, 1, len(pixels)),
        (282, 5, 1, 0),  # x resolution, patched below
        (283, 5, 1, 0),
        (296, 3, 1, 2),
    ]
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    xres_offset = ifd_offset + ifd_size
    yres_offset = xres_offset + 8
    data_offset = yres_offset + 8
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_offset))
    out += struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if tag == 273:
            value = data_offset
        elif tag == 282:
            value = xres_offset
        elif tag == 283:
            value = yres_offset
        if typ == 3:
            out += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, typ, count, value)
    out += struct.pack("<I", 0)
    out += struct.pack("<II", 204, 1) + struct.pack("<II", 98, 1)  # fine fax resolution
    out += pixels
    return bytes(out)


def gregorian_to_jalali(gy: int, gm: int, gd: int) -> tuple[int, int, int]:
    """The Solar Hijri (Jalali) date of a Gregorian date (the usual arithmetic algorithm)."""
    days_before = (0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334)
    gy2 = gy + 1 if gm > 2 else gy
    days = (
        355666
        + 365 * gy
        + (gy2 + 3) // 4
        - (gy2 + 99) // 100
        + (gy2 + 399) // 400
        + gd
        + days_before[gm - 1]
    )
    jy = -1595 + 33 * (days // 12053)
    days %= 12053
    jy += 4 * (days // 1461)
    days %= 1461
    if days > 365:
        jy += (days - 1) // 365
        days = (days - 1) % 365
    if days < 186:
        return jy, 1 + days // 31, 1 + days % 31
    return jy, 7 + (days - 186) // 30, 1 + (days - 186) % 30


def jalali(ts: float) -> str:
    """`1402-04-28 19:34:16`: how Simotel writes most dates in API answers (UTC clock time)."""
    d = datetime.fromtimestamp(ts, UTC)
    jy, jm, jd = gregorian_to_jalali(d.year, d.month, d.day)
    return f"{jy:04d}-{jm:02d}-{jd:02d} {d:%H:%M:%S}"


def gregorian(ts: float) -> str:
    """`2022-12-02 09:57:53`"""
    return f"{datetime.fromtimestamp(ts, UTC):%Y-%m-%d %H:%M:%S}"


def webhook_time(ts: float) -> str:
    """`2021-01-16 06:30:37.471398`: how webhooks write times (UTC, no zone)."""
    return f"{datetime.fromtimestamp(ts, UTC):%Y-%m-%d %H:%M:%S.%f}"


def mongo_date(ts: float) -> dict[str, dict[str, str]]:
    return {"$date": {"$numberLong": str(int(ts * 1000))}}


def hhmmss(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
