"""`python -m billing_core` as an operator runs it: a real process on a real database."""
import json
import os
import subprocess
import sys

import pytest
from sqlalchemy import func, select

from billing_core import db, ledger
from billing_core.models import Account, LedgerEntry
from billing_core.settings import PROJECT_ROOT


def cli(database_url, *args, stdin=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_")}
    env.update({"DATABASE_URL": database_url, "BILLING_ENV_FILE": "/nonexistent.env"})
    return subprocess.run([sys.executable, "-m", "billing_core", *args], capture_output=True, text=True, env=env,
                          cwd=PROJECT_ROOT, input=stdin, timeout=120)


def one_line_error(result):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def balance_json(database_url, user):
    result = cli(database_url, "balance", user, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_balance_of_unknown_user_is_zero(database_url):
    data = balance_json(database_url, "nobody")
    assert data["balance"] == 0 and data["tier"] == "none" and data["subscription_status"] is None
    assert data["flagged"] is False and data["breakdown"] == [] and data["user_id"] == "nobody"


def test_adjust_creates_the_account_and_balance_shows_it(database_url):
    result = cli(database_url, "adjust", "agent-42", "120", "--reason", "welcome credits", "--operator", "alice")
    assert result.returncode == 0, result.stderr
    data = balance_json(database_url, "agent-42")
    assert data["balance"] == 120
    assert data["breakdown"][0]["source"] == "adjustment" and data["breakdown"][0]["expires_at"] is None


def test_consume_json_prints_exactly_one_object(database_url):
    cli(database_url, "adjust", "u", "10", "--reason", "r", "--operator", "o")
    result = cli(database_url, "consume", "u", "4", "--reference", "job-1", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["balance"], data["credits"], data["reference"]) == (6, 4, "job-1")
    again = json.loads(cli(database_url, "consume", "u", "4", "--reference", "job-1", "--json").stdout)
    assert again["balance"] == 6 and again["replayed"] is True


@pytest.mark.parametrize("args,message", [
    (("adjust", "u", "-50", "--reason", "oops", "--operator", "o"), "below zero"),
    (("adjust", "u", "ten", "--reason", "oops", "--operator", "o"), "whole number"),
    (("adjust", "u", "5", "--reason", "  ", "--operator", "o"), "reason is required"),
    (("adjust", "u", "5", "--operator", "o"), "--reason"),
    (("consume", "u", "11", "--reference", "big"), "insufficient credits"),
    (("consume", "u", "0", "--reference", "zero"), "must not be zero"),
    (("consume", "u", "1.5", "--reference", "half"), "whole number"),
    (("consume", "stranger", "1", "--reference", "x"), "insufficient credits"),
    (("balance", ""), "user id"),
])
def test_refusals_print_one_line_exit_nonzero_and_change_nothing(database_url, args, message):
    with db.write_session() as s:
        ledger.adjust(s, user_id="u", credits=10, reason="r", operator="o")
    line = one_line_error(cli(database_url, *args))
    assert message in line
    with db.read_session() as s:
        assert ledger.balance(s, "u") == 10
        assert s.exec(select(func.count()).select_from(LedgerEntry)).one()[0] == 1
        assert s.get(Account, "stranger") is None


def test_negative_adjustment_with_allow_negative_flags_the_account(database_url):
    result = cli(database_url, "adjust", "u", "-5", "--reason", "chargeback fee", "--operator", "o", "--allow-negative")
    assert result.returncode == 0, result.stderr
    data = balance_json(database_url, "u")
    assert data["balance"] == -5 and data["flagged"] is True


def test_commands_refuse_an_out_of_date_schema(tmp_path):
    line = one_line_error(cli(f"sqlite:///{tmp_path}/empty.db", "balance", "u"))
    assert "python -m billing_core init-db" in line


def test_init_db_then_demo_data_on_a_given_database(tmp_path):
    url = f"sqlite:///{tmp_path}/demo.db"
    assert cli(url, "init-db").returncode == 0
    result = cli(url, "demo-data", "--database-url", url)
    assert result.returncode == 0, result.stderr
    assert "demo accounts" in result.stdout
    assert balance_json(url, "demo_user_0000")["user_id"] == "demo_user_0000"
    again = cli(url, "demo-data", "--database-url", url, "--if-empty")
    assert again.returncode == 0 and "left as it is" in again.stdout


def test_demo_data_refuses_a_database_with_real_accounts(tmp_path):
    url = f"sqlite:///{tmp_path}/real.db"
    cli(url, "init-db")
    cli(url, "adjust", "real-customer", "5", "--reason", "r", "--operator", "o")
    line = one_line_error(cli(url, "demo-data", "--database-url", url))
    assert "real account" in line
