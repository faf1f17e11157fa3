"""`stagemesh bench`: prepares the checkpoints, runs the suite's case families one after another under a
progress bar (each starts and stops its own meshes and measures its baselines in the same run), then
writes results.json, results.md and the plots into --out and prints the table."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stagemesh.benchmarks.context import BenchContext
from stagemesh.benchmarks.results import Row, failed_row
from stagemesh.benchmarks.suite import SUITES, Suite


@dataclass(frozen=True)
class BenchOptions:
    suite: str = "quick"
    model_dir: str | None = None  # a Llama-family checkpoint; default: the suite's generated one
    mixtral_dir: str | None = None
    out: str = "bench-results"
    command: str = ""  # the command line that ran, for the report
    only: tuple[str, ...] = ()  # family names to run (runner.families(): decode, ..., experts-large); () = all


@dataclass(frozen=True)
class Family:
    """Cases that share meshes or models; `steps` is how far they move the progress bar; `rows` are the
    (key, what) of the rows they produce, listed so a family that crashes still leaves its rows."""

    name: str
    run: Callable[[BenchContext], list[Row]]
    steps: Callable[[Suite], int]
    rows: tuple[tuple[str, str], ...]


def families() -> list[Family]:
    from stagemesh.benchmarks import compiled, decode, experts, memory, parallel, serving

    return [
        Family(
            "decode",
            decode.run_decode,
            lambda s: 1,
            (("decode_vs_hf", "batch-1 decode vs HF"), ("decode_roofline", "batch-1 decode roofline")),
        ),
        Family(
            "compiled",
            compiled.run_compiled,
            lambda s: 6,
            (
                ("compiled_fp32_b1", "batch-1 decode, compiled, fp32"),
                ("compiled_roofline", "batch-1 decode, compiled, roofline"),
                ("compiled_fp32_b8", "batch-8 decode, compiled, fp32"),
                ("compiled_bf16_b1", "batch-1 decode, compiled, bf16"),
                ("compiled_bf16_b8", "batch-8 decode, compiled, bf16"),
            ),
        ),
        Family(  # apart, so a mesh that fails to start keeps the in-process numbers
            "compiled-mesh",
            compiled.run_compiled_mesh,
            lambda s: 3,
            (
                ("compiled_mesh_decode", "mesh (1,1) compiled decode"),
                ("compiled_mixed_throughput", "mixed-length throughput, compiled"),
            ),
        ),
        Family(
            "serving",
            serving.run_serving,
            lambda s: 3,
            (
                ("mesh_decode", "mesh (1,1) decode"),
                ("ttft", "time to first token"),
                ("mixed_throughput", "mixed-length throughput"),
            ),
        ),
        Family(
            "parallel",
            parallel.run_parallel,
            lambda s: 3 + len(parallel.sweep_points(s)) + len(parallel.PP_ROWS),
            (
                ("tp_latency", "tp=2 decode latency"),
                ("tp_latency_compiled", "tp=2 decode latency, compiled"),
                ("pp_throughput", "pp=2 throughput at the top concurrency"),
                ("pp_throughput_half", "pp=2 throughput at half of it"),
            ),
        ),
        Family("hop", parallel.run_hop, lambda s: 1, (("stage_hop", "one stage hop"),)),
        Family(
            "memory",
            memory.run_memory,
            lambda s: 1,
            (("param_bytes", "parameter bytes per worker"), ("load_rss", "peak RSS while loading")),
        ),
        Family(
            "experts",
            experts.run_experts,
            lambda s: 3,
            (
                ("moe_decode", "Mixtral decode, ep=2"),
                ("expert_ffn", "expert FFN throughput"),
                ("tp_dispatch", "Mixtral tp=2 dispatch"),
            ),
        ),
        Family(  # its own checkpoint (the suite's experts_preset), generated on first use
            "experts-large",
            experts.run_large_experts,
            lambda s: 1,
            (("expert_ffn_large", "expert FFN throughput, large experts"),),
        ),
    ]


def checkpoint(path: str | None, arch: str, preset: str) -> str:
    """`path`, or the suite's generated checkpoint under ./checkpoints/ (written on first use)."""
    if path:
        return path
    target = Path("checkpoints") / f"{preset}-{arch}"
    if not (target / "config.json").is_file() or not any(target.glob("*.safetensors")):
        from stagemesh.models.make_checkpoint import make_checkpoint

        make_checkpoint(target, arch, preset)
    return str(target)


