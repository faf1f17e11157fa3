"""A stage worker process: register with the coordinator, join the stage's TP group, load the shard,
serve `Forward` (TP rank 0) or follow the leader's broadcasts (other ranks), heartbeat until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
from stagemesh.coordinator.client import CoordinatorClient
from stagemesh.errors import CollectiveError, ResourceExhausted, StagemeshError, Unavailable
from stagemesh.models.compiled import CompiledDecode, CompileOptions
from stagemesh.models.dtypes import serving_dtype
from stagemesh.models.loader import build_model
from stagemesh.models.plan import ParallelPlan
from stagemesh.models.runner import ModelRunner
from stagemesh.models.tp import TPRank
from stagemesh.proto import coordinator_pb2 as cpb
from stagemesh.proto import stage_pb2_grpc
from stagemesh.proto.rpc import advertised_host, bind, create_server, enable_reflection, run_service, set_serving
from stagemesh.stage_worker.engine import StageEngine, StepWork
from stagemesh.stage_worker.expert_router import ExpertDirectory, ExpertPool, RemoteExperts
from stagemesh.stage_worker.faults import oom_fault
from stagemesh.stage_worker.server import SERVICE, StageServicer, peer_work
from stagemesh.stage_worker.tp_group import SHUTDOWN, TPGroup, create_store, exit_process
from stagemesh.telemetry import serve_metrics, worker_registry
from stagemesh.units import parse_bytes
from stagemesh.workers import StageWorkerOptions, device_memory

log = logging.getLogger("stagemesh.stage")


class StageRuntime:
    """What the Forward service needs: the engine, the TP group, the compute thread and the topology."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="compute")
        self.engine: StageEngine | None = None
        self.group: TPGroup | None = None
        self.stage = 0
        self.num_blocks = self.block_size = self.hidden_size = 0
        self.dtype = torch.float32
        self.links: set = set()
        self.epoch = 0
        self.stage_addresses: tuple[str, ...] = ()  # every stage's leader, as of pipeline epoch addresses_epoch
        self.addresses_epoch = -1  # -1: no ready topology seen yet
        self._addresses_changed = asyncio.Condition()
        self.experts = ExpertDirectory()
        self.broken: str | None = None
        self.group_lost = asyncio.Event()  # set from the compute thread when a collective failed
        self._loop = asyncio.get_running_loop()

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def compute(self, payload: bytes | None, work: StepWork):
        """Runs on the compute thread: broadcast the step to the TP peers, then compute this rank's part.

        A StagemeshError out of the step (its reservation ran out of memory, its experts are unreachable)
        is one every rank raised at the same point, so it fails this step only. A collective failure means
        the group is gone. Anything else (an out-of-memory mid-step, a bug) fails the step too when this
        rank computes alone, but with TP peers it leaves them inside a collective: the group is out of step.
        """
        if self.broken:
            raise Unavailable(self.broken)
        try:
            if self.group is not None:
                self.group.broadcast(payload)
            return self.engine.run(work)
        except CollectiveError as e:
            raise self._break(f"its tensor-parallel group failed ({e})") from None
        except StagemeshError:
            raise
        except Exception as e:
            if self.group is not None:
                raise self._break(f"a step failed on the leader alone, out of step with its TP peers ({e!r})") from e
            if isinstance(e, torch.OutOfMemoryError):
                raise ResourceExhausted(f"stage {self.stage} ran out of memory for this step: {e}") from None
            log.exception("step %d failed", work.step_id)
            raise StagemeshError(f"stage {self.stage} failed this step: {e!r}") from None

    def _break(self, reason: str) -> Unavailable:
        """Called on the compute thread; the process then leaves (leave_when_group_lost)."""
        self.broken = f"stage {self.stage}: {reason}"
        log.error("%s", self.broken)
        self._loop.call_soon_threadsafe(self.group_lost.set)
        return Unavailable(self.broken)

    async def leave_when_group_lost(self) -> None:
        """A broken group is not repaired in place: the process leaves, its role goes to a spare."""
        await self.group_lost.wait()
        raise Unavailable(f"{self.broken}; leaving so that a spare takes this role")

    async def set_stage_addresses(self, epoch: int, addresses: tuple[str, ...]) -> None:
        async with self._addresses_changed:
            self.stage_addresses, self.addresses_epoch = addresses, epoch
            self._addresses_changed.notify_all()

    async def stage_address(self, stage: int, epoch: int, timeout: float) -> str:
        """Stage `stage`'s leader as of pipeline epoch `epoch` or later. A stream of a new epoch can arrive
        a moment before this worker's own topology watch reports that epoch; the address known until then
        may be the dead worker's that a spare just replaced (TimeoutError after `timeout`)."""
        async with self._addresses_changed:
            await asyncio.wait_for(self._addresses_changed.wait_for(lambda: self.addresses_epoch >= epoch), timeout)
            return self.stage_addresses[stage]

    def on_epoch(self, epoch: int) -> None:
        """The coordinator's pipeline epoch, from heartbeats and the topology watch."""
        self.epoch = max(self.epoch, epoch)

    def stats(self) -> cpb.WorkerStats:
        engine = self.engine
        return cpb.WorkerStats(
            kv_blocks_used=sum(link.table.blocks_used for link in self.links),
            steps=engine.steps if engine else 0,
            busy_seconds=engine.busy_seconds if engine else 0.0,
            compile=_compile_info(engine.runner.compiled) if engine and engine.runner.compiled else None,
        )

    def follow_leader(self) -> None:
        """A peer rank's loop (compute thread): run every step the leader broadcasts until it says stop.
        A step's StagemeshError is one the leader raises too (see compute); a collective failure or any
        other error ends the loop, and with it this worker: the group cannot go on in step."""
        try:
            while (payload := self.group.broadcast()) != SHUTDOWN:
                try:
                    self.engine.run(peer_work(payload))
                except CollectiveError:
                    raise
                except StagemeshError as e:
                    log.warning("step failed: %s", e)
        except CollectiveError as e:
            raise Unavailable(f"stage {self.stage}: the tensor-parallel group failed, leaving ({e})") from None
        except Exception as e:
            raise Unavailable(f"stage {self.stage}: a step failed on this TP rank alone ({e!r}); leaving") from e


