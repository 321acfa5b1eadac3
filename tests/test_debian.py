"""The Debian package: built with dpkg-buildpackage from a copy of the tree (the
artifacts land beside the copy, never in the repository), then checked: contents,
dependencies, maintainer scripts, lintian (no errors, no warnings), the shell
completion it ships (driven in bash and in zsh) and its autopkgtest smoke test, both
on the package unpacked with dpkg -x.  Installing, upgrading and removing it under a
real systemd is tests/system/test_boot.py."""

import json
import os
import re
import shutil
import subprocess
import time
import types

import pytest
from packaging_helpers import REPO, SYSTEM_PATH, UNITS, system_env, systemd_dirs, which

from ovagent import __version__

BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dh_python3", "rst2man")
ALLOWED_DEPENDS = {"python3-systemd", "python3-cryptography", "python3-argh",
                   "python3-sdnotify", "python3-argon2", "python3-yaml", "python3-psycopg",
                   "python3:any",
                   "init-system-helpers", "systemd", "systemd-standalone-sysusers",
                   "systemd-sysusers"}
IGNORE = shutil.ignore_patterns(".git", ".venv*", ".hypothesis", ".pytest_cache",
                                ".ruff_cache", "__pycache__", "*.egg-info", "build",
                                "dist", ".pybuild", "bench")


def _unavailable():
    if os.geteuid() != 0:
        return "the package build test runs as root (as CI does)"
    missing = [tool for tool in BUILD_TOOLS if which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not installed (debhelper, dh-python, dpkg-dev, "
                "python3-docutils: tests/extra-apt-packages)")
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))


def _tree_state():
    """What an in-tree build would change: the top-level names of the repository
    (build/, .pybuild/, *.egg-info) and every file under debian/ with its size and
    mtime.  (Other files may legitimately change while the suite runs.)"""
    state = {"/": sorted(os.listdir(REPO))}
    for directory, _, files in os.walk(REPO / "debian"):
        for name in files:
            st = os.lstat(os.path.join(directory, name))
            state[os.path.join(directory, name)] = (st.st_size, st.st_mtime_ns)
    return state


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """.out (the artifacts' directory), .deb, .log, .state_before (of the repository)."""
    state_before = _tree_state()
    out = tmp_path_factory.mktemp("debbuild")
    tree = out / "src"
    shutil.copytree(REPO, tree, ignore=IGNORE, symlinks=True)
    deps = subprocess.run(["dpkg-checkbuilddeps"], cwd=tree, capture_output=True,
                          env=system_env(), timeout=60)
    if deps.returncode != 0:
        pytest.skip("build dependencies missing (tests/extra-apt-packages): "
                    + deps.stderr.decode(errors="replace").strip().splitlines()[-1])
    started = time.monotonic()
    result = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=tree,
                            capture_output=True, timeout=600,
                            env=system_env(HOME=str(out)))
    log = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, log[-6000:]
    print(f"dpkg-buildpackage took {time.monotonic() - started:.1f}s")
    deb = out / f"ov-agent_{__version__}_all.deb"
    assert deb.exists(), sorted(os.listdir(out))
    return types.SimpleNamespace(out=out, deb=deb, log=log, state_before=state_before)


def dpkg_deb(*args):
    return subprocess.run(["dpkg-deb", *args], capture_output=True, check=True,
                          timeout=60, env=system_env()).stdout.decode()


@pytest.fixture(scope="module")
def unpacked(built, tmp_path_factory):
    """The .deb's files as it would install them (dpkg -x) under a directory."""
    root = tmp_path_factory.mktemp("unpacked")
    dpkg_deb("-x", str(built.deb), str(root))
    return root


def packaged_env(root, **extra):
    """Run the unpacked package's ov (its /usr/bin/ov is on PATH, its modules on
    PYTHONPATH) with the system's Python and libraries, as the installed one runs."""
    return system_env(PATH=f"{root}/usr/bin:{SYSTEM_PATH}", PYTHONDONTWRITEBYTECODE="1",
                      PYTHONPATH=str(root / "usr/lib/python3/dist-packages"), **extra)


