"""`stagemesh bench --suite soak [--minutes M] [--chaos]`: bounded concurrent clients on a real mesh for M
minutes, with random lengths, cancellations and invalid requests mixed in; with --chaos a random stage
worker is killed every K seconds and a spare is started in its place. Every good request's tokens are
compared with a failure-free reference computed on the same mesh before the clients start; the report
says how many good requests failed (must be 0), how long each recovery took, latency, and whether RSS and
KV blocks came back to their baseline."""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from stagemesh.benchmarks.chaos import (
    Usage,
    UsageSampler,
    event_delays,
    kill,
    pipeline_epoch,
    process_at,
    replace_spare,
    settled_usage,
    stage_roles,
    wait_whole,
)
from stagemesh.benchmarks.report import fmt
from stagemesh.benchmarks.results import Row, Target
from stagemesh.benchmarks.timing import percentiles
from stagemesh.coordinator.client import cluster_events, cluster_status
from stagemesh.deploy.commands import MeshLayout
from stagemesh.errors import StagemeshError
from stagemesh.gateway.client import Client, GatewayError, GenerationParams


@dataclass(frozen=True)
class SoakOptions:
    minutes: float = 3.0  # how long the clients send requests
    chaos: bool = False
    kill_every: float = 20.0  # seconds between kills (at least `settle` after the previous recovery ended)
    settle: float = 3.0
    clients: int = 6  # concurrent client threads, each with one request at a time
    pool: int = 32  # distinct good requests, each with its reference output
    prompt_tokens: tuple[int, int] = (4, 64)
    max_tokens: tuple[int, int] = (4, 64)
    cancel_share: float = 0.1  # of the requests sent: closed by the client mid-stream
    invalid_share: float = 0.1  # of the requests sent: must be refused with INVALID_ARGUMENT
    tp: int = 1
    pp: int = 2
    spares: int = 1
    preset: str = "small"  # the generated Llama used when --model is not given
    dtype: str = "float64"  # outputs are compared token for token: float32 ties could flip under replay
    kv_memory: str = "64MiB"
    rss_tolerance: float = 0.10  # RSS after may exceed RSS before by this fraction and still be "baseline"
    request_timeout: float = 180.0  # a client's deadline; the gateway waits up to 120 s for a recovery
    seed: int = 0


@dataclass(frozen=True)
class Spec:
    """One good request of the pool: greedy, or seeded sampling (both reproducible across a replay)."""

    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float | None = None
    seed: int | None = None

    def params(self) -> GenerationParams:
        return GenerationParams(
            list(self.prompt), self.max_tokens, temperature=self.temperature, seed=self.seed, ignore_eos=True
        )


def spec_pool(opts: SoakOptions, vocab: int) -> list[Spec]:
    rng = random.Random(opts.seed)
    pool = []
    for i in range(opts.pool):
        prompt = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(*opts.prompt_tokens)))
        n = rng.randint(*opts.max_tokens)
        pool.append(Spec(prompt, n, 0.8, 1000 + i) if i % 3 == 2 else Spec(prompt, n))
    return pool


def invalid_requests(vocab: int, context: int) -> dict[str, GenerationParams]:
    """Requests the gateway must refuse with INVALID_ARGUMENT, by what is wrong with them."""
    return {
        "empty prompt": GenerationParams([], max_tokens=4),
        "token id out of vocab": GenerationParams([5, vocab + 7, 9], max_tokens=4),
        "max_tokens 0": GenerationParams([5, 6, 7], max_tokens=0),
        "max_tokens -3": GenerationParams([5, 6, 7], max_tokens=-3),
        "prompt + max_tokens over the context": GenerationParams([5, 6, 7], max_tokens=context),
    }


