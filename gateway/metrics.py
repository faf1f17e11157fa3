"""The gateway's Prometheus series, named the way vLLM and TGI users look for them.

GatewayMetrics is the scheduler's observer: it is told when a token arrives and when a request ends;
queue, running and KV gauges are read from the scheduler at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)


class GatewayMetrics:
    def __init__(self, scheduler, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.registry = r
        self.ttft = Histogram(
            "stagemesh_time_to_first_token_seconds",
            "Time from request arrival to its first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "stagemesh_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "stagemesh_e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("stagemesh_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("stagemesh_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter(
            "stagemesh_requests", "Finished requests by finish reason.", ["finish_reason"], registry=r
        )
        self.stage_busy = Counter(
            "stagemesh_stage_busy_seconds",
            "Compute time per pipeline stage, as reported with each step's result.",
            ["stage"],
            registry=r,
        )
        Gauge("stagemesh_num_requests_waiting", "Requests waiting for KV space.", registry=r).set_function(
            lambda: len(scheduler.waiting)
        )
        Gauge("stagemesh_num_requests_running", "Sequences holding KV space.", registry=r).set_function(
            lambda: len(scheduler.running)
        )
        Gauge("stagemesh_kv_cache_usage_ratio", "Fraction of the mesh's KV blocks in use.", registry=r).set_function(
            lambda: scheduler.kv.used_blocks / scheduler.kv.num_blocks if scheduler.kv else 0.0
        )
        Gauge("stagemesh_kv_cache_blocks_used", "KV blocks in use.", registry=r).set_function(
            lambda: scheduler.kv_blocks_used
        )

    # ---- the scheduler's observer interface ----

    def token(self, seq, now: float) -> None:
        if len(seq.generated) == 1:
            self.ttft.observe(now - seq.submitted_at)
        elif seq.last_token_at is not None:
            self.itl.observe(now - seq.last_token_at)
        self.generation_tokens.inc()

    def finished(self, seq, reason: str, now: float) -> None:
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(seq.prompt_len)
        self.e2e.observe(now - seq.submitted_at)

    def stage_timings(self, timings: list[tuple[int, float]]) -> None:
        for stage, busy in timings:
            self.stage_busy.labels(str(stage)).inc(busy)
