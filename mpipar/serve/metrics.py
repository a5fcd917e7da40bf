"""Prometheus metrics of the server (``GET /metrics``), named like vLLM's under ``mpipar:``.

Per engine step (from engine.stats() after it): requests running / waiting, KV blocks
used / total, preemptions, prefix-cache hit tokens, and a histogram of tokens per step.
Per finished request, with t_arrival (the driver took it), t_first (the step that
returned its first token) and t_end (its last token):

    TTFT = t_first - t_arrival
    TPOT = (t_end - t_first) / (generated - 1)      (requests of two or more tokens;
                                                     model.sampling.time_per_output_token)
    e2e  = t_end - t_arrival

A registry of its own per server, so several servers (tests) live in one process.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..model.sampling import time_per_output_token

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServeMetrics:
    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry()
        lab = {"labelnames": ["model_name"], "registry": r}
        self._model = model_name

        def gauge(name, doc):
            return Gauge(f"mpipar:{name}", doc, **lab).labels(model_name)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_used = gauge("kv_blocks_used", "KV cache blocks in use (rank 0's pool).")
        self.kv_total = gauge("kv_blocks_total", "KV cache blocks in the pool.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).")
        self.preemptions = gauge("num_preemptions", "Preemptions since start.")
        self.prefix_hits = gauge("prefix_cache_hit_tokens",
                                 "Prompt tokens served from the prefix cache since start.")
        self.steps = Counter("mpipar:engine_steps", "Engine steps run.", **lab).labels(
            model_name)
        self.step_tokens = Histogram("mpipar:tokens_per_step",
                                     "Tokens (prefill + decode) computed in one step.",
                                     buckets=TOKEN_BUCKETS, **lab).labels(model_name)
        self.step_seconds = Histogram("mpipar:step_seconds", "Wall time of one step.",
                                      buckets=LATENCY_BUCKETS, **lab).labels(model_name)
        self.ttft = Histogram("mpipar:time_to_first_token_seconds", "TTFT per request.",
                              buckets=LATENCY_BUCKETS, **lab).labels(model_name)
        self.tpot = Histogram("mpipar:time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              buckets=LATENCY_BUCKETS, **lab).labels(model_name)
        self.e2e = Histogram("mpipar:e2e_request_latency_seconds",
                             "Arrival to last token, per request.",
                             buckets=LATENCY_BUCKETS, **lab).labels(model_name)
        self.prompt_tokens = Counter("mpipar:prompt_tokens", "Prompt tokens of finished "
                                     "requests.", **lab).labels(model_name)
        self.generation_tokens = Counter("mpipar:generation_tokens",
                                         "Generated tokens of finished requests.",
                                         **lab).labels(model_name)
        self.finished = Counter("mpipar:request_success", "Finished requests by reason.",
                                labelnames=["model_name", "finished_reason"], registry=r)

    def observe_step(self, stats: dict, seconds: float) -> None:
        self.running.set(stats.get("running", 0))
        self.waiting.set(stats.get("waiting", 0))
        used, total = stats.get("kv_blocks_used", 0), stats.get("kv_blocks_total", 0)
        self.kv_used.set(used)
        self.kv_total.set(total)
        self.kv_usage.set(used / total if total else 0.0)
        self.preemptions.set(stats.get("num_preemptions", 0))
        self.prefix_hits.set(stats.get("prefix_cache_hit_tokens", 0))
        self.steps.inc()
        self.step_tokens.observe(stats.get("last_step_tokens", 0))
        self.step_seconds.observe(seconds)

    def observe_finished(self, times: dict, t_end: float, out) -> None:
        first = times["first"] if times["first"] is not None else t_end
        self.ttft.observe(first - times["arrival"])
        tpot = time_per_output_token(t_end - times["arrival"], first - times["arrival"],
                                     out.num_generated)
        if tpot is not None:
            self.tpot.observe(tpot)
        self.e2e.observe(t_end - times["arrival"])
        self.prompt_tokens.inc(out.prompt_len)
        self.generation_tokens.inc(out.num_generated)
        self.finished.labels(self._model, out.finish_reason or "unknown").inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def disagg_phases(self, engine):
        """A histogram of the per-request phases (disagg.PHASES) and gauges of the handoff
        bytes; -> the disaggregated engine's ``on_timing`` callback."""
        from .disagg import PHASES
        hist = Histogram("mpipar:disagg_phase_seconds", "Per request: queue, prefill, "
                         "handoff_wait, transfer, first_decode (disaggregated server).",
                         labelnames=["model_name", "phase"], buckets=LATENCY_BUCKETS,
                         registry=self.registry)
        children = {p: hist.labels(self._model, p) for p in PHASES}
        kv = Gauge("mpipar:kv_transfer_bytes", "KV handoff bytes since start: predicted "
                   "(all ranks, sent), and received by world rank 0 (measured, predicted).",
                   labelnames=["model_name", "what"], registry=self.registry)
        keys = ("kv_transfer_bytes_predicted", "kv_transfer_recv_bytes_rank0",
                "kv_transfer_recv_bytes_rank0_predicted")

        def observe(request_id, phases: dict) -> None:
            for phase, seconds in phases.items():
                children[phase].observe(seconds)
            stats = engine.stats()
            for key in keys:
                kv.labels(self._model, key).set(stats[key])
        return observe
