"""The store reflects the app's mapped tables before its first transaction (``Store._reflect_mapped``): a writer's
pipelined path otherwise reflected mid-transaction on a second connection, which deadlocked a pool of two server
connections behind PgBouncer (tests/test_pgbouncer.py). ``SchemaMapping.pipelines`` swallows a failed reflection,
and the store marked itself done all the same: with the database down at first use, the reflection came back
mid-transaction once the database did. Now it is tried again before the next transaction."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.engine import Entity
from clerk_sync.errors import StoreError
from clerk_sync.mapping import migrate_schema
from clerk_sync.store import Store, create_engine
from tests._pgbouncer_app import mapping, meta
from tests._proxy import TcpProxy
from tests._server import free_port
from tests.conftest import pg_schema

pytestmark = pytest.mark.postgres


def test_a_reflection_that_failed_is_tried_again_before_the_next_transaction() -> None:
    with pg_schema("refl_") as url:
        setup = create_engine(url)
        migrations.upgrade(setup)
        meta.create_all(setup)
        with setup.begin() as conn:
            migrate_schema(conn, mapping(), unique_indexes=False)
        setup.dispose()
        direct = sa.make_url(url)
        proxy = TcpProxy((direct.host or "127.0.0.1", direct.port or 5432))
        store = Store(create_engine(direct.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False)), mapping=mapping())
        try:
            with store.engine.connect() as conn:  # a first read (readiness, doctor): the pool keeps its connection
                conn.exec_driver_sql("SELECT 1")
            up, proxy.target = proxy.target, ("127.0.0.1", free_port())  # the database goes down: new connections
            proxy.cut()  # refused, the pooled one gone
            with pytest.raises(StoreError), store.transaction() as writer:
                writer.conn.exec_driver_sql("SELECT 1")
            proxy.target = up
            checkouts: list[object] = []
            sa.event.listen(store.engine, "checkout", lambda *args: checkouts.append(args))
            with store.transaction() as writer:
                checkouts.clear()
                store.mapping.pipelines(writer.conn, Entity.USER)  # (what the pipelined writer asks first)
                assert checkouts == [], "the mapped table reflected mid-transaction, on a second connection"
        finally:
            store.engine.dispose()
            proxy.close()
