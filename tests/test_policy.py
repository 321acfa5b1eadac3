"""Per-caller policy (issue 15): matching rules to callers (ovagent/agent/policy.py),
parsing and loading policy files (ovagent/agent/policy_files.py) and the agent's
policy source, in-process (no agent runs): deny beats allow, globs, AND across
selectors and OR within a list, root and user managers named explicitly, loader
names only by name, unsafe files and directories refused, and property tests (any
TOML-like document parses to rules or a PolicyError, never anything else)."""

import grp
import hashlib
import json
import os
import pwd
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovagent.core.audit import Audit
from ovagent.agent.policy import Caller, Patterns, Policy, PolicyDenied
from ovagent.agent.policy_files import MAX_FILE_BYTES, PolicySource, parse, read_policy
from ovagent.core import protocol
from ovagent.core.errors import PolicyError, UsageError

PROPERTY = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
APP, ENV = "my-saas", "production"
ROOT_GROUP = grp.getgrgid(0).gr_name
OTHER_GROUP = next(entry for entry in grp.getgrall() if entry.gr_gid != 0)
OTHER_USER = next(entry for entry in pwd.getpwall() if entry.pw_uid != 0)
NOBODY = 65534
ISSUE_EXAMPLE = """\
[[allow]]
unit    = "myapp.service"          # glob allowed: "myapp@*.service"
user    = "myapp"                  # name or uid; optional
group   = "myapp"                  # primary or supplementary; optional
app     = "my-saas"
env     = ["production"]
secrets = ["DATABASE_URL", "REDIS_URL"]   # "*" = all but the loader/shell names

[[deny]]
unit    = "*"
app     = "my-saas"
secrets = ["STRIPE_LIVE_KEY"]
"""


class Journal:
    """A journal sender that keeps the records."""

    def __init__(self):
        self.records = []

    def __call__(self, MESSAGE, **fields):
        self.records.append(dict(MESSAGE=MESSAGE, **fields))

    def events(self):
        return [record["OV_EVENT"] for record in self.records]


def rules(text, name="p.toml"):
    return parse(name, textwrap.dedent(text).encode())


def policy(text):
    return Policy(rules(text), [("p.toml", "0" * 64, 1)], enforcing=True)


def caller(unit="myapp.service", uid=1000, gids=(1000,), manager_uid=None):
    return Caller(uid, gids, unit, manager_uid)


def decide(text, who=None, names=None, available=(), app=APP, env=ENV):
    return policy(text).decide(who or caller(), app, env, names, available)


def allowed(text, who=None, names=("DATABASE_URL",), **where):
    return decide(text, who, list(names), **where).allowed


def refusal(text, name="p.toml"):
    with pytest.raises(PolicyError) as info:
        rules(text, name)
    return str(info.value)


# -- matching --------------------------------------------------------------------


def test_deny_beats_allow_and_names_the_deny_rule():
    decision = decide("""
        [[allow]]
        unit = "myapp.service"
        [[deny]]
        unit = "*"
        secrets = ["STRIPE_LIVE_KEY"]
        """, names=["DATABASE_URL", "STRIPE_LIVE_KEY"])
    assert not decision.allowed and decision.names == []
    assert decision.rules == ["p.toml:deny#1"] and decision.rule == "p.toml:deny#1"
    assert decision.reason == "p.toml:deny#1 denies STRIPE_LIVE_KEY"


def test_deny_listed_after_or_before_allow_wins_either_way():
    allow = '[[allow]]\nunit = "myapp.service"\n'
    deny = '[[deny]]\nunit = "myapp.service"\nsecrets = ["DATABASE_URL"]\n'
    assert not allowed(allow + deny) and not allowed(deny + allow)


def test_an_allowed_request_names_the_allow_rule():
    decision = decide('[[allow]]\nunit = "myapp.service"\n', names=["A", "B"])
    assert decision.allowed and decision.names == ["A", "B"]
    assert decision.rules == ["p.toml:allow#1"] and decision.rule == "p.toml:allow#1"


def test_unit_glob_matches_template_instances_only():
    text = '[[allow]]\nunit = "myapp@*.service"\n'
    assert allowed(text, caller("myapp@one.service"))
    assert allowed(text, caller("myapp@two-2.service"))
    assert not allowed(text, caller("myapp.service"))
    assert not allowed(text, caller("other@one.service"))
    assert not allowed(text, caller(None))


def test_a_unit_star_covers_callers_outside_any_unit():
    assert allowed('[[allow]]\nunit = "*"\nuser = 1000\n', caller(None))


def test_an_allow_rule_for_any_unit_must_name_a_user_or_group():
    for text in ('[[allow]]\nunit = "*"\n', '[[allow]]\nunit = ["a.service", "*"]\n'):
        with pytest.raises(PolicyError, match="must name a user or group"):
            rules(text)
    assert rules('[[deny]]\nunit = "*"\n')


def test_a_caller_whose_unit_could_not_be_read_is_refused():
    """It exited before the agent read its cgroup: neither "no unit" (which a deny
    rule naming a unit would miss) nor allowed by a rule naming only its user."""
    gone = Caller(1000, (1000,), None, located=False)
    decision = decide('[[allow]]\nuser = 1000\n[[deny]]\nunit = "web.service"\n',
                      gone, ["STRIPE_LIVE_KEY"])
    assert not decision.allowed and "exited before" in decision.reason
    assert Policy().decide(gone, "a", "b", ["X"]).allowed      # policy off: as before


