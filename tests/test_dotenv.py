"""The dotenv parser behind ``ov secret import``: grammar, line numbers in errors,
what it reads as python-dotenv, Docker Compose and Node's dotenv do and what it
refuses because they disagree (issue 14), and property tests (round trip of any
entries through a writer using every quoting style, blank and line break; arbitrary
text only ever raises DotenvError)."""

import re
import unicodedata

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


# -- issue 14: what the common dialect reads differently from us before ----------


def test_blank_then_hash_right_after_equals_is_an_empty_value():
    assert parse("KEY= # comment\nNEXT=1\n") == [(1, "KEY", ""), (2, "NEXT", "1")]
    assert values("A=\t#x\nB=  #\nC=#not-a-comment\n") == {
        "A": "", "B": "", "C": "#not-a-comment"}


def test_hash_after_a_tab_starts_a_comment_and_trailing_blanks_go():
    assert values("RETRIES=3\t# seconds\nB=x \t \nC=a\u00a0#c\nD=a\u3000b\u2003\n") == {
        "RETRIES": "3", "B": "x", "C": "a", "D": "a\u3000b"}


def test_a_lone_carriage_return_is_a_line_break():
    assert parse("a=b\rc=d") == [(1, "a", "b"), (2, "c", "d")]
    assert parse("A=1\rB='x'\r\rC=\"y\" # c\r") == [
        (1, "A", "1"), (2, "B", "x"), (4, "C", "y")]
    # mixed endings count one line per break; inside quotes any break is stored as \n
    assert parse("A=1\r\nB=\"x\ry\r\nz\"\rC=3\n\rD=4") == [
        (1, "A", "1"), (2, "B", "x\ny\nz"), (5, "C", "3"), (7, "D", "4")]


def test_a_byte_order_mark_at_the_start_is_skipped():
    assert parse("\ufeffA=1\r\nB=2\r\n") == [(1, "A", "1"), (2, "B", "2")]
    assert parse("\ufeff") == [] and parse("\ufeff# only a comment\n") == []
    assert values("A=\ufeffx\n") == {"A": "\ufeffx"}  # elsewhere it is a character


def test_what_the_common_dialect_agrees_on():
    text = ("export\tA=1\n  export  B = 2\nexportC=3\nexport=4\nD==x=y\n"
            "E=\"a # b\" # c\nF='a # b'#c\nG=\"say \\\"hi\\\"\"\nH=it's\nI=a\"b\"\n"
            "J='one\ntwo'\nK=C:\\dir\\n\nL=\"\"\nM=''\nN=last")
    assert parse(text) == [
        (1, "A", "1"), (2, "B", "2"), (3, "exportC", "3"), (4, "export", "4"),
        (5, "D", "=x=y"), (6, "E", "a # b"), (7, "F", "a # b"), (8, "G", 'say "hi"'),
        (9, "H", "it's"), (10, "I", 'a"b"'), (11, "J", "one\ntwo"),
        (13, "K", "C:\\dir\\n"), (14, "L", ""), (15, "M", ""), (16, "N", "last")]


def test_values_are_stored_as_written_never_expanded():
    assert values("A=${HOME}/x\nB=\"$USER ${X:-y}\"\nC='${Z}'\nD=\"\\${E}\"\n") == {
        "A": "${HOME}/x", "B": "$USER ${X:-y}", "C": "${Z}", "D": "${E}"}


# -- errors: file:line, one line, never the value -------------------------------------