def references(gateway: str, pool: list[Spec], workers: int) -> list[tuple[int, ...]]:
    """Each spec's output on the mesh before any failure, `workers` requests at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with Client(gateway, timeout=300) as client, ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda s: tuple(client.generate(s.params()).token_ids), pool))


@dataclass
class Stream:
    """A good request as its client saw it (times from time.monotonic)."""

    spec: int
    cancel_after: int | None  # close the stream after this many tokens
    sent: float
    arrivals: list[float] = field(default_factory=list)  # one per token
    tokens: list[int] = field(default_factory=list)
    ended: float | None = None
    error: str | None = None


@dataclass
class Tally:
    completed: int = 0
    cancelled: int = 0
    invalid_sent: int = 0
    invalid_rejected: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, sent -> last token, completed good requests
    ttfts: list[float] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # every failed good (or wrongly served invalid) request


class Clients:
    """`opts.clients` threads sending requests until `stop`; the streams in flight are visible to the chaos
    loop (`in_flight`), and every outcome is counted in `tally` as its request ends."""

    def __init__(self, gateway: str, opts: SoakOptions, pool: list[Spec], expected, invalid) -> None:
        self.gateway, self.opts, self.pool, self.expected = gateway, opts, pool, expected
        self.invalid = list(invalid.items())
        self.tally = Tally()
        self.active: set[int] = set()  # ids of the Streams now open
        self.streams: dict[int, Stream] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.start_time = time.monotonic()
        self.last_kill: tuple[float, str] | None = None  # (monotonic time, role), for the failure reports
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(opts.clients)]

    def start(self) -> None:
        self.start_time = time.monotonic()
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))

    def _run(self, index: int) -> None:
        rng = random.Random(self.opts.seed * 1000 + index + 1)
        with Client(self.gateway, timeout=self.opts.request_timeout) as client:
            while not self.stop.is_set():
                draw = rng.random()
                if draw < self.opts.invalid_share:
                    self._send_invalid(client, *rng.choice(self.invalid))
                    continue
                spec = rng.randrange(len(self.pool))
                cancel = draw < self.opts.invalid_share + self.opts.cancel_share
                self._send_good(client, spec, rng.randint(1, self.pool[spec].max_tokens - 1) if cancel else None)

    def _send_invalid(self, client: Client, what: str, params: GenerationParams) -> None:
        try:
            got = list(client.stream(params))
            outcome = f"served ({sum(len(c.token_ids) for c in got)} tokens)"
        except GatewayError as e:
            outcome = None if e.code == grpc.StatusCode.INVALID_ARGUMENT else str(e)
        with self.lock:
            self.tally.invalid_sent += 1
            if outcome is None:
                self.tally.invalid_rejected += 1
            else:
                self.tally.failures.append({"request": f"invalid: {what}", "error": outcome, **self._when()})

    def _send_good(self, client: Client, spec: int, cancel_after: int | None) -> None:
        s = Stream(spec, cancel_after, time.monotonic())
        with self.lock:
            key = id(s)
            self.streams[key] = s
            self.active.add(key)
        chunks = client.stream(self.pool[spec].params())
        try:
            for chunk in chunks:
                s.arrivals += [time.monotonic()] * len(chunk.token_ids)
                s.tokens += chunk.token_ids
                if cancel_after is not None and len(s.tokens) >= cancel_after:
                    break
        except GatewayError as e:
            s.error = str(e)
        finally:
            chunks.close()  # a break leaves the generator: closing it cancels the call now
            s.ended = time.monotonic()
        with self.lock:
            self.active.discard(key)
            del self.streams[key]
            self._count(s)

    def _count(self, s: Stream) -> None:
        problem = s.error or mismatch(s.tokens, self.expected[s.spec], whole=s.cancel_after is None)
        if problem is not None:
            self.tally.failures.append({"request": f"pool[{s.spec}]", "tokens": len(s.tokens), "error": problem})
            self.tally.failures[-1].update(self._when(s.sent))
        elif s.cancel_after is not None:
            self.tally.cancelled += 1
        else:
            self.tally.completed += 1
            self.tally.latencies.append(s.ended - s.sent)
            self.tally.ttfts.append(s.arrivals[0] - s.sent)

    def _when(self, sent: float | None = None) -> dict:
        now = time.monotonic()
        out = {"at": round(now - self.start_time, 2)}
        if sent is not None:
            out["sent_at"] = round(sent - self.start_time, 2)
        if self.last_kill:
            out["after_kill_of"] = self.last_kill[1]
            out["seconds_after_kill"] = round(now - self.last_kill[0], 2)
        return out

    def in_flight(self) -> list[Stream]:
        with self.lock:
            return [self.streams[k] for k in self.active]


def mismatch(got: list[int], want: tuple[int, ...], whole: bool) -> str | None:
    """How `got` differs from the reference (`whole`: it must be all of it, else a prefix); None if it does not."""
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if at is not None:
        return f"token {at} is {got[at]}, the failure-free run gave {want[at]}"
    if len(got) > len(want) or (whole and len(got) != len(want)):
        return f"{len(got)} tokens, the failure-free run gave {len(want)}"
    return None


@dataclass
class Kill:
    at: float  # seconds since the clients started
    role: str
    pid: int
    streams: int  # good streams open at the kill
    mid_stream: int  # of those, streams that had tokens already
    recovery: float | None  # seconds until each of them had its next token (or ended); None: not within the limit
    wall: float = 0.0  # time.time() of the kill
    dead_after: float | None = None  # the coordinator's `dead` event, seconds after the kill
    ready_after: float | None = None  # the `ready` of the worker that took the role over


def resumed(s: Stream, since: float, whole_at: float) -> float | None:
    """When stream `s` got going again after an outage that began at `since` and was over (the mesh whole
    again) by `whole_at`: the token ending the longest silence among its arrivals from `since` to its first
    arrival after `whole_at` (tokens already on their way at the kill do not count as recovered), or its end;
    None while it has neither."""
    later = [t for t in s.arrivals if t > since]
    first_after = next((i for i, t in enumerate(later) if t > whole_at), None)
    if first_after is not None:
        later = later[: first_after + 1]
    elif s.ended is not None:
        later.append(s.ended)
    else:
        return None
    points = [since, *later]
    gaps = [b - a for a, b in zip(points, points[1:])]
    return points[gaps.index(max(gaps)) + 1]


def wait_recovered(streams: list[Stream], since: float, whole_at: float, timeout: float) -> float | None:
    """Seconds from `since` until every stream in `streams` resumed (or ended); None if not within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        times = [resumed(s, since, whole_at) for s in streams]
        if None not in times:
            return max((t - since for t in times), default=0.0)
        time.sleep(0.02)
    return None


