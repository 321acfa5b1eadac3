"""Rolling a changed secret out to the services that use it (ov-secret(1), --apply):
the agent says which running units hold which versions (agent/consumers.py); the
CLI, not the agent (whose sandbox stays as it is), has systemd restart or reload
those that hold an older one, one at a time, ``--splay`` seconds apart, stopping
at the first failure unless ``--keep-going``.  Without an action it says which
units hold the old version and the command that would act on them.
"""

import os
import shlex
import subprocess
import time

from ..core import paths
from ..core.errors import OvError
from . import talk

VERBS = {"restart": "try-restart", "reload": "try-reload-or-restart"}
ACTIONS = (*VERBS, "none")


class RolloutError(OvError):
    """A unit that systemd did not restart or reload: the ones after it were left."""


def holders(app, env, versions, *, socket=None, key=None):
    """The running units that hold an older version of any secret of *versions*
    (name -> the version now current; every secret of app/env, when None)."""
    units = talk.consumers(socket or paths.client_socket(),
                           key if key is not None else talk.find_key(), app, env,
                           sorted(versions) if versions is not None else None)
    return [unit for unit in units if versions is None or any(
        held < versions.get(name, 0) for name, held in unit["versions"].items())]


def command(unit, action):
    """The systemctl command that restarts or reloads *unit* (a consumers entry):
    a unit of a user's own manager through that manager."""
    systemctl = [os.environ.get("SYSTEMCTL", "systemctl")]
    if unit["user_manager"] is not None:
        systemctl += ["--user", f"--machine={unit['user_manager']}@"]
    return [*systemctl, VERBS[action], unit["unit"]]


def describe(unit):
    held = ",".join(f"{name}={version}" for name, version in sorted(unit["versions"].items()))
    where = (f"user@{unit['user_manager']}.service/" if unit["user_manager"] is not None
             else "")
    return f"{where}{unit['unit']} ({unit['app']}/{unit['env']}: {held})"


def apply(units, action, *, splay=0.0, keep_going=False, record=None, say=print):
    """Act on each of *units* in turn; [(unit, outcome)]; raises RolloutError (after
    acting on the others, with --keep-going) if systemd failed on any.  *record*:
    (app, env, versions) for the 'rotated' journal record."""
    done, failed = [], []
    for number, unit in enumerate(units):
        if number and splay:
            time.sleep(splay)
        outcome = _act(command(unit, action))
        say(f"{action} {describe(unit)}: {outcome}")
        done.append((unit, outcome))
        if outcome != "ok":
            failed.append(unit["unit"])
            if not keep_going:
                break
    left = len(units) - len(done)
    summary = (f"systemd could not {action} {', '.join(failed)}"
               + (f"; {left} unit(s) left as they were" if left else "")) if failed else "ok"
    if record is not None:
        _record(*record, action, done, summary)
    if failed:
        raise RolloutError(summary)
    return done


def _act(argv):
    """'ok', or why systemctl failed (its last line)."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    except OSError as exc:
        return f"failed: {argv[0]}: {exc.strerror}"
    except subprocess.TimeoutExpired:
        return "failed: no answer from systemctl within 300 s"
    if result.returncode == 0:
        return "ok"
    last = result.stderr.strip().splitlines()
    return f"failed: {last[-1] if last else f'exit status {result.returncode}'}"


def _record(app, env, versions, action, done, summary):
    """The 'rotated' journal record (names and versions, never values), where
    journald runs."""
    from ..core.audit import JOURNAL_SOCKET, Audit, journal_sender

    if os.path.exists(JOURNAL_SOCKET):
        Audit(journal_sender()).event(
            "rotated", f"{action}: {len(done)} unit(s) of {app}/{env or '*'}: {summary}",
            app=app, env=env or "*", action=action, outcome=summary,
            versions=[f"{name}={version}" for name, version in sorted(
                (versions or {}).items())] or "key rotation",
            units=[f"{unit['unit']}:{outcome}" for unit, outcome in done])


def advice(units, action="restart"):
    """What to say when no action was asked for: the units, and the commands."""
    return [f"still holds an older version: {describe(unit)}; "
            f"{shlex.join(command(unit, action))}" for unit in units]
