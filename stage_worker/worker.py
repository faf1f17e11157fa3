"""A stage worker process: register with the coordinator, join the stage's TP group, load the shard,
serve `Forward` (TP rank 0) or follow the leader's broadcasts (other ranks), heartbeat until stopped (or
drained); a restarted coordinator gets the role back from the heartbeats (coordinator.client.Membership).
A TP group that fails (a rank died) is re-formed in place: steps are refused meanwhile, weights stay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
from stagemesh.coordinator.client import CoordinatorClient, Membership
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
from stagemesh.stage_worker.group_formation import GroupFormation
from stagemesh.stage_worker.server import SERVICE, StageServicer, peer_work
from stagemesh.stage_worker.tp_group import SHUTDOWN, TPGroup, exit_process
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
        self.broken: str | None = None  # why steps are refused (the TP group is being re-formed)
        self.regroup = asyncio.Event()  # set when the group must be re-formed (keep_group)
        self.group_serving = False  # formed and serving: a larger group epoch from the coordinator re-forms
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
        Either way the group is re-formed (keep_group) and steps are refused (UNAVAILABLE) until then.
        """
        if self.broken:
            raise Unavailable(self.broken)
        try:
            if self.group is not None:
                self.group.broadcast(payload)
            return self.engine.run(work)
        except CollectiveError as e:
            raise self._group_failed(f"its tensor-parallel group failed ({e})") from None
        except StagemeshError:
            raise
        except Exception as e:
            if isinstance(e, torch.OutOfMemoryError):
                error = ResourceExhausted(f"stage {self.stage} ran out of memory for this step: {e}")
            else:
                log.exception("step %d failed", work.step_id)
                error = StagemeshError(f"stage {self.stage} failed this step: {e!r}")
            if self.group is not None:  # this step fails with its own code; the next ones wait for the group
                self._group_failed(f"a step failed on the leader alone, out of step with its peers ({e!r})")
            raise error from None

    def _group_failed(self, reason: str) -> Unavailable:
        """On the compute thread: refuse steps until keep_group has re-formed the group."""
        self.broken = f"stage {self.stage}: {reason}"
        log.error("%s", self.broken)
        self._loop.call_soon_threadsafe(self.regroup.set)
        return Unavailable(self.broken)

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

    def on_heartbeat(self, reply: cpb.HeartbeatReply) -> None:
        """A group epoch beyond this rank's: a rank of the stage was lost while this one had no collective
        in flight to notice. Ranks waiting in a shared-memory collective give up at once (abort)."""
        self.on_epoch(reply.epoch)
        if self.group is not None and self.group_serving and reply.group_epoch > self.group.epoch:
            self.group_serving = False
            self.broken = self.broken or f"stage {self.stage}: its group moves to epoch {reply.group_epoch}"
            self.group.abort()
            self.regroup.set()

    async def keep_group(self, formation: GroupFormation, report_ready) -> None:
        """Runs for the worker's life: a peer rank follows the leader's steps; whenever the group fails,
        it is re-formed under the coordinator's next group epoch, and the stage serves again."""
        loop = asyncio.get_running_loop()
        while True:
            if self.group.rank > 0:
                reason = await loop.run_in_executor(self.executor, self.follow_leader)
                if reason is None:
                    return  # the leader stopped: so does this rank
                self.broken = self.broken or f"stage {self.stage}: {reason}"
            else:
                await self.regroup.wait()
            self.group_serving = False
            self.group.abort()
            failed = self.group.epoch
            log.warning("%s; re-forming the group (epoch %d failed)", self.broken, failed)
            await loop.run_in_executor(self.executor, lambda: None)  # the compute thread is idle, and
            self.regroup.clear()  # a step that was in flight has already reported its failure
            await formation.form(self.executor, failed)
            if self.engine.runner.compiled is not None:  # the same warm-up steps as a spare's (collectives)
                await loop.run_in_executor(self.executor, self.engine.runner.compiled.warm_up, self.engine.tp)
            self.broken = None
            self.group_serving = True
            await report_ready()

    def stats(self) -> cpb.WorkerStats:
        engine = self.engine
        return cpb.WorkerStats(
            kv_blocks_used=sum(link.table.blocks_used for link in self.links),
            steps=engine.steps if engine else 0,
            busy_seconds=engine.busy_seconds if engine else 0.0,
            compile=_compile_info(engine.runner.compiled) if engine and engine.runner.compiled else None,
        )

    def follow_leader(self) -> str | None:
        """A peer rank's loop (compute thread): run every step the leader broadcasts until it says stop
        (returns None) or a collective fails (returns why: the group is re-formed). A step's
        StagemeshError is one the leader raises too (see compute); any other error ends this worker."""
        try:
            while (payload := self.group.broadcast()) != SHUTDOWN:
                try:
                    self.engine.run(peer_work(payload))
                except CollectiveError:
                    raise
                except StagemeshError as e:
                    log.warning("step failed: %s", e)
            return None
        except CollectiveError as e:
            return f"its tensor-parallel group failed ({e})"
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

    client, request, assignment = await _register(opts, address, device)
    runtime.stage = assignment.stage
    membership = Membership(client, request, assignment, lambda: _held(runtime))
    heartbeat = asyncio.ensure_future(_heartbeat_until_drained(membership, runtime))
    if opts.metrics_port is not None:
        role = {"stage": str(assignment.stage), "tp_rank": str(assignment.tp_rank)}
        port = serve_metrics(worker_registry(runtime.stats, role), opts.host, opts.metrics_port)
        log.info("metrics on http://%s:%d/metrics", opts.host, port)
    formation = None
    if assignment.plan.parallel.tp > 1:
        runtime.group = TPGroup(assignment.tp_rank, assignment.plan.parallel.tp, device, opts.group_timeout)
        formation = GroupFormation(membership, runtime.group, opts.host, advertise, opts.dist_port)
        await formation.form(runtime.executor)
    runtime.engine = await loop.run_in_executor(runtime.executor, _load_shard, opts, assignment, runtime, device)
    await _report_ready(client, membership, runtime)
    runtime.group_serving = True
    await set_serving(health, [SERVICE], True)
    background = [heartbeat, _watch(client, runtime)]
    if formation is not None:
        background.append(runtime.keep_group(formation, lambda: _report_ready(client, membership, runtime)))
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
    assignment = await client.register(request, timeout=None, patience=opts.connect_timeout)  # spares wait here
    log.info("assigned stage %d rank %d of %s", assignment.stage, assignment.tp_rank, assignment.plan.spec.model_dir)
    return client, request, assignment


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
        runner.compiled.warm_up(tp)
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