def test_build_leaves_the_repository_as_it_was(built):
    assert _tree_state() == built.state_before, "the package build touched the repository"
    assert not list(REPO.parent.glob("ov-agent_*"))


def test_contents(built, unpacked):
    deb = built.deb
    listing = dpkg_deb("-c", str(deb))
    entries = {line.split()[-1].lstrip("."): line.split()[0]
               for line in listing.splitlines()}
    dirs = systemd_dirs()
    assert dirs, "pkg-config cannot read systemd.pc (Build-Depends: systemd-dev)"
    # Unit, sysusers.d, tmpfiles.d and catalog files where systemd.pc says (debian/rules).
    shipped = {
        f"{dirs['systemdsystemunitdir']}/ov-agent.socket": "ov-agent.socket",
        f"{dirs['systemdsystemunitdir']}/ov-agent.service": "ov-agent.service",
        f"{dirs['systemduserunitdir']}/ov-agent.socket": "user/ov-agent.socket",
        f"{dirs['systemduserunitdir']}/ov-agent.service": "user/ov-agent.service",
        f"{dirs['sysusersdir']}/ov-agent.conf": "sysusers.d/ov-agent.conf",
        f"{dirs['tmpfilesdir']}/ov-agent.conf": "tmpfiles.d/ov-agent.conf",
        f"{dirs['catalogdir']}/ov-agent.catalog": "ov-agent.catalog",
    }
    # Every module of the tree that was built (a sub-package missing from pyproject's
    # packages would be missing here).
    source = built.out / "src"
    modules = [f"/usr/lib/python3/dist-packages/{path.relative_to(source)}"
               for path in sorted((source / "ovagent").rglob("*.py"))]
    expected = [
        "/usr/bin/ov", *shipped,
        "/usr/share/bash-completion/completions/ov",
        "/usr/share/zsh/vendor-completions/_ov",
        "/usr/share/man/man1/ov.1.gz", "/usr/share/man/man1/ov-run.1.gz",
        "/usr/share/man/man1/ov-auth.1.gz", "/usr/share/man/man1/ov-app.1.gz",
        "/usr/share/man/man1/ov-env.1.gz", "/usr/share/man/man1/ov-secret.1.gz",
        "/usr/share/man/man8/ov-agent.8.gz",
        *modules,
        "/usr/share/doc/ov-agent/README.Debian",
    ]
    missing = [path for path in expected if path not in entries]
    assert not missing, (missing, listing)
    assert "/usr/lib/python3/dist-packages/ovagent/cli.py" in modules
    changed = [path for path, name in shipped.items()
               if (unpacked / path.lstrip("/")).read_bytes() != (UNITS / name).read_bytes()]
    assert not changed, f"not the tree's units/ files: {changed}"
    # /etc/ov (0710 root:_ov-agent) is tmpfiles.d's: dpkg could not give it a group
    # that sysusers.d creates only later, in postinst.
    assert "/etc/ov/" not in entries, "/etc/ov is made by tmpfiles.d, not shipped"
    assert not [path for path in entries if path.startswith("/var/")], \
        "the vault directory is not the package's (it survives purge)"


def test_install_file_leaves_systemd_directories_to_pkg_config():
    """debian/ov-agent.install cannot expand variables: debian/rules installs what goes
    into systemd's directories, from pkg-config."""
    text = (REPO / "debian" / "ov-agent.install").read_text()
    assert not re.search(r"systemd|sysusers|tmpfiles|catalog", text), text


