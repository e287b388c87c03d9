"""Operator accounts from a shell; every change is recorded with who made it (`--operator`, default the
login name):

    add-operator NAME --role admin|support [--password-stdin] [--operator ADMIN]
    list-operators [--json]
    disable-operator NAME / enable-operator NAME
    reset-password NAME [--password-stdin]
    set-role NAME admin|support
"""
from __future__ import annotations

import getpass
import json
import sys

from . import db
from .operators import (OperatorError, check_name, check_password, check_role, create_operator, hash_password,
                        list_operators, reset_password, set_disabled, set_role)
from .settings import get_settings, mask_url_password


def _read_password(args) -> str:
    if args.password_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            raise OperatorError("no password on stdin (expected one line)")
        return line.rstrip("\r\n")
    first = getpass.getpass(f"Password for {args.name}: ")
    check_password(first)
    second = getpass.getpass("Repeat the password: ")
    if first != second:
        raise OperatorError("the two passwords do not match")
    return first


def cmd_add_operator(args) -> int:
    name, role = check_name(args.name), check_role(args.role)
    password = check_password(_read_password(args))
    url = get_settings().database_url
    db.ensure_schema_current(url)
    with db.write_session(db.get_engine(url)) as session:
        create_operator(session, name=name, role=role, password=password, created_by=args.operator)
    print(f"operator {name} ({role}) added to {mask_url_password(url)}")
    return 0


def _change(args, change, done: str) -> int:
    url = get_settings().database_url
    db.ensure_schema_current(url)
    with db.write_session(db.get_engine(url)) as session:
        change(session)
    print(f"{done} (by {args.operator})")
    return 0


def cmd_list_operators(args) -> int:
    url = get_settings().database_url
    db.ensure_schema_current(url)
    with db.read_session(db.get_engine(url)) as session:
        rows = list_operators(session)
    if args.json:
        sys.stdout.write(json.dumps({"operators": rows}, default=str, sort_keys=True) + "\n")
        return 0
    if not rows:
        print("no operators; add one with `python -m billing_core add-operator NAME --role admin`")
    for row in rows:
        status = "disabled" if row["disabled"] else "enabled"
        print(f"{row['name']:<30} {row['role']:<8} {status:<9} created {row['created_at']:%Y-%m-%d}")
    return 0


def cmd_disable(args) -> int:
    name = check_name(args.name)
    return _change(args, lambda s: set_disabled(s, name=name, disabled=True, changed_by=args.operator),
                   f"operator {name} is disabled; their dashboard session ends on its next rerun")


def cmd_enable(args) -> int:
    name = check_name(args.name)
    return _change(args, lambda s: set_disabled(s, name=name, disabled=False, changed_by=args.operator),
                   f"operator {name} is enabled")


def cmd_reset_password(args) -> int:
    name = check_name(args.name)
    new_hash = hash_password(check_password(_read_password(args)))  # ~0.3 s, before the write transaction
    return _change(args, lambda s: reset_password(s, name=name, new_hash=new_hash, changed_by=args.operator),
                   f"the password of {name} is reset")


def cmd_set_role(args) -> int:
    name, role = check_name(args.name), check_role(args.role)
    return _change(args, lambda s: set_role(s, name=name, role=role, changed_by=args.operator),
                   f"operator {name} is now {role}")


def _by(parser) -> None:
    parser.add_argument("--operator", default=getpass.getuser(),
                        help="who makes the change (recorded; default: the login name)")


def register(sub) -> None:
    p = sub.add_parser("add-operator", help="create a dashboard operator account")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=("admin", "support"))
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password as one line from stdin (also the default when stdin is not a terminal)")
    _by(p)
    p.set_defaults(func=cmd_add_operator)

    p = sub.add_parser("list-operators", help="dashboard operators, their roles and whether they are disabled")
    p.add_argument("--json", action="store_true", help='print one JSON object: {"operators": [...]}')
    p.set_defaults(func=cmd_list_operators)

    p = sub.add_parser("disable-operator", help="disable an operator (signed out on their next rerun)")
    p.add_argument("name")
    _by(p)
    p.set_defaults(func=cmd_disable)

    p = sub.add_parser("enable-operator", help="enable a disabled operator again")
    p.add_argument("name")
    _by(p)
    p.set_defaults(func=cmd_enable)

    p = sub.add_parser("reset-password", help="set a new password for an operator")
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password as one line from stdin (also the default when stdin is not a terminal)")
    _by(p)
    p.set_defaults(func=cmd_reset_password)

    p = sub.add_parser("set-role", help="make an operator admin or support")
    p.add_argument("name")
    p.add_argument("role", choices=("admin", "support"))
    _by(p)
    p.set_defaults(func=cmd_set_role)