def kill_one(mesh, clients: Clients, rng: random.Random, opts: SoakOptions, kills: list[Kill]) -> float:
    """Kills a random stage worker while streams are open (added to `kills`), waits for the mesh to be whole
    again and measures the recovery; returns the kill's wall-clock time (for the coordinator's events)."""
    roles, epoch = stage_roles(mesh), pipeline_epoch(mesh)
    role = rng.choice(sorted(roles))
    child = process_at(mesh, roles[role])
    open_streams = clients.in_flight()
    at, wall = time.monotonic(), kill(child)
    clients.last_kill = (at, role)
    mid = sum(1 for s in open_streams if s.arrivals and s.arrivals[0] < at and (s.ended is None or s.ended > at))
    kills.append(Kill(round(at - clients.start_time, 2), role, child.proc.pid, len(open_streams), mid, None))
    wait_whole(mesh, 0, after_epoch=epoch, timeout=opts.request_timeout)
    kills[-1].recovery = wait_recovered(open_streams, at, time.monotonic(), opts.request_timeout)
    return wall


def chaos(
    mesh, clients: Clients, opts: SoakOptions, deadline: float, log_path: Path, say=print
) -> tuple[list[Kill], str]:
    """Kills every `kill_every` s (each once the mesh is whole with its spares, and `settle` s after the last
    recovery) until too little time is left to see a recovery, starting a spare after each; returns the
    kills and why chaos stopped early ("" when it did not)."""
    rng, kills = random.Random(opts.seed), []
    next_at = clients.start_time + opts.kill_every
    while next_at < deadline - opts.settle:
        time.sleep(max(0.0, next_at - time.monotonic()))
        try:
            wait_whole(mesh, opts.spares)
        except StagemeshError as e:
            return kills, f"chaos stopped: {e}"
        _wait_mid_stream(clients)
        if time.monotonic() >= deadline - opts.settle:
            break
        try:
            wall = kill_one(mesh, clients, rng, opts, kills)
        except StagemeshError as e:
            return kills, f"chaos stopped during a kill: {e}"
        k = kills[-1]
        k.wall = wall
        replace_spare(mesh, log_path)
        for key, value in event_delays(mesh, k.role, wall).items():
            setattr(k, key, value)
        say(f"killed {k.role} at {k.at:.0f} s ({k.mid_stream} streams mid-way): recovery {fmt(k.recovery, 's')}")
        if k.recovery is None:
            return kills, f"chaos stopped: no recovery within {opts.request_timeout:.0f} s of killing {k.role}"
        next_at = max(clients.start_time + k.at + opts.kill_every, time.monotonic() + opts.settle)
    return kills, ""