def test_control_fields(built):
    deb = built.deb
    fields = {name: dpkg_deb("-f", str(deb), name).strip()
              for name in ("Package", "Version", "Architecture", "Depends")}
    assert fields["Package"] == "ov-agent"
    assert fields["Version"] == __version__
    assert fields["Architecture"] == "all"
    names = {re.split(r"[\s(]", alternative.strip())[0]
             for dependency in fields["Depends"].split(",")
             for alternative in dependency.split("|")}
    assert names <= ALLOWED_DEPENDS, names - ALLOWED_DEPENDS
    assert {"python3-systemd", "python3-cryptography", "python3-argh", "python3-sdnotify",
            "python3-argon2", "python3-yaml", "python3-psycopg"} <= names
    control = (REPO / "debian" / "control").read_text()
    assert re.search(r"^Rules-Requires-Root: no$", control, re.M)


def test_maintainer_scripts_start_only_the_socket(built, tmp_path):
    deb = built.deb
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "control")], check=True,
                   timeout=60)
    postinst = (tmp_path / "control" / "postinst").read_text()
    prerm = (tmp_path / "control" / "prerm").read_text()
    postrm = (tmp_path / "control" / "postrm").read_text()
    assert "systemd-sysusers" in postinst and "ov-agent.conf" in postinst
    assert postinst.index("systemd-sysusers") < postinst.index("systemd-tmpfiles") < \
        postinst.index("deb-systemd-invoke")
    assert "deb-systemd-helper enable 'ov-agent.socket'" in postinst
    # Started on install: the socket only.  On upgrade: the socket keeps listening
    # (not stopped, not restarted: clients queue in its backlog) and a running agent
    # is try-restarted.  On removal: the socket is stopped (the service with it).
    # ov-sync.service and its timer, installed disabled, are only restarted on an
    # upgrade where an admin started them.
    invoked = re.findall(r"deb-systemd-invoke .*", postinst)
    assert invoked == ["deb-systemd-invoke start 'ov-agent.socket' >/dev/null || true",
                       "deb-systemd-invoke try-restart 'ov-agent.service' >/dev/null "
                       "|| true", "deb-systemd-invoke try-restart 'ov-sync.service' "
                       "'ov-sync.timer' >/dev/null || true"], invoked
    assert re.findall(r"deb-systemd-invoke .*", prerm) == [
        "deb-systemd-invoke stop 'ov-sync.timer' 'ov-sync.service' >/dev/null || true",
        "deb-systemd-invoke stop 'ov-agent.socket' >/dev/null || true"]
    assert not (tmp_path / "control" / "preinst").exists(), "nothing stops before unpacking"
    # ov-agent.service has an [Install] section (Also=ov-agent.socket) but the package
    # never enables it: it only keeps it enabled where it was (debian-installed), as
    # dh_installsystemd --no-enable does.
    for block in re.findall(r"^# Automatically added by .*?^# End automatically added",
                            postinst, re.M | re.S):
        for unit in ("ov-agent.service", "ov-sync.service", "ov-sync.timer"):
            if re.search(rf"deb-systemd-helper (--user )?enable '{unit}'", block):
                assert re.search(r"if deb-systemd-helper (--user )?debian-installed "
                                 rf"'{unit}'", block), block
    # dh_installsystemduser --no-enable: re-enable only where the package did before.
    assert "deb-systemd-helper --user debian-installed 'ov-agent.socket'" in postinst, \
        "user units must not be enabled for every user"
    assert not re.search(r"\brm\b[^\n]*(/var/lib/ov|/etc/ov)", postrm), \
        "purge keeps the vault and the key (README.Debian)"


@pytest.mark.skipif(which("lintian") is None, reason="lintian not installed "
                    "(tests/extra-apt-packages)")
def test_lintian_reports_no_errors_or_warnings(built):
    out = built.out
    changes = out / f"ov-agent_{__version__}_{_build_arch()}.changes"
    result = subprocess.run(["lintian", "--pedantic", "--display-info", str(changes)],
                            capture_output=True, timeout=300, env=system_env())
    output = result.stdout.decode(errors="replace")
    print(output or "lintian: clean")
    bad = [line for line in output.splitlines() if line.startswith(("E:", "W:"))]
    assert not bad, output
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")