BAD = [
    ("A=1\nnot an assignment\n", 2, "expected NAME=VALUE"),
    ("1A=x\n", 1, "expected NAME=VALUE"),
    ("A-B=x\n", 1, "expected NAME=VALUE"),
    ("A\n", 1, "expected NAME=VALUE"),
    ("export\n", 1, "expected NAME=VALUE"),
    ("=x\n", 1, "expected NAME=VALUE"),
    ("A=1\nB='{s}\n", 2, "unterminated single quote in B"),
    ("A=1\rB='{s}\rC=3", 2, "the quoted value of B runs into line 3"),
    ("A=1\nB='{s}\\'\n", 2, "backslash before the closing single quote of B"),
    ("B='x\n{s}\\'y'\n", 2, "backslash before the closing single quote of B"),
    ("A=`{s}`\n", 1, "backtick-quoted value of A"),
    ("A={s}\x1b[0m\n", 1, "control character in unquoted value of A"),
    ("A={s}\x0b#x\n", 1, "control character in unquoted value of A"),
    ("A=x\x85{s}\n", 1, "control character in unquoted value of A"),
    ("A=1\r\n\ufeffB={s}\n", 2, "byte-order mark (U+FEFF) not at the start"),
    ("\ufeff\ufeffA={s}\n", 1, "byte-order mark (U+FEFF) not at the start"),
    ("A=1\nB={s}\rnot an assignment\n", 3, "expected NAME=VALUE"),
    ("A=1\nB\n", 2, "expected NAME=VALUE"),
    ("export A\n", 1, "expected NAME=VALUE"),
    ("A: {s}\n", 1, "expected NAME=VALUE"),
    ("A.B={s}\n", 1, "expected NAME=VALUE"),
    ('A="{s}\nB=2\n', 1, "the quoted value of A runs into line 2"),
    ('A="{s}\nB=1\nC="\n', 1, "the quoted value of A runs into line 2"),  # a stray quote
    ("A='{s}\n\texport B=1'\n", 1, "the quoted value of A runs into line 2"),
    ('X=1\nA="{s}\\q"\n', 2, "invalid escape in value of A"),
    ('A="{s}\n\n\\\'"\n', 3, "invalid escape in value of A"),
    ('A="{s}\\', 1, "invalid escape in value of A"),
    ('A="{s}" trailing\n', 1, "unexpected text after value of A"),
    ("A='{s}'x\n", 1, "unexpected text after value of A"),
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
BREAK = re.compile(r"\r\n|\r|\n")


def double_quote(value, newline, escape_dollar, escape_tab, literal_newlines):
    out = []
    for char in value:
        if char in ALWAYS:
            out.append(ALWAYS[char])
        elif char == "\n":
            out.append(newline if literal_newlines else "\\n")
        elif char == "$" and escape_dollar:
            out.append("\\$")
        elif char == "\t" and escape_tab:
            out.append("\\t")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def single_quotable(value):
    """Single quotes are literal: no quote inside, no backslash before the closing
    one, no carriage return (a line break inside quotes reads as \n)."""
    return "'" not in value and "\r" not in value and not value.endswith("\\")


def unquotable(value):
    """One line, no control character but tab, no blank at either end, no '#' after a
    blank, no quote or backtick first."""
    return (value == value.strip() and not re.search(r"\s#", value)
            and value[:1] not in ("'", '"', "`")
            and not any(c != "\t" and unicodedata.category(c) == "Cc" for c in value))


@PROPERTY
@given(data=st.dictionaries(names, texts, max_size=8), style=st.data())
def test_round_trip_through_a_writer(data, style):
    """Any entries, each written in a quoting style that can carry its value, with any
    prefix, blanks, comments, line breaks and byte-order mark, read back as written
    and on the right line."""
    def draw(strategy, label):
        return style.draw(strategy, label)

    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]), "line break")
    text = draw(st.sampled_from(["", "\ufeff"]), "byte-order mark")
    expected = []
    for name, value in data.items():
        if draw(st.booleans(), "line before"):
            text += draw(st.sampled_from(["# x", "#A=1", '# "', "", " \t", "\t# y"]),
                         "comment or blank line") + newline
        kind = draw(st.sampled_from(["double"] + ["single"] * single_quotable(value)
                                    + ["unquoted"] * unquotable(value)), "quoting")
        prefix = draw(st.sampled_from(["", "export ", "  ", "export\t", "\texport  "]),
                      "prefix")
        equals = draw(st.sampled_from(["=", " = ", "\t=", "= ", "=\t"]), "equals")
        if kind == "unquoted":
            written = value
            if value.startswith("#"):
                equals = equals.rstrip()
            trailer = draw(st.sampled_from(["", " ", "\t", " # comment", "\t#",
                                            "\u00a0# x"]), "trailer")
        else:
            if kind == "double":
                written = double_quote(value, newline, *(
                    draw(st.booleans(), "escape style") for _ in range(3)))
            else:
                written = "'" + value.replace("\n", newline) + "'"
            trailer = draw(st.sampled_from(["", " ", " # comment", "\t#", "#x"]),
                           "trailer")
        expected.append((1 + len(BREAK.findall(text)), name, value))
        text += prefix + name + equals + written + trailer + newline
    if not draw(st.booleans(), "last line break") and text.endswith(newline):
        text = text[:-len(newline)]
    assert parse(text) == expected


def outcome(text):
    try:
        return parse(text, "f.env")
    except DotenvError as exc:
        return str(exc)


LINE_FRAGMENTS = ["A", "b_1", "=", " ", "\t", '"', "'", "\\", "\\n", "\\r", "\\$", "#",
                  " #", "export ", "${x}", "é", "\u00a0", "`", "\x1b"]


@PROPERTY
@given(st.lists(st.lists(st.sampled_from(LINE_FRAGMENTS), max_size=8).map("".join),
                max_size=8), st.booleans())
def test_every_line_break_style_and_a_byte_order_mark_read_the_same(lines, final):
    texts_ = ["\ufeff" * bom + newline.join(lines) + newline * final
              for newline in ("\n", "\r\n", "\r") for bom in (0, 1)]
    first = outcome(texts_[0])
    assert all(outcome(text) == first for text in texts_[1:])


def check_arbitrary(text):
    try:
        entries = parse(text, "fuzz.env")
    except DotenvError as exc:
        assert str(exc).startswith("fuzz.env:") and "\n" not in str(exc)
        assert 1 <= exc.line <= len(BREAK.findall(text)) + 1
        return
    for line, name, value in entries:
        assert isinstance(line, int) and NAME.fullmatch(name)
        assert isinstance(value, str) and "\0" not in value


@PROPERTY
@given(st.text(max_size=200))
def test_arbitrary_text_only_raises_dotenv_error(text):
    check_arbitrary(text)


FRAGMENTS = ["A", "b_1", "=", " ", "\t", '"', "'", "\\", "\\n", "\\$", "\\q", "#", " #",
             "\n", "\r\n", "\r", "\0", "export ", "$x", "${x}", "é", "\u2028", "\x0b",
             "\x85", "\u00a0", "\ufeff", "`", "\\'"]


@PROPERTY
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_dotenv_like_text_only_raises_dotenv_error(text):
    check_arbitrary(text)
