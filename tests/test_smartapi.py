"""The SmartApi command language: typed commands, builder, parser (pure, no broker)."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge import smartapi
from bridge.smartapi import (
    ClearUserData,
    Command,
    Exit,
    GetData,
    MusicOnHold,
    PlayAnnouncement,
    Playback,
    SayClock,
    SayDate,
    SayDigit,
    SayDuration,
    SayNumber,
    SetExten,
    SetLimitOnCall,
    SmartApiError,
    UnsafeArgument,
    build,
    check_text,
    parse,
)
from tests.helpers.env import FIXTURES


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


# --- examples -------------------------------------------------------------------------------


def test_fixture_answers_parse_to_typed_commands() -> None:
    step1 = parse(fixture("component-SmartApi-response.json")["commands"])
    assert step1 == [
        PlayAnnouncement("welcome-file"),
        GetData("enter-data-file", 10, 1),
        Exit("go-s2"),
    ]
    assert parse(fixture("component-SmartApi-response-step2.json")["commands"]) == [Exit("go-b")]


def test_build_renders_canonically() -> None:
    script = build([PlayAnnouncement("id:5f2a"), SayDigit("0915"), ClearUserData(), Exit("3")])
    assert script == "PlayAnnouncement('id:5f2a');SayDigit(0915);ClearUserData();Exit('3')"


@pytest.mark.parametrize(
    "script",
    [
        "PlayAnnouncement('welcome-file'); GetData('enter-data-file', 10, 1); Exit('go-s2');",
        "  PlayAnnouncement( 'welcome-file' ) ;GetData('enter-data-file',10,1);Exit('go-s2')  ",
        "PlayAnnouncement('welcome-file');GetData('enter-data-file', '10', '1');Exit('go-s2')",
    ],
)
def test_spacing_trailing_separator_and_quoted_integers_are_accepted(script: str) -> None:
    assert build(parse(script)) == (
        "PlayAnnouncement('welcome-file');GetData('enter-data-file', 10, 1);Exit('go-s2')"
    )


def test_every_documented_command_round_trips() -> None:
    cmds: list[Command] = [
        PlayAnnouncement("welcome"),
        Playback("hello-world"),
        SayNumber(5201),
        SayDigit("00912"),
        SayDuration("1.02:03:04"),
        SayClock("22:00"),
        SayDate("1402-01-15", "jalali"),
        GetData("menu&press-1", 5, 4),
        MusicOnHold("default", 30),
        SetExten("200"),
        SetLimitOnCall(300),
        ClearUserData(),
        Exit("go-b"),
    ]
    assert {type(c) for c in cmds} == set(smartapi.COMMANDS.values())
    assert parse(build(cmds)) == cmds


def test_clear_user_data_may_omit_parentheses() -> None:
    assert parse("ClearUserData; Exit('a')") == [ClearUserData(), Exit("a")]


@pytest.mark.parametrize(
    ("script", "problem"),
    [
        ("", "at least Exit"),
        ("PlayAnnouncement('a')", "last command must be Exit"),
        ("Exit('a');PlayAnnouncement('b')", "last command must be Exit"),
        ("Exit('a');Exit('b')", "Exit must come last"),
        ("Dial('123');Exit('a')", "unknown command 'Dial'"),
        ("GetData('f', 10);Exit('a')", "takes 3 argument"),
        ("SayNumber('five');Exit('a')", "must be an integer"),
        ("PlayAnnouncement(welcome);Exit('a')", "quoted string or an integer"),
        ("PlayAnnouncement(5);Exit('a')", "must be a quoted string"),
        ("PlayAnnouncement('a;Exit('a')", "expected ')'"),
        ("PlayAnnouncement('unterminated);Exit('a')", "expected ')'"),
        ("Exit('a'", "expected ')'"),
        ("Exit('a');;", "expected a command name"),
        ("Exit(\u2018a\u2019)", "quoted string or an integer"),
        ("SayDate('2024-01-01', 'julian');Exit('a')", "calendar"),
        ("SayClock('noon');Exit('a')", "HH:MM"),
        ("SetExten('200&SIP/evil');Exit('a')", "SetExten extension"),
        ("GetData('f', 10, 0);Exit('a')", "max_digits"),
        ("Exit('a')\nExit('b')", "expected ';'"),
        ("Exit('')", "1 to 256"),
        ("Exit(' a')", "white space"),
    ],
)
def test_invalid_scripts_are_refused_with_a_reason(script: str, problem: str) -> None:
    with pytest.raises(SmartApiError, match=re.escape(problem)):
        parse(script)


@pytest.mark.parametrize(
    "evil",
    [
        "x'); Exit('admin",
        "x;Exit('admin')",
        "a,b",
        "a\\'b",
        'a"b',
        "a)b",
        "line\nbreak",
        "nul\x00",
        "rtl\u202e",
        "sep\u2028",
    ],
)
def test_unsafe_text_is_refused_when_building(evil: str) -> None:
    with pytest.raises(UnsafeArgument):
        PlayAnnouncement(evil)
    with pytest.raises(UnsafeArgument):
        Exit(evil)


def test_wrong_types_are_refused() -> None:
    with pytest.raises(SmartApiError):
        SayNumber(True)
    with pytest.raises(SmartApiError):
        SayNumber(-1)
    with pytest.raises(SmartApiError):
        GetData("f", "10", 1)  # type: ignore[arg-type]
    with pytest.raises(SmartApiError):
        build([Exit("a"), "Exit('b')"])  # type: ignore[list-item]


def test_a_script_is_bounded() -> None:
    with pytest.raises(SmartApiError, match="at most"):
        build([Playback("beep")] * smartapi.MAX_COMMANDS + [Exit("a")])


def test_commands_are_counted_while_parsing() -> None:
    """The 65th command is refused when it is reached, not after the whole script is read:
    everything after it is never looked at."""
    script = "Playback('beep');" * smartapi.MAX_COMMANDS + "Nonsense(" + "x" * 1000
    with pytest.raises(SmartApiError, match="at most 64 commands"):
        parse(script)
    with pytest.raises(SmartApiError, match="characters at most"):
        parse("Playback('beep');" * 5000 + "Exit('a')")


@pytest.mark.parametrize(
    "text",
    [
        "a\uff07b",  # fullwidth apostrophe
        "a\uff1bb",  # fullwidth semicolon
        "\uff08x\uff09",  # fullwidth parentheses
        "a\uff0cb",  # fullwidth comma
        "a\u037eb",  # Greek question mark (NFKC: ;)
        "a\ufe54b",  # small semicolon
        "a\u060cb",  # Arabic comma
        "a\u061bb",  # Arabic semicolon
        "a\u02bcb",  # modifier letter apostrophe
        "a\u2032b",  # prime
        "a\u00abb\u00bb",  # guillemets
        "\u207dx\u207e",  # superscript parentheses
        "\u2768x\u2769",  # ornamental parentheses
        "a\u201ab",  # low single quote
    ],
)
def test_look_alike_quotes_and_separators_are_refused(text: str) -> None:
    with pytest.raises(UnsafeArgument):
        check_text(text)
    with pytest.raises(SmartApiError):
        parse(f"PlayAnnouncement('{text}');Exit('a')")
    with pytest.raises(SmartApiError):
        Exit(text)


@pytest.mark.parametrize(
    ("cls", "value"),
    [
        (SayClock, "\u0661\u0662:\u0663\u0664"),  # Arabic-Indic digits
        (SayDate, "\u06f1\u06f4\u06f0\u06f2-01-01"),  # Persian digits
        (SayDuration, "1.\u0661\u0662:00:00"),
        (SayDigit, "\u0661\u0662"),
    ],
)
def test_non_ascii_digits_are_refused_where_digits_are_expected(
    cls: type[Command], value: str
) -> None:
    with pytest.raises(SmartApiError):
        cls(value)  # type: ignore[call-arg]
    with pytest.raises(SmartApiError):
        parse("SayNumber(\u0661\u0662);Exit('a')")


@pytest.mark.parametrize("name", ["../etc/passwd", "custom/welcome", "a..b", "..", "x/"])
def test_file_names_cannot_leave_their_directory(name: str) -> None:
    for make in (
        lambda: PlayAnnouncement(name),
        lambda: Playback(name),
        lambda: GetData(name, 5, 4),
        lambda: MusicOnHold(name, 10),
    ):
        with pytest.raises(UnsafeArgument):
            make()
    with pytest.raises(SmartApiError):
        parse(f"PlayAnnouncement('{name}');Exit('a')")
    assert PlayAnnouncement("id:3fa2").file == "id:3fa2"
    assert Exit("go.b").case == "go.b"


# --- properties -----------------------------------------------------------------------------

# Text that is valid by construction: printable, no forbidden character, no outer spaces.
safe_text = st.text(
    st.characters(
        exclude_categories=("C", "Zl", "Zp", "Zs", "Pi", "Pf", "Ps", "Pe"),
        exclude_characters=smartapi.FORBIDDEN | smartapi.CONFUSABLES | {"/"},
    ).filter(lambda c: not smartapi.unsafe_char(c)),
    min_size=1,
    max_size=40,
).filter(lambda s: s == s.strip() and ".." not in s)
small = st.integers(min_value=0, max_value=10**6)
dialable = st.from_regex(smartapi.DIALABLE, fullmatch=True)

commands = st.one_of(
    st.builds(PlayAnnouncement, safe_text),
    st.builds(Playback, safe_text),
    st.builds(SayNumber, small),
    st.builds(SayDigit, st.from_regex(r"[0-9]{1,20}", fullmatch=True)),
    st.builds(SayClock, st.from_regex(r"[0-9]{2}:[0-9]{2}", fullmatch=True)),
    st.builds(
        SayDate,
        st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", fullmatch=True),
        st.sampled_from(smartapi.CALENDARS),
    ),
    st.builds(GetData, safe_text, small, st.integers(1, 64)),
    st.builds(MusicOnHold, safe_text, st.integers(1, 3600)),
    st.builds(SetExten, dialable),
    st.builds(SetLimitOnCall, st.integers(1, 86400)),
    st.just(ClearUserData()),
)
scripts = st.builds(
    lambda body, case: [*body, Exit(case)],
    st.lists(commands, max_size=8),
    safe_text,
)


@given(scripts)
def test_build_then_parse_round_trips(cmds: list[Command]) -> None:
    assert parse(build(cmds)) == cmds


@given(st.text(max_size=40))
def test_accepted_text_holds_no_refused_character_in_any_compatibility_form(text: str) -> None:
    try:
        check_text(text)
    except SmartApiError:
        return
    for form in ("NFKC", "NFKD", "NFC"):
        assert not smartapi.FORBIDDEN.intersection(unicodedata.normalize(form, text))


TEXT_COMMANDS = [PlayAnnouncement, Playback, SetExten, Exit]
# Strings rich in the characters an injection needs (quotes, separators, brackets, newlines).
nasty_text = st.text(
    st.one_of(st.sampled_from([*sorted(smartapi.FORBIDDEN), " ", "\n", "1", "x"]), st.characters()),
    max_size=30,
)


@given(st.sampled_from(TEXT_COMMANDS), st.one_of(nasty_text, safe_text, dialable))
def test_no_argument_string_can_add_a_command(cls: type[Command], value: str) -> None:
    """Any string either is refused, or renders as exactly the one command it was given to,
    whichever way the script is split: by our parser, or naively on `;`."""
    try:
        cmd = cls(value)  # type: ignore[call-arg]
        script = build([cmd, Exit("end")] if cls is not Exit else [cmd])
    except SmartApiError:
        return
    expected = [cmd, Exit("end")] if cls is not Exit else [cmd]
    assert parse(script) == expected
    assert script.count(";") == len(expected) - 1
    assert script.count("'") == 2 * len(expected)


def _splice(script: str, at: int, text: str) -> str:
    at %= len(script) + 1
    return script[:at] + text + script[at:]


# Random text, and valid scripts with random text spliced in (mostly near-misses).
near_scripts = st.one_of(
    st.text(max_size=120),
    st.builds(_splice, scripts.map(build), st.integers(0, 10**4), st.text(max_size=8)),
)


@given(near_scripts)
def test_the_parser_refuses_or_yields_a_canonical_script(text: str) -> None:
    try:
        cmds = parse(text)
    except SmartApiError:
        return
    assert isinstance(cmds[-1], Exit)
    assert parse(build(cmds)) == cmds