def test_every_selector_given_must_match():
    text = f"""
        [[allow]]
        unit = "myapp.service"
        user = 1000
        group = "{OTHER_GROUP.gr_name}"
        app = "my-saas"
        env = "production"
        secrets = ["DATABASE_URL"]
        """
    who = caller(gids=(1000, OTHER_GROUP.gr_gid))
    assert allowed(text, who)
    assert not allowed(text, caller("other.service", gids=who.gids))
    assert not allowed(text, caller(uid=1001, gids=who.gids))
    assert not allowed(text, caller())
    assert not allowed(text, who, app="other-app")
    assert not allowed(text, who, env="staging")
    assert not allowed(text, who, names=["REDIS_URL"])


def test_a_list_matches_any_of_its_items():
    text = """
        [[allow]]
        unit = ["a.service", "b.service"]
        env = ["staging", "prod*"]
        secrets = ["A", "B"]
        """
    for unit in ("a.service", "b.service"):
        for env in ("staging", "production", "prod"):
            assert allowed(text, caller(unit), names=["A", "B"], env=env)
    assert not allowed(text, caller("c.service"), names=["A"])
    assert not allowed(text, caller("a.service"), names=["A"], env="dev")
    assert not allowed(text, caller("a.service"), names=["C"])


def test_app_and_env_globs():
    text = '[[allow]]\nunit = "*"\nuser = 1000\napp = "my-*"\nenv = "prod-?"\n'
    assert allowed(text, app="my-saas", env="prod-1")
    assert not allowed(text, app="your-saas", env="prod-1")
    assert not allowed(text, app="my-saas", env="prod-12")


def test_a_rule_without_an_identity_is_refused():
    message = refusal('[[allow]]\napp = "my-saas"\nenv = "production"\n')
    assert message.startswith("p.toml:allow#1: names no unit, user or group")
    assert "p.toml:deny#1" in refusal('[[deny]]\nsecrets = ["A"]\n')


def test_named_secrets_are_all_or_nothing():
    decision = decide('[[allow]]\nunit = "myapp.service"\nsecrets = ["A"]\n',
                      names=["A", "B"])
    assert not decision.allowed and decision.names == [] and decision.rules == []
    assert decision.reason == ("no rule for unit=myapp.service uid=1000 allows B of "
                               "my-saas/production")


def test_a_caller_without_any_rule_is_refused_with_its_identity():
    decision = decide('[[allow]]\nunit = "other.service"\n', names=["A"])
    assert not decision.allowed and decision.rules == []
    assert decision.reason.startswith("no rule for unit=myapp.service uid=1000")
    assert decision.rule == decision.reason


def test_a_request_naming_no_secrets_gets_exactly_the_allowed_subset():
    decision = decide("""
        [[allow]]
        unit = "myapp.service"
        secrets = ["A", "B", "C"]
        [[deny]]
        unit = "myapp.service"
        secrets = ["B"]
        """, available=["A", "B", "D", "C"])
    assert decision.allowed and decision.names == ["A", "C"]
    assert decision.rules == ["p.toml:allow#1"]


def test_a_request_naming_no_secrets_is_refused_when_none_is_allowed():
    decision = decide('[[allow]]\nunit = "myapp.service"\nsecrets = ["A"]\n',
                      available=["B", "C"])
    assert not decision.allowed and decision.names == []
    assert decision.reason.startswith("no rule for unit=myapp.service uid=1000 allows "
                                      "any secret")


def test_an_env_without_secrets_gives_an_allowed_caller_nothing():
    decision = decide('[[allow]]\nunit = "myapp.service"\n', available=[])
    assert decision.allowed and decision.names == []


def test_an_env_without_secrets_still_refuses_a_caller_without_a_rule():
    assert not decide('[[allow]]\nunit = "other.service"\n', available=[]).allowed


def test_policy_off_allows_everything():
    off = Policy()
    named = off.decide(caller(uid=0), APP, ENV, ["PATH", "A"], [])
    everything = off.decide(caller(None), APP, ENV, None, ["A", "LD_PRELOAD"])
    assert named.allowed and named.names == ["PATH", "A"]
    assert everything.allowed and everything.names == ["A", "LD_PRELOAD"]
    assert named.rule == "policy off" and off.summary() == "off"


def test_an_enforcing_policy_without_rules_denies_everything():
    empty = Policy(enforcing=True, directory="/etc/ov/policy.d")
    assert not empty.decide(caller(uid=0), APP, ENV, None, ["A"]).allowed
    assert not empty.decide(caller(), APP, ENV, ["A"]).allowed
    assert empty.summary() == "enforcing, 0 rule(s) from 0 file(s) in /etc/ov/policy.d"


@pytest.mark.parametrize("user", ['"root"', "0", '"0"'])
def test_root_is_allowed_only_where_a_rule_names_it(user):
    root = caller("myapp.service", uid=0, gids=(0,))
    assert not allowed('[[allow]]\nunit = "myapp.service"\n', root)
    assert not allowed(f'[[allow]]\ngroup = "{ROOT_GROUP}"\n', root)
    assert allowed(f'[[allow]]\nunit = "myapp.service"\nuser = {user}\n', root)


def test_deny_rules_without_a_user_still_apply_to_root():
    root = caller("myapp.service", uid=0, gids=(0,))
    text = """
        [[allow]]
        user = "root"
        [[deny]]
        unit = "*"
        secrets = ["STRIPE_LIVE_KEY"]
        """
    assert allowed(text, root, names=["DATABASE_URL"])
    assert not allowed(text, root, names=["STRIPE_LIVE_KEY"])
    assert not allowed(text + f'[[deny]]\ngroup = "{ROOT_GROUP}"\n', root)


