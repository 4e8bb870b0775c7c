"""The server-side backstop in docs/operations.md works as written, on the real PostgreSQL."""

from __future__ import annotations

import re
import secrets

import psycopg
import pytest
from psycopg import errors

from tests.conftest import REPO

pytestmark = pytest.mark.postgres


def backstop_sql() -> str:
    text = (REPO / "docs" / "operations.md").read_text()
    match = re.search(r"```sql\n-- file: backstop.sql\n(.*?)```", text, re.S)
    assert match, "docs/operations.md has no backstop.sql block"
    return match.group(1)


def test_backstop_block_stops_ddl_and_deletes_from_the_app_role() -> None:
    try:
        admin = psycopg.connect(
            host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True, connect_timeout=3
        )
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL is not reachable on 127.0.0.1:5432 ({exc})")
    suffix = secrets.token_hex(3)
    db, role = f"sluice_backstop_{suffix}", f"billing{suffix}_app"
    with admin:
        admin.execute(f'CREATE DATABASE "{db}"')
        try:
            sql = (
                backstop_sql()
                .replace("billing_app", role)
                .replace("DATABASE orders", f'DATABASE "{db}"')
            )
            with psycopg.connect(
                host="127.0.0.1", user="postgres", dbname=db, autocommit=True
            ) as owner:
                owner.execute("CREATE TABLE orders (id int primary key, total int)")
                owner.execute(sql)
                # Even with the privilege to create tables, the event trigger stops DDL.
                owner.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
            with psycopg.connect(host="127.0.0.1", user=role, dbname=db, autocommit=True) as app:
                app.execute("INSERT INTO orders VALUES (1, 10)")
                app.execute("UPDATE orders SET total = 11 WHERE id = 1")
                with pytest.raises(errors.InsufficientPrivilege):
                    app.execute("DELETE FROM orders")
                with pytest.raises(
                    errors.InsufficientPrivilege, match=r"DDL \(CREATE TABLE\) is not allowed"
                ):
                    app.execute("CREATE TABLE sneaky (x int)")
                with pytest.raises(errors.InsufficientPrivilege):
                    app.execute("DROP TABLE orders")
                with pytest.raises(errors.InsufficientPrivilege):
                    app.execute("TRUNCATE orders")
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')