async def run_stage_worker(opts: StageWorkerOptions) -> None:
    """Listen, register, join the stage's TP group, load the shard, report ready, serve until stopped."""
    device = torch.device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    loop = asyncio.get_running_loop()
    runtime = StageRuntime()
    server, health = create_server()
    stage_pb2_grpc.add_StageServicer_to_server(StageServicer(runtime), server)
    enable_reflection(server, [SERVICE])
    advertise = advertised_host(opts.host, opts.advertise)
    address = f"{advertise}:{bind(server, opts.host, opts.port)}"
    await server.start()
    await set_serving(health, [SERVICE], False)

    client, assignment = await _register(opts, address, device)
    runtime.stage = assignment.stage
    heartbeat = asyncio.ensure_future(client.heartbeats(assignment.worker_id, runtime.stats, runtime.on_epoch))
    if opts.metrics_port is not None:
        role = {"stage": str(assignment.stage), "tp_rank": str(assignment.tp_rank)}
        port = serve_metrics(worker_registry(runtime.stats, role), opts.host, opts.metrics_port)
        log.info("metrics on http://%s:%d/metrics", opts.host, port)
    if assignment.plan.parallel.tp > 1:
        runtime.group = await _join_group(client, assignment, advertise, opts, device)
    runtime.engine = await loop.run_in_executor(runtime.executor, _load_shard, opts, assignment, runtime, device)
    await _report_ready(client, assignment, runtime)
    await set_serving(health, [SERVICE], True)
    background = [heartbeat, _watch(client, runtime), runtime.leave_when_group_lost()]
    if runtime.group and runtime.group.rank > 0:
        background.append(loop.run_in_executor(runtime.executor, runtime.follow_leader))
    code = 0
    try:
        await run_service(
            f"stage-worker stage={assignment.stage} rank={assignment.tp_rank}", address, server, background
        )
    except StagemeshError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    if runtime.group and runtime.group.rank == 0 and not runtime.broken:
        with contextlib.suppress(Exception):  # peers stopping at the same time need no goodbye
            await asyncio.wait_for(loop.run_in_executor(runtime.executor, runtime.group.broadcast, SHUTDOWN), 5)
    exit_process(code)