def test_a_user_managers_unit_is_allowed_only_with_that_user_named():
    who = caller("myapp.service", uid=1000, manager_uid=1000)
    assert not allowed('[[allow]]\nunit = "myapp.service"\n', who)
    assert not allowed('[[allow]]\nunit = "*.service"\n', who)
    assert not allowed('[[allow]]\nunit = "myapp.service"\nuser = 1001\n', who)
    assert allowed('[[allow]]\nunit = "myapp.service"\nuser = 1000\n', who)
    assert allowed('[[allow]]\nunit = "myapp.service"\nuser = [1001, "1000"]\n', who)


def test_a_user_managers_unit_needs_the_manager_not_the_caller_named():
    who = caller("myapp.service", uid=1001, manager_uid=1000)
    assert not allowed('[[allow]]\nunit = "myapp.service"\nuser = 1001\n', who)


def test_deny_rules_match_a_user_managers_unit_regardless():
    who = caller("myapp.service", uid=1000, manager_uid=1000)
    text = """
        [[allow]]
        unit = "myapp.service"
        user = 1000
        [[deny]]
        unit = "myapp.service"
        secrets = ["B"]
        """
    assert allowed(text, who, names=["A"])
    decision = decide(text, who, names=["A", "B"])
    assert not decision.allowed and decision.rules == ["p.toml:deny#1"]


def test_caller_of_a_user_manager_prints_its_manager():
    assert str(caller("x.service", uid=5, manager_uid=1000)) == \
        "unit=user@1000.service/x.service uid=5"
    assert str(caller(None, uid=7)) == "unit=none uid=7"


def test_allow_star_never_covers_loader_and_shell_names():
    text = '[[allow]]\nunit = "myapp.service"\n'
    for name in ("PATH", "LD_PRELOAD", "PYTHONPATH", "BASH_ENV", "DYLD_INSERT"):
        assert not allowed(text, names=[name])
    decision = decide(text, available=["A", "PATH", "LD_PRELOAD", "B"])
    assert decision.allowed and decision.names == ["A", "B"]


def test_allow_globs_never_cover_loader_names():
    assert not allowed('[[allow]]\nunit = "*"\nuser = 1000\nsecrets = ["LD_*"]\n',
                       names=["LD_PRELOAD"])
    assert not allowed('[[allow]]\nunit = "*"\nuser = 1000\nsecrets = ["PAT?"]\n',
                       names=["PATH"])


def test_allow_by_exact_name_covers_loader_names():
    text = '[[allow]]\nunit = "myapp.service"\nsecrets = ["*", "PATH"]\n'
    assert allowed(text, names=["PATH", "A"])
    assert not allowed(text, names=["LD_PRELOAD"])
    assert decide(text, available=["PATH", "LD_PRELOAD", "A"]).names == ["PATH", "A"]


def test_a_deny_star_covers_loader_names():
    text = """
        [[allow]]
        unit = "myapp.service"
        secrets = ["PATH", "A"]
        [[deny]]
        unit = "myapp.service"
        secrets = ["*"]
        """
    assert not allowed(text, names=["PATH"])
    assert not allowed(text, names=["A"])
    assert not allowed('[[allow]]\nunit = "*"\nuser = 1000\nsecrets = ["PATH"]\n'
                       '[[deny]]\nunit = "*"\nsecrets = ["LD_*", "PA*"]\n', names=["PATH"])


@pytest.mark.parametrize("group", [OTHER_GROUP.gr_name, str(OTHER_GROUP.gr_gid),
                                   OTHER_GROUP.gr_gid])
def test_group_matches_a_primary_or_supplementary_gid(group):
    text = f"[[allow]]\ngroup = {json.dumps(group)}\n"
    assert allowed(text, caller(gids=(OTHER_GROUP.gr_gid,)))
    assert allowed(text, caller(gids=(1000, 4242, OTHER_GROUP.gr_gid)))
    assert not allowed(text, caller(gids=(1000, 4242)))


def test_group_of_a_gid_without_a_name_matches_by_number():
    assert allowed("[[allow]]\ngroup = 4242424\n", caller(gids=(1000, 4242424)))


@pytest.mark.parametrize("user", [OTHER_USER.pw_name, str(OTHER_USER.pw_uid),
                                  OTHER_USER.pw_uid])
def test_user_matches_by_uid_or_name(user):
    text = f"[[allow]]\nuser = {json.dumps(user)}\n"
    assert allowed(text, caller(uid=OTHER_USER.pw_uid))
    assert not allowed(text, caller(uid=OTHER_USER.pw_uid + 4242))


def test_user_of_a_uid_without_a_name_matches_by_number():
    assert allowed('[[allow]]\nuser = "4242424"\n', caller(uid=4242424))
    assert allowed('[[allow]]\nuser = "004242424"\n', caller(uid=4242424))


def test_policy_denied_tells_the_caller_what_and_the_audit_which_rule():
    decision = decide('[[allow]]\nunit = "*"\nuser = 1000\n'
                      '[[deny]]\nunit = "*"\nsecrets = ["B"]\n', names=["B"])
    error = PolicyDenied(decision, caller(), APP, ENV, ["B"])
    assert error.code == protocol.E_POLICY
    assert "unit=myapp.service uid=1000 to receive B of my-saas/production" in str(error)
    assert error.audit_fields == {"policy_rule": "p.toml:deny#1"}
    assert "any secret" in str(PolicyDenied(decision, caller(), APP, ENV, None))


# -- Patterns ----------------------------------------------------------------------

secret_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)


