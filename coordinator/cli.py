"""`coordctl`: administer a running mesh (status) and plan layouts before deploying one (plan)."""

from __future__ import annotations

import json
import sys

import click

from stagemesh.cli import StagemeshGroup


@click.group(cls=StagemeshGroup)
def main() -> None:
    """coordctl: inspect a stagemesh cluster and plan TP/PP/EP layouts."""


@main.command("status")
@click.option("--coordinator", required=True, help="HOST:PORT of the coordinator.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for scripts.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for the coordinator.")
def status_command(coordinator, as_json, timeout) -> None:
    """Show the plan, every worker and the gateway; exit 1 when the mesh is not fully serving."""
    from rich.console import Console

    from stagemesh.coordinator.client import cluster_status
    from stagemesh.coordinator.status import render, status_dict

    data = status_dict(cluster_status(coordinator, timeout))
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        render(data, Console(width=None if sys.stdout.isatty() else 160))
    sys.exit(0 if data["serving"] else 1)


if __name__ == "__main__":
    main()
