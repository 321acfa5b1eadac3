"""The dotenv parser behind ``ov secret import``: grammar, line numbers in errors,
and property tests (round trip through double quotes; arbitrary text only ever
raises DotenvError)."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import SENTINEL
from ovagent.client.dotenv import DotenvError, parse
from ovagent.core.errors import EXIT_USAGE, UsageError

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def values(text):
    return {name: value for _, name, value in parse(text)}


# -- grammar ---------------------------------------------------------------------


def test_comments_blank_lines_export_and_spacing():
    text = ("# a comment\n\n   \n  # indented comment\nexport A=1\n"
            "B = two words \n\tC\t=\tx\nexport\tD=4\n")
    assert parse(text, "f.env") == [(5, "A", "1"), (6, "B", "two words"),
                                    (7, "C", "x"), (8, "D", "4")]


def test_unquoted_values_trim_and_stop_at_space_hash():
    assert values("A=abc # comment\nB=a#b\nC=#x\nD=\nE=   \n") == {
        "A": "abc", "B": "a#b", "C": "#x", "D": "", "E": ""}


def test_single_quotes_are_literal():
    assert values(r"A='a\nb $HOME \\ \"' # done" + "\nB=''\n") == {
        "A": r"a\nb $HOME \\ \"", "B": ""}


def test_double_quote_escapes():
    assert values(r'A="l1\nl2\tt\rr \"q\" back\\slash \$HOME #not-comment"') == {
        "A": 'l1\nl2\tt\rr "q" back\\slash $HOME #not-comment'}


def test_double_quotes_span_lines_and_keep_line_numbers():
    text = 'A="first\n  second\n\n# not a comment\nlast" # trailing\nB=2\n'
    assert parse(text) == [(1, "A", "first\n  second\n\n# not a comment\nlast"),
                           (6, "B", "2")]


def test_crlf_line_endings():
    assert parse('A=1\r\nB="x\r\ny"\r\nC=\'z\'\r\n') == [
        (1, "A", "1"), (2, "B", "x\ny"), (4, "C", "z")]


def test_empty_file_and_only_comments():
    assert parse("") == []
    assert parse("# nothing\n\n") == []


def test_duplicates_are_all_reported_in_order():
    assert parse("A=1\nA=2\n") == [(1, "A", "1"), (2, "A", "2")]


# -- errors: file:line, one line, never the value -------------------------------------

BAD = [
    ("A=1\nnot an assignment\n", 2, "expected NAME=VALUE"),
    ("1A=x\n", 1, "expected NAME=VALUE"),
    ("A-B=x\n", 1, "expected NAME=VALUE"),
    ("A\n", 1, "expected NAME=VALUE"),
    ("export\n", 1, "expected NAME=VALUE"),
    ("=x\n", 1, "expected NAME=VALUE"),
    ("A=1\nB='{s}\n", 2, "unterminated single quote in B"),
    ('A="{s}\nB=2\n', 1, "unterminated double quote in A"),
    ('X=1\nA="{s}\\q"\n', 2, "invalid escape in value of A"),
    ('A="{s}\\', 1, "invalid escape in value of A"),
    ('A="{s}" trailing\n', 1, "unexpected text after value of A"),
    ("A='{s}'x\n", 1, "unexpected text after value of A"),
    ('A=ab"{s}\n', 1, "stray quote in value of A"),
    ("A={s}'\n", 1, "stray quote in value of A"),
    ("\n\nA={s}\0\n", 3, "NUL byte in value of A"),
    ('A="{s}\0"\n', 1, "NUL byte in value of A"),
    ("A='\0{s}'\n", 1, "NUL byte in value of A"),
]


@pytest.mark.parametrize("text,line,reason", BAD)
def test_errors_name_file_and_line_never_the_value(text, line, reason):
    with pytest.raises(DotenvError) as caught:
        parse(text.replace("{s}", SENTINEL), "secrets.env")
    message = str(caught.value)
    assert message.startswith(f"secrets.env:{line}: ")
    assert reason in message
    assert "\n" not in message and SENTINEL not in message
    assert caught.value.line == line
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == EXIT_USAGE


# -- properties ------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,40}", fullmatch=True)
texts = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                max_size=60)
ALWAYS = {"\\": "\\\\", '"': '\\"', "\r": "\\r"}


def double_quote(value, escape_dollar, escape_tab, literal_newlines):
    out = []
    for char in value:
        if char in ALWAYS:
            out.append(ALWAYS[char])
        elif char == "\n":
            out.append("\n" if literal_newlines else "\\n")
        elif char == "$" and escape_dollar:
            out.append("\\$")
        elif char == "\t" and escape_tab:
            out.append("\\t")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


@PROPERTY
@given(data=st.dictionaries(names, texts, max_size=8), style=st.data())
def test_round_trip_double_quoted(data, style):
    lines = []
    for name, value in data.items():
        if style.draw(st.booleans(), "comment line"):
            lines.append("# " + style.draw(st.sampled_from(["x", "A=1", '"', ""])))
        prefix = style.draw(st.sampled_from(["", "export ", "  ", "export\t"]))
        equals = style.draw(st.sampled_from(["=", " = ", "\t=", "= "]))
        quoted = double_quote(value, *(style.draw(st.booleans()) for _ in range(3)))
        trailer = style.draw(st.sampled_from(["", " ", " # comment", "\t#", "#x"]))
        lines.append(prefix + name + equals + quoted + trailer)
    newline = style.draw(st.sampled_from(["\n", "\r\n"]))
    entries = parse(newline.join(lines) + style.draw(st.sampled_from(["", newline])))
    assert [name for _, name, _ in entries] == list(data)
    assert {name: value for _, name, value in entries} == data
    numbers = [line for line, _, _ in entries]
    assert numbers == sorted(set(numbers))


plain = st.text(st.characters(blacklist_characters="\0\n\r'\"",
                              blacklist_categories=("Cs",)), max_size=40).filter(
    lambda v: v == v.strip() and " #" not in v)


@PROPERTY
@given(data=st.dictionaries(names, plain, max_size=8))
def test_round_trip_unquoted(data):
    text = "".join(f"{name}={value}\n" for name, value in data.items())
    assert values(text) == data


@PROPERTY
@given(data=st.dictionaries(
    names, st.text(st.characters(blacklist_characters="\0\n'",
                                 blacklist_categories=("Cs",)), max_size=40), max_size=8))
def test_round_trip_single_quoted(data):
    text = "".join(f"{name}='{value}'\n" for name, value in data.items())
    assert values(text) == data


def check_arbitrary(text):
    try:
        entries = parse(text, "fuzz.env")
    except DotenvError as exc:
        assert str(exc).startswith("fuzz.env:") and "\n" not in str(exc)
        assert 1 <= exc.line <= text.count("\n") + 1
        return
    for line, name, value in entries:
        assert isinstance(line, int) and NAME.fullmatch(name)
        assert isinstance(value, str) and "\0" not in value


@PROPERTY
@given(st.text(max_size=200))
def test_arbitrary_text_only_raises_dotenv_error(text):
    check_arbitrary(text)


FRAGMENTS = ["A", "b_1", "=", " ", "\t", '"', "'", "\\", "\\n", "\\$", "\\q", "#", " #",
             "\n", "\r\n", "\r", "\0", "export ", "$x", "é", "\u2028", "\x0b"]


@PROPERTY
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_dotenv_like_text_only_raises_dotenv_error(text):
    check_arbitrary(text)
