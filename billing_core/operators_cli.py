"""`python -m billing_core add-operator NAME --role admin|support [--password-stdin]`."""
from __future__ import annotations

import getpass
import sys

from . import db
from .operators import OperatorError, check_name, check_password, check_role, create_operator
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
        create_operator(session, name=name, role=role, password=password)
    print(f"operator {name} ({role}) added to {mask_url_password(url)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("add-operator", help="create a dashboard operator account")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=("admin", "support"))
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password as one line from stdin (also the default when stdin is not a terminal)")
    p.set_defaults(func=cmd_add_operator)