def _holdings(runtime: StageRuntime) -> dict:
    model = runtime.engine.runner.model
    return {
        "kv_blocks": runtime.num_blocks,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "kv_bytes_per_block": model.kv_bytes_per_block(runtime.block_size, runtime.dtype),
    }


async def _report_ready(client: CoordinatorClient, membership: Membership, runtime: StageRuntime) -> None:
    group_epoch = runtime.group.epoch if runtime.group else 0
    request = cpb.ReadyRequest(worker_id=membership.worker_id, group_epoch=group_epoch, **_holdings(runtime))
    await client.call("ReportReady", request)


def _held(runtime: StageRuntime) -> cpb.Rejoin:
    """What this worker holds, for a coordinator that restarted (Membership rejoins with it)."""
    held = cpb.Rejoin(state="ready" if runtime.ready else "registered", pipeline_epoch=runtime.epoch)
    held.group_epoch = max(runtime.group.epoch, 0) if runtime.group else 0
    if runtime.ready:
        held.MergeFrom(cpb.Rejoin(**_holdings(runtime)))
    return held


async def _heartbeat_until_drained(membership: Membership, runtime: StageRuntime) -> None:
    """Heartbeats until the coordinator drains this worker; then waits (10 s at most) for the pipeline
    streams through it to close (the gateway moves to the spare's pipeline) and returns: the worker stops."""
    await membership.heartbeats(runtime.stats, runtime.on_heartbeat)
    for _ in range(100):
        if not runtime.links:
            return
        await asyncio.sleep(0.1)


def _remote_experts(plan: ParallelPlan, runtime: StageRuntime, tp: TPRank):
    """The factory that puts a RemoteExperts in each MoE layer (expert parallelism)."""
    experts = max(max(g) for g in plan.expert_groups) + 1
    owners = [plan.expert_owners(e) for e in range(experts)]
    pool = ExpertPool(lambda: runtime.experts)
    return lambda layer: RemoteExperts(layer, owners, pool, tp)


async def _watch(client: CoordinatorClient, runtime: StageRuntime) -> None:
    async for topology in client.topologies():
        if topology.restoring:  # a restarted coordinator rebuilding its roster: the last topology holds
            continue
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
