"""sequin.yaml parsing: Sequin's keys as is, errors naming key and line, env substitution, export."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from pgsink.engine import config as cfg
from pgsink.engine.errors import ConfigError
from pgsink.engine.model import Config, HttpEndpoint, Sink, Source, TableOptions

FIXTURE = Path(__file__).parent.parent / "fixtures" / "sequin.yaml"
ENV = {"PGSINK_TEST_DB_PASSWORD": "pw-fixture", "PGSINK_TEST_API_TOKEN": "tok-fixture"}

MINIMAL = """\
databases:
  - name: db
    hostname: localhost
    database: app
    slot: {name: s1}
    publication: {name: p1}
http_endpoints:
  - name: hook
    url: http://127.0.0.1:9/x
sinks:
  - name: k
    database: db
    destination:
      type: webhook
      http_endpoint: hook
"""


def parse(text: str, env: dict[str, str] | None = None) -> cfg.Desired:
    return cfg.parse_config(text, filename="sequin.yaml", env=env or {})


def error_of(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        parse(text, env)
    return str(e.value)


def test_fixture_parses_with_sequin_keys_and_pgsink_extras() -> None:
    d = cfg.parse_config(FIXTURE.read_text(), filename="sequin.yaml", env=ENV)
    [db] = d.sources
    assert (db.hostname, db.port, db.database, db.username) == ("localhost", 5432, "app_production", "postgres")
    assert db.password == "pw-fixture"
    assert (db.slot_name, db.create_slot, db.publication_name, db.create_publication) == (
        "sequin_slot", True, "sequin_pub", True)
    assert db.retention_seconds == 3 * 86400 and db.annotations == {"team": "payments"}
    [hook] = d.endpoints
    assert hook.headers == {"X-Source": "pgsink-tests"}
    assert hook.encrypted_headers == {"Authorization": "Bearer tok-fixture"}
    orders, audit = d.sinks
    # merged from the &base_sink_config template, overridden where the sink says so
    assert orders.source == "production-db" and orders.batch_size == 10 and orders.lane_count == 16
    assert orders.http_endpoint_path == "/orders"
    assert orders.include_tables == ("public.orders", "public.order_items")
    assert orders.tables == (cfg.TableSpec("public.order_items", ("order_id",)),)
    assert audit.status == "paused" and audit.actions == ("update", "delete")
    assert audit.exclude_tables == ("public.orders", "public.order_items")
    assert audit.http_endpoint == "webhook-endpoint" and audit.http_endpoint_path == ""
    assert any("account is ignored" in w for w in d.warnings)
    assert any(":14:" in w and "pool_size" in w for w in d.warnings)


def test_minimal_defaults_match_sequin() -> None:
    d = parse(MINIMAL)
    [k] = d.sinks
    assert k.actions == ("insert", "update", "delete") and k.message_grouping and k.batch
    assert (k.batch_size, k.status, k.lane_count, k.max_retry_count) == (1, "active", 16, None)
    assert d.sources[0].username == "postgres" and d.sources[0].port == 5432


def test_older_sequin_keys_are_accepted() -> None:
    d = parse("""\
databases:
  - name: db
    hostname: h
    database: app
    slot_name: old_slot
    publication_name: old_pub
http_endpoints:
  - name: hook
    url: https://example.invalid/hook
    headers: {X-One: "1"}
sinks:
  - name: k
    database: db
    table: orders
    group_column_names: [account_id]
    filters: []
    transform: none
    destination: {type: webhook, http_endpoint: hook}
