"""What PostgreSQL tools ask of a server's catalog, answered by DuckDB's own pg_catalog.

DuckDB has pg_catalog views (pg_class, pg_namespace, pg_type, pg_attribute, ...) and most of
the functions tools call; the few it lacks are macros in each sandbox database, and the
spellings of psql that DuckDB cannot parse are rewritten before a statement runs. DuckDB
finds the pg_catalog schema without its qualifier, so qualified function names (which it
would look for in pg_catalog, where no macro can be created) lose it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib.metadata import version

import duckdb

SERVER_VERSION = "14.0"
USER = "lambdalake"
# DuckDB's version() answers "v2.0.1"; drivers (SQLAlchemy's) read PostgreSQL's version
# out of `version()`, so it answers as PostgreSQL does, naming what really answers.
_MACROS = {  # name: its overloads, `(parameters) AS body, ...`
    "version": f"() AS 'PostgreSQL {SERVER_VERSION} (lambdalake {version('lambdalake')}, "
               f"DuckDB {duckdb.__version__})'",
    "pg_get_userbyid": f"(role_oid) AS '{USER}'",
    "pg_encoding_to_char": "(encoding) AS 'UTF8'",
    "pg_get_indexdef": "(index_oid) AS NULL::VARCHAR, "
                       "(index_oid, column_number, pretty) AS NULL::VARCHAR",
    "pg_get_expr": "(expression, relation_oid) AS expression, "
                   "(expression, relation_oid, pretty) AS expression",
    "pg_get_statisticsobjdef_columns": "(statistics_oid) AS NULL::VARCHAR",
    "pg_relation_is_publishable": "(relation_oid) AS false",
    "pg_backend_pid": "() AS 0",
    "pg_is_in_recovery": "() AS false",
    "pg_total_relation_size": "(relation_oid) AS NULL::BIGINT",
    "pg_table_size": "(relation_oid) AS NULL::BIGINT",
    "pg_relation_size": "(relation_oid) AS NULL::BIGINT",
    "pg_get_function_result": "(function_oid) AS NULL::VARCHAR",
    "pg_get_function_arguments": "(function_oid) AS NULL::VARCHAR",
    "pg_function_is_visible": "(function_oid) AS true",
}

def _empty(columns: str) -> str:
    return f"SELECT {columns} WHERE false"


# Catalog relations as psql and drivers read them: DuckDB's with the columns it lacks, and
# the relations it has not (no policies, triggers, inheritance, publications here) empty.
_RELATIONS = {
    "pg_class": "SELECT *, false AS relforcerowsecurity FROM pg_catalog.pg_class",
    "pg_database": "SELECT *, 6 AS encoding, 'C' AS datcollate, 'C' AS datctype, "
                   "10 AS datdba, NULL::VARCHAR AS datacl, -1 AS datconnlimit, "
                   "0 AS dattablespace, 'c' AS datlocprovider, NULL::VARCHAR AS daticulocale "
                   "FROM pg_catalog.pg_database",
    "pg_roles": f"SELECT 10 AS oid, '{USER}' AS rolname, false AS rolsuper, "
                "false AS rolinherit, false AS rolcreaterole, false AS rolcreatedb, "
                "true AS rolcanlogin, false AS rolreplication, false AS rolbypassrls, "
                "-1 AS rolconnlimit, NULL::TIMESTAMPTZ AS rolvaliduntil, "
                "NULL::VARCHAR[] AS rolconfig",
    "pg_inherits": _empty("0 AS inhrelid, 0 AS inhparent, 0 AS inhseqno, "
                          "false AS inhdetachpending"),
    "pg_policy": _empty("0 AS oid, ''::VARCHAR AS polname, 0 AS polrelid, ''::VARCHAR AS polcmd, "
                        "true AS polpermissive, []::BIGINT[] AS polroles, "
                        "''::VARCHAR AS polqual, ''::VARCHAR AS polwithcheck"),
    "pg_statistic_ext": _empty("0 AS oid, 0 AS stxrelid, ''::VARCHAR AS stxname, "
                               "0 AS stxnamespace, 0 AS stxowner, -1 AS stxstattarget, "
                               "[]::INTEGER[] AS stxkeys, []::VARCHAR[] AS stxkind, "
                               "''::VARCHAR AS stxexprs"),
    "pg_publication": _empty("0 AS oid, ''::VARCHAR AS pubname, false AS puballtables, "
                             "false AS pubinsert, false AS pubupdate, false AS pubdelete, "
                             "false AS pubtruncate, false AS pubviaroot"),
    "pg_publication_rel": _empty("0 AS oid, 0 AS prpubid, 0 AS prrelid, "
                                 "''::VARCHAR AS prqual, []::INTEGER[] AS prattrs"),
    "pg_publication_namespace": _empty("0 AS oid, 0 AS pnpubid, 0 AS pnnspid"),
    "pg_trigger": _empty("0 AS oid, 0 AS tgrelid, 0 AS tgparentid, ''::VARCHAR AS tgname, "
                         "''::VARCHAR AS tgenabled, false AS tgisinternal, 0 AS tgfoid"),
    "pg_partitioned_table": _empty("0 AS partrelid, ''::VARCHAR AS partstrat"),
    "pg_foreign_table": _empty("0 AS ftrelid, 0 AS ftserver, []::VARCHAR[] AS ftoptions"),
    "pg_extension": _empty("0 AS oid, ''::VARCHAR AS extname, 0 AS extnamespace, "
                           "''::VARCHAR AS extversion"),
}
_RELATION = re.compile(
    r"\b(FROM|JOIN|,)(\s+)(?:pg_catalog\s*\.\s*)?(" + "|".join(_RELATIONS) + r")\b(?!\s*\()",
    re.IGNORECASE)
_REWRITES: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    (_RELATION, lambda match: f"{match[1]}{match[2]}({_RELATIONS[match[3].lower()]})"),
    (re.compile(r"::\s*(?:pg_catalog\s*\.\s*)?reg\w+", re.IGNORECASE), "::VARCHAR"),
    (re.compile(r"::\s*pg_catalog\s*\.\s*", re.IGNORECASE), "::"),
    (re.compile(r"\bOPERATOR\s*\(\s*pg_catalog\s*\.\s*([~!*<>=]+)\s*\)", re.IGNORECASE), r"\1"),
    (re.compile(r"\s+COLLATE\s+pg_catalog\s*\.\s*\"?default\"?", re.IGNORECASE), ""),
    (re.compile(r"\bpg_catalog\s*\.\s*(?=\w+\s*\()", re.IGNORECASE), ""),
]


def register_postgres_functions(database: duckdb.DuckDBPyConnection) -> None:
    for name, overloads in _MACROS.items():
        database.execute(f"CREATE MACRO {name}{overloads}")


def postgres_spelling(sql: str) -> str:
    """A statement as DuckDB parses it: psql's operator and collation spellings plain, and
    functions unqualified."""
    for pattern, replacement in _REWRITES:
        sql = pattern.sub(replacement, sql)
    return sql