@PROPERTY
@given(names=st.lists(secret_names, max_size=10),
       probes=st.lists(secret_names | st.text(max_size=10), max_size=10))
def test_patterns_of_exact_names_match_exactly_those_names(names, probes):
    patterns = Patterns(names)
    for probe in [*names, *probes]:
        assert patterns.match(probe) == (probe in names)
        assert patterns.match(probe, globs=False) == (probe in names)


def test_patterns_mix_exact_names_and_globs():
    patterns = Patterns(["A", "B_*", "C?"])
    assert [patterns.match(name) for name in ("A", "B_X", "B_", "CD", "C", "CDE", "AB")] \
        == [True, True, True, True, False, False, False]
    assert patterns.match("A", globs=False) and not patterns.match("B_X", globs=False)


# -- parsing -------------------------------------------------------------------------


def test_the_issues_example_parses():
    allow, deny = rules(ISSUE_EXAMPLE, "10-myapp.toml")
    assert (allow.effect, allow.origin) == ("allow", "10-myapp.toml:allow#1")
    assert (deny.effect, deny.origin) == ("deny", "10-myapp.toml:deny#1")
    assert allow.unit.items == ("myapp.service",) and allow.user == {"myapp"}
    assert allow.group == {"myapp"} and allow.app.items == ("my-saas",)
    assert allow.env.items == ("production",)
    assert allow.secrets.items == ("DATABASE_URL", "REDIS_URL")
    assert deny.unit.items == ("*",) and deny.user is None and deny.env is None
    assert deny.secrets.items == ("STRIPE_LIVE_KEY",)


def test_the_issues_example_decides_as_the_issue_says():
    text = ISSUE_EXAMPLE.replace('user    = "myapp"', f'user = "{OTHER_USER.pw_name}"') \
        .replace('group   = "myapp"', f'group = "{OTHER_GROUP.gr_name}"')
    example = Policy(rules(text), enforcing=True)
    myapp = caller("myapp.service", OTHER_USER.pw_uid, (OTHER_GROUP.gr_gid,))
    assert example.decide(myapp, APP, ENV, ["DATABASE_URL", "REDIS_URL"]).allowed
    refused = example.decide(myapp, APP, ENV, ["DATABASE_URL", "STRIPE_LIVE_KEY"])
    assert not refused.allowed and refused.rule == "p.toml:deny#1"
    assert example.decide(myapp, APP, ENV, None, ["DATABASE_URL", "STRIPE_LIVE_KEY",
                                                  "OTHER"]).names == ["DATABASE_URL"]
    other = caller("other.service", OTHER_USER.pw_uid, (OTHER_GROUP.gr_gid,))
    assert not example.decide(other, APP, ENV, ["DATABASE_URL"]).allowed


def test_origins_number_rules_within_a_file_per_effect():
    found = rules("""
        [[deny]]
        unit = "a.service"
        [[allow]]
        unit = "b.service"
        [[deny]]
        unit = "c.service"
        [[allow]]
        unit = "d.service"
        """, "x.toml")
    assert [rule.origin for rule in found] == [
        "x.toml:allow#1", "x.toml:allow#2", "x.toml:deny#1", "x.toml:deny#2"]


def test_secrets_left_out_mean_every_secret():
    (rule,) = rules('[[allow]]\nunit = "a.service"\n')
    assert rule.secrets.items == ("*",) and rule.app is None


def test_an_empty_file_has_no_rules():
    assert rules("") == [] and rules("# only a comment\n") == []


@pytest.mark.parametrize("text, expected", [
    ('[[allow]]\nunit = "a.service"\n[other]\nx = 1\n', "unknown key 'other'"),
    ('unit = "a.service"\n', "unknown key 'unit'"),
    ('[[allow]]\nunit = "a.service"\nsecret = ["A"]\n',
     "p.toml:allow#1: unknown key 'secret'"),
    ('[[deny]]\nunit = "a.service"\nsecrets = []\n',
     "p.toml:deny#1: secrets is an empty list"),
    ('[[allow]]\nunit = []\n', "p.toml:allow#1: unit is an empty list"),
    ("[[allow]]\nunit = 5\n", "p.toml:allow#1: unit: 5 is not a string"),
    ("[[allow]]\nuser = true\n", "p.toml:allow#1: user: True is not a string"),
    ("[[allow]]\ngroup = false\n", "p.toml:allow#1: group: False is not a string"),
    ("[[allow]]\nuser = -1\n", "p.toml:allow#1: user: -1 is not a valid id"),
    ("[[allow]]\nuser = 4294967295\n", "user: 4294967295 is not a valid id"),
    ('[[allow]]\nunit = {name = "a.service"}\n', "p.toml:allow#1: unit: {'name'"),
    ('[[allow]]\nunit = ["a.service", ["b.service"]]\n', "unit: ['b.service']"),
    ('[[allow]]\nunit = "a.service"\nsecrets = [1]\n', "secrets: 1 is not a string"),
    ('[[allow]]\nunit = ""\n', "unit: '' is not a string of 1-256"),
    ('[[allow]]\nunit = "a.service"\n[allow.nested]\nx = 1\n', "unknown key 'nested'"),
    ('allow = {unit = "a.service"}\n', "'allow' must be an array of tables"),
    ('deny = ["a.service"]\n', "'deny' must be an array of tables, written [[deny]]"),
    ("allow = 1\n", "'allow' must be an array of tables"),
    ("[allow]\nunit = \"a.service\"\n", "'allow' must be an array of tables"),
])
def test_malformed_rules_are_refused(text, expected):
    assert expected in refusal(text)


