"""A strict dotenv parser for ``ov secret import``.

Grammar: blank lines and ``#`` comments; optional ``export `` prefix; ``NAME=VALUE``
where VALUE is unquoted (trimmed; `` #`` starts a comment), single-quoted (literal),
or double-quoted (escapes ``\\n \\t \\r \\" \\\\ \\$``; may span lines).  Errors name
the file and line, never the value.
"""

import re

from ..core.errors import UsageError
from ..core.validate import check_name, check_value

_ASSIGN = re.compile(r"[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}
_TRAILER = re.compile(r"[ \t]*(#.*)?")


class DotenvError(UsageError):
    def __init__(self, source, line, reason):
        super().__init__(f"{source}:{line}: {reason}")
        self.line = line


def load(path):
    """(line number, name, value as bytes) of each entry of the file, in file order,
    each name and value checked as ``ov secret set`` would."""
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
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
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        number, line = index + 1, lines[index].rstrip("\r")
        index += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ASSIGN.match(line)
        if not match:
            raise DotenvError(source, number, "expected NAME=VALUE")
        name, rest = match.group(1), line[match.end():]
        if rest.startswith("'"):
            end = rest.find("'", 1)
            if end < 0:
                raise DotenvError(source, number, f"unterminated single quote in {name}")
            value, tail = rest[1:end], rest[end + 1:]
        elif rest.startswith('"'):
            value, tail, index = _double_quoted(lines, index, rest[1:], source,
                                                number, name)
        else:
            value, _, _ = rest.partition(" #")
            value, tail = value.strip(), ""
            if "'" in value or '"' in value:
                raise DotenvError(source, number, f"stray quote in value of {name}")
        if not _TRAILER.fullmatch(tail):
            raise DotenvError(source, number, f"unexpected text after value of {name}")
        if "\0" in value:
            raise DotenvError(source, number, f"NUL byte in value of {name}")
        entries.append((number, name, value))
    return entries


def _double_quoted(lines, index, rest, source, number, name):
    """Decode a double-quoted value that may continue on following lines."""
    out = []
    while True:
        position = 0
        while position < len(rest):
            char = rest[position]
            if char == "\\":
                escaped = rest[position + 1:position + 2]
                if escaped not in _ESCAPES:
                    raise DotenvError(source, number, f"invalid escape in value of {name}")
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
        rest = lines[index].rstrip("\r")
        index += 1