def run_bench(opts: BenchOptions) -> int:
    """Runs the suite; returns 0, or 1 when a case failed to produce its numbers (missed targets are results)."""
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)
    suite, out = SUITES[opts.suite], Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    llama = checkpoint(opts.model_dir, "llama", suite.llama_preset)
    mixtral = checkpoint(opts.mixtral_dir, "mixtral", suite.mixtral_preset)
    ctx = BenchContext(suite, llama, mixtral, out)
    rows = run_families(ctx, console, opts.only)
    run = run_record(opts, ctx, time.perf_counter() - start)
    write_outputs(out, run, rows, ctx.series)
    from stagemesh.benchmarks.report import print_table

    print_table(console, rows)
    console.print(f"{opts.suite} suite: {run['wall_seconds']:.0f} s; results in {out}/")
    return 1 if any(r.verdict == "ERROR" for r in rows) else 0


def run_families(ctx: BenchContext, console, only: tuple[str, ...] = ()) -> list[Row]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    plan = [f for f in families() if not only or f.name in only]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    rows: list[Row] = []
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=sum(f.steps(ctx.suite) for f in plan))
        done = 0
        for family in plan:
            ctx.advance = _stepper(progress, task, done)
            rows += run_family(family, ctx, console)
            done += family.steps(ctx.suite)
            progress.update(task, completed=done)
        progress.update(task, description="done")
    return rows


def _stepper(progress, task, done: int) -> Callable[[str], None]:
    """ctx.advance for one family: names the measurement starting now; the bar counts those finished."""
    started = [0]

    def advance(what: str) -> None:
        progress.update(task, description=what, completed=done + started[0])
        started[0] += 1

    return advance


def run_family(family: Family, ctx: BenchContext, console) -> list[Row]:
    from rich.markup import escape

    try:
        rows = family.run(ctx)
    except Exception as e:  # one family's failure must not lose the others' numbers
        (ctx.out / "logs").mkdir(parents=True, exist_ok=True)
        with open(ctx.out / "logs" / f"{family.name}.error.txt", "w") as f:
            traceback.print_exc(file=f)
        reason = escape(f"{type(e).__name__}: {e}")
        console.print(f"[red]{family.name} failed: {reason}[/] (traceback in {ctx.out}/logs/)")
        rows = [failed_row(key, what, e) for key, what in family.rows]
    for r in rows:
        ratio = "" if r.ratio is None else f" ({r.ratio:.2f}x)"
        value = r.value if r.value is None else round(r.value, 3)
        console.print(
            f"{r.verdict:>5}  {escape(r.what)}: {value} {r.unit}{ratio}  [dim]{escape(r.note)}[/]", highlight=False
        )
    return rows


def run_record(opts: BenchOptions, ctx: BenchContext, wall: float) -> dict:
    from stagemesh.benchmarks.machine import describe_machine

    command = opts.command or " ".join(["stagemesh", *sys.argv[1:]])
    return {
        "suite": opts.suite,
        "command": command,
        "wall_seconds": wall,
        "machine": describe_machine(),
        "checkpoints": {"llama": ctx.llama, "mixtral": ctx.mixtral},
        "series": ctx.series,
    }


def write_outputs(out: Path, run: dict, rows: list[Row], series: dict) -> None:
    from stagemesh.benchmarks.plots import write_plots
    from stagemesh.benchmarks.report import markdown, write_json

    write_json(out / "results.json", run, rows)
    (out / "results.md").write_text(markdown(run, rows))
    write_plots(out, series, run["suite"])
