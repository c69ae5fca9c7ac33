"""`pgsink endpoint ...`: HTTP endpoints, where sinks POST messages. Secrets are never printed."""

from __future__ import annotations

import os
import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.text import Text

from pgsink.engine import config as cfg
from pgsink.engine import signing
from pgsink.engine.errors import ConfigError

from .common import DatabaseUrl, console, dsn, err_console
from .config_common import env_pairs, join_list, kv_table, load_config, new_table, pairs, print_out, run_config

endpoint_app = typer.Typer(help="HTTP endpoints: where sinks POST messages.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(endpoint_app, name="endpoint")


@endpoint_app.command("add")
def endpoint_add(
    name: Annotated[str, typer.Argument(help="Name of the endpoint (sinks refer to it).")],
    url: Annotated[str, typer.Option("--url", help="http:// or https:// URL; a sink's path is appended.")],
    header: Annotated[list[str] | None, typer.Option("--header", help="KEY=VALUE header, shown in listings.")] = None,
    encrypted_header: Annotated[list[str] | None, typer.Option("--encrypted-header", help="KEY=VALUE header, encrypted at rest and never shown.")] = None,
    encrypted_header_env: Annotated[list[str] | None, typer.Option("--encrypted-header-env", help="KEY=ENV_VAR: an encrypted header whose value is read from ENV_VAR.")] = None,
    signing: Annotated[bool, typer.Option("--signing/--no-signing", help="Sign requests (Standard Webhooks); pgsink makes the secret unless --signing-secret-env.")] = False,
    signing_secret_env: Annotated[str | None, typer.Option("--signing-secret-env", help="Read the whsec_ signing secret from this environment variable (turns signing on).")] = None,
    block_private_addresses: Annotated[bool, typer.Option("--block-private-addresses/--allow-private-addresses", help="Refuse hosts that are or resolve to private, loopback or link-local addresses.")] = False,
    ca_bundle: Annotated[str | None, typer.Option("--ca-bundle", help="PEM file of CAs to trust for this endpoint instead of the system's.")] = None,
    rate_limit: Annotated[float | None, typer.Option("--rate-limit", help="At most this many requests per second, across all workers.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Add an HTTP endpoint."""
    state = dsn(database_url)
    encrypted = {**pairs(encrypted_header, "--encrypted-header"),
                 **env_pairs(encrypted_header_env, "--encrypted-header-env")}
    secret = None
    if signing_secret_env is not None:
        if signing_secret_env not in os.environ:
            raise typer.BadParameter(f"environment variable {signing_secret_env} is not set",
                                     param_hint="--signing-secret-env")
        secret = os.environ[signing_secret_env]
    options = {"name": name, "url": url, "headers": pairs(header, "--header") or None,
               "encrypted_headers": encrypted or None, "signing": signing or None, "signing_secret": secret,
               "block_private_addresses": block_private_addresses or None, "ca_bundle": ca_bundle,
               "rate_limit": rate_limit}

    async def go() -> None:
        spec = cfg.endpoint_from_options(options)
        await cfg.apply_config(state, cfg.Desired(endpoints=[spec]), create_only=True)

    run_config(go())
    console.print(f"Created endpoint {escape(name)}.", highlight=False)


@endpoint_app.command("list")
def endpoint_list(database_url: DatabaseUrl = None) -> None:
    """List HTTP endpoints (encrypted header values are never shown)."""
    config = load_config(database_url)
    t = new_table("Name", "URL", "Headers", "Encrypted headers", "Sinks")
    for e in config.endpoints.values():
        users = [k.name for k in config.sinks.values() if k.http_endpoint_id == e.id]
        t.add_row(Text(e.name), Text(e.url), Text(join_list(list(e.headers))), Text(join_list(list(e.encrypted_headers))),
                  Text(join_list(users)))
    print_out(t)


@endpoint_app.command("show")
def endpoint_show(
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Show an HTTP endpoint (encrypted header values are never shown)."""
    config = load_config(database_url)
    e = next((x for x in config.endpoints.values() if x.name == name), None)
    if e is None:
        err_console.print(f"[bold red]error:[/] There is no endpoint named {escape(name)!r} (see pgsink endpoint list).")
        raise typer.Exit(1)
    rows = [("name", e.name), ("url", e.url)]
    rows += [(f"header {k}", v) for k, v in e.headers.items()]
    rows += [(f"header {k}", "(encrypted)") for k in e.encrypted_headers]
    if e.signing is not None:
        live = len(e.signing.live_keys(time.time()))
        rows.append(("signing", "on (Standard Webhooks)" + (f", {live} secrets during a rotation" if live > 1 else "")))
    else:
        rows.append(("signing", "off"))
    rows.append(("private addresses", "blocked" if e.block_private_addresses else "allowed"))
    rows.append(("ca bundle", e.ca_bundle or "system"))
    rows.append(("rate limit", f"{e.rate_limit:g} requests/s" if e.rate_limit is not None else "none"))
    users = [k.name for k in config.sinks.values() if k.http_endpoint_id == e.id]
    rows.append(("sinks", join_list(users)))
    print_out(kv_table(f"endpoint {e.name}", rows))


@endpoint_app.command("rotate-secret")
def endpoint_rotate_secret(
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    grace: Annotated[str, typer.Option("--grace", help="How long the old secret keeps signing too, e.g. '24 hours' or '0s'.")] = "24 hours",
    secret_env: Annotated[str | None, typer.Option("--secret-env", help="Use the whsec_ secret in this environment variable instead of a new random one.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Make a new signing secret (turns signing on) and print it; the old one signs too during the grace period."""
    state = dsn(database_url)
    new_secret = None
    if secret_env is not None:
        if secret_env not in os.environ:
            raise typer.BadParameter(f"environment variable {secret_env} is not set", param_hint="--secret-env")
        new_secret = os.environ[secret_env]

    async def go() -> str:
        try:
            seconds = cfg.parse_retention(grace) if grace.strip() not in ("0", "0s") else 0
        except ValueError as e:
            raise ConfigError(f"--grace {grace!r} {e}") from None
        return await signing.rotate_secret(state, name, new_secret=new_secret, grace_seconds=seconds)

    secret = run_config(go())
    err_console.print(f"Endpoint {escape(name)} now signs with a new secret; the previous one also signs for "
                      f"{escape(grace)}. Give the new secret to the receiver:", highlight=False)
    print(secret)


@endpoint_app.command("signing-secret")
def endpoint_signing_secret(
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Print the endpoint's current signing secret (for the receiver's verification)."""
    secret = run_config(signing.current_secret(dsn(database_url), name))
    if secret is None:
        err_console.print(f"Endpoint {escape(name)} does not sign requests (pgsink endpoint rotate-secret "
                          f"{escape(name)} turns signing on).", highlight=False)
        raise typer.Exit(1)
    print(secret)


@endpoint_app.command("remove")
def endpoint_remove(
    name: Annotated[str, typer.Argument(help="Endpoint name.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Remove an HTTP endpoint no sink uses."""
    run_config(cfg.remove_endpoint(dsn(database_url), name))
    console.print(f"Removed endpoint {escape(name)}.", highlight=False)


# ---------------------------------------------------------------- sink
