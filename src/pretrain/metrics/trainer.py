"""Prometheus metrics of a trainer process, served on `monitoring.metricsPort + local rank`.

Names follow Prometheus conventions (base units, `_total` counters, `_seconds`, `_bytes`) and
carry pretrain_job, pretrain_namespace, rank and attempt labels. The operator reads node 0's
endpoint for the job's status; Grafana reads them all. On CPU the "accelerator" memory gauges
report the process's resident memory, the memory training uses there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from pretrain.metrics import names

log = logging.getLogger("pretrain.metrics")

#: Peak dense bf16 FLOP/s of one device, for MFU when the spec gives none.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def peak_flops_for(device_name: str) -> float | None:
    for key, value in PEAK_FLOPS.items():
        if key in device_name.upper():
            return value
    return None


@dataclass(frozen=True)
class Labels:
    job: str
    namespace: str
    rank: int
    attempt: int

    def values(self) -> dict[str, str]:
        # Not "job"/"namespace": Prometheus owns those target labels and would rename ours.
        return {"pretrain_job": self.job, "pretrain_namespace": self.namespace, "rank": str(self.rank),
                "attempt": str(self.attempt)}  # fmt: skip


class StorageRetryCollector:
    """The storage call being retried now (`storage.fs.storage_retrying`), read at each scrape."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        from pretrain.storage.fs import storage_retrying

        now = storage_retrying()
        since = GaugeMetricFamily(names.STORAGE_RETRYING_SINCE, "Unix time since which a storage call has been "
                                  "retried (0: none is).", labels=list(self.labels))  # fmt: skip
        since.add_metric(list(self.labels.values()), now.since if now else 0.0)
        yield since
        info = GaugeMetricFamily(names.STORAGE_RETRYING_INFO, "The storage call being retried and its last error.",
                                 labels=[*self.labels, *names.STORAGE_RETRYING_LABELS])  # fmt: skip
        if now is not None:
            info.add_metric([*self.labels.values(), now.what, now.error], 1.0)
        yield info


