"""Metrics stage: engine stats + per-request timings in, Prometheus text with vLLM's `vllm:` names out."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000,
                  500000, 1000000)


class _EngineCollector:
    """Reads `engine.stats()` at scrape time, so the gauges and engine-owned counters are never stale."""

    def __init__(self, stats: Callable[[], dict[str, Any]], labels: dict[str, str], cache_info: dict[str, str],
                 server_counts: dict[str, float]) -> None:
        self._stats = stats
        self._labels = labels
        self._cache_info = cache_info
        self._server_counts = server_counts

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=list(self._labels))
        g.add_metric(list(self._labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=list(self._labels))
        c.add_metric(list(self._labels.values()), value)
        return c

    def collect(self) -> Iterator[Metric]:
        try:
            s = dict(self._stats())
        except Exception:  # a scrape must never fail because the engine is busy or dead
            s = {}
        kv = float(s.get("kv_usage", s.get("kv_cache_usage", 0.0)) or 0.0)
        yield self._gauge("vllm:num_requests_running", "Requests in the running batch.", s.get("num_running", 0))
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.get("num_waiting", 0))
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", kv)
        yield self._gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (deprecated vLLM name).", kv)
        for key, name, doc in (
            ("prompt_tokens_total", "vllm:prompt_tokens", "Prefill tokens processed."),
            ("generation_tokens_total", "vllm:generation_tokens", "Generation tokens produced."),
            ("num_preemptions", "vllm:num_preemptions", "Cumulative preemptions."),
            ("prefix_cache_queries", "vllm:prefix_cache_queries", "Prefix-cache token queries."),
            ("prefix_cache_hits", "vllm:prefix_cache_hits", "Prefix-cache token hits."),
        ):
            value = s.get(key, s.get(key.removesuffix("_total"), self._server_counts.get(key, 0)))
            yield self._counter(name, doc, float(value or 0))
        for key, name, doc in (
            ("roofline_fraction", "ds4f:roofline_fraction",
             "Fraction of the memory-bandwidth roofline recent decode steps reach (bytes / bandwidth / time)."),
            ("decode_step_seconds", "ds4f:decode_step_seconds", "Mean wall time of recent decode steps."),
            ("mem_bandwidth_bytes_per_s", "ds4f:mem_bandwidth_bytes_per_second",
             "Device copy bandwidth (read + write) measured at engine start."),
        ):
            if s.get(key) is not None:  # absent until the first decode step: no gauge rather than a fake 0
                yield self._gauge(name, doc, float(s[key]))
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache config.",
                                 labels=[*self._labels, *self._cache_info])
        num_blocks = s.get("num_gpu_blocks", s.get("num_blocks"))
        values = dict(self._cache_info)
        if num_blocks is not None:
            values["num_gpu_blocks"] = str(num_blocks)
        info.add_metric([*self._labels.values(), *values.values()], 1.0)
        yield info


class ServerMetrics:
    """One registry per app (tests build many apps in one process)."""

    def __init__(self, model_name: str, stats: Callable[[], dict[str, Any]], cache_info: dict[str, str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"model_name": model_name, "engine": "0"}
        self.server_counts: dict[str, float] = {"prompt_tokens_total": 0.0, "generation_tokens_total": 0.0}
        cache_info = {"num_gpu_blocks": "0", **cache_info}
        self.registry.register(_EngineCollector(stats, self.labels, cache_info, self.server_counts))
        names = list(self.labels)
        r = self.registry
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", names,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency.", names,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:request_time_per_output_token_seconds", "Mean time per output token.", names,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", names,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", names,
                                    buckets=_TOKEN_BUCKETS, registry=r)
        self.gen_len = Histogram("vllm:request_generation_tokens", "Generated tokens per request.", names,
                                 buckets=_TOKEN_BUCKETS, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               [*names, "finished_reason"], registry=r)
        self.rejected = Counter("ds4f:requests_rejected", "Requests refused before the engine (429/503).",
                                [*names, "reason"], registry=r)

    def observe_finished(self, *, prompt_tokens: int, generated: int, ttft: float | None, e2e: float,
                         finish_reason: str | None) -> None:
        lv = self.labels.values()
        self.server_counts["prompt_tokens_total"] += prompt_tokens
        self.server_counts["generation_tokens_total"] += generated
        if ttft is not None:
            self.ttft.labels(*lv).observe(ttft)
            if generated > 1:
                per_token = (e2e - ttft) / (generated - 1)
                self.tpot.labels(*lv).observe(per_token)
        self.e2e.labels(*lv).observe(e2e)
        self.prompt_len.labels(*lv).observe(prompt_tokens)
        self.gen_len.labels(*lv).observe(generated)
        self.success.labels(*lv, finish_reason or "abort").inc()

    def observe_itl(self, seconds: float) -> None:
        self.itl.labels(*self.labels.values()).observe(seconds)

    def observe_rejected(self, reason: str) -> None:
        self.rejected.labels(*self.labels.values(), reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
