"""A strict dotenv parser for ``ov secret import``.

It reads a file as python-dotenv, Docker Compose and Node's dotenv do where they
agree; where they disagree it refuses the line or follows these rules (ov-secret(1)
lists where they differ from each tool):

* Line breaks are ``\\r\\n``, ``\\n`` and a lone ``\\r``; a UTF-8 byte-order mark
  at the start of the file is skipped.  A *blank* is a space, a tab or another
  Unicode space (never a control character).
* Blank lines and ``#`` comments; an optional ``export`` prefix; blanks around ``=``.
* ``NAME=VALUE`` where VALUE is unquoted (leading and trailing blanks trimmed; a
  ``#`` after a blank, also the blanks right after ``=``, starts a comment; control
  characters other than tab and a leading backtick are refused), single-quoted
  (literal, may span lines; a backslash before the closing quote is refused) or
  double-quoted (escapes ``\\n \\t \\r \\" \\\\ \\$``, any other is refused; may span
  lines).  A line break inside quotes is stored as ``\\n``.
* No ``${VAR}`` expansion: values are stored as written.

Errors name the file and line, never the value.
"""

import re

from ..core.errors import UsageError
from ..core.validate import check_name, check_value

_BREAK = re.compile(r"\r\n|\r|\n")
_BLANK = r"[^\S\x00-\x08\x0a-\x1f\x7f-\x9f]"  # whitespace, but no control character
_ASSIGN = re.compile(
    rf"{_BLANK}*(?:export{_BLANK}+)?([A-Za-z_][A-Za-z0-9_]*){_BLANK}*=")
_LEADING = re.compile(f"{_BLANK}*")
_INLINE_COMMENT = re.compile(f"{_BLANK}#")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # Cc except tab
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}
_TRAILER = re.compile(f"{_BLANK}*(#.*)?", re.S)
BOM = "\ufeff"


class DotenvError(UsageError):
    def __init__(self, source, line, reason):
        super().__init__(f"{source}:{line}: {reason}")
        self.line = line


def load(path):
    """(line number, name, value as bytes) of each entry of the file, in file order,
    each name and value checked as ``ov secret set`` would."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UsageError(f"{path} is UTF-16 text; convert it to UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    entries = []
    for line, name, value in parse(text, path):
        try:
            entries.append((line, check_name(name), check_value(name, value.encode())))
        except UsageError as exc:
            raise UsageError(f"{path}:{line}: {exc}") from None
    return entries


def parse(text, source="<input>"):
    """Return a list of (line number, name, value) in file order."""
    entries = []
    lines = _BREAK.split(text[1:] if text.startswith(BOM) else text)
    index = 0
    while index < len(lines):
        number, line = index + 1, lines[index]
        index += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ASSIGN.match(line)
        if not match:
            if stripped.startswith(BOM):
                raise DotenvError(source, number,
                                  "byte-order mark (U+FEFF) not at the start of the file")
            raise DotenvError(source, number, "expected NAME=VALUE")
        name, raw = match.group(1), line[match.end():]
        rest = raw[_LEADING.match(raw).end():]
        if rest.startswith("'"):
            value, tail, index = _single_quoted(lines, index, rest[1:], source,
                                                number, name)
        elif rest.startswith('"'):
            value, tail, index = _double_quoted(lines, index, rest[1:], source,
                                                number, name)
        else:
            value, tail = _unquoted(raw, source, number, name), ""
        if not _TRAILER.fullmatch(tail):
            raise DotenvError(source, number, f"unexpected text after value of {name}")
        if "\0" in value:
            raise DotenvError(source, number, f"NUL byte in value of {name}")
        entries.append((number, name, value))
    return entries


def _unquoted(raw, source, number, name):
    """The value of the text after ``=``: up to a ``#`` that follows a blank, trimmed."""
    comment = _INLINE_COMMENT.search(raw)
    value = raw[:comment.start()] if comment else raw
    if "\0" in value:
        raise DotenvError(source, number, f"NUL byte in value of {name}")
    if _CONTROL.search(value):
        raise DotenvError(source, number,
                          f"control character in unquoted value of {name} (quote it)")
    value = value.strip()
    if value.startswith("`"):
        raise DotenvError(source, number, f"backtick-quoted value of {name} "
                          "(use single or double quotes)")
    return value


def _single_quoted(lines, index, rest, source, number, name):
    """A literal value up to the next single quote, which may be on a following line."""
    out = []
    line = number
    while True:
        end = rest.find("'")
        if end >= 0:
            if rest[:end].endswith("\\"):
                raise DotenvError(source, line,
                                  f"backslash before the closing single quote of {name} "
                                  "(single quotes are literal; use double quotes)")
            out.append(rest[:end])
            return "".join(out), rest[end + 1:], index
        if index >= len(lines):
            raise DotenvError(source, number, f"unterminated single quote in {name}")
        out += [rest, "\n"]
        rest = _continuation(lines, index, source, number, name)
        index += 1
        line += 1


def _double_quoted(lines, index, rest, source, number, name):
    """Decode a double-quoted value that may continue on following lines."""
    out = []
    line = number
    while True:
        position = 0
        while position < len(rest):
            char = rest[position]
            if char == "\\":
                escaped = rest[position + 1:position + 2]
                if escaped not in _ESCAPES:
                    raise DotenvError(source, line, f"invalid escape in value of {name}")
                out.append(_ESCAPES[escaped])
                position += 2
            elif char == '"':
                return "".join(out), rest[position + 1:], index
            else:
                out.append(char)
                position += 1
        if index >= len(lines):
            raise DotenvError(source, number, f"unterminated double quote in {name}")
        out.append("\n")
        rest = _continuation(lines, index, source, number, name)
        index += 1
        line += 1


def _continuation(lines, index, source, number, name):
    """The next line of a quoted value that spans lines.  One that reads as an
    assignment is refused: more likely a quote left open than a value's line."""
    if _ASSIGN.match(lines[index]):
        raise DotenvError(source, number, f"the quoted value of {name} runs into line "
                          f"{index + 1}, which reads as NAME=VALUE: close the quote "
                          "(or write the line break as \\n in double quotes)")
    return lines[index]
