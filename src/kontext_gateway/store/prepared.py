"""Core statements run straight on the sqlite3 driver: compiled once, converted by their own column types.

`Connection.execute` builds an execution context, a cursor wrapper and a result object for every
statement; for the job's single-row statements on a SQLite file that machinery was some 40 % of the
CPU their transactions cost. A `PreparedStatement` keeps what SQLAlchemy does that matters here, and keeps it
SQLAlchemy's: the SQL (compiled once per set of parameter names), each value's conversion (the column
type's own bind and result processors, so JSON, datetimes and booleans are stored and read exactly as
through `execute`), and errors (wrapped as SQLAlchemy's, `IntegrityError` and the rest). It leaves out
the per-execution events (none are listened to on these statements) and statement logging (`echo`).

On any other connection (PostgreSQL, the async engine's aiosqlite one) it is `Connection.execute`; so is
a statement that needs what only an execution context does (Python-side column defaults or onupdate
values to compute, values made per execution, expanding IN parameters).
"""

from __future__ import annotations

import sqlite3
import weakref
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Connection, Insert, Select, Update, exc
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler

Params = Mapping[str, Any]
_Processor = Callable[[Any], Any] | None
Statement = Insert | Update | Select[Any]


class _OnDriver:
    """One statement compiled for one dialect and one set of parameter names."""

    def __init__(self, statement: Statement, compiled: SQLCompiler, dialect: Dialect) -> None:
        self.sql = compiled.string
        self.dialect = dialect
        # For each `?` in turn: the parameter it reads (or the value bound in the statement) and the
        # column type's conversion to what the driver stores.
        self.binds: list[tuple[str, Any, _Processor]] = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            fixed = _REQUIRED if bind.required else bind.effective_value
            self.binds.append((name, fixed, bind.type.dialect_impl(dialect).bind_processor(dialect)))
        columns = list(statement.exported_columns)  # RETURNING's, or a SELECT's
        self.column_processors: list[_Processor] = [
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
        ]
        self.row: Any = namedtuple("Row", [c.key for c in columns]) if columns else None  # type: ignore[misc]

    def values(self, params: Params) -> tuple[Any, ...]:
        out = []
        for name, fixed, process in self.binds:
            value = params.get(name, fixed)
            if value is _REQUIRED:
                raise exc.InvalidRequestError(f"A value is required for bind parameter {name!r}")
            out.append(value if process is None else process(value))
        return tuple(out)

    def run(self, driver: sqlite3.Connection, conn: Connection, params: Params | Sequence[Params]) -> list[Any]:
        """The rows it returns (none for a plain INSERT or UPDATE), converted; every row is fetched, so
        the statement is done before the transaction commits."""
        try:
            values = self.values(params) if isinstance(params, Mapping) else [self.values(p) for p in params]
        except Exception as error:  # a conversion refused a value (a naive datetime...): as `execute` says it
            message = f"({type(error).__module__}.{type(error).__name__}) {error}"
            raise exc.StatementError(message, self.sql, None, error, hide_parameters=True) from error
        cursor = driver.cursor()
        try:
            if isinstance(values, tuple):
                cursor.execute(self.sql, values)
            else:
                cursor.executemany(self.sql, values)
            fetched = cursor.fetchall() if self.row is not None else []
        except sqlite3.Error as error:
            raise self._wrapped(error, driver, cursor, conn) from error
        finally:
            cursor.close()
        return [self._converted(r) for r in fetched]

    def _converted(self, raw: tuple[Any, ...]) -> Any:
        assert self.row is not None
        return self.row._make(v if p is None else p(v) for p, v in zip(self.column_processors, raw, strict=True))

    def _wrapped(self, error: sqlite3.Error, driver: sqlite3.Connection, cursor: Any, conn: Connection) -> Exception:
        """The driver's error as SQLAlchemy raises it (parameters hidden: prompts and URLs stay out of
        logs); a connection the error shows broken is invalidated, as `execute` would."""
        invalidated = self.dialect.is_disconnect(cast(Any, error), cast(Any, driver), cursor)
        wrapped = exc.DBAPIError.instance(
            self.sql, None, error, sqlite3.Error, hide_parameters=True, connection_invalidated=invalidated
        )
        if invalidated:
            conn.invalidate(wrapped)
        return wrapped


class PreparedStatement:
    """A Core INSERT, UPDATE or SELECT, run on the sqlite3 driver when the connection is one, else with
    `Connection.execute`. For INSERT and UPDATE the parameters' names choose the columns, as with
    `execute`; the SQL for each set of names is compiled at its first use."""

    def __init__(self, statement: Statement) -> None:
        self.statement = statement
        self._compiled: weakref.WeakKeyDictionary[Dialect, dict[tuple[str, ...], _OnDriver | None]] = (
            weakref.WeakKeyDictionary()
        )

    def execute(self, conn: Connection, params: Params | Sequence[Params]) -> None:
        on_driver = self._on_driver(conn, params)
        if on_driver is None:
            conn.execute(self.statement, params)
        else:
            on_driver[0].run(on_driver[1], conn, params)

    def first(self, conn: Connection, params: Params) -> Any:
        """The first row it returns (read by column name, as attributes), or None."""
        on_driver = self._on_driver(conn, params)
        if on_driver is None:
            return conn.execute(self.statement, params).first()
        rows = on_driver[0].run(on_driver[1], conn, params)
        return rows[0] if rows else None

    def scalar_one(self, conn: Connection, params: Params) -> Any:
        """The one value of the one row it returns (NoResultFound / MultipleResultsFound otherwise)."""
        on_driver = self._on_driver(conn, params)
        if on_driver is None:
            return conn.execute(self.statement, params).scalar_one()
        rows = on_driver[0].run(on_driver[1], conn, params)
        if len(rows) != 1:
            raise exc.NoResultFound("No row was found") if not rows else exc.MultipleResultsFound("More than one row")
        return rows[0][0]

    def _on_driver(
        self, conn: Connection, params: Params | Sequence[Params]
    ) -> tuple[_OnDriver, sqlite3.Connection] | None:
        driver = cast(Any, conn.connection.dbapi_connection)
        if type(driver) is not sqlite3.Connection:
            return None
        first = params if isinstance(params, Mapping) else params[0]
        names = tuple(first)  # one order per call site: a handful of entries
        dialect = conn.dialect
        by_names = self._compiled.setdefault(dialect, {})
        if names not in by_names:
            by_names[names] = _compile(self.statement, dialect, names)
        on_driver = by_names[names]
        return None if on_driver is None else (on_driver, driver)


def _compile(statement: Statement, dialect: Dialect, names: tuple[str, ...]) -> _OnDriver | None:
    """The statement compiled for these parameter names, or None where only `execute` runs it right."""
    compiled = statement.compile(dialect=dialect, column_keys=list(names))
    assert isinstance(compiled, SQLCompiler)
    if compiled.positiontup is None:  # a named paramstyle: not the sqlite3 module's default
        return None
    if compiled.insert_prefetch or compiled.update_prefetch:  # Python-side defaults to compute
        return None
    if any(b.expanding or b.literal_execute or b.callable is not None for b in compiled.binds.values()):
        return None  # values made per execution or rendered into the SQL
    return _OnDriver(statement, compiled, dialect)


_REQUIRED = object()  # a bind parameter with no value of its own: the caller must pass one