def _build_arch():
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                          check=True, timeout=60).stdout.decode().strip()


# -- shell completion: what the package ships, driven in each shell ------------------

# {"": top level, "agent": group, "agent start": command, ...: {"commands": [...],
# "options": [...], "files": [options that complete file names]}} of the packaged ov.
PARSER_TREE = r"""
import argparse, json, sys
from ovagent.cli import build_parser

def walk(parser, path, tree):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    actions = [a for a in parser._actions if a not in subs]
    tree[" ".join(path)] = {
        "commands": sorted(name for sub in subs for name in sub.choices),
        "options": sorted(s for a in actions for s in a.option_strings),
        "files": sorted(a.option_strings[-1] for a in actions
                        if a.option_strings and getattr(a, "complete", None))}
    for sub in subs:
        for name, child in sub.choices.items():
            walk(child, path + [name], tree)
    return tree

json.dump(walk(build_parser(), [], {}), sys.stdout)
"""

# bash -c BASH_DRIVER x SCRIPT LINE...: for each LINE, what the completion function
# that SCRIPT registers for ov puts in COMPREPLY, a line each, then "<end>".
BASH_DRIVER = r"""
source "$1"; shift
read -ra spec <<< "$(complete -p ov)"
for ((i = 0; i < ${#spec[@]}; i++)); do [[ ${spec[i]} = -F ]] && fn=${spec[i + 1]}; done
for line in "$@"; do
    read -ra COMP_WORDS <<< "$line"
    [[ $line = *" " ]] && COMP_WORDS+=("")
    COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )) COMP_LINE=$line COMP_POINT=${#line}
    COMPREPLY=()
    "$fn" ov "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}" 2>/dev/null
    printf '%s\n' "${COMPREPLY[@]}" "<end>"
done
"""

# zsh -f -c ZSH_DRIVER x FPATH LINE...: for each LINE, what TAB offers, from a real zle
# in a zpty with compinit and FPATH, a line each, then "<end>".  compadd is wrapped to
# print its matches.  Keys go only to a zle waiting at its prompt (<P#>): typed ahead,
# they would meet the tty's cooked mode, whose ^U kills them.
ZSH_DRIVER = r"""
local n=0 out hit
zmodload zsh/zpty || exit 2
zpty z zsh -f -i
zpty -w z "PROMPT='<P%#>' RPROMPT= ; bindkey -e; fpath=(${(q)1} \$fpath)"
zpty -w z 'autoload -Uz compinit; compinit -u -D'
zpty -w z 'compadd () { local -a hits; builtin compadd -O hits "$@";
    print -rl -- "<hit>"${^hits}; builtin compadd "$@"; }'
zpty -w z 'zstyle ":completion:*" menu no; zstyle ":completion:*" list-prompt ""'
zpty -w z 'print -r -- "<ready${:-}>"'
zpty -r -m z out '*<ready>*<P[#%]>*' || exit 3
shift
for case in "$@"; do
    (( n++ ))
    zpty -w -n z "$case"$'\t'$'\C-e\C-u'"print -r -- \"<end\${:-$n}>\""$'\n'
    zpty -r -m z out "*<end$n>*<P[#%]>*" || exit 4
    for hit in ${(f)out//$'\r'/}; do
        [[ $hit == *'<hit>'* ]] && print -r -- "${hit#*<hit>}"
    done
    print -r -- "<end>"
done
zpty -d z
"""


