"""Operator accounts: hashing, validation, sign-in checks, roles, and `add-operator` as a real process."""
import os
import subprocess
import sys

import pytest
from sqlalchemy import select

from billing_core import db, ledger
from billing_core.models import Account, LedgerEntry, Operator
from billing_core.operators import (Identity, OperatorError, OperatorExists, PermissionDenied, adjust_as,
                                    authenticate, create_operator, hash_password, role_for_email, verify_password)
from billing_core.settings import PROJECT_ROOT, load_settings


def test_password_hash_is_salted_and_verifies():
    first, second = hash_password("s3cret-password"), hash_password("s3cret-password")
    assert first != second  # a fresh salt each time
    assert "s3cret-password" not in first
    assert verify_password("s3cret-password", first)
    assert not verify_password("s3cret-passwore", first)
    assert not verify_password("s3cret-password", "garbage")
    assert not verify_password("s3cret-password", "pbkdf2$1$2$3$AAAA$BBBB")


def test_create_and_authenticate(database_url):
    with db.write_session() as session:
        create_operator(session, name="alice", role="admin", password="correct-horse")
    with db.read_session() as session:
        stored = session.execute(select(Operator)).scalars().one()
        assert stored.password_hash.startswith("scrypt$") and "correct-horse" not in stored.password_hash
        assert authenticate(session, name="alice", password="correct-horse").role == "admin"
        assert authenticate(session, name=" alice ", password="correct-horse") is not None
        assert authenticate(session, name="alice", password="wrong-password") is None
        assert authenticate(session, name="nobody", password="correct-horse") is None
        assert authenticate(session, name="", password="") is None


def test_disabled_operator_cannot_sign_in(database_url):
    with db.write_session() as session:
        operator = create_operator(session, name="bob", role="support", password="password-1")
        operator.disabled = True
        session.add(operator)
    with db.read_session() as session:
        assert authenticate(session, name="bob", password="password-1") is None


@pytest.mark.parametrize("name, role, password, message", [
    ("", "admin", "long-enough", "must not be empty"),
    ("has space", "admin", "long-enough", "operator name"),
    ("-dash", "admin", "long-enough", "operator name"),
    ("x" * 101, "admin", "long-enough", "operator name"),
    ("carol", "owner", "long-enough", "role must be one of admin, support"),
    ("carol", "admin", "short", "at least 8 characters"),
])
def test_create_operator_refuses_bad_input(sqlite_url, name, role, password, message):
    with pytest.raises(OperatorError, match=message):
        with db.write_session() as session:
            create_operator(session, name=name, role=role, password=password)
    with db.read_session() as session:
        assert session.execute(select(Operator)).first() is None


def test_create_operator_refuses_a_taken_name(sqlite_url):
    with db.write_session() as session:
        create_operator(session, name="alice", role="admin", password="password-1")
    with pytest.raises(OperatorExists, match="already exists"):
        with db.write_session() as session:
            create_operator(session, name="alice", role="support", password="password-2")


def test_role_for_email():
    settings = load_settings({"ADMIN_EMAILS": "Boss@Example.com", "SUPPORT_EMAILS": "help@example.com, h2@example.com",
                              "BILLING_ENV_FILE": "/nonexistent"})
    assert role_for_email("boss@example.com", settings) == "admin"
    assert role_for_email(" BOSS@example.com ", settings) == "admin"
    assert role_for_email("h2@example.com", settings) == "support"
    assert role_for_email("stranger@example.com", settings) is None
    assert role_for_email(None, settings) is None


def test_support_adjustments_are_limited(database_url):
    settings = load_settings({"SUPPORT_ADJUSTMENT_LIMIT": "100", "BILLING_ENV_FILE": "/nonexistent"})
    support, admin = Identity("sam", "support"), Identity("alice", "admin")
    with pytest.raises(PermissionDenied, match="at most 100"):
        with db.write_session() as session:
            adjust_as(session, identity=support, user_id="u1", credits=101, reason="goodwill", settings=settings)
    with pytest.raises(PermissionDenied, match="at most 100"):
        with db.write_session() as session:
            adjust_as(session, identity=support, user_id="u1", credits=-101, reason="goodwill", settings=settings)
    with db.write_session() as session:
        adjust_as(session, identity=support, user_id="u1", credits=100, reason="goodwill", settings=settings)
        adjust_as(session, identity=admin, user_id="u1", credits=5000, reason="migration", settings=settings)
    with pytest.raises(PermissionDenied, match="only an admin"):
        with db.write_session() as session:
            adjust_as(session, identity=support, user_id="u1", credits=-50, reason="x", settings=settings,
                      allow_negative=True)
    with db.read_session() as session:
        assert ledger.balance(session, "u1") == 5100
        operators = session.execute(select(LedgerEntry.operator, LedgerEntry.credits)
                                    .order_by(LedgerEntry.id)).all()
    assert operators == [("sam", 100), ("alice", 5000)]


