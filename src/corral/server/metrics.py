"""Prometheus metrics (`GET /metrics`): warm pools' sizes and claims, sandboxes by state.

Each app has its own registry, so several apps in one process (tests) never clash.
Gauges are read from the store at scrape time; claims are counted as they happen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from corral.runtime.pools import Claim, PoolManager

# Claim latency buckets: a pool hit is milliseconds, a cold create tens of ms to seconds.
CLAIM_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _PoolGauges(Collector):
    def __init__(self, pools: PoolManager) -> None:
        self.pools = pools

    def collect(self) -> Iterator[Metric]:
        labels = ["tenant", "pool", "template"]
        target = GaugeMetricFamily("corral_pool_target_size", "Members a pool keeps", labels=labels)
        idle = GaugeMetricFamily("corral_pool_idle", "Members ready to claim", labels=labels)
        starting = GaugeMetricFamily("corral_pool_starting", "Members being created", labels=labels)
        for status in self.pools.list():
            values = [status.pool.tenant, status.pool.name, status.pool.template]
            target.add_metric(values, status.pool.target_size)
            idle.add_metric(values, status.idle)
            starting.add_metric(values, status.starting)
        yield from (target, idle, starting)


class Metrics:
    """The server's metrics; `observe_claim` is a PoolManager observer."""

    def __init__(self, pools: PoolManager) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.claims = Counter(
            "corral_pool_claims",
            "Claims by pool and result (hit: from the pool; miss: cold create)",
            ["tenant", "pool", "result"],
            registry=self.registry,
        )
        self.claim_seconds = Histogram(
            "corral_pool_claim_seconds",
            "Time to claim a sandbox (hit or cold create)",
            ["tenant", "pool", "result"],
            buckets=CLAIM_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_PoolGauges(pools))
        pools.observers.append(self.observe_claim)

    def observe_claim(self, claim: Claim) -> None:
        values = (claim.record.tenant, claim.pool, "hit" if claim.from_pool else "miss")
        self.claims.labels(*values).inc()
        self.claim_seconds.labels(*values).observe(claim.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