@pytest.fixture(scope="module")
def parser_tree(unpacked):
    with open(unpacked / "usr/bin/ov") as script:
        python = script.readline()[2:].strip()   # the packaged ov's own interpreter
    result = subprocess.run([python, "-c", PARSER_TREE], capture_output=True,
                            timeout=60, env=packaged_env(unpacked))
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def completion_cases(tree):
    """[(line, the candidates it must complete to)]: every group and command, every
    long option of every command, a prefix, and a file for each file-valued option."""
    cases = [("ov a", {name for name in tree[""]["commands"] if name.startswith("a")})]
    for path, node in tree.items():
        words = ["ov", *path.split()]
        if node["commands"]:
            cases.append((" ".join(words) + " ", set(node["commands"])))
        elif path:
            cases.append((" ".join(words) + " --",
                          {option for option in node["options"] if option.startswith("--")}))
        for option in node["files"]:
            cases.append((" ".join([*words, option, "completion-pro"]),
                          {"completion-probe.txt"}))
    return cases


def check_completion(argv, cases, cwd, env):
    (cwd / "completion-probe.txt").write_text("")
    result = subprocess.run([*argv, *(line for line, _ in cases)], capture_output=True,
                            timeout=120, cwd=cwd, env=env)
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    answers = output.split("<end>\n")
    assert len(answers) == len(cases) + 1, output
    wrong = {line: (sorted(expected), sorted(set(got.split())))
             for (line, expected), got in zip(cases, answers)
             if set(got.split()) != expected}
    assert not wrong, f"(expected, offered) for each line that completes wrong: {wrong}"


@pytest.mark.skipif(which("bash") is None, reason="bash not installed")
def test_bash_completion_completes_every_command_and_option(unpacked, parser_tree,
                                                             tmp_path):
    script = unpacked / "usr/share/bash-completion/completions/ov"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=60)
    check_completion(["bash", "--norc", "--noprofile", "-c", BASH_DRIVER, "bash",
                      str(script)], completion_cases(parser_tree), tmp_path,
                     system_env())


@pytest.mark.skipif(which("zsh") is None, reason="zsh not installed "
                    "(tests/extra-apt-packages)")
def test_zsh_completion_completes_every_command_and_option(unpacked, parser_tree,
                                                            tmp_path):
    vendor = unpacked / "usr/share/zsh/vendor-completions"
    subprocess.run(["zsh", "-n", str(vendor / "_ov")], check=True, timeout=60)
    check_completion(["zsh", "-f", "-c", ZSH_DRIVER, "zsh", str(vendor)],
                     completion_cases(parser_tree), tmp_path,
                     system_env(PATH=f"{unpacked}/usr/bin:{SYSTEM_PATH}"))


# -- autopkgtest ------------------------------------------------------------------------


def test_autopkgtest_smoke_test_passes_on_the_unpacked_package(built, unpacked, tmp_path):
    """debian/tests: each test this runner can honour (restrictions needs-root, which
    the module's root gives, and allow-stderr) runs with the package's ov first on
    PATH, as autopkgtest runs it on the installed package.  The package build already
    ran the smoke test on the built tree (debian/rules)."""
    tests = built.out / "src" / "debian" / "tests"
    ran = []
    for stanza in filter(str.strip, (tests / "control").read_text().split("\n\n")):
        fields = dict(re.findall(r"^(\S+):[ \t]*(.*(?:\n[ \t].*)*)", stanza, re.M))
        names = re.split(r"[\s,]+", fields.get("Tests", "").strip())
        restrictions = set(re.split(r"[\s,]+", fields.get("Restrictions", "").strip()))
        if not restrictions - {"", "needs-root", "allow-stderr"}:
            ran += [name for name in names if name]
    assert "smoke" in ran, "debian/tests/control runs no smoke test this runner can run"
    for name in ran:
        script = tests / name
        assert os.access(script, os.X_OK), f"debian/tests/{name} is not executable"
        result = subprocess.run([str(script)], capture_output=True, timeout=300,
                                cwd=tmp_path, env=packaged_env(unpacked))
        output = (result.stdout + result.stderr).decode(errors="replace")
        assert result.returncode == 0, output
        if name == "smoke":
            assert "smoke: OK" in output, output
            assert f"smoke: ov {__version__}," in output, f"not the packaged ov:\n{output}"
    assert "smoke: OK" in built.log, "the build did not run debian/tests/smoke"