def add_operator(database_url, *args, stdin=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_")}
    env.update({"DATABASE_URL": database_url, "BILLING_ENV_FILE": "/nonexistent.env"})
    return subprocess.run([sys.executable, "-m", "billing_core", "add-operator", *args], capture_output=True,
                          text=True, env=env, cwd=PROJECT_ROOT, input=stdin, timeout=120)


def test_add_operator_reads_the_password_from_stdin(sqlite_url):
    result = add_operator(sqlite_url, "dana", "--role", "support", "--password-stdin", stdin="pass-word-9\n")
    assert result.returncode == 0, result.stderr
    assert "dana (support)" in result.stdout
    with db.read_session() as session:
        assert authenticate(session, name="dana", password="pass-word-9").role == "support"
    # stdin that is not a terminal is read without --password-stdin too
    result = add_operator(sqlite_url, "erin", "--role", "admin", stdin="another-pass\n")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, stdin, message", [
    (["fred", "--role", "admin"], "short\n", "at least 8 characters"),
    (["fred", "--role", "admin"], "", "no password on stdin"),
    (["fred", "--role", "owner"], "long-enough\n", "invalid choice"),
    (["bad name", "--role", "admin"], "long-enough\n", "operator name"),
    (["taken", "--role", "admin"], "long-enough\n", "already exists"),
])
def test_add_operator_refusals_are_one_line(sqlite_url, args, stdin, message):
    with db.write_session() as session:
        create_operator(session, name="taken", role="admin", password="password-1")
    result = add_operator(sqlite_url, *args, stdin=stdin)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    with db.read_session() as session:
        assert [o.name for o in session.execute(select(Operator)).scalars()] == ["taken"]


def test_add_operator_prompts_twice_on_a_terminal(sqlite_url, monkeypatch, capsys):
    from billing_core import cli, operators_cli

    monkeypatch.setattr(operators_cli.sys.stdin, "isatty", lambda: True, raising=False)
    answers = iter(["first-password", "other-password"])
    monkeypatch.setattr(operators_cli.getpass, "getpass", lambda prompt: next(answers))
    assert cli.main(["add-operator", "gina", "--role", "admin"]) == 1
    assert "do not match" in capsys.readouterr().err
    answers = iter(["same-password", "same-password"])
    assert cli.main(["add-operator", "gina", "--role", "admin"]) == 0
    with db.read_session() as session:
        assert authenticate(session, name="gina", password="same-password") is not None


def test_demo_data_if_empty_still_creates_the_demo_operator(sqlite_url, monkeypatch):
    from billing_core import settings as settings_module
    from demo_data import DEMO_OPERATOR, fill_demo_database
    from billing_core.models import Operator as OperatorRow

    monkeypatch.setattr(settings_module, "DEMO_DATABASE_URL", sqlite_url)
    fill_demo_database(database_url=sqlite_url)
    with db.write_session() as session:
        session.execute(OperatorRow.__table__.delete())
    assert "left as it is" in fill_demo_database(database_url=sqlite_url, if_empty=True)
    with db.read_session() as session:
        assert authenticate(session, name=DEMO_OPERATOR[0], password=DEMO_OPERATOR[1]).role == "admin"


def operator_names(url):
    with db.read_session(db.get_engine(url)) as session:
        return session.execute(select(Operator.name)).scalars().all()


def test_demo_data_elsewhere_creates_no_demo_operator(database_url, capsys):
    """The demo operator's password is public, so only the demo database gets it."""
    from billing_core import cli

    assert cli.main(["demo-data", "--database-url", database_url]) == 0
    assert "no demo operator" in capsys.readouterr().out
    assert operator_names(database_url) == []
    with db.read_session() as session:
        assert session.execute(select(Account)).first() is not None  # the demo customers were added


def test_large_demo_data_elsewhere_creates_no_demo_operator(database_url):
    from demo_data import large as demo_large

    assert "no demo operator" in demo_large.fill_large(database_url, seed=3, accounts=5)
    assert operator_names(database_url) == []
