"""The run in MLflow (`monitoring.mlflow`): rank 0 mirrors the run's history into one MLflow run,
over the tracking server's REST API (no mlflow package in the image).

What goes there: the spec flattened as params (once, when the run is made), the history's step
and evaluation records as metrics (`train/loss`, `eval/loss`, ... by step), the exported model's
location as the tag `pretrain.export`, and the run's end (FINISHED, KILLED on a stop, FAILED).
One job is one MLflow run across attempts: its id lies beside the checkpoints
(`mlflow-run.json`), and a resumed attempt continues it.

No duplicates and no gaps: metrics are sent only once the checkpoint that covers their step is
committed (an attempt that dies trains those steps again, and only then are they sent; all of
them only when the run finishes), and a
resumed attempt first sends the history's records the run does not have yet (the run's latest
step says which). Tracking never stops training: the sending is a thread of its own, a failure is
said once and retried with backoff (1 s doubling to a minute), and the end waits at most
`CLOSE_SECONDS` for the last records.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pretrain.api.spec import MlflowSpec, PretrainJob
from pretrain.metrics.history import TAGS
from pretrain.storage.location import Location

log = logging.getLogger("pretrain.trainer")

#: Credentials, from spec.checkpoint.credentialsSecret's keys (as MLflow's own client reads them).
ENV_TOKEN, ENV_USER, ENV_PASSWORD = "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
#: Where the job's MLflow run id is kept, beside the checkpoints; and the run's tag naming them.
RUN_FILE, HOME_TAG = "mlflow-run.json", "pretrain.checkpoint"
#: MLflow's limits of one runs/log-batch request, and of a param's value.
METRICS_PER_BATCH, PARAMS_PER_BATCH, PARAM_VALUE_CHARS = 1000, 100, 6000
#: How long the end of a run waits for the last records to reach the server.
CLOSE_SECONDS = 10.0
#: Metric points kept while the server is unreachable; the oldest go past this (said once).
MAX_PENDING = 200_000


class MlflowError(Exception):
    """The tracking server's refusal: `code` is MLflow's error_code (or the HTTP status)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class MlflowRest:
    """The few calls of MLflow's REST API (2.0) that the mirror makes."""

    def __init__(self, tracking_uri: str, env: dict[str, str] | None = None, timeout: float = 10.0) -> None:
        self.base = tracking_uri.rstrip("/") + "/api/2.0/mlflow/"
        self.timeout = timeout
        env = dict(os.environ) if env is None else env
        self.headers = {"Content-Type": "application/json"}
        if env.get(ENV_TOKEN):
            self.headers["Authorization"] = f"Bearer {env[ENV_TOKEN]}"
        elif env.get(ENV_USER):
            pair = f"{env[ENV_USER]}:{env.get(ENV_PASSWORD, '')}".encode()
            self.headers["Authorization"] = f"Basic {base64.b64encode(pair).decode()}"

    def call(self, path: str, body: dict[str, Any] | None = None, query: dict[str, str] | None = None) -> Any:
        """POST `body` (GET without one) and return the JSON answer; MlflowError on a refusal."""
        url = self.base + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=self.headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return json.loads(answer.read(16 * 2**20) or b"{}")
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read(65536))
            except ValueError:
                detail = {}
            raise MlflowError(str(detail.get("error_code") or e.code), str(detail.get("message") or e.reason)) from None


