"""Core statements compiled once and, on SQLite, run straight on the driver's connection.

A spend is seven short statements; SQLAlchemy's execution path (compiled-cache lookup, parameter
construction, events, result set-up) cost about three times what SQLite itself spends on them.
`Prepared` compiles its statement once per dialect and set of parameter names, keeps the bind and
result processors SQLAlchemy would apply (datetimes as SQLite stores them, booleans), and runs the
SQL on the DBAPI connection of the caller's transaction. Driver errors are raised as SQLAlchemy's own
exception types, so callers handle them as before. On PostgreSQL it simply executes the statement.
SELECTs and DML with RETURNING give rows (`rows`, `first`, `scalar`); other DML gives its row count (`run`) or
the new row's id (`insert`). An IN over a fixed list is bound value by value on the lean path, since
SQLAlchemy would finish it only as it executes.

When the engine has `before_cursor_execute` listeners (statement counters in tests) or echoes its SQL, the
statement takes SQLAlchemy's usual path, so nothing run here is hidden from them.
"""
from __future__ import annotations

import sqlite3
from collections import namedtuple

from sqlalchemy import exc as sa_exc
from sqlalchemy import Boolean, literal, literal_column
from sqlalchemy.engine import Connection
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, ColumnElement


def _lean(conn: Connection) -> bool:
    return conn.dialect.name == "sqlite" and not conn._echo and not conn.dispatch.before_cursor_execute


def literal_in(column, values) -> ColumnElement[bool]:
    """`column IN ('a', 'b')` written into the SQL: a statement compiled once keeps it as it is, where an IN over
    bound values is finished anew on every execution by SQLAlchemy's own path (PostgreSQL's here)."""
    quoted = ", ".join("'" + str(value).replace("'", "''") + "'" for value in values)
    return literal_column(f"{column.table.name}.{column.name} IN ({quoted})", type_=Boolean)


def _in_lists_bound_apart(statement):
    """`statement` with each IN over a fixed list (`status IN ('paid', ...)`) bound value by value: SQLAlchemy
    finishes such an IN only as it executes, and the lean path runs the SQL as compiled once."""
    def bound_apart(element):
        if (isinstance(element, BinaryExpression) and element.operator is operators.in_op
                and isinstance(element.right, BindParameter) and element.right.expanding
                and element.right.callable is None and element.right.value is not None):
            return element.left.in_([literal(value, element.left.type) for value in element.right.value])
        return None

    return visitors.replacement_traverse(statement, {}, bound_apart)


class _SqliteForm:
    """The statement compiled for SQLite with one set of parameter names."""

    def __init__(self, statement, dialect, keys: tuple[str, ...]):
        compiled = statement.compile(dialect=dialect, column_keys=list(keys) if statement.is_insert else None)
        self.sql = compiled.string
        # A column left out that has a Python-side default (or onupdate) needs SQLAlchemy to compute it: such a
        # form runs on SQLAlchemy's path, so it stores what SQLAlchemy would.
        self.lean = not (compiled.insert_prefetch or compiled.update_prefetch)
        processors = compiled._bind_processors
        # (parameter name or None for a value fixed in the statement, fixed value, processor)
        self.binds = []
        for name in compiled.positiontup:
            bind = compiled.binds[name]
            fixed = name not in keys  # a literal of the statement (e.g. a CASE's values)
            if fixed and bind.required and self.lean:  # as SQLAlchemy: never bind a missing parameter as NULL
                raise sa_exc.InvalidRequestError(f"A value is required for bind parameter {name!r}")
            self.binds.append((None if fixed else name, bind.effective_value if fixed else None,
                               processors.get(name)))
        self.is_select = statement.is_select
        self.returns_rows = statement.is_select or bool(getattr(statement, "_returning", ()))
        if self.returns_rows:
            columns = list(statement.selected_columns if statement.is_select else statement.exported_columns)
            self.row_type = namedtuple("Row", [column.key or f"c{n}" for n, column in enumerate(columns)],
                                       rename=True)
            self.results = [(n, column.type._cached_result_processor(dialect, None))
                            for n, column in enumerate(columns)]
            self.results = [(n, process) for n, process in self.results if process is not None]

    def parameters(self, params: dict) -> tuple:
        values = []
        for name, fixed, process in self.binds:
            value = fixed if name is None else params[name]
            values.append(process(value) if process is not None else value)
        return tuple(values)

    def rows(self, cursor) -> list:
        found = []
        for raw in cursor.fetchall():
            if self.results:
                raw = list(raw)
                for n, process in self.results:
                    raw[n] = process(raw[n])
            found.append(self.row_type(*raw))
        return found


class Prepared:
    def __init__(self, statement):
        self.statement = statement
        self._lean_statement = _in_lists_bound_apart(statement)
        self._forms: dict[tuple, _SqliteForm] = {}

    def _form(self, conn: Connection, params: dict) -> _SqliteForm:
        keys = tuple(params)
        found = self._forms.get(keys)
        if found is None:
            found = self._forms[keys] = _SqliteForm(self._lean_statement, conn.dialect, keys)
        return found

    def _lean_form(self, conn: Connection, params: dict) -> _SqliteForm | None:
        """The compiled form to run on the driver, or None for SQLAlchemy's own path."""
        if not _lean(conn):
            return None
        form = self._form(conn, params)
        return form if form.lean else None

    def _run(self, form: _SqliteForm, conn: Connection, params: dict):
        values = form.parameters(params)
        try:
            cursor = conn.connection.dbapi_connection.execute(form.sql, values)
        except sqlite3.Error as error:
            raise sa_exc.DBAPIError.instance(form.sql, values, error, sqlite3.Error) from error
        return cursor

    def rows(self, conn: Connection, params: dict) -> list:
        """Every row of a SELECT, or of a DML statement's RETURNING (attribute and index access)."""
        form = self._lean_form(conn, params)
        if form is None:
            return conn.execute(self.statement, params).all()
        return form.rows(self._run(form, conn, params))

    def first(self, conn: Connection, params: dict):
        found = self.rows(conn, params)
        return found[0] if found else None

    def scalar(self, conn: Connection, params: dict):
        """The first column of the first row; None when there is no row."""
        found = self.first(conn, params)
        return None if found is None else found[0]

    def run(self, conn: Connection, params: dict) -> int:
        """An INSERT, UPDATE or DELETE without RETURNING; how many rows it changed."""
        form = self._lean_form(conn, params)
        if form is None:
            return conn.execute(self.statement, params).rowcount
        return self._run(form, conn, params).rowcount

    def insert(self, conn: Connection, params: dict) -> int:
        """An INSERT of one row without RETURNING; the new row's integer primary key."""
        form = self._lean_form(conn, params)
        if form is None:
            return conn.execute(self.statement, params).inserted_primary_key[0]
        return self._run(form, conn, params).lastrowid