def _wait_mid_stream(clients: Clients, timeout: float = 30.0) -> None:
    """Until a good stream has tokens and is still open, so the kill lands mid-stream."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(s.arrivals and s.ended is None for s in clients.in_flight()):
        time.sleep(0.01)


@dataclass
class SoakResult:
    tally: Tally
    kills: list[Kill]
    before: Usage  # settled, after the references and before the clients
    peak: Usage  # the largest of each while the clients ran
    after: Usage  # settled, after the clients stopped
    seconds: float  # how long the clients sent requests
    spares_after: int
    stopped: str = ""  # why chaos stopped early ("" = it did not)
    stuck: int = 0  # client threads still waiting for their request at the end
    unplanned: list[dict] = field(default_factory=list)  # the coordinator's `dead` events no kill explains


def unplanned_deaths(events: list[dict], kills: list[Kill]) -> list[dict]:
    """`dead` events (coordctl events) that are not the role of a kill within 10 s of it: e.g. a worker
    whose heartbeats a starved machine delayed past the timeout."""
    from datetime import datetime

    def explained(e: dict) -> bool:
        t = datetime.fromisoformat(e["time"]).timestamp()
        return any(e["detail"].startswith(k.role) and 0 <= t - k.wall < 10 for k in kills)

    return [e for e in events if e["kind"] == "dead" and not explained(e)]


def soak(mesh, opts: SoakOptions, log_path: Path, say=print) -> SoakResult:
    """The references, then the clients (and the chaos) for `opts.minutes`; `say` reports progress."""
    wait_whole(mesh, opts.spares)
    say(f"mesh up ({opts.spares} spare(s) waiting); computing {opts.pool} reference outputs")
    with Client(mesh.gateway, timeout=30) as client:
        info = client.model_info()
    pool = spec_pool(opts, info.vocab_size)
    expected = references(mesh.gateway, pool, opts.clients)
    before = settled_usage(mesh)
    say(f"clients start: {opts.minutes:g} min" + (f", a kill every {opts.kill_every:g} s" if opts.chaos else ""))
    clients = Clients(mesh.gateway, opts, pool, expected, invalid_requests(info.vocab_size, info.max_context))
    with UsageSampler(mesh) as sampler:
        clients.start()
        deadline = clients.start_time + opts.minutes * 60
        kills, stopped = chaos(mesh, clients, opts, deadline, log_path, say) if opts.chaos else ([], "")
        time.sleep(max(0.0, deadline - time.monotonic()))
        clients.join(opts.request_timeout + 30)
        seconds = time.monotonic() - clients.start_time
    say("clients stopped; waiting for the mesh to settle")
    stuck = clients.in_flight()
    for s in stuck:
        clients.tally.failures.append({"request": f"pool[{s.spec}]", "tokens": len(s.tokens), "error": "no end"})
    after = settled_usage(mesh)
    spares = len(cluster_status(mesh.coordinator).spares)
    unplanned = unplanned_deaths(cluster_events(mesh.coordinator), kills)
    peak = sampler.peak()
    return SoakResult(clients.tally, kills, before, peak, after, seconds, spares, stopped, len(stuck), unplanned)


def soak_layout(model_dir: str, opts: SoakOptions) -> MeshLayout:
    """One torch thread per worker, pipelines balanced, `spares` stage spares started after the mesh serves."""
    return MeshLayout(
        model_dir,
        opts.tp,
        opts.pp,
        0,
        layers="balanced" if opts.pp > 1 else None,
        dtype=opts.dtype,
        threads=1,
        kv_memory=opts.kv_memory,
        spares=opts.spares,
    )


def _mb(n: int) -> float:
    return n / 1e6


def good_failures(t: Tally) -> list[dict]:
    return [f for f in t.failures if not f["request"].startswith("invalid")]


def soak_rows(r: SoakResult, opts: SoakOptions) -> list[Row]:
    t, failed = r.tally, good_failures(r.tally)
    rows = [
        Row(
            "soak_good_failed",
            f"good requests failed, of {t.completed + t.cancelled + len(failed)} sent "
            f"({t.completed} completed, {t.cancelled} closed mid-stream by their client)",
            "failure-free outputs of the same requests, same mesh",
            len(failed),
            None,
            "requests",
            None,
            Target("value<=", 0, "requests"),
            note="failed = an error status, a token that differs from the reference, or a wrong length "
            f"({sum(1 for i in range(opts.pool) if i % 3 == 2)} of the {opts.pool} pooled requests sample with "
            "a seed at temperature 0.8, the rest are greedy)",
            detail={"completed": t.completed, "cancelled": t.cancelled, "failures": failed},
        ),
        Row(
            "soak_invalid",
            "invalid requests refused with INVALID_ARGUMENT",
            "invalid requests sent",
            t.invalid_rejected,
            t.invalid_sent,
            "requests",
            t.invalid_rejected / max(1, t.invalid_sent),
            Target("ratio>=", 1.0),
            note="empty prompt, a token id out of the vocabulary, max_tokens 0 or negative, prompt + max_tokens "
            "over the context",
            detail={"failures": [f for f in t.failures if f not in failed]},
        ),
    ]
    rows += kill_rows(r) if opts.chaos else []
    rows.append(deaths_row(r))
    return rows + latency_rows(t) + resource_rows(r, opts)


def kill_rows(r: SoakResult) -> list[Row]:
    kills = [asdict(k) for k in r.kills]
    times = [k.recovery for k in r.kills if k.recovery is not None]
    dead = [k.dead_after for k in r.kills if k.dead_after is not None]
    ready = [k.ready_after for k in r.kills if k.ready_after is not None]
    detect = f"detected (coordinator's `dead`) p50 {percentiles(dead)['p50'] or 0:.1f} s" if dead else ""
    load = f"; the spare ready p50 {percentiles(ready)['p50']:.1f} s after the kill" if ready else ""
    what = "recovery per kill: kill -> next token on every stream open at the kill"
    note = f"{detect}{load} (a worker is dead 3 s after its last heartbeat, which came up to 0.5 s before the kill)"
    note += f"; {r.stopped}" if r.stopped else ""
    return [
        Row(
            "soak_kills",
            "stage workers killed (kill -9) mid-stream, each replaced by a new spare",
            "",
            len(r.kills),
            None,
            "kills",
            None,
            note=", ".join(f"{k.role} at {k.at:.0f} s ({k.mid_stream} streams mid-way)" for k in r.kills),
            detail={"kills": kills, "spares_after": r.spares_after, "stopped": r.stopped},
        ),
        Row("soak_recovery_p50", f"{what}, p50", "", percentiles(times)["p50"], None, "s", None, note=note),
        Row("soak_recovery_max", f"{what}, max", "", max(times, default=None), None, "s", None),
    ]


def deaths_row(r: SoakResult) -> Row:
    return Row(
        "soak_unplanned_deaths",
        "workers declared dead that no kill explains",
        "",
        len(r.unplanned),
        None,
        "workers",
        None,
        note="; ".join(f"{e['time']} {e['detail']}" for e in r.unplanned),
        detail={"events": r.unplanned},
    )


def latency_rows(t: Tally) -> list[Row]:
    e2e, ttft = percentiles(t.latencies), percentiles(t.ttfts)
    what = "latency of completed good requests (sent -> last token)"
    note = lambda p: f"time to first token {p} {ttft[p] or 0:.2f} s; outages included"  # noqa: E731
    return [
        Row("soak_latency_p50", f"{what}, p50", "", e2e["p50"], None, "s", None, note=note("p50")),
        Row("soak_latency_p99", f"{what}, p99", "", e2e["p99"], None, "s", None, note=note("p99")),
    ]


def resource_rows(r: SoakResult, opts: SoakOptions) -> list[Row]:
    b, p, a = r.before, r.peak, r.after
    return [
        Row(
            "soak_kv_after",
            "KV blocks in use after the run (stage workers + gateway)",
            "before the clients started",
            a.kv,
            b.kv,
            "blocks",
            None,
            Target("value<=", 0, "blocks"),
            note=f"peak while running: {p.kv_workers} on the workers, {p.kv_gateway} in the gateway",
            detail={"before": asdict(b), "peak": asdict(p), "after": asdict(a)},
        ),
        Row(
            "soak_rss_after",
            "RSS of the mesh's processes after the run",
            "before the clients started",
            _mb(a.rss),
            _mb(b.rss),
            "MB",
            a.rss / b.rss,
            Target("ratio<=", 1 + opts.rss_tolerance),
            note=f"peak while running {_mb(p.rss):.0f} MB; the gateway {_mb(b.gateway_rss):.0f} -> "
            f"{_mb(a.gateway_rss):.0f} MB; {r.spares_after} spare(s) waiting at the end",
        ),
    ]


def soak_markdown(run: dict, rows: list[Row], r: SoakResult) -> str:
    from stagemesh.benchmarks.report import markdown

    b, p, a = r.before, r.peak, r.after
    lines = [markdown(run, rows).rstrip(), "", f"Load average (1, 5, 15 min): {run['load']}.", ""]
    lines += ["| resource | before | during (peak) | after |", "|---|---|---|---|"]
    lines += [
        f"| RSS, every process of the mesh | {_mb(b.rss):.0f} MB | {_mb(p.rss):.0f} MB | {_mb(a.rss):.0f} MB |",
        f"| RSS, the gateway | {_mb(b.gateway_rss):.0f} MB | {_mb(p.gateway_rss):.0f} MB | "
        f"{_mb(a.gateway_rss):.0f} MB |",
        f"| KV blocks in use, stage workers | {b.kv_workers} | {p.kv_workers} | {a.kv_workers} |",
        f"| KV blocks in use, gateway | {b.kv_gateway} | {p.kv_gateway} | {a.kv_gateway} |",
    ]
    if r.kills:
        lines += ["", "| kill at | role | streams open (mid-way) | `dead` after | spare ready after | recovery |"]
        lines += ["|---|---|---|---|---|---|"]
        for k in r.kills:
            lines.append(
                f"| {k.at:.0f} s | {k.role} (pid {k.pid}) | {k.streams} ({k.mid_stream}) | {fmt(k.dead_after, 's')} | "
                f"{fmt(k.ready_after, 's')} | {fmt(k.recovery, 's')} |"
            )
    if r.tally.failures:
        lines += ["", "Failures:", ""] + [f"* {f}" for f in r.tally.failures]
    return "\n".join(lines) + "\n"


def run_soak(opts: SoakOptions, model_dir: str | None, out: str, command: str = "") -> int:
    """Runs the soak, writes results.json and results.md into `out`, prints the table; 1 when a row misses."""
    from rich.console import Console
    from stagemesh.benchmarks.machine import describe_machine
    from stagemesh.benchmarks.meshes import running_mesh
    from stagemesh.benchmarks.report import print_table, write_json
    from stagemesh.benchmarks.runner import checkpoint

    console = Console(width=None if sys.stdout.isatty() else 200)
    folder = Path(out)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    log_path, start, load = folder / "logs" / "soak.log", time.perf_counter(), [os.getloadavg()]
    model = checkpoint(model_dir, "llama", opts.preset)
    say = lambda text: console.print(f"[dim]{time.perf_counter() - start:5.0f} s[/] soak: {text}")  # noqa: E731
    say(f"starting tp={opts.tp} pp={opts.pp}, {opts.spares} spare(s), {model}, {opts.dtype}, {opts.clients} clients")
    with running_mesh(soak_layout(model, opts), log_path) as mesh:
        result = soak(mesh, opts, log_path, say)
    say("mesh stopped")
    load.append(os.getloadavg())
    rows = soak_rows(result, opts)
    run = {
        "suite": "soak",
        "command": command or " ".join(["stagemesh", *sys.argv[1:]]),
        "wall_seconds": time.perf_counter() - start,
        "machine": describe_machine(),
        "checkpoints": {"llama": model},
        "options": asdict(opts),
        "load": " / ".join(", ".join(f"{x:.1f}" for x in avg) for avg in load) + " (start / end)",
        "soak_seconds": result.seconds,
    }
    write_json(folder / "results.json", run, rows)
    (folder / "results.md").write_text(soak_markdown(run, rows, result))
    print_table(console, rows)
    console.print(f"soak: {run['wall_seconds']:.0f} s; results in {folder}/")
    return 1 if any(r.missed for r in rows if r.target is not None) else 0
