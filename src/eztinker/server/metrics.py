"""Prometheus metrics (`GET /metrics`): jobs by kind and state, queue depth, job latencies,
tokens sampled and trained, runs per base model.

Counters and histograms are fed by the runner as jobs finish; gauges of what is queued, running
and live are read from the runner and the store when scraped. Each service has its own registry
(several servers may live in one process, as in the tests).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..backend import ABANDONED
from ..backend.commands import Command, ForwardBackward, Outcome, Sample
from ..backend.results import Samples

# Job latencies range from a millisecond (a bookkeeping command) to minutes (a long training batch).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs_finished = Counter(
            "eztinker_jobs_finished", "Jobs finished, by kind and outcome.", ["kind", "status"], registry=self.registry
        )
        self.queue_seconds = Histogram(
            "eztinker_job_queue_seconds",
            "Time from submission to start, by kind.",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.run_seconds = Histogram(
            "eztinker_job_run_seconds",
            "Time from start to finish, by kind (a fused batch of samples: the batch's time).",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.latency_seconds = Histogram(
            "eztinker_job_latency_seconds",
            "Time from submission to finish, by kind.",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens_sampled = Counter(
            "eztinker_tokens_sampled",
            "Tokens sampled (every candidate's), by base model.",
            ["model"],
            registry=self.registry,
        )
        self.tokens_trained = Counter(
            "eztinker_tokens_trained",
            "Input tokens of completed forward_backward passes (forward-only passes excluded), by base model.",
            ["model"],
            registry=self.registry,
        )
        self.samples_abandoned = Counter(
            "eztinker_samples_abandoned",
            "Samples stopped early because every consumer "
            "went away (a client that disconnected, a session that ended), by base model.",
            ["model"],
            registry=self.registry,
        )
        self.sample_batch_requests = Histogram(
            "eztinker_sample_batch_requests",
            "Sample requests decoded together in one batch (see sample_gather_ms).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )

    def job_finished(self, command: Command, outcome: Outcome, queued_s: float, run_s: float) -> None:
        kind = command.kind
        self.jobs_finished.labels(kind, "failed" if outcome.error is not None else "completed").inc()
        self.queue_seconds.labels(kind).observe(queued_s)
        self.run_seconds.labels(kind).observe(run_s)
        self.latency_seconds.labels(kind).observe(queued_s + run_s)
        if outcome.error is not None:
            if isinstance(command, Sample) and outcome.error.startswith(ABANDONED):
                self.samples_abandoned.labels(command.model).inc()
                self.tokens_sampled.labels(command.model).inc(outcome.decoded_tokens)
            return
        if isinstance(command, Sample):
            self.tokens_sampled.labels(command.model).inc(outcome.result(Samples).sampled_tokens())
        elif isinstance(command, ForwardBackward) and not command.forward_only:
            self.tokens_trained.labels(command.model).inc(sum(len(d.model_input.tokens) for d in command.data))

    def watch(self, jobs: Callable[[], Iterable[tuple[str, str]]], runs: Callable[[], Iterable[str]]) -> None:
        """Gauges read at scrape time: `jobs()` -> (kind, 'pending' | 'running') of every unfinished
        job; `runs()` -> the base model of every live run."""
        self.registry.register(_Gauges(jobs, runs))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Gauges:
    def __init__(self, jobs, runs):
        self.jobs, self.runs = jobs, runs

    def describe(self):
        return []  # collected only when scraped (the store is read then)

    def collect(self):
        states = Tally(self.jobs())
        jobs = GaugeMetricFamily("eztinker_jobs", "Unfinished jobs, by kind and state.", labels=["kind", "state"])
        for (kind, state), count in sorted(states.items()):
            jobs.add_metric([kind, state], count)
        yield jobs
        depth = GaugeMetricFamily("eztinker_queue_depth", "Jobs waiting for the worker (not yet started).")
        depth.add_metric([], sum(count for (_, state), count in states.items() if state == "pending"))
        yield depth
        runs = GaugeMetricFamily("eztinker_runs", "Live runs, by base model.", labels=["base_model"])
        for model, count in sorted(Tally(self.runs()).items()):
            runs.add_metric([model], count)
        yield runs
