"""The man pages (man/*.rst, built with rst2man as debian/rules does) match --help:
every option of every command appears in its page; every page renders with
``man --warnings`` without a warning; the exit codes are documented; the generated
bash completion knows every command and option.  Every test that docs/security.rst's
table of hostile inputs names exists."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging_helpers import (
    MAN,
    REPO,
    UNITS,
    build_man_pages,
    exposure_claim,
    system_env,
    which,
)

from ovagent import __version__
from ovagent.core import errors

OV = str(Path(sys.executable).with_name("ov"))
PAGE_OF_GROUP = {"auth": "ov-auth.1", "app": "ov-app.1", "env": "ov-env.1",
                 "secret": "ov-secret.1", "agent": "ov-agent.8", "run": "ov-run.1",
                 "store": "ov-store.1", "sync": "ov-store.1"}


def ov_help(*args):
    result = subprocess.run([OV, *args, "--help"], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def choices(help_text):
    """The subcommands listed in a usage line: {a,b,c} ... (not an option's choices,
    {auto,enforce}, which no "..." follows)."""
    match = re.search(r"\{([a-z,-]+)\} \.\.\.", help_text)
    return match.group(1).split(",") if match else []


def option_strings(help_text):
    """Option strings (-h, --app, ...) from the options section of --help."""
    found = []
    for line in help_text.splitlines():
        match = re.match(r"^  (-[^\s,]+(?:, -[^\s,]+)*)", line)
        if match:
            found += match.group(1).split(", ")
    return found


def commands():
    """[(group, command or None)] for every command of ov, read from --help; a
    command with commands of its own ("agent policy") gives one per leaf
    ("policy check")."""
    found = []
    for group in choices(ov_help()):
        leaves = [] if group == "run" else [[name] for name in choices(ov_help(group))]
        while leaves:
            path = leaves.pop(0)
            deeper = choices(ov_help(group, *path))
            if deeper:
                leaves += [[*path, name] for name in deeper]
            else:
                found.append((group, " ".join(path)))
        found += [] if any(entry[0] == group for entry in found) else [(group, None)]
    return found


COMMANDS = commands()


def roff_text(path):
    """A built page's roff source with escapes undone enough to search it."""
    text = Path(path).read_text()
    text = re.sub(r"\\f[BIRP]|\\f\(..|\\&|\\%", "", text)
    return text.replace("\\-", "-").replace("\\(aq", "'").replace("\\e", "\\")


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    built = build_man_pages(tmp_path_factory.mktemp("man"))
    if built is None:
        pytest.skip("rst2man not installed (python3-docutils, tests/extra-apt-packages)")
    return built


def test_every_command_group_has_a_page():
    groups = {group for group, _ in COMMANDS}
    assert groups == set(PAGE_OF_GROUP), groups
    sources = {path.name[:-len(".rst")] for path in MAN.glob("*.rst")}
    assert sources == set(PAGE_OF_GROUP.values()) | {"ov.1"}


@pytest.mark.parametrize("group,command", COMMANDS,
                         ids=[" ".join(filter(None, c)) for c in COMMANDS])
def test_every_option_is_in_the_man_page(pages, group, command):
    args = [group] + (command.split() if command else [])
    options = option_strings(ov_help(*args))
    assert "--help" in options and len(options) >= 2, options
    text = roff_text(pages[PAGE_OF_GROUP[group]])
    missing = [option for option in options if not re.search(
        rf"(?<![\w-]){re.escape(option)}(?![\w-])", text)]
    assert not missing, f"ov {' '.join(args)}: {missing} not in {PAGE_OF_GROUP[group]}"
    if command:
        assert re.search(rf"\b{re.escape(command)}\b", text), command


def test_top_level_options_are_in_ov_1(pages):
    text = roff_text(pages["ov.1"])
    for option in option_strings(ov_help()):
        assert option in text, option
    for group in PAGE_OF_GROUP:
        assert PAGE_OF_GROUP[group].split(".")[0] in text, group


def test_exit_codes_are_documented(pages):
    codes = sorted({value for name, value in vars(errors).items()
                    if name.startswith("EXIT_")} | {0})
    assert codes == [0, 1, 2, 3, 4, 5, 6, 7, 126, 127, 130], codes
    text = roff_text(pages["ov.1"])
    section = text.split(".SH EXIT STATUS", 1)[1].split(".SH ", 1)[0]
    for code in codes:
        assert re.search(rf"^(\.B )?{code}$", section, re.M), code
    assert "128+" in section


