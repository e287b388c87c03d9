"""`render-systemd`: the systemd units in deploy/systemd/*.in, filled in for this installation.

    python -m billing_core render-systemd --output /etc/systemd/system [--user billing] [--env-file PATH]

The templates name the Python interpreter, the project directory, the env file and the service user as
${python}, ${project_dir}, ${env_file} and ${user}; %i (systemd's instance name) is the port.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from string import Template

from .settings import DEFAULT_ENV_FILE, PROJECT_ROOT

TEMPLATE_DIR = PROJECT_ROOT / "deploy" / "systemd"


def render_units(*, python: str, project_dir: str, env_file: str, user: str) -> dict[str, str]:
    """{unit file name: text} for every template; refuses values systemd would misread."""
    values = {"python": python, "project_dir": project_dir, "env_file": env_file, "user": user}
    for name, value in values.items():
        if name != "user" and not value.startswith("/"):
            raise ValueError(f"{name} must be an absolute path, not {value!r}")
        if not value or any(c.isspace() or c in "%$\\\"'" for c in value):
            raise ValueError(f"{name} must not be empty or contain spaces, quotes, % or $: {value!r}")
    return {path.name.removesuffix(".in"): Template(path.read_text()).substitute(values)
            for path in sorted(TEMPLATE_DIR.glob("*.in"))}


def exec_starts(unit_text: str, *, instance: str = "5001") -> list[list[str]]:
    """Each ExecStart= of a unit as argv, with the instance name in place of %i."""
    return [shlex.split(line.split("=", 1)[1].replace("%i", instance))
            for line in unit_text.splitlines() if line.startswith("ExecStart=")]


def cmd_render_systemd(args) -> int:
    units = render_units(python=args.python, project_dir=str(Path(args.project_dir).resolve()),
                         env_file=str(Path(args.env_file).resolve()), user=args.user)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for name, text in units.items():
        (output / name).write_text(text)
        print(output / name)
    return 0


def register(sub) -> None:
    p = sub.add_parser("render-systemd", help="write systemd units for the sidecar, dashboard, migrations and "
                                              "reconciliation (see docs/DEPLOY.md)")
    p.add_argument("--output", required=True, help="directory to write the units to, e.g. /etc/systemd/system")
    p.add_argument("--user", default="billing", help="the user the services run as (default billing)")
    p.add_argument("--env-file", default=str(DEFAULT_ENV_FILE), help="the settings file (default config/.env)")
    p.add_argument("--python", default=sys.executable, help="the virtualenv's python (default: this one)")
    p.add_argument("--project-dir", default=str(PROJECT_ROOT), help="the checkout (default: this one)")
    p.set_defaults(func=cmd_render_systemd)