@pytest.mark.parametrize("unit, suggestion", [
    ("myapp", "myapp.service"), ("myapp.timer", "myapp.service"),
    ("my app.service", None), ("a/b.service", None), ("x.service;rm", None)])
def test_bad_unit_names_are_refused(unit, suggestion):
    message = refusal(f"[[allow]]\nunit = {json.dumps(unit)}\n")
    assert message.startswith(f"p.toml:allow#1: unit: {unit!r}")
    if suggestion:
        assert f"(write {suggestion})" in message


@pytest.mark.parametrize("unit", [
    "a.service", "a.scope", "myapp@*.service", "*", "session-*.scope",
    "a-b_c:d\\x2d.service", "[ab].service"])
def test_unit_names_and_patterns_are_accepted(unit):
    (rule,) = rules(f"[[allow]]\nunit = {json.dumps(unit)}\ngroup = 0\n")
    assert rule.unit.items == (unit,)


@pytest.mark.parametrize("key", ["user", "group"])
@pytest.mark.parametrize("value", ["my*", "a?", "[ab]", "my app", "a/b", "*"])
def test_users_and_groups_are_exact_names_never_patterns(key, value):
    message = refusal(f"[[allow]]\n{key} = {json.dumps(value)}\n")
    assert f"p.toml:allow#1: {key}: {value!r} is not a name or a number" in message


@pytest.mark.parametrize("value", ["myapp", "www-data", "a.b", "machine$", "_svc"])
def test_user_names_are_accepted(value):
    (rule,) = rules(f"[[allow]]\nuser = {json.dumps(value)}\n")
    assert rule.user == {value}


@pytest.mark.parametrize("key, value", [
    ("secrets", "1ABC"), ("secrets", "A-B"), ("secrets", "A B"), ("secrets", "A*-"),
    ("app", "My-App"), ("app", "-app"), ("app", "a_b"), ("env", "prod_1"),
    ("env", "x" * 64), ("app", "my-*_")])
def test_invalid_secret_app_and_env_names_are_refused(key, value):
    message = refusal(f'[[allow]]\nunit = "a.service"\n{key} = {json.dumps(value)}\n')
    assert message.startswith(f"p.toml:allow#1: {key}: {value!r} is not")


def test_invalid_toml_is_one_line_naming_the_file():
    message = refusal('[[allow]]\nunit = "a.service\n', "bad.toml")
    assert message.startswith("bad.toml: ") and "\n" not in message


def test_duplicate_keys_are_invalid_toml():
    assert refusal('[[allow]]\nunit = "a.service"\nunit = "b.service"\n', "d.toml") \
        .startswith("d.toml: ")


def test_non_utf8_is_refused_naming_the_file():
    with pytest.raises(PolicyError) as info:
        parse("latin.toml", '[[allow]]\nunit = "caf\u00e9.service"\n'.encode("latin-1"))
    assert str(info.value) == "latin.toml: not UTF-8 text"


def test_deeply_nested_toml_is_a_policy_error():
    """tomllib recurses per nesting level: a file of 10 KB can exhaust the stack.
    That must be a refused policy, not a RecursionError the agent does not expect."""
    for text in ("a = " + "[" * 5000 + "]" * 5000,
                 "a = " + "{b = " * 3000 + "1" + "}" * 3000):
        with pytest.raises(PolicyError):
            parse("deep.toml", text.encode())


# -- parsing: property tests -----------------------------------------------------

KEY_NAMES = st.sampled_from(["allow", "deny", "unit", "user", "group", "app", "env",
                             "secrets"]) | st.text(max_size=8)
SCALARS = (st.text(max_size=12) | st.sampled_from(
    ["a.service", "myapp@*.service", "*", "root", "0", "DATABASE_URL", "PATH", "my-saas",
     "production", "myapp"]) | st.integers(-2**63, 2**63 - 1) | st.booleans())
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(KEY_NAMES, inner, max_size=4), max_leaves=20)
DOCUMENTS = st.dictionaries(KEY_NAMES, VALUES | st.lists(
    st.dictionaries(KEY_NAMES, VALUES, max_size=6), max_size=3), max_size=4)


def toml_string(text):
    """*text* as a TOML basic string: controls, quotes, backslashes and lone
    surrogates escaped (a surrogate makes invalid TOML, which is fine)."""
    return '"' + "".join(f"\\u{ord(char):04x}" if ord(char) < 0x20 or char in '"\\\x7f'
                         or 0xd800 <= ord(char) < 0xe000 else char for char in text) + '"'