def metric_points(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The MLflow metric points of one history record (a step's or an evaluation's), finite only."""
    if record.get("event") is not None or "step" not in record:
        return []
    millis = int(float(record.get("time") or time.time()) * 1000)
    out = []
    for key, value in record.items():
        name = TAGS.get(key) or (f"eval/{key[5:]}" if key.startswith("eval_") else None)
        if name and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out.append({"key": name, "value": float(value), "timestamp": millis, "step": int(record["step"])})
    return out


def flat_params(tree: Any, prefix: str = "") -> list[dict[str, str]]:
    """The spec as MLflow params: dotted camelCase keys, lists as JSON, values cut to MLflow's limit."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in flat_params(v, f"{prefix}{k}.")]
    if tree is None:
        return []
    value = json.dumps(tree) if isinstance(tree, list | bool) else str(tree)
    return [{"key": prefix.rstrip(".")[:250], "value": value[:PARAM_VALUE_CHARS]}]


def _leading(points: list[dict[str, Any]], through: float) -> list[dict[str, Any]]:
    """The points before the first one past step `through` (points come in step order)."""
    out = []
    for p in points:
        if p["step"] > through:
            break
        out.append(p)
    return out


@dataclass
class RunFile:
    """Where the job's run id is kept (beside the checkpoints): read() -> dict or None, write(dict)."""

    read: Callable[[], dict[str, Any] | None]
    write: Callable[[dict[str, Any]], None]
    #: The checkpoint location: the run is tagged with it (HOME_TAG), to be found without the file.
    home: str = ""

    @classmethod
    def beside_checkpoints(cls, loc: Location) -> RunFile:
        path = loc.join(RUN_FILE)

        def read() -> dict[str, Any] | None:
            try:
                found = json.loads(loc.retry(f"read {RUN_FILE}", lambda: loc.fs.cat_file(path))[:65536])
            except FileNotFoundError:
                return None
            except ValueError:  # not JSON: a new run is made, and the file written again
                return None
            return found if isinstance(found, dict) else None

        return cls(read, lambda run: loc.pipe(f"write {RUN_FILE}", path, json.dumps(run).encode()), loc.uri)


class MlflowMirror:
    """Rank 0's mirror of the run's history into one MLflow run; `add` every history record,
    `close` at the end. Everything that talks to the server runs on the mirror's own thread."""

    def __init__(self, spec: MlflowSpec, job: PretrainJob, run_file: RunFile, rest: MlflowRest | None = None) -> None:
        self.spec, self.job, self.run_file = spec, job, run_file
        self.rest = rest or MlflowRest(spec.tracking_uri)
        self.run_id: str | None = None
        self.pending: list[dict[str, Any]] = []  # metric points, in the order they were logged
        self.commit_through = -1  # points up to this step are covered by a committed checkpoint
        self.sent_through = -1  # the run's latest step on the server
        self.status = "FINISHED"
        self.export: str | None = None
        self.closing = False
        self.failures = 0  # failures in a row (0: the server answers)
        self.dropped = 0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="mlflow", daemon=True)

    def start(self, history: list[dict[str, Any]], resume_step: int) -> MlflowMirror:
        """Begin with the run's durable history (records up to `resume_step`, as the checkpoint
        it resumes from covers them): what the MLflow run lacks of it is sent first."""
        for record in history:
            if int(record.get("step") or 0) <= resume_step:
                self.pending.extend(metric_points(record))
        self.commit_through = resume_step
        self._thread.start()
        return self

    def add(self, record: dict[str, Any]) -> None:
        """One history record: points to send, or an event that moves what may be sent."""
        with self._cv:
            event, step = record.get("event"), int(record.get("step") or 0)
            if event in ("start", "rollback"):  # the steps after this are trained again
                keep = step if event == "start" else int(record.get("to_step") or 0)
                self.pending = [p for p in self.pending if p["step"] <= keep]
            elif event == "checkpoint":
                self.commit_through = max(self.commit_through, step)
                self._cv.notify()
            elif event == "stop":
                self.status = "KILLED"
            elif event == "export":
                self.export = str(record.get("uri"))
            self.pending.extend(metric_points(record))
            if len(self.pending) > MAX_PENDING:
                self.dropped += len(self.pending) - MAX_PENDING
                self.pending = self.pending[-MAX_PENDING:]

    def close(self, *, failed: bool = False) -> None:
        """Send what is left and end the run (FAILED when `failed`); wait at most CLOSE_SECONDS."""
        with self._cv:
            self.closing = True
            if failed:
                self.status = "FAILED"
            self._cv.notify()
        self._thread.join(CLOSE_SECONDS)
        if self._thread.is_alive() or self.pending:
            log.warning("MLflow: %d metric point(s) of this run were not sent to %s (the server did not answer)",
                        len(self.pending) + self.dropped, self.spec.tracking_uri)  # fmt: skip

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        first = True
        while True:
            with self._cv:
                if not self.closing and not first:
                    self._cv.wait(self._backoff() if self.failures else 5.0)
                closing, first = self.closing, False
            try:
                self._open()
                self._send(everything=closing and self.status == "FINISHED")  # else only what a checkpoint covers
                if closing:
                    self._finish()
                    return
                if self.failures:
                    log.info("MLflow: %s answers again", self.spec.tracking_uri)
                self.failures = 0
            except (OSError, MlflowError) as e:
                self._failed(e)
                if closing:
                    return

    def _backoff(self) -> float:
        return float(min(2 ** (self.failures - 1), 60))

    def _failed(self, e: Exception) -> None:
        self.failures += 1
        if self.failures == 1:
            log.warning("MLflow tracking at %s failed (%s); training goes on, and the records are sent once it "
                        "answers (retried with backoff)", self.spec.tracking_uri, e)  # fmt: skip
        else:
            log.debug("MLflow still failing: %s", e)

    def _open(self) -> None:
        """The job's MLflow run, and the run's latest step (nothing at or below it is sent again):
        the run named beside the checkpoints, else the experiment's run tagged with this checkpoint
        location (made by an attempt that died before it could name it), else a new one. The
        spec goes in as params once, on a run that has none."""
        if self.run_id is not None:
            return
        experiment = self._experiment_id()
        known = self.run_file.read()
        run_id = str(known["runId"]) if known and known.get("trackingUri") == self.spec.tracking_uri else None
        run = self._named(run_id) if run_id else None
        run = run or self._tagged(experiment)
        if run is None:
            meta = self.job.metadata
            tags = [{"key": "pretrain.job", "value": f"{meta.namespace or 'default'}/{meta.name}"},
                    {"key": HOME_TAG, "value": self.run_file.home}]  # fmt: skip
            run = self.rest.call("runs/create", {"experiment_id": experiment, "run_name": self.spec.run_name or meta.name,
                                                 "start_time": int(time.time() * 1000), "tags": tags})["run"]  # fmt: skip
        run_id = str(run["info"]["run_id"])
        if known is None or known.get("runId") != run_id:
            self.run_file.write({"trackingUri": self.spec.tracking_uri, "experimentId": experiment, "runId": run_id})
        data = run.get("data") or {}
        if not data.get("params"):
            params = flat_params(self.job.model_dump(by_alias=True, exclude_none=True, mode="json")["spec"])
            for i in range(0, len(params), PARAMS_PER_BATCH):
                self.rest.call("runs/log-batch", {"run_id": run_id, "params": params[i : i + PARAMS_PER_BATCH]})
        self.rest.call("runs/update", {"run_id": run_id, "status": "RUNNING"})
        self.sent_through = max((int(m.get("step") or 0) for m in data.get("metrics") or []), default=-1)
        self.run_id = run_id
        log.info("MLflow: run %s in experiment %s at %s", run_id, self.spec.experiment, self.spec.tracking_uri)

    def _named(self, run_id: str) -> dict[str, Any] | None:
        """The run `run_id`, or None when the server has no such run (deleted, or another server's)."""
        try:
            return dict(self.rest.call("runs/get", query={"run_id": run_id})["run"])
        except MlflowError as e:
            if e.code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None

    def _tagged(self, experiment: str) -> dict[str, Any] | None:
        """The newest run of `experiment` tagged with this checkpoint location, or None."""
        if "'" in self.run_file.home:
            return None  # not expressible in MLflow's filter syntax: a new run
        found = self.rest.call("runs/search", {"experiment_ids": [experiment], "max_results": 1,
                                               "filter": f"tags.`{HOME_TAG}` = '{self.run_file.home}'",
                                               "order_by": ["attributes.start_time DESC"]})  # fmt: skip
        runs = found.get("runs") or []
        return dict(runs[0]) if runs else None

    def _experiment_id(self) -> str:
        try:
            found = self.rest.call("experiments/get-by-name", query={"experiment_name": self.spec.experiment})
            return str(found["experiment"]["experiment_id"])
        except MlflowError as e:
            if e.code != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            return str(self.rest.call("experiments/create", {"name": self.spec.experiment})["experiment_id"])
        except MlflowError as e:  # made meanwhile by another job
            if e.code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = self.rest.call("experiments/get-by-name", query={"experiment_name": self.spec.experiment})
            return str(found["experiment"]["experiment_id"])

    def _send(self, *, everything: bool) -> None:
        """Send the points a committed checkpoint covers (all of them at the end), in order,
        leaving out what the run has already; each batch leaves the queue once the server took it."""
        while True:
            with self._cv:
                through = math.inf if everything else self.commit_through
                ready = _leading(self.pending[:METRICS_PER_BATCH], through)
                fresh = [p for p in ready if p["step"] > self.sent_through]
            if not ready:
                return
            if fresh:
                self.rest.call("runs/log-batch", {"run_id": self.run_id, "metrics": fresh})
            with self._cv:
                del self.pending[: len(ready)]

    def _finish(self) -> None:
        tags = [{"key": "pretrain.export", "value": self.export}] if self.export else []
        if tags:
            self.rest.call("runs/log-batch", {"run_id": self.run_id, "tags": tags})
        self.rest.call("runs/update", {"run_id": self.run_id, "status": self.status,
                                       "end_time": int(time.time() * 1000)})  # fmt: skip
