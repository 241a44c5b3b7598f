"""Alembic environment.

The gateway runs migrations in-process (see `kontext_gateway.store.migrate`) and hands its connection
over in `config.attributes["connection"]`; the `alembic -c store/alembic.ini ...` CLI path builds its
own engine from `sqlalchemy.url` or, when that is unset, the gateway's settings.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from kontext_gateway.store.models import Base

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name)  # CLI only: leave the gateway's logging alone


def _url() -> str:
    # sqlalchemy.url from the ini file wins; either way the gateway picks the async driver.
    from kontext_gateway.config import Settings

    url = config.get_main_option("sqlalchemy.url")
    return (Settings(database_url=url) if url else Settings()).resolved_database_url()


def do_run_migrations(connection: Connection) -> None:
    # Batch mode lets future ALTERs work on SQLite, which can only rebuild tables.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    # Same engine settings and lock as the gateway's own start-up migration.
    from kontext_gateway.store.engine import make_engine
    from kontext_gateway.store.migrate import migration_transaction

    engine = make_engine(_url())
    try:
        async with migration_transaction(engine) as conn:
            await conn.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=_url().startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
elif (connection := config.attributes.get("connection")) is not None:
    do_run_migrations(connection)
else:
    asyncio.run(run_async_migrations())
