"""Per-caller policy: which unit, user or group may receive which secrets
(ov-agent(8), POLICY).  A second factor: a stolen key file alone does not pass it.

Rules come from the ``*.toml`` files of a policy directory (policy_files.py).  Once
one exists, the agent denies by default: a request is served only when every secret
it names is covered by an allow rule that matches the caller and by no deny rule
that does (deny wins); a request that names no secrets gets exactly the allowed set.

Who the caller is comes from the kernel (peer.py): the uid, gid and supplementary
groups fixed at connect(), and the unit read from its cgroup through a pidfd.  Two
things a caller could otherwise choose do not count: a unit name inside a user's
own manager (user@UID.service), where any process of that user may create and enter
cgroups of any name, matches an allow rule only if the rule also names that user;
and root matches an allow rule only if the rule names root.
"""

import fnmatch
import functools
import grp
import os
import pwd
import re

from ..core import procfs, protocol
from ..core.errors import UsageError
from ..core.protocol import ProtocolError
from ..core.validate import is_dangerous_name

ALLOW, DENY = "allow", "deny"
GLOB_CHARACTERS = frozenset("*?[")


class Patterns:
    """A selector's values: exact ones (a set lookup) and globs (one regex)."""

    def __init__(self, items):
        self.items = tuple(items)
        self.exact = frozenset(item for item in items if not is_glob(item))
        globs = [fnmatch.translate(item) for item in items if is_glob(item)]
        self.glob = re.compile("|".join(globs)) if globs else None

    def match(self, value, globs=True):
        if value in self.exact:
            return True
        return globs and self.glob is not None and self.glob.match(value) is not None


def is_glob(item):
    return not GLOB_CHARACTERS.isdisjoint(item)


class Caller:
    """Who asks, as the policy sees it: uid, gids (primary first), the unit, and the
    uid of the user manager that unit belongs to (None: the system's manager).
    Names are looked up only when a rule names users or groups."""

    def __init__(self, uid, gids, unit, manager_uid=None, located=True):
        """located: False when the caller's cgroup could not be read (it exited
        first): its unit is unknown, and an enforcing policy refuses it."""
        self.uid, self.gids, self.unit, self.manager_uid = uid, tuple(gids), unit, \
            manager_uid
        self.located = located

    @classmethod
    def of(cls, peer):
        return cls(peer.uid, (peer.gid, *peer.groups), peer.unit, peer.manager_uid,
                   peer.located)

    @classmethod
    def named(cls, user, groups=None, unit=None):
        """A caller described by names (ov agent policy check): *user* (a name or
        uid), *groups* (names or gids, the primary first; None: the user's, from the
        group database),
        *unit* (a system unit, or user@UID.service/UNIT for a user manager's)."""
        numeric = user.isascii() and user.isdigit()
        try:
            entry = pwd.getpwuid(int(user)) if numeric else pwd.getpwnam(user)
        except KeyError:
            if not numeric:
                raise UsageError(f"no user {user!r}") from None
            entry = None                 # a uid without a name (DynamicUser=)
        if groups is not None:
            gids = [_gid(group) for group in groups]
        elif entry is not None:
            gids = os.getgrouplist(entry.pw_name, entry.pw_gid)
        else:
            raise UsageError(f"uid {user} has no name: give its groups with --group")
        if unit and not unit.endswith((".service", ".scope")):
            raise UsageError(f"{unit!r}: a caller's unit is a service or a scope "
                             f"(such as {unit.rsplit('.', 1)[0]}.service)")
        unit, manager_uid = procfs.unit_of(unit or "")
        return cls(int(user) if entry is None else entry.pw_uid, gids, unit, manager_uid)

    @classmethod
    def of_uid(cls, uid, unit, manager_uid):
        """A caller the registry of consumers knows: its uid (groups from the group
        database), unit and user manager."""
        try:
            entry = pwd.getpwuid(uid)
            gids = os.getgrouplist(entry.pw_name, entry.pw_gid)
        except KeyError:
            gids = ()
        return cls(uid, gids, unit, manager_uid)

    @functools.cached_property
    def users(self):
        return user_keys(self.uid)

    @functools.cached_property
    def manager_users(self):
        return user_keys(self.manager_uid)

    @functools.cached_property
    def groups(self):
        return set().union(*map(group_keys, self.gids))

    def __str__(self):
        unit = self.unit or "none"
        if self.manager_uid is not None:
            unit = f"user@{self.manager_uid}.service/{unit}"
        return f"unit={unit} uid={self.uid}"


def _gid(group):
    try:
        return (int(group) if group.isascii() and group.isdigit()
                else grp.getgrnam(group).gr_gid)
    except KeyError:
        raise UsageError(f"no group {group!r}") from None


@functools.lru_cache(maxsize=1024)
def user_keys(uid):
    """What a rule's user selector may call *uid*: its number and its name.  Cached
    (a slow name service would stall every request) until the policy is reloaded."""
    try:
        return frozenset({str(uid), pwd.getpwuid(uid).pw_name})
    except KeyError:
        return frozenset({str(uid)})


@functools.lru_cache(maxsize=1024)
def group_keys(gid):
    """What a rule's group selector may call *gid*, cached as user_keys()."""
    try:
        return frozenset({str(gid), grp.getgrgid(gid).gr_name})
    except KeyError:
        return frozenset({str(gid)})


def forget_names():
    """A reload: look user and group names up afresh."""
    user_keys.cache_clear()
    group_keys.cache_clear()


