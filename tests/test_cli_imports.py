"""Each command module imports on its own in a fresh interpreter: no import circles among cli.py and *_cli.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI_MODULES = sorted(f"billing_core.{path.stem}" for path in (ROOT / "billing_core").glob("*cli*.py"))


def test_the_command_modules_are_found():
    assert {"billing_core.cli", "billing_core.webhooks_cli", "billing_core.checkout_cli"} <= set(CLI_MODULES)


@pytest.mark.parametrize("module", CLI_MODULES)
def test_each_command_module_imports_first_in_a_fresh_interpreter(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_no_command_module_imports_cli():
    """cli.py imports the subcommand modules; they never import it back."""
    for path in (ROOT / "billing_core").glob("*_cli.py"):
        text = path.read_text()
        assert "from .cli import" not in text and "from billing_core.cli import" not in text, path.name