async def _register(opts: StageWorkerOptions, address: str, device: torch.device):
    client = CoordinatorClient(opts.coordinator)
    await client.connect(opts.connect_timeout)
    request = cpb.RegisterRequest(kind="stage", address=address, device=str(device), memory_bytes=device_memory(device))
    if opts.stage is not None or opts.tp_rank is not None:
        request.stage, request.tp_rank = opts.stage or 0, opts.tp_rank or 0
    assignment = await client.register(request, timeout=None)  # a spare waits here for a role
    log.info("assigned stage %d rank %d of %s", assignment.stage, assignment.tp_rank, assignment.plan.spec.model_dir)
    return client, assignment


def _load_shard(opts: StageWorkerOptions, assignment, runtime: StageRuntime, device: torch.device) -> StageEngine:
    """On the compute thread: build and load this rank's slice, size the KV pool from the budget."""
    plan, spec = assignment.plan, assignment.plan.spec
    tp = runtime.group.tp_rank if runtime.group else TPRank()
    dtype = serving_dtype(spec.dtype)
    remote = _remote_experts(plan.parallel, runtime, tp) if plan.parallel.ep else None
    stage = plan.parallel.stages[assignment.stage]
    model, _ = build_model(opts.model_dir or spec.model_dir, stage, tp, dtype, device, remote)
    blocks = max(1, _kv_budget(opts.kv_memory, device) // model.kv_bytes_per_block(spec.block_size, dtype))
    runtime.num_blocks, runtime.block_size = blocks, spec.block_size
    runtime.hidden_size, runtime.dtype = plan.hidden_size, dtype
    fault = oom_fault(assignment.stage, assignment.tp_rank)
    compile_options = CompileOptions.from_env() if opts.compile else None
    runner = ModelRunner(model, blocks, spec.block_size, device, compile=compile_options)
    if runner.compiled is not None:  # every TP rank compiles the same buckets in the same order (collectives)
        runner.compiled.warm_up()
    return StageEngine(runner, tp, fault)


def _compile_info(compiled: CompiledDecode) -> cpb.CompileInfo:
    s = compiled.stats
    return cpb.CompileInfo(
        graphs=s.graphs,
        warmup_seconds=s.warmup_seconds,
        compiled_steps=s.compiled_steps,
        eager_steps=s.eager_steps,
        buckets=compiled.describe_buckets(),
    )


async def _report_ready(client: CoordinatorClient, assignment, runtime: StageRuntime) -> None:
    model = runtime.engine.runner.model
    await client.call(
        "ReportReady",
        cpb.ReadyRequest(
            worker_id=assignment.worker_id,
            kv_blocks=runtime.num_blocks,
            param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
            kv_bytes_per_block=model.kv_bytes_per_block(runtime.block_size, runtime.dtype),
        ),
    )


def _remote_experts(plan: ParallelPlan, runtime: StageRuntime, tp: TPRank):
    """The factory that puts a RemoteExperts in each MoE layer (expert parallelism)."""
    experts = max(max(g) for g in plan.expert_groups) + 1
    owners = [plan.expert_owners(e) for e in range(experts)]
    pool = ExpertPool(lambda: runtime.experts)
    return lambda layer: RemoteExperts(layer, owners, pool, tp)


async def _join_group(client: CoordinatorClient, assignment, advertise: str, opts: StageWorkerOptions, device):
    loop = asyncio.get_running_loop()
    rank, size = assignment.tp_rank, assignment.plan.parallel.tp
    if rank == 0:
        store = create_store(opts.host, opts.dist_port, size, opts.group_timeout)
        await client.call(
            "SetRendezvous", cpb.RendezvousRequest(worker_id=assignment.worker_id, address=f"{advertise}:{store.port}")
        )
        return await loop.run_in_executor(None, TPGroup, rank, size, device, store, opts.group_timeout)
    return await loop.run_in_executor(None, TPGroup.join, rank, size, assignment.rendezvous, device, opts.group_timeout)


async def _watch(client: CoordinatorClient, runtime: StageRuntime) -> None:
    async for topology in client.topologies():
        runtime.on_epoch(topology.pipeline_epoch)
        runtime.experts = ExpertDirectory(tuple(topology.expert_addresses), tuple(topology.expert_alive))
        if topology.ready:
            await runtime.set_stage_addresses(topology.pipeline_epoch, tuple(topology.stage_addresses))


def _kv_budget(kv_memory: str | None, device: torch.device) -> int:
    if kv_memory is not None:
        return parse_bytes(kv_memory, "--kv-memory")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return 256 * 2**20