def toml_value(value):
    """*value* as TOML, with inline tables and arrays."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{toml_string(key)} = {toml_value(item)}"
                           for key, item in value.items()) + "}"


def toml_document(document):
    return "".join(f"{toml_string(key)} = {toml_value(value)}\n"
                   for key, value in document.items())


def parses_or_refuses(data):
    try:
        found = parse("f.toml", data)
    except PolicyError as exc:
        assert str(exc).startswith("f.toml") and "\n" not in str(exc)
        return None
    assert all(rule.effect in ("allow", "deny") for rule in found)
    return found


@PROPERTY
@given(DOCUMENTS)
def test_any_toml_like_document_gives_rules_or_a_policy_error(document):
    parses_or_refuses(toml_document(document).encode())


FRAGMENTS = ["[[allow]]\n", "[[deny]]\n", "[allow]\n", "unit = ", "user = ",
             "group = ", "secrets = ", "app = ", "env = ", '"a.service"', '"*"', "0",
             "-1", "true", "[", "]", "{", "}", ", ", '"PATH"', "\n", "=", '"', "#",
             "'x'", "1979-05-27", "3.5", "nan", "\\u0000", "\x00", "\ud800"]


@PROPERTY
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
       | st.text(max_size=200))
def test_any_text_gives_rules_or_a_policy_error(text):
    parses_or_refuses(text.encode("utf-8", "surrogatepass"))


@PROPERTY
@given(st.binary(max_size=200))
def test_any_bytes_give_rules_or_a_policy_error(data):
    parses_or_refuses(data)


GOOD_VALUES = {"unit": ["a.service", "myapp@*.service", "*", "s.scope"],
               "user": ["root", 0, "1000", 65534], "group": ["root", 0, "4242"],
               "app": ["my-saas", "my-*"], "env": ["production", "*"],
               "secrets": ["DATABASE_URL", "*", "PATH", "LD_*"]}


def selector_values(key):
    good = GOOD_VALUES[key]
    valid = st.sampled_from(good) | st.lists(st.sampled_from(good), min_size=1, max_size=3)
    return st.integers(0, 9).flatmap(lambda wild: VALUES if wild == 7 else valid)


def rule_tables(required=()):
    return st.fixed_dictionaries(
        {key: selector_values(key) for key in required},
        optional={key: selector_values(key) for key in GOOD_VALUES if key not in required})


RULE_TABLES = rule_tables() | st.sampled_from(["unit", "user", "group"]).flatmap(
    lambda key: rule_tables([key]))


@PROPERTY
@given(st.lists(RULE_TABLES, min_size=1, max_size=3))
def test_rule_like_documents_give_rules_or_a_policy_error(tables):
    found = parses_or_refuses(toml_document({"allow": tables}).encode())
    if found is not None:
        assert [rule.origin for rule in found] == [
            f"f.toml:allow#{number}" for number in range(1, len(tables) + 1)]


# -- loading -------------------------------------------------------------------------


@pytest.fixture
def policy_dir(tmp_path):
    path = tmp_path / "policy.d"
    path.mkdir()
    path.chmod(0o755)
    return path


def write(directory, name, text='[[allow]]\nunit = "a.service"\n', mode=0o644):
    path = directory / name
    path.write_text(text)
    path.chmod(mode)
    return path


def load_refusal(directory, owners=frozenset({0}), enforce=False):
    with pytest.raises(PolicyError) as info:
        read_policy(str(directory), owners, enforce)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_files_are_read_in_lexical_order(policy_dir):
    for name in ("20-b.toml", "10-a.toml", "9.toml"):
        write(policy_dir, name)
    loaded = read_policy(str(policy_dir), {0})
    assert [name for name, _, _ in loaded.files] == ["10-a.toml", "20-b.toml", "9.toml"]
    assert [rule.origin for rule in loaded.rules] == [
        "10-a.toml:allow#1", "20-b.toml:allow#1", "9.toml:allow#1"]
    assert loaded.enforcing and loaded.directory == str(policy_dir)
    assert loaded.summary() == f"enforcing, 3 rule(s) from 3 file(s) in {policy_dir}"


def test_files_record_their_digest_and_rule_count(policy_dir):
    path = write(policy_dir, "a.toml", ISSUE_EXAMPLE)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_policy(str(policy_dir), {0}).files == [("a.toml", digest, 2)]


def test_only_visible_toml_files_are_read(policy_dir):
    for name in (".hidden.toml", "a.toml~", "README", "b.toml.bak", "c.TOML"):
        write(policy_dir, name, "not toml at all [[[")
    (policy_dir / "sub").mkdir()
    write(policy_dir / "sub", "x.toml", "not toml")
    assert not read_policy(str(policy_dir), {0}).enforcing
    write(policy_dir, "real.toml")
    assert [name for name, _, _ in read_policy(str(policy_dir), {0}).files] == ["real.toml"]


def test_a_file_owned_by_another_uid_is_refused(policy_dir):
    path = write(policy_dir, "a.toml")
    os.chown(path, NOBODY, NOBODY)
    assert load_refusal(policy_dir) == (f"{path} is owned by uid {NOBODY}, not root: "
                                        "refusing the policy")


def test_a_file_owned_by_an_allowed_uid_is_accepted(policy_dir):
    path = write(policy_dir, "a.toml")
    os.chown(path, NOBODY, NOBODY)
    assert len(read_policy(str(policy_dir), {0, NOBODY}).rules) == 1


def test_a_directory_owned_by_an_allowed_uid_is_accepted(policy_dir):
    write(policy_dir, "a.toml")
    os.chown(policy_dir, NOBODY, NOBODY)
    assert len(read_policy(str(policy_dir), {0, NOBODY}).rules) == 1
    assert f"directory {policy_dir} is owned by uid {NOBODY}" in load_refusal(policy_dir)


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o622])
def test_a_group_or_other_writable_file_is_refused(policy_dir, mode):
    path = write(policy_dir, "a.toml", mode=mode)
    assert load_refusal(policy_dir) == (f"{path} is writable by group or others: "
                                        "refusing the policy")


def test_a_private_file_is_accepted(policy_dir):
    write(policy_dir, "a.toml", mode=0o600)
    assert read_policy(str(policy_dir), {0}).enforcing


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
def test_a_group_or_other_writable_policy_directory_is_refused(policy_dir, mode):
    write(policy_dir, "a.toml")
    policy_dir.chmod(mode)
    assert load_refusal(policy_dir) == (f"directory {policy_dir} is writable by group "
                                        "or others: refusing its policy")


def test_a_symlinked_file_is_refused(policy_dir, tmp_path):
    real = write(tmp_path, "real.toml")
    (policy_dir / "a.toml").symlink_to(real)
    message = load_refusal(policy_dir)
    assert message == f"cannot read {policy_dir / 'a.toml'}: a symbolic link (not followed)"


def test_a_file_that_is_not_regular_is_refused(policy_dir):
    os.mkfifo(policy_dir / "a.toml", 0o600)
    assert load_refusal(policy_dir) == (f"{policy_dir / 'a.toml'} is not a regular file: "
                                        "refusing the policy")


def test_a_directory_above_owned_by_another_uid_is_refused(tmp_path):
    above = tmp_path / "above"
    (above / "policy.d").mkdir(parents=True)
    write(above / "policy.d", "a.toml")
    os.chown(above, NOBODY, NOBODY)
    message = load_refusal(above / "policy.d")
    assert message.startswith(f"directory {above} is owned by uid {NOBODY}, not root")


def test_a_world_writable_directory_above_is_refused_unless_sticky(tmp_path):
    above = tmp_path / "above"
    (above / "policy.d").mkdir(parents=True)
    (above / "policy.d").chmod(0o755)
    write(above / "policy.d", "a.toml")
    above.chmod(0o777)
    assert load_refusal(above / "policy.d") == (f"directory {above} is writable by group "
                                                "or others: refusing its policy")
    above.chmod(0o1777)
    assert len(read_policy(str(above / "policy.d"), {0}).rules) == 1


def test_a_file_over_the_size_limit_is_refused(policy_dir):
    rule = '[[allow]]\nunit = "a.service"\n'
    path = write(policy_dir, "big.toml", rule + "#" * (MAX_FILE_BYTES - len(rule)))
    assert len(read_policy(str(policy_dir), {0}).rules) == 1
    path.write_text(rule + "#" * (MAX_FILE_BYTES + 1 - len(rule)))
    assert load_refusal(policy_dir) == f"{path} is larger than {MAX_FILE_BYTES} bytes"


def test_a_missing_directory_is_policy_off_or_enforcing_with_no_rules(tmp_path):
    missing = str(tmp_path / "nowhere" / "policy.d")
    off = read_policy(missing, {0})
    assert not off.enforcing and off.rules == [] and off.summary() == "off"
    enforced = read_policy(missing, {0}, enforce=True)
    assert enforced.enforcing and enforced.rules == []
    assert not enforced.decide(caller(), APP, ENV, None, ["A"]).allowed


def test_an_empty_directory_is_policy_off(policy_dir):
    assert not read_policy(str(policy_dir), {0}).enforcing
    assert read_policy(str(policy_dir), {0}, enforce=True).enforcing


def test_a_file_without_rules_turns_policy_on(policy_dir):
    write(policy_dir, "empty.toml", "# nothing yet\n")
    loaded = read_policy(str(policy_dir), {0})
    assert loaded.enforcing and loaded.rules == []


def test_one_bad_file_refuses_the_whole_policy_naming_it(policy_dir):
    write(policy_dir, "10-good.toml")
    write(policy_dir, "20-bad.toml", '[[allow]]\napp = "my-saas"\n')
    assert load_refusal(policy_dir).startswith("20-bad.toml:allow#1: names no unit")


# -- PolicySource ----------------------------------------------------------------------


def source_of(directory, enforce=False):
    journal = Journal()
    return PolicySource(str(directory), {0}, enforce, Audit(send=journal)), journal


def test_an_invalid_policy_at_start_denies_every_request(policy_dir):
    write(policy_dir, "a.toml", "[[allow]]\nunit = 5\n")
    source, journal = source_of(policy_dir)
    assert source.load() is False
    assert source.current.enforcing and source.current.rules == []
    assert not source.current.decide(caller(uid=0), APP, ENV, None, ["A"]).allowed
    (record,) = journal.records
    assert record["OV_EVENT"] == "policy-invalid" and record["PRIORITY"] == "3"
    assert record["POLICY_DIR"] == str(policy_dir)
    assert "denying every request" in record["MESSAGE"]
    assert record["ERROR"].startswith("a.toml:allow#1: unit: 5")


def test_a_later_invalid_policy_keeps_the_previous_one(policy_dir):
    path = write(policy_dir, "a.toml")
    source, journal = source_of(policy_dir)
    assert source.load() is True
    previous = source.current
    path.write_text("[[allow]]\nunit = 'myapp'\n")
    assert source.load() is False
    assert source.current is previous
    assert journal.events() == ["policy-loaded", "policy-invalid"]
    assert "keeping the previous policy" in journal.records[-1]["MESSAGE"]


def test_an_unsafe_policy_on_reload_keeps_the_previous_one(policy_dir):
    path = write(policy_dir, "a.toml")
    source, journal = source_of(policy_dir)
    source.load()
    previous = source.current
    path.chmod(0o666)
    assert source.load() is False and source.current is previous
    assert "writable by group or others" in journal.records[-1]["ERROR"]


def test_a_valid_load_records_each_files_digest_and_rule_count(policy_dir):
    first = write(policy_dir, "10-a.toml", ISSUE_EXAMPLE)
    second = write(policy_dir, "20-b.toml")
    source, journal = source_of(policy_dir)
    assert source.load() is True
    (record,) = journal.records
    assert record["OV_EVENT"] == "policy-loaded" and record["PRIORITY"] == "6"
    digests = [hashlib.sha256(path.read_bytes()).hexdigest() for path in (first, second)]
    assert record["POLICY_FILES"] == (f"10-a.toml:sha256={digests[0]}:rules=2 "
                                      f"20-b.toml:sha256={digests[1]}:rules=1")
    assert record["POLICY"] == source.current.summary()


def test_a_reload_changes_the_decision(policy_dir):
    path = write(policy_dir, "a.toml", '[[allow]]\nunit = "myapp.service"\n')
    source, _ = source_of(policy_dir)
    source.load()
    assert source.current.decide(caller(), APP, ENV, ["A"]).allowed
    path.write_text('[[allow]]\nunit = "other.service"\n')
    source.load()
    assert not source.current.decide(caller(), APP, ENV, ["A"]).allowed


def test_reloading_ten_times_in_a_row_is_harmless(policy_dir):
    write(policy_dir, "a.toml")
    source, journal = source_of(policy_dir)
    assert all(source.load() for _ in range(10))
    assert journal.events() == ["policy-loaded"] * 10
    assert len({record["POLICY_FILES"] for record in journal.records}) == 1


def test_without_policy_files_the_source_records_policy_off(tmp_path):
    source, journal = source_of(tmp_path / "missing")
    assert source.load() is True and not source.current.enforcing
    (record,) = journal.records
    assert record["POLICY"] == "off" and record["POLICY_FILES"] == "none"


def test_a_deeply_nested_file_on_reload_keeps_the_previous_policy(policy_dir):
    path = write(policy_dir, "a.toml")
    source, journal = source_of(policy_dir)
    source.load()
    previous = source.current
    path.write_text("a = " + "[" * 5000 + "]" * 5000)
    assert source.load() is False and source.current is previous
    assert journal.events() == ["policy-loaded", "policy-invalid"]


def test_a_source_without_directory_is_off():
    source = PolicySource.off()
    assert source.load() is True and source.current.summary() == "off"


# -- Caller.named ------------------------------------------------------------------


def test_named_caller_by_user_name_and_uid():
    for user in (OTHER_USER.pw_name, str(OTHER_USER.pw_uid)):
        who = Caller.named(user)
        assert who.uid == OTHER_USER.pw_uid and who.unit is None
        assert who.manager_uid is None
        assert who.users == {OTHER_USER.pw_name, str(OTHER_USER.pw_uid)}


def test_named_caller_groups_default_to_the_group_database():
    who = Caller.named("root")
    assert who.gids[0] == 0
    assert set(who.gids) == set(os.getgrouplist("root", 0))
    assert ROOT_GROUP in who.groups and "0" in who.groups


def test_named_caller_groups_are_exactly_those_given():
    """A service with Group= and SupplementaryGroups= need not have its user's
    primary group: --group is the whole list, the primary first."""
    who = Caller.named(OTHER_USER.pw_name, [ROOT_GROUP, str(OTHER_GROUP.gr_gid)])
    assert who.gids == (0, OTHER_GROUP.gr_gid)


def test_named_caller_of_a_uid_without_a_name_needs_its_groups():
    unnamed = 4242424
    assert Caller.named(str(unnamed), ["0"]).uid == unnamed
    with pytest.raises(UsageError, match="--group"):
        Caller.named(str(unnamed))


def test_named_caller_unit_must_be_a_service_or_scope():
    with pytest.raises(UsageError, match="shop.service"):
        Caller.named("root", unit="shop.slice")


def test_named_caller_in_a_system_unit_and_a_user_managers_unit():
    system = Caller.named("root", unit="myapp.service")
    assert (system.unit, system.manager_uid) == ("myapp.service", None)
    user = Caller.named("root", unit="user@1000.service/x.service")
    assert (user.unit, user.manager_uid) == ("x.service", 1000)
    assert str(user) == "unit=user@1000.service/x.service uid=0"


@pytest.mark.parametrize("user, groups", [
    ("no-such-user-ov", None), ("4242424", None), ("root", ["no-such-group-ov"])])
def test_named_caller_with_an_unknown_user_or_group_is_a_usage_error(user, groups):
    with pytest.raises(UsageError):
        Caller.named(user, groups)


@pytest.mark.parametrize("user, groups", [("\u00b2", None), ("root", ["\u00b2"])])
def test_named_caller_with_a_non_ascii_digit_is_a_usage_error(user, groups):
    """str.isdigit() is True for "²", which int() refuses: ov agent policy check
    --user ² must say "no user", not end in a ValueError traceback."""
    with pytest.raises(UsageError):
        Caller.named(user, groups)


# -- on_change: what ov secret set does without --apply ------------------------------


def test_on_change_is_taken_from_the_allow_rule_that_covers_the_secret():
    example = policy("""
        [[allow]]
        unit = "shop.service"
        user = 1000
        secrets = ["DATABASE_URL"]
        on_change = "reload"
        [[allow]]
        unit = "shop.service"
        user = 1000
        secrets = ["REDIS_URL"]
        """)
    shop = caller("shop.service")
    assert example.on_change(shop, APP, ENV, ["DATABASE_URL"]) == "reload"
    assert example.on_change(shop, APP, ENV, ["REDIS_URL"]) is None
    assert example.on_change(caller("other.service"), APP, ENV, ["DATABASE_URL"]) is None
    assert "on_change = 'reload'" in example.rules[0].describe()


@pytest.mark.parametrize("text", [
    '[[allow]]\nunit = "a.service"\nuser = 0\non_change = "kill"\n',
    '[[allow]]\nunit = "a.service"\nuser = 0\non_change = ["restart"]\n',
    '[[deny]]\nunit = "a.service"\non_change = "restart"\n'])
def test_on_change_is_restart_reload_or_none_in_an_allow_rule(text):
    with pytest.raises(PolicyError, match="on_change"):
        rules(text)
