"""The config CLI as a user runs it: a subprocess per command, against a real database.

Every output of the whole flow (stdout and stderr) is kept and grepped at the
end for the secrets given to it: no command may ever print one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

FIXTURE = Path(__file__).parent.parent / "fixtures" / "sequin.yaml"


class Cli:
    """Runs `python -m pgsink.cli ... --database-url DSN`, recording every output."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.outputs: list[str] = []

    def __call__(self, *args: str, code: int = 0, env: dict[str, str] | None = None,
                 stdin: str | None = None) -> str:
        res = subprocess.run([sys.executable, "-m", "pgsink.cli", *args, "--database-url", self.dsn],
                             capture_output=True, text=True, input=stdin, timeout=120,
                             env={**os.environ, **(env or {})})
        self.outputs += [res.stdout, res.stderr]
        both = res.stdout + res.stderr
        assert res.returncode == code, f"pgsink {' '.join(args)} exited {res.returncode}:\n{both}"
        return " ".join(both.split())  # rich wraps long lines: compare on single spaces


def db_rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query.encode()).fetchall()


@pytest.fixture
def cli(fresh_db: str) -> Cli:
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("create table public.orders (id int primary key, total int)")
        conn.execute("create table public.order_items (id int primary key, order_id int)")
        conn.execute("create table public.users (id int primary key, email text)")
        conn.execute("create table public.events (payload text)")
    return Cli(fresh_db)


def test_cli_objects_flow_and_secrets_never_printed(cli: Cli, tmp_path: Path) -> None:
    p = conninfo_to_dict(cli.dsn)
    password, token, token2 = (f"{k}-{uuid.uuid4().hex}" for k in ("pw", "tok", "tok2"))
    url = f"postgresql://{p.get('user', 'postgres')}:{password}@{p.get('host', '127.0.0.1')}:{p.get('port', 5432)}/{p['dbname']}"
    slot = f"cli_{uuid.uuid4().hex[:8]}"

    # sources
    out = cli("source", "add", "app", "--url", url, "--slot", slot, "--publication", "cli_pub",
              "--create-slot", "--create-publication", "--retention", "2 days", "--annotation", "team=core")
    assert "Created source app." in out
    assert db_rows(cli.dsn, f"select plugin from pg_replication_slots where slot_name = '{slot}'") == [("pgoutput",)]
    out = cli("source", "add", "app", "--url", url, "--slot", slot, "--publication", "cli_pub", code=1)
    assert "source 'app' already exists" in out
    out = cli("source", "add", "nopub", "--url", url, "--slot", "other_slot", "--publication", "missing_pub", code=1)
    assert "Publication 'missing_pub' does not exist" in out and "--create-publication" in out
    assert "Replication slot 'other_slot' does not exist" in out
    out = cli("source", "list")
    assert "app" in out and f"{slot}" in out and "2 days" in out and "nopub" not in out
    out = cli("source", "show", "app")
    assert "(set, encrypted)" in out and "Source checks passed." in out
    assert "public.events" in out and "lack REPLICA IDENTITY FULL" in out and "have no primary key: public.events" in out

    # endpoints
    out = cli("endpoint", "add", "hook", "--url", "http://127.0.0.1:9/hooks", "--header", "X-Team=core",
              "--encrypted-header", f"Authorization=Bearer {token}")
    assert "Created endpoint hook." in out
    out = cli("endpoint", "add", "hook2", "--url", "http://127.0.0.1:9/other",
              "--encrypted-header-env", "X-Api-Key=PGSINK_TEST_TOKEN2", env={"PGSINK_TEST_TOKEN2": token2})
    out = cli("endpoint", "list")
    assert "hook" in out and "X-Team" in out and "Authorization" in out and "X-Api-Key" in out
    out = cli("endpoint", "show", "hook")
    assert "header X-Team │ core" in out and "header Authorization │ (encrypted)" in out
    out = cli("endpoint", "add", "bad", "--url", "ftp://nope", code=1)
    assert "is not an http:// or https:// URL" in out

    # sinks
    out = cli("sink", "create", "orders", "--source", "app", "--endpoint", "hook", "--path", "/orders",
              "--table", "public.orders", "--table", "public.order_items", "--batch-size", "10",
              "--group-columns", "public.order_items=order_id", "--lane-count", "8", "--action", "insert",
              "--action", "update")
    assert "Created sink orders." in out and "lack REPLICA IDENTITY FULL" in out
    assert db_rows(cli.dsn, "select count(*) from pgsink.lanes l join pgsink.sinks s on s.id = l.sink_id"
                            " where s.name = 'orders'") == [(8,)]
    out = cli("sink", "create", "ghost", "--source", "app", "--endpoint", "hook", "--table", "public.nope", code=1)
    assert "Table public.nope does not exist" in out
    out = cli("sink", "create", "ghost", "--source", "nosuch", "--endpoint", "hook", code=1)
    assert "database 'nosuch' is neither in this file nor in pgsink" in out
    out = cli("sink", "create", "bad", "--source", "app", "--endpoint", "hook", "--no-batch", "--batch-size", "5", code=1)
    assert "destination.batch is false" in out
    out = cli("sink", "list")
    assert "orders" in out and "/orders" in out and "public.orders, public.order_items" in out and "ghost" not in out
    out = cli("sink", "show", "orders")
    assert "insert, update" in out and "public.order_items grouped by order_id" in out and "lanes │ 8" in out

    assert "Sink orders paused." in cli("sink", "pause", "orders")
    assert db_rows(cli.dsn, "select status from pgsink.sinks where name = 'orders'") == [("paused",)]
    assert "already paused" in cli("sink", "pause", "orders")
    assert "Sink orders resumed." in cli("sink", "resume", "orders")
    assert db_rows(cli.dsn, "select status from pgsink.sinks where name = 'orders'") == [("active",)]

    # removing what sinks use is refused, naming the sinks
    out = cli("endpoint", "remove", "hook", code=1)
    assert "Cannot remove endpoint 'hook': sink orders uses it" in out
    out = cli("source", "remove", "app", code=1)
    assert "Cannot remove source 'app': sink orders uses it" in out

    # export -> plan is a no-op (given the placeholders' values) -> edited apply
    exported = tmp_path / "export.yaml"
    cli("config", "export", "--output", str(exported))
    text = exported.read_text()
    assert "${PGSINK_DB_APP_PASSWORD}" in text and "${PGSINK_ENDPOINT_HOOK_AUTHORIZATION}" in text
    secrets_env = {"PGSINK_DB_APP_PASSWORD": password, "PGSINK_ENDPOINT_HOOK_AUTHORIZATION": f"Bearer {token}",
                   "PGSINK_ENDPOINT_HOOK2_X_API_KEY": token2}
    assert "No changes" in cli("config", "plan", str(exported), env=secrets_env)
    out = cli("config", "plan", str(exported), code=1)
    assert "PGSINK_DB_APP_PASSWORD is not set" in out
    edited = tmp_path / "edited.yaml"
    edited.write_text(text.replace("batch_size: 10", "batch_size: 20"))
    out = cli("config", "plan", str(edited), "--exit-code", env=secrets_env, code=2)
    assert "~ update sink orders batch_size: 10 -> 20" in out
    out = cli("config", "apply", str(edited), env={**secrets_env, "PGSINK_ENDPOINT_HOOK_AUTHORIZATION": "Bearer x"})
    assert "~ update endpoint hook encrypted_headers: Authorization (changed)" in out and "Applied." in out
    assert db_rows(cli.dsn, "select batch_size from pgsink.sinks where name = 'orders'") == [(20,)]

    # clean up in dependency order
    assert "Removed sink orders." in cli("sink", "remove", "orders")
    assert "Removed endpoint hook." in cli("endpoint", "remove", "hook")
    out = cli("source", "remove", "app", "--drop-slot")
    assert "Removed source app." in out and f"Dropped replication slot {slot}." in out
    assert db_rows(cli.dsn, f"select count(*) from pg_replication_slots where slot_name = '{slot}'") == [(0,)]

    everything = "\n".join(cli.outputs)
    for secret in (password, token, token2):
        assert secret not in everything


