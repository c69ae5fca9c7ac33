"""Signed webhooks, verified on the receiver side with the official ``standardwebhooks`` package."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from pgsink.engine import config as cfg
from pgsink.engine import signing
from pgsink.engine.errors import ConfigError
from pgsink.engine.deliver import DeliveryStage
from pgsink.engine.model import load_config
from tests.integration.test_deliver import running, stage_for
from tests.queue_helpers import Row, create_sink, enqueue_changes, wait_for
from tests.receiver import Received, start_receiver


def verify(secret: str, req: Received) -> Any:
    """What a receiver does: raises WebhookVerificationError unless a signature matches."""
    return Webhook(secret).verify(req.body, req.headers)


# ---------------------------------------------------------------- pure


def test_signatures_verify_with_the_official_package_including_rotation() -> None:
    old, new = signing.generate_secret(), signing.generate_secret()
    assert old.startswith("whsec_") and len(base64.b64decode(old[6:])) == 32
    body = b'{"record":{"id":1}}'
    keys = signing.SigningKeys.of(old).rotated(new, grace_seconds=60, now=1000.0)
    headers = signing.sign_headers(keys.live_keys(1010.0), "msg_1", body)
    assert headers["webhook-signature"].count("v1,") == 2
    assert Webhook(old).verify(body, headers) == {"record": {"id": 1}}
    assert Webhook(new).verify(body, headers) == {"record": {"id": 1}}
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.generate_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(body + b" ", headers)
    # after the grace period only the new secret signs
    late = signing.sign_headers(keys.live_keys(1061.0), "msg_1", body)
    assert late["webhook-signature"].count("v1,") == 1
    Webhook(new).verify(body, late)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(body, late)


def test_rotating_twice_keeps_only_live_secrets_and_round_trips_encrypted() -> None:
    a, b, c = (signing.generate_secret() for _ in range(3))
    keys = signing.SigningKeys.of(a).rotated(b, grace_seconds=10, now=0).rotated(c, grace_seconds=100, now=5)
    assert [s.secret for s in keys.secrets] == [c, b, a]
    assert [s.expires_at for s in keys.secrets] == [None, 105, 10]  # an old secret never gets a longer life
    back = signing.SigningKeys.decrypt(keys.encrypt())
    assert back == keys
    assert a not in repr(back) and "whsec_" not in repr(back)
    assert len(keys.rotated(c, grace_seconds=0, now=20).secrets) == 1  # grace 0: the old ones stop at once


def test_batch_id_is_stable_and_depends_on_the_messages() -> None:
    assert signing.batch_id(["a", "b"]) == signing.batch_id(["a", "b"])
    assert signing.batch_id(["a", "b"]) != signing.batch_id(["a", "c"])
    assert signing.batch_id(["a"]).startswith("batch_")


@pytest.mark.parametrize("bad", ["whsec_", "whsec_!!!", "whsec_" + base64.b64encode(b"short").decode()])
def test_malformed_secret_is_refused_without_quoting_it(bad: str) -> None:
    with pytest.raises(ConfigError, match="not a Standard Webhooks secret") as e:
        signing.secret_key(bad)
    assert bad not in str(e.value) or bad == "whsec_"


# ---------------------------------------------------------------- delivery


async def test_single_and_batched_requests_are_signed_and_verify(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    rcv = await start_receiver()
    try:
        single = await create_sink(aconn, rcv.url + "/single", name="single", batch=False, batch_size=1)
        batched = await create_sink(aconn, rcv.url + "/batched", name="batched", batch_size=10,
                                    batch_timeout_ms=200, lane_count=1)
        plain = await create_sink(aconn, rcv.url + "/plain", name="plain")
        s_secret = await signing.rotate_secret(fresh_db, "single_endpoint")
        b_secret = await signing.rotate_secret(fresh_db, "batched_endpoint")
        await enqueue_changes(aconn, single.sink_id, [Row({"id": 1}, "1")])
        await enqueue_changes(aconn, batched.sink_id, [Row({"id": i}, str(i)) for i in (1, 2, 3)])
        await enqueue_changes(aconn, plain.sink_id, [Row({"id": 9}, "9")])
        async with running(stage_for(fresh_db)):
            await rcv.wait_until(lambda: len(rcv.delivered()) >= 5, what="5 messages")
    finally:
        await rcv.close()
    by_path = {r.path: r for r in rcv.requests}
    one = by_path["/single"]
    assert verify(s_secret, one)["record"] == {"id": 1}
    assert one.headers["webhook-id"] == one.json["metadata"]["idempotency_key"]
    assert abs(int(one.headers["webhook-timestamp"]) - time.time()) < 60
    many = by_path["/batched"]
    assert len(verify(b_secret, many)["data"]) == 3
    keys = [m["metadata"]["idempotency_key"] for m in many.messages]
    assert many.headers["webhook-id"] == signing.batch_id(keys)
    with pytest.raises(WebhookVerificationError):
        verify(s_secret, many)  # each endpoint has its own secret
    assert "webhook-signature" not in by_path["/plain"].headers  # signing is opt-in
    # the idempotency key travels in a header either way (a transformed body may not carry it)
    assert by_path["/plain"].headers["webhook-id"] == by_path["/plain"].messages[0]["metadata"]["idempotency_key"]


async def test_gzip_bodies_are_signed_before_compression(fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    rcv = await start_receiver()
    try:
        refs = await create_sink(aconn, rcv.url, name="gz", endpoint_headers={"Content-Encoding": "gzip"})
        secret = await signing.rotate_secret(fresh_db, "gz_endpoint")
        await enqueue_changes(aconn, refs.sink_id, [Row({"id": 1}, "1")])
        async with running(stage_for(fresh_db)):
            await rcv.wait_until(lambda: len(rcv.delivered()) >= 1)
    finally:
        await rcv.close()
    assert rcv.requests[0].wire_length != len(rcv.requests[0].body)  # it was compressed on the wire
    verify(secret, rcv.requests[0])


async def test_rotation_signs_with_both_secrets_until_the_grace_period_ends(
        fresh_db: str, aconn: psycopg.AsyncConnection) -> None:
    """A receiver holding either secret accepts every request during the rotation; afterwards only the new."""
    rcv = await start_receiver()
    try:
        refs = await create_sink(aconn, rcv.url, name="rot", lane_count=1)
        old = await signing.rotate_secret(fresh_db, "rot_endpoint")
        await enqueue_changes(aconn, refs.sink_id, [Row({"id": 1}, "1")])
        stage = stage_for(fresh_db)
        async with running(stage):
            await rcv.wait_until(lambda: len(rcv.delivered()) >= 1)
            new = await signing.rotate_secret(fresh_db, "rot_endpoint", grace_seconds=3600)
            await _signing_with(stage, refs.sink_id, new)
            await enqueue_changes(aconn, refs.sink_id, [Row({"id": 2}, "2")])
            await rcv.wait_until(lambda: len(rcv.delivered()) >= 2)
            newest = await signing.rotate_secret(fresh_db, "rot_endpoint", grace_seconds=0)
            await _signing_with(stage, refs.sink_id, newest)
            await enqueue_changes(aconn, refs.sink_id, [Row({"id": 3}, "3")])
            await rcv.wait_until(lambda: len(rcv.delivered()) >= 3)
    finally:
        await rcv.close()
    first, second, third = rcv.requests[:3]
    verify(old, first)
    with pytest.raises(WebhookVerificationError):
        verify(new, first)
    assert second.headers["webhook-signature"].count("v1,") == 2
    verify(old, second)
    verify(new, second)
    verify(newest, third)
    for stale in (old, new):
        with pytest.raises(WebhookVerificationError):
            verify(stale, third)
    assert await signing.current_secret(fresh_db, "rot_endpoint") == newest


async def _signing_with(stage: DeliveryStage, sink_id: Any, secret: str) -> None:
    """Wait until the stage reloaded the config (rotation NOTIFYs pgsink_config) and signs with ``secret``."""
    async def reloaded() -> bool:
        runner = stage._runners.get(sink_id)
        endpoint = runner.setup.endpoint if runner is not None else None
        return endpoint is not None and endpoint.signing is not None and endpoint.signing.current == secret
    await wait_for(reloaded, timeout=10, what="the stage to reload the rotated secret")


# ---------------------------------------------------------------- config


async def test_yaml_signing_generates_keeps_rotates_and_never_shows_the_secret(fresh_db: str) -> None:
    text = "http_endpoints:\n  - name: hook\n    url: http://127.0.0.1:9/x\n    signing: true\n"
    plan = (await cfg.apply_config(fresh_db, cfg.parse_config(text))).plan
    assert plan.count("create") == 1
    secret = await signing.current_secret(fresh_db, "hook")
    assert secret is not None and secret.startswith("whsec_")
    # re-applying the same file (no secret in it) keeps the generated secret: no change
    assert (await cfg.plan_config(fresh_db, cfg.parse_config(text))).empty
    exported = await cfg.export_config(fresh_db)
    assert "signing: true" in exported and secret not in exported
    assert (await cfg.plan_config(fresh_db, cfg.parse_config(exported))).empty
    # an explicit secret in the file is a rotation: the previous one signs on for the grace period
    given = signing.generate_secret()
    text2 = text.replace("signing: true", 'signing_secret: "${HOOK_SECRET}"')
    desired = cfg.parse_config(text2, env={"HOOK_SECRET": given})
    plan = await cfg.plan_config(fresh_db, desired)
    shown = "\n".join(plan.lines())
    assert "signing_secret: (rotated)" in shown and given not in shown and secret not in shown
    await cfg.apply_config(fresh_db, desired)
    async with await psycopg.AsyncConnection.connect(fresh_db) as conn:
        endpoint = next(iter((await load_config(conn)).endpoints.values()))
    assert endpoint.signing is not None
    assert [s.secret for s in endpoint.signing.secrets] == [given, secret]
    assert given not in repr(endpoint)
    # signing off removes the secrets
    text3 = text.replace("signing: true", "signing: false")
    plan = await cfg.plan_config(fresh_db, cfg.parse_config(text3))
    assert "signing_secret: (removed)" in "\n".join(plan.lines())
    await cfg.apply_config(fresh_db, cfg.parse_config(text3))
    assert await signing.current_secret(fresh_db, "hook") is None


def test_yaml_rejects_bad_signing_options() -> None:
    base = "http_endpoints:\n  - name: hook\n    url: http://127.0.0.1:9/x\n"
    with pytest.raises(ConfigError, match="signing_secret: the signing secret is not a Standard Webhooks"):
        cfg.parse_config(base + "    signing_secret: whsec_abc\n")
    with pytest.raises(ConfigError, match="signing: is false but signing_secret is given"):
        cfg.parse_config(base + f"    signing: false\n    signing_secret: {signing.generate_secret()}\n")
    with pytest.raises(ConfigError, match="rate_limit: must be a positive number"):
        cfg.parse_config(base + "    rate_limit: 0\n")


async def test_rotate_unknown_endpoint_is_an_actionable_error(fresh_db: str) -> None:
    with pytest.raises(ConfigError, match="no endpoint named 'nope'"):
        await signing.rotate_secret(fresh_db, "nope")


def test_cli_rotate_secret_show_and_signing_secret(fresh_db: str) -> None:
    def pgsink(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "pgsink.cli", *args, "--database-url", fresh_db],
                             capture_output=True, text=True, timeout=120, env=dict(os.environ))
        assert res.returncode == code, res.stdout + res.stderr
        return res

    pgsink("endpoint", "add", "hook", "--url", "http://127.0.0.1:9/x", "--signing", "--rate-limit", "5",
           "--block-private-addresses")
    first = pgsink("endpoint", "signing-secret", "hook").stdout.strip()
    assert first.startswith("whsec_")
    rotated = pgsink("endpoint", "rotate-secret", "hook", "--grace", "1 hour")
    second = rotated.stdout.strip()
    assert second.startswith("whsec_") and second != first
    shown = pgsink("endpoint", "show", "hook").stdout
    assert "2 secrets during a rotation" in shown and "5 requests/s" in shown and "blocked" in shown
    assert first not in shown and second not in shown
    assert pgsink("endpoint", "signing-secret", "hook").stdout.strip() == second
    pgsink("endpoint", "rotate-secret", "nope", code=1)
    pgsink("endpoint", "rotate-secret", "hook", "--grace", "soon", code=1)


async def test_endpoint_safety_options_apply_show_in_the_model_and_export_back(fresh_db: str) -> None:
    text = ("http_endpoints:\n  - name: safe\n    url: https://hooks.example.com/x\n    signing: true\n"
            "    block_private_addresses: true\n    ca_bundle: /etc/ssl/private-ca.pem\n    rate_limit: 2.5\n")
    await cfg.apply_config(fresh_db, cfg.parse_config(text))
    async with await psycopg.AsyncConnection.connect(fresh_db) as conn:
        e = next(iter((await load_config(conn)).endpoints.values()))
    assert (e.block_private_addresses, e.ca_bundle, e.rate_limit) == (True, "/etc/ssl/private-ca.pem", 2.5)
    exported = await cfg.export_config(fresh_db)
    assert "rate_limit: 2.5" in exported and "block_private_addresses: true" in exported
    assert (await cfg.plan_config(fresh_db, cfg.parse_config(exported))).empty
    plan = await cfg.plan_config(fresh_db, cfg.parse_config(text.replace("rate_limit: 2.5", "rate_limit: 5")))
    assert "rate_limit: 2.5 -> 5.0" in "\n".join(plan.lines())
