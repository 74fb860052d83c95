"""The PostgreSQL the tests run against is real: version 16, isolated databases, stops and crashes that recover."""

from __future__ import annotations

import psycopg
import pytest

from support.postgres import PostgresServer


def test_server_is_postgresql_16(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        row = conn.execute("SELECT version(), current_setting('fsync')").fetchone()
    assert row is not None
    version, fsync = row
    assert version.startswith("PostgreSQL 16.")
    assert fsync == "on"  # durability in the tests is the real thing


def test_each_test_database_is_isolated(postgres_server: PostgresServer, postgres_dsn: str) -> None:
    other = postgres_server.create_database("launcher_other")
    try:
        with psycopg.connect(postgres_dsn) as conn:
            conn.execute("CREATE TABLE only_here (id int)")
        with psycopg.connect(other) as conn:
            row = conn.execute("SELECT to_regclass('only_here')").fetchone()
        assert row == (None,)
    finally:
        with psycopg.connect(postgres_server.dsn(), autocommit=True) as conn:
            conn.execute("DROP DATABASE launcher_other WITH (FORCE)")


def test_stop_refuses_connections_and_restart_brings_the_same_dsn_back(private_postgres: PostgresServer) -> None:
    dsn = private_postgres.create_database("app")
    private_postgres.stop()
    assert not private_postgres.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)

    private_postgres.restart()
    assert private_postgres.running
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("app",)


def test_kill_then_restart_keeps_committed_rows(private_postgres: PostgresServer) -> None:
    dsn = private_postgres.create_database("app")
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE spool (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO spool VALUES (1, 'committed')")
    # Left open on purpose: a transaction the crash interrupts must vanish.
    uncommitted = psycopg.connect(dsn)
    uncommitted.execute("INSERT INTO spool VALUES (2, 'never committed')")

    private_postgres.kill()
    assert not private_postgres.running
    uncommitted.close()
    private_postgres.restart()

    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT id, body FROM spool ORDER BY id").fetchall() == [(1, "committed")]
    assert "automatic recovery in progress" in private_postgres.log_path.read_text()
