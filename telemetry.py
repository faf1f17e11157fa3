"""Prometheus plumbing every process shares: the /metrics endpoint, and the collector through which
stage and expert workers expose the same stats they send the coordinator in heartbeats."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serves /metrics over HTTP on a thread; returns the port (0 picks a free one)."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_port


class WorkerCollector:
    """stats() -> a WorkerStats message (steps, busy_seconds, kv_blocks_used, expert_load)."""

    def __init__(self, stats: Callable, role: dict[str, str]) -> None:
        self.stats, self.role = stats, role

    def collect(self):
        s = self.stats()
        names, values = list(self.role), list(self.role.values())
        steps = CounterMetricFamily("stagemesh_worker_steps", "Steps (or expert calls) computed.", labels=names)
        steps.add_metric(values, s.steps)
        busy = CounterMetricFamily("stagemesh_worker_busy_seconds", "Compute time.", labels=names)
        busy.add_metric(values, s.busy_seconds)
        kv = GaugeMetricFamily("stagemesh_worker_kv_blocks_used", "KV blocks held by live sequences.", labels=names)
        kv.add_metric(values, s.kv_blocks_used)
        yield from (steps, busy, kv)
        load = CounterMetricFamily(
            "stagemesh_expert_tokens", "Tokens routed to each expert.", labels=[*names, "layer", "expert"]
        )
        for layer in s.expert_load:
            for expert, tokens in zip(layer.expert_ids, layer.tokens):
                load.add_metric([*values, str(layer.layer), str(expert)], tokens)
        yield load


def worker_registry(stats: Callable, role: dict[str, str]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(WorkerCollector(stats, role))
    return registry
