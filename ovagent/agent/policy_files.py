"""Where the policy comes from: the ``*.toml`` files of a policy directory
(/etc/ov/policy.d for the system agent, $XDG_CONFIG_HOME/ov/policy.d for a user's),
read in lexical order with tomllib, and reloaded on SIGHUP.

A policy file decides who receives which secrets, so whoever can write it, or swap
it, could hand themselves any secret.  Each file, the directory and every directory
above it must therefore be owned by root (or, for a user's agent, by that user);
the files and the directory must not be writable by group or others, and a
directory above may be only if it is sticky (/tmp).  The walk goes from directory
descriptor to directory descriptor; a symbolic link on the way (a dotfile manager's
~/.config) is followed by hand, only if root or that user owns it, and every
directory of its target is checked in turn; the files themselves must not be
links.  Each file is checked with fstat() on the descriptor it is read from.
Anything wrong (unsafe, unreadable, too large, not valid TOML, an unknown key, a
rule that names no unit, user or group, a directory named with --policy-dir that
is missing) refuses the whole policy: the previous one stays in force.
"""

import hashlib
import os
import stat
import tomllib

from ..core.errors import PolicyError
from ..core.validate import NAME_CHARACTERS, SLUG_CHARACTERS, is_name, is_slug
from .policy import ALLOW, DENY, GLOB_CHARACTERS, Policy, Rule, forget_names, is_glob

SUFFIX = ".toml"
MAX_FILES = 256
MAX_FILE_BYTES = 256 * 1024
MAX_TOTAL_BYTES = 1024 * 1024      # all files: parsed in the event loop, on reload
MAX_SYMLINKS = 40
MAX_RULES = 10_000
MAX_ITEMS = 1024                  # values of one selector
MAX_ITEM_LEN = 256
IDENTITY_KEYS = ("unit", "user", "group")
KEYS = (*IDENTITY_KEYS, "app", "env", "secrets", "on_change")
ON_CHANGE = ("restart", "reload", "none")     # ov secret set's default --apply
_GLOB_SYNTAX = GLOB_CHARACTERS | {"]", "!"}
UNIT_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                            "0123456789:-_.\\@") | _GLOB_SYNTAX
USER_CHARACTERS = NAME_CHARACTERS | frozenset(".-$@")
_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_ENTRY_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def read_policy(directory, owners, enforce=False, required=False):
    """The Policy of *directory*'s files (owned by a uid in *owners*).  Without the
    directory (*required*: an error) or any file in it, policy off, or with
    *enforce* a policy of no rules (every request denied).  PolicyError when
    anything in it is wrong."""
    fd = _open_directory(directory, owners)
    if fd is None:
        if required:
            raise PolicyError(f"no policy directory {directory}")
        return Policy(enforcing=enforce, directory=directory)
    try:
        names = sorted(name for name in os.listdir(fd)
                       if name.endswith(SUFFIX) and not name.startswith("."))
        if len(names) > MAX_FILES:
            raise PolicyError(f"{directory} holds {len(names)} policy files; the limit "
                              f"is {MAX_FILES}")
        contents = [(name, _read(fd, name, directory, owners)) for name in names]
    finally:
        os.close(fd)
    if sum(len(data) for _, data in contents) > MAX_TOTAL_BYTES:
        raise PolicyError(f"the policy files of {directory} hold more than "
                          f"{MAX_TOTAL_BYTES} bytes")
    rules, files = [], []
    for name, data in contents:
        found = parse(name, data)
        rules += found
        files.append((name, hashlib.sha256(data).hexdigest(), len(found)))
        if len(rules) > MAX_RULES:
            raise PolicyError(f"{directory} holds more than {MAX_RULES} rules")
    return Policy(rules, files, enforcing=enforce or bool(files), directory=directory)


