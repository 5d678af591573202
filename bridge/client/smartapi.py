"""The SmartApi command language (docs/simotel/webhooks.md §5.5): typed commands, a builder and
a parser.

A SmartApi answer is a script such as
`PlayAnnouncement('welcome'); GetData('enter-code', 10, 4); Exit('go-s2')`. Simotel runs the
commands in order; `Exit('case')` leaves the component and must come last.

Safety. Simotel does not document any escape sequence inside a quoted argument, and its parser
may well split on `;` and `,` before it looks at quotes. Escaping a quote as `\\'` would therefore
only be safe in *our* grammar, not in Simotel's. So text arguments are never escaped: a string
holding a quote, a backslash, a separator (`;`, `,`), a parenthesis or a control character is
refused (`UnsafeArgument`) when the command is built, and an answer holding one is refused when
it is parsed. None of the documented arguments (file names, `id:<hex>`, sound names, cases,
extensions, times and dates) needs those characters, so nothing useful is lost, and a
caller-supplied string can never turn into an extra command under any reading of the script.

Look-alikes count as the real thing: a character whose compatibility form (NFKC) holds one of
the refused characters (fullwidth `＇ ； （ ）`, the Greek question mark, ...), any non-ASCII
quote or bracket (categories Pi, Pf, Ps, Pe), and the other commas, semicolons and apostrophes
of `CONFUSABLES` (Arabic `، ؛`, `ʼ`, `′`, ...) are refused too. Digits are ASCII digits only
(`int()` would read Arabic-Indic ones), and a file or sound name may hold neither `/` nor `..`.

Every command renders canonically (`Name(arg, ...)`, text in single quotes, integers bare,
commands joined with `;`), and `parse(render(cmds)) == cmds` for every script `build` accepts.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal, cast

from bridge.errors import SmartApiError as SmartApiError  # re-exported: defined in bridge.errors
from bridge.errors import UnsafeArgument as UnsafeArgument

Calendar = Literal["gregorian", "jalali", "hijri"]
CALENDARS: tuple[Calendar, ...] = ("gregorian", "jalali", "hijri")

MAX_TEXT = 256
MAX_COMMANDS = 64
# The longest script parsed: 64 commands of the longest kind fit with room to spare. A longer
# one is refused before parsing starts, so a parse never holds the event loop for long.
MAX_SCRIPT = 32 * 1024
# Characters refused in text arguments (see the module docstring); control and format
# characters and separators other than the ASCII space (Unicode categories C*, Z*) are refused
# as well.
FORBIDDEN = frozenset("'\"`\\;,()\u2018\u2019\u201c\u201d")
# Look-alikes of quotes and separators that NFKC does not map to one, and that are not in the
# quote and bracket categories (refused as a whole): commas, semicolons, apostrophes, primes.
CONFUSABLES = frozenset(
    "\u060c\u061b\u066b\u066c\u3001\u02bb\u02bc\u02bd\u02b9\u02ba\u02c8\u02ca\u02cb"
    "\u00b4\u2032\u2033\u2035\u2036\u05f3\u05f4\ua78c\u2e32\u2e34\u2e41\u204f\ua4f9"
    "\ua4fc\u037e\u0387\u201a\u201b\u201e\u201f\u2039\u203a\u00ab\u00bb\uff40"
)
_REFUSED_CATEGORIES = frozenset(("Pi", "Pf", "Ps", "Pe"))
# What a dialled number / extension may hold: it ends up in the dialplan.
DIALABLE = re.compile(r"[A-Za-z0-9*#+_-]{1,64}")
# re.ASCII: `\d` must not match Arabic-Indic or other non-ASCII digits.
_DURATION = re.compile(r"(\d{1,5}\.)?\d{1,2}:\d{2}:\d{2}", re.ASCII)
_CLOCK = re.compile(r"\d{1,2}:\d{2}(:\d{2})?", re.ASCII)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_MAX_INT = 10**12


def check_text(value: object, what: str = "argument") -> str:
    """Return `value` if it is a text argument Simotel can receive unambiguously."""
    if not isinstance(value, str):
        raise SmartApiError(f"{what} must be a string, not {type(value).__name__}")
    if not value or len(value) > MAX_TEXT:
        raise SmartApiError(f"{what} must be 1 to {MAX_TEXT} characters")
    if value != value.strip():
        raise UnsafeArgument(f"{what} must not start or end with white space")
    # Whole-string checks run at C speed (a parse must never hold the event loop); the slow
    # per-character walk only runs to name the character of a value already known to be bad.
    ok = value.isprintable() and FORBIDDEN.isdisjoint(value)
    if ok and not value.isascii():
        ok = CONFUSABLES.isdisjoint(value) and FORBIDDEN.isdisjoint(
            unicodedata.normalize("NFKC", value)
        )
        ok = ok and not any(
            unicodedata.category(ch) in _REFUSED_CATEGORIES for ch in set(value) if ch > "~"
        )
    if not ok:
        bad = next((ch for ch in value if unsafe_char(ch)), value)
        raise UnsafeArgument(f"{what} must not contain {bad!r}")
    return value


def unsafe_char(ch: str) -> bool:
    """Whether `ch` is refused in a text argument: a refused character, a control or format
    character, a Unicode quote or bracket, or a look-alike of a refused character."""
    if ch in FORBIDDEN or ch in CONFUSABLES:
        return True
    cat = unicodedata.category(ch)
    if cat[0] == "C" or (cat[0] == "Z" and ch != " "):
        return True
    if ch.isascii():
        return False
    return cat in _REFUSED_CATEGORIES or any(
        c in FORBIDDEN for c in unicodedata.normalize("NFKC", ch)
    )


def check_name(value: object, what: str) -> str:
    """A file or sound name: a text argument without `/`, `\\` or `..`, so it cannot leave the
    directory Simotel reads it from."""
    text = check_text(value, what)
    if "/" in text or ".." in text:
        raise UnsafeArgument(f"{what} must not contain '/' or '..'")
    return text


def check_int(value: object, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SmartApiError(f"{what} must be an integer, not {type(value).__name__}")
    if not minimum <= value < _MAX_INT:
        raise SmartApiError(f"{what} must be between {minimum} and {_MAX_INT - 1}")
    return value


def _check_pattern(value: object, pattern: re.Pattern[str], what: str, shape: str) -> str:
    text = check_text(value, what)
    if not pattern.fullmatch(text):
        raise SmartApiError(f"{what} must look like {shape}, got {text!r}")
    return text


# Argument kinds: how an argument is written. "text" is single-quoted; "int" is bare digits
# (read back as int); "digits" is bare digits kept as a string (leading zeros matter).
Kind = Literal["text", "int", "digits"]


@dataclass(frozen=True)
class SmartApiCommand:
    """One SmartApi command. Subclasses list their argument kinds in `ARGS`, in field order."""

    NAME: ClassVar[str]
    ARGS: ClassVar[tuple[Kind, ...]] = ()

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Validate the arguments; raise SmartApiError."""

    def args(self) -> tuple[str | int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def render(self) -> str:
        parts = []
        for kind, value in zip(self.ARGS, self.args(), strict=True):
            parts.append(f"'{value}'" if kind == "text" else str(value))
        return f"{self.NAME}({', '.join(parts)})"


@dataclass(frozen=True)
class PlayAnnouncement(SmartApiCommand):
    """Play an uploaded announcement, by name or as `id:<announcement id>`."""

    file: str
    NAME = "PlayAnnouncement"
    ARGS = ("text",)

    def check(self) -> None:
        check_name(self.file, "PlayAnnouncement file")


@dataclass(frozen=True)
class Playback(SmartApiCommand):
    """Play a built-in system sound, e.g. `hello-world`."""

    name: str
    NAME = "Playback"
    ARGS = ("text",)

    def check(self) -> None:
        check_name(self.name, "Playback name")


@dataclass(frozen=True)
class SayNumber(SmartApiCommand):
    number: int
    NAME = "SayNumber"
    ARGS = ("int",)

    def check(self) -> None:
        check_int(self.number, "SayNumber number")


@dataclass(frozen=True)
class SayDigit(SmartApiCommand):
    """Speak digit by digit; a string so that leading zeros are kept."""

    digits: str
    NAME = "SayDigit"
    ARGS = ("digits",)

    def check(self) -> None:
        if not isinstance(self.digits, str) or not re.fullmatch(r"[0-9]{1,64}", self.digits):
            raise SmartApiError(f"SayDigit digits must be 1 to 64 digits, got {self.digits!r}")


@dataclass(frozen=True)
class SayDuration(SmartApiCommand):
    """Speak a duration written `d.HH:MM:SS` (days optional)."""

    duration: str
    NAME = "SayDuration"
    ARGS = ("text",)

    def check(self) -> None:
        _check_pattern(self.duration, _DURATION, "SayDuration duration", "d.HH:MM:SS")


@dataclass(frozen=True)
class SayClock(SmartApiCommand):
    time: str
    NAME = "SayClock"
    ARGS = ("text",)

    def check(self) -> None:
        _check_pattern(self.time, _CLOCK, "SayClock time", "HH:MM[:SS]")


@dataclass(frozen=True)
class SayDate(SmartApiCommand):
    date: str
    calendar: Calendar = "gregorian"
    NAME = "SayDate"
    ARGS = ("text", "text")

    def check(self) -> None:
        _check_pattern(self.date, _DATE, "SayDate date", "YYYY-MM-DD")
        if self.calendar not in CALENDARS:
            raise SmartApiError(f"SayDate calendar must be one of {', '.join(CALENDARS)}")


@dataclass(frozen=True)
class GetData(SmartApiCommand):
    """Play `file` (several joined with `&`) and collect up to `max_digits` digits; they arrive
    as `data` in the next component request."""

    file: str
    timeout: int
    max_digits: int
    NAME = "GetData"
    ARGS = ("text", "int", "int")

    def check(self) -> None:
        check_name(self.file, "GetData file")
        check_int(self.timeout, "GetData timeout")
        check_int(self.max_digits, "GetData max_digits", minimum=1)


@dataclass(frozen=True)
class MusicOnHold(SmartApiCommand):
    moh_class: str
    seconds: int
    NAME = "MusicOnHold"
    ARGS = ("text", "int")

    def check(self) -> None:
        check_name(self.moh_class, "MusicOnHold class")
        check_int(self.seconds, "MusicOnHold seconds", minimum=1)


@dataclass(frozen=True)
class SetExten(SmartApiCommand):
    exten: str
    NAME = "SetExten"
    ARGS = ("text",)

    def check(self) -> None:
        text = check_text(self.exten, "SetExten extension")
        if not DIALABLE.fullmatch(text):
            raise SmartApiError(f"SetExten extension must match {DIALABLE.pattern}")


@dataclass(frozen=True)
class SetLimitOnCall(SmartApiCommand):
    seconds: int
    NAME = "SetLimitOnCall"
    ARGS = ("int",)

    def check(self) -> None:
        check_int(self.seconds, "SetLimitOnCall seconds", minimum=1)


@dataclass(frozen=True)
class ClearUserData(SmartApiCommand):
    NAME = "ClearUserData"


@dataclass(frozen=True)
class Exit(SmartApiCommand):
    """Leave the component through the output whose Case is `case`. Must be the last command."""

    case: str
    NAME = "Exit"
    ARGS = ("text",)

    def check(self) -> None:
        check_text(self.case, "Exit case")


# The old name, kept for one release (`bridge.commands.Command` is a command to the worker).
Command = SmartApiCommand

COMMANDS: dict[str, type[SmartApiCommand]] = {
    c.NAME: c
    for c in (
        PlayAnnouncement,
        Playback,
        SayNumber,
        SayDigit,
        SayDuration,
        SayClock,
        SayDate,
        GetData,
        MusicOnHold,
        SetExten,
        SetLimitOnCall,
        ClearUserData,
        Exit,
    )
}


def check_script(commands: Sequence[SmartApiCommand]) -> None:
    """A script is 1 to MAX_COMMANDS commands ending with exactly one `Exit`."""
    if not commands:
        raise SmartApiError("a script needs at least Exit('case')")
    if len(commands) > MAX_COMMANDS:
        raise SmartApiError(f"a script holds at most {MAX_COMMANDS} commands")
    for cmd in commands:
        if not isinstance(cmd, SmartApiCommand):
            raise SmartApiError(f"not a SmartApi command: {cmd!r}")
    if not isinstance(commands[-1], Exit):
        raise SmartApiError("the last command must be Exit('case')")
    if any(isinstance(c, Exit) for c in commands[:-1]):
        raise SmartApiError("Exit must come last: nothing after it runs")


def build(commands: Sequence[SmartApiCommand]) -> str:
    """Render a checked script, e.g. `PlayAnnouncement('hi');Exit('go-b')`."""
    check_script(commands)
    return ";".join(c.render() for c in commands)


# --- parser ---------------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z]+")
_DIGITS = re.compile(r"[0-9]+")
_WS = " \t"


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> SmartApiError:
        return SmartApiError(f"{what} at position {self.pos} of {self.text[:120]!r}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _WS:
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise self.fail(f"expected {ch!r}")
        self.pos += 1

    def name(self) -> str:
        m = _NAME.match(self.text, self.pos)
        if not m:
            raise self.fail("expected a command name")
        self.pos = m.end()
        return m.group()

    def arg(self) -> tuple[bool, str]:
        """One argument: (quoted, raw text)."""
        if self.peek() == "'":
            end = self.text.find("'", self.pos + 1)
            if end < 0:
                raise self.fail("unterminated quote")
            raw = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return True, raw
        m = _DIGITS.match(self.text, self.pos)
        if not m:
            raise self.fail("expected a quoted string or an integer")
        self.pos = m.end()
        return False, m.group()


def _convert(kind: Kind, quoted: bool, raw: str, what: str) -> str | int:
    if kind == "text":
        if not quoted:
            raise SmartApiError(f"{what} must be a quoted string")
        return raw
    # Integers may come quoted ('10') from some clients; they are rendered bare.
    if not re.fullmatch(r"[0-9]{1,64}", raw):
        raise SmartApiError(f"{what} must be an integer, got {raw!r}")
    return raw if kind == "digits" else int(raw)


def parse(script: str) -> list[SmartApiCommand]:
    """Parse and check a SmartApi script. White space around tokens and one trailing `;` are
    allowed; `ClearUserData` may be written without parentheses. Raises SmartApiError."""
    if not isinstance(script, str):
        raise SmartApiError("commands must be a string")
    if len(script) > MAX_SCRIPT:
        raise SmartApiError(f"a script is {MAX_SCRIPT} characters at most")
    r = _Reader(script)
    out: list[SmartApiCommand] = []
    r.skip_ws()
    while r.pos < len(script):
        if len(out) == MAX_COMMANDS:  # counted while parsing, not after
            raise SmartApiError(f"a script holds at most {MAX_COMMANDS} commands")
        name = r.name()
        cls = COMMANDS.get(name)
        if cls is None:
            raise r.fail(f"unknown command {name!r}")
        r.skip_ws()
        raw_args: list[tuple[bool, str]] = []
        if r.peek() == "(":
            r.pos += 1
            r.skip_ws()
            if r.peek() != ")":
                while True:
                    raw_args.append(r.arg())
                    r.skip_ws()
                    if r.peek() != ",":
                        break
                    r.pos += 1
                    r.skip_ws()
            r.expect(")")
        elif cls.ARGS:
            raise r.fail(f"{name} needs arguments")
        if len(raw_args) != len(cls.ARGS):
            raise r.fail(f"{name} takes {len(cls.ARGS)} argument(s), got {len(raw_args)}")
        values = [
            _convert(kind, quoted, raw, f"{name} argument {i + 1}")
            for i, (kind, (quoted, raw)) in enumerate(zip(cls.ARGS, raw_args, strict=True))
        ]
        out.append(cast(Any, cls)(*values))
        r.skip_ws()
        if r.pos < len(script):
            r.expect(";")
            r.skip_ws()
    check_script(out)
    return out
