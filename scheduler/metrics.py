"""The scheduler's Prometheus metrics (the engine's: vLLM's names under ``tessera:``).

Gauges and counters the scheduler already keeps (running, waiting, KV usage, prefix-cache
queries and hits, preemptions) are read at scrape time by a collector, so a step pays nothing
for them; what a step must add (tokens, per-request timings at finish) goes through the
methods here, called by scheduler.telemetry.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from common import metrics as m
from scheduler.health import CANARY_PREFIX
from scheduler.scheduler import Scheduler


def _user_load(s: Scheduler) -> tuple[int, float]:
    """Running requests and KV-cache usage without the idle canary (scheduler.health): while
    one of its one-token steps runs, an idle service still reads 0 on both gauges."""
    canaries = [r.request_id for r in list(s.running) if r.request_id.startswith(CANARY_PREFIX)]
    if not canaries:
        return s.num_running, s.kv.usage
    pool = s.kv.pool
    blocks = sum(len(s.kv.get_block_ids(c)) for c in canaries)
    return s.num_running - len(canaries), 1.0 - (pool.num_free_blocks + blocks) / pool.num_blocks


class _EngineState(Collector):
    """Reads the scheduler's own counts when scraped (from the probe thread: plain int reads)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.scheduler: Scheduler | None = None
        self.queue = None   # scheduler.queue.RequestQueue: its dead-letter count

    def collect(self) -> Iterator:
        s, labels = self.scheduler, [self.model_name]
        if s is None:
            return
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        running, usage = _user_load(s)
        families = [
            (gauge, "num_requests_running", "Number of requests in model execution batches.",
             running),
            (gauge, "num_requests_waiting", "Number of requests waiting to be processed "
             "(read from Redis, not yet scheduled).", s.num_waiting),
            (gauge, "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             usage),
            (counter, "prefix_cache_queries", "Prefix cache queries, in terms of number of "
             "queried tokens.", s.kv.prefix_queries),
            (counter, "prefix_cache_hits", "Prefix cache hits, in terms of number of cached "
             "tokens.", s.kv.prefix_hits),
            (counter, "num_preemptions", "Cumulative number of preemptions (including the "
             "recomputes after a worker reset).", s.num_preemptions),
        ]
        if self.queue is not None:
            families.append((counter, "deadlettered", "Requests dead-lettered: delivered "
                             "--max-deliveries times without finishing.",
                             self.queue.num_deadlettered))
        proposer = s.proposer
        if proposer is not None:   # speculative decoding on: vLLM's spec_decode_* counters
            stats = proposer.stats
            families += [
                (counter, "spec_decode_num_drafts", "Number of spec decoding drafts (sequence "
                 "steps with draft tokens).", stats.num_drafts),
                (counter, "spec_decode_num_draft_tokens", "Number of draft tokens.",
                 stats.num_draft_tokens),
                (counter, "spec_decode_num_accepted_tokens", "Number of accepted tokens.",
                 stats.num_accepted_tokens)]
        for family, metric, doc, value in families:
            f = family(m.name(metric), doc, labels=m.LABELS)
            f.add_metric(labels, value)
            yield f
        if proposer is not None:
            yield _acceptance_histogram(proposer.stats.acceptance_lengths,
                                        proposer.k + 1, labels)


def _acceptance_histogram(counts: list[int], max_length: int, labels: list[str]
                          ) -> HistogramMetricFamily:
    """Tokens a draft step emitted (1 + its accepted drafts), one bucket per length."""
    f = HistogramMetricFamily(m.name("spec_decode_acceptance_length"), "Tokens emitted per "
                              "spec decoding draft: 1 + the accepted draft tokens.",
                              labels=m.LABELS)
    buckets, total = [], 0
    for length in range(1, max_length + 1):
        total += counts[length] if length < len(counts) else 0
        buckets.append((str(float(length)), total))
    buckets.append(("+Inf", total))
    f.add_metric(labels, buckets, sum(n * c for n, c in enumerate(counts)))
    return f


class SchedulerMetrics:
    def __init__(self, model_name: str, max_model_len: int) -> None:
        self.registry = r = m.new_registry()
        self.model_name = model_name
        self.engine = _EngineState(model_name)
        r.register(self.engine)
        labels = m.LABELS
        latency = m.REQUEST_LATENCY_BUCKETS
        tokens = m.buckets_1_2_5(max_model_len)

        def hist(metric: str, doc: str, buckets) -> Histogram:
            return Histogram(m.name(metric), doc, labels, buckets=buckets,
                             registry=r).labels(model_name)

        def counter(metric: str, doc: str) -> Counter:
            return Counter(m.name(metric), doc, labels, registry=r).labels(model_name)

        def gauge(metric: str, doc: str) -> Gauge:
            return Gauge(m.name(metric), doc, labels, registry=r).labels(model_name)

        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens",
                                         "Number of generation tokens processed.")
        self.queue_time = hist(
            "request_queue_time_seconds", "Time spent in the WAITING phase (in the Redis stream, "
            "then in the scheduler) before first scheduled.", latency)
        self.prefill_time = hist(
            "request_prefill_time_seconds",
            "Time spent in the PREFILL phase (first scheduled to first token).", latency)
        self.decode_time = hist(
            "request_decode_time_seconds",
            "Time spent in the DECODE phase (first token to last token).", latency)
        self.inference_time = hist(
            "request_inference_time_seconds",
            "Time spent in the RUNNING phase (first scheduled to finish).", latency)
        self.request_prompt_tokens = hist(
            "request_prompt_tokens", "Number of prefill tokens processed, per request.", tokens)
        self.request_generation_tokens = hist(
            "request_generation_tokens", "Number of generation tokens processed, per request.",
            tokens)
        self.step_time = hist("step_duration_seconds", "Time of one engine step as the scheduler "
                              "sees it: the workers' Execute round trip.", m.STEP_BUCKETS)
        self.queue_depth = gauge("request_queue_depth", "Requests waiting in the Redis request "
                                 "stream, not yet read by any scheduler (the consumer group's lag; "
                                 "the autoscaling signal), plus those a lone group's scheduler "
                                 "read past its max_num_seqs window.")
        self.queue_pending = gauge("request_queue_pending", "Requests read from the Redis stream "
                                   "by a scheduler and not finished yet.")
        self.requests_recovered = Counter(
            m.name("requests_recovered"), "Requests that survived the death of their worker "
            "group or of their scheduler, recomputed from prompt + emitted tokens.",
            [*labels, "reason"], registry=r)
        self.tokens_recomputed = counter(
            "tokens_recomputed", "Tokens (prompt + already emitted) recomputed by recoveries.")
        self.ready = gauge("ready", "1 while a forward pass (a step or the idle canary) finished "
                           "within the ready timeout.")

    def watch(self, scheduler: Scheduler, queue=None) -> None:
        self.engine.scheduler = scheduler
        self.engine.queue = queue

    def sequence_finished(self, queue_s: float | None, prefill_s: float | None,
                          decode_s: float | None, inference_s: float | None,
                          prompt_tokens: int, generation_tokens: int) -> None:
        if queue_s is not None:
            self.queue_time.observe(queue_s)
        if prefill_s is not None:
            self.prefill_time.observe(prefill_s)
        if decode_s is not None:
            self.decode_time.observe(decode_s)
        if inference_s is not None:
            self.inference_time.observe(inference_s)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generation_tokens)

    def render(self) -> bytes:
        return m.render(self.registry)
