"""The systemd units in deploy/systemd/: rendered for this checkout, verified by `systemd-analyze verify` when
it is installed, and every ExecStart parsed by the command line it runs (our argparse parser, or Streamlit's)."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from billing_core import cli
from billing_core.settings import PROJECT_ROOT
from billing_core.systemd_units import exec_starts, render_units

UNITS = {"billing-migrate.service", "billing-webhooks@.service", "billing-dashboard@.service",
         "billing-reconcile.service", "billing-reconcile.timer"}


def rendered() -> dict[str, str]:
    return render_units(python=sys.executable, project_dir=str(PROJECT_ROOT),
                        env_file=str(PROJECT_ROOT / "config" / ".env"), user="billing")


def test_every_template_renders_with_nothing_left_to_fill():
    units = rendered()
    assert set(units) == UNITS
    for name, text in units.items():
        assert "${" not in text, name
        assert f"Environment=BILLING_ENV_FILE={PROJECT_ROOT}/config/.env" in text or name.endswith(".timer")


def test_rendering_refuses_values_systemd_would_misread():
    with pytest.raises(ValueError, match="python must be an absolute path"):
        render_units(python="python3", project_dir="/srv/billing", env_file="/etc/billing.env", user="billing")
    with pytest.raises(ValueError, match="must not be empty or contain spaces"):
        render_units(python="/usr/bin/python3", project_dir="/srv/my billing", env_file="/etc/b.env", user="billing")


def test_every_exec_start_is_a_command_line_our_parsers_accept():
    commands = []
    for name, text in rendered().items():
        for argv in exec_starts(text):
            assert argv[0] == sys.executable and argv[1] == "-m", argv
            if argv[2] == "billing_core":
                args = cli.build_parser().parse_args(argv[3:])  # exits (SystemExit) on anything it doesn't know
                commands.append(args.command)
            else:
                assert argv[2] == "streamlit" and argv[3] == "run", argv
                from streamlit.web.cli import main as streamlit_main
                context = streamlit_main.commands["run"].make_context("run", argv[4:])
                assert Path(context.params["target"]) == PROJECT_ROOT / "Home.py"
                assert context.params["server_address"] == "127.0.0.1" and context.params["server_port"] == 5001
                commands.append("streamlit")
    assert sorted(commands) == ["init-db", "reconcile", "serve-webhooks", "streamlit"]


def test_a_wrong_option_in_an_exec_start_would_be_caught():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve-webhooks", "--threads", "2"])
    from streamlit.web.cli import main as streamlit_main
    with pytest.raises(click.UsageError):
        streamlit_main.commands["run"].make_context("run", ["Home.py", "--server.prot", "1"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_every_unit(tmp_path):
    paths = []
    for name, text in rendered().items():
        path = tmp_path / name.replace("@.", "@5001.")  # a template is verified as one of its instances
        path.write_text(text)
        paths.append(str(path))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *paths], capture_output=True, text=True,
                            timeout=60)
    about_ours = [line for line in (result.stdout + result.stderr).splitlines() if "billing-" in line]
    assert result.returncode == 0 and about_ours == [], result.stdout + result.stderr


def test_render_systemd_writes_the_units(tmp_path, capsys):
    assert cli.main(["render-systemd", "--output", str(tmp_path / "units"), "--user", "svc-billing"]) == 0
    written = {p.name for p in (tmp_path / "units").iterdir()}
    assert written == UNITS
    assert "User=svc-billing" in (tmp_path / "units" / "billing-webhooks@.service").read_text()


def test_every_command_in_the_deployment_guide_parses():
    """docs/DEPLOY.md's `python -m billing_core ...` lines, placeholders (N) filled in, are commands the CLI takes."""
    text = (PROJECT_ROOT / "docs" / "DEPLOY.md").read_text().replace("\\\n", " ")
    commands = [m.group(1).split("  #")[0].strip() for m in re.finditer(r"python -m billing_core ([^`\n]+)", text)]
    assert len(commands) >= 5
    for command in commands:
        argv = [("2" if word == "N" else word) for word in shlex.split(command)]
        cli.build_parser().parse_args(argv)  # SystemExit on anything it doesn't know