def test_cli_yaml_apply_and_errors(cli: Cli, tmp_path: Path) -> None:
    p = conninfo_to_dict(cli.dsn)
    password, token = f"pw-{uuid.uuid4().hex}", f"tok-{uuid.uuid4().hex}"
    env = {"PGSINK_TEST_HOST": str(p.get("host", "127.0.0.1")), "PGSINK_TEST_PORT": str(p.get("port", 5432)),
           "PGSINK_TEST_DB": str(p["dbname"]), "PGSINK_TEST_USER": str(p.get("user", "postgres")),
           "PGSINK_TEST_DB_PASSWORD": password, "PGSINK_TEST_API_TOKEN": token,
           "PGSINK_TEST_SLOT": f"yaml_{uuid.uuid4().hex[:8]}"}
    out = cli("config", "plan", str(FIXTURE), env=env)
    assert "+ create sink orders-to-webhook" in out and "Plan: 4 to create, 0 to update, 0 to delete." in out
    assert "account is ignored" in out
    assert db_rows(cli.dsn, "select count(*) from pgsink.sinks") == [(0,)]  # plan writes nothing
    out = cli("config", "apply", "-", env=env, stdin=FIXTURE.read_text())
    assert "Applied." in out
    assert "No changes" in cli("config", "apply", str(FIXTURE), env=env)

    bad = tmp_path / "bad.yaml"
    bad.write_text("databases:\n  - name: db\n    hostname: [oops\n")
    out = cli("config", "plan", str(bad), code=1)
    assert f"{bad}:" in out and "YAML syntax error" in out
    bad.write_text(FIXTURE.read_text().replace("    max_retry_count: 20\n", "    max_retry_count: 20\n    max_retries: 3\n"))
    out = cli("config", "plan", str(bad), env=env, code=1)
    assert f"{bad}:61: sink 'orders-to-webhook': unknown key 'max_retries'" in out
    bad.write_text(FIXTURE.read_text().replace('      type: "webhook"\n      http_endpoint: "webhook-endpoint"\n      http_endpoint_path',
                                               '      type: "sqs"\n      queue_url: "https://sqs.example/q"\n      http_endpoint_path'))
    out = cli("config", "apply", str(bad), env=env, code=1)
    assert "sink type 'sqs' is not supported" in out and f"{bad}:68:" in out
    bad.write_bytes(b"databases:\n  - name: caf\xe9\n")  # Latin-1, not UTF-8
    out = cli("config", "plan", str(bad), code=1)
    assert "not UTF-8 text" in out and "Traceback" not in out
    out = cli("config", "export", "-o", str(tmp_path / "no" / "such" / "dir.yaml"), code=1)
    assert "cannot write" in out and "No such file or directory" in out and "Traceback" not in out

    everything = "\n".join(cli.outputs)
    assert password not in everything and token not in everything