class Rule:
    """One [[allow]] or [[deny]] table.  Selectors left out match anything; the
    secrets left out are "*"."""

    def __init__(self, effect, origin, *, unit=None, user=None, group=None, app=None,
                 env=None, secrets=("*",), on_change=None):
        """on_change: what ov secret set does to the units this rule allows when a
        secret it covers changes, without --apply (restart, reload or none)."""
        self.effect, self.origin, self.on_change = effect, origin, on_change
        self.unit = Patterns(unit) if unit is not None else None
        self.user = frozenset(user) if user is not None else None
        self.group = frozenset(group) if group is not None else None
        self.app = Patterns(app) if app is not None else None
        self.env = Patterns(env) if env is not None else None
        self.secrets = Patterns(secrets)

    def applies(self, caller, app, env):
        """True when this rule speaks of *caller* asking for *app*/*env*."""
        if self.app is not None and not self.app.match(app):
            return False
        if self.env is not None and not self.env.match(env):
            return False
        allow = self.effect == ALLOW
        if self.unit is not None:
            if not self.unit.match(caller.unit or ""):
                return False
            if allow and caller.manager_uid is not None and (
                    self.user is None or self.user.isdisjoint(caller.manager_users)):
                return False             # a unit name that user's processes choose
        if self.user is not None:
            if self.user.isdisjoint(caller.users):
                return False
        elif allow and caller.uid == 0:
            return False                 # root is allowed only where it is named
        return self.group is None or not self.group.isdisjoint(caller.groups)

    def covers(self, name):
        """True when this rule's secrets include *name*.  In an allow rule a glob
        never covers a loader or shell variable (PATH, LD_PRELOAD...): those are
        allowed only by name; a deny rule's globs cover everything."""
        return self.secrets.match(name, globs=self.effect == DENY
                                  or not is_dangerous_name(name))

    def describe(self):
        """The rule as one line of TOML-like text (ov agent policy show)."""
        parts = [f"{key} = {list(value)!r}" for key, value in (
            ("unit", self.unit and self.unit.items), ("user", self.user and sorted(self.user)),
            ("group", self.group and sorted(self.group)), ("app", self.app and self.app.items),
            ("env", self.env and self.env.items), ("secrets", self.secrets.items))
            if value is not None]
        if self.on_change:
            parts.append(f"on_change = {self.on_change!r}")
        return f"{self.origin}: {self.effect} " + ", ".join(parts)


class Decision:
    """allowed; names: what may be released; rules: the origins of the rules that
    decided; reason: why not (or "policy off")."""

    def __init__(self, allowed, names=(), rules=(), reason=""):
        self.allowed, self.names, self.rules, self.reason = allowed, list(names), \
            sorted(set(rules)), reason

    @property
    def rule(self):
        """For audit records (POLICY_RULE): the deciding rules, or the reason."""
        return ", ".join(self.rules) if self.rules else self.reason


class Policy:
    """The rules in force.  enforcing False: policy off, everything a key allows."""

    def __init__(self, rules=(), files=(), *, enforcing=False, directory=None):
        """files: [(name, SHA-256 hex, rule count)] in the order read."""
        self.rules, self.files = list(rules), list(files)
        self.enforcing, self.directory = enforcing, directory

    def summary(self):
        if not self.enforcing:
            return "off"
        return (f"enforcing, {len(self.rules)} rule(s) from {len(self.files)} file(s)"
                f" in {self.directory}")

    def on_change(self, caller, app, env, names):
        """The on_change of the first allow rule that matches *caller* for app/env
        and covers one of *names*; None without one."""
        return next((rule.on_change for rule in self.matching(caller, app, env)[0]
                     if rule.on_change and any(map(rule.covers, names))), None)

    def matching(self, caller, app, env):
        """(allow rules, deny rules) that speak of *caller* asking for app/env."""
        matching = [rule for rule in self.rules if rule.applies(caller, app, env)]
        return ([rule for rule in matching if rule.effect == ALLOW],
                [rule for rule in matching if rule.effect == DENY])

    def decide(self, caller, app, env, names=None, available=()):
        """Which of *names* (None: of the *available* ones) *caller* may receive from
        *app*/*env*.  Named secrets are all allowed or the request is denied whole."""
        wanted = available if names is None else names
        if not self.enforcing:
            return Decision(True, wanted, reason="policy off")
        if not caller.located:
            return Decision(False, reason=f"the caller (uid {caller.uid}) exited before "
                                          "the agent could tell its unit")
        allows, denies = self.matching(caller, app, env)
        if not allows:
            return Decision(False, reason=f"no rule for {caller} allows {app}/{env}")
        granted, deciding = [], []
        for name in wanted:
            deny = next((rule for rule in denies if rule.covers(name)), None)
            allow = next((rule for rule in allows if rule.covers(name)), None)
            if deny is None and allow is not None:
                granted.append(name)
                deciding.append(allow.origin)
            elif names is not None:
                return Decision(False, rules=[deny.origin] if deny else [], reason=(
                    f"{deny.origin} denies {name}" if deny else
                    f"no rule for {caller} allows {name} of {app}/{env}"))
        if wanted and not granted:
            return Decision(False, reason=f"no rule for {caller} allows any secret "
                                          f"{app}/{env} holds")
        return Decision(True, granted, deciding, reason="no secret asked for or held")


class PolicyDenied(ProtocolError):
    """A request the policy refuses: the caller learns that its request was refused,
    the audit record also which rule decided (or that none allowed it)."""

    def __init__(self, decision, caller, app, env, names):
        what = ", ".join(names) if names else "any secret"
        super().__init__(protocol.E_POLICY, f"the agent's policy does not allow "
                         f"{caller} to receive {what} of {app}/{env}")
        self.audit_fields = {"policy_rule": decision.rule}
