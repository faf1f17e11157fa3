"""Turns a run's rows into what people read: results.json (everything, with raw samples), a markdown table
with the misses explained, and the same table on the terminal."""

from __future__ import annotations

import json
from pathlib import Path

from stagemesh.benchmarks.machine import machine_line
from stagemesh.benchmarks.results import Row

COLUMNS = ("what", "baseline (same run)", "value", "baseline value", "ratio", "target", "result")


def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    text = f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{text} {unit}".strip()


def cells(row: Row) -> list[str]:
    ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
    target = "-" if row.target is None else row.target.describe()
    return [
        row.what,
        row.baseline,
        fmt(row.value, row.unit),
        fmt(row.baseline_value, row.unit),
        ratio,
        target,
        row.verdict,
    ]


def write_json(path: Path, run: dict, rows: list[Row]) -> None:
    path.write_text(json.dumps({**run, "rows": [r.to_dict() for r in rows]}, indent=2, default=float) + "\n")


def markdown(run: dict, rows: list[Row]) -> str:
    lines = [
        f"Suite `{run['suite']}`: `{run['command']}`, {run['wall_seconds']:.0f} s wall.",
        "",
        f"Machine: {machine_line(run['machine'])}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |" for r in rows]
    lines += ["", "Notes:", ""] + [f"* **{r.what}**: {r.note}" for r in rows if r.note]
    missed = [r for r in rows if r.missed]
    if missed:
        lines += ["", "Misses:", ""]
        for r in missed:
            short = r.target.shortfall(r) if r.target and r.value is not None else r.note
            lines += [f"* **{r.what}**: {short}.", "", "  ```", *[f"  {p}" for p in r.profile], "  ```", ""]
    return "\n".join(lines).rstrip() + "\n"


def print_table(console, rows: list[Row]) -> None:
    from rich.table import Table

    table = Table(title="stagemesh bench", show_lines=False)
    for col in COLUMNS:
        table.add_column(col, overflow="fold")
    for r in rows:
        style = {"MISS": "red", "ERROR": "red", "pass": "green"}.get(r.verdict, "")
        table.add_row(*cells(r), style=style)
    console.print(table)
    for r in rows:
        if r.missed and r.target is not None and r.value is not None:
            console.print(f"[red]miss[/] {r.what}: {r.target.shortfall(r)}")
        elif r.verdict == "ERROR":
            console.print(f"[red]error[/] {r.what}: {r.note}")