def _open_directory(directory, owners):
    """A readable descriptor of *directory*, reached from / one checked directory at
    a time (a symbolic link on the way is followed by hand: its owner and the
    directory holding it are checked, then each directory of its target); None if
    it does not exist."""
    pending = [part for part in os.path.abspath(directory).split("/") if part]
    fd, where, links = os.open("/", _WALK_FLAGS), "/", 0
    try:
        while pending:
            _check_directory(os.fstat(fd), where, owners, leaf=False)
            part = pending.pop(0)
            following = _open_component(fd, part, where)
            if following is None:
                return None
            st = os.fstat(following)
            if stat.S_ISLNK(st.st_mode):
                os.close(following)
                links += 1
                target = _link_target(fd, part, where, st, owners, links)
                if target.startswith("/"):
                    os.close(fd)
                    fd, where = os.open("/", _WALK_FLAGS), "/"
                pending[:0] = [item for item in target.split("/") if item not in ("", ".")]
                continue
            os.close(fd)
            fd, where = following, os.path.normpath(os.path.join(where, part))
            if not stat.S_ISDIR(st.st_mode):
                raise PolicyError(f"{where} is not a directory")
        _check_directory(os.fstat(fd), where, owners, leaf=True)
        try:
            return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            raise PolicyError(f"cannot read {where}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _open_component(fd, part, where):
    """An O_PATH descriptor of *part* in directory *fd* (a symbolic link itself, not
    its target); None if there is no such entry."""
    try:
        return os.open(part, _ENTRY_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PolicyError(f"cannot open {os.path.join(where, part)} (as uid "
                          f"{os.geteuid()}, who must be able to enter every directory "
                          f"on the way): {exc.strerror}") from None


def _link_target(fd, part, where, st, owners, links):
    path = os.path.join(where, part)
    unsafe = _unsafe(st, owners)
    if unsafe:
        raise PolicyError(f"symbolic link {path} is {unsafe}: refusing its policy")
    if links > MAX_SYMLINKS:
        raise PolicyError(f"too many symbolic links on the way to {path}")
    return os.readlink(part, dir_fd=fd)


def _check_directory(st, where, owners, leaf):
    unsafe = _unsafe(st, owners)
    if not unsafe and st.st_mode & 0o022:
        if leaf or not st.st_mode & stat.S_ISVTX:
            unsafe = "writable by group or others"
    if unsafe:
        raise PolicyError(f"directory {where} is {unsafe}: refusing its policy")


def _unsafe(st, owners):
    if st.st_uid not in owners:
        whom = " or ".join("root" if uid == 0 else f"uid {uid}" for uid in sorted(owners))
        return f"owned by uid {st.st_uid}, not {whom}"
    return None


def _read(directory_fd, name, directory, owners):
    """The bytes of policy file *name*, after checking the descriptor they come from."""
    path = os.path.join(directory, name)
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=directory_fd)
    except OSError as exc:
        why = "a symbolic link (not followed)" if os.path.islink(path) else exc.strerror
        raise PolicyError(f"cannot read {path}: {why}") from None
    try:
        st = os.fstat(fd)
        unsafe = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
                  _unsafe(st, owners) or (st.st_mode & 0o022 and
                                          "writable by group or others"))
        if unsafe:
            raise PolicyError(f"{path} is {unsafe}: refusing the policy")
        data = b""
        while chunk := os.read(fd, MAX_FILE_BYTES + 1 - len(data)):
            data += chunk
            if len(data) > MAX_FILE_BYTES:
                break
        if len(data) > MAX_FILE_BYTES:
            raise PolicyError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
        return data
    except OSError as exc:
        raise PolicyError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


# -- the rules of one file -----------------------------------------------------


