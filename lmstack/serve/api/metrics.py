"""Prometheus metrics for ``GET /metrics`` (names follow vLLM's, with the ``lmstack_`` prefix).

Latency histograms are observed by the HTTP layer as tokens reach it (what a client experiences):

* ``lmstack_time_to_first_token_seconds``  request arrival -> first generated token
* ``lmstack_inter_token_latency_seconds``  gap between successive token-bearing engine steps
* ``lmstack_e2e_request_latency_seconds``   request arrival -> last token (or abort)

Engine state is read from ``engine.stats()`` at scrape time by a custom collector (no polling thread):
running / waiting requests, KV blocks used / total, KV-cache usage, prefix-cache queries / hits / hit
rate, prompt / generation token counters and preemptions. Each app has its own registry, so several
servers in one process (tests, benchmarks) never clash.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Buckets (seconds) from vLLM's metrics, extended down for tiny CPU models.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0)


class _EngineCollector(Collector):
    """Turns ``engine.stats()`` into gauges and counters at each scrape."""

    GAUGES = {
        "num_running": ("lmstack_num_requests_running", "Requests in the engine's running batch."),
        "num_waiting": ("lmstack_num_requests_waiting", "Requests queued for admission."),
        "kv_blocks_used": ("lmstack_kv_cache_blocks_used", "KV-cache blocks in use."),
        "kv_blocks_total": ("lmstack_kv_cache_blocks_total", "KV-cache blocks in the pool."),
        "kv_usage": ("lmstack_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1)."),
    }
    COUNTERS = {
        "prefix_cache_queries": ("lmstack_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
        "prefix_cache_hits": ("lmstack_prefix_cache_hits", "Prompt tokens found in the prefix cache."),
        "prompt_tokens_total": ("lmstack_prompt_tokens", "Prompt tokens processed."),
        "generation_tokens_total": ("lmstack_generation_tokens", "Tokens generated."),
        "preemptions_total": ("lmstack_num_preemptions", "Requests preempted for lack of KV blocks."),
    }

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._stats() or {}
        except Exception:  # a scrape must never fail because the engine is shutting down
            s = {}
        for key, (name, doc) in self.GAUGES.items():
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(s.get(key, 0) or 0))
            yield g
        for key, (name, doc) in self.COUNTERS.items():
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(s.get(key, 0) or 0))
            yield c
        q, h = float(s.get("prefix_cache_queries", 0) or 0), float(s.get("prefix_cache_hits", 0) or 0)
        g = GaugeMetricFamily("lmstack_prefix_cache_hit_rate", "Prefix-cache hits / queries since start.")
        g.add_metric([], h / q if q else 0.0)
        yield g


class ServerMetrics:
    """One registry per app: latency histograms, request counters, engine gauges."""

    def __init__(self, stats: Callable[[], dict[str, Any]] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram("lmstack_time_to_first_token_seconds", "Time to first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("lmstack_inter_token_latency_seconds", "Inter-token latency.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("lmstack_e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=E2E_BUCKETS, registry=r)
        self.requests = Counter("lmstack_http_requests", "HTTP requests answered, by route and status.",
                                ["route", "status"], registry=r)
        self.in_flight = Gauge("lmstack_http_requests_in_flight", "API requests being served now.", registry=r)
        self.draining = Gauge("lmstack_server_draining", "1 while the server drains for shutdown.", registry=r)
        if stats is not None:
            r.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
