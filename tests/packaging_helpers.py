"""Helpers shared by the unit, install, docs and Debian package tests."""

import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "units"
MAN = REPO / "man"
# System tools only: a pyenv or virtualenv python3 first on PATH must not be the one
# dpkg-buildpackage or rst2man runs.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXPOSURE_RE = re.compile(r"Overall exposure level for \S+:\s*(\d+(?:\.\d+)?)")


def system_env(**extra):
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/"),
           "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "PAGER": "cat"}
    env.update(extra)
    return env


def which(tool):
    return shutil.which(tool, path=SYSTEM_PATH)


SYSTEMD_DIRS = ("systemdsystemunitdir", "systemduserunitdir", "sysusersdir", "tmpfilesdir",
                "catalogdir")


def systemd_dirs():
    """{variable: directory} of systemd.pc (pkg-config), where debian/rules installs
    units, sysusers.d, tmpfiles.d and catalog files; None without pkg-config."""
    if which("pkg-config") is None:
        return None
    dirs = {}
    for variable in SYSTEMD_DIRS:
        result = subprocess.run(["pkg-config", f"--variable={variable}", "systemd"],
                                capture_output=True, timeout=60, env=system_env())
        dirs[variable] = result.stdout.decode().strip()
        if result.returncode != 0 or not dirs[variable]:
            return None
    return dirs


def parse_unit(text):
    """[(section, key, value)] of a unit file, without comments and blank lines."""
    section, entries = None, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def directive(entries, key):
    return [value for _, name, value in entries if name == key]


def exposure_claim(text):
    """The exposure figure the unit's comment claims: the first comment line that
    mentions 'exposure' or 'systemd-analyze security' and a number like 3.0."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("#", ";")) and re.search(
                r"exposure|systemd-analyze security", line, re.I):
            match = re.search(r"(?<![\d.])(\d{1,2}\.\d)(?![\d.])", line)
            if match:
                return float(match.group(1))
    return None


def build_man_pages(dest):
    """Build man/NAME.SECTION.rst into dest/manSECTION/NAME.SECTION with rst2man, as
    debian/rules does; return {page name: path}.  None when rst2man is missing."""
    rst2man = which("rst2man")
    if rst2man is None:
        return None
    pages = {}
    for source in sorted(MAN.glob("*.rst")):
        name = source.name[:-len(".rst")]
        section = name.rsplit(".", 1)[1]
        out = Path(dest) / f"man{section}" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run([rst2man, "--strict", "--no-generator", "--no-datestamp",
                                 str(source), str(out)], capture_output=True,
                                env=system_env(), timeout=60)
        assert result.returncode == 0, (source.name, result.stderr.decode())
        pages[name] = out
    return pages