def security_table_rows():
    """(input, [(test file, test name)]) for each row of docs/security.rst's table."""
    text = (REPO / "docs" / "security.rst").read_text()
    table = text.split(".. list-table::", 1)[1]
    rows = []
    for row in re.split(r"^   \* - ", table, flags=re.M)[2:]:   # [0] options, [1] header
        cells = re.split(r"^     - ", row, flags=re.M)
        assert len(cells) == 3, row
        rows.append((" ".join(cells[0].split()),
                     re.findall(r"``tests/(test_\w+\.py)::(test_\w+)``", cells[2])))
    return rows


def test_every_row_of_the_security_table_names_tests_that_exist():
    rows = security_table_rows()
    assert len(rows) >= 30, len(rows)
    defined = {}
    for row, tests in rows:
        assert tests, f"no test named for {row!r}"
        for module, name in tests:
            if module not in defined:
                tree = ast.parse((REPO / "tests" / module).read_text())
                defined[module] = {node.name for node in ast.walk(tree)
                                   if isinstance(node, ast.FunctionDef)}
            assert name in defined[module], f"{module}::{name} (for {row!r}) is not a test"


@pytest.mark.parametrize("doc", ["README.rst", "docs/architecture.rst", "docs/protocol.rst",
                                 "docs/security.rst", "bench/README.rst"])
def test_documents_render_without_warnings(doc):
    rst2pseudoxml = which("rst2pseudoxml")
    if rst2pseudoxml is None:
        pytest.skip("rst2pseudoxml missing (Debian package python3-docutils)")
    result = subprocess.run([rst2pseudoxml, "--report=2", "--halt=5", str(REPO / doc),
                             "/dev/null"], capture_output=True, text=True, timeout=60,
                            env=system_env())
    assert result.returncode == 0 and not result.stderr, result.stderr


def test_ov_agent_page_states_the_units_exposure():
    claim = exposure_claim((UNITS / "ov-agent.service").read_text())
    text = " ".join((MAN / "ov-agent.8.rst").read_text().split())
    assert f"exposure {claim}" in text, claim


def test_pages_name_the_version():
    for source in MAN.glob("*.rst"):
        assert f":Version: ov-agent {__version__}\n" in source.read_text(), source.name


@pytest.mark.skipif(which("man") is None or which("groff") is None and
                    which("nroff") is None,
                    reason="man or groff not installed (man-db, groff-base)")
def test_pages_render_without_warnings(pages):
    for name, path in pages.items():
        result = subprocess.run(["man", "--warnings", "-l", str(path)], capture_output=True,
                                timeout=60, env=system_env(MANWIDTH="80"))
        assert result.returncode == 0, (name, result.stderr.decode())
        assert result.stderr.decode() == "", (name, result.stderr.decode())
        assert len(result.stdout.splitlines()) > 20, name


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_bash_completion_knows_every_command_and_option(shell, tmp_path):
    """The completion debian/rules generates with shtab from ov's own parser (for bash,
    and for zsh): every command and option is in it, and the shell parses it.  (That
    it completes them is tests/test_debian.py, on the scripts the package ships.)"""
    pytest.importorskip("shtab", reason="shtab not installed (the test extra; "
                        "python3-shtab: tests/extra-apt-packages)")
    if which(shell) is None:
        pytest.skip(f"{shell} not installed (tests/extra-apt-packages)")
    script = tmp_path / f"ov.{shell}"
    with open(script, "wb") as handle:
        subprocess.run([sys.executable, "-m", "shtab", "--error-unimportable",
                        "--prefix=ov", f"--shell={shell}", "ovagent.cli.build_parser"],
                       stdout=handle, check=True, timeout=60, cwd=REPO,
                       env={"PYTHONPATH": str(REPO), "PATH": system_env()["PATH"]})
    text = script.read_text()
    subprocess.run([which(shell), "-n", str(script)], check=True, timeout=60)

    def named(word):
        return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text)

    for group, command in COMMANDS:
        assert named(group), group
        for word in (command or "").split():
            assert named(word), (group, command)
        for option in option_strings(ov_help(group, *(command or "").split())):
            assert named(option), (group, command, option)
