"""The gateway process: follows the coordinator's topology, attaches the scheduler to stage 0 when the mesh
is ready, serves the public API. When the pipeline breaks it holds its requests while the coordinator
replaces the lost role with a spare, then replays them on the new pipeline (scheduler.suspend); when no
spare can take over, the requests fail with UNAVAILABLE and the reason. A coordinator that goes away is not a
change of topology: the gateway serves on the last one it had, through the coordinator's restart (whose
`restoring` topologies it ignores) until the restarted coordinator publishes a real one."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from stagemesh.coordinator.client import CoordinatorClient
from stagemesh.coordinator.roster import Topology
from stagemesh.errors import StagemeshError, Unavailable
from stagemesh.gateway.chat_template import ChatTemplate
from stagemesh.gateway.metrics import GatewayMetrics
from stagemesh.gateway.pipeline import PipelineLink
from stagemesh.gateway.scheduler import Scheduler, SchedulerLimits
from stagemesh.gateway.server import SERVICE, GenerationServicer
from stagemesh.gateway.tokenizer import TextCodec
from stagemesh.models.blocks import BlockAllocator
from stagemesh.models.config import ModelConfig
from stagemesh.proto import coordinator_pb2 as cpb
from stagemesh.proto import generation_pb2 as pb
from stagemesh.proto import generation_pb2_grpc as pb_grpc
from stagemesh.proto.rpc import advertised_host, bind, create_server, enable_reflection, run_service, set_serving
from stagemesh.telemetry import serve_metrics

log = logging.getLogger("stagemesh.gateway")


@dataclass(frozen=True)
class GatewayOptions:
    coordinator: str
    host: str = "127.0.0.1"
    port: int = 0
    advertise: str | None = None
    model_dir: str | None = None  # where this host sees the checkpoint (tokenizer, config), if not the plan's
    limits: SchedulerLimits = SchedulerLimits()
    connect_timeout: float = 30.0
    metrics_port: int | None = None  # Prometheus /metrics on this port (0 = a free one); None = off
    http_port: int | None = None  # the OpenAI-compatible HTTP API on this port (0 = a free one); None = off
    served_model_name: str | None = None  # the model's name on the HTTP API; None = the plan's model path
    # A broken stream with no change of topology this long after is not a lost worker (the coordinator
    # declares those within its heartbeat timeout, 3 s by default): the requests fail and a fresh stream opens.
    failure_grace: float = 6.0
    recovery_timeout: float = 120.0  # the longest requests are held while spares take over lost roles


class Gateway:
    """Follows the topology and owns what the servicer needs besides the scheduler."""

    def __init__(self, opts: GatewayOptions, scheduler: Scheduler, client: CoordinatorClient, health) -> None:
        self.opts, self.scheduler, self.client, self.health = opts, scheduler, client, health
        self.metrics = GatewayMetrics(scheduler)
        scheduler.observer = self.metrics
        self.topology: Topology | None = None
        self.config: ModelConfig | None = None
        self.codec: TextCodec | None = None
        self.chat_template: ChatTemplate | None = None
        self.link: PipelineLink | None = None
        self.address = ""
        self._suspensions = 0
        self._recent: list[tuple[float, int]] = []  # (time, tokens out) samples for tokens/s
        self._tasks: set[asyncio.Task] = set()  # referenced until done: the loop keeps only weak references

    # ---- topology ----

    async def follow(self) -> None:
        async for topology in self.client.topologies():
            if topology.restoring:  # a (re)started coordinator rebuilding its roster: keep the last topology
                if self.topology is None:
                    self.scheduler.not_ready = topology.reason
                continue
            self.topology = topology
            if topology.ready and (self.link is None or self.link.epoch != topology.pipeline_epoch):
                await self._attach(topology)
            elif not topology.ready and topology.recovering:
                await self._suspend(f"recovering: {topology.reason}")
            elif not topology.ready and (self.link is not None or self.scheduler.suspended):
                await self._detach(Unavailable(f"the mesh is not ready: {topology.reason}"))
            elif not topology.ready:
                self.scheduler.not_ready = topology.reason

    async def _attach(self, t: Topology) -> None:
        if self.link is not None:
            await self._suspend(f"the pipeline changed (epoch {t.pipeline_epoch})")
        plan = t.plan
        model_dir = self.opts.model_dir or plan.spec.model_dir
        if self.config is None:
            self.config = ModelConfig.from_dir(model_dir)
            self.codec = TextCodec.from_dir(model_dir)
            self.chat_template = ChatTemplate.from_dir(model_dir)
        link = PipelineLink(t.stage_addresses[0], t.pipeline_epoch, None, self._on_failure)
        link.on_result = lambda step_id, tokens, timings: self._on_result(link, step_id, tokens, timings)
        link.on_step_failure = lambda step_id, error: self._on_step_failure(link, step_id, error)
        self.link = link
        kv = BlockAllocator(t.kv_blocks, plan.spec.block_size)
        # The model's context bounds a request (INVALID_ARGUMENT beyond it); the KV cache only decides when it
        # runs: it waits for free blocks, or is RESOURCE_EXHAUSTED if the whole cache could never hold it.
        c = self.config
        args = (plan.parallel.pp, c.vocab_size, plan.spec.max_model_len, c.eos_token_ids)
        replayed = self.scheduler.replayed_tokens
        self.scheduler.attach(self.link, kv, *args)
        await set_serving(self.health, [SERVICE], True)
        log.info("attached to the mesh at pipeline epoch %d (%d KV blocks)", t.pipeline_epoch, t.kv_blocks)
        if self.scheduler.replayed_tokens > replayed:
            log.info("replaying %d tokens of history", self.scheduler.replayed_tokens - replayed)

    async def _suspend(self, reason: str) -> None:
        """Holds every request for the next pipeline; fails them if none comes in recovery_timeout."""
        link, self.link = self.link, None
        if link is not None:
            await link.close()
        if not self.scheduler.suspended:
            log.warning("holding requests: %s", reason)
            self._suspensions += 1
            self._spawn(self._give_up_after(self.opts.recovery_timeout, reason, self._suspensions))
        self.scheduler.suspend(reason)

    async def _give_up_after(self, seconds: float, reason: str, suspension: int) -> None:
        await asyncio.sleep(seconds)
        if suspension == self._suspensions and self.scheduler.suspended and self.link is None:
            await self._detach(Unavailable(f"no new pipeline in {seconds:.0f}s: {reason}"))

    async def _detach(self, error: StagemeshError) -> None:
        link, self.link = self.link, None
        self.scheduler.detach(error)
        await set_serving(self.health, [SERVICE], False)
        if link is not None:
            await link.close()

    def _on_result(self, link: PipelineLink, step_id: int, tokens, timings) -> None:
        if link is self.link:  # a result of a stream already given up is history the replay recomputes
            self.metrics.stage_timings(timings)
            self.scheduler.on_result(step_id, tokens)

    def _on_step_failure(self, link: PipelineLink, step_id: int, error: StagemeshError) -> None:
        """UNAVAILABLE (e.g. an expert worker gone) is a lost worker, handled like a broken stream: the
        requests are held and replayed. Other codes (out of memory) fail that step's requests only."""
        if link is not self.link:
            return
        if error.code == "UNAVAILABLE":
            return self._on_failure(error)
        self.scheduler.on_step_failure(step_id, error)

    def _on_failure(self, error: StagemeshError) -> None:
        self._spawn(self._recover(self.link, error))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def _recover(self, failed: PipelineLink | None, error: StagemeshError) -> None:
        """A broken stream: if it was UNAVAILABLE, hold the requests and wait for the coordinator to
        declare what happened (follow() replays or fails them); if the topology stays the same, or the
        error was of another kind, the requests fail and the next ones get a fresh stream."""
        if failed is not self.link:
            return
        if error.code != "UNAVAILABLE":
            return await self._fail_and_reopen(error)
        await self._suspend(str(error))
        epoch = failed.epoch
        await asyncio.sleep(self.opts.failure_grace)
        t = self.topology
        if self.link is None and self.scheduler.suspended and t is not None and t.ready and t.pipeline_epoch == epoch:
            await self._fail_and_reopen(error)

    async def _fail_and_reopen(self, error: StagemeshError) -> None:
        await self._detach(error)
        await asyncio.sleep(0.5)
        if self.link is None and self.topology is not None and self.topology.ready:
            await self._attach(self.topology)  # the next requests get a fresh stream

    # ---- numbers ----

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        self._recent = [(t, n) for t, n in self._recent if now - t <= 10.0] + [(now, self.scheduler.tokens_out)]
        (t0, n0), (t1, n1) = self._recent[0], self._recent[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    async def report(self) -> None:
        while True:
            s = self.scheduler
            report = cpb.GatewayReport(
                address=self.address,
                queued=len(s.waiting),
                running=len(s.running),
                tokens_per_second=self.tokens_per_second(),
                kv_blocks_used=s.kv_blocks_used,
                kv_blocks_total=s.kv.num_blocks if s.kv else 0,
                requests_total=s.requests_total,
            )
            try:
                await self.client.call("ReportGateway", report, timeout=5.0)
            except StagemeshError as e:
                log.warning("report: %s", e)
            await asyncio.sleep(1.0)

    def model_info(self) -> pb.ModelInfoResponse:
        if self.topology is None or self.config is None:
            raise Unavailable(f"not ready: {self.scheduler.not_ready}")
        plan, p, c = self.topology.plan, self.topology.plan.parallel, self.config
        return pb.ModelInfoResponse(
            model_type=c.model_type,
            architecture=_architecture(plan.spec.model_dir, self.opts.model_dir),
            vocab_size=c.vocab_size,
            max_context=self.scheduler.max_context,
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            tp=p.tp,
            pp=p.pp,
            ep=p.ep,
            stage_layers=[s.describe() for s in p.stages],
            dtype=plan.spec.dtype,
            kv_capacity_tokens=self.scheduler.kv.capacity_tokens if self.scheduler.kv else 0,
            has_tokenizer=self.codec is not None,
            eos_token_ids=c.eos_token_ids,
        )


def _architecture(plan_dir: str, override: str | None) -> str:
    import json

    raw = json.loads((Path(override or plan_dir) / "config.json").read_text())
    return (raw.get("architectures") or [""])[0]


async def run_gateway(opts: GatewayOptions) -> None:
    server, health = create_server(public=True)
    scheduler = Scheduler(opts.limits)
    client = CoordinatorClient(opts.coordinator)
    gateway = Gateway(opts, scheduler, client, health)
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(scheduler, gateway), server)
    enable_reflection(server, [SERVICE])
    advertise = advertised_host(opts.host, opts.advertise)
    gateway.address = f"{advertise}:{bind(server, opts.host, opts.port, public=True)}"
    await client.connect(opts.connect_timeout)
    if opts.metrics_port is not None:
        log.info(
            "metrics on http://%s:%d/metrics",
            opts.host,
            serve_metrics(gateway.metrics.registry, opts.host, opts.metrics_port),
        )
    background = [gateway.follow(), gateway.report()]
    if opts.http_port is not None:
        background.append(_start_http(opts, scheduler, gateway, advertise))
    await server.start()
    await set_serving(health, [SERVICE], False)
    await run_service("gateway", gateway.address, server, background=background)


def _start_http(opts: GatewayOptions, scheduler: Scheduler, gateway: Gateway, advertise: str):
    """Binds the HTTP API now and announces `http gateway address=HOST:PORT` (before the ready line, so
    launchers have it when they see that); returns the coroutine that serves it."""
    from stagemesh.gateway.http import http_server
    from stagemesh.gateway.openai_serving import OpenAIServing

    http = http_server(OpenAIServing(scheduler, gateway, opts.served_model_name), gateway, opts.host, opts.http_port)
    print(f"http gateway address={advertise}:{http.port} url={http.scheme}://{advertise}:{http.port}", flush=True)
    return http.serve()