""")
    assert (d.sources[0].slot_name, d.sources[0].publication_name) == ("old_slot", "old_pub")
    assert d.endpoints[0].headers == {"X-One": "1"}
    assert d.sinks[0].include_tables == ("public.orders",)
    assert d.sinks[0].tables == (cfg.TableSpec("public.orders", ("account_id",)),)


def test_url_instead_of_connection_keys() -> None:
    d = parse(MINIMAL.replace("    hostname: localhost\n    database: app\n",
                              "    url: postgresql://app_user:pa55@db.internal:6432/app?sslmode=require\n"))
    s = d.sources[0]
    assert (s.hostname, s.port, s.database, s.username, s.password, s.sslmode) == (
        "db.internal", 6432, "app", "app_user", "pa55", "require")


def test_url_with_hostname_is_refused_without_echoing_the_url() -> None:
    msg = error_of(MINIMAL.replace("    database: app\n", "    database: app\n    url: postgresql://u:hunter2@h/d\n"))
    assert "sequin.yaml:3:" in msg and "hostname" in msg and "together with url" in msg
    assert "hunter2" not in msg


def test_syntax_error_names_line() -> None:
    msg = error_of("databases:\n  - name: db\n    hostname: [unclosed\n    database: x\n")
    assert "YAML syntax error" in msg and "sequin.yaml:" in msg
    line = int(msg.split("sequin.yaml:")[1].split(":")[0])
    assert line in (3, 4, 5)


def test_unknown_key_names_key_line_and_suggestion() -> None:
    msg = error_of(MINIMAL.replace("    database: db\n", "    database: db\n    batchsize: 10\n"))
    assert "sequin.yaml:13:" in msg and "unknown key 'batchsize'" in msg and "batch_size" in msg


def test_unknown_nested_key_names_line() -> None:
    msg = error_of(MINIMAL.replace("      http_endpoint: hook\n", "      http_endpoint: hook\n      retries: 3\n"))
    assert "sequin.yaml:16:" in msg and "destination: unknown key 'retries'" in msg


def test_unknown_top_level_key() -> None:
    msg = error_of("sinkz: []\n" + MINIMAL)
    assert "sequin.yaml:1:" in msg and "'sinkz'" in msg and "did you mean 'sinks'" in msg


def test_unsupported_sink_type_names_type_and_line() -> None:
    msg = error_of(MINIMAL.replace("      type: webhook\n      http_endpoint: hook\n",
                                   "      type: kafka\n      hosts: localhost:9092\n      topic: t\n"))
    assert "sequin.yaml:14:" in msg and "'kafka' is not supported" in msg and "webhook" in msg
    assert "hosts" not in msg  # the other keys of an unsupported destination are not reported


@pytest.mark.parametrize(("snippet", "key"), [
    ("    transform: my-transform\n", "transform"),
    ("    routing: my-router\n", "routing"),
    ("    enrichment: my-enrichment\n", "enrichment"),
    ("    timestamp_format: unix_microsecond\n", "timestamp_format"),
    ("    load_shedding_policy: discard_on_full\n", "load_shedding_policy"),
])
def test_not_supported_yet_keys_name_key_and_line(snippet: str, key: str) -> None:
    msg = error_of(MINIMAL.replace("    database: db\n", "    database: db\n" + snippet))
    assert "sequin.yaml:13:" in msg and key in msg and "not supported yet" in msg


def test_functions_section_not_supported_yet() -> None:
    msg = error_of(MINIMAL + "functions:\n  - name: f\n    type: transform\n    code: x\n")
    assert "sequin.yaml:16: functions: not supported yet" in msg


def test_env_substitution_with_defaults_and_escapes() -> None:
    text = MINIMAL.replace("hostname: localhost", 'hostname: "${DB_HOST:-fallback.local}"').replace(
        "database: app", "database: ${DB_NAME}").replace("    slot: {name: s1}", "    port: ${DB_PORT:-6543}\n    slot: {name: s1}")
    d = parse(text, {"DB_NAME": "from_env"})
    s = d.sources[0]
    assert (s.hostname, s.database, s.port) == ("fallback.local", "from_env", 6543)
    d = parse(text, {"DB_NAME": "x", "DB_HOST": "", "DB_PORT": "7000"})
    assert d.sources[0].hostname == "fallback.local" and d.sources[0].port == 7000
    d = parse(MINIMAL.replace("database: app", "database: 'a$${b}'"))
    assert d.sources[0].database == "a${b}"


def test_env_substitution_missing_variable_named_with_line() -> None:
    msg = error_of(MINIMAL.replace("database: app", "database: ${NOPE_NOT_SET}"))
    assert "sequin.yaml:4:" in msg and "NOPE_NOT_SET is not set" in msg


def test_env_values_cannot_inject_yaml() -> None:
    d = parse(MINIMAL.replace("database: app", "database: ${DB}"), {"DB": "x\nsinks: []"})
    assert d.sources[0].database == "x\nsinks: []" and len(d.sinks) == 1


def test_secret_values_never_appear_in_errors() -> None:
    secret = "s3cr3t-value-9"
    bad = MINIMAL.replace("    publication: {name: p1}\n", "    publication: {name: p1}\n    ssl: maybe\n").replace(
        "    database: app\n", "    database: app\n    password: ${PW}\n")
    msg = error_of(bad, {"PW": secret})
    assert "ssl" in msg and secret not in msg
    msg = error_of(MINIMAL.replace("url: http://127.0.0.1:9/x", f"url: http://127.0.0.1:9/x\n    encrypted_headers: [{{key: 'bad key', value: {secret}}}]"))
    assert "bad key" in msg and secret not in msg


def test_duplicate_keys_and_names() -> None:
    msg = error_of(MINIMAL.replace("    database: app\n", "    database: app\n    database: other\n"))
    assert "sequin.yaml:5: duplicate key 'database' (first at line 4)" in msg
    msg = error_of(MINIMAL + "  - name: k\n    database: db\n    destination: {type: webhook, http_endpoint: hook}\n")
    assert "sink 'k' is defined twice" in msg


def test_value_checks() -> None:
    assert "batch_size: must be between 1 and 10000" in error_of(
        MINIMAL.replace("    database: db\n", "    database: db\n    batch_size: 0\n"))
    assert "destination.batch is false" in error_of(
        MINIMAL.replace("    database: db\n", "    database: db\n    batch_size: 5\n").replace(
            "      http_endpoint: hook\n", "      http_endpoint: hook\n      batch: false\n"))
    assert "message_grouping" in error_of(MINIMAL.replace(
        "    database: db\n",
        "    database: db\n    message_grouping: false\n    tables: [{name: public.t, group_column_names: [a]}]\n"))
    assert "unknown action(s) 'upsert'" in error_of(MINIMAL.replace("    database: db\n", "    database: db\n    actions: [upsert]\n"))
    assert "slot name 'Bad-Slot' is invalid" in error_of(MINIMAL.replace("{name: s1}", "{name: Bad-Slot}"))
    assert "months and years vary" in error_of(MINIMAL.replace("    slot:", "    retention: 1 month\n    slot:"))
    assert "is not one of" in error_of(MINIMAL.replace("    database: db\n", "    database: db\n    status: running\n"))
    assert "not an http:// or https:// URL" in error_of(MINIMAL.replace("url: http://127.0.0.1:9/x", "url: ftp://x"))


def test_local_and_webhook_site_endpoints_are_refused() -> None:
    msg = error_of(MINIMAL.replace("    url: http://127.0.0.1:9/x\n", "    webhook.site: 'true'\n"))
    assert "webhook.site" in msg and "not supported yet" in msg


@pytest.mark.parametrize(("text", "seconds"), [
    ("7 days", 604800), ("36 hours", 129600), ("1 day 12 hours", 129600), ("90m", 5400), (3600, 3600),
    ("2 weeks", 1209600), ("45 seconds", 45), (0, 0), ("0", 0), ("0 days", 0), ("36500 days", 3153600000),
])
def test_retention_round_trip(text: object, seconds: int) -> None:
    assert cfg.parse_retention(text) == seconds
    assert cfg.parse_retention(cfg.format_retention(seconds)) == seconds


@pytest.mark.parametrize(("text", "problem"), [
    ("36501 days", "longer than 36500 days"), ("9999999999 days", "longer than 36500 days"), (-1, "negative"),
])
def test_retention_out_of_range_is_refused(text: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        cfg.parse_retention(text)


def _config() -> Config:
    sid, eid, kid = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    source = Source(id=sid, name="db", hostname="h", port=5432, database="app", username="u",
                    password="pw-${not-a-var}", sslmode="prefer", slot_name="s", create_slot=True,
                    publication_name="p", create_publication=False,
                    publication_init_sql="create publication p\n  for table t", decoder="pgoutput",
                    retention_seconds=86400.0, annotations={"note": "costs ${5}"})
    endpoint = HttpEndpoint(id=eid, name="hook", url="http://127.0.0.1:9/x", headers={"X-A": "1"},
                            encrypted_headers={"Authorization": "Bearer sekrit", "X-Key": "k2"})
    sink = Sink(id=kid, name="k", source_id=sid, http_endpoint_id=eid, http_endpoint_path="/p", status="paused",
                include_schemas=None, exclude_schemas=("audit",), include_tables=None, exclude_tables=None,
                actions=frozenset({"insert", "delete"}), message_grouping=True,
                table_options=(TableOptions("public", "t", ("a", "b")),), batch=True, batch_size=5,
                batch_timeout_ms=10, request_timeout_ms=1000, max_ack_pending=7, max_retry_count=3,
                annotations={"x": [1, 2]}, lane_count=8)
    return Config({sid: source}, {eid: endpoint}, {kid: sink})


def test_export_round_trips_to_an_empty_plan_and_hides_secrets() -> None:
    config = _config()
    text = cfg.export_yaml(config)
    for secret in ("pw-${not-a-var}", "Bearer sekrit", "k2"):
        assert secret not in text
    assert "PGSINK_DB_DB_PASSWORD" in text and "PGSINK_ENDPOINT_HOOK_AUTHORIZATION" in text
    env = {"PGSINK_DB_DB_PASSWORD": "pw-${not-a-var}", "PGSINK_ENDPOINT_HOOK_AUTHORIZATION": "Bearer sekrit",
           "PGSINK_ENDPOINT_HOOK_X_KEY": "k2"}
    desired = cfg.parse_config(text, filename="export.yaml", env=env)
    plan = cfg.make_plan(desired, config)
    assert plan.empty, plan.lines()
    assert yaml.safe_load(text)["sinks"][0]["destination"]["type"] == "webhook"


def test_plan_is_field_level_and_never_shows_secrets() -> None:
    config = _config()
    env = {"PGSINK_DB_DB_PASSWORD": "new-password-1", "PGSINK_ENDPOINT_HOOK_AUTHORIZATION": "Bearer other",
           "PGSINK_ENDPOINT_HOOK_X_KEY": "k2"}
    text = cfg.export_yaml(config).replace("batch_size: 5", "batch_size: 6").replace("status: paused", "status: active")
    plan = cfg.make_plan(cfg.parse_config(text, env=env), config)
    rendered = "\n".join(plan.lines())
    assert "~ update source db" in rendered and "password: (changed)" in rendered
    assert "encrypted_headers: Authorization (changed)" in rendered
    assert "batch_size: 5 -> 6" in rendered and 'status: "paused" -> "active"' in rendered
    assert "new-password-1" not in rendered and "Bearer" not in rendered
    assert plan.summary() == "Plan: 0 to create, 3 to update, 0 to delete."


def test_plan_refuses_lane_count_change_and_unknown_references() -> None:
    config = _config()
    env = {"PGSINK_DB_DB_PASSWORD": "x", "PGSINK_ENDPOINT_HOOK_AUTHORIZATION": "x", "PGSINK_ENDPOINT_HOOK_X_KEY": "x"}
    text = cfg.export_yaml(config).replace("lane_count: 8", "lane_count: 16")
    with pytest.raises(ConfigError, match=r"lane_count cannot change \(8 -> 16\)"):
        cfg.make_plan(cfg.parse_config(text, env=env), config)
    with pytest.raises(ConfigError, match=r"sequin.yaml:11: sink 'k': database 'db' is neither"):
        cfg.make_plan(parse(MINIMAL.replace("  - name: db\n", "  - name: other\n")), Config({}, {}, {}))


def test_prune_deletes_absent_objects_but_not_used_ones() -> None:
    config = _config()
    only_source = cfg.Desired(sources=cfg.current_specs(config).sources)
    plan = cfg.make_plan(only_source, config, prune=True)
    assert [c.title() for c in plan.changes] == ["- delete sink k", "- delete endpoint hook"]
    kept_sink = cfg.current_specs(config).sinks
    with pytest.raises(ConfigError, match="cannot prune endpoint 'hook': sinks k still use it"):
        cfg.make_plan(cfg.Desired(sinks=kept_sink), config, prune=True)


def test_prune_refuses_a_file_that_declares_nothing() -> None:
    """An empty file (or an empty pipe, or only comments) with --prune would delete everything."""
    with pytest.raises(ConfigError, match="declares nothing, and --prune would delete every source"):
        cfg.make_plan(cfg.parse_config("# nothing yet\n", filename="sequin.yaml"), _config(), prune=True)
    assert not cfg.make_plan(cfg.parse_config("", filename="sequin.yaml"), _config()).changes  # without prune: fine


def test_cli_options_go_through_the_same_validation() -> None:
    spec = cfg.sink_from_options({"name": "k", "database": "db", "batch_size": 3,
                                  "destination": {"type": "webhook", "http_endpoint": "hook", "batch": True}})
    assert spec.batch_size == 3
    with pytest.raises(ConfigError, match="command line: sink 'k': lane_count: must be between 1 and 1024"):
        cfg.sink_from_options({"name": "k", "database": "db", "lane_count": 0,
                               "destination": {"type": "webhook", "http_endpoint": "hook"}})



def test_a_nul_character_is_refused_at_its_line() -> None:
    """YAML can spell one ("\\0"); Postgres text cannot hold it, so apply failed half-way with a DataError."""
    msg = error_of(MINIMAL.replace("    database: app\n", '    database: "a\\0pp"\n'))
    assert "sequin.yaml:4: contains a NUL character" in msg



def test_plan_warns_when_a_sinks_grouping_changes() -> None:
    """Queued and parked messages keep their groups: a change of grouping can let new ones overtake them."""
    config = _config()
    env = {"PGSINK_DB_DB_PASSWORD": "x", "PGSINK_ENDPOINT_HOOK_AUTHORIZATION": "x", "PGSINK_ENDPOINT_HOOK_X_KEY": "x"}
    text = cfg.export_yaml(config)

    def warnings(yaml_text: str) -> list[str]:
        return [w for w in cfg.make_plan(cfg.parse_config(yaml_text, env=env), config).warnings if "grouping" in w]

    assert warnings(text) == []
    assert warnings(text.replace("    - a\n    - b\n", "    - b\n"))  # other group columns
    off = text.replace("message_grouping: true", "message_grouping: false")
    assert warnings(off.replace("    group_column_names:\n    - a\n    - b\n", ""))