class TrainerMetrics:
    """All trainer metrics in one private registry, with an HTTP server when `port` is set."""

    def __init__(self, labels: Labels, port: int | None, addr: str = "0.0.0.0") -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=True)
        self._label_names, self._labels = list(labels.values()), labels.values()
        self._define_step_metrics()
        self._define_checkpoint_metrics()
        self._define_health_metrics()
        self._eval_metric = self._family(names.EVAL_METRIC, "Task metrics of the last evaluation (accuracy, f1, "
                                         "exact_match...).", names.EVAL_METRIC_LABEL)  # fmt: skip
        self._source_tokens = self._family(names.SOURCE_TOKENS, "Tokens the whole job trained on from each data "
                                           "source since the run began.", names.SOURCE_LABEL)  # fmt: skip
        self.attempt = self._gauge("pretrain_attempt", "Attempt of this run (1 + gang restarts so far).")
        self.attempt.set(labels.attempt)
        self.registry.register(StorageRetryCollector(self._labels))
        self.port: int | None = None
        self._server: Any = None
        if port is not None:
            from prometheus_client import start_http_server

            try:
                self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
                self.port = self._server.server_port
            except OSError as e:
                log.warning("metrics: cannot listen on port %d (%s); metrics are off for this rank", port, e)

    def _gauge(self, name: str, doc: str) -> Any:
        from prometheus_client import Gauge

        return Gauge(name, doc, self._label_names, registry=self.registry).labels(**self._labels)

    def _counter(self, name: str, doc: str) -> Any:
        from prometheus_client import Counter

        return Counter(name, doc, self._label_names, registry=self.registry).labels(**self._labels)

    def _family(self, name: str, doc: str, *extra_labels: str) -> Any:
        """A gauge with labels beyond the run's, whose children are made as values come."""
        from prometheus_client import Gauge

        return Gauge(name, doc, [*self._label_names, *extra_labels], registry=self.registry)

    def _define_step_metrics(self) -> None:
        from prometheus_client import Histogram

        gauge, counter = self._gauge, self._counter
        self.loss = gauge(names.TRAIN_LOSS, "Training loss of the last optimizer step (mean over ranks).")
        self.eval_loss = gauge("pretrain_eval_loss", "Validation loss of the last evaluation.")
        self.eval_perplexity = gauge("pretrain_eval_perplexity", "Validation perplexity of the last evaluation.")
        self.lr = gauge("pretrain_learning_rate", "Learning rate of the last optimizer step.")
        self.grad_norm = gauge("pretrain_grad_norm", "Global gradient norm before clipping.")
        # No sample until `begin`: before it, the step is not known (a resume reads it from a
        # checkpoint), and a 0 would be scraped into the job's status as its progress.
        self._step = self._family(names.STEP, "Optimizer steps completed.")
        self._total = self._family(names.TOTAL_STEPS, "Optimizer steps the run will take.")
        self.tokens = counter("pretrain_tokens_total", "Tokens trained on by the whole job (counted on every rank).")
        self.samples = counter("pretrain_samples_total", "Sequences trained on by the whole job.")
        self.tokens_per_second = gauge(names.TOKENS_PER_SECOND, "Job-wide training throughput over the last step.")
        self.step_time = Histogram(
            names.STEP_DURATION, "Wall time of one optimizer step.", self._label_names,
            buckets=STEP_BUCKETS, registry=self.registry,
        ).labels(**self._labels)  # fmt: skip
        self.mfu = gauge(names.MFU, "Model FLOPs utilisation of this rank's device (0-1).")
        self.mem_allocated = gauge("pretrain_accelerator_memory_allocated_bytes", "Accelerator memory allocated.")
        self.mem_reserved = gauge("pretrain_accelerator_memory_reserved_bytes", "Accelerator memory reserved.")
        self.data_wait = counter("pretrain_dataloader_wait_seconds_total", "Time spent waiting for batches.")

    def _define_checkpoint_metrics(self) -> None:
        gauge = self._gauge
        self.ckpt_duration = gauge("pretrain_checkpoint_save_duration_seconds", "Duration of the last checkpoint save.")
        self.ckpt_bytes = gauge("pretrain_checkpoint_size_bytes", "Bytes this node wrote in the last checkpoint.")
        self.ckpt_failures = self._counter("pretrain_checkpoint_failures_total", "Checkpoint saves that failed.")
        self._failures_counted = 0
        self.ckpt_step = gauge(names.CHECKPOINT_STEP, "Step of the newest verified checkpoint.")
        self.ckpt_time = gauge(
            names.CHECKPOINT_TIME, "Unix time of the newest verified checkpoint (age: time() - this)."
        )
        self.stop_save = gauge(
            "pretrain_stop_checkpoint_seconds",
            "From SIGTERM (preemption, eviction, a resize) to the last checkpoint committed: must fit the pod's "
            "terminationGracePeriodSeconds.",
        )

    def _define_health_metrics(self) -> None:
        # No sample before the first beat: a 0 would read as a heartbeat in 1970, a stall.
        self._heartbeat = self._family(names.HEARTBEAT, "Unix time of the last progress (step, evaluation, "
                                       "checkpoint).")  # fmt: skip
        self._stall_limit = self._family(names.STALL_LIMIT, "Seconds without progress that the watchdog calls a stall.")
        from prometheus_client import Counter

        self._guard_events = Counter(names.GUARD_EVENTS, "Bad steps the loss guard found (non-finite, spike).",
                                     [*self._label_names, names.GUARD_KIND], registry=self.registry)  # fmt: skip
        self._guard_last_step = self._family(names.GUARD_LAST_STEP, "The last step the loss guard found bad.")
        self._time = Counter(names.TIME_SECONDS, "Where this trainer's time went: restart, training, recomputed "
                             "(steps trained again), checkpoint, evaluation.", [*self._label_names, names.TIME_KIND],
                             registry=self.registry)  # fmt: skip

    def observe_guard(self, kind: str, step: int) -> None:
        self._guard_events.labels(**self._labels, **{names.GUARD_KIND: kind}).inc()
        self._guard_last_step.labels(**self._labels).set(step)

    def observe_time(self, kind: str, seconds: float) -> None:
        self._time.labels(**self._labels, **{names.TIME_KIND: kind}).inc(max(0.0, seconds))

    def observe_heartbeat(self, when: float, limit: float) -> None:
        self._heartbeat.labels(**self._labels).set(when)
        self._stall_limit.labels(**self._labels).set(limit)

    def begin(self, total_steps: int, start: int) -> None:
        """The run's steps, known once set up: from now on the step is served."""
        self.step = self._step.labels(**self._labels)
        self.step.set(start)
        self._total.labels(**self._labels).set(total_steps)

    def observe_step(
        self, *, step: int, loss: float, lr: float, grad_norm: float | None, tokens: int, samples: int,
        seconds: float, mfu: float | None,
    ) -> None:  # fmt: skip
        self.step.set(step)
        self.loss.set(loss)
        self.lr.set(lr)
        if grad_norm is not None:
            self.grad_norm.set(grad_norm)
        self.tokens.inc(tokens)
        self.samples.inc(samples)
        self.step_time.observe(seconds)
        self.tokens_per_second.set(tokens / seconds if seconds > 0 else 0.0)
        if mfu is not None:
            self.mfu.set(mfu)

    def observe_eval(self, scores: dict[str, float]) -> None:
        for name, value in scores.items():
            if name != "loss":
                self._eval_metric.labels(**self._labels, **{names.EVAL_METRIC_LABEL: name}).set(value)

    def observe_sources(self, tokens: dict[str, int]) -> None:
        for source, n in tokens.items():
            self._source_tokens.labels(**self._labels, **{names.SOURCE_LABEL: source}).set(n)

    def observe_memory(self, allocated: int, reserved: int) -> None:
        self.mem_allocated.set(allocated)
        self.mem_reserved.set(reserved)

    def observe_checkpoint(
        self, *, seconds: float, nbytes: int, failures: int, step: int | None, when: float | None
    ) -> None:
        self.ckpt_duration.set(seconds)
        self.ckpt_bytes.set(nbytes)
        if failures > self._failures_counted:  # the store counts; the counter follows it
            self.ckpt_failures.inc(failures - self._failures_counted)
            self._failures_counted = failures
        if step is not None:
            self.ckpt_step.set(step)
        if when is not None:
            self.ckpt_time.set(when)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def now() -> float:
    return time.time()
