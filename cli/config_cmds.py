"""`pgsink config plan|apply|export`: config as code, in sequin.yaml format.

The CLI face of pgsink's config is split by object: ``source_cmds``,
``endpoint_cmds``, ``sink_cmds`` and this module. Every command builds the
same specs as a sequin.yaml file would (through the same validators in
``pgsink.engine.config``) and writes them the same way, so the CLI and YAML can
never disagree. No command ever prints a password or an encrypted header value.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.text import Text

from pgsink.engine import config as cfg
from pgsink.engine.errors import ConfigError

from .common import DatabaseUrl, console, dsn, err_console
from .config_common import run_config, warn

config_app = typer.Typer(help="Config as code, in Sequin's sequin.yaml format.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(config_app, name="config")


FileArg = Annotated[str, typer.Argument(help="sequin.yaml-style file, or - for standard input.")]
PruneOpt = Annotated[bool, typer.Option("--prune", help="Also delete sources, endpoints and sinks absent from the file.")]


def _read_file(path: str) -> tuple[str, str]:
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        return Path(path).read_text(encoding="utf-8"), path
    except OSError as e:
        raise ConfigError(f"Cannot read {path}: {e.strerror}.") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"Cannot read {path}: not UTF-8 text (byte {e.start}).") from None


def _print_plan(plan: cfg.Plan) -> None:
    styles = {"+": "green", "~": "yellow", "-": "red"}
    for line in plan.lines():
        style = styles.get(line[:1], "") if not line.startswith(" ") else ""
        console.print(Text(line, style=style), highlight=False, soft_wrap=True)
    console.print(plan.summary(), highlight=False)


@config_app.command("plan")
def config_plan(
    file: FileArg,
    prune: PruneOpt = False,
    exit_code: Annotated[bool, typer.Option("--exit-code", help="Exit 2 when there are changes (for CI).")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Show what `config apply` would change, field by field, without writing anything."""
    state = dsn(database_url)

    async def go() -> cfg.Plan:
        text, name = _read_file(file)
        return await cfg.plan_config(state, cfg.parse_config(text, filename=name), prune=prune)

    plan = run_config(go())
    warn(plan.warnings)
    _print_plan(plan)
    if exit_code and not plan.empty:
        raise typer.Exit(2)


@config_app.command("apply")
def config_apply(
    file: FileArg,
    prune: PruneOpt = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Apply a sequin.yaml-style file in one transaction. Objects not in the file are left alone (unless --prune)."""
    state = dsn(database_url)

    async def go() -> cfg.ApplyResult:
        text, name = _read_file(file)
        return await cfg.apply_config(state, cfg.parse_config(text, filename=name), prune=prune)

    result = run_config(go())
    warn(result.plan.warnings + result.warnings)
    _print_plan(result.plan)
    if not result.plan.empty:
        console.print("Applied.", highlight=False)


@config_app.command("export")
def config_export(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of standard output.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Print the whole config as sequin.yaml; secrets become ${PGSINK_...} placeholders."""
    text = run_config(cfg.export_config(dsn(database_url)))
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        err_console.print(f"[bold red]error:[/] cannot write {escape(str(output))}: {escape(e.strerror or str(e))}",
                          highlight=False)
        raise typer.Exit(1) from None
    err_console.print(f"Wrote {escape(str(output))}.", highlight=False)
