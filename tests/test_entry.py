"""The ``ov run --agent`` fast path parses by hand instead of with the full CLI's
argparse: it must never read a command line differently.  Whenever it answers at
all, its answer must be exactly what the full CLI (argh over argparse) makes of
the same arguments; otherwise it must hand over to the full CLI.  And it imports
only what it uses."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from ovagent import cli
from ovagent.client.options import RUN_ARGUMENTS, parse_run_agent

OPTION_DESTS = [flags[0][2:].replace("-", "_") for flags, _ in RUN_ARGUMENTS
                if flags[0].startswith("--") and flags[0] != "--agent"]
TOKENS = st.sampled_from(["--agent", "--", "-", "-n", "--app", "--app=a", "--env", "e",
                          "--socket", "/s", "--mach", "--machine-key=/k", "--secrets",
                          "A,B", "--vault", "--help", "-h", "--ag", "--a", "cmd", "x",
                          "--x", "--app=-n", "--spawn", "--spawn=1", "--sp", "--s"])
OPTIONS = st.sampled_from([["--agent"], ["--app", "a"], ["--app=web"], ["--env", "e"],
                           ["--socket", "/s"], ["--mach", "/k"], ["--secrets=A,B"],
                           ["--vault", "v"], ["--app", "-n"], ["--env="], ["--spawn"]])
# Mostly well-formed command lines (options, maybe "--", a command), and some noise.
COMMAND_LINES = st.one_of(
    st.builds(lambda options, at, dashes, command:
              sum(options[:at] + [["--agent"]] + options[at:], []) + dashes + command,
              st.lists(OPTIONS, max_size=4), st.integers(0, 4),
              st.sampled_from([[], ["--"]]), st.lists(TOKENS, max_size=3)),
    st.lists(TOKENS, max_size=7))


def full_cli(argv):
    """What the full CLI would run: (command, options), or None if it refuses."""
    parser = cli.build_parser()
    try:
        with contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            args = vars(parser.parse_args(argv))
    except SystemExit:
        return None
    if not args.get("agent"):
        return None
    return list(args["command"]), {dest: args[dest] for dest in OPTION_DESTS}


@settings(max_examples=1500, deadline=None)
@given(COMMAND_LINES)
@example(["--agent", "--", "/bin/true"])
@example(["--agent", "--socket", "/s", "cmd", "x"])
@example(["--socket=/s", "--agent", "--", "cmd", "--app", "x"])
@example(["--spawn", "--agent", "--", "cmd"])
@example(["--agent", "--spawn=yes", "--", "cmd"])
def test_the_fast_path_agrees_with_the_full_cli(tokens):
    argv = ["run", *tokens]
    fast = parse_run_agent(argv)
    if fast is not None:
        assert fast == full_cli(argv)


def test_the_fast_path_takes_the_usual_command_lines():
    """It must answer (not hand over) for what service units and CI scripts write."""
    for argv in (["run", "--agent", "--", "/usr/bin/app", "--flag"],
                 ["run", "--agent", "--app", "web", "--env", "prod", "--secrets", "A,B",
                  "--", "/usr/bin/app"],
                 ["run", "--agent", "--spawn", "--", "make", "test"],
                 ["run", "--agent", "--socket=/run/x.sock", "--machine-key", "/k", "app"]):
        expected = full_cli(argv)
        assert expected is not None and parse_run_agent(argv) == expected


def test_help_and_errors_go_to_the_full_cli():
    for argv in (["run", "--agent", "--help"], ["run", "--agent", "-h"],
                 ["run", "--agent"], ["run", "--agent", "--bogus", "--", "x"],
                 ["run", "--agent", "--app", "--", "x"], ["run", "--", "x"]):
        assert parse_run_agent(argv) is None


LEAN_CLIENT = """
import sys
from ovagent.entry import main
try:
    main(["run", "--agent", "--socket", sys.argv[1], "--machine-key", sys.argv[2], "--",
          "true"])
except SystemExit as exc:
    assert exc.code == 6, exc.code          # no agent there
heavy = {"argparse", "argh", "cryptography", "socket", "signal", "selectors", "sqlite3",
         "ovagent.core.vault", "ovagent.cli", "re", "json", "getopt", "gettext", "array",
         "enum", "collections"} & set(sys.modules)
print(sorted(heavy), "_hashlib" in sys.modules and sys.modules["_hashlib"] is not None)
"""


def test_ov_run_agent_imports_only_what_it_uses(tmp_path):
    """The client path's import diet (bench/ measures what each module costs): no
    argparse/argh, no crypto library, no vault, no socket.py or signal.py, not even
    the regex engine, json's Python layer or collections, and no OpenSSL when the
    interpreter has SHA-256 built in.  Run without site (-S), whose .pth hooks (an
    editable install's) would import some of them first."""
    key = tmp_path / "k.kek"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    result = subprocess.run(
        [sys.executable, "-S", "-c", LEAN_CLIENT, str(tmp_path / "none"), str(key)],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert result.returncode == 0, result.stderr
    openssl_expected = not {"_sha256", "_sha2"} & set(sys.builtin_module_names)
    assert result.stdout.split() == ["[]", str(openssl_expected)], result.stdout


def test_the_ov_script_imports_nothing_before_ov():
    """A generated console-script wrapper imports re first; ours is a plain script
    (pyproject.toml's script-files)."""
    script = Path(sys.executable).with_name("ov").read_text()
    body = [line for line in script.splitlines()[1:] if line.startswith(("import", "from"))]
    assert body == ["import sys", "from ovagent.entry import main"], body
