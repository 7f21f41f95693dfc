"""What PostgreSQL tools ask of a server's catalog, answered by DuckDB's own pg_catalog.

DuckDB has pg_catalog views (pg_class, pg_namespace, pg_type, pg_attribute, ...) and most of
the functions tools call; the few it lacks are macros in each sandbox database, and the
spellings of psql that DuckDB cannot parse are rewritten before a statement runs. DuckDB
finds the pg_catalog schema without its qualifier, so qualified function names (which it
would look for in pg_catalog, where no macro can be created) lose it.
"""

from __future__ import annotations

import re
from importlib.metadata import version

import duckdb

SERVER_VERSION = "14.0"
USER = "lambdalake"
# DuckDB's version() answers "v2.0.1"; drivers (SQLAlchemy's) read PostgreSQL's version
# out of `version()`, so it answers as PostgreSQL does, naming what really answers.
_MACROS = {
    "version()": f"'PostgreSQL {SERVER_VERSION} (lambdalake {version('lambdalake')}, "
                 f"DuckDB {duckdb.__version__})'",
    "pg_get_userbyid(role_oid)": f"'{USER}'",
    "pg_encoding_to_char(encoding)": "'UTF8'",
    "pg_get_indexdef(index_oid)": "NULL::VARCHAR",
    "pg_backend_pid()": "0",
    "pg_is_in_recovery()": "false",
    "pg_total_relation_size(relation_oid)": "NULL::BIGINT",
}
_REWRITES = [
    (re.compile(r"\bOPERATOR\s*\(\s*pg_catalog\s*\.\s*([~!*<>=]+)\s*\)", re.IGNORECASE), r"\1"),
    (re.compile(r"\s+COLLATE\s+pg_catalog\s*\.\s*\"?default\"?", re.IGNORECASE), ""),
    (re.compile(r"\bpg_catalog\s*\.\s*(?=\w+\s*\()", re.IGNORECASE), ""),
]


def register_postgres_functions(database: duckdb.DuckDBPyConnection) -> None:
    for signature, body in _MACROS.items():
        database.execute(f"CREATE MACRO {signature} AS {body}")


def postgres_spelling(sql: str) -> str:
    """A statement as DuckDB parses it: psql's operator and collation spellings plain, and
    functions unqualified."""
    for pattern, replacement in _REWRITES:
        sql = pattern.sub(replacement, sql)
    return sql
