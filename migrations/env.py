"""Alembic environment for the catalog (DuckDB through duckdb-engine).

DuckDB needs its own alembic impl (else ``KeyError: 'duckdb'``); its DDL is transactional, so a
failed migration rolls back whole. The project runs migrations programmatically
(``catalog.db.Catalog`` runs ``upgrade head``), passing its open connection in ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context
from alembic.ddl.impl import DefaultImpl
from sqlalchemy import create_engine


class AlembicDuckDBImpl(DefaultImpl):
    __dialect__ = "duckdb"
    transactional_ddl = True


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
        with engine.connect() as conn:
            context.configure(connection=conn, target_metadata=None)
            with context.begin_transaction():
                context.run_migrations()
        engine.dispose()
        return
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
