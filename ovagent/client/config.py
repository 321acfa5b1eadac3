"""Which app, env and secrets a command means: flags, then the nearest ``.ov.yaml``
(walking up from the working directory to $HOME), then the user's config file
(``$XDG_CONFIG_HOME/ov/config.yaml``), then the defaults.
"""

import os

from ..core import paths
from ..core.errors import UsageError
from ..core.validate import DEFAULT_APP, DEFAULT_ENV, check_name, check_slug

PROJECT_FILE = ".ov.yaml"
_KEYS = {"app", "env", "secrets"}


class Target:
    """What to run with.  app None: nothing chose one (the agent applies its --app);
    secrets None: every secret of app/env.  (A plain class: dataclasses would pull
    inspect into the client's start-up.)"""

    def __init__(self, app, env, secrets):
        self.app, self.env, self.secrets = app, env, secrets


def project_file(start=None):
    """The nearest .ov.yaml from *start* up to $HOME (or /), or None."""
    home = os.path.realpath(os.path.expanduser("~"))
    directory = os.path.realpath(start or os.getcwd())
    while True:
        candidate = os.path.join(directory, PROJECT_FILE)
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(directory)
        if directory == home or parent == directory:
            return None
        directory = parent


def user_config_file():
    path = paths.user_config()
    return path if os.path.isfile(path) else None


def load(path):
    """Parse one config file into a dict with only app/env/secrets, validated."""
    import yaml  # only when a file exists: keeps `ov run` start-up lean

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UsageError(f"{path}{where}: invalid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not set(data) <= _KEYS:
        raise UsageError(f"{path}: expected a mapping with keys app, env, secrets")
    try:
        for key in ("app", "env"):
            if key in data:
                check_slug(key, data[key])
        if "secrets" in data:
            if not isinstance(data["secrets"], list):
                raise UsageError("secrets must be a list of names")
            data["secrets"] = [check_name(name) for name in data["secrets"]]
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None
    return data


def parse_secret_list(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError("--secrets needs at least one name")
    return [check_name(name) for name in names]


def resolve(app=None, env=None, secrets=None, *, vault=False):
    """Combine flags with config files.  When nothing chose an app, it stays None for
    the agent (which applies its --app), or is the default app for the *vault*."""
    layers = [{"app": app, "env": env,
               "secrets": parse_secret_list(secrets) if secrets else None}]
    for path in (project_file(), user_config_file()):
        if path:
            layers.append(load(path))

    def pick(key):
        return next((layer[key] for layer in layers if layer.get(key)), None)

    chosen_app = pick("app") or (DEFAULT_APP if vault else None)
    chosen_env = pick("env") or DEFAULT_ENV
    if chosen_app:
        check_slug("app", chosen_app)
    check_slug("env", chosen_env)
    return Target(chosen_app, chosen_env, pick("secrets"))