def parse(name, data):
    """The rules of policy file *name* holding *data*, numbered within the file:
    NAME:allow#1, NAME:deny#1..."""
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise PolicyError(f"{name}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{name}: {exc}") from None
    except RecursionError:            # tomllib recurses once per nesting level
        raise PolicyError(f"{name}: arrays or tables nested too deeply") from None
    unknown = sorted(set(document) - {ALLOW, DENY})
    if unknown:
        raise PolicyError(f"{name}: unknown key {unknown[0]!r}: a policy file holds "
                          "[[allow]] and [[deny]] rules only")
    rules = []
    for effect in (ALLOW, DENY):
        tables = document.get(effect, [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise PolicyError(f"{name}: {effect!r} must be an array of tables, "
                              f"written [[{effect}]]")
        for number, table in enumerate(tables, 1):
            origin = f"{name}:{effect}#{number}"
            rules.append(Rule(effect, origin, **_selectors(effect, origin, table)))
    return rules


def _selectors(effect, origin, table):
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise PolicyError(f"{origin}: unknown key {unknown[0]!r} (a rule takes "
                          f"{', '.join(KEYS)})")
    if not any(key in table for key in IDENTITY_KEYS):
        raise PolicyError(f"{origin}: names no unit, user or group; a rule must say "
                          "whose processes it is about")
    units = table.get("unit", [])
    if effect == ALLOW and "*" in (units if isinstance(units, list) else [units]) \
            and table.keys().isdisjoint({"user", "group"}):
        raise PolicyError(f"{origin}: unit = \"*\" is every process, login sessions "
                          "included: an allow rule for any unit must name a user or group")
    selectors = {}
    if "on_change" in table:
        if effect != ALLOW or table["on_change"] not in ON_CHANGE:
            raise PolicyError(f"{origin}: on_change is one of {', '.join(ON_CHANGE)}, "
                              "in an allow rule")
        selectors["on_change"] = table.pop("on_change")
    for key, value in table.items():
        items = value if isinstance(value, list) else [value]
        if not items:
            raise PolicyError(f"{origin}: {key} is an empty list, which matches "
                              f"nothing; leave {key} out to match any")
        if len(items) > MAX_ITEMS:
            raise PolicyError(f"{origin}: {key} has {len(items)} values; the limit is "
                              f"{MAX_ITEMS}")
        selectors[key] = [_CHECKS[key](item, f"{origin}: {key}") for item in items]
    return selectors


def _text(item, what):
    if not isinstance(item, str) or not 0 < len(item) <= MAX_ITEM_LEN:
        raise PolicyError(f"{what}: {item!r} is not a string of 1-{MAX_ITEM_LEN} "
                          "characters")
    return item


def _unit(item, what):
    if not UNIT_CHARACTERS.issuperset(_text(item, what)):
        raise PolicyError(f"{what}: {item!r} is not a unit name or pattern")
    if not item.endswith((".service", ".scope", "*")):
        raise PolicyError(f"{what}: {item!r}: a caller's unit is a service or a scope "
                          f"(write {item.rsplit('.', 1)[0]}.service)")
    return item


def _account(item, what):
    """A user or group: a number (a uid or gid) or a name, never a pattern."""
    if isinstance(item, str) and item.isascii() and item.isdigit():
        item = int(item)
    if isinstance(item, int) and not isinstance(item, bool):
        if not 0 <= item < 2**32 - 1:
            raise PolicyError(f"{what}: {item} is not a valid id")
        return str(item)
    if not USER_CHARACTERS.issuperset(_text(item, what)):
        raise PolicyError(f"{what}: {item!r} is not a name or a number (users and "
                          "groups are named exactly, without patterns)")
    return item


def _pattern(valid, characters, kind):
    def check(item, what):
        if is_glob(_text(item, what)):
            ok = characters.issuperset(item)
        else:
            ok = valid(item)
        if not ok:
            raise PolicyError(f"{what}: {item!r} is not {kind} or a pattern of them")
        return item
    return check


_CHECKS = {"unit": _unit, "user": _account, "group": _account,
           "app": _pattern(is_slug, SLUG_CHARACTERS | _GLOB_SYNTAX, "an app slug"),
           "env": _pattern(is_slug, SLUG_CHARACTERS | _GLOB_SYNTAX, "an env slug"),
           "secrets": _pattern(is_name, NAME_CHARACTERS | _GLOB_SYNTAX,
                               "a secret name")}


class PolicySource:
    """The agent's policy: where it comes from, the one in force, and (re)loading
    it, at start and on SIGHUP.  An invalid policy is refused whole and recorded
    (policy-invalid); the previous one stays.  At start there is none before it:
    the agent then enforces a policy of no rules (it denies every request) rather
    than serve without the policy it was given."""

    def __init__(self, directory, owners, enforce, audit, required=False):
        """required: the directory was named (--policy-dir): its absence is an
        error, not 'policy off'."""
        self.directory, self.owners, self.enforce = directory, owners, enforce
        self.audit, self.required = audit, required
        self.current = None

    @classmethod
    def off(cls):
        """No policy directory at all (an agent built in-process by a test)."""
        source = cls(None, (), False, None)
        source.current = Policy()
        return source

    def load(self):
        """Read the policy again; True if it is now in force."""
        if self.directory is None:
            return True
        forget_names()
        try:
            policy = read_policy(self.directory, self.owners, self.enforce,
                                 self.required)
        except PolicyError as exc:
            kept = "keeping the previous policy" if self.current else \
                "denying every request until a valid policy is loaded"
            if self.current is None:
                self.current = Policy(enforcing=True, directory=self.directory)
            self.audit.event("policy-invalid", f"policy refused: {exc}; {kept}",
                             policy_dir=self.directory, error=str(exc),
                             policy=self.current.summary())
            return False
        self.current = policy
        self.audit.event("policy-loaded", f"policy {policy.summary()}",
                         policy_dir=self.directory, policy=policy.summary(),
                         policy_files=" ".join(f"{name}:sha256={digest}:rules={count}"
                                               for name, digest, count in policy.files)
                         or "none")
        return True
